import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import SVMEmu
import SVMStress
import Testing

/// What a chart holds, read back with XMLParser: the root's attributes, each
/// element's attributes by name, and every text.
final class SVGStructure: NSObject, XMLParserDelegate {
    var rootAttributes: [String: String] = [:]
    var elements: [(name: String, attributes: [String: String])] = []
    var texts: [String] = []
    private var current = ""
    private var inText = false

    /// Parses `svg`; nil when it is not well-formed XML.
    static func parse(_ svg: String) -> SVGStructure? {
        let s = SVGStructure()
        let parser = XMLParser(data: Data(svg.utf8))
        parser.delegate = s
        return parser.parse() ? s : nil
    }

    func parser(_ parser: XMLParser, didStartElement name: String, namespaceURI: String?, qualifiedName: String?,
                attributes: [String: String] = [:]) {
        if elements.isEmpty { rootAttributes = attributes }
        elements.append((name, attributes))
        if name == "text" { inText = true; current = "" }
    }
    func parser(_ parser: XMLParser, foundCharacters string: String) { if inText { current += string } }
    func parser(_ parser: XMLParser, didEndElement name: String, namespaceURI: String?, qualifiedName: String?) {
        if name == "text" { texts.append(current); inText = false }
    }

    /// The elements of `name` with `class` `cls`.
    func count(_ name: String, class cls: String) -> Int {
        elements.filter { $0.name == name && $0.attributes["class"] == cls }.count
    }

    /// What every chart must have: a viewBox the size of the page, an opaque
    /// background first, an axis and ticks per panel, no "us" for µs.
    func expectReadable(panels: Int, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(elements.first?.name == "svg", sourceLocation: sourceLocation)
        let w = rootAttributes["width"] ?? "?", h = rootAttributes["height"] ?? "?"
        #expect(rootAttributes["viewBox"] == "0 0 \(w) \(h)", sourceLocation: sourceLocation)
        let background = elements.first { $0.name == "rect" }
        #expect(background?.attributes["class"] == "background" && background?.attributes["fill"] == "#ffffff"
                && background?.attributes["width"] == w && background?.attributes["height"] == h, sourceLocation: sourceLocation)
        #expect(count("line", class: "axis") == panels, sourceLocation: sourceLocation)
        #expect(count("line", class: "tick") >= 2 * panels, sourceLocation: sourceLocation)
        #expect(!texts.contains { $0.range(of: #"\bus\b"#, options: .regularExpression) != nil },
                "microseconds are µs: \(texts.filter { $0.contains("us") })", sourceLocation: sourceLocation)
        #expect(!texts.contains("0.0%"), sourceLocation: sourceLocation)
    }
}

@Suite("Report: tables and charts")
struct ReportTests {

    @Test("a table's columns are as wide as their widest cell, names left, numbers right, no trailing blanks")
    func tableAligns() throws {
        var t = Table(["name", "pages/s"], indent: "  ")
        t.add(["unbatched", "22726"])
        t.add(["a", "5"])
        #expect(t.text == """
              name       pages/s
              unbatched    22726
              a                5

            """)
        #expect(Table.columns([["A", "B"], ["long cell", "x"]]) == "A          B\nlong cell  x\n")
        var ruled = Table(["", "x"], align: [.left], rule: true)
        ruled.add(["row", "1"])
        #expect(ruled.text == "     x\n------\nrow  1\n")
    }

    @Test("a figure not measured is '-', not 0.0%")
    func unmeasuredIsADash() throws {
        #expect(Cell.percent(nil) == "-")
        #expect(Cell.percent(0.25) == "25.0%")
        #expect(Cell.fixed(nil, 2) == "-")
        #expect(Cell.fixed(1.234, 2) == "1.23")
    }

    @Test("a bar's figure has three significant digits from 100 up, with k and M past ten thousand")
    func barFigures() {
        #expect(Chart.number(1_084_859) == "1.08M")
        #expect(Chart.number(3_118_132) == "3.12M")
        #expect(Chart.number(12_500_000) == "12.5M")
        #expect(Chart.number(355_671) == "356k")
        #expect(Chart.number(42_170) == "42.2k")
        #expect(Chart.number(9_999) == "9999")
        #expect(Chart.number(783) == "783")
        #expect(Chart.number(1.0566) == "1.06")
        #expect(Chart.number(0.0039) == "0.0039")
        #expect(Chart.number(.nan) == "-")
    }

    @Test("a chart has a viewBox, a white page, a title, ticks with the unit, a log axis where values span decades, and the 1.0x line")
    func chartStructure() throws {
        var chart = Chart(title: "svmemu test: what ran", subtitle: Chart.timeBase(virtual: true))
        chart.panels = [
            ChartPanel("IPIs per page", unit: "IPIs per page", bars: [ChartBar("unbatched", 2), ChartBar("batched", 0.004)]),
            ChartPanel("Latency", unit: "µs", bars: [ChartBar("a", 40), ChartBar("b", 55)], format: { Chart.number($0) + " µs" }),
            ChartPanel("Speedup", unit: "speedup", scale: .linear, reference: 1, referenceLabel: "1.0x: no gain",
                       bars: [ChartBar("2 threads", 1.6), ChartBar("not measured", 0, figure: "-")]),
        ]
        let s = try #require(SVGStructure.parse(chart.svg()))
        s.expectReadable(panels: 3)
        #expect(s.texts.contains("svmemu test: what ran"))
        #expect(s.texts.contains { $0.hasPrefix("virtual time") })
        #expect(s.texts.contains("IPIs per page (log scale)"), "2 vs 0.004 spans decades")
        #expect(s.texts.contains("0.001") && s.texts.contains("10"), "decade ticks")
        #expect(s.texts.contains("µs") && s.texts.contains("55.0 µs"))
        #expect(s.count("line", class: "reference") == 1 && s.texts.contains("1.0x: no gain"))
        #expect(s.texts.contains("-"), "the unmeasured bar says so")
        // Every label fits: the page is wider than the plot plus the longest label.
        let long = String(repeating: "x", count: 120)
        let wide = Chart(title: "t", panels: [ChartPanel("p", unit: "u", bars: [ChartBar(long, 1)])]).svg()
        let width = try #require(SVGStructure.parse(wide)?.rootAttributes["width"])
        let w = try #require(Double(width))
        #expect(w >= Double(long.count) * 12 * 0.6 + 480)
    }

    @Test("linear ticks are round (1, 2 or 5 times a power of ten) and reach past the largest bar")
    func linearTicks() throws {
        let chart = Chart(title: "t", panels: [ChartPanel("p", unit: "pages per second", scale: .linear,
                                                          bars: [ChartBar("a", 539_773), ChartBar("b", 16_906)])])
        let s = try #require(SVGStructure.parse(chart.svg()))
        s.expectReadable(panels: 1)
        #expect(["0", "200k", "400k", "600k"].allSatisfy(s.texts.contains), "\(s.texts)")
    }

    @Test("the overhead chart in virtual time: µs, ticks, 'virtual time', and '-' for the yardsticks and timers it did not measure")
    func overheadDeterministic() throws {
        var c = OverheadConfiguration()
        c.bytes = PageGeometry.pmdSize
        c.measureInstrumentationCost = false
        c.rounds = 1
        c.schedule = .deterministic(cpus: 2, seed: 1)
        let small = try OverheadHarness.run(c)
        c.granularity = .huge2M
        let huge = try OverheadHarness.run(c)
        let s = try #require(SVGStructure.parse(OverheadReport.svg([small, huge])))
        s.expectReadable(panels: 2)
        #expect(s.texts.contains { $0.hasPrefix("svmemu overhead") && $0.contains("2 MiB") })
        #expect(s.texts.contains { $0.contains("virtual time") })
        #expect(s.texts.contains("µs per MiB") || s.texts.contains("µs per MiB (log scale)"))
        let table = OverheadReport.table(small)
        #expect(table.contains("not measured in virtual time") && !table.contains("memcpy 0.00 GB/s"))
        #expect(table.contains("instrumentation cost: -"))
        let summary = OverheadReport.summary([small, huge])
        for line in summary.split(separator: "\n").dropFirst() { #expect(line.hasSuffix("-"), "est. not measured: \(line)") }
    }
}
