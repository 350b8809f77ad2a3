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
            soak stops at the first failing audit. Lock-order validation (lockdep) is on for every \
            thread. After the run: a final audit, every byte through the CPU, the kernel's warnings \
            and the lock-order cycles found. `make soak` runs a short one.

            Replay: the same seed and options give the same soak, step for step. A failing soak \
            prints the command that replays it up to the failing operation with --steps N, the \
            last N scheduling steps (thread, event, virtual time) that led there.

            With --json prints one object whose results are the settings, the counts of each \
            operation, bytesCorrupted, accessErrors, leakedReferences, locksHeld, leakedFrames, \
            failedAtOperation, audit, findings, warnings, lockOrderViolations, deadlock, timedOut, scheduleSteps, \
            virtualSeconds, seconds and stepsPerSecond (scheduling points per host second) (Docs/json.md); \
            only seconds and stepsPerSecond differ between runs of one seed.

            Exit status: 0 the soak was clean; 1 it found corruption, an unexpected access \
            error, a leak, a held lock, a warning, a lock-order cycle, a deadlock or a host timeout (or could not run); 64 an \
            invalid argument; 130 interrupted (SIGINT).
            """)

    @Option(name: [.customLong("operations"), .customLong("ops")], parsing: .unconditional,
            help: "Operations in total (1-1000000000).")
    var operations = 100_000

    @Option(name: .long, parsing: .unconditional, help: "CPU threads, one emulated CPU each (1-62); a GPU and a process thread besides.")
    var cpus = 4

    @Option(name: .long, parsing: .unconditional, help: "Pages of 4 KiB in the buffer's small-page region (1-65536).")
    var pages = 64

    @Option(name: .long, parsing: .unconditional, help: "2 MiB THP regions in the buffer (0-16; with huge in the mix).")
    var hugeRegions = 2

    @Option(name: .long, parsing: .unconditional, help: "Operations mixed in: a comma-separated list, or all.")
    var mix = "all"

    @Option(name: .long, parsing: .unconditional, help: "Operations between two invariant audits (at least 1).")
    var auditEvery = 100_000

    @Option(name: .long, parsing: .unconditional, help: "Seed of the schedule and of every thread's choices (0 to 2^64-1).")
    var seed: UInt64 = 1

    @Option(name: .long, parsing: .unconditional, help: "Scheduling steps to print, the last ones (0-1000000); with --operations set to the operation a finding names, they lead up to it.")
    var steps = 0

    @Flag(name: .long, help: "Run the stale-entry checker on every TLB hit (on in debug builds, off in release ones unless asked for). Every stale access is a warning.")
    var checkTLB = false

    @OptionGroup var machine: MachineOptions

    @Option(name: .long, help: "The driver soaked: mirror (MirrorDevice) or gpusvm (the Xe-like driver on drm_gpusvm and drm_pagemap).")
    var driver = "mirror"

    @OptionGroup var output: JSONOutputOptions

    func settings() throws -> SoakSettings {
        var s = SoakSettings()
        s.driver = try LivelockCommand.parse(driver, "--driver", HarnessDriver.allCases.map(\.rawValue)) { HarnessDriver(rawValue: $0) }
        if checkTLB { s.checksStaleTLBEntries = true }
        s.operations = operations
        s.cpus = cpus
        s.pages = pages
        s.hugeRegions = hugeRegions
        s.auditEvery = auditEvery
        s.seed = seed
        s.logSteps = steps
        s.machine = try machine.profile()
        guard let m = SoakMix(names: mix) else {
            throw ValidationError("--mix must list operations among \(SoakMix.names.map(\.0).joined(separator: ", ")) or all (got \(mix))")
        }
        s.mix = m
        do { try s.validate() } catch {
            throw ValidationError(error.description.replacingOccurrences(of: "operations must", with: "--operations must")
                .replacingOccurrences(of: "cpus must", with: "--cpus must")
                .replacingOccurrences(of: "hugeRegions must", with: "--huge-regions must")
                .replacingOccurrences(of: "auditEvery must", with: "--audit-every must")
                .replacingOccurrences(of: "logSteps must", with: "--steps must")
                .replacingOccurrences(of: "pages must", with: "--pages must"))
        }
        return s
    }

    func validate() throws { _ = try settings() }

    func run() throws {
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
