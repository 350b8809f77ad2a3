// `svmemu explore` and `svmemu replay`: storms under many deterministic
// schedules, and one of them again with its step log.
import ArgumentParser
import Foundation
import MirrorDriver
import SVMEmu
import SVMStress

/// What a deterministic storm run found wrong, if anything.
enum StormFinding: String, Codable, Sendable {
    case livelock, deadlock, lostWrite, leak, invariant

    /// The finding of `r`: a deadlock first, then a livelock, changed bytes,
    /// a failed check (a kernel warning, a thread's failed access), and a
    /// reference or lock left behind.
    init?(_ r: StormResult) {
        if r.deadlock != nil { self = .deadlock; return }
        if r.livelocked { self = .livelock; return }
        if r.teardownIssues.contains(where: { $0.contains("differs from the bytes") }) { self = .lostWrite; return }
        if r.error != nil || r.teardownIssues.contains(where: { $0.contains("kernel warning") }) {
            self = .invariant
            return
        }
        if !r.teardownClean || !r.dataIntact { self = .leak; return }
        return nil
    }
}

/// The results of `svmemu explore`.
struct ExploreResult: Encodable {
    var scenario: StormScenario
    var schedules: Int
    var found: StormFinding?
    /// The seed of the finding (nil when nothing was found).
    var seed: UInt64?
    var schedulesTried: Int
    /// The storm of the finding, or of the last schedule when nothing was found.
    var storm: StormResult?

    /// Every key, `null` for what is absent.
    func encode(to encoder: any Encoder) throws { try encoder.encodeProperties(of: self) }
}

/// Runs a storm under many deterministic schedules and stops at the first
/// livelock, deadlock, lost write, leak or invariant violation.
struct ExploreCommand: ParsableCommand, UnusedArguments {
    static let configuration = CommandConfiguration(
        commandName: "explore",
        abstract: "Run a storm under many deterministic schedules; stop at the first problem and print its seed.",
        discussion: """
            Runs the storm of `svmemu livelock` (the same options) under the deterministic \
            scheduler once per seed of --seeds, in ascending order (default 1-1000; seeded \
            priorities and --preemptions preemption points, as PCT), and stops at the first \
            livelock, deadlock (the wait-for cycle: which thread holds which lock and waits for \
            which), lost write, leaked reference or lock, or invariant violation (a kernel \
            warning). `svmemu replay --seed N` with the same options replays the finding with \
            its step log.

            With --json prints one object whose results are scenario, schedules, found \
            (livelock, deadlock, lostWrite, leak, invariant, or null), seed (or null), \
            schedulesTried and storm (the storm's result).

            --shard I/N runs the I-th of N contiguous blocks of the seeds of --seeds, \
            every seed of it (it does not stop at a finding), and prints JSON \
            Lines: a header (command, seeds, settings, version), one line per seed (seed, outcome: \
            clean or the finding, figures, and for a finding its replay command), an end line. \
            `svmemu merge` makes one report of the shards (Docs/sharding.md).

            Exit status: 0 nothing was found; 3 something was; 1 the storm could not run; 64 an \
            invalid argument.
            """)

    /// 16 pages and a 20 ms (virtual) stall window: a schedule takes milliseconds.
    enum StormDefaults: StormOptionDefaults {
        static let pages = 16
        static let stallSeconds = 0.02
        static let deterministicStallSeconds = 0.02
        static let lookupDelayUs = 0
    }

    @OptionGroup var knobs: StormScenarioOptions
    @OptionGroup var storm: StormOptions<StormDefaults>
    @OptionGroup var schedule: ScheduleOptions

    @Option(name: .long, help: "The seeds to try, one schedule each, in ascending order: \(SeedsSyntax.help) (default 1-1000; at most 1000000000 seeds).")
    var seeds: String?

    @OptionGroup var output: JSONOutputOptions

    @OptionGroup var sweep: ShardOption

    @OptionGroup var report: ReportFileOptions

    @OptionGroup var alwaysDeterministic: AlwaysDeterministicFlag

    /// `--schedules N` (with `--seed S`: the seeds S to S+N-1), the old spelling of `--seeds`.
    struct OldSpellings: DeprecatedSpellings {
        @Option(name: .customLong("schedules"), parsing: .unconditional, help: .private) var schedules: Int?
    }
    @OptionGroup var old: OldSpellings

    /// `seed` (of the shared storm options): every schedule takes its seed,
    /// the pattern's too, from `--seeds` (where an old `--seed S` went), so
    /// the report records it as null, as `soak --seeds` does.
    var unusedArguments: [String] { ["seed"] }

    /// The seeds explore tries without `--seeds`.
    static let defaultSeeds = "1-1000"

    mutating func validate() throws {
        if let n = old.schedules { try checkRange(n, 1...1_000_000, flag: "--schedules") }
        let range = SeedRange(first: knobs.seed, count: UInt64(old.schedules ?? 1000))
        if (old.schedules != nil || knobs.seed != 1) && seeds != range.description {
            // The old sweep: --seed S (its first seed) and --schedules N (its length).
            if seeds != nil {
                throw ValidationError("give --seeds only: explore tries the seeds of --seeds (--seed S --schedules N is its old spelling)")
            }
            let given = [knobs.seed != 1 ? "--seed \(knobs.seed)" : nil, old.schedules.map { "--schedules \($0)" }]
            Deprecation.warn(old: "explore " + given.compactMap { $0 }.joined(separator: " "), new: "--seeds \(range)")
            seeds = range.description
        }
        _ = try seedSet()
        _ = try settings()
        _ = try sweep.parsed()
        try sweep.check(json: output.json)
    }

    func settings() throws -> StormSettings { try knobs.stormSettings(storm, schedule) }

    func run() throws {
        if let shard = try sweep.parsed() { return try runShard(shard) }
        var s = try settings()
        let seeds = try seedSet()
        var result = ExploreResult(scenario: s.scenario, schedules: Int(seeds.count), found: nil, seed: nil,
                                   schedulesTried: 0, storm: nil)
        for seed in seeds.seeds {
            s.seed = seed
            var r: StormResult
            do { r = try StormHarness.run(s) } catch {
                throw CLIError.runFailed("svmemu: the storm could not run: \(error.description)")
            }
            r.perPage = []
            result.schedulesTried += 1
            result.storm = r
            if let found = StormFinding(r) {
                result.found = found
                result.seed = s.seed
                break
            }
        }
        try printReport(result, json: output.json, text: Self.summary(result) + "\n")
        if result.found != nil { throw ExitStatus.found }
    }

    /// The seeds of `--seeds` (default 1-1000). Throws `ValidationError` naming the flag.
    func seedSet() throws(ValidationError) -> SeedSet { try SeedsSyntax.parse(seeds ?? Self.defaultSeeds) }

    /// The storm's settings besides the seed, as `replay` takes them.
    func sweepSettings() throws -> [String: String] {
        let s = try settings()
        let out = [
            "--scenario": s.scenario.rawValue, "--fault-policy": s.faultPolicy.rawValue,
            "--driver-lock": s.driverLock.rawValue, "--fault-delay-us": "\(s.migrateToRAMWorkMicros)",
            "--page-size": s.pageSize == .huge ? "2m" : "4k", "--release": s.release.rawValue,
            "--threads": "\(s.threads)", "--pages": "\(s.pages)", "--stall-seconds": "\(s.stallSeconds)",
            "--lookup-delay-us": "\(s.migrateToRAMLookupMicros)", "--cpus": "\(s.cpus)",
            "--preemptions": "\(s.preemptions)",
        ]
        return out
    }

    /// Runs every seed of `shard` and prints its JSON Lines; exits 3 when a seed found something.
    func runShard(_ shard: SweepShard) throws {
        let base = try settings()
        let options = try sweepSettings()
        let header = ShardOption.header(command: "explore", shard: shard, seeds: try seedSet(), settings: options)
        let results = try Sweep.run(header, emit: ShardOption.emit) { (seed: UInt64) throws(CLIError) -> SweepSeedResult in
            var s = base
            s.seed = seed
            let r: StormResult
            do { r = try StormHarness.run(s) } catch {
                throw CLIError.runFailed("svmemu: the storm of seed \(seed) could not run: \(error)")
            }
            return Self.sweepResult(r, seed: seed, shard: shard, arguments: header.arguments)
        }
        if results.contains(where: { (r: SweepSeedResult) in r.failed }) { throw ExitStatus.found }
    }

    /// One seed's line: its finding (or clean), its figures, and for a finding the replay command.
    static func sweepResult(_ r: StormResult, seed: UInt64, shard: SweepShard, arguments: String) -> SweepSeedResult {
        let found = StormFinding(r)
        var figures: [String: Double] = [
            "pagesMigrated": Double(r.pagesMigrated), "migrateToRAMCalls": Double(r.migrateToRAMCalls.total),
            "faultRetries": Double(r.faultRetries), "deviceMigrations": Double(r.deviceMigrations),
            "livelocked": r.livelocked ? 1 : 0, "seconds": r.seconds,
        ]
        if let steps = r.scheduleSteps {
            figures["scheduleSteps"] = Double(steps)
            figures["stepsPerSecond"] = r.seconds > 0 ? Double(steps) / r.seconds : 0
        }
        if let v = r.virtualSeconds { figures["virtualSeconds"] = v }
        var detail: String? = nil
        if found != nil {
            detail = r.deadlock.flatMap { $0.split(separator: "\n").first.map(String.init) } ?? r.stall?.summary
                ?? r.error ?? r.teardownIssues.first
        }
        return SweepSeedResult(shard: shard, seed: seed, outcome: found?.rawValue ?? SweepSeedResult.clean, figures: figures,
                               replay: found == nil ? nil : "svmemu replay --seed \(seed) \(arguments)", detail: detail)
    }

    static func summary(_ r: ExploreResult) -> String {
        guard let found = r.found, let seed = r.seed, let storm = r.storm else {
            return "nothing found in \(r.schedulesTried) schedule(s) of the \(r.scenario.rawValue) storm"
        }
        var s = "found: \(found.rawValue) at seed \(seed) (schedule \(r.schedulesTried) of at most \(r.schedules))"
        if let d = storm.deadlock { s += "\n  " + d }
        if let st = storm.stall { s += "\n  " + st.summary }
        for issue in storm.teardownIssues.prefix(4) where storm.deadlock == nil { s += "\n  " + issue }
        s += "\nreplay: svmemu replay --seed \(seed) (with the same storm options)"
        return s
    }
}

/// Replays one deterministic schedule of a storm with its step log.
struct ReplayCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "replay",
        abstract: "Replay one deterministic storm schedule by its seed, with the step log.",
        discussion: """
            Runs the storm of `svmemu livelock` (the same options) under the deterministic \
            scheduler seeded by --seed, prints its result and the last --steps scheduling \
            decisions (which thread ran after which event, at which virtual time). The same seed \
            and options give the same run, step for step.

            With --json prints one object (Docs/json.md) whose results are seed, found \
            (livelock, deadlock, lostWrite, leak or invariant; only when found), storm (the storm's \
            result, as explore's) and lastSteps (the last --steps scheduling decisions, as text).

            \(ExitStatus.helpParagraph)
            """)

    @OptionGroup var knobs: StormScenarioOptions
    @OptionGroup var storm: StormOptions<ExploreCommand.StormDefaults>
    @OptionGroup var schedule: ScheduleOptions

    @Option(name: .long, parsing: .unconditional, help: "Scheduling steps to print, the last ones (0-1000000).")
    var steps = 50

    @OptionGroup var output: JSONOutputOptions

    @OptionGroup var report: ReportFileOptions

    @OptionGroup var alwaysDeterministic: AlwaysDeterministicFlag

    /// The results of `replay --json` (`found` only when the schedule found something).
    struct Result: Encodable {
        var seed: UInt64
        var found: StormFinding?
        var storm: StormResult
        /// The last `--steps` scheduling decisions, as the table prints them.
        var lastSteps: [String]
    }

    func validate() throws {
        try checkRange(steps, 0...1_000_000, flag: "--steps")
        _ = try knobs.stormSettings(storm, schedule)
    }

    func run() throws {
        let s = try knobs.stormSettings(storm, schedule)
        var config = DeterministicScheduler.Configuration(seed: s.seed)
        config.preemptions = s.preemptions
        config.logSteps = steps * 2
        let r: StormResult
        do { r = try StormHarness.run(s, schedule: config) } catch {
            throw CLIError.runFailed("svmemu: the storm could not run: \(error.description)")
        }
        if output.json {
            var storm = r
            storm.perPage = []
            let last = r.scheduleLog.suffix(steps).map { "\($0)" }
            print(try JSONReport.render(for: self, results: Result(seed: s.seed, found: StormFinding(r), storm: storm, lastSteps: last)))
            return
        }
        print(StormReport.table([r], titles: [StormReport.title(r)]), terminator: "")
        if let found = StormFinding(r) { print("found: \(found.rawValue)") }
        if let d = r.deadlock { print(d) }
        if steps > 0 {
            print("last \(min(steps, r.scheduleLog.count)) of \(r.scheduleSteps ?? 0) steps:")
            for step in r.scheduleLog.suffix(steps) { print("  \(step)") }
        }
    }
}
