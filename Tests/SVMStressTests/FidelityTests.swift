import Foundation
import SVMEmu
import SVMStress
import Testing

@Suite("fidelity")
struct FidelityTests {
    static func reference(_ cases: [(String, String, String, Double?)]) -> KernelLivelockReference {
        let json = """
            {"kernel": "6.12.117", "date": "2026-12-06", "qemu": "qemu-system-x86_64 -smp 2",
             "cases": [\(cases.map { c in
                let parts = c.0.split(separator: ":").map { Int($0)! }
                return """
                    {"case": "\(c.0)", "threads": \(parts[0]), "mutex": \(parts[1] == 1), "sleepMicros": \(parts[2]),
                     "pages": 512, "policy": "\(c.1)",
                     "runs": [{"outcome": "\(c.2)", "callsPerPage": \(c.3.map { "\($0)" } ?? "null"), "seconds": 0.1}]}
                    """
             }.joined(separator: ","))]}
            """
        return try! JSONDecoder().decode(KernelLivelockReference.self, from: Data(json.utf8))
    }

    @Test("the rig's cases run on the emulator: trylock takes one call a page, and the same seeds give the same rows")
    func smallRun() throws {
        let r = Self.reference([("1:0:0", "legacy", "completes", 1.0), ("4:1:50", "trylock", "completes", 1.0),
                                ("8:1:50", "legacy", "livelock", nil)])
        var s = FidelityHarness.Settings()
        s.pages = 8
        s.seeds = [1, 2]
        s.stallSeconds = 0.05
        let rows = try FidelityHarness.run(r, s)
        #expect(rows.count == 3)
        #expect(rows[0].emulator.outcome == "completes" && rows[0].emulator.callsPerPage == [1, 1])
        #expect(rows[0].outcomeAgrees && rows[0].callsWithin2x == true)
        #expect(rows[1].emulator.callsPerPage == [1, 1], "trylock: one migrate_to_ram call a page")
        #expect(rows[2].kernel.outcome == "livelock" && rows[2].callsWithin2x == nil)
        let again = try FidelityHarness.run(r, s)
        #expect(again.map(\.emulator) == rows.map(\.emulator))
    }

    @Test("the runs of a fidelity run share host threads (jobs): one, two or more give the same rows, in the reference's order, progress in order")
    func jobsGiveTheSameRows() throws {
        let r = Self.reference([("2:1:50", "legacy", "completes", 1.5), ("1:0:0", "legacy", "completes", 1.0),
                                ("8:1:50", "legacy", "livelock", nil), ("4:1:50", "trylock", "completes", 1.0)])
        var s = FidelityHarness.Settings()
        #expect(s.jobs >= 1)
        s.pages = 8
        s.seeds = [1, 2, 3]
        s.stallSeconds = 0.05
        var runs: [[FidelityRow]] = []
        for jobs in [1, 2, 5] {
            s.jobs = jobs
            var seen: [Int] = []
            runs.append(try FidelityHarness.run(r, s) { _, done, total in
                #expect(total == 4)
                seen.append(done)
            })
            #expect(seen == [1, 2, 3, 4], "jobs \(jobs): rows reported in order")
        }
        for rows in runs {
            #expect(rows.map(\.case) == ["2:1:50", "1:0:0", "8:1:50", "4:1:50"])
            #expect(rows.map(\.emulator) == runs[0].map(\.emulator) && rows.map(\.seedsAgreeing) == runs[0].map(\.seedsAgreeing))
        }
    }

    @Test("a profile with a host load compares with the kernel's boots of that load where the case has them; --kernel-boots all with every boot")
    func kernelBootsOfTheProfilesLoad() throws {
        let json = """
            {"kernel": "6.12.117", "date": "2026-12-07", "qemu": "q",
             "cases": [{"case": "1:0:0", "threads": 1, "mutex": false, "sleepMicros": 0, "pages": 512, "policy": "legacy",
                        "runs": [{"outcome": "completes", "callsPerPage": 1.0, "hostLoad": "idle"},
                                 {"outcome": "livelock", "callsPerPage": null, "hostLoad": "loaded"},
                                 {"outcome": "completes", "callsPerPage": 3.0}]},
                       {"case": "2:0:0", "threads": 2, "mutex": false, "sleepMicros": 0, "pages": 512, "policy": "legacy",
                        "runs": [{"outcome": "completes", "callsPerPage": 1.0}]}]}
            """
        let r = try JSONDecoder().decode(KernelLivelockReference.self, from: Data(json.utf8))
        var s = FidelityHarness.Settings()
        s.pages = 4
        s.seeds = [1]
        var machine = try MachineProfile.shipped("qemu-tcg-2")
        #expect(machine.hostLoad == "idle")
        #expect(try MachineProfile.shipped("qemu-tcg-2-loaded").hostLoad == "loaded")
        machine.stalls = nil
        s.machine = machine
        var rows = try FidelityHarness.run(r, s)
        #expect(rows[0].kernelHostLoad == "idle" && rows[0].kernel.outcome == "completes" && rows[0].kernel.callsPerPage == [1, 1])
        #expect(rows[1].kernelHostLoad == nil && rows[1].kernel.completed == 1, "no boot of the load: every boot")
        s.machine?.hostLoad = "loaded"
        rows = try FidelityHarness.run(r, s)
        #expect(rows[0].kernelHostLoad == "loaded" && rows[0].kernel.outcome == "livelock")
        #expect(!rows[0].outcomeAgrees, "the one seed completes where the loaded boot livelocked")
        s.kernelBoots = .all
        rows = try FidelityHarness.run(r, s)
        #expect(rows[0].kernelHostLoad == nil && rows[0].kernel.outcome == "mixed" && rows[0].kernel.callsPerPage == [1, 3])
        s.kernelBoots = .sameHostLoad
        s.machine?.hostLoad = nil
        #expect(try FidelityHarness.run(r, s)[0].kernelHostLoad == nil, "a profile without a host load: every boot")
    }

    @Test("a run that cannot start stops the fidelity run with its error once every host thread is back")
    func jobsStopOnError() {
        let r = Self.reference([("1:0:0", "legacy", "completes", 1.0), ("2:1:50", "legacy", "completes", 1.5)])
        var s = FidelityHarness.Settings()
        s.pages = 8
        s.seeds = [1, 2, 3]
        s.cpus = 0
        s.jobs = 2
        #expect(throws: StormError.invalidSettings("cpus must be 1...64 (got 0)")) { try FidelityHarness.run(r, s) }
    }

    @Test("a machine profile gives the runs its settings (MachineProfile.apply): trylock still one call a page, the same seeds the same rows")
    func profileSettings() throws {
        let r = Self.reference([("2:1:50", "trylock", "completes", 1.0)])
        var s = FidelityHarness.Settings()
        #expect(s.stallSeconds == 30, "the rig's watchdog")
        s.machine = try MachineProfile.shipped("qemu-tcg-2")
        s.pages = 4
        s.seeds = [1]
        let rows = try FidelityHarness.run(r, s)
        #expect(rows[0].emulator.callsPerPage == [1, 1] && rows[0].outcomeAgrees)
        #expect(try FidelityHarness.run(r, s).map(\.emulator) == rows.map(\.emulator))
    }

    @Test("a kernel whose boots differ agrees with either outcome; the shipped reference decodes")
    func eitherOutcome() throws {
        let json = """
            {"kernel": "6.12.117", "date": "2026-12-06", "qemu": "q",
             "cases": [{"case": "2:0:0", "threads": 2, "mutex": false, "sleepMicros": 0, "pages": 512, "policy": "legacy",
                        "runs": [{"outcome": "completes", "callsPerPage": 1.0}, {"outcome": "livelock", "callsPerPage": null}]}]}
            """
        let r = try JSONDecoder().decode(KernelLivelockReference.self, from: Data(json.utf8))
        var s = FidelityHarness.Settings()
        s.pages = 4
        s.seeds = [1]
        let rows = try FidelityHarness.run(r, s)
        #expect(rows[0].kernel.outcome == "mixed" && rows[0].outcomeAgrees && rows[0].seedsAgreeing == 1)
        let shipped = try KernelLivelockReference.shipped()
        #expect(shipped.cases.count >= 24 && shipped.kernel.hasPrefix("6.12"))
    }
}
