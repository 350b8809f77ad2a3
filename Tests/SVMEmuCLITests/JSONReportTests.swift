import ArgumentParser
import Foundation
import MirrorDriver
import SVMDRM
@testable import SVMStress
import Testing
@testable import SVMEmuCLI

/// The report of `arguments` (parsed) with `results`, as a JSON object.
private func report<R: Encodable>(_ arguments: [String], _ results: R) throws -> [String: Any] {
    let command = try SVMEmuCommand.parseAsRoot(arguments)
    let text = try JSONReport.render(for: command, results: results)
    return try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])
}

/// The envelope every command's report has.
private func expectEnvelope(_ object: [String: Any], command: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
    #expect(object["command"] as? String == command, sourceLocation: sourceLocation)
    #expect(object["version"] as? String == SVMEmuVersion.package, sourceLocation: sourceLocation)
    #expect(object.keys.contains("revision"), sourceLocation: sourceLocation)
    let host = try #require(object["host"] as? [String: Any], sourceLocation: sourceLocation)
    #expect((host["cores"] as? Int ?? 0) >= 1, sourceLocation: sourceLocation)
    #expect((host["memoryBytes"] as? Int ?? 0) > 0, sourceLocation: sourceLocation)
    #expect(host.keys.contains("memoryAvailableBytes"), sourceLocation: sourceLocation)
    let arguments = try #require(object["arguments"] as? [String: Any], sourceLocation: sourceLocation)
    #expect(arguments["json"] as? Bool == true, "--json itself is an argument", sourceLocation: sourceLocation)
}

@Suite("svmemu --json: one object per command")
struct JSONReportTests {
    @Test("livelock: the envelope around the storm's own keys, the arguments as given and defaulted")
    func livelock() throws {
        let object = try report(["livelock", "--json", "--pages", "4", "--fault-policy", "trylock"], try stormResult(livelocked: true))
        try expectEnvelope(object, command: "livelock")
        // The keys StormTests and Docs/livelock.md rely on stay at the top.
        for key in ["faultPolicy", "driverLock", "threads", "pages", "pagesMigrated", "livelocked", "stalledPage",
                    "migrateToRAMCalls", "faultRetries", "seconds", "teardownClean", "dataIntact"] {
            #expect(object[key] != nil, "missing \(key)")
        }
        let arguments = try #require(object["arguments"] as? [String: Any])
        #expect(arguments["pages"] as? Int == 4)
        #expect(arguments["faultPolicy"] as? String == "trylock")
        #expect(arguments["stallSeconds"] is NSNull, "not given: the default is in the results")
        #expect(object["stallSeconds"] as? Double == 2)
        #expect(arguments["seed"] as? Int == 1)
        #expect(arguments["failOnLivelock"] as? Bool == false)
    }

    @Test("overhead: runs, each the object OverheadResult encodes; optional arguments as null")
    func overhead() throws {
        var config = OverheadConfiguration()
        config.bytes = 8 << 20
        let run = OverheadHarness.summarize([:], config: config, wallOn: 0)
        let object = try report(["overhead", "--json", "--granularity", "4k"], OverheadCommand.Runs(runs: [run, run]))
        try expectEnvelope(object, command: "overhead")
        let runs = try #require(object["runs"] as? [[String: Any]])
        #expect(runs.count == 2)
        for key in ["granularity", "direction", "copyModel", "bytes", "faults", "phases", "migrateVMAFraction"] {
            #expect(runs[0][key] != nil, "missing \(key)")
        }
        let arguments = try #require(object["arguments"] as? [String: Any])
        #expect(arguments["granularity"] as? String == "4k")
        #expect(arguments["direction"] is NSNull)
        #expect(arguments["size"] as? String == "256M")
    }

    @Test("demo: both storms and the overhead half")
    func demo() throws {
        var config = OverheadConfiguration()
        config.bytes = 8 << 20
        let run = OverheadHarness.summarize([:], config: config, wallOn: 0)
        let results = DemoCommand.Results(storms: [try stormResult(livelocked: true), try stormResult(livelocked: false)],
                                          overhead: [run])
        let object = try report(["demo", "--json", "--seed", "7"], results)
        try expectEnvelope(object, command: "demo")
        #expect((object["arguments"] as? [String: Any])?["seed"] as? Int == 7, "the seed is recorded")
        #expect((object["storms"] as? [[String: Any]])?.count == 2)
        #expect((object["overhead"] as? [[String: Any]])?.first?["phases"] != nil)
    }

    @Test("bench migrate's table: the goal (issue 25) stands next to the ratio to the faster copy, not next to memcpy's",
          arguments: [(MigrationGranularity.base4K, "goal >= 0.8"), (.huge2M, "goal >= 0.95")])
    func benchMigrateGoalLine(granularity: MigrationGranularity, goal: String) {
        let text = BenchMigrateCommand.render(BenchMigrateCommand.Result(
            granularity: granularity, bytes: 64 << 20, migrateSeconds: 0.1, memcpySeconds: 0.02, streamCopySeconds: 0.015,
            toDeviceSeconds: 0.05, toSystemSeconds: 0.05, rounds: 5))
        let lines = text.split(separator: "\n").map(String.init)
        let best = lines.first { $0.contains("ratio to the faster copy") } ?? ""
        let memcpy = lines.first { $0.contains("ratio (migrate / memcpy)") } ?? ""
        #expect(best.hasSuffix("(\(goal))"), "\(best)")
        #expect(!memcpy.contains("goal") && memcpy.contains("Linux move_pages"), "\(memcpy)")
    }

    @Test("bench memory, bench migrate, bench thp and devices: the envelope and their documented keys")
    func otherCommands() throws {
        let memory = try report(["bench", "memory", "--json", "--seed", "9"], BenchMemoryCommand.Result(
            readNanos: 20, tlbHitReadNanos: 3, tlbMissReadNanos: 30, shootdownNanos: 2000, demandZeroFaultNanos: 900, demandZeroFirstRoundNanos: 1200, metadataBytesPerPage: 64, memcpy4KNanos: 60))
        try expectEnvelope(memory, command: "bench memory")
        for key in ["readNanos", "tlbHitReadNanos", "tlbMissReadNanos", "shootdownNanos", "demandZeroFaultNanos",
                    "metadataBytesPerPage", "memcpy4KNanos"] { #expect(memory[key] != nil, "\(key)") }
        #expect((memory["arguments"] as? [String: Any])?["seed"] as? Int == 9, "the pattern's seed is recorded")

        let migrate = try report(["bench", "migrate", "--json", "--size", "64M"], BenchMigrateCommand.Result(
            granularity: .base4K, bytes: 64 << 20, migrateSeconds: 0.1, memcpySeconds: 0.02, streamCopySeconds: 0.015,
            toDeviceSeconds: 0.05, toSystemSeconds: 0.05, rounds: 5))
        try expectEnvelope(migrate, command: "bench migrate")
        for key in ["granularity", "bytes", "migrateGBps", "memcpyGBps", "ratio", "streamCopyGBps", "ratioToBestCopy",
                    "migrateSeconds", "toDeviceSeconds", "toSystemSeconds", "memcpySeconds", "rounds"] {
            #expect(migrate[key] != nil, "\(key)")
        }
        #expect(migrate["ratio"] as? Double == 0.2)
        #expect(migrate["goal"] == nil && migrate["goalRatioToBestCopy"] == nil, "the JSON fields stay as documented")

        let side = BenchTHPCommand.Side(sysToDevMs: 1, devToSysMs: 2, bytes: 1 << 20)
        let thp = try report(["bench", "thp", "--json"], BenchTHPCommand.Results(sizes: [
            .init(name: "Half THP Size", bytes: 1 << 20, iterations: 5, thp: side, regular: side)]))
        try expectEnvelope(thp, command: "bench thp")
        #expect((thp["arguments"] as? [String: Any])?["seed"] as? Int == 1, "the default seed is recorded")
        let sizes = try #require(thp["sizes"] as? [[String: Any]])
        #expect((sizes.first?["thp"] as? [String: Any])?["sysToDevGBps"] != nil)

        let devices = try report(["devices", "--json"], DRMDevices.enumerate(driDirectory: "/nonexistent/svmemu-test/dri"))
        try expectEnvelope(devices, command: "devices")
        #expect(devices["devices"] is [Any] && devices["driDirectoryPresent"] as? Bool == false && devices["message"] is String)
    }

    @Test("no command's own results use an envelope key (the merge would hide one)")
    func noCollisions() throws {
        var config = OverheadConfiguration()
        config.bytes = 8 << 20
        let encoder = JSONEncoder()
        let encoded: [Data] = [
            try encoder.encode(try stormResult(livelocked: false)),
            try encoder.encode(OverheadCommand.Runs(runs: [OverheadHarness.summarize([:], config: config, wallOn: 0)])),
            try encoder.encode(DRMDevices.enumerate(driDirectory: "/nonexistent/svmemu-test/dri")),
        ]
        for data in encoded {
            let object = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
            for key in JSONReport<Int>.envelopeKeys { #expect(object[key] == nil, "\(key) is a result key") }
        }
        #expect(Set(JSONReport<Int>.envelopeKeys) == ["command", "arguments", "host", "version", "revision"])
    }
}
