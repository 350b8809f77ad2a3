// The one SVG chart writer of every report: panels of horizontal bars (plain
// or stacked), each with an axis, ticks and its unit, on a white page with a
// title that says what ran. Hand-written SVG 1.1; no dependencies.
import Foundation
import SVMEmu

/// How a panel maps values to bar lengths.
public enum ChartScale: Sendable, Equatable {
    /// From 0 to a round maximum (ticks at 1, 2 or 5 times a power of ten).
    case linear
    /// Decades (ticks at powers of ten), for values that span them; a value
    /// of 0 or below gets no bar.
    case log
    /// Log when the positive values span two decades or more, else linear
    /// (always linear for stacked bars).
    case auto

    /// The scale `.auto` picks for `values`.
    public static func fitting(_ values: [Double]) -> ChartScale {
        let positive = values.filter { $0 > 0 && $0.isFinite }
        guard let lo = positive.min(), let hi = positive.max(), positive.count == values.count else { return .linear }
        return hi / lo >= 100 ? .log : .linear
    }
}

/// One coloured part of a bar (a phase of a fault); a plain bar has one.
public struct ChartSegment: Sendable {
    /// What the part is (shown when the pointer rests on it).
    public var name: String
    /// Its length, in the panel's unit.
    public var value: Double
    /// A CSS colour ("#4e79a7").
    public var color: String
    /// Text written inside the part when it is wide enough ("24%"), or nil.
    public var inside: String?

    /// A part named `name` of length `value`.
    public init(_ name: String, _ value: Double, color: String = Chart.defaultColor, inside: String? = nil) {
        self.name = name
        self.value = value
        self.color = color
        self.inside = inside
    }
}

/// One bar of a panel: a label on the left, the parts, a figure on the right.
public struct ChartBar: Sendable {
    /// The row's label, left of the axis (never clipped: the chart widens).
    public var label: String
    /// The parts, left to right.
    public var segments: [ChartSegment]
    /// The figure written right of the bar; nil: the panel's format of the
    /// total; "-" for a figure that was not measured.
    public var figure: String?
    /// Leave a gap above this bar (a new group).
    public var groupStart: Bool

    /// A plain bar of length `value`.
    public init(_ label: String, _ value: Double, figure: String? = nil, groupStart: Bool = false) {
        self.init(label, segments: [ChartSegment(label, value)], figure: figure, groupStart: groupStart)
    }

    /// A stacked bar of `segments`.
    public init(_ label: String, segments: [ChartSegment], figure: String? = nil, groupStart: Bool = false) {
        self.label = label
        self.segments = segments
        self.figure = figure
        self.groupStart = groupStart
    }

    /// The bar's length: its parts added.
    public var total: Double { segments.reduce(0) { $0 + max(0, $1.value) } }
}

/// A panel: a title, bars, and an axis below them with ticks and the unit.
public struct ChartPanel: Sendable {
    /// What the panel shows ("Pages migrated per second").
    public var title: String
    /// The axis caption, with the unit ("µs per MiB migrated", "IPIs per page").
    public var unit: String
    /// Linear, log or chosen from the values.
    public var scale: ChartScale
    /// The axis's end, for a fixed range (100 for shares in percent); nil: from the values.
    public var maximum: Double?
    /// A dashed line at this value (1 on a speedup panel), labelled `referenceLabel`.
    public var reference: Double?
    /// The reference line's label ("1.0x: no gain").
    public var referenceLabel: String
    /// The bars, top to bottom.
    public var bars: [ChartBar]
    /// How a bar's figure is written when the bar gives none.
    public var format: @Sendable (Double) -> String

    /// A panel of `bars` over an axis in `unit`.
    public init(_ title: String, unit: String, scale: ChartScale = .auto, maximum: Double? = nil,
                reference: Double? = nil, referenceLabel: String = "", bars: [ChartBar],
                format: @escaping @Sendable (Double) -> String = Chart.number) {
        self.title = title
        self.unit = unit
        self.scale = scale
        self.maximum = maximum
        self.reference = reference
        self.referenceLabel = referenceLabel
        self.bars = bars
        self.format = format
    }

    /// The scale the panel draws with (`.auto` resolved). Stacked bars
    /// stay linear: on a log axis the first part would look the largest.
    public var resolvedScale: ChartScale {
        guard scale == .auto else { return scale }
        return bars.contains { $0.segments.count > 1 } ? .linear : ChartScale.fitting(bars.map(\.total))
    }
}

/// An SVG chart of panels of horizontal bars: `svmemu overhead --svg`,
/// `svmemu numa --svg`. Every chart has a viewBox, an opaque white
/// background, a title that says what ran and a subtitle (host or virtual
/// time), an axis with ticks and the unit under every panel, a log scale
/// where values span decades, and labels that are never clipped (the page
/// widens to the longest label and figure).
public struct Chart: Sendable {
    /// What ran ("svmemu numa: migrate_pages of a 64 MiB buffer").
    public var title: String
    /// How it ran ("host time, release build" or "virtual time (deterministic, seed 3)").
    public var subtitle: String
    /// The panels, top to bottom.
    public var panels: [ChartPanel]
    /// The colours of a stacked chart's parts, left to right: (name, colour).
    public var legend: [(name: String, color: String)]
    /// Lines of small print under the legend.
    public var notes: [String]

    /// A chart titled `title`.
    public init(title: String, subtitle: String = "", panels: [ChartPanel] = [],
                legend: [(name: String, color: String)] = [], notes: [String] = []) {
        self.title = title
        self.subtitle = subtitle
        self.panels = panels
        self.legend = legend
        self.notes = notes
    }

    /// The bar colour of a plain bar.
    public static let defaultColor = "#4e79a7"

    /// A figure written compactly, to three significant digits from 100
    /// up: "1.08M" (1,084,859), "356k" (355,671), "783", "0.0039", "1.06".
    @Sendable public static func number(_ v: Double) -> String {
        guard v.isFinite else { return "-" }
        let a = abs(v)
        if a == 0 { return "0" }
        if a >= 999_500 { return String(format: a >= 99_950_000 ? "%.0fM" : a >= 9_995_000 ? "%.1fM" : "%.2fM", v / 1e6) }
        if a >= 9_999.5 { return String(format: a >= 99_950 ? "%.0fk" : "%.1fk", v / 1e3) }
        if a >= 100 { return String(format: "%.0f", v) }
        if a >= 10 { return String(format: "%.1f", v) }
        if a >= 0.1 { return String(format: "%.2f", v) }
        return String(format: "%.2g", v)
    }

    /// A size for a title: "4 MiB" when whole, else "4.5 MiB".
    public static func size(_ bytes: Int) -> String {
        for (unit, name) in [(ByteSize.gib, "GiB"), (ByteSize.mib, "MiB"), (ByteSize.kib, "KiB")] where bytes >= unit && bytes % unit == 0 {
            return "\(bytes / unit) \(name)"
        }
        return ByteSize.describe(bytes)
    }

    /// "virtual time (deterministic ...)" or "host time" with the build: the
    /// subtitle every chart of a harness run carries.
    public static func timeBase(virtual: Bool, detail: String = "") -> String {
        #if DEBUG
        let build = "debug build: host figures not meaningful"
        #else
        let build = "release build"
        #endif
        let base = virtual ? "virtual time (deterministic: the same seed draws the same chart on any host)" : "host time, \(build)"
        return detail.isEmpty ? base : "\(detail); \(base)"
    }

    // MARK: layout

    /// Widths in pixels, estimated from the character count (DejaVu Sans,
    /// the widest common sans-serif: about 0.62 em a character).
    static func textWidth(_ s: String, size: Double = 12) -> Double { Double(s.count) * size * 0.62 }

    static let margin = 16.0, plotWidth = 480.0, rowHeight = 22.0, barHeight = 16.0, groupGap = 8.0

    /// The chart as an SVG document.
    public func svg() -> String {
        let labelW = (panels.flatMap { $0.bars.map { Self.textWidth($0.label) } }.max() ?? 0) + 12
        let figureW = (panels.flatMap { p in p.bars.map { Self.textWidth($0.figure ?? p.format($0.total)) } }.max() ?? 0) + 12
        let plotX = Self.margin + labelW
        var width = plotX + Self.plotWidth + figureW + Self.margin
        width = max(width, Self.textWidth(title, size: 16) * 1.08 + 2 * Self.margin,
                    Self.textWidth(subtitle, size: 11) + 2 * Self.margin,
                    (notes.map { Self.textWidth($0, size: 10) }.max() ?? 0) + 2 * Self.margin)
        var body = ""
        var y = 30.0
        body += text(Self.margin, y, title, size: 16, bold: true)
        if !subtitle.isEmpty {
            y += 18
            body += text(Self.margin, y, subtitle, size: 11, fill: "#555555")
        }
        y += 16
        for panel in panels {
            y = draw(panel, at: y, plotX: plotX, into: &body)
        }
        if !legend.isEmpty {
            var x = Self.margin
            y += 4
            for entry in legend {
                let w = 16 + Self.textWidth(entry.name) + 18
                if x + w > width - Self.margin { x = Self.margin; y += 20 }
                body += "<rect x=\(q(x)) y=\(q(y)) width=\"12\" height=\"12\" fill=\"\(entry.color)\"/>"
                body += text(x + 16, y + 10, entry.name)
                x += w
            }
            y += 30
        }
        for note in notes {
            body += text(Self.margin, y, note, size: 10, fill: "#555555")
            y += 14
        }
        let height = y + Self.margin
        let w = Int(width.rounded(.up)), h = Int(height.rounded(.up))
        return """
        <?xml version="1.0" encoding="UTF-8"?>
        <svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="\(w)" height="\(h)" viewBox="0 0 \(w) \(h)" \
        font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">
        <title>\(Self.xml(title))</title>
        <rect class="background" x="0" y="0" width="\(w)" height="\(h)" fill="#ffffff"/>

        """ + body + "</svg>\n"
    }

    /// Draws `panel` from `top` down; returns the y below it.
    private func draw(_ panel: ChartPanel, at top: Double, plotX: Double, into s: inout String) -> Double {
        var y = top + 14
        s += text(Self.margin, y, panel.title, size: 13, bold: true)
        y += 10
        let axis = Axis(panel)
        let barsTop = y
        var rows: [(bar: ChartBar, y: Double)] = []
        for (i, bar) in panel.bars.enumerated() {
            if bar.groupStart && i > 0 { y += Self.groupGap }
            rows.append((bar, y))
            y += Self.rowHeight
        }
        let barsBottom = y
        // Grid lines and ticks first, the bars over them.
        for tick in axis.ticks {
            let x = plotX + axis.position(tick) * Self.plotWidth
            s += "<line class=\"grid\" x1=\(q(x)) y1=\(q(barsTop - 2)) x2=\(q(x)) y2=\(q(barsBottom)) stroke=\"#e0e0e0\"/>\n"
            s += "<line class=\"tick\" x1=\(q(x)) y1=\(q(barsBottom)) x2=\(q(x)) y2=\(q(barsBottom + 4)) stroke=\"#333333\"/>"
            s += text(x, barsBottom + 16, axis.label(tick), size: 10, anchor: "middle")
        }
        s += "<line class=\"axis\" x1=\(q(plotX)) y1=\(q(barsBottom)) x2=\(q(plotX + Self.plotWidth)) y2=\(q(barsBottom)) stroke=\"#333333\"/>\n"
        s += text(plotX + Self.plotWidth / 2, barsBottom + 32, panel.unit + (axis.log ? " (log scale)" : ""), size: 11, anchor: "middle")
        // The reference line under the bars, so that figures stay readable.
        if let r = panel.reference, axis.contains(r) {
            let x = plotX + axis.position(r) * Self.plotWidth
            s += "<line class=\"reference\" x1=\(q(x)) y1=\(q(barsTop - 6)) x2=\(q(x)) y2=\(q(barsBottom)) "
                + "stroke=\"#c0392b\" stroke-width=\"1.5\" stroke-dasharray=\"5,3\"/>\n"
            s += text(x + 4, barsTop - 2, panel.referenceLabel, size: 10, fill: "#c0392b")
        }
        for (bar, rowY) in rows {
            s += text(plotX - 8, rowY + Self.barHeight - 4, bar.label, anchor: "end")
            var x = plotX
            var reached = 0.0
            for part in bar.segments where part.value > 0 {
                let from = axis.position(reached), to = axis.position(reached + part.value)
                reached += part.value
                let w = max(0, (to - from) * Self.plotWidth)
                guard w > 0 else { continue }
                s += "<rect class=\"bar\" x=\(q(x)) y=\(q(rowY)) width=\(q(max(w, 1))) height=\(q(Self.barHeight)) fill=\"\(part.color)\">"
                    + "<title>\(Self.xml(part.name)): \(Self.xml(panel.format(part.value)))</title></rect>\n"
                if let inside = part.inside, w >= Self.textWidth(inside, size: 10) + 6 {
                    s += text(x + w / 2, rowY + Self.barHeight - 4, inside, size: 10, anchor: "middle")
                }
                x += w
            }
            s += text(x + 4, rowY + Self.barHeight - 4, bar.figure ?? panel.format(bar.total), size: 11, halo: true)
        }
        return barsBottom + 48
    }

    /// A panel's axis: where a value sits (0...1 of the plot) and the ticks.
    struct Axis {
        let log: Bool
        let low: Double, high: Double
        let ticks: [Double]

        init(_ panel: ChartPanel) {
            let totals = panel.bars.map(\.total) + [panel.reference].compactMap { $0 }
            if panel.resolvedScale == .log, let lo = totals.filter({ $0 > 0 }).min(), let hi = totals.max() {
                log = true
                // The smallest bar gets a length: the axis starts a decade
                // below it when it sits on a power of ten.
                var a = Foundation.pow(10, Foundation.floor(Foundation.log10(lo)))
                if a >= lo * 0.999 { a /= 10 }
                var b = Foundation.pow(10, Foundation.ceil(Foundation.log10(max(panel.maximum ?? hi, hi))))
                if b <= a { b = a * 10 }
                if b / a > 1e12 { a = b / 1e12 }
                low = a
                high = b
                var t: [Double] = []
                var v = a
                while v <= b * 1.0001 { t.append(v); v *= 10 }
                ticks = t
            } else {
                log = false
                low = 0
                let top = max(panel.maximum ?? 0, totals.filter(\.isFinite).max() ?? 0)
                let step = Self.niceStep(top > 0 ? top / 5 : 0.2)
                high = panel.maximum ?? max(step, (top / step).rounded(.up) * step)
                ticks = stride(from: 0, through: high * 1.0001, by: step).map { $0 }
            }
        }

        /// 1, 2 or 5 times a power of ten, at least `raw`.
        static func niceStep(_ raw: Double) -> Double {
            let p = Foundation.pow(10, Foundation.floor(Foundation.log10(raw)))
            for m in [1.0, 2, 5, 10] where m * p >= raw * 0.999 { return m * p }
            return 10 * p
        }

        func contains(_ v: Double) -> Bool { v >= low && v <= high && (!log || v > 0) }

        /// Where `v` sits, from 0 (the axis's start) to 1 (its end).
        func position(_ v: Double) -> Double {
            guard v.isFinite else { return 0 }
            if log {
                guard v > low else { return 0 }
                return min(1, Foundation.log10(v / low) / Foundation.log10(high / low))
            }
            return min(1, max(0, v / high))
        }

        /// A tick's label: 0, 0.001, 2.5, 200, 40k, 1.5M.
        func label(_ v: Double) -> String {
            func trim(_ s: String) -> String {
                guard s.contains(".") else { return s }
                var s = s
                while s.last == "0" { s.removeLast() }
                if s.last == "." { s.removeLast() }
                return s
            }
            if v >= 1e6 { return trim(String(format: "%.1f", v / 1e6)) + "M" }
            if v >= 1e4 { return trim(String(format: "%.1f", v / 1e3)) + "k" }
            if v == 0 || v >= 1 { return trim(String(format: "%.1f", v)) }
            return trim(String(format: "%.6f", v))
        }
    }

    // MARK: SVG text

    private func text(_ x: Double, _ y: Double, _ s: String, size: Double = 12, bold: Bool = false,
                      anchor: String = "start", fill: String = "#000000", halo: Bool = false) -> String {
        "<text x=\(q(x)) y=\(q(y))" + (size != 12 ? " font-size=\"\(Int(size))\"" : "") + (bold ? " font-weight=\"bold\"" : "")
            + (anchor != "start" ? " text-anchor=\"\(anchor)\"" : "") + (fill != "#000000" ? " fill=\"\(fill)\"" : "")
            + (halo ? " stroke=\"#ffffff\" stroke-width=\"3\" paint-order=\"stroke\"" : "")
            + ">\(Self.xml(s))</text>\n"
    }

    private func q(_ v: Double) -> String { "\"" + String(format: "%.1f", v) + "\"" }

    /// `s` with XML's special characters escaped.
    public static func xml(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
            .replacingOccurrences(of: ">", with: "&gt;").replacingOccurrences(of: "\"", with: "&quot;")
    }
}
