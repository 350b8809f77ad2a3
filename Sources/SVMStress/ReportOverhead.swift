// Writers for the overhead breakdown: a text table, a stacked-bar SVG chart,
// and a Chrome / Perfetto trace-event JSON timeline. No dependencies.
import Foundation
import MirrorDriver
import SVMEmu

public enum OverheadReport {

    static func granularityLabel(_ g: String) -> String { g == "2m" ? "2 MiB" : g == "4k" ? "4 KiB" : g }
    /// The granularity, with the pages per fault when a fault moves more than one page.
    static func granularityLabel(_ r: OverheadResult) -> String {
        r.faultPages > 1 ? "4Kx\(r.faultPages)" : granularityLabel(r.granularity)
    }
    static func pct(_ v: Double) -> String { String(format: "%5.1f%%", v * 100) }

    // MARK: table

    /// The breakdown of one run as a readable table.
    public static func table(_ r: OverheadResult) -> String {
        let dir = OverheadDirection(rawValue: r.direction)?.label ?? r.direction
        let model = r.copyModel + (r.copyThreads > 1 ? " x\(r.copyThreads) threads" : "")
        let shape = r.faultPages > 1 ? ", \(r.faultPages) pages per fault" : ""
        let driver = r.driver == HarnessDriver.gpusvm.rawValue
            ? "the Xe-like driver on GPU SVM (\(r.faultPages > 1 ? "\(r.faultPages * 4) KiB" : granularityLabel(r.granularity)) ranges), " : ""
        var out = "\(r.direction) (\(dir)), \(driver)\(granularityLabel(r.granularity)) migration\(shape), copy model \(model)\n"
        out += "  \(r.faults) faults over \(r.bytes >> 20) MiB\n\n"
        out += "  PHASE               us/fault     share   calls/fault\n"
        for name in OverheadResult.phaseOrder {
            guard let f = r.phases[name] else { continue }
            let calls = r.faults > 0 && name != "other" ? String(format: "%8.2f", Double(f.count) / Double(r.faults)) : "       -"
            out += "  " + name.padding(toLength: 18, withPad: " ", startingAt: 0)
                + String(format: "%9.3f", f.microsPerFault) + "   " + pct(f.fraction) + "   " + calls + "\n"
        }
        if let f = r.phases[MigrationPhase.tlbFlush.name], f.count > 0 {
            out += "  " + "  (tlbFlush)".padding(toLength: 18, withPad: " ", startingAt: 0)
                + String(format: "%9.3f", f.microsPerFault) + "   " + pct(f.fraction) + "   "
                + String(format: "%8.2f", r.faults > 0 ? Double(f.count) / Double(r.faults) : 0) + "\n"
        }
        out += "  " + "fault (whole)".padding(toLength: 18, withPad: " ", startingAt: 0)
            + String(format: "%9.3f", r.faultMicrosMean) + "   " + pct(1) + "\n\n"
        out += "  migrate_vma fraction (collect+unmap+pages+finalize): " + pct(r.migrateVMAFraction).trimmingCharacters(in: .whitespaces) + "\n"
        out += "  copy fraction:                                        " + pct(r.copyFraction).trimmingCharacters(in: .whitespaces) + "\n"
        if let f = r.phases[MigrationPhase.tlbFlush.name], f.count > 0 {
            out += "  (tlbFlush): TLB shootdowns to \(r.busyCPUs) other CPU\(r.busyCPUs == 1 ? "" : "s"), inside collect/unmap, not added\n"
        }
        let bestCopy = max(r.memcpyGBps, r.streamCopyGBps)
        out += String(format: "  mean fault %.2f us; throughput %.2f GB/s (same chunks: memcpy %.2f GB/s, streaming copy %.2f GB/s; %.2fx the faster)\n",
                      r.faultMicrosMean, r.throughputGBps, r.memcpyGBps, r.streamCopyGBps, bestCopy > 0 ? r.throughputGBps / bestCopy : 0)
        out += String(format: "  setup calls per MiB %.1f, finalize calls per MiB %.1f\n", r.setupCallsPerMiB, r.finalizeCallsPerMiB)
        if r.wallSecondsTimersOff > 0 {
            out += String(format: "  instrumentation cost %+.1f%% measured (median of chunk pairs; %.3f s timed vs %.3f s untimed), %.1f%% estimated\n",
                          r.instrumentationOverheadPercent, r.wallSecondsTimersOn, r.wallSecondsTimersOff, r.instrumentationEstimatePercent)
        } else {
            out += String(format: "  instrumentation cost %.1f%% estimated (cost runs not made)\n", r.instrumentationEstimatePercent)
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

    /// One line per run, for comparing several.
    public static func summary(_ results: [OverheadResult]) -> String {
        // A DRIVER column when the runs are not all MirrorDevice's.
        let drivers = results.contains { $0.driver != HarnessDriver.mirror.rawValue }
        var out = "  " + (drivers ? "DRIVER  " : "")
            + "DIRECTION  GRAN   COPY MODEL    FAULTS   us/fault  migrate_vma   copy    other    GB/s  timers: meas.  est.\n"
        for r in results {
            out += "  " + (drivers ? r.driver.padding(toLength: 8, withPad: " ", startingAt: 0) : "")
                + r.direction.padding(toLength: 10, withPad: " ", startingAt: 0)
                + " " + granularityLabel(r).padding(toLength: 6, withPad: " ", startingAt: 0)
                + " " + (r.copyModel + (r.copyThreads > 1 ? "x\(r.copyThreads)" : "")).padding(toLength: 12, withPad: " ", startingAt: 0)
                + String(format: " %7d %10.2f", r.faults, r.faultMicrosMean)
                + "      " + pct(r.migrateVMAFraction) + "  " + pct(r.copyFraction) + "  " + pct(r.phases["other"]?.fraction ?? 0)
                + String(format: " %7.2f", r.throughputGBps)
                + (r.wallSecondsTimersOff > 0 ? String(format: " %+6.1f%%", r.instrumentationOverheadPercent) : "      - ")
                + String(format: "  %5.1f%%", r.instrumentationEstimatePercent) + "\n"
        }
        return out
    }

    // MARK: SVG

    /// Colours of the phases (Tableau 10).
    public static let phaseColors: [String: String] = [
        "collect": "#4e79a7", "unmap": "#f28e2b", "allocate": "#e15759", "copy": "#76b7b2",
        "pages": "#59a14f", "pageTableUpdate": "#edc948", "finalize": "#b07aa1", "other": "#bab0ac",
    ]

    static func xml(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
            .replacingOccurrences(of: ">", with: "&gt;").replacingOccurrences(of: "\"", with: "&quot;")
    }

    /// A stacked horizontal bar chart, one bar per run (grouped by direction,
    /// copy model, granularity): on the left each phase's share of the fault,
    /// on the right the time per MiB migrated (so 4 KiB and 2 MiB compare per
    /// byte), with a legend. Hand-written SVG 1.1.
    public static func svg(_ input: [OverheadResult]) -> String {
        let modelRank = Dictionary(uniqueKeysWithValues: OverheadCopyModel.allCases.enumerated().map { ($1.rawValue, $0) })
        func key(_ r: OverheadResult) -> (String, Int, Int, Int) {
            (r.direction, modelRank[r.copyModel] ?? 99, r.copyThreads, r.granularity == "4k" ? 0 : 1)
        }
        let results = input.sorted { key($0) < key($1) }
        let labelW = 260.0, barW = 360.0, gap = 60.0, rowH = 26.0, barH = 18.0, top = 70.0
        let leftX = labelW, rightX = labelW + barW + gap
        let width = rightX + barW + 40
        var groupBreaks = 0
        for i in 1..<max(1, results.count) where results[i].direction != results[i - 1].direction || results[i].copyModel != results[i - 1].copyModel {
            groupBreaks += 1
        }
        let plotH = Double(results.count) * rowH + Double(groupBreaks) * 10
        let legendY = top + plotH + 40
        let height = legendY + 50
        func microsPerMiB(_ r: OverheadResult, _ name: String) -> Double {
            guard let f = r.phases[name], r.bytes > 0 else { return 0 }
            return f.seconds * 1e6 / (Double(r.bytes) / Double(ByteSize.mib))
        }
        let maxPerMiB = max(1e-9, results.map { r in OverheadResult.phaseOrder.reduce(0.0) { $0 + microsPerMiB(r, $1) } }.max() ?? 1)
        var s = """
        <?xml version="1.0" encoding="UTF-8"?>
        <svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="\(Int(width))" height="\(Int(height))" viewBox="0 0 \(Int(width)) \(Int(height))" font-family="Helvetica, Arial, sans-serif" font-size="12">
        <title>svmemu overhead: where a fault's time goes</title>
        <rect x="0" y="0" width="\(Int(width))" height="\(Int(height))" fill="#ffffff"/>
        <text x="10" y="22" font-size="16" font-weight="bold">Where a fault's time goes: migrate_vma phases at 4 KiB and 2 MiB</text>
        <text x="\(leftX)" y="\(top - 14)" font-weight="bold">share of the fault</text>
        <text x="\(rightX)" y="\(top - 14)" font-weight="bold">time per MiB migrated (\(String(format: "%.0f", maxPerMiB)) us at full width)</text>

        """
        var y = top
        for (i, r) in results.enumerated() {
            if i > 0 && (r.direction != results[i - 1].direction || r.copyModel != results[i - 1].copyModel) { y += 10 }
            let label = "\(r.direction) \(granularityLabel(r)) \(r.copyModel)\(r.copyThreads > 1 ? "x\(r.copyThreads)" : "")"
                + String(format: " (%.1f us/fault)", r.faultMicrosMean)
            s += "<text x=\"\(labelW - 8)\" y=\"\(y + barH - 5)\" text-anchor=\"end\">\(xml(label))</text>\n"
            var x = leftX
            var x2 = rightX
            for name in OverheadResult.phaseOrder {
                let color = phaseColors[name] ?? "#999999"
                let f = r.phases[name]?.fraction ?? 0
                let w = max(0, f * barW)
                if w > 0 {
                    s += "<rect x=\(q(x)) y=\(q(y)) width=\(q(w)) height=\(q(barH)) fill=\"\(color)\"><title>\(xml(name)): \(String(format: "%.1f%%", f * 100))</title></rect>\n"
                    if w >= 30 {
                        s += "<text x=\(q(x + w / 2)) y=\(q(y + barH - 5)) text-anchor=\"middle\" font-size=\"10\" fill=\"#000000\">\(String(format: "%.0f%%", f * 100))</text>\n"
                    }
                }
                x += w
                let m = microsPerMiB(r, name)
                let w2 = max(0, m / maxPerMiB * barW)
                if w2 > 0 {
                    s += "<rect x=\(q(x2)) y=\(q(y)) width=\(q(w2)) height=\(q(barH)) fill=\"\(color)\"><title>\(xml(name)): \(String(format: "%.1f", m)) us per MiB</title></rect>\n"
                }
                x2 += w2
            }
            let total = OverheadResult.phaseOrder.reduce(0.0) { $0 + microsPerMiB(r, $1) }
            s += "<text x=\(q(x2 + 4)) y=\(q(y + barH - 5)) font-size=\"10\">\(String(format: "%.0f us", total))</text>\n"
            y += rowH
        }
        var lx = 10.0
        for name in OverheadResult.phaseOrder {
            s += "<rect x=\(q(lx)) y=\(q(legendY)) width=\"12\" height=\"12\" fill=\"\(phaseColors[name] ?? "#999999")\"/>"
            s += "<text x=\(q(lx + 16)) y=\(q(legendY + 10))>\(xml(name))</text>\n"
            lx += 16 + Double(name.count) * 7 + 18
        }
        s += "<text x=\"10\" y=\(q(legendY + 32)) font-size=\"10\" fill=\"#555555\">migrate_vma = collect + unmap + pages + finalize; other = fault time outside the timed phases (locks, lookups, bookkeeping)</text>\n"
        s += "</svg>\n"
        return s
    }

    private static func q(_ v: Double) -> String { "\"" + String(format: "%.1f", v) + "\"" }

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
