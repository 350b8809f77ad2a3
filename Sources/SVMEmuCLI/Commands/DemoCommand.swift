// `svmemu demo`: the livelock, its fix, and the overhead breakdown.
import ArgumentParser
import Foundation
import MirrorDriver
import SVMEmu
import SVMStress

/// A small storm twice, legacy then trylock, both with the exclusive driver
/// lock, side by side; then the 4 KiB vs 2 MiB overhead breakdown.
struct DemoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract: "The livelock, its fix, and the overhead breakdown.",
        discussion: """
            Runs a small fault storm (8 threads reading each of 64 device-private pages; the driver's \
            migrateToRAM holds an exclusive lock, looks its range up for 10 µs before \
            migrate_vma_setup and waits 50 µs for its copy after it) with the legacy fault path, \
            then with the v6.15 trylock fault path, and prints them side by side; then the \
            4 KiB vs 2 MiB overhead breakdown over 64 MiB. With --json prints one object \
            (Docs/json.md) whose results are storms [legacy, trylock] and overhead [runs].

            The legacy run is meant to livelock: a livelock is the demo's result, not a failure, \
            so there is no --fail-on-livelock here (use svmemu livelock --fail-on-livelock in \
            scripts). \(ExitStatus.helpParagraph)
            """)

    /// 64 pages, a 1 s stall window, and 10 µs of range lookup before
    /// migrate_vma_setup: enough for eight threads to take their references
    /// together even on two cores.
    enum StormDefaults: StormOptionDefaults {
        static let pages = 64
        static let stallSeconds = 1.0
        static let lookupDelayUs = 10
    }

    @OptionGroup var storm: StormOptions<StormDefaults>

    @Option(name: .long, parsing: .unconditional, help: "Seed of the storms' data pattern (0 to 2^64-1; recorded in --json's arguments); the storms run on real threads, so their outcome is the host's. For a run a seed reproduces, use svmemu livelock --deterministic --seed.")
    var seed: UInt64 = 1

    @OptionGroup var output: JSONOutputOptions

    @OptionGroup var report: ReportFileOptions

    func validate() throws {
        var s = StormSettings()
        storm.apply(to: &s)
        do { try s.validate() } catch { throw ValidationError(LivelockCommand.flagged(error.description)) }
    }

    func run() throws {
        var results: [StormResult] = []
        for policy in [DeviceFaultPolicy.legacy, .trylock] {
            var s = StormSettings(faultPolicy: policy, driverLock: .exclusive, migrateToRAMWorkMicros: 50)
            storm.apply(to: &s)
            s.seed = seed
            s.joinTimeoutSeconds = 10
            var r = try LivelockCommand.runStorm(s, label: StormReport.title(r: s))
            r.perPage = []
            results.append(r)
        }
        if !output.json {
            print("1. The livelock and the trylock fix\n")
            print(StormReport.table(results), terminator: "")
            print("\n" + Self.explanation(results[0], results[1]))
        }
        let overhead = try Self.overheadRuns()
        try printReport(Results(storms: results, overhead: overhead), json: output.json,
                        text: "\n2. Where a fault's time goes\n\n" + OverheadHarness.demoSummary(overhead))
        // A livelock is the demo's point; a storm that failed its checks is not.
        for r in results where LivelockCommand.exitStatus(for: r, failOnLivelock: false) == ExitStatus.failure {
            throw CLIError.runFailed("svmemu demo: the \(StormReport.title(r)) storm failed its checks: "
                                     + ((r.error.map { [$0] } ?? []) + r.teardownIssues).joined(separator: "; "))
        }
    }

    /// The results of `--json`: the two storms (legacy, then trylock; without
    /// per-page records) and the overhead runs (`OverheadResult`, as in
    /// `svmemu overhead --json`'s `runs`).
    struct Results: Encodable {
        var storms: [StormResult]
        var overhead: [OverheadResult]
    }

    /// The buffer of the overhead breakdown: small enough for a demo.
    static let overheadBytes = 64 << 20

    /// The 4 KiB vs 2 MiB runs of GPU-fault (to VRAM) and CPU-fault (to RAM)
    /// migration over `overheadBytes` with memcpy copies; progress on stderr.
    static func overheadRuns() throws -> [OverheadResult] {
        let line = ProgressLine(label: "svmemu demo")
        defer { line.done() }
        do {
            return try OverheadHarness.demoRuns(bytes: overheadBytes, copyModel: .memcpy, progress: line.sink)
        } catch {
            throw CLIError.runFailed("svmemu demo: the overhead breakdown failed: \(error)")
        }
    }

    static func explanation(_ legacy: StormResult, _ trylock: StormResult) -> String {
        var s = "What happened:\n"
        if legacy.livelocked {
            s += "- legacy: every faulting thread takes a page reference before calling migrateToRAM, then blocks on the "
                + "driver lock holding it. The lock holder's migrate_vma_setup sees more references than the page's "
                + "mapping and its own explain (migrate_vma_check_page), restores the page and returns; the holder "
                + "faults again and queues up behind the others. \(legacy.migrateToRAMCalls.total) migrateToRAM calls, "
                + "\(legacy.pagesMigrated) page(s) back before the watchdog stopped it.\n"
        } else {
            s += "- legacy: this run was not declared livelocked (\(legacy.pagesMigrated) pages in \(legacy.migrateToRAMCalls.total) calls); "
                + "a longer --stall-seconds window or more threads make the livelock show.\n"
        }
        s += "- trylock: only the thread that wins the folio lock takes a reference and calls migrateToRAM; the others "
            + "return and retry the fault (\(trylock.faultRetries) retries), so the reference check passes: "
            + "\(trylock.pagesMigrated) of \(trylock.settings.pages) pages back with "
            + String(format: "%.2f", trylock.migrateToRAMCalls.perPageMean) + " migrateToRAM call(s) per page.\n"
        return s
    }
}

extension StormReport {
    static func title(r s: StormSettings) -> String { "\(s.faultPolicy.rawValue) + \(s.driverLock.rawValue) lock" }
}
