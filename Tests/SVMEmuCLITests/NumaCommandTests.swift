import ArgumentParser
import Foundation
import SVMEmu
@testable import SVMStress
import Testing
@testable import SVMEmuCLI

@Suite("svmemu numa")
struct NumaCommandTests {
    @Test("arguments out of range are refused with the range and the usage status")
    func ranges() throws {
        let cases: [([String], String)] = [
            (["numa", "--readers", "-1"], "--readers must be 0...32 (got -1)"),
            (["numa", "--rounds", "0"], "--rounds must be 1...100 (got 0)"),
            (["numa", "--copy-threads", "65"], "--copy-threads must be 1...64 (got 65)"),
            (["numa", "--pages", "1"], "--pages must be 2...65536 (got 1)"),
            (["numa", "--holders", "0"], "--holders must be 1...32 (got 0)"),
            (["numa", "--size", "1M"], "--size"),
            (["numa", "--storm", "--svg", "/tmp/x.svg"], "--storm writes no --svg or --trace"),
            (["numa", "--storm", "--variants", "all"], "--storm runs each algorithm once"),
            (["numa", "--variants", "some"], "--variants"),
        ]
        for (arguments, expected) in cases {
            let r = try #require(refusal(arguments), "\(arguments) was accepted")
            #expect(r.message.contains(expected), "\(arguments): \(r.message)")
            #expect(r.status == ExitStatus.usage.rawValue)
        }
        let parsed = try #require(try SVMEmuCommand.parseAsRoot(["numa", "--check-tlb", "--storm", "--pages", "64"]) as? NumaCommand)
        #expect(parsed.checkTLB && parsed.storm && parsed.pages == 64)
        let all = NUMAVariant.all(copyThreads: 2)
        #expect(all.count == MigrationAlgorithm.allCases.count * NUMACopierKind.allCases.count * 2 * 2)
        #expect(Set(all).count == all.count, "each combination once")
        #expect(Set(NUMAVariant.standard(copyThreads: 2)).isSubset(of: Set(all)))
    }

    @Test("--json: variants with the keys the issue lists, the sweeps, from a real (tiny) run with the stale-entry checker on")
    func variantsJSON() throws {
        var settings = NUMABenchSettings()
        settings.bufferBytes = 2 << 20
        settings.readers = 1
        settings.rounds = 2
        settings.checksStaleTLBEntries = true
        let r = try NUMABench.run(NUMAVariant(algorithm: .batched, deferredFlush: true), settings: settings)
        #expect(r.dataIntact)
        #expect(r.staleEntryDiagnostics == 0, "the deferral's stale reads of a read-only buffer are its bargain, not reported")
        #expect(r.pagesMigrated == 2 * 512)
        let point = NUMACopyPoint(folioBytes: 4096, folios: 1, ringBytes: 8 << 20, singleMicros: 1, multiMicros: 2, threads: 2, speedup: 0.5)
        let object = try report(["numa", "--json", "--check-tlb"],
                                NumaCommand.Results(variants: [r], batchSweep: [], copySweep: [point]))
        #expect(object["command"] as? String == "numa")
        let variants = try #require(object["variants"] as? [[String: Any]])
        for key in ["algorithm", "mode", "copier", "copyThreads", "deferredFlush", "pageSize", "pagesMigrated", "pagesPerSecond",
                    "ipisPerPage", "flushes", "flushWaitMicros", "readerLatencyP50Nanos", "readerLatencyP99Nanos",
                    "staleEntryDiagnostics", "dataIntact"] {
            #expect(variants[0][key] != nil, "missing \(key)")
        }
        #expect(variants[0]["checksStaleTLBEntries"] as? Bool == true)
        #expect(variants[0]["trace"] == nil, "the trace goes to --trace, not into the JSON")
        #expect(object["batchSweep"] is [Any])
        #expect((object["copySweep"] as? [[String: Any]])?.first?["speedup"] != nil)
        let arguments = try #require(object["arguments"] as? [String: Any])
        #expect(arguments["checkTLB"] as? Bool == true)
    }

    @Test("--svg charts the variants and both sweeps, one bar per variant, batch size and copy shape")
    func chartPanels() throws {
        let r = NUMAVariantResult(algorithm: "batched", mode: "sync", copier: "single", copyThreads: 1, deferredFlush: false,
                                  pageSize: PageGeometry.pageSize, pagesMigrated: 512, pagesPerSecond: 1000, ipisPerPage: 0.01,
                                  flushes: 1, flushWaitMicros: 1, copyMicros: 1, readerLatencyP50Nanos: 0,
                                  readerLatencyP99Nanos: 0, readerAccesses: 0, staleEntryDiagnostics: 0,
                                  checksStaleTLBEntries: false, deferredFlushes: 0, lockWaitP99Nanos: 0, unmapMicros: 1,
                                  flushMicros: 1, remapMicros: 1, ipisSent: 5, seconds: 0.5, dataIntact: true)
        let batch = NUMABatchPoint(batchPages: 32, totalMillis: 2, firstFolioMicros: 50, pagesPerSecond: 4000)
        let copy = NUMACopyPoint(folioBytes: PageGeometry.pmdSize, folios: 1, ringBytes: 8 << 20, singleMicros: 40,
                                 multiMicros: 25, threads: 2, speedup: 1.6)
        let svg = NumaCommand.chart([r], [batch], [copy])
        for title in ["Pages migrated per second", "IPIs per migrated page", "by batch size (4K pages)",
                      "First folio's latency", "speedup over one thread"] {
            #expect(svg.contains(title), "missing panel \(title)")
        }
        #expect(svg.contains("2 threads, 1 x 2M, 8M ring") && svg.contains("1.60x"))
        #expect(svg.components(separatedBy: "class=\"bar\"").count - 1 == 5, "one bar per variant, batch size and copy shape")
        #expect(svg.contains("viewBox=") && svg.contains("class=\"background\"") && svg.contains("1.0x: no gain"))
        #expect(!NumaCommand.chart([r]).contains("batch size"), "no sweep panels without sweeps")
    }

    @Test("--storm --json: one element per algorithm with the lock-wait distribution, from a real (tiny) storm")
    func stormJSON() throws {
        var settings = NUMAStormSettings()
        settings.pages = 32
        settings.rounds = 1
        settings.holdMicros = 500
        settings.gapMicros = 100
        let r = try NUMABench.storm(.batched, settings: settings)
        #expect(r.dataIntact)
        #expect(r.pagesMigrated + r.pagesNotMigrated == 32)
        let object = try report(["numa", "--storm", "--json"], NumaCommand.StormResults(storm: [r]))
        let storm = try #require(object["storm"] as? [[String: Any]])
        for key in ["algorithm", "pagesMigrated", "pagesNotMigrated", "stalls", "deadlockBackoffs", "lockWaitP99Nanos",
                    "lockWaitHistogram", "holderWaitP99Nanos", "dataIntact"] {
            #expect(storm[0][key] != nil, "missing \(key)")
        }
    }
}

/// The report of `arguments` (parsed) with `results`, as a JSON object.
private func report<R: Encodable>(_ arguments: [String], _ results: R) throws -> [String: Any] {
    let command = try SVMEmuCommand.parseAsRoot(arguments)
    let text = try JSONReport.render(for: command, results: results)
    return try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])
}
