import ArgumentParser
import Foundation
import SVMEmu
import SVMStress
import Testing
@testable import SVMEmuCLI

/// The `--json` text of a parsed command's results without the `host`
/// envelope and the engine's speed (`stepsPerSecond`, at any depth): the
/// parts that depend on the machine and the moment. Each of those must be a
/// positive number.
private func jsonWithoutHost<C: ParsableCommand, R: Encodable>(_ command: C, _ results: R) throws -> Data {
    let text = try JSONReport.render(for: command, results: results)
    var object = try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])
    object["host"] = nil
    var speeds = 0
    func strip(_ value: Any) -> Any {
        if var o = value as? [String: Any] {
            if let v = o.removeValue(forKey: "stepsPerSecond") {
                #expect((v as? Double ?? 0) > 0, "stepsPerSecond: \(v)")
                speeds += 1
            }
            for (k, v) in o { o[k] = strip(v) }
            return o
        }
        if let a = value as? [Any] { return a.map(strip) }
        return value
    }
    let stripped = strip(object)
    #expect(speeds > 0, "a deterministic result reports stepsPerSecond")
    return try JSONSerialization.data(withJSONObject: stripped, options: [.sortedKeys])
}

private func parse<C: ParsableCommand>(_ arguments: [String], as: C.Type) throws -> C {
    try #require(try SVMEmuCommand.parseAsRoot(arguments) as? C)
}

@Suite("deterministic overhead and numa")
struct DeterministicCommandTests {
    static func overhead(seed: UInt64) -> [String] {
        ["overhead", "--deterministic", "--cpus", "2", "--seed", "\(seed)", "--size", "2M", "--granularity", "4k",
         "--direction", "to-device", "--rounds", "1", "--busy-cpus", "1", "--json"]
    }

    @Test("overhead --deterministic: the same seed gives the same JSON, byte for byte; another seed other times")
    func overheadRepeatsBySeed() throws {
        let a = try parse(Self.overhead(seed: 5), as: OverheadCommand.self)
        let first = try jsonWithoutHost(a, OverheadCommand.Runs(runs: try a.runs()))
        let second = try jsonWithoutHost(a, OverheadCommand.Runs(runs: try a.runs()))
        #expect(first == second)
        let runs = try a.runs()
        #expect(runs.count == 1 && runs[0].deterministic == true && runs[0].cpus == 2)
        #expect(runs[0].faults == 512 && runs[0].verified)
        #expect((runs[0].phases["copy"]?.seconds ?? 0) > 0, "a copy takes virtual time")
        #expect((runs[0].phases["tlbFlush"]?.count ?? 0) > 0, "the busy CPU is shot down")
        #expect(runs[0].memcpyGBps == 0 && runs[0].instrumentationOverheadPercent == 0, "host figures are not measured")
        let b = try parse(Self.overhead(seed: 6), as: OverheadCommand.self)
        let other = try b.runs()
        #expect(other[0].phases["fault"]?.seconds != runs[0].phases["fault"]?.seconds,
                "another seed draws other cost jitter and another interleaving of the busy CPU")
        #expect(other[0].faults == runs[0].faults)
    }

    @Test("numa --deterministic: variants and sweep repeat by seed; another seed gives other reader figures")
    func numaRepeatsBySeed() throws {
        let arguments = ["numa", "--deterministic", "--size", "2M", "--readers", "1", "--rounds", "1", "--json"]
        let a = try parse(arguments + ["--seed", "3"], as: NumaCommand.self)
        let first = try a.variantResults()
        #expect(try jsonWithoutHost(a, first) == jsonWithoutHost(a, try a.variantResults()))
        #expect(first.variants.allSatisfy { $0.dataIntact && $0.scheduleSteps != nil })
        #expect(!first.variants.contains { $0.copier.hasPrefix("mt") }, "the multi-threaded copier's workers are host threads")
        #expect(first.copySweep.isEmpty && !first.batchSweep.isEmpty)
        let b = try parse(arguments + ["--seed", "4"], as: NumaCommand.self)
        let other = try b.variantResults()
        #expect(other.variants.map(\.pagesMigrated) == first.variants.map(\.pagesMigrated))
        #expect(other.variants.map(\.readerAccesses) != first.variants.map(\.readerAccesses))
    }

    @Test("numa --storm --deterministic repeats by seed")
    func numaStormRepeatsBySeed() throws {
        let a = try parse(["numa", "--storm", "--deterministic", "--pages", "32", "--rounds", "1", "--seed", "9",
                           "--json"], as: NumaCommand.self)
        let first = try a.stormResults()
        #expect(try jsonWithoutHost(a, first) == jsonWithoutHost(a, try a.stormResults()))
        #expect(first.storm.allSatisfy { $0.dataIntact && $0.pagesMigrated + $0.pagesNotMigrated == 32 })
    }

    @Test("schedule arguments are checked before anything runs")
    func argumentErrors() throws {
        let cases: [([String], String)] = [
            (["overhead", "--cpus", "4"], "--cpus, --preemptions and --machine need --deterministic"),
            (["numa", "--preemptions", "2"], "--cpus, --preemptions and --machine need --deterministic"),
            (["overhead", "--deterministic", "--cpus", "0"], "--cpus must be 1...64 (got 0)"),
            (["numa", "--deterministic", "--cpus", "65"], "--cpus must be 1...64 (got 65)"),
            (["overhead", "--deterministic", "--preemptions", "1001"], "--preemptions must be 0...1000 (got 1001)"),
            (["overhead", "--deterministic", "--copy-threads", "2"], "--copy-threads needs real threads"),
            (["overhead", "--seed", "-1"], "seed"),
            (["livelock", "--release", "together"], "invalid --release 'together'; valid values: all, one-by-one"),
            (["explore", "--release", "x"], "invalid --release 'x'"),
        ]
        for (arguments, expected) in cases {
            let r = try #require(refusal(arguments), "\(arguments) was accepted")
            #expect(r.message.contains(expected), "\(arguments): \(r.message)")
            #expect(r.status == ExitStatus.usage.rawValue)
        }
        // More threads than CPUs is legal: they share the CPUs (the scheduler's CPU model).
        #expect(refusal(["numa", "--storm", "--deterministic", "--cpus", "2", "--holders", "4"]) == nil)
        let o = try parse(["overhead", "--seed", "42"], as: OverheadCommand.self)
        #expect(o.threads.seed == 42 && !o.threads.deterministic)
        #expect(ReportValue.arguments(of: o)["seed"] == .unsigned(42), "the JSON records the seed")
        let l = try parse(["livelock", "--deterministic", "--release", "one-by-one"], as: LivelockCommand.self)
        #expect(try l.settings().release == .oneByOne)
        #expect(try parse(["livelock"], as: LivelockCommand.self).settings().release == .all)
        let n = try parse(["numa", "--deterministic"], as: NumaCommand.self)
        #expect(try n.harnessSchedule() == .deterministic(cpus: 8, seed: 1, preemptions: 3))
    }
}
