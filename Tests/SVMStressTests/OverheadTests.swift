import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import MirrorDriver
import SVMEmu
@testable import SVMStress
import Testing

/// Small runs of the overhead harness (8 MiB, one round), shared by the tests.
private func overheadRun(_ direction: OverheadDirection, _ granularity: MigrationGranularity,
                         model: OverheadCopyModel = .memcpy, trace: Bool = false,
                         traceEventsPerCPU: Int = 1 << 12,
                         bytes: Int = 8 << 20) throws -> OverheadResult {
    var c = OverheadConfiguration()
    c.bytes = bytes
    c.measureInstrumentationCost = false
    c.direction = direction
    c.granularity = granularity
    c.copyModel = model
    c.rounds = 1
    c.traceEventsPerCPU = trace ? traceEventsPerCPU : 0
    return try OverheadHarness.run(c)
}

@Suite("Overhead breakdown")
struct OverheadTests {

    @Test("2 MiB GPU faults at 4 KiB granularity (Xe's shape): one migrate_vma call of 512 pages per fault")
    func xeShapedFaults() throws {
        var c = OverheadConfiguration()
        c.bytes = 8 << 20
        c.measureInstrumentationCost = false
        c.rounds = 1
        c.faultPages = PageGeometry.pmdPages
        let r = try OverheadHarness.run(c)
        #expect(r.verified)
        #expect(r.faultPages == PageGeometry.pmdPages)
        #expect(r.faults == 4, "8 MiB in 2 MiB faults")
        #expect(r.phases["collect"]?.count == 4 && r.phases["finalize"]?.count == 4)
        #expect(r.setupCallsPerMiB == 0.5)
        #expect(r.jsonString().contains("\"faultPages\":\(PageGeometry.pmdPages)"))
        #expect(r.memcpyGBps > 0 && r.streamCopyGBps > 0, "both yardsticks measured")
        #expect(OverheadReport.table(r).contains("streaming copy"))
        #expect(OverheadReport.summary([r]).contains("4Kx512"))
    }

    @Test("through the Xe-like driver on GPU SVM: one GPU fault per range (4 KiB, 2 MiB, 2 MiB of 4 KiB pages), one CPU fault per range back, every byte verified",
          arguments: [(MigrationGranularity.base4K, 1), (.huge2M, 1), (.base4K, PageGeometry.pmdPages)])
    func throughGPUSVM(granularity: MigrationGranularity, faultPages: Int) throws {
        for direction in OverheadDirection.allCases where faultPages == 1 || direction == .toDevice {
            var c = OverheadConfiguration()
            c.driver = .gpusvm
            c.bytes = 4 << 20
            c.measureInstrumentationCost = false
            c.rounds = 1
            c.granularity = granularity
            c.direction = direction
            c.faultPages = faultPages
            let r = try OverheadHarness.run(c)
            let rangeBytes = granularity == .huge2M ? PageGeometry.pmdSize : faultPages * PageGeometry.pageSize
            #expect(r.verified)
            #expect(r.driver == "gpusvm")
            #expect(r.faults == c.bytes / rangeBytes, "\(direction) \(granularity) x\(faultPages): one fault per range")
            // Each fault is one migrate_vma call of its range.
            #expect(r.phases["collect"]?.count == UInt64(r.faults) && r.phases["finalize"]?.count == UInt64(r.faults))
            #expect((r.phases["copy"]?.seconds ?? 0) > 0)
            #expect(r.jsonString().contains("\"driver\":\"gpusvm\""))
            #expect(OverheadReport.table(r).contains("Xe-like driver"))
            #expect(OverheadReport.summary([r]).contains("DRIVER"))
        }
    }

    @Test("with a busy CPU reading the address space, every collect flush sends it an IPI: the tlbFlush phase counts them, inside collect")
    func busyCPUShootdowns() throws {
        var c = OverheadConfiguration()
        c.bytes = 2 << 20
        c.measureInstrumentationCost = false
        c.rounds = 1
        c.busyCPUs = 1
        let r = try OverheadHarness.run(c)
        #expect(r.verified)
        #expect(r.busyCPUs == 1)
        let flush = try #require(r.phases["tlbFlush"])
        // One flush per collect walk (one page per GPU fault here).
        #expect(flush.count == UInt64(r.faults))
        #expect(flush.seconds <= (r.phases["collect"]?.seconds ?? 0) + (r.phases["unmap"]?.seconds ?? 0))
        #expect(r.jsonString().contains("\"busyCPUs\":1"))
        #expect(OverheadReport.table(r).contains("(tlbFlush)"))
    }

    @Test("pages per fault must be a power of two up to 512, and only for 4 KiB GPU faults")
    func faultPagesChecked() throws {
        for (pages, granularity, direction) in [(3, MigrationGranularity.base4K, OverheadDirection.toDevice),
                                                (1024, .base4K, .toDevice), (PageGeometry.pmdPages, .huge2M, .toDevice), (PageGeometry.pmdPages, .base4K, .toRAM)] {
            var c = OverheadConfiguration()
            c.bytes = PageGeometry.pmdSize
            c.faultPages = pages
            c.granularity = granularity
            c.direction = direction
            #expect(throws: OverheadError.self) { try OverheadHarness.run(c) }
        }
    }


    @Test("phases add up to the fault time within tolerance", arguments: OverheadDirection.allCases)
    func phasesAddUp(_ direction: OverheadDirection) throws {
        let r = try overheadRun(direction, .base4K)
        #expect(r.faults == (8 << 20) >> PageGeometry.pageShift, "one fault per 4 KiB page")
        #expect(r.verified)
        let fault = try #require(r.phases["fault"])
        #expect(fault.seconds > 0)
        // The timed phases nest inside the fault: they cannot exceed it (1% for rounding).
        let timed = OverheadResult.phaseOrder.filter { $0 != "other" }.reduce(0.0) { $0 + (r.phases[$1]?.seconds ?? 0) }
        #expect(timed <= fault.seconds * 1.01)
        // ...and they are most of it: what is left ("other") is locks and bookkeeping.
        #expect(timed >= fault.seconds * 0.5, "timed phases \(timed) s of a fault total \(fault.seconds) s")
        // With `other`, the shares sum to 1.
        let shares = OverheadResult.phaseOrder.reduce(0.0) { $0 + (r.phases[$1]?.fraction ?? 0) }
        #expect(abs(shares - 1) < 1e-6)
        #expect(abs(r.migrateVMAFraction - ["collect", "unmap", "pages", "finalize"].reduce(0.0) { $0 + r.phases[$1]!.fraction }) < 1e-9)
        #expect(abs(r.faultMicrosMean - fault.seconds * 1e6 / Double(r.faults)) < 1e-6)
        // The faults happen inside the timed loop.
        #expect(fault.seconds <= r.wallSeconds)
        // One setup and one finalize per 4 KiB fault.
        #expect(r.phases["collect"]?.count == UInt64(r.faults))
        #expect(r.phases["finalize"]?.count == UInt64(r.faults))
    }

    @Test("2 MiB faults do fewer setup and finalize calls per byte than 4 KiB", arguments: OverheadDirection.allCases)
    func hugeFaultsCallLess(_ direction: OverheadDirection) throws {
        let small = try overheadRun(direction, .base4K, bytes: 4 << 20)
        let huge = try overheadRun(direction, .huge2M, bytes: 4 << 20)
        #expect(small.setupCallsPerMiB == 256)
        #expect(small.finalizeCallsPerMiB == 256)
        #expect(huge.faults == 2, "one fault per 2 MiB folio")
        #expect(huge.setupCallsPerMiB < small.setupCallsPerMiB / 100)
        #expect(huge.finalizeCallsPerMiB < small.finalizeCallsPerMiB / 100)
        #expect(huge.verified && small.verified)
    }

    @Test("the JSON object has every field")
    func jsonHasEveryField() throws {
        let r = try overheadRun(.toRAM, .base4K, model: .pcie5)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(r.jsonString().utf8)) as? [String: Any])
        for key in ["granularity", "direction", "copyModel", "bytes", "faults", "phases", "migrateVMAFraction",
                    "copyFraction", "faultMicrosMean", "throughputGBps", "instrumentationOverheadPercent"] {
            #expect(object[key] != nil, "missing \(key)")
        }
        #expect(object["granularity"] as? String == "4k")
        #expect(object["direction"] as? String == "to-ram")
        #expect(object["copyModel"] as? String == "pcie5")
        #expect(object["bytes"] as? Int == 8 << 20)
        #expect(object["faults"] as? Int == 2048)
        let phases = try #require(object["phases"] as? [String: [String: Any]])
        for name in OverheadResult.phaseOrder + ["fault"] {
            let p = try #require(phases[name], "missing phase \(name)")
            #expect(p["seconds"] is Double || p["seconds"] is Int, "\(name).seconds")
            #expect(p["fraction"] is Double || p["fraction"] is Int, "\(name).fraction")
        }
        #expect(object["driver"] as? String == "mirror")
        // It decodes back.
        let back = try JSONDecoder().decode(OverheadResult.self, from: Data(r.jsonString().utf8))
        #expect(back.faults == r.faults && back.phases == r.phases)
    }

    @Test("the SVG chart is well-formed XML with a bar per run and a legend")
    func svgParses() throws {
        let results = [try overheadRun(.toDevice, .base4K), try overheadRun(.toDevice, .huge2M)]
        let svg = OverheadReport.svg(results)
        let collector = SVGCollector()
        let parser = XMLParser(data: Data(svg.utf8))
        parser.delegate = collector
        #expect(parser.parse(), "XMLParser: \(String(describing: parser.parserError))")
        #expect(collector.root == "svg")
        #expect(collector.texts.contains { $0.contains("4 KiB") })
        #expect(collector.texts.contains { $0.contains("2 MiB") })
        for name in OverheadResult.phaseOrder { #expect(collector.texts.contains(name), "legend lacks \(name)") }
        // Legend squares plus at least one segment per run.
        #expect(collector.rects >= OverheadResult.phaseOrder.count + 1 + results.count)
    }

    @Test("the trace is Chrome trace-event JSON with faults and nested phases per thread")
    func traceParses() throws {
        let r = try overheadRun(.toDevice, .base4K, trace: true)
        #expect(!r.trace.isEmpty)
        let json = OverheadReport.traceJSON([r])
        let object = try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])
        let events = try #require(object["traceEvents"] as? [[String: Any]])
        let complete = events.filter { $0["ph"] as? String == "X" }
        let faults = complete.filter { $0["name"] as? String == "fault" }
        #expect(!faults.isEmpty)
        #expect(complete.contains { $0["name"] as? String == "collect" })
        #expect(complete.contains { $0["name"] as? String == "copy" })
        #expect(events.contains { $0["ph"] as? String == "M" && $0["name"] as? String == "process_name" })
        for e in complete {
            #expect(e["ts"] is Double || e["ts"] is Int)
            #expect(e["dur"] is Double || e["dur"] is Int)
            #expect(e["pid"] as? Int == 1)
            #expect(e["tid"] is Int)
        }
        // Every phase lies inside a fault on the same thread.
        let byThread = Dictionary(grouping: faults) { $0["tid"] as! Int }
        func num(_ v: Any?) -> Double { (v as? Double) ?? Double(v as? Int ?? 0) }
        for e in complete.prefix(2000) where e["name"] as? String != "fault" {
            let ts = num(e["ts"]), end = ts + num(e["dur"])
            let inside = (byThread[e["tid"] as! Int] ?? []).contains { f in
                num(f["ts"]) <= ts + 0.002 && end <= num(f["ts"]) + num(f["dur"]) + 0.002
            }
            #expect(inside, "phase \(e["name"] ?? "?") at \(ts) us outside every fault")
        }
    }

    @Test("trace ts and dur come from whole nanoseconds of the same clock reads: a phase ends where the next begins")
    func traceTimesShareNanoseconds() throws {
        // Ends with fractions that rounded apart when ts and dur were rounded
        // separately: collect was written as ts 0.001 dur 1.000 (ending at
        // 1.001) and unmap as ts 1.000, a 1 ns overlap.
        var r = OverheadHarness.summarize([:], config: OverheadConfiguration(), wallOn: 0)
        r.trace = [OverheadTraceEvent(name: "fault", cpu: 0, startNanos: 0.6, endNanos: 2000.2),
                   OverheadTraceEvent(name: "collect", cpu: 0, startNanos: 0.6, endNanos: 1000.4),
                   OverheadTraceEvent(name: "unmap", cpu: 0, startNanos: 1000.4, endNanos: 2000.2)]
        let events = try completeEvents(OverheadReport.traceJSON([r]))
        let collect = try #require(events.first { $0.name == "collect" })
        let unmap = try #require(events.first { $0.name == "unmap" })
        #expect(collect.ts == 1 && collect.dur == 999, "in ns: \(collect)")
        #expect(collect.ts + collect.dur == unmap.ts)
        #expect(OverheadTraceEvent(name: "x", cpu: 0, startNanos: 5.4, endNanos: 5.4).wholeNanos == (5, 0))
    }

    @Test("in a real trace, events on a thread nest or follow one another, never overlap partly")
    func traceEventsNeverOverlap() throws {
        let r = try overheadRun(.toRAM, .base4K, trace: true, bytes: PageGeometry.pmdSize)
        let events = try completeEvents(OverheadReport.traceJSON([r]))
        #expect(events.count == r.trace.count)
        for (_, onThread) in Dictionary(grouping: events, by: \.tid) {
            // Sorted as the file is (by start, longest first): each event
            // either lies inside the open ones or starts after they end.
            var open: [TraceSpan] = []
            for e in onThread.sorted(by: { ($0.ts, -$0.dur) < ($1.ts, -$1.dur) }) {
                while let last = open.last, last.ts + last.dur <= e.ts { open.removeLast() }
                if let parent = open.last {
                    #expect(e.ts + e.dur <= parent.ts + parent.dur, "\(e) overlaps \(parent) partly")
                }
                open.append(e)
            }
        }
    }

    @Test("a trace that runs out of room says how many events it dropped, in the table and the JSON")
    func traceCountsDroppedEvents() throws {
        // 2 MiB at 4 KiB: 512 faults of 8 events each, into room for 64 events.
        let small = try overheadRun(.toRAM, .base4K, trace: true, traceEventsPerCPU: 64, bytes: PageGeometry.pmdSize)
        let recorded = MigrationPhase.allCases.reduce(0) { $0 + Int(small.phases[$1.name]?.count ?? 0) }
        #expect(small.traceEvents == small.trace.count)
        #expect(small.trace.count <= 64 * 64, "at most the room of every CPU slot")
        #expect(small.traceEventsDropped == recorded - small.trace.count)
        #expect((small.traceEventsDropped ?? 0) > 0)
        #expect(small.traceFaults == small.trace.filter { $0.name == "fault" }.count)
        #expect(small.traceEventsPerCPU == 64)
        #expect(OverheadReport.table(small).contains("events DROPPED"))
        let object = try #require(try JSONSerialization.jsonObject(with: Data(small.jsonString().utf8)) as? [String: Any])
        #expect(object["traceEventsDropped"] as? Int == small.traceEventsDropped)
        #expect(object["traceEvents"] as? Int == small.trace.count)

        let roomy = try overheadRun(.toRAM, .base4K, trace: true, traceEventsPerCPU: 1 << 13, bytes: PageGeometry.pmdSize)
        #expect(roomy.traceEventsDropped == 0)
        #expect(roomy.traceFaults == roomy.faults)
        #expect(OverheadReport.table(roomy).contains("trace: all \(roomy.trace.count) events"))

        let untraced = try overheadRun(.toRAM, .base4K, bytes: PageGeometry.pmdSize)
        #expect(untraced.traceEventsDropped == nil)
        #expect(!untraced.jsonString().contains("traceEvents"), "no trace keys without a trace")
    }

    @Test("the link engine copies the bytes and charges at least the link's time")
    func linkEngineCharges() throws {
        let size = PageGeometry.pmdSize
        let src = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: PageGeometry.pageSize)
        let dst = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: PageGeometry.pageSize)
        defer { src.deallocate(); dst.deallocate() }
        for i in 0..<size { src.storeBytes(of: UInt8(truncatingIfNeeded: i &* 7 &+ i >> PageGeometry.pageShift), toByteOffset: i, as: UInt8.self) }

        // PCIe 4: 64 copies of 4 KiB take at least 64 x 0.94 us.
        let pcie4 = LinkCopyEngine(model: .pcie4)
        #expect(pcie4.name == "pcie4")
        let per4K = LinkModel.pcie4.transferNanos(bytes: PageGeometry.pageSize)
        #expect(per4K > 900 && per4K < 1000, "UVMSmart curve, a = 24: \(per4K) ns for 4 KiB")
        memset(dst, 0, size)
        var t0 = HostClock.nanos()
        for i in 0..<64 { pcie4.copy(to: dst + i * PageGeometry.pageSize, from: src + i * PageGeometry.pageSize, bytes: PageGeometry.pageSize) }
        pcie4.wait()
        var elapsed = Double(HostClock.nanos() - t0)
        #expect(elapsed >= 64 * per4K, "\(elapsed) ns for 64 x 4 KiB")
        #expect(memcmp(dst, src, 64 * PageGeometry.pageSize) == 0)

        // PCIe 3 anchors: 4 KiB in 1.9 us, 2 MiB in 176 us.
        #expect(abs(LinkModel.pcie3.transferNanos(bytes: PageGeometry.pageSize) - 1_890) < 50)
        #expect(abs(LinkModel.pcie3.transferNanos(bytes: PageGeometry.pmdSize) - 175_500) < 1_500)

        // Asynchronous: a slow link returns from copy at once; wait() ends at the modelled completion.
        // Slow enough (about 40 ms for 2 MiB) that a preempted test thread
        // cannot make copy() look synchronous.
        let slow = LinkModel(name: "slow", peakGBps: 0.05)
        let engine = LinkCopyEngine(model: slow, threads: 2)
        #expect(engine.name == "slowx2")
        memset(dst, 0, size)
        t0 = HostClock.nanos()
        engine.copy(to: dst, from: src, bytes: size)
        let issued = Double(HostClock.nanos() - t0)
        engine.wait()
        elapsed = Double(HostClock.nanos() - t0)
        let modelled = slow.transferNanos(bytes: size)
        #expect(issued < modelled / 2, "copy() took \(issued) ns of a \(modelled) ns transfer")
        // wait() never ends before the modelled completion; how late it ends
        // is the host scheduler's business (benchmarked, not tested).
        #expect(elapsed >= modelled)
        #expect(memcmp(dst, src, size) == 0, "multi-threaded copy lost bytes")

        // Multi-threaded memcpy without a link: bytes only.
        let mt = LinkCopyEngine(model: nil, threads: 3)
        memset(dst, 0, size)
        mt.copy(to: dst, from: src, bytes: size)
        mt.copy(to: dst, from: src, bytes: 8192)
        mt.wait()
        #expect(memcmp(dst, src, size) == 0)
    }

    @Test("timers off record nothing")
    func timersOffRecordNothing() throws {
        let timer = try PhaseTimer()
        let m = timer.begin()
        #expect(m == 0)
        timer.end(.copy, m)
        timer.isEnabled = true
        timer.measure(.collect) { }
        let totals = timer.totals()
        #expect(totals[.copy]?.count == 0)
        #expect(totals[.collect]?.count == 1)
    }

    @Test("the copy models make the right engines")
    func copyModels() throws {
        #expect(OverheadCopyModel.memcpy.makeEngine() is MemcpyCopyEngine)
        #expect(OverheadCopyModel.pcie4.makeEngine().name == "pcie4")
        #expect(OverheadCopyModel.nvlinkC2C.makeEngine().name == "nvlink-c2c")
        #expect(OverheadCopyModel.memcpy.makeEngine(threads: 4).name == "memcpyx4")
        #expect(OverheadCopyModel.nvlinkC2C.link?.peakGBps == 450)
    }
}

/// Counts what the SVG parse saw.
private final class SVGCollector: NSObject, XMLParserDelegate {
    var root: String?
    var rects = 0
    var texts: [String] = []
    private var current = ""
    private var inText = false
    func parser(_ parser: XMLParser, didStartElement name: String, namespaceURI: String?, qualifiedName: String?,
                attributes: [String: String] = [:]) {
        if root == nil { root = name }
        if name == "rect" { rects += 1 }
        if name == "text" { inText = true; current = "" }
    }
    func parser(_ parser: XMLParser, foundCharacters string: String) { if inText { current += string } }
    func parser(_ parser: XMLParser, didEndElement name: String, namespaceURI: String?, qualifiedName: String?) {
        if name == "text" { texts.append(current); inText = false }
    }
}

/// A complete ("X") trace event with its times in whole nanoseconds.
struct TraceSpan: CustomStringConvertible {
    var name: String
    var tid: Int
    var ts: Int64
    var dur: Int64
    var description: String { "\(name)@\(tid) [\(ts), +\(dur)] ns" }
}

/// The complete events of a trace file; ts and dur (microseconds, three
/// decimals) read back as whole nanoseconds.
func completeEvents(_ json: String) throws -> [TraceSpan] {
    let object = try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])
    let events = try #require(object["traceEvents"] as? [[String: Any]])
    func nanos(_ v: Any?) -> Int64 { Int64((((v as? Double) ?? Double(v as? Int ?? 0)) * 1000).rounded()) }
    return events.filter { $0["ph"] as? String == "X" }.map {
        TraceSpan(name: $0["name"] as? String ?? "", tid: $0["tid"] as? Int ?? -1, ts: nanos($0["ts"]), dur: nanos($0["dur"]))
    }
}
