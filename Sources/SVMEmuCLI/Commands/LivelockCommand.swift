// `svmemu livelock`: the device-private fault storm.
import ArgumentParser
import Foundation
import MirrorDriver
import SVMEmu
import SVMStress

/// Runs one fault storm (SVMStress) and prints a table, or one JSON object.
struct LivelockCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "livelock",
        abstract: "Fault storm: show the livelock and the trylock fix.",
        discussion: """
            P pages start in device memory; for each page T threads meet at a barrier, then all \
            read it; next page. --release one-by-one hands them out of the barrier one by one \
            (pthread_barrier's futex wake chain) instead of all at once. With the legacy fault path (v6.1-v6.14) and an exclusive lock in \
            the driver's migrateToRAM, the threads waiting for the lock hold page references that \
            make the lock holder's reference check fail: no page ever comes back, and the watchdog \
            declares a livelock after --stall-seconds without progress. The trylock fault path \
            (v6.15) migrates each page with one migrateToRAM call.

            With --json prints one object (Docs/json.md) whose results are faultPolicy, driverLock, \
            threads, pages, pagesMigrated, \
            livelocked, stalledPage (or null), stall (what the threads were doing, or null), \
            migrateToRAMCalls {total, perPageMean, perPageP50, perPageP99, perPageMax}, \
            faultRetries, seconds, teardownClean, dataIntact, and more.

            --deterministic runs the storm's threads under the emulator's scheduler on --cpus \
            emulated CPUs, one at a time in virtual time, the schedule seeded by --seed: the same \
            seed gives byte-identical JSON but for the host's wall time (seconds, stepsPerSecond), \
            on any host and under any load; --stall-seconds is then virtual time (default 0.1 s: a \
            livelocked page costs host time for every retry). The JSON adds deterministic, cpus, \
            virtualSeconds, scheduleSteps, stepsPerSecond (scheduling points per host second) and \
            deadlock.

            Exit status: 0 the storm ran and its result is printed, a livelock included; 2 with \
            --fail-on-livelock, the watchdog declared a livelock; 1 the storm could not run or \
            failed its checks (a thread's access failed, teardown not clean, bytes changed; 1 wins \
            over 2), or the host has too little memory for it; 64 an invalid argument; 130 \
            interrupted (SIGINT).
            """)

    @OptionGroup var knobs: StormScenarioOptions

    /// 512 pages, a 2 s stall window, no lookup time.
    enum StormDefaults: StormOptionDefaults {
        static let pages = 512
        static let stallSeconds = 2.0
        static let lookupDelayUs = 0
    }

    @OptionGroup var storm: StormOptions<StormDefaults>

    @Flag(name: .long, help: "Run the storm's threads under the deterministic scheduler (one at a time, in virtual time, the schedule seeded by --seed): the same seed gives the same run on any host.")
    var deterministic = false

    @OptionGroup var schedule: ScheduleOptions

    @OptionGroup var output: JSONOutputOptions

    @OptionGroup var report: ReportFileOptions

    @Flag(name: .long, help: "With --json, include every completed page's record (refused without --json).")
    var perPage = false

    @Flag(name: .customLong("fail-on-livelock"),
          help: "Exit with status 2 when the watchdog declares a livelock (by default a livelock is a result: status 0).")
    var failOnLivelock = false

    func validate() throws {
        try schedule.check(deterministic: deterministic)
        _ = try settings()
        if perPage && !output.json {
            throw ValidationError("--per-page needs --json: the per-page records are printed only in the JSON "
                                  + "(the table shows their distribution)")
        }
    }

    /// The storm settings, or a message naming the valid values.
    func settings() throws -> StormSettings { try knobs.stormSettings(storm, schedule, deterministic: deterministic) }

    static func parse<T>(_ value: String, _ flag: String, _ valid: [String], _ make: (String) -> T?) throws -> T {
        guard let v = make(value.lowercased()) else {
            throw ValidationError("invalid \(flag) '\(value)'; valid values: \(valid.joined(separator: ", "))")
        }
        return v
    }

    /// The case of `T` whose raw value is `value` in any case, with `_` or
    /// without the `-` between words (`trylock_wait`, `onebyone`); a
    /// `ValidationError` names `flag` and the valid values.
    static func parse<T: RawRepresentable & CaseIterable>(_ value: String, _ flag: String) throws -> T where T.RawValue == String {
        func plain(_ s: String) -> String { s.lowercased().filter { $0 != "-" && $0 != "_" } }
        return try parse(value, flag, T.allCases.map(\.rawValue)) { v in T.allCases.first { plain($0.rawValue) == plain(v) } }
    }

    /// Settings messages in terms of the command's flags.
    static func flagged(_ message: String) -> String {
        message.replacingOccurrences(of: "threads must", with: "--threads must")
            .replacingOccurrences(of: "pages must", with: "--pages must")
            .replacingOccurrences(of: "migrateToRAM work must", with: "--fault-delay-us must")
            .replacingOccurrences(of: "migrateToRAM lookup time must", with: "--lookup-delay-us must")
            .replacingOccurrences(of: "stall window must", with: "--stall-seconds must")
            .replacingOccurrences(of: "cpus must", with: "--cpus must")
            .replacingOccurrences(of: "preemptions must", with: "--preemptions must")
            .replacingOccurrences(of: "operations must", with: "--operations must")
            .replacingOccurrences(of: "hugeRegions must", with: "--huge-regions must")
            .replacingOccurrences(of: "auditEvery must", with: "--audit-every must")
            .replacingOccurrences(of: "logSteps must", with: "--steps must")
    }

    /// Host memory a storm touches: RAM and VRAM frames for its pages with
    /// their metadata (2.05 bytes per byte) plus the program, measured as peak
    /// RSS of 256 MiB and 512 MiB storms of 2 MiB pages; with a margin.
    static func memoryNeeded(_ s: StormSettings) -> Int {
        s.pages * s.pageSize.bytes / 5 * 11 + 128 * ByteSize.mib
    }

    /// Refuses a storm the host cannot hold (`available`: bytes available).
    /// Throws `CLIError.notEnoughMemory` (exit status 1).
    func preflight(_ s: StormSettings, available: Int? = HostResources.availableBytes()) throws(CLIError) {
        try HostResources.checkMemory(needed: Self.memoryNeeded(s), available: available,
                                      for: "svmemu livelock --pages \(storm.pages) --page-size \(knobs.pageSize)")
    }

    func run() throws {
        let s = try settings()
        try preflight(s)
        var r = try Self.runStorm(s, label: "")
        if output.json && !perPage { r.perPage = [] }
        try printReport(r, json: output.json, text: StormReport.table([r], titles: [StormReport.title(r)]))
        let status = Self.exitStatus(for: r, failOnLivelock: failOnLivelock)
        if status == ExitStatus.failure {
            let why = r.error.map { ["a storm thread's access failed: " + $0] } ?? []
            FileHandle.standardError.write(Data(("svmemu livelock: the storm failed its checks: "
                + (why + r.teardownIssues + (r.dataIntact ? [] : ["bytes differ from the pattern"])).joined(separator: "; ")
                + "\n").utf8))
        } else if status == ExitStatus.livelockDetected {
            FileHandle.standardError.write(Data("svmemu livelock: livelock detected (--fail-on-livelock: exit status 2)\n".utf8))
        }
        if status != ExitStatus.success { throw status }
    }

    /// The exit status for a storm's result (see `ExitStatus`): `failure`
    /// when the storm failed its checks (a thread's access failed, teardown
    /// not clean, bytes changed), else `livelockDetected` when the watchdog
    /// declared a livelock and `failOnLivelock` is set, else `success`.
    static func exitStatus(for r: StormResult, failOnLivelock: Bool) -> ExitCode {
        if r.error != nil || !r.teardownClean || !r.dataIntact { return ExitStatus.failure }
        if r.livelocked && failOnLivelock { return ExitStatus.livelockDetected }
        return ExitStatus.success
    }

    /// Runs a storm with a progress line on `line`'s stream (standard error
    /// by default), shown when that stream is a terminal.
    ///
    /// - Throws: `CLIError.runFailed` when the storm cannot be set up.
    static func runStorm(_ s: StormSettings, label: String,
                         progress line: ProgressLine = ProgressLine(label: "")) throws -> StormResult {
        #if DEBUG
        FileHandle.standardError.write(Data("svmemu: warning: this is a debug build; storm timings are not representative (use swift build -c release)\n".utf8))
        #endif
        let progress: ((StormProgress) -> Void)? = line.enabled ? { p in
            line.say(StormReport.progressLine(p, label: label))
        } : nil
        defer { line.done() }
        do {
            return try StormHarness.run(s, progress: progress)
        } catch {
            throw CLIError.runFailed("svmemu: the storm could not run: \(error.description)")
        }
    }
}
