// `svmemu soak`: the randomized soak under the deterministic scheduler.
import ArgumentParser
import Foundation
import MirrorDriver
import SVMEmu
import SVMStress

/// Runs a randomized soak and prints what it found.
struct SoakCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "soak",
        abstract: "Randomized soak under the deterministic scheduler: accesses, migrations at 4 KiB and 2 MiB, mm calls, audits.",
        discussion: """
            --cpus CPU threads read and write random words of a buffer (--pages pages of 4 KiB \
            and --huge-regions 2 MiB THP regions) while a GPU thread reads and writes it through \
            the device (GPU faults), migrates 4 KiB pages and whole 2 MiB folios (SELECT_COMPOUND) \
            to device memory and back and now and then evicts everything, and a process thread \
            calls munmap (then mmap of the hole), mprotect (read-only and back), madvise \
            (DONTNEED, HUGEPAGE, COLLAPSE), mremap (away and back), fork (a child with its own \
            shadow, released later), move_pages and migrate_pages between the two RAM nodes. \
            --mix picks the operations (a comma-separated list of gpu, migrate, huge, evict, \
            munmap, mprotect, madvise, mremap, fork, move-pages, or all). All run under the \
            deterministic scheduler seeded by --seed: the same seed, the same soak.

            Every read is checked against a shadow copy of every word (writes to read-only \
            ranges must fail with EACCES); every --audit-every operations the threads meet at a \
            quiescent point where the kernel's invariants are audited (references = mappings + \
            held references, no folio, page-table, zone or mmap lock held, every frame free or \
            reachable, no migration entry left) and every byte is compared with the shadow; the \
            device's page table is compared with the CPU's (every page the device maps is the \
            frame the CPU maps there, and writable only where the CPU's entry is); the \
            soak stops at the first failing audit. Lock-order validation (lockdep) is on for every \
            thread. After the run: a final audit, every byte through the CPU, the kernel's warnings \
            and the lock-order cycles found. `make soak` runs a short one.

            Replay: the same seed and options give the same soak, step for step. A failing soak \
            prints the command that replays it up to the failing operation with --steps N, the \
            last N scheduling steps (thread, event, virtual time) that led there.

            With --json prints one object whose results are the settings, the counts of each \
            operation, bytesCorrupted, accessErrors, staleDeviceMappings, leakedReferences, locksHeld, leakedFrames, \
            failedAtOperation, audit, findings, warnings, lockOrderViolations, deadlock, timedOut, scheduleSteps, \
            virtualSeconds, seconds and stepsPerSecond (scheduling points per host second) (Docs/json.md); \
            only seconds and stepsPerSecond differ between runs of one seed.

            --seeds runs one soak per seed (1-100, 3,7,12 or 1-4,9; the same settings) and prints a table \
            of the sweep: seeds per outcome, the figures summed, the first failing seed with the \
            command that replays it (`make soak-sweep`). With --shard I/N it runs the I-th of N \
            contiguous blocks of those seeds and prints JSON Lines, one line per seed (seed, \
            outcome, figures, replay command), for `svmemu merge`, which makes the same report of \
            the shards (Docs/sharding.md).

            Exit status: 0 the soak (every seed) was clean; 1 it found corruption, an unexpected access \
            error, a leak, a held lock, a warning, a lock-order cycle, a deadlock or a host timeout (or could not run); 64 an \
            invalid argument; 130 interrupted (SIGINT).
            """)

    @Option(name: .long, parsing: .unconditional, help: "Operations in total (1-1000000000).")
    var operations = 100_000

    @Option(name: .long, parsing: .unconditional, help: "Emulated CPUs that run the CPU threads, one thread each (1-62); the machine has two more, for the GPU and the process thread.")
    var cpus = 4

    @Option(name: .long, parsing: .unconditional, help: "Pages of 4 KiB in the buffer's small-page region (1-65536).")
    var pages = 64

    @Option(name: .long, parsing: .unconditional, help: "2 MiB THP regions in the buffer (0-16; with huge in the mix).")
    var hugeRegions = 2

    @Option(name: .long, parsing: .unconditional, help: "Operations mixed in: a comma-separated list of gpu, migrate, huge, evict, munmap, mprotect, madvise, mremap, fork, move-pages, or all.")
    var mix = "all"

    @Option(name: .long, parsing: .unconditional, help: "Operations between two invariant audits (1 or more).")
    var auditEvery = 100_000

    @Option(name: .long, parsing: .unconditional, help: "Seed of the schedule and of every thread's choices (0 to 2^64-1; default 1).")
    var seed: UInt64?

    @Option(name: .long, help: "Run one soak per seed instead of --seed, and print the sweep's report: \(SeedsSyntax.help) (at most 1000000000 seeds).")
    var seeds: String?

    @Option(name: .long, parsing: .unconditional, help: "Scheduling steps to print, the last ones (0-1000000); with --operations set to the operation a finding names, they lead up to it.")
    var steps = 0

    @Flag(name: .long, help: "Run the stale-entry checker on every TLB hit (on in debug builds, off in release ones unless asked for). Every stale access is a warning.")
    var checkTLB = false

    @OptionGroup var machine: MachineOptions

    @Option(name: .long, help: "The driver soaked: mirror (MirrorDevice) or gpusvm (the Xe-like driver on drm_gpusvm and drm_pagemap).")
    var driver = "mirror"

    @OptionGroup var output: JSONOutputOptions

    @OptionGroup var sweep: ShardOption

    @OptionGroup var report: ReportFileOptions

    @OptionGroup var alwaysDeterministic: AlwaysDeterministicFlag

    /// `--ops`, the old spelling of `--operations`.
    struct OldSpellings: DeprecatedSpellings {
        @Option(name: .customLong("ops"), parsing: .unconditional, help: .private) var operations: Int?
    }
    @OptionGroup var old: OldSpellings

    func settings() throws -> SoakSettings {
        var s = SoakSettings()
        s.driver = try LivelockCommand.parse(driver, "--driver")
        if checkTLB { s.checksStaleTLBEntries = true }
        s.operations = operations
        s.cpus = cpus
        s.pages = pages
        s.hugeRegions = hugeRegions
        s.auditEvery = auditEvery
        s.seed = seed ?? 1
        s.logSteps = steps
        s.machine = try machine.profile()
        guard let m = SoakMix(names: mix.lowercased()) else {
            throw ValidationError("--mix must list operations among \(SoakMix.names.map(\.0).joined(separator: ", ")) or all (got \(mix))")
        }
        s.mix = m
        do { try s.validate() } catch { throw ValidationError(LivelockCommand.flagged(error.description)) }
        return s
    }

    mutating func validate() throws {
        try Deprecation.adopt(old.operations, into: &operations, defaultValue: 100_000, oldFlag: "--ops", newFlag: "--operations")
        _ = try settings()
        _ = try seedSet()
        _ = try sweep.parsed()
        try sweep.check(json: output.json)
        if seeds == nil && sweep.shard != nil { throw ValidationError("--shard splits a set of seeds: give --seeds (for example --seeds 1-100)") }
        if seeds != nil && seed != nil { throw ValidationError("give --seed (one soak) or --seeds (a sweep), not both") }
        if seeds != nil && steps != 0 { throw ValidationError("--steps logs one soak's steps: give --seed N instead of --seeds") }
    }

    /// The seeds of `--seeds`, nil without it. Throws `ValidationError` naming the flag.
    func seedSet() throws(ValidationError) -> SeedSet? {
        guard let seeds else { return nil }
        return try SeedsSyntax.parse(seeds)
    }

    /// The soak's settings besides the seed, as the flags that give them.
    func sweepSettings(_ s: SoakSettings) -> [String: String] {
        var out = [
            "--operations": "\(s.operations)", "--cpus": "\(s.cpus)", "--pages": "\(s.pages)",
            "--huge-regions": "\(s.hugeRegions)", "--mix": s.mix == .all ? "all" : s.mix.description,
            "--audit-every": "\(s.auditEvery)",
        ]
        if s.checksStaleTLBEntries { out["--check-tlb"] = "" }
        return out
    }

    /// The command that replays a failing seed up to where it failed, with the last 200 steps.
    static func replay(_ r: SoakResult, settings: [String: String]) -> String {
        var options = settings
        options["--operations"] = "\(r.failedAtOperation ?? r.operations)"
        options["--steps"] = "200"
        return "svmemu soak --seed \(r.settings.seed) " + SweepHeader.arguments(options)
    }

    /// Runs a sweep: every seed of `range` (of `shard`'s block, printing
    /// JSON Lines), or all of them with the report at the end.
    func runSweep(_ range: SeedSet, shard: SweepShard?) throws {
        let base = try settings()
        let options = sweepSettings(base)
        let header = ShardOption.header(command: "soak", shard: shard ?? .whole, seeds: range, settings: options)
        var lines: [(source: String, line: SweepLine)] = []
        let progress = ProgressLine(label: "svmemu soak")
        func emit(_ line: SweepLine) {
            if shard != nil { return ShardOption.emit(line) }
            lines.append((source: "soak", line: line))
            if case .seed(let r) = line { progress.say("seed \(r.seed) of \(range): \(r.outcome)") }
        }
        let results = try Sweep.run(header, emit: emit) { (seed: UInt64) throws(CLIError) -> SweepSeedResult in
            var s = base
            s.seed = seed
            let r: SoakResult
            do { r = try Soak.run(s) } catch { throw CLIError.runFailed("svmemu: the soak of seed \(seed) could not run: \(error)") }
            return SweepSeedResult(shard: header.shard, seed: seed, outcome: r.sweepOutcome, figures: r.sweepFigures,
                                   replay: r.clean ? nil : Self.replay(r, settings: options), detail: r.sweepDetail)
        }
        progress.done()
        if shard == nil {
            let report = Sweep.merge(lines)
            try printReport(report, json: output.json, text: MergeCommand.table(report))
        }
        if results.contains(where: { (r: SweepSeedResult) in r.failed }) { throw ExitStatus.failure }
    }

    func run() throws {
        if let range = try seedSet() { return try runSweep(range, shard: try sweep.parsed()) }
        let seed = self.seed ?? 1
        let r: SoakResult
        do { r = try Soak.run(try settings()) } catch let e as StormError {
            throw CLIError.runFailed("svmemu: the soak could not run: \(e.description)")
        }
        if output.json {
            print(try JSONReport.render(for: self, results: r))
        } else {
            print("""
                soak: \(r.operations) operations, driver \(r.settings.driver.rawValue), seed \(r.settings.seed), mix \(r.settings.mix), TLB checker \(r.settings.checksStaleTLBEntries ? "on" : "off")
                  CPU: \(r.reads) reads, \(r.writes) writes; GPU: \(r.gpuReads) reads, \(r.gpuWrites) writes, \(r.gpuFaults) faults
                  migrate_vma: \(r.migrationsToDevice) pages to device, \(r.migrationsToSystem) to system \
                (\(r.hugeMigrations) whole 2 MiB folios, \(r.deviceFolioSplits) device folio splits), \(r.evictions) evicted
                  mm: \(r.munmaps) munmap, \(r.mprotects) mprotect, \(r.madvises) madvise, \(r.mremaps) mremap, \
                \(r.forks) fork (\(r.childAccesses) child accesses), \(r.pagesMoved) pages moved between nodes
                  \(r.writesRefused) writes refused (read-only), \(r.racedAccesses) accesses raced an mm change
                  \(r.audits) audits: bytes corrupted \(r.bytesCorrupted), access errors \(r.accessErrors), \
                stale device mappings \(r.staleDeviceMappings), \
                leaked references \(r.leakedReferences), locks held \(r.locksHeld), leaked frames \(r.leakedFrames), \
                warnings \(r.warnings.count), lock-order cycles \(r.lockOrderViolations.count)\(r.timedOut ? ", timed out" : "")\(r.deadlock.map { ", " + $0 } ?? "")
                  \(r.scheduleSteps) scheduling steps, \(String(format: "%.3f", r.virtualSeconds)) s virtual, \
                \(String(format: "%.2f", r.seconds)) s on the host (\(Int(r.stepsPerSecond)) steps/s, \
                \(r.seconds > 0 ? Int(Double(r.operations) / r.seconds) : 0) operations/s)
                """)
            if let at = r.failedAtOperation, let a = r.audit {
                print("  the audit after operation \(at) failed (seed \(r.settings.seed)): \(a)")
            }
            for f in r.findings { print("  " + f) }
            for v in r.lockOrderViolations { print("  " + v.replacingOccurrences(of: "\n", with: "\n  ")) }
            if !r.stepLog.isEmpty {
                print("  the last \(r.stepLog.count) scheduling steps:")
                for step in r.stepLog { print("    " + step) }
            }
            if !r.clean && steps == 0 {
                let at = r.failedAtOperation ?? r.operations
                print("  replay: svmemu soak --seed \(seed) --operations \(at) --steps 200 (with the same --cpus, --pages, --huge-regions, --mix and --audit-every) ends with the steps that led there")
            }
        }
        if !r.clean { throw ExitStatus.failure }
    }
}
