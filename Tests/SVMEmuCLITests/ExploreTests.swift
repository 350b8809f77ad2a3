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
    func misuse() {
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
