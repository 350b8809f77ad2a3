// Writers for the overhead breakdown: a text table, a stacked-bar SVG chart,
// and a Chrome / Perfetto trace-event JSON timeline. No dependencies.
import Foundation
import MirrorDriver
import SVMEmu

/// The overhead breakdown as a table, a one-line-per-run summary, an SVG
/// chart (``Chart``) and a Chrome / Perfetto trace.
public enum OverheadReport {

    static func granularityLabel(_ g: String) -> String { g == "2m" ? "2 MiB" : g == "4k" ? "4 KiB" : g }
    /// The granularity, with the pages per fault when a fault moves more than one page.
    static func granularityLabel(_ r: OverheadResult) -> String {
        r.faultPages > 1 ? "4Kx\(r.faultPages)" : granularityLabel(r.granularity)
    }
    /// A share as "25.0%"; "-" when it was not measured (nil).
    static func pct(_ v: Double?) -> String { Cell.percent(v) }

    /// The copy yardsticks were measured (not in virtual time, where a
    /// deterministic run has no host memcpy to compare with).
    static func yardsticksMeasured(_ r: OverheadResult) -> Bool { r.memcpyGBps > 0 || r.streamCopyGBps > 0 }

    /// The timers' estimated cost, or nil when not estimated: virtual time
    /// charges nothing for them, and a run that did not measure the timers'
    /// cost (`svmemu demo`: no timers-off rounds) has no estimate either.
    static func estimate(_ r: OverheadResult) -> Double? {
        let estimated = r.deterministic != true && r.wallSecondsTimersOff > 0
        return r.instrumentationEstimatePercent == 0 && !estimated ? nil : r.instrumentationEstimatePercent / 100
    }

    // MARK: table

    /// The breakdown of one run as a readable table.
    public static func table(_ r: OverheadResult) -> String {
        let dir = OverheadDirection(rawValue: r.direction)?.label ?? r.direction
        let model = r.copyModel + (r.copyThreads > 1 ? " x\(r.copyThreads) threads" : "")
        let shape = r.faultPages > 1 ? ", \(r.faultPages) pages per fault" : ""
        let driver = r.driver == HarnessDriver.gpusvm.rawValue
            ? "the Xe-like driver on GPU SVM (\(r.faultPages > 1 ? "\(r.faultPages * 4) KiB" : granularityLabel(r.granularity)) ranges), " : ""
        var out = "\(r.direction) (\(dir)), \(driver)\(granularityLabel(r.granularity)) migration\(shape), copy model \(model)"
            + (r.deterministic == true ? " (virtual time)" : "") + "\n"
        out += "  \(r.faults) faults over \(r.bytes >> 20) MiB\n\n"
        var t = Table(["PHASE", "µs/fault", "share", "calls/fault"], indent: "  ", separator: "   ")
        func calls(_ f: OverheadPhaseFigure) -> String { r.faults > 0 ? Cell.fixed(Double(f.count) / Double(r.faults), 2) : "-" }
        for name in OverheadResult.phaseOrder {
            guard let f = r.phases[name] else { continue }
            t.add([name, Cell.fixed(f.microsPerFault, 3), pct(f.fraction), name == "other" ? "-" : calls(f)])
        }
        let flush = r.phases[MigrationPhase.tlbFlush.name].flatMap { $0.count > 0 ? $0 : nil }
        if let f = flush { t.add(["  (tlbFlush)", Cell.fixed(f.microsPerFault, 3), pct(f.fraction), calls(f)]) }
        t.add(["fault (whole)", Cell.fixed(r.faultMicrosMean, 3), pct(1), ""])
        out += t.text + "\n"
        out += "  migrate_vma fraction (collect+unmap+pages+finalize): " + pct(r.migrateVMAFraction) + "\n"
        out += "  copy fraction:                                        " + pct(r.copyFraction) + "\n"
        if flush != nil {
            out += "  (tlbFlush): TLB shootdowns to \(r.busyCPUs) other CPU\(r.busyCPUs == 1 ? "" : "s"), inside collect/unmap, not added\n"
        }
        let bestCopy = max(r.memcpyGBps, r.streamCopyGBps)
        out += "  mean fault \(Cell.fixed(r.faultMicrosMean, 2)) µs; throughput \(Cell.fixed(r.throughputGBps, 2)) GB/s"
        out += yardsticksMeasured(r)
            ? " (same chunks: memcpy \(Cell.fixed(r.memcpyGBps, 2)) GB/s, streaming copy \(Cell.fixed(r.streamCopyGBps, 2)) GB/s; "
                + "\(Cell.fixed(r.throughputGBps / bestCopy, 2))x the faster)\n"
            : " (memcpy and streaming copy: -, not measured in virtual time)\n"
        out += "  setup calls per MiB \(Cell.fixed(r.setupCallsPerMiB, 1)), finalize calls per MiB \(Cell.fixed(r.finalizeCallsPerMiB, 1))\n"
        if r.wallSecondsTimersOff > 0 {
            out += String(format: "  instrumentation cost %+.1f%% measured (median of chunk pairs; %.3f s timed vs %.3f s untimed), ",
                          r.instrumentationOverheadPercent, r.wallSecondsTimersOn, r.wallSecondsTimersOff) + pct(estimate(r)) + " estimated\n"
        } else if let e = estimate(r) {
            out += "  instrumentation cost \(pct(e)) estimated (cost runs not made)\n"
        } else {
            out += "  instrumentation cost: - (virtual time charges the timers nothing; cost runs not made)\n"
        }
        out += "  bytes verified: " + (r.verified ? "yes" : "NO: DATA CORRUPTION") + "\n"
        if let line = traceLine(r) { out += "  " + line + "\n" }
        return out
    }

    /// What the trace of a run kept and dropped, or nil without a trace.
    public static func traceLine(_ r: OverheadResult) -> String? {
        guard let kept = r.traceEvents, let dropped = r.traceEventsDropped else { return nil }
        let faults = r.traceFaults ?? 0
        guard dropped > 0 else { return "trace: all \(kept) events (\(faults) faults)" }
        return "trace: \(kept) events kept (the first \(faults) of \(r.faults) faults), \(dropped) events DROPPED "
            + "(the trace keeps \(r.traceEventsPerCPU ?? 0) events per CPU)"
    }

    /// One line per run, for comparing several; "-" for a timer or a
    /// yardstick that was not measured.
    public static func summary(_ results: [OverheadResult]) -> String {
        // A DRIVER column when the runs are not all MirrorDevice's.
        let drivers = results.contains { $0.driver != HarnessDriver.mirror.rawValue }
        var t = Table((drivers ? ["DRIVER"] : []) + ["DIRECTION", "GRAN", "COPY MODEL", "FAULTS", "µs/fault", "migrate_vma",
                                                      "copy", "other", "GB/s", "timers: meas.", "est."],
                      align: (drivers ? [.left] : []) + [.left, .left, .left, .right], indent: "  ")
        for r in results {
            t.add((drivers ? [r.driver] : []) + [
                r.direction, granularityLabel(r), r.copyModel + (r.copyThreads > 1 ? "x\(r.copyThreads)" : ""), "\(r.faults)",
                Cell.fixed(r.faultMicrosMean, 2), pct(r.migrateVMAFraction), pct(r.copyFraction), pct(r.phases["other"]?.fraction),
                Cell.fixed(r.throughputGBps, 2),
                r.wallSecondsTimersOff > 0 ? String(format: "%+.1f%%", r.instrumentationOverheadPercent) : "-", pct(estimate(r)),
            ])
        }
        return t.text
    }

    // MARK: SVG

    /// Colours of the phases (Tableau 10).
    public static let phaseColors: [String: String] = [
        "collect": "#4e79a7", "unmap": "#f28e2b", "allocate": "#e15759", "copy": "#76b7b2",
        "pages": "#59a14f", "pageTableUpdate": "#edc948", "finalize": "#b07aa1", "other": "#bab0ac",
    ]

    /// Two panels of stacked bars, one bar per run (grouped by direction and
    /// copy model, 4 KiB before 2 MiB): each phase's share of the fault in
    /// percent, and the time per MiB migrated in µs (so 4 KiB and 2 MiB
    /// compare per byte), with
    /// the phases' legend. Deterministic runs say "virtual time".
    public static func svg(_ input: [OverheadResult]) -> String {
        let modelRank = Dictionary(uniqueKeysWithValues: OverheadCopyModel.allCases.enumerated().map { ($1.rawValue, $0) })
        func key(_ r: OverheadResult) -> (String, Int, Int, Int) {
            (r.direction, modelRank[r.copyModel] ?? 99, r.copyThreads, r.granularity == "4k" ? 0 : 1)
        }
        let results = input.sorted { key($0) < key($1) }
        func label(_ r: OverheadResult) -> String {
            "\(r.direction) \(granularityLabel(r)) \(r.copyModel)\(r.copyThreads > 1 ? "x\(r.copyThreads)" : "")"
                + " (\(Cell.fixed(r.faultMicrosMean, 1)) µs/fault)"
        }
        func newGroup(_ i: Int) -> Bool {
            i > 0 && (results[i].direction != results[i - 1].direction || results[i].copyModel != results[i - 1].copyModel)
        }
        func microsPerMiB(_ r: OverheadResult, _ name: String) -> Double {
            guard let f = r.phases[name], r.bytes > 0 else { return 0 }
            return f.seconds * 1e6 / (Double(r.bytes) / Double(ByteSize.mib))
        }
        let shares = results.enumerated().map { i, r in
            ChartBar(label(r), segments: OverheadResult.phaseOrder.map { name in
                let f = (r.phases[name]?.fraction ?? 0) * 100
                return ChartSegment(name, f, color: phaseColors[name] ?? "#999999", inside: Cell.fixed(f, 0) + "%")
            }, figure: "", groupStart: newGroup(i))
        }
        let perMiB = results.enumerated().map { i, r in
            ChartBar(label(r), segments: OverheadResult.phaseOrder.map { name in
                ChartSegment(name, microsPerMiB(r, name), color: phaseColors[name] ?? "#999999")
            }, groupStart: newGroup(i))
        }
        let bytes = Set(results.map(\.bytes)).sorted().map(Chart.size).joined(separator: ", ")
        let drivers = Set(results.map(\.driver)).sorted().joined(separator: ", ")
        let virtual = results.contains { $0.deterministic == true }
        var chart = Chart(
            title: "svmemu overhead: where a fault's time goes (\(bytes) migrated per run, \(drivers) driver)",
            subtitle: Chart.timeBase(virtual: virtual, detail: "migrate_vma phases at 4 KiB and 2 MiB, per copy model"))
        chart.panels = [
            ChartPanel("Share of the fault", unit: "% of the mean fault time", scale: .linear, maximum: 100,
                       bars: shares, format: { Cell.fixed($0, 1) + "%" }),
            ChartPanel("Time per MiB migrated", unit: "µs per MiB", bars: perMiB, format: { Chart.number($0) + " µs" }),
        ]
        chart.legend = OverheadResult.phaseOrder.map { ($0, phaseColors[$0] ?? "#999999") }
        chart.notes = ["migrate_vma = collect + unmap + pages + finalize; other = fault time outside the timed phases (locks, lookups, bookkeeping)"]
        return chart.svg()
    }

    // MARK: trace

    /// A Chrome trace-event JSON timeline (opens in ui.perfetto.dev and
    /// chrome://tracing): one process per run (named after it), one thread per
    /// emulated CPU, a complete ("X") event per fault and per phase inside it,
    /// times in microseconds with three decimals, from whole nanoseconds
    /// (`OverheadTraceEvent.wholeNanos`: a phase's ts + dur is the next
    /// phase's ts exactly).
    public static func traceJSON(_ results: [OverheadResult]) -> String {
        traceJSON(processes: results.map { r in (name: "\(r.direction) \(granularityLabel(r)) \(r.copyModel)", events: r.trace) })
    }

    /// A Chrome/Perfetto trace-event file of several runs: each run a
    /// process named `name`, each CPU a thread, each event a complete ("X")
    /// slice; nested phases nest by time.
    public static func traceJSON(processes: [(name: String, events: [OverheadTraceEvent])]) -> String {
        var out = "{\"displayTimeUnit\":\"ns\",\"traceEvents\":[\n"
        var first = true
        func emit(_ line: String) {
            out += (first ? "" : ",\n") + line
            first = false
        }
        for (index, r) in processes.enumerated() {
            let pid = index + 1
            let name = r.name
            emit("{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":\(pid),\"tid\":0,\"args\":{\"name\":\"\(jsonEscape(name))\"}}")
            emit("{\"name\":\"process_sort_index\",\"ph\":\"M\",\"pid\":\(pid),\"tid\":0,\"args\":{\"sort_index\":\(pid)}}")
            for cpu in Set(r.events.map(\.cpu)).sorted() {
                emit("{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":\(pid),\"tid\":\(cpu),\"args\":{\"name\":\"cpu \(cpu)\"}}")
            }
            // Parents before children: by start, then longest first.
            let events = r.events.map { ($0, $0.wholeNanos) }.sorted {
                ($0.1.start, -$0.1.duration) < ($1.1.start, -$1.1.duration)
            }
            for (e, ns) in events {
                let cat = e.name == "fault" ? "fault" : "phase"
                emit("{\"name\":\"\(jsonEscape(e.name))\",\"cat\":\"\(cat)\",\"ph\":\"X\",\"ts\":\(micros(ns.start)),"
                     + "\"dur\":\(micros(ns.duration)),\"pid\":\(pid),\"tid\":\(e.cpu)}")
            }
        }
        out += "\n]}\n"
        return out
    }

    /// Whole nanoseconds as microseconds with three decimals ("1234.005"),
    /// exactly (no floating-point rounding).
    static func micros(_ nanos: Int64) -> String {
        let fraction = String(nanos % 1000)
        return "\(nanos / 1000)." + String(repeating: "0", count: 3 - fraction.count) + fraction
    }

    static func jsonEscape(_ s: String) -> String {
        var out = ""
        for c in s.unicodeScalars {
            switch c {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            default:
                if c.value < 0x20 { out += String(format: "\\u%04x", c.value) } else { out.unicodeScalars.append(c) }
            }
        }
        return out
    }
}
