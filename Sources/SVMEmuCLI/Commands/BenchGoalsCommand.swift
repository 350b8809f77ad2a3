// `svmemu bench goals`: every figure of the speed-and-scale goals (issue 25)
// measured in one run, each beside its goal (`make bench`, Docs/benchmarks.md).
import ArgumentParser
import Foundation
import SVMEmu
import SVMStress

/// One measured figure and its goal.
struct BenchGoal: Encodable {
    /// What is measured (the command and configuration).
    var figure: String
    /// The measured value, and as shown (with its unit and context).
    var measured: Double
    var shown: String
    /// The goal as text (">= 0.8") and whether the measurement meets it.
    var goal: String
    var met: Bool
    /// How this run measured it when it differs from the goal's configuration.
    var note: String?
}

/// Measures the figures of the speed-and-scale goals, each with the
/// command that gives it (parsed from its usual arguments, so that the
/// figure is that command's), and prints one table.
struct BenchGoalsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "goals",
        abstract: "Every speed-and-scale figure beside its goal, in one run (make bench).",
        discussion: """
            Build with -c release. Measures, one after the other: bench migrate at 4k and 2m \
            (256M; ratioToBestCopy), bench memory (TLB-hit read over a 4 KiB memcpy), the \
            deterministic storm's scheduling steps per host second (livelock --deterministic \
            --cpus 8 --pages 512 --fault-policy trylock), the wall time of overhead \
            --deterministic --busy-cpus 2 (at --size 8M, and the 64M figure extrapolated from it, \
            unless --full), the soak's operations per host second (every operation, fork \
            included; 200000 operations, 1000000 with --full), and numa's 2 MiB batched \
            migration with two copy threads against one (pagesPerSecond; --rounds runs, each \
            of 128 moves of the 64 MiB buffer with the two copiers taking turns every two moves, \
            the lowest ratio reported) and the multi-threaded copier against this \
            host's own two-thread memcpy of one 2 MiB folio over numa's working set (two 64 MiB \
            rings). Prints each figure as it is measured, then the table: figure, measured, \
            goal, met. About two minutes on the 2-core VM; --full about ten.

            With --json prints one object (Docs/json.md) whose results are goals (figure, \
            measured, shown, goal, met, note), met and total.

            Exit status: 0 the figures were measured (met or not); 1 a measurement could not \
            run or failed its own checks; 64 an invalid argument.
            """)

    @Flag(name: .long, help: "Measure overhead at --size 64M and the soak over 1000000 operations, as the goals are stated (about ten minutes).")
    var full = false

    @Option(name: .long, parsing: .unconditional, help: "numa runs comparing the copiers, each taking turns with the other (1-20); the lowest ratio is reported.")
    var rounds = 3

    @OptionGroup var output: JSONOutputOptions

    @OptionGroup var report: ReportFileOptions

    /// `--pairs`, the old spelling of `--rounds`.
    struct OldSpellings: DeprecatedSpellings {
        @Option(name: .customLong("pairs"), parsing: .unconditional, help: .private) var pairs: Int?
    }
    @OptionGroup var old: OldSpellings

    mutating func validate() throws {
        try Deprecation.adopt(old.pairs, into: &rounds, defaultValue: 3, range: 1...20, oldFlag: "--pairs", newFlag: "--rounds")
        try checkRange(rounds, 1...20, flag: "--rounds")
    }

    struct Results: Encodable {
        var goals: [BenchGoal]
        var met: Int
        var total: Int
    }

    /// Parses `arguments` as the svmemu command `T`.
    static func command<T: ParsableCommand>(_ arguments: [String], as: T.Type) throws -> T {
        guard let c = try SVMEmuCommand.parseAsRoot(arguments) as? T else {
            throw CLIError.runFailed("svmemu bench goals: `svmemu \(arguments.joined(separator: " "))` is not \(T.self)")
        }
        return c
    }

    func run() throws {
        warnIfDebugBuild("svmemu bench goals")
        var goals: [BenchGoal] = []
        func add(_ g: BenchGoal) {
            goals.append(g)
            if !output.json { print("\(g.figure): \(g.shown)   goal \(g.goal): \(g.met ? "met" : "not met")\(g.note.map { " (\($0))" } ?? "")") }
            fflush(StandardOutput.standardOutput())
        }
        let progress = ProgressLine(label: "svmemu bench goals")
        defer { progress.done() }
        func f(_ v: Double, _ d: Int = 2) -> String { String(format: "%.\(d)f", v) }

        // bench migrate, both granularities.
        for granularity in ["4k", "2m"] {
            progress.say("bench migrate --granularity \(granularity) --size 256M")
            let m = try Self.command(["bench", "migrate", "--granularity", granularity, "--size", "256M"], as: BenchMigrateCommand.self)
            try m.preflight()
            let r = try m.measure(bytes: ByteSize.parse(m.size)!)
            add(BenchGoal(figure: "bench migrate --granularity \(granularity) --size 256M: ratioToBestCopy", measured: r.ratioToBestCopy,
                          shown: "\(f(r.ratioToBestCopy, 3)) (\(f(r.migrateGBps, 1)) GB/s; memcpy \(f(r.memcpyGBps, 1)), streaming \(f(r.streamCopyGBps, 1)))",
                          goal: ">= \(r.goalRatioToBestCopy)", met: r.ratioToBestCopy >= r.goalRatioToBestCopy))
        }

        // bench memory: a TLB-hit read against a 4 KiB memcpy.
        progress.say("bench memory")
        let memory = try Self.command(["bench", "memory"], as: BenchMemoryCommand.self).measure()
        let readRatio = memory.tlbHitReadNanos / memory.memcpy4KNanos
        add(BenchGoal(figure: "bench memory: TLB-hit read / memcpy of 4 KiB", measured: readRatio,
                      shown: "\(f(readRatio, 3)) (\(f(memory.tlbHitReadNanos, 1)) ns / \(f(memory.memcpy4KNanos, 1)) ns)",
                      goal: "<= 0.07", met: readRatio <= 0.07))

        // The deterministic engine: scheduling steps per host second.
        progress.say("livelock --deterministic --cpus 8 --pages 512 --fault-policy trylock")
        let storm = try Self.command(["livelock", "--deterministic", "--cpus", "8", "--pages", "512", "--fault-policy", "trylock"],
                                     as: LivelockCommand.self)
        let sr = try LivelockCommand.runStorm(try storm.settings(), label: "")
        let steps = Double(sr.scheduleSteps ?? 0) / max(sr.seconds, 1e-9)
        add(BenchGoal(figure: "livelock --deterministic --cpus 8 --pages 512 --fault-policy trylock: scheduling steps per host second",
                      measured: steps, shown: "\(f(steps, 0)) (\(sr.scheduleSteps ?? 0) steps in \(f(sr.seconds, 2)) s)",
                      goal: ">= 3000000", met: steps >= 3_000_000))

        // overhead --deterministic: its wall time.
        let size = full ? "64M" : "8M"
        progress.say("overhead --deterministic --size \(size) --busy-cpus 2")
        let overhead = try Self.command(["overhead", "--deterministic", "--size", size, "--busy-cpus", "2"], as: OverheadCommand.self)
        try overhead.preflight()
        let t0 = HostClock.hostNanos()
        _ = try overhead.runs()
        let seconds = Double(HostClock.hostNanos() - t0) / 1e9
        let scaled = full ? seconds : seconds * 8
        add(BenchGoal(figure: "overhead --deterministic --size 64M --busy-cpus 2: wall seconds", measured: scaled,
                      shown: full ? "\(f(seconds, 1)) s" : "\(f(scaled, 0)) s (extrapolated: \(f(seconds, 1)) s at --size 8M, times 8)",
                      goal: "< 60", met: scaled < 60,
                      note: full ? nil : "measured at --size 8M; --full (BENCH_FULL=1) measures 64M"))

        // The soak: operations per host second, every operation.
        let operations = full ? "1000000" : "200000"
        progress.say("soak --operations \(operations)")
        let soak = try Self.command(["soak", "--operations", operations], as: SoakCommand.self)
        let soakResult: SoakResult
        do { soakResult = try Soak.run(try soak.settings()) } catch let e as StormError {
            throw CLIError.runFailed("svmemu bench goals: the soak could not run: \(e.description)")
        }
        guard soakResult.clean else {
            throw CLIError.runFailed("svmemu bench goals: the soak was not clean (seed 1): \(soakResult.sweepDetail ?? soakResult.sweepOutcome)")
        }
        let opsRate = Double(soakResult.operations) / max(soakResult.seconds, 1e-9)
        add(BenchGoal(figure: "soak (every operation, fork included): operations per host second", measured: opsRate,
                      shown: "\(f(opsRate, 0)) (\(soakResult.operations) operations in \(f(soakResult.seconds, 2)) s)",
                      goal: ">= 250000", met: opsRate >= 250_000,
                      note: full ? nil : "200000 operations; --full runs 1000000"))

        // numa: 2 MiB folios, two copy threads against one, runs alternating.
        let ratios = try NUMABench.copyThreadRatios(pairs: rounds) { progress.say("numa, 2 MiB folios, single and 2 copy threads: \($0)") }
        let lowest = ratios.min()!
        let median = ratios.sorted()[ratios.count / 2]
        add(BenchGoal(figure: "numa, 2 MiB folios, 2 copy threads vs 1 taking turns in one run: pagesPerSecond", measured: lowest,
                      shown: "\(f(lowest, 2))x lowest of \(rounds), median \(f(median, 2))x (each: \(ratios.map { f($0, 2) + "x" }.joined(separator: ", ")))",
                      goal: ">= 0.95 (never below)", met: lowest >= 0.95))

        // The copier against this host's own two-thread memcpy, numa's working set.
        progress.say("copier sweep: one 2 MiB folio over two 64 MiB rings")
        let point = NUMABench.copySweep(threads: 2, repeats: 101, rings: [NUMABenchSettings().bufferBytes],
                                        shapes: [(PageGeometry.pmdSize, 1)])[0]
        add(BenchGoal(figure: "numa's copier (2 threads) vs this host's two-thread memcpy, one 2 MiB folio, 64 MiB working set",
                      measured: point.ratioToTwoThread,
                      shown: "\(f(point.ratioToTwoThread, 2)) (copier \(f(point.multiMicros, 1)) us, two-thread memcpy \(f(point.twoThreadMicros, 1)) us, one thread \(f(point.singleMicros, 1)) us; split \(f(point.splitShare * 100, 0))% of batches)",
                      goal: ">= 0.9", met: point.ratioToTwoThread >= 0.9))
        progress.done()

        let met = goals.count(where: \.met)
        try printReport(Results(goals: goals, met: met, total: goals.count), json: output.json,
                        text: "\n" + Self.table(goals) + "\(met) of \(goals.count) goals met\n")
    }

    /// The summary: figure, measured, goal, met.
    static func table(_ goals: [BenchGoal]) -> String {
        let rows = [["figure", "measured", "goal", "met"]] + goals.map { g in
            [g.figure, g.shown, g.goal, g.met ? "met" : "not met"]
        }
        // Figures and measurements are long: a Markdown table reads best.
        return rows.enumerated().map { i, r in
            "| " + r.joined(separator: " | ") + " |" + (i == 0 ? "\n| --- | --- | --- | --- |" : "")
        }.joined(separator: "\n") + "\n"
    }
}
