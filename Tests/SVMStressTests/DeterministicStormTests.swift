import MirrorDriver
import SVMEmu
import SVMStress
import Testing

@Suite("deterministic storms")
struct DeterministicStormTests {

    static func settings(_ policy: DeviceFaultPolicy, pages: Int, seed: UInt64 = 7) -> StormSettings {
        var s = StormSettings(faultPolicy: policy, driverLock: .exclusive, pages: pages, seed: seed, stallSeconds: 0.02)
        s.deterministic = true
        s.cpus = 8
        s.joinTimeoutSeconds = 60
        return s
    }

    @Test("legacy + exclusive lock livelocks with 8 virtual CPUs, and the watchdog stops it cleanly")
    func legacyLivelocks() throws {
        let r = try StormHarness.run(Self.settings(.legacy, pages: 16))
        #expect(r.livelocked)
        #expect(r.stalledPage != nil)
        #expect(r.stall.map { ($0.referencesBeyondMappings ?? 0) > 2 } == true,
                "the waiters' references make the holder's check fail")
        #expect(r.deadlock == nil)
        #expect(r.teardownClean, "\(r.teardownIssues)")
        #expect(r.dataIntact)
        #expect(r.virtualSeconds != nil)
    }

    @Test("trylock migrates every page with one migrateToRAM call each, 8 virtual CPUs")
    func trylockOneCallPerPage() throws {
        let r = try StormHarness.run(Self.settings(.trylock, pages: 64))
        #expect(!r.livelocked)
        #expect(r.pagesMigrated == 64)
        #expect(r.migrateToRAMCalls.total == 64)
        #expect(r.migrateToRAMCalls.perPageMax == 1)
        #expect(LockOrder.violations(involving: "mirror driver lock").isEmpty,
                "\(LockOrder.violations(involving: "mirror driver lock"))")
        #expect(r.teardownClean, "\(r.teardownIssues)")
        #expect(r.dataIntact)
    }

    @Test("the barrier's release style is part of the scenario: each repeats by seed, the two differ")
    func releaseStyleIsPartOfTheScenario() throws {
        func run(_ release: StormRelease) throws -> StormResult {
            var s = Self.settings(.trylock, pages: 8, seed: 13)
            s.release = release
            var r = try StormHarness.run(s)
            r.seconds = 0
            return r
        }
        let all = try run(.all), oneByOne = try run(.oneByOne)
        #expect(try run(.all) == all)
        #expect(try run(.oneByOne) == oneByOne)
        for r in [all, oneByOne] {
            #expect(r.pagesMigrated == 8 && r.migrateToRAMCalls.total == 8, "trylock: one call per page either way")
            #expect(r.teardownClean && r.dataIntact, "\(r.teardownIssues)")
        }
        // The wake chain hands the threads out a wake-up apart: other retries, other page times.
        #expect(all.faultRetries != oneByOne.faultRetries || all.perPage != oneByOne.perPage)
        #expect(all.virtualSeconds != oneByOne.virtualSeconds)
    }

    @Test("the same seed gives the same storm, counters and per-page figures")
    func sameSeedSameRun() throws {
        for policy in [DeviceFaultPolicy.legacy, .trylock] {
            var a = try StormHarness.run(Self.settings(policy, pages: 8, seed: 11))
            var b = try StormHarness.run(Self.settings(policy, pages: 8, seed: 11))
            a.seconds = 0
            b.seconds = 0
            #expect(a == b)
        }
    }
}

@Suite("soak")
struct SoakTests {
    @Test("a short soak: reads, writes and migrations both ways keep every byte, leak nothing, and repeat by seed")
    func shortSoakIsCleanAndRepeats() throws {
        var s = SoakSettings()
        s.operations = 20_000
        s.pages = 16
        s.seed = 5
        let a = try Soak.run(s)
        #expect(a.clean, "\(a)")
        #expect(a.operations == 20_000)
        #expect(a.reads > 0 && a.writes > 0 && a.migrationsToDevice > 0 && a.migrationsToSystem > 0)
        var b = try Soak.run(s)
        var a2 = a
        a2.seconds = 0
        b.seconds = 0
        #expect(a2 == b)
    }
}

@Suite("deterministic storm settings")
struct DeterministicStormSettingsTests {
    @Test("a deterministic storm needs a CPU for each of its threads")
    func cpusForEveryThread() {
        var s = StormSettings(faultPolicy: .trylock, driverLock: .none, threads: 8)
        s.deterministic = true
        s.cpus = 7
        #expect(throws: StormError.self) { try s.validate() }
        s.cpus = 8
        #expect(throws: Never.self) { try s.validate() }
        s.scenario = .pingPong
        #expect(throws: StormError.self) { try s.validate() }
    }
}
