// `svmemu numa`: Huang Ying's migrate_pages benchmark, every variant side by side.
import ArgumentParser
import Foundation
import SVMEmu
import SVMStress

/// Readers touch a buffer while a migrator moves it node 0 -> 1 -> 0 with
/// move_pages, once per variant (algorithm, copier, deferral, page size), in
/// fresh machines; then a batch-size sweep. See Docs/numa.md.
struct NumaCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "numa",
        abstract: "migrate_pages between NUMA nodes: batching, never-block, copiers and deferred flush side by side.",
        discussion: """
            Build with -c release. Each variant boots a fresh machine with two nodes, fills --buffer, starts \
            --readers threads reading random words of it (latency per access measured, every word checked) \
            and moves the whole buffer --rounds times between node 0 and 1 with move_pages (MIGRATE_SYNC). \
            The deferred-flush variant maps the buffer read-only (a read-mostly buffer). IPIs are the \
            nr_tlb_remote_flush_received counter, flushes nr_tlb_remote_flush. With --json prints one object \
            (Docs/json.md) with `variants` (one element per variant: algorithm, mode, copier, copyThreads, \
            deferredFlush, pageSize, pagesMigrated, pagesPerSecond, ipisPerPage, flushes, flushWaitMicros, \
            readerLatencyP50Nanos, readerLatencyP99Nanos, staleEntryDiagnostics, dataIntact, ...) and \
            `batchSweep` (batchPages, totalMillis, firstFolioMicros, pagesPerSecond).

            \(ExitStatus.helpParagraph)
            """)

    @Option(name: .long, parsing: .unconditional, help: "Buffer size, 2M or more, with an optional K, M or G suffix.")
    var buffer: String = "64M"

    @Option(name: .long, parsing: .unconditional, help: "Reader threads touching the buffer while it moves.")
    var readers = 2

    @Option(name: .long, parsing: .unconditional, help: "Moves of the whole buffer per variant (0 -> 1, 1 -> 0, ...).")
    var rounds = 4

    @Option(name: .long, parsing: .unconditional, help: "Threads of the multi-threaded copier.")
    var copyThreads = 2

    @Flag(name: .long, help: "Skip the batch-size sweep.")
    var noSweep = false

    @Option(name: .long, help: "Also write an SVG bar chart (pages per second and IPIs per page per variant) to this file.")
    var svg: String?

    @OptionGroup var output: JSONOutputOptions

    func validate() throws {
        _ = try ByteSize.check(buffer, flag: "--buffer", range: (2 << 20)...(16 * ByteSize.gib))
        try checkRange(readers, 0...32, flag: "--readers")
        try checkRange(rounds, 1...100, flag: "--rounds")
        try checkRange(copyThreads, 1...64, flag: "--copy-threads")
    }

    struct Results: Encodable {
        var variants: [NUMAVariantResult]
        var batchSweep: [NUMABatchPoint]
    }

    struct Failure: Error, CustomStringConvertible { let description: String }

    func run() throws {
        #if DEBUG
        FileHandle.standardError.write(Data("svmemu numa: warning: this is a debug build; figures are not meaningful (use swift build -c release)\n".utf8))
        #endif
        var settings = NUMABenchSettings()
        settings.bufferBytes = ByteSize.parse(buffer)! & ~((2 << 20) - 1)
        settings.readers = readers
        settings.rounds = rounds
        settings.variants = NUMAVariant.standard(copyThreads: copyThreads)
        let progress = ProgressLine(label: "svmemu numa")
        var results: [NUMAVariantResult] = []
        for v in settings.variants {
            progress.say(v.label)
            results.append(try NUMABench.run(v, settings: settings))
        }
        var sweep: [NUMABatchPoint] = []
        if !noSweep {
            progress.say("batch-size sweep")
            sweep = try NUMABench.sweep(settings: settings)
        }
        progress.done()
        if let svg { try OutputFile(svg).write(Self.chart(results)) }
        if output.json {
            print(try JSONReport.render(for: self, results: Results(variants: results, batchSweep: sweep)))
        } else {
            print(Self.table(results, sweep))
        }
        if let bad = results.first(where: { !$0.dataIntact }) {
            throw Failure(description: "svmemu numa: BYTES DIFFER in variant \(bad.algorithm) \(bad.copier)")
        }
    }

    static func table(_ rows: [NUMAVariantResult], _ sweep: [NUMABatchPoint]) -> String {
        func f(_ v: Double, _ d: Int) -> String { String(format: "%.\(d)f", v) }
        func col(_ s: String, _ n: Int) -> String { s.count >= n ? " " + s : String(repeating: " ", count: n - s.count) + s }
        var s = col("algorithm", 16) + col("page", 5) + col("copier", 13) + col("defer", 6) + col("pages/s", 11)
            + col("IPIs/page", 10) + col("flushes", 8) + col("flush us", 9) + col("copy us", 9)
            + col("read p50 ns", 12) + col("read p99 ns", 12) + col("intact", 7) + "\n"
        for r in rows {
            s += col(r.algorithm, 16) + col(r.pageSize == 4096 ? "4K" : "2M", 5) + col(r.copier, 13)
                + col(r.deferredFlush ? "yes" : "no", 6) + col(f(r.pagesPerSecond, 0), 11) + col(f(r.ipisPerPage, 4), 10)
                + col("\(r.flushes)", 8) + col(f(r.flushWaitMicros, 0), 9) + col(f(r.copyMicros, 0), 9)
                + col("\(r.readerLatencyP50Nanos)", 12) + col("\(r.readerLatencyP99Nanos)", 12)
                + col(r.dataIntact ? "yes" : "NO", 7) + "\n"
        }
        if !sweep.isEmpty {
            s += "\nBatch size (mainline, 4K, one move of the buffer)\n"
            s += col("batch", 7) + col("total ms", 10) + col("first folio us", 15) + col("pages/s", 11) + "\n"
            for p in sweep {
                s += col("\(p.batchPages)", 7) + col(f(p.totalMillis, 1), 10) + col(f(p.firstFolioMicros, 1), 15)
                    + col(f(p.pagesPerSecond, 0), 11) + "\n"
            }
        }
        return s
    }

    /// Two bar charts: pages per second, and IPIs per migrated page.
    static func chart(_ rows: [NUMAVariantResult]) -> String {
        let w = 900, barH = 18, gap = 6, left = 300
        let h = 60 + 2 * (rows.count * (barH + gap) + 40)
        var s = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(w)\" height=\"\(h)\" font-family=\"sans-serif\" font-size=\"12\">\n"
        var y = 20
        func panel(_ title: String, _ value: (NUMAVariantResult) -> Double, _ fmt: String) {
            s += "<text x=\"10\" y=\"\(y)\" font-weight=\"bold\">\(title)</text>\n"
            y += 14
            let top = max(1e-9, rows.map(value).max() ?? 1)
            for r in rows {
                let label = "\(r.algorithm) \(r.pageSize == 4096 ? "4K" : "2M") \(r.copier)\(r.deferredFlush ? " deferred" : "")"
                let bw = Int(Double(w - left - 80) * value(r) / top)
                s += "<text x=\"10\" y=\"\(y + 13)\">\(label)</text>"
                s += "<rect x=\"\(left)\" y=\"\(y)\" width=\"\(max(1, bw))\" height=\"\(barH)\" fill=\"#4a7ab5\"/>"
                s += "<text x=\"\(left + bw + 4)\" y=\"\(y + 13)\">\(String(format: fmt, value(r)))</text>\n"
                y += barH + gap
            }
            y += 26
        }
        panel("Pages migrated per second", { $0.pagesPerSecond }, "%.0f")
        panel("IPIs per migrated page", { $0.ipisPerPage }, "%.4f")
        return s + "</svg>\n"
    }
}
