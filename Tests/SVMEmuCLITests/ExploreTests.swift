import ArgumentParser
import Foundation
import MirrorDriver
import SVMStress
import Testing
@testable import SVMEmuCLI

@Suite("svmemu explore and replay")
struct ExploreTests {
    @Test("explore stops at the legacy + exclusive livelock on its first schedule and exits 3; trylock finds nothing")
    func exploreFindsTheLivelock() throws {
        let legacy = try #require(try SVMEmuCommand.parseAsRoot(["explore", "--pages", "4", "--schedules", "10"]) as? ExploreCommand)
        #expect(throws: ExitStatus.found) { try legacy.run() }
        #expect(ExitStatus.found.rawValue == 3)

        var s = try legacy.settings()
        #expect(s.deterministic && s.cpus == 8)
        s.faultPolicy = .trylock
        let r = try StormHarness.run(s)
        #expect(StormFinding(r) == nil, "\(r.teardownIssues)")
    }

    @Test("a finding is classified by what the storm reports")
    func classification() throws {
        #expect(StormFinding(try stormResult(livelocked: true)) == .livelock)
        #expect(StormFinding(try stormResult(livelocked: false)) == nil)
        #expect(StormFinding(try stormResult(livelocked: false, error: "SIGBUS")) == .invariant)
        #expect(StormFinding(try stormResult(livelocked: false, teardownClean: false)) == .leak)
    }

    @Test("--cpus and --preemptions need --deterministic on livelock; explore and replay check their ranges")
    func misuse() throws {
        #expect(throws: (any Error).self) { try SVMEmuCommand.parseAsRoot(["livelock", "--cpus", "4"]) }
        #expect(throws: (any Error).self) { try SVMEmuCommand.parseAsRoot(["livelock", "--deterministic", "--cpus", "65"]) }
        #expect(throws: (any Error).self) { try SVMEmuCommand.parseAsRoot(["explore", "--schedules", "0"]) }
        #expect(throws: (any Error).self) { try SVMEmuCommand.parseAsRoot(["replay", "--steps", "-1"]) }
        // Eight threads on four CPUs: they share them.
        #expect((try? SVMEmuCommand.parseAsRoot(["livelock", "--deterministic", "--cpus", "4"])) != nil)
        #expect((try? SVMEmuCommand.parseAsRoot(["livelock", "--deterministic", "--cpus", "4", "--threads", "4"])) != nil)
    }
}

@Suite("svmemu soak")
struct SoakCommandTests {
    @Test("a short soak through the command is clean; out-of-range counts are refused")
    func soakCommand() throws {
        let c = try #require(try SVMEmuCommand.parseAsRoot(["soak", "--operations", "2000", "--pages", "8"]) as? SoakCommand)
        try c.run()
        #expect(throws: (any Error).self) { try SVMEmuCommand.parseAsRoot(["soak", "--operations", "0"]) }
        #expect(throws: (any Error).self) { try SVMEmuCommand.parseAsRoot(["soak", "--cpus", "64"]) }
    }
}

@Suite("svmemu sweeps: --shard, soak --seeds and merge")
struct SweepCommandTests {
    /// The message of the `ValidationError` that parsing `arguments` throws.
    func refusal(_ arguments: [String]) -> String {
        do {
            _ = try SVMEmuCommand.parseAsRoot(arguments)
            return "(accepted)"
        } catch {
            return SVMEmuCommand.message(for: error)
        }
    }

    @Test("--shard is I/N from 1; 0/N, --shard without --seeds, --json with --shard and --seed with --seeds are refused naming the flag")
    func shardArguments() throws {
        #expect(refusal(["explore", "--shard", "0/4"]).contains("--shard counts shards from 1"))
        #expect(refusal(["explore", "--shard", "5/4"]).contains("--shard must be I/N with I in 1...4 (got 5/4)"))
        #expect(refusal(["soak", "--shard", "1/2"]).contains("give --seeds"))
        #expect(refusal(["soak", "--seeds", "9-1"]).contains("--seeds must be seeds and ranges A-B"))
        #expect(refusal(["soak", "--seeds", "1-4", "--seed", "2"]).contains("not both"))
        #expect(refusal(["soak", "--seeds", "1-4", "--shard", "1/2", "--json"]).contains("--shard prints JSON Lines"))
        #expect(refusal(["soak", "--seeds", "1-4", "--steps", "10"]).contains("--steps"))
        #expect(refusal(["merge", "-", "-"]).contains("standard input"))
        let explore = try #require(try SVMEmuCommand.parseAsRoot(["explore", "--shard", "2/4", "--schedules", "10", "--seed", "5"]) as? ExploreCommand)
        #expect(try explore.seedSet() == SeedSet(SeedRange(first: 5, last: 14)))
        #expect(try explore.sweep.parsed()?.seeds(of: explore.seedSet()) == SeedSet(SeedRange(first: 7, last: 9)))
        let listed = try #require(try SVMEmuCommand.parseAsRoot(["explore", "--shard", "2/2", "--seeds", "1-3,10,20"]) as? ExploreCommand)
        #expect(try listed.sweep.parsed()?.seeds(of: listed.seedSet())?.description == "3,10,20")
    }

    @Test("a failing explore seed's line carries the replay command with every storm option, which replay parses")
    func exploreReplayLine() throws {
        let explore = try #require(try SVMEmuCommand.parseAsRoot(["explore", "--pages", "2", "--fault-policy", "legacy"]) as? ExploreCommand)
        var s = try explore.settings()
        s.seed = 4
        let r = try StormHarness.run(s)
        let line = ExploreCommand.sweepResult(r, seed: 4, shard: .whole, arguments: SweepHeader.arguments(try explore.sweepSettings()))
        #expect(line.outcome == "livelock" && line.failed)
        let replay = try #require(line.replay)
        #expect(replay.hasPrefix("svmemu replay --seed 4 "))
        let parsed = try SVMEmuCommand.parseAsRoot(replay.split(separator: " ").dropFirst().map(String.init))
        #expect(parsed is ReplayCommand)
    }

    @Test("the merge's table names the first failing seed and its replay command, and the problems")
    func mergeTable() throws {
        let shard = SweepShard(index: 1, count: 2)
        let header = SweepHeader(command: "soak", shard: shard, seeds: SeedSet(SeedRange(first: 1, last: 4)), settings: ["--operations": "10"],
                                 version: "v", revision: nil, host: "h")
        let report = Sweep.merge([
            ("a", .header(header)),
            ("a", .seed(SweepSeedResult(shard: shard, seed: 2, outcome: "corruption", figures: ["operations": 10],
                                        replay: "svmemu soak --seed 2 --operations 10", detail: "word 3 differs"))),
        ])
        let text = MergeCommand.table(report)
        #expect(text.contains("first failing seed: 2 (corruption, shard 1/2)"))
        #expect(text.contains("replay: svmemu soak --seed 2 --operations 10"))
        #expect(text.contains("shard missing: 2/2 (seeds 3-4)"))
        #expect(text.contains("the shards are not consistent"))
    }
}
