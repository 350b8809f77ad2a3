import ArgumentParser
import Foundation
import SVMEmu
import SVMStress
import Testing
@testable import SVMEmuCLI

/// One vocabulary on the command line (Docs/cli.md): renamed options with
/// their old spellings, `help <unknown>`, `replay --json`, `--output` and
/// `--quiet`, ranges in help (their messages: ParsingTests), enum values in any case.
@Suite("svmemu's one vocabulary")
struct VocabularyTests {
    func parse<T: ParsableCommand>(_ arguments: [String], as: T.Type) throws -> T {
        var command = try #require(try SVMEmuCommand.parseAsRoot(arguments) as? T, "\(arguments)")
        try command.validate()
        return command
    }

    @Test("each renamed option: the new name works, the old one gives the same value")
    func renamed() throws {
        let numaNew = try parse(["numa", "--size", "8M", "--storm", "--pages", "64"], as: NumaCommand.self)
        let numaOld = try parse(["numa", "--buffer", "8M", "--storm", "--storm-pages", "64"], as: NumaCommand.self)
        #expect(numaNew.size == "8M" && numaOld.size == "8M" && numaNew.pages == 64 && numaOld.pages == 64)

        let memoryNew = try parse(["bench", "memory", "--size", "16M"], as: BenchMemoryCommand.self)
        let memoryOld = try parse(["bench", "memory", "--fault-mib", "16"], as: BenchMemoryCommand.self)
        #expect(memoryNew.faultMiB == 16 && memoryOld.faultMiB == 16 && memoryOld.size == "16M")

        let thpNew = try parse(["bench", "thp", "--rounds", "2"], as: BenchTHPCommand.self)
        let thpOld = try parse(["bench", "thp", "--iterations", "2"], as: BenchTHPCommand.self)
        #expect(thpNew.timing.rounds == 2 && thpOld.timing.rounds == 2)

        let goalsNew = try parse(["bench", "goals", "--rounds", "4"], as: BenchGoalsCommand.self)
        let goalsOld = try parse(["bench", "goals", "--pairs", "4"], as: BenchGoalsCommand.self)
        #expect(goalsNew.rounds == 4 && goalsOld.rounds == 4)

        let soakNew = try parse(["soak", "--operations", "123"], as: SoakCommand.self)
        let soakOld = try parse(["soak", "--ops", "123"], as: SoakCommand.self)
        #expect(soakNew.operations == 123 && soakOld.operations == 123)
    }

    @Test("the JSON's arguments record the new names, not the old spellings")
    func argumentsUseNewNames() throws {
        let numa = try parse(["numa", "--buffer", "8M"], as: NumaCommand.self)
        let arguments = ReportValue.arguments(of: numa)
        #expect(arguments["size"] == .string("8M") && arguments["pages"] == .int(1024))
        #expect(arguments["buffer"] == nil && arguments["stormPages"] == nil)
        let thp = ReportValue.arguments(of: try parse(["bench", "thp", "--iterations", "2"], as: BenchTHPCommand.self))
        #expect(thp["rounds"] == .int(2) && thp["iterations"] == nil)
    }

    @Test("an old spelling warns on standard error naming the new one, and still runs")
    func oldSpellingWarns() throws {
        // An old spelling with the new one at another value: the warning, then a refusal naming both (exit 64).
        let cases: [(String, String, String)] = [
            ("numa --buffer 4M --size 8M", "--buffer", "--size"),
            ("numa --storm-pages 64 --pages 32", "--storm-pages", "--pages"),
            ("bench memory --fault-mib 2 --size 4M", "--fault-mib 2", "--size 2M"),
            ("bench thp --iterations 2 --rounds 3", "--iterations", "--rounds"),
            ("bench goals --pairs 2 --rounds 4", "--pairs", "--rounds"),
            ("soak --ops 10 --operations 20", "--ops", "--operations"),
        ]
        for (arguments, old, new) in cases {
            let r = try runShell("\"$SVMEMU\" \(arguments)")
            #expect(r.status == 64, "\(arguments): \(r.status)")
            #expect(r.stderr.contains(Deprecation.message(old: old, new: new)), "\(arguments): \(r.stderr)")
            #expect(r.stderr.contains("\(old) is the old spelling of \(new): give \(new) only"), "\(arguments): \(r.stderr)")
        }
        // Alone, the old spelling runs, with the warning.
        let soak = try runShell("\"$SVMEMU\" soak --ops 50 --pages 4 --cpus 1 --mix gpu,migrate")
        #expect(soak.status == 0, "\(soak.stderr)")
        #expect(soak.stderr.contains("warning: --ops is deprecated and will be removed in the next release; use --operations"))
        #expect(soak.stdout.contains("soak: 50 operations"))
    }

    @Test("one seed is --seed S, a set of seeds --seeds (ranges and lists) on every sweep; old spellings warn")
    func seedVocabulary() throws {
        #expect(SeedSet(parsing: "1-4,9")?.ranges == [SeedRange(first: 1, last: 4), SeedRange(first: 9, last: 9)])
        #expect(SeedSet(parsing: "9,3-5,4,6")?.description == "3-6,9", "sorted, overlapping and adjacent merged")
        for bad in ["", "1,", "5-1", "a", "1-2-3", "-1"] { #expect(SeedSet(parsing: bad) == nil, "\(bad)") }
        let list = SeedSet(parsing: "1-4,9,20-22")!
        #expect(list.count == 8 && Array(list.seeds) == [1, 2, 3, 4, 9, 20, 21, 22])
        let blocks = (1...3).map { SweepShard(index: $0, count: 3).seeds(of: list)!.description }
        #expect(blocks == ["1-2", "3-4,9", "20-22"], "shards are contiguous blocks by position")

        // soak: --seed S, or --seeds as a range or a list.
        #expect(try parse(["soak", "--seeds", "3,7,12"], as: SoakCommand.self).seedSet()?.count == 3)
        #expect(try parse(["soak", "--seeds", "1-4,9"], as: SoakCommand.self).seedSet()?.description == "1-4,9")
        // explore: --seeds; the old --seed S --schedules N gives S...S+N-1.
        #expect(try parse(["explore", "--seeds", "3,7"], as: ExploreCommand.self).seedSet().description == "3,7")
        #expect(try parse(["explore"], as: ExploreCommand.self).seedSet().description == "1-1000")
        #expect(try parse(["explore", "--seed", "5", "--schedules", "10"], as: ExploreCommand.self).seedSet().description == "5-14")
        #expect(try parse(["explore", "--schedules", "10"], as: ExploreCommand.self).seedSet().description == "1-10")
        #expect(try parse(["explore", "--seed", "7"], as: ExploreCommand.self).seedSet().description == "7-1006")
        // fidelity: --seeds as everywhere, --seed S one seed; the old count N gives 1-N.
        #expect(try parse(["fidelity"], as: FidelityCommand.self).seedSet().description == "1-5")
        #expect(try parse(["fidelity", "--seeds", "2-4,8"], as: FidelityCommand.self).seedSet().description == "2-4,8")
        #expect(try parse(["fidelity", "--seed", "9"], as: FidelityCommand.self).seedSet().description == "9")
        #expect(try parse(["fidelity", "--seeds", "3"], as: FidelityCommand.self).seedSet().description == "1-3")
        #expect(ReportValue.arguments(of: try parse(["explore", "--schedules", "4"], as: ExploreCommand.self))["seeds"] == .string("1-4"))
        // A seed that --seeds replaced is recorded as null, in explore as in soak --seeds.
        for arguments in [["explore", "--seeds", "3,7"], ["explore"], ["explore", "--seed", "5", "--schedules", "10"]] {
            let recorded = ReportValue.arguments(of: try parse(arguments, as: ExploreCommand.self))
            #expect(recorded["seed"] == .null && recorded["seeds"] != nil, "\(arguments)")
        }
        #expect(ReportValue.arguments(of: try parse(["soak", "--seeds", "3,7"], as: SoakCommand.self))["seed"] == .null)
        #expect(ReportValue.arguments(of: try parse(["livelock", "--seed", "5"], as: LivelockCommand.self))["seed"] == .unsigned(5),
                "livelock, which shares the storm options, records its seed")

        for (arguments, message) in [
            (["explore", "--seeds", "1-4", "--seed", "3"], "give --seeds only"),
            (["explore", "--seeds", "1-4", "--schedules", "3"], "give --seeds only"),
            (["explore", "--seeds", "4-1"], "--seeds must be seeds and ranges A-B"),
            (["fidelity", "--seeds", "1-200"], "at most 100 seeds"),
            (["fidelity", "--seeds", "1-2", "--seed", "3"], "not both"),
        ] {
            #expect(throws: (any Error).self, "\(arguments)") { _ = try SVMEmuCommand.parseAsRoot(arguments) }
            do { _ = try SVMEmuCommand.parseAsRoot(arguments) } catch {
                #expect(SVMEmuCommand.message(for: error).contains(message), "\(arguments): \(SVMEmuCommand.message(for: error))")
            }
        }
        let r = try runShell("\"$SVMEMU\" explore --pages 2 --seed 3 --schedules 2 --quiet")
        #expect(r.stderr.contains(Deprecation.message(old: "explore --seed 3 --schedules 2", new: "--seeds 3-4")), "\(r.stderr)")
        #expect(r.status == 0 || r.status == 3, "\(r.stderr)")
    }

    @Test("svmemu help <unknown> exits 64 with a message naming it; a known topic exits 0")
    func helpUnknown() throws {
        let root = try runShell("\"$SVMEMU\" help nosuch")
        #expect(root.status == 64)
        #expect(root.stderr.contains("no command 'nosuch' in svmemu; its commands: demo, livelock"))
        let nested = try runShell("\"$SVMEMU\" help bench nosuch")
        #expect(nested.status == 64)
        #expect(nested.stderr.contains("no command 'nosuch' in svmemu bench; its commands: memory, migrate, thp, goals"))
        let known = try runShell("\"$SVMEMU\" help bench migrate")
        #expect(known.status == 0 && known.stdout.contains("--granularity"))
        #expect(throws: ValidationError.self) { try SVMEmuCommand.checkHelpTopic(["help", "soak", "x"]) }
        try SVMEmuCommand.checkHelpTopic(["help", "help"])
        try SVMEmuCommand.checkHelpTopic(["soak", "help"])
    }

    @Test("replay --json prints one object (seed, found, storm, lastSteps); --output FILE gets the same bytes")
    func replayJSON() throws {
        try withScratchDirectory { dir in
            let r = try runShell("\"$SVMEMU\" replay --pages 2 --steps 3 --seed 5 --deterministic --json --output \(dir)/r.json")
            #expect(r.status == 0, "\(r.stderr)")
            let file = try String(contentsOfFile: dir + "/r.json", encoding: .utf8)
            #expect(file == r.stdout, "\(r.stderr)")
            let object = try #require(try JSONSerialization.jsonObject(with: Data(file.utf8)) as? [String: Any])
            #expect(object["command"] as? String == "replay")
            #expect(object["seed"] as? Int == 5)
            #expect((object["lastSteps"] as? [String])?.count == 3)
            let storm = try #require(object["storm"] as? [String: Any])
            #expect(storm["pages"] as? Int == 2 && storm["pagesMigrated"] is Int)
        }
    }

    @Test("every command that prints a report takes --output FILE and --quiet (calibrate its own: the profile)")
    func outputAndQuiet() throws {
        try withScratchDirectory { dir in
            let commands: [[String]] = [["demo"], ["livelock"], ["overhead"], ["hmm-tests"], ["bench", "memory"],
                                        ["bench", "migrate"], ["bench", "thp"], ["bench", "goals"], ["devices"], ["numa"],
                                        ["explore"], ["replay"], ["soak"], ["merge"], ["calibrate"], ["fidelity"]]
            for c in commands {
                var command = try SVMEmuCommand.parseAsRoot(c + ["--output", dir + "/out", "--quiet"])
                try command.validate()
                let own = c == ["calibrate"]
                #expect((ReportFileOptions.find(in: command) != nil) != own, "\(c)")
            }
            // A path that cannot be written is refused before the run.
            let r = try #require(refusal(["livelock", "--output", dir + "/no/such/dir/x"]))
            #expect(r.message.contains("cannot write \(dir)/no/such/dir/x: No such file or directory"))
            // One path for two outputs.
            let two = try #require(refusal(["numa", "--svg", dir + "/a", "--output", dir + "/a"]))
            #expect(two.message.contains("--svg and --output name the same file"))
        }
    }

    @Test("--output FILE is kept with a report (exit 0 or 3), not written for a run that could not run",
          .disabled(if: HostMemory.underThreadSanitizer, "ThreadSanitizer's shadow memory does not fit under ulimit -v"))
    func outputKeptWithReport() throws {
        try withScratchDirectory { dir in
            let explore = try runShell("\"$SVMEMU\" explore --pages 2 --seeds 1-2 --quiet --output \(dir)/e.txt")
            #expect(explore.status == 0 || explore.status == 3, "\(explore.stderr)")
            #expect(try String(contentsOfFile: dir + "/e.txt", encoding: .utf8) == explore.stdout)
            let refused = try runShell("ulimit -v 4000000 && exec \"$SVMEMU\" soak --operations 10 --output \(dir)/s.txt")
            #expect(refused.status == 1, "\(refused.stderr)")
            #expect(refused.stderr.contains("the host refused"))
            #expect(!FileManager.default.fileExists(atPath: dir + "/s.txt"))
        }
    }

    @Test("--deterministic is accepted (and changes nothing) where a run is always deterministic")
    func deterministicEverywhere() throws {
        for c in [["explore"], ["replay"], ["soak"], ["fidelity"], ["livelock"], ["overhead"], ["numa"]] {
            _ = try SVMEmuCommand.parseAsRoot(c + ["--deterministic"])
        }
    }

    @Test("every numeric option's help states its range")
    func rangesInHelp() throws {
        let r = try runShell("\"$SVMEMU\" --experimental-dump-help")
        #expect(r.status == 0)
        let dump = try #require(try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any])
        let range = try Regex(#"\d[KMG]?\s*(-|\.\.\.|to)\s*(\d|2\^)|\d+ or more|more than 0"#)
        let numeric = try Regex(#"-?[0-9.]+[KMG]?"#)
        var checked = 0
        func walk(_ command: [String: Any], _ path: String) {
            for a in command["arguments"] as? [[String: Any]] ?? [] {
                guard a["kind"] as? String == "option", let value = a["defaultValue"] as? String,
                      value.wholeMatch(of: numeric) != nil else { continue }
                let name = ((a["names"] as? [[String: Any]])?.first?["name"] as? String) ?? "?"
                let help = a["abstract"] as? String ?? ""
                #expect(help.contains(range), "\(path) --\(name): '\(help)' states no range")
                checked += 1
            }
            for sub in command["subcommands"] as? [[String: Any]] ?? [] {
                walk(sub, path + " " + (sub["commandName"] as? String ?? "?"))
            }
        }
        walk(try #require(dump["command"] as? [String: Any]), "svmemu")
        #expect(checked > 40)
    }

    @Test("Docs/cli.md lists every option of every command (make cli-doc)")
    func inventoryComplete() throws {
        let docPath = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../Docs/cli.md").path
        let doc = try String(contentsOfFile: docPath, encoding: .utf8)
        let r = try runShell("\"$SVMEMU\" --experimental-dump-help")
        let dump = try #require(try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any])
        var missing: [String] = []
        func walk(_ command: [String: Any], _ path: String) {
            let subcommands = (command["subcommands"] as? [[String: Any]] ?? []).filter { $0["commandName"] as? String != "help" }
            if subcommands.isEmpty {
                let section = doc.components(separatedBy: "### `\(path)`\n").dropFirst().first?.components(separatedBy: "\n### ").first
                for a in command["arguments"] as? [[String: Any]] ?? [] where a["shouldDisplay"] as? Bool ?? true {
                    guard a["kind"] as? String != "positional",
                          let name = (a["names"] as? [[String: Any]])?.first?["name"] as? String,
                          !["help", "h", "version"].contains(name) else { continue }
                    if section?.contains("| `--\(name)` |") != true { missing.append("\(path) --\(name)") }
                }
            }
            for sub in subcommands { walk(sub, path + " " + (sub["commandName"] as? String ?? "?")) }
        }
        walk(try #require(dump["command"] as? [String: Any]), "svmemu")
        #expect(missing.isEmpty, "not in Docs/cli.md (run make cli-doc): \(missing)")
    }

    @Test("enum values are accepted in any case, on every option")
    func enumCase() throws {
        let overhead = try parse(["overhead", "--granularity", "4K", "--direction", "TO-RAM", "--driver", "GPUSVM",
                                  "--copy-model", "PCIE4", "--fault-size", "4K"], as: OverheadCommand.self)
        #expect(overhead.granularity == .base4K && overhead.direction == .toRAM)
        #expect(try overhead.copyModels() == [.pcie4])
        let numa = try parse(["numa", "--variants", "ALL"], as: NumaCommand.self)
        #expect(numa.variants == .all)
        _ = try parse(["bench", "migrate", "--granularity", "2M", "--size", "2M"], as: BenchMigrateCommand.self)
        let livelock = try parse(["livelock", "--scenario", "Readers", "--fault-policy", "TRYLOCK", "--driver-lock", "None",
                                  "--page-size", "2M", "--release", "Wake-All", "--driver-work", "EVERY-CALL",
                                  "--driver-wait", "FSleep", "--driver", "Mirror"], as: LivelockCommand.self)
        let s = try livelock.settings()
        #expect(s.faultPolicy == .trylock && s.driverLock == .none && s.release == .wakeAll)
        _ = try parse(["soak", "--mix", "GPU,Migrate", "--driver", "GPUSVM"], as: SoakCommand.self)
        _ = try parse(["hmm-tests", "--device-coherent", "SKIP"], as: HMMTestsCommand.self)
        _ = try parse(["fidelity", "--fault-policy", "Legacy", "--driver-work", "Copy", "--driver-wait", "SPIN"],
                      as: FidelityCommand.self)
    }
}
