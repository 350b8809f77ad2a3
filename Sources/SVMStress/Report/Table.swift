// The one text table of every report: a header row, columns aligned left or
// right, widths from the widest cell.
import Foundation

/// A text table: a header, then rows of cells, each column as wide as its
/// widest cell (header included) and aligned left or right.
///
/// ```swift
/// var t = Table(["algorithm", "pages/s"], align: [.left, .right])
/// t.add(["batched", "40667"])
/// print(t.text, terminator: "")
/// ```
///
/// Every command's table goes through it (`svmemu numa`, `bench thp`,
/// `calibrate`, `merge`, `devices`, `overhead`, the storm report), so a
/// column never runs into its neighbour, however long a cell is.
public struct Table: Sendable {
    /// Where a column's cells sit in its width.
    public enum Alignment: Sendable {
        /// Padded on the right: names, words.
        case left
        /// Padded on the left: numbers, so their digits line up.
        case right
    }

    /// The header row (one cell per column); empty for a table without one.
    public var header: [String]
    /// The alignment of each column; a column without one is right-aligned.
    public var alignment: [Alignment]
    /// The rows below the header, as added.
    public private(set) var rows: [[String]] = []
    /// Put before every line (e.g. two spaces under a heading).
    public var indent: String
    /// Between two columns.
    public var separator: String
    /// Draw a line of dashes under the header.
    public var rule: Bool

    /// A table with `header` and each column's alignment; `align` shorter
    /// than the header repeats its last element (`[.left, .right]`: the first
    /// column left, every other right; `[]`: all right).
    public init(_ header: [String], align: [Alignment] = [.left, .right], indent: String = "",
                separator: String = "  ", rule: Bool = false) {
        self.header = header
        self.alignment = header.indices.map { i in align.isEmpty ? .right : align[min(i, align.count - 1)] }
        self.indent = indent
        self.separator = separator
        self.rule = rule
    }

    /// `rows` as a table, the first row the header, every column aligned
    /// `align` (left: a listing of words).
    public static func columns(_ rows: [[String]], align: Alignment = .left) -> String {
        var t = Table(rows.first ?? [], align: [align])
        for row in rows.dropFirst() { t.add(row) }
        return t.text
    }

    /// Adds a row; a row shorter than the header leaves its last cells empty.
    public mutating func add(_ cells: [String]) { rows.append(cells) }

    /// The width of each column: its widest cell, the header's included.
    public var widths: [Int] {
        let count = max(header.count, rows.map(\.count).max() ?? 0)
        var w = [Int](repeating: 0, count: count)
        for row in [header] + rows { for (i, c) in row.enumerated() { w[i] = max(w[i], c.count) } }
        return w
    }

    /// The table as lines, each ending in a newline, without trailing blanks.
    public var text: String {
        let w = widths
        func line(_ cells: [String]) -> String {
            var s = indent
            for i in w.indices {
                let cell = i < cells.count ? cells[i] : ""
                let pad = String(repeating: " ", count: w[i] - cell.count)
                let align = i < alignment.count ? alignment[i] : .right
                s += (i > 0 ? separator : "") + (align == .left ? cell + pad : pad + cell)
            }
            while s.last == " " { s.removeLast() }
            return s + "\n"
        }
        var out = header.isEmpty ? "" : line(header)
        if rule && !header.isEmpty {
            out += indent + String(repeating: "-", count: w.reduce(0, +) + separator.count * max(0, w.count - 1)) + "\n"
        }
        for row in rows { out += line(row) }
        return out
    }
}

/// Figures as table cells: fixed decimals, percentages, and "-" for a figure
/// that was not measured.
public enum Cell {
    /// `v` with `decimals` digits after the point ("12.35"), or "-" when nil.
    public static func fixed(_ v: Double?, _ decimals: Int) -> String {
        guard let v else { return "-" }
        return String(format: "%.\(decimals)f", v)
    }

    /// A fraction (0.25) as a percentage with one decimal ("25.0%"), or "-"
    /// when nil (a timer that was not measured is not "0.0%").
    public static func percent(_ fraction: Double?, decimals: Int = 1) -> String {
        fraction.map { fixed($0 * 100, decimals) + "%" } ?? "-"
    }
}
