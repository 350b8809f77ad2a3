// `svmemu merge`: the shards of a seed sweep made one report (Docs/sharding.md).
import ArgumentParser
import Foundation
import SVMStress

/// Reads the JSON Lines of a sweep's shards (`explore --shard I/N`, `soak
/// --seeds A-B --shard I/N`), checks that they make one whole sweep and
/// prints its report.
struct MergeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "merge",
        abstract: "Merge the JSON Lines of a sweep's shards (explore, soak --seeds, with --shard I/N) into one report.",
        discussion: """
            Reads the lines the shards printed, from the files given or from standard input \
            (none, or -), in any order (lines of several shards may be interleaved), and prints \
            one report: the settings, each shard (host, seeds, seeds run, failing, seconds), the \
            seeds per outcome, every figure summed over the seeds (rates averaged), and the \
            failing seed with the lowest number with its replay command.

            It checks that the shards belong together and says what does not: a shard missing \
            or given twice, a seed missing (a shard without its end line was killed or is still \
            running) or read twice, a seed outside its shard, and shards run with another \
            command, seed range, shard count, settings or svmemu version.

            With --json prints one object (Docs/json.md) whose results are command, seeds, \
            shards, settings, arguments, version, revision, seedsRun, outcomes, figures, \
            firstFailing (seed, shard, outcome, figures, replay, detail; or null), failing, \
            shardSummaries, problems and consistent.

            Exit status: 0 the shards make the whole sweep and every seed was clean; 3 a seed \
            failed (whatever else); 1 the shards are not consistent (the report says why), or a \
            file cannot be read or holds a line that is not a shard's; 64 an invalid argument.
            """)

    @Argument(help: "Files the shards wrote (JSON Lines); none, or -, reads standard input.")
    var files: [String] = []

    @OptionGroup var output: JSONOutputOptions

    @OptionGroup var report: ReportFileOptions

    func validate() throws {
        if files.count(where: { $0 == "-" }) > 1 { throw ValidationError("standard input (-) can be given once") }
        // Reading a terminal would wait for typed lines: say what to give instead.
        if (files.isEmpty || files.contains("-")) && isatty(STDIN_FILENO) == 1 {
            throw ValidationError("give the files the shards wrote (svmemu merge shard-*.jsonl), or pipe them in; standard input is a terminal")
        }
    }

    /// Each file's (or standard input's) text.
    func sources() throws(CLIError) -> [(name: String, text: String)] {
        let names = files.isEmpty ? ["-"] : files
        var out: [(name: String, text: String)] = []
        for name in names {
            if name == "-" {
                out.append(("-", String(decoding: FileHandle.standardInput.readDataToEndOfFile(), as: UTF8.self)))
                continue
            }
            guard let data = FileManager.default.contents(atPath: name) else {
                let reason = access(name, R_OK) == 0 ? "not a readable file" : CLIError.reason(errno)
                throw .runFailed("svmemu merge: cannot read \(name): \(reason)")
            }
            out.append((name, String(decoding: data, as: UTF8.self)))
        }
        return out
    }

    func run() throws {
        let lines: [(source: String, line: SweepLine)]
        do { lines = try Sweep.read(try sources()) } catch let e as SweepError {
            throw CLIError.runFailed("svmemu merge: \(e.description)")
        }
        let report = Sweep.merge(lines)
        try printReport(report, json: output.json, text: Self.table(report))
        if report.firstFailing != nil { throw ExitStatus.found }
        if !report.consistent { throw ExitStatus.failure }
    }

    /// The report as text: the sweep, its shards, outcomes and figures, the
    /// first failing seed with its replay command, and the problems.
    static func table(_ r: SweepReport) -> String {
        var s = ""
        let total = r.seeds.map { "\($0.count)" } ?? "?"
        s += "sweep: \(r.command ?? "?") over seeds \(r.seeds?.description ?? "?") in \(r.shards) shard\(r.shards == 1 ? "" : "s"), "
            + "\(r.seedsRun) of \(total) seeds run\n"
        if !r.arguments.isEmpty { s += "  settings: \(r.arguments)\n" }
        if let v = r.version { s += "  svmemu \(v)\(r.revision.map { " (git \($0))" } ?? "")\n" }
        if r.shards > 1 {
            s += "\n" + Table.columns([["shard", "host", "seeds", "run", "failing", "seconds"]] + r.shardSummaries.map { x in
                [x.shard.description, x.host, x.seeds?.description ?? "none", "\(x.seedsRun)", "\(x.failing)",
                 x.seconds.map { String(format: "%.1f", $0) } ?? (x.ended ? "" : "no end line")]
            })
        }
        if !r.outcomes.isEmpty {
            // Clean first, then the failures by name.
            let names: [String] = r.outcomes.keys.sorted { a, b in
                if a == SweepSeedResult.clean { return b != SweepSeedResult.clean }
                return b != SweepSeedResult.clean && a < b
            }
            let rows: [[String]] = names.map { [$0, "\(r.outcomes[$0]!)"] }
            s += "\n" + Table.columns([["outcome", "seeds"]] + rows)
        }
        if !r.figures.isEmpty {
            s += "\n" + Table.columns([["figure", "over the seeds"]] + r.figures.keys.sorted().map { k in
                [k + (k.hasSuffix("PerSecond") ? " (mean)" : ""), number(r.figures[k]!)]
            })
        }
        s += "\n"
        if let f = r.firstFailing {
            s += "first failing seed: \(f.seed) (\(f.outcome), shard \(f.shard))\n"
            if let d = f.detail { s += "  \(d)\n" }
            if let replay = f.replay { s += "  replay: \(replay)\n" }
            if r.failing.count > 1 {
                let more = r.failing.dropFirst().prefix(20).map { "\($0.seed) (\($0.outcome))" }
                s += "  other failing seeds: \(more.joined(separator: ", "))\(r.failing.count > 21 ? " and \(r.failing.count - 21) more" : "")\n"
            }
        } else if r.seedsRun > 0 {
            s += "every seed run was clean\n"
        }
        if r.consistent {
            s += "the shards are consistent: every seed of the range once, one setting\n"
        } else {
            s += "the shards are not consistent:\n"
            for p in r.problems { s += "  - \(p)\n" }
        }
        return s
    }

    /// A whole number without decimals, others with three significant digits or more.
    static func number(_ v: Double) -> String {
        if v == v.rounded() && abs(v) < 1e15 { return String(Int64(v)) }
        return abs(v) >= 100 ? String(format: "%.1f", v) : String(format: "%.4g", v)
    }

}
