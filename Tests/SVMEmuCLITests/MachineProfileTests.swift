import ArgumentParser
import Foundation
import SVMEmu
@testable import SVMStress
import Testing
@testable import SVMEmuCLI

/// A profile in the shape the kernel rig's guest calibrator writes (the
/// keys of Docs/machine-profiles.md), with round figures.
private let example = """
    {"name":"example-2core","description":"a test machine","measuredOn":"nowhere","date":"2026-12-06",
     "tool":"svmemu calibrate 0.1","cpus":2,
     "costs":{"tlbHit":1.4,"pageTableWalk":30,"faultEntryExit":900,"syscall":100,"futexWake":200,"futexWait":250,
              "wakeLatency":40000,"contextSwitch":3000,"spinRound":70,"lockUncontended":5,"unlock":0.2,"yield":400,
              "ipiSendToReceipt":2000,"ipiRoundTrip":5000,"localFlush":600},
     "memcpy":[{"workingSetBytes":4096,"gbPerSecond":50},{"workingSetBytes":1048576,"gbPerSecond":20},
               {"workingSetBytes":2097152,"gbPerSecond":12},{"workingSetBytes":67108864,"gbPerSecond":5}],
     "scheduler":{"baseSliceNanos":3000000,"tickNanos":1000000,"preemption":"voluntary"},
     "methods":{"tlbHit":"a chase"}}
    """

@Suite("machine profiles")
struct MachineProfileTests {
    @Test("a profile file decodes, and maps onto the scheduler's costs as documented")
    func virtualCostsMapping() throws {
        let p = try MachineProfile.decode(Data(example.utf8), source: "example")
        let v = p.virtualCosts
        #expect(v.access == 1 && v.fault == 900 && v.lock == 5 && v.futex == 250 && v.wake == 40_000)
        #expect(v.unlock == 1, "a cost below a nanosecond is charged as 1: a free point would stop virtual time")
        #expect(v.yield == 400 && v.contextSwitch == 3000 && v.spinRound == 70)
        // 1-2 MiB: the mean of 20 and 12 GB/s, 16 GB/s: 64 ns a KiB.
        #expect(v.copyPerKiB == 64)
        #expect(p.baseSliceNanos == 3_000_000 && p.tickNanos == 1_000_000)
        // What the profile writes reads back the same.
        #expect(try MachineProfile.decode(try p.json(), source: "round trip") == p)
    }

    @Test("stalls are optional: a profile without them loads, one with them round-trips, a bad figure is refused")
    func stallsOptional() throws {
        let plain = try MachineProfile.decode(Data(example.utf8), source: "example")
        #expect(plain.stalls == nil)
        #expect(!String(decoding: try plain.json(), as: UTF8.self).contains("stalls"), "no key written when absent")
        let stalls = #"{"ratePerSecond":300,"meanNanos":12000,"p50Nanos":3000,"p90Nanos":33000,"p99Nanos":95000,"maxNanos":1000000,"thresholdNanos":2000}"#
        let with = example.replacingOccurrences(of: #""methods":"#, with: #""stalls":\#(stalls),"methods":"#)
        let p = try MachineProfile.decode(Data(with.utf8), source: "with stalls")
        #expect(p.stalls == MachineProfile.Stalls(ratePerSecond: 300, meanNanos: 12000, p50Nanos: 3000, p90Nanos: 33000,
                                                  p99Nanos: 95000, maxNanos: 1_000_000, thresholdNanos: 2000))
        #expect(p.stalls?.tickGapsPerSecond == nil, "the tick's figures are optional")
        #expect(try MachineProfile.decode(try p.json(), source: "round trip") == p)
        do {
            _ = try MachineProfile.decode(Data(with.replacingOccurrences(of: #""p99Nanos":95000"#, with: #""p99Nanos":-5"#).utf8),
                                          source: "negative")
            Issue.record("a negative stall figure was accepted")
        } catch {
            #expect(error.description.contains("stalls.p99Nanos"))
        }
    }

    @Test("the tick's interrupt: the tick gaps' median at the share of ticks that showed one; none without the figures")
    func tickInterruptFromTheStalls() throws {
        let plain = try MachineProfile.decode(Data(example.utf8), source: "example")
        #expect(plain.tickInterrupt == nil, "no stalls: a tick costs nothing")
        let base = #""ratePerSecond":300,"meanNanos":12000,"p50Nanos":3000,"p90Nanos":33000,"p99Nanos":95000,"maxNanos":1000000,"thresholdNanos":2000"#
        func profile(_ extra: String) throws(MachineProfileError) -> MachineProfile {
            let with = example.replacingOccurrences(of: #""methods":"#, with: #""stalls":{\#(base)\#(extra)},"methods":"#)
            return try MachineProfile.decode(Data(with.utf8), source: "with stalls")
        }
        #expect(try profile("").tickInterrupt == nil, "stalls without the tick's figures: nothing")
        #expect(try profile(#","tickGapsPerSecond":0,"tickGapP50Nanos":0"#).tickInterrupt == nil,
                "the handler under the probe's threshold: nothing")
        // 250 gaps a second on the profile's 1 ms tick: a quarter of the ticks.
        #expect(try profile(#","tickGapsPerSecond":250,"tickGapP50Nanos":17650.4"#).tickInterrupt
                == TickInterrupt(share: 0.25, nanos: 17_650))
        // Probed on a 4 ms tick (HZ=250): 135 of 250 ticks a second showed the handler.
        let probed = try profile(#","tickGapsPerSecond":135,"tickGapP50Nanos":17650,"probeTickNanos":4000000"#)
        #expect(probed.tickInterrupt == TickInterrupt(share: 0.54, nanos: 17_650))
        #expect(try MachineProfile.decode(try probed.json(), source: "round trip") == probed)
        #expect(try profile(#","tickGapsPerSecond":2000,"tickGapP50Nanos":5000"#).tickInterrupt?.share == 1, "at most every tick")
        do {
            _ = try profile(#","tickGapsPerSecond":100,"tickGapP50Nanos":1000000"#)
            Issue.record("a tick handler as long as the tick was accepted")
        } catch {
            #expect(error.description.contains("tickGapP50Nanos"))
        }
        let shipped = try MachineProfile.shipped("qemu-tcg-2").tickInterrupt
        #expect(shipped?.nanos == 23_770 && shipped?.share == 1, "the rig's guest: its own HZ=1000 kernel probed, a gap at every tick")
        var c = DeterministicScheduler.Configuration(seed: 1)
        try MachineProfile.shipped("qemu-tcg-2").apply(to: &c)
        #expect(c.tickInterrupt == shipped)
    }

    @Test("stalls.oneBusy: optional; charged as its figures with the two-busy ones; checked as they are")
    func stallsOneBusy() throws {
        let base = #""ratePerSecond":300,"meanNanos":12000,"p50Nanos":3000,"p90Nanos":33000,"p99Nanos":95000,"maxNanos":1000000,"thresholdNanos":2000"#
        func profile(_ extra: String) throws(MachineProfileError) -> MachineProfile {
            let with = example.replacingOccurrences(of: #""methods":"#, with: #""stalls":{\#(base)\#(extra)},"methods":"#)
            return try MachineProfile.decode(Data(with.utf8), source: "with stalls")
        }
        var c = DeterministicScheduler.Configuration(seed: 1)
        try profile("").apply(to: &c)
        #expect(c.stalls != nil && c.stallsOneBusy == nil)
        let one = try profile(#","oneBusy":{"ratePerSecond":0,"meanNanos":0,"p50Nanos":2500.4,"p90Nanos":3000,"p99Nanos":4000,"maxNanos":5000,"thresholdNanos":2000}"#)
        #expect(one.cpuStallsOneBusy == CPUStalls(ratePerSecond: 0, thresholdNanos: 2000, p50Nanos: 2500, p90Nanos: 3000,
                                                  p99Nanos: 4000, maxNanos: 5000), "a rate of 0: never alone")
        #expect(try MachineProfile.decode(try one.json(), source: "round trip") == one)
        one.apply(to: &c)
        #expect(c.stallsOneBusy == one.cpuStallsOneBusy && c.stalls == one.cpuStalls)
        do {
            _ = try profile(#","oneBusy":{"ratePerSecond":10,"meanNanos":0,"p50Nanos":2500,"p90Nanos":-1,"p99Nanos":4000,"maxNanos":5000,"thresholdNanos":2000}"#)
            Issue.record("a negative one-busy figure was accepted")
        } catch {
            #expect(error.description.contains("stalls.oneBusy.p90Nanos"))
        }
    }

    @Test("timerWake is optional: without it nothing is charged; with it its points map onto the scheduler's costs, shortest idle first")
    func timerWakeOptional() throws {
        let plain = try MachineProfile.decode(Data(example.utf8), source: "example")
        #expect(plain.timerWake == nil && plain.virtualCosts.timerWake.isEmpty)
        #expect(!String(decoding: try plain.json(), as: UTF8.self).contains("timerWake"), "no key written when absent")
        let points = #"{"points":[{"idleNanos":400000,"latencyNanos":97738.4},{"idleNanos":40000,"latencyNanos":66579}]}"#
        let with = example.replacingOccurrences(of: #""methods":"#, with: #""timerWake":\#(points),"methods":"#)
        let p = try MachineProfile.decode(Data(with.utf8), source: "with timerWake")
        #expect(p.virtualCosts.timerWake == [.init(idleNanos: 40_000, latencyNanos: 66_579),
                                             .init(idleNanos: 400_000, latencyNanos: 97_738)])
        #expect(try MachineProfile.decode(try p.json(), source: "round trip") == p)
        do {
            _ = try MachineProfile.decode(Data(with.replacingOccurrences(of: "66579", with: "-1").utf8), source: "negative")
            Issue.record("a negative latency was accepted")
        } catch {
            #expect(error.description.contains("timerWake.points"))
        }
        let shipped = try MachineProfile.shipped("qemu-tcg-2")
        #expect(shipped.virtualCosts.timerWakeNanos(idleFor: 40_000) == 66_579, "the rig's measurement ships")
    }

    @Test("deviceFault is optional: without it nothing is charged; with it both spans map onto the scheduler's costs")
    func deviceFaultOptional() throws {
        let plain = try MachineProfile.decode(Data(example.utf8), source: "example")
        #expect(plain.deviceFault == nil)
        #expect(plain.virtualCosts.deviceFaultToReference == 0 && plain.virtualCosts.referenceToCollect == 0)
        #expect(!String(decoding: try plain.json(), as: UTF8.self).contains("deviceFault"), "no key written when absent")
        let spans = #"{"entryToReferenceNanos":3900.4,"referenceToCollectNanos":2200}"#
        let with = example.replacingOccurrences(of: #""methods":"#, with: #""deviceFault":\#(spans),"methods":"#)
        let p = try MachineProfile.decode(Data(with.utf8), source: "with deviceFault")
        #expect(p.deviceFault == MachineProfile.DeviceFault(entryToReferenceNanos: 3900.4, referenceToCollectNanos: 2200))
        #expect(p.virtualCosts.deviceFaultToReference == 3900 && p.virtualCosts.referenceToCollect == 2200)
        #expect(try MachineProfile.decode(try p.json(), source: "round trip") == p)
        let zero = with.replacingOccurrences(of: "3900.4", with: "0")
        #expect(try MachineProfile.decode(Data(zero.utf8), source: "zero").virtualCosts.deviceFaultToReference == 0,
                "0 (not measured) charges nothing")
        do {
            _ = try MachineProfile.decode(Data(with.replacingOccurrences(of: "2200", with: "-1").utf8), source: "negative")
            Issue.record("a negative span was accepted")
        } catch {
            #expect(error.description.contains("deviceFault.referenceToCollectNanos"))
        }
    }

    @Test("the stall probe runs on one CPU and reports ordered figures above its threshold")
    func stallProbe() throws {
        let (a, _) = Calibration.twoCPUs()
        let (s, method) = try Calibration.measureStalls(a: a ?? 0, b: -1, rounds: 1, roundNanos: 50_000_000,
                                                        tickNanos: 4_000_000)
        #expect(s.thresholdNanos >= 2000)
        #expect(s.ratePerSecond >= 0 && s.p50Nanos <= s.p90Nanos && s.p90Nanos <= s.p99Nanos && s.p99Nanos <= s.maxNanos)
        if s.ratePerSecond > 0 { #expect(s.p50Nanos > s.thresholdNanos, "every stall is a gap above the threshold") }
        #expect(method.contains("CLOCK_MONOTONIC"))
    }

    @Test("invalid profiles are refused with the reason")
    func invalidProfiles() throws {
        #expect(throws: MachineProfileError.self) { try MachineProfile.decode(Data("{}".utf8), source: "empty") }
        let negative = example.replacingOccurrences(of: "\"syscall\":100", with: "\"syscall\":-1")
        do {
            _ = try MachineProfile.decode(Data(negative.utf8), source: "negative")
            Issue.record("a negative cost was accepted")
        } catch {
            #expect(error.description.contains("costs.syscall"))
        }
        do {
            _ = try MachineProfile.resolve("no-such-machine")
            Issue.record("an unknown name was accepted")
        } catch {
            #expect(error.description.contains("native"), "the message lists the shipped profiles")
        }
    }

    @Test("the shipped native profile loads and is complete")
    func shippedNative() throws {
        let p = try MachineProfile.resolve("native")
        #expect(p.name == "native-2core" && p.cpus == 2)
        #expect(p.problem == nil)
        for key in MachineProfile.Costs.keys { #expect(p.methods[key] != nil, "method of \(key)") }
        #expect(p.memcpy.first?.workingSetBytes == 4096 && p.memcpy.last?.workingSetBytes == 64 << 20)
        for name in ["native", "qemu-tcg-2"] {
            let shipped = try MachineProfile.resolve(name)
            #expect(shipped.stalls != nil && shipped.methods["stalls"] != nil, "\(name) has stalls and their method")
            #expect(shipped.deviceFault != nil && shipped.methods["deviceFault"] != nil, "\(name) has deviceFault and its method")
        }
        #expect(p.deviceFault == MachineProfile.DeviceFault(entryToReferenceNanos: 0, referenceToCollectNanos: 0),
                "the host has no device-private memory to probe: 0, nothing charged")
        let rig = try MachineProfile.resolve("qemu-tcg-2")
        #expect((rig.deviceFault?.entryToReferenceNanos ?? 0) > 0 && (rig.deviceFault?.referenceToCollectNanos ?? 0) > 0,
                "the rig's guest measured both spans")
    }

    @Test("--machine: checked before the run, refused without --deterministic, listed when unknown")
    func machineOption() throws {
        #expect(throws: (any Error).self) { try SVMEmuCommand.parseAsRoot(["livelock", "--machine", "native"]) }
        do {
            _ = try SVMEmuCommand.parseAsRoot(["livelock", "--deterministic", "--machine", "nosuch"])
            Issue.record("an unknown profile was accepted")
        } catch {
            let message = SVMEmuCommand.message(for: error)
            #expect(message.contains("--machine") && message.contains("native"))
        }
        for command in [["explore"], ["replay"], ["soak"], ["overhead", "--deterministic"], ["numa", "--deterministic"], ["fidelity"]] {
            #expect(throws: (any Error).self, "\(command[0])") {
                try SVMEmuCommand.parseAsRoot(command + ["--machine", "/nonexistent/profile.json"])
            }
            _ = try SVMEmuCommand.parseAsRoot(command + ["--machine", "native"])
        }
    }

    @Test("fidelity checks --reference and --cases before it runs, and says what is wrong with the file in one line")
    func fidelityReferenceChecked() throws {
        let broken = FileManager.default.temporaryDirectory.appendingPathComponent("svmemu-reference-\(getpid()).json")
        try Data("{\"kernel\": \"6.12\"}".utf8).write(to: broken)
        defer { try? FileManager.default.removeItem(at: broken) }
        for (arguments, wanted) in [(["--reference", "/nonexistent/livelock.json"], "/nonexistent/livelock.json: No such file or directory"),
                                    (["--reference", broken.path], "missing key"),
                                    (["--cases", "9:9:9"], "no case 9:9:9")] {
            do {
                _ = try SVMEmuCommand.parseAsRoot(["fidelity"] + arguments)
                Issue.record("fidelity \(arguments) was accepted")
            } catch {
                let message = SVMEmuCommand.message(for: error)
                #expect(message.contains(wanted) && !message.contains("NSCocoaErrorDomain"), "\(message)")
                #expect(SVMEmuCommand.exitCode(for: error).rawValue == 64)
            }
        }
    }

    @Test("--machine: a shipped name in any case (like every enum value); a file path as given")
    func machineCaseInsensitive() throws {
        for name in ["NATIVE", "Native", "QEMU-TCG-2", "Native-2Core"] {
            let p = try MachineProfile.resolve(name)
            #expect(p.name == (name.lowercased().hasPrefix("qemu") ? "qemu-tcg-2" : "native-2core"), "\(name)")
            _ = try SVMEmuCommand.parseAsRoot(["soak", "--machine", name])
            _ = try SVMEmuCommand.parseAsRoot(["fidelity", "--machine", name])
        }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("svmemu-machine-case-\(ProcessInfo.processInfo.processIdentifier)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let file = dir.appendingPathComponent("Mine.json")
        try MachineProfile.resolve("native").json().write(to: file)
        #expect(try MachineProfile.resolve(file.path).name == "native-2core")
        #expect(throws: MachineProfileError.self, "a path is not lowercased") {
            try MachineProfile.resolve(dir.appendingPathComponent("mine.json").path)
        }
    }

    @Test("a deterministic storm charges the profile's costs; without --machine the report is unchanged")
    func stormUnderAProfile() throws {
        var s = StormSettings(faultPolicy: .trylock, driverLock: .exclusive, threads: 2, pages: 4)
        s.deterministic = true
        s.cpus = 2
        let plain = try StormHarness.run(s)
        var p = try MachineProfile.decode(Data(example.utf8), source: "example")
        p.costs.wakeLatency = 400_000
        s.machine = p
        let profiled = try StormHarness.run(s)
        #expect(plain.pagesMigrated == 4 && profiled.pagesMigrated == 4)
        #expect(profiled.virtualSeconds != plain.virtualSeconds)
        let encoder = JSONEncoder()
        let plainJSON = String(decoding: try encoder.encode(plain), as: UTF8.self)
        let profiledJSON = String(decoding: try encoder.encode(profiled), as: UTF8.self)
        #expect(!plainJSON.contains("\"machine\""))
        #expect(profiledJSON.contains("\"machine\":\"example-2core\""))
    }
}
