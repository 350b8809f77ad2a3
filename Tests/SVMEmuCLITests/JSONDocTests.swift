import Foundation
import SVMEmu
@testable import SVMStress
import Testing
@testable import SVMEmuCLI

/// Docs/json.md, read from the checkout.
private func jsonDoc() throws -> String {
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    return try String(contentsOf: root.appendingPathComponent("Docs/json.md"), encoding: .utf8)
}

/// Every key path of `value` as Docs/json.md writes it: `runs[].phases.{phase}.seconds`
/// (array elements as `[]`, the keys of a map named in `maps` as its placeholder).
private func keyPaths(_ value: Any, _ prefix: String = "", maps: [String: String]) -> Set<String> {
    var out: Set<String> = []
    if let object = value as? [String: Any] {
        let last = prefix.split(separator: ".").last.map { String($0.split(separator: "[").first ?? "") } ?? ""
        if let placeholder = maps[last], !prefix.isEmpty {
            let path = prefix + "." + placeholder
            out.insert(path)
            for element in object.values { out.formUnion(keyPaths(element, path, maps: maps)) }
            return out
        }
        for (key, element) in object {
            let path = prefix.isEmpty ? key : prefix + "." + key
            out.insert(path)
            out.formUnion(keyPaths(element, path, maps: maps))
        }
    } else if let array = value as? [Any] {
        for element in array { out.formUnion(keyPaths(element, prefix + "[]", maps: maps)) }
    }
    return out
}

/// The paths of `results` as its command's report encodes them (the envelope left out).
private func resultPaths<R: Encodable>(_ results: R) throws -> Set<String> {
    let data = try ReportJSON.encoder(pretty: false).encode(results)
    let object = try JSONSerialization.jsonObject(with: data)
    return keyPaths(object, maps: ["phases": "{phase}", "figures": "{figure}", "outcomes": "{outcome}", "methods": "{cost}"])
}

@Suite("Docs/json.md lists every key")
struct JSONDocTests {
    @Test("livelock, overhead and numa: every key path their results encode has a row in Docs/json.md")
    func everyKeyDocumented() throws {
        let doc = try jsonDoc()
        var config = OverheadConfiguration()
        config.bytes = 8 << 20
        let run = OverheadHarness.summarize([:], config: config, wallOn: 0)
        let variant = NUMAVariantResult(algorithm: "batched", mode: "sync", copier: "single", copyThreads: 1, deferredFlush: false,
                                        pageSize: PageGeometry.pageSize, pagesMigrated: 512, pagesPerSecond: 1000, ipisPerPage: 0.01,
                                        flushes: 1, flushWaitMicros: 1, copyMicros: 1, readerLatencyP50Nanos: 0,
                                        readerLatencyP99Nanos: 0, readerAccesses: 0, staleEntryDiagnostics: 0,
                                        checksStaleTLBEntries: false, deferredFlushes: 0, lockWaitP99Nanos: 0, unmapMicros: 1,
                                        flushMicros: 1, remapMicros: 1, ipisSent: 5, seconds: 0.5, dataIntact: true)
        let batch = NUMABatchPoint(batchPages: 32, totalMillis: 2, firstFolioMicros: 50, pagesPerSecond: 4000)
        let copy = NUMACopyPoint(folioBytes: PageGeometry.pmdSize, folios: 1, ringBytes: 8 << 20, singleMicros: 40,
                                 multiMicros: 25, threads: 2, speedup: 1.6)
        let reports: [(command: String, paths: Set<String>)] = [
            ("livelock", try resultPaths(try stormResult(livelocked: true))),
            ("overhead", try resultPaths(OverheadCommand.Runs(runs: [run]))),
            ("numa", try resultPaths(NumaCommand.Results(variants: [variant], batchSweep: [batch], copySweep: [copy]))),
        ]
        for (command, paths) in reports {
            #expect(!paths.isEmpty)
            for path in paths.sorted() {
                #expect(doc.contains("| `\(path)` |"), "Docs/json.md: no row for \(command)'s `\(path)`")
            }
        }
    }
}
