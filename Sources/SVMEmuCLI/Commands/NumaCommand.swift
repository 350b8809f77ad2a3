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
            Build with -c release. Each variant boots a fresh machine with two nodes, fills a buffer of --size bytes, starts \
            --readers threads reading random words of it (each access timed with the cycle counter, every word \
            checked) and moves the whole buffer --rounds times between node 0 and 1 with move_pages \
            (MIGRATE_SYNC); --variants all runs every algorithm x copier x deferral x page size. A \
            deferred-flush variant maps the buffer read-only (a read-mostly buffer). IPIs are \
            the nr_tlb_remote_flush_received counter, flushes nr_tlb_remote_flush, the flush wait the time \
            flushers waited for other CPUs (the tlbFlush phase). Then a batch-size sweep and a copier sweep \
            (one batch's copy, single thread against --copy-threads threads, 4 KiB batches of 1 to 512 folios \
            and one 2 MiB folio, over an 8 MiB ring that stays in the last-level cache and a 256 MiB one that \
            streams from DRAM). --check-tlb turns the stale-entry checker on (off in release builds); \
            staleEntryDiagnostics counts what it reported (tlb_stale_accesses).

            --storm runs the folio-lock storm instead: --holders "I/O" threads keep locking folios of a \
            --pages buffer (and put some under writeback whose completion needs the previous page's \
            lock) while each algorithm moves it; it reports pages not migrated (never-block's starvation), \
            waits that reached the 100 ms hung-task bound (the v6.3-rc deadlock) and the migrator's lock-wait \
            distribution.

            With --json prints one object (Docs/json.md) with `variants` (one element per variant: algorithm, \
            mode, copier, copyThreads, deferredFlush, pageSize, pagesMigrated, pagesPerSecond, ipisPerPage, \
            flushes, flushWaitMicros, readerLatencyP50Nanos, readerLatencyP99Nanos, staleEntryDiagnostics, \
            dataIntact, ...), `batchSweep` (batchPages, totalMillis, firstFolioMicros, pagesPerSecond) and \
            `copySweep` (ringBytes, folioBytes, folios, singleMicros, multiMicros, threads, speedup, splitShare, \
            twoThreadMicros: this host's own two-thread memcpy of the batch, ratioToTwoThread); with --storm one \
            object with `storm` (one element per algorithm).

            --deterministic runs the readers (or the storm's holders) and the migrator under the \
            emulator's scheduler on --cpus emulated CPUs (at least --readers + 1, or --holders + 1), one at \
            a time in virtual time, the schedule seeded by --seed: every time and rate is virtual, the same \
            seed gives byte-identical results on any host and under any load (but for stepsPerSecond). The \
            multi-threaded copier's variants and the copier sweep (host threads, host time) are left out; \
            each variant and storm result adds scheduleSteps and stepsPerSecond (scheduling points per host \
            second: the engine's speed).

            \(ExitStatus.helpParagraph)
            """)

    @Option(name: .long, parsing: .unconditional, help: "Buffer size, 2M to 16G, a multiple of 2M (whole 2 MiB folios for the 2 MiB variants), with an optional K, M or G suffix; needs about 4.4 times as much host memory.")
    var size: String = "64M"
    /// `--size` (the name the run bodies use).
    var buffer: String { size }

    /// Sizes `--size` takes: whole 2 MiB folios (the 2 MiB variants move
    /// the same buffer), up to 16 GiB.
    static let bufferRange = 2 * ByteSize.mib...16 * ByteSize.gib
    static let bufferMultiple = 2 * ByteSize.mib

    @Option(name: .long, parsing: .unconditional, help: "Reader threads touching the buffer while it moves (0-32).")
    var readers = 2

    @Option(name: .long, parsing: .unconditional, help: "Moves of the whole buffer per variant (0 -> 1, 1 -> 0, ...; 1-100).")
    var rounds = 4

    @Option(name: .long, parsing: .unconditional, help: "Threads of the multi-threaded copier (1-64).")
    var copyThreads = 2

    /// Which variants to run.
    enum VariantSet: String, CaseInsensitiveArgument {
        case standard, all
    }

    @Option(name: .long, help: "standard (every algorithm at 4 KiB; deferral and the copiers on the mainline algorithm; 2 MiB single and multi-threaded) or all (every algorithm x copier x deferral x page size: 48 variants).")
    var variants: VariantSet = .standard

    @Flag(name: .long, help: "Skip the batch-size and copier sweeps.")
    var noSweep = false

    @Flag(name: .long, help: "Run the stale-entry checker (KernelConfiguration.checksStaleTLBEntries; off in release builds, and it slows every access).")
    var checkTLB = false

    @Flag(name: .long, help: "Run the folio-lock storm (never-block starvation, the v6.3-rc deadlock) instead of the variants.")
    var storm = false

    @Option(name: .long, parsing: .unconditional, help: "4 KiB pages the --storm moves (2-65536).")
    var pages = 1024
    /// `--pages` (the name the run bodies use).
    var stormPages: Int { pages }

    @Option(name: .long, parsing: .unconditional, help: "Lock-holding threads of the storm (1-32).")
    var holders = 2

    @Option(name: .long, help: "Also write an SVG bar chart (pages per second and IPIs per page per variant; the batch-size and copier sweeps) to this file.")
    var svg: String?

    @Option(name: .long, help: "Write a Chrome/Perfetto trace-event timeline of the migrator's phases (unmap, flush, tlbFlush, copy, remap) per variant to this JSON file (the first 65536 events per CPU).")
    var trace: String?

    /// Events the trace keeps per CPU (`--trace`).
    static let traceEventsPerCPU = 1 << 16

    @OptionGroup var threads: HarnessScheduleOptions

    @OptionGroup var output: JSONOutputOptions

    @OptionGroup var report: ReportFileOptions

    /// `--buffer` and `--storm-pages`, the old spellings of `--size` and `--pages`.
    struct OldSpellings: DeprecatedSpellings {
        @Option(name: .customLong("buffer"), parsing: .unconditional, help: .private) var buffer: String?
        @Option(name: .customLong("storm-pages"), parsing: .unconditional, help: .private) var stormPages: Int?
    }
    @OptionGroup var old: OldSpellings

    /// The schedule of the runs: the readers (or holders) and the migrator.
    func harnessSchedule() throws -> HarnessSchedule {
        try threads.harnessSchedule(threads: (storm ? holders : readers) + 1)
    }

    mutating func validate() throws {
        try Deprecation.adopt(old.buffer, into: &size, defaultValue: "64M", oldFlag: "--buffer", newFlag: "--size")
        try Deprecation.adopt(old.stormPages, into: &pages, defaultValue: 1024, oldFlag: "--storm-pages", newFlag: "--pages")
        _ = try harnessSchedule()
        _ = try ByteSize.check(size, flag: "--size", range: Self.bufferRange, multiple: Self.bufferMultiple)
        try OutputFile.checkDistinct([("--svg", svg), ("--trace", trace), ("--output", report.output)])
        try checkRange(readers, 0...32, flag: "--readers")
        try checkRange(rounds, 1...100, flag: "--rounds")
        try checkRange(copyThreads, 1...64, flag: "--copy-threads")
        try checkRange(pages, 2...65536, flag: "--pages")
        try checkRange(holders, 1...32, flag: "--holders")
        if storm && variants != .standard {
            throw ValidationError("--storm runs each algorithm once; --variants chooses the variants of the benchmark, not of the storm")
        }
        if storm && (svg != nil || trace != nil) {
            throw ValidationError("--storm writes no --svg or --trace (they chart the variants)")
        }
    }

    struct Results: Encodable {
        var variants: [NUMAVariantResult]
        var batchSweep: [NUMABatchPoint]
        var copySweep: [NUMACopyPoint]
    }

    struct StormResults: Encodable {
        var storm: [NUMAStormResult]
    }

    /// The output files asked for (`--svg`, `--trace`), checked before any run.
    var outputFiles: [OutputFile] { [svg, trace].compactMap { $0.map(OutputFile.init) } }

    /// Host memory the variants touch over a `bytes` buffer: frames on both
    /// nodes as the buffer moves back and forth, with their metadata, plus
    /// the copier sweep's 256 MiB rings and the program: 1.13 GiB peak RSS
    /// measured at 256 MiB (`--rounds 2`, with the sweeps); with a margin.
    static func memoryNeeded(bufferBytes bytes: Int) -> Int { bytes * 4 + 640 * ByteSize.mib }

    /// Refuses a buffer the host cannot hold (`available`: bytes available),
    /// and an output file that cannot be written, before anything runs.
    /// Throws `CLIError` (exit status 1).
    func preflight(available: Int? = HostResources.availableBytes()) throws(CLIError) {
        for file in outputFiles { try file.checkWritable() }
        guard !storm else { return }
        try HostResources.checkMemory(needed: Self.memoryNeeded(bufferBytes: ByteSize.parse(buffer)!), available: available,
                                      for: "svmemu numa --size \(size)")
    }

    struct Failure: Error, CustomStringConvertible { let description: String }

    /// The variants, the batch-size sweep and (on real threads) the copier
    /// sweep, with a progress line on standard error.
    func variantResults() throws -> Results {
        var settings = NUMABenchSettings()
        settings.bufferBytes = ByteSize.parse(buffer)!
        settings.readers = readers
        settings.rounds = rounds
        settings.seed = threads.seed
        settings.schedule = try harnessSchedule()
        settings.variants = settings.deterministicVariants(variants == .all ? NUMAVariant.all(copyThreads: copyThreads)
                                                           : NUMAVariant.standard(copyThreads: copyThreads))
        if checkTLB { settings.checksStaleTLBEntries = true }
        if trace != nil { settings.traceEventsPerCPU = Self.traceEventsPerCPU }
        let progress = ProgressLine(label: "svmemu numa")
        defer { progress.done() }
        var results: [NUMAVariantResult] = []
        for v in settings.variants {
            progress.say(v.label)
            results.append(try NUMABench.run(v, settings: settings))
        }
        var sweep: [NUMABatchPoint] = []
        var copySweep: [NUMACopyPoint] = []
        if !noSweep {
            progress.say("batch-size sweep")
            sweep = try NUMABench.sweep(settings: settings)
            if !settings.schedule.deterministic {
                progress.say("copier sweep")
                copySweep = NUMABench.copySweep(threads: max(2, copyThreads))
            }
        }
        return Results(variants: results, batchSweep: sweep, copySweep: copySweep)
    }

    func run() throws {
        try preflight()
        #if DEBUG
        FileHandle.standardError.write(Data("svmemu numa: warning: this is a debug build; figures are not meaningful (use swift build -c release)\n".utf8))
        #endif
        if storm { return try runStorm() }
        let all = try variantResults()
        let results = all.variants, sweep = all.batchSweep, copySweep = all.copySweep
        if let svg { try OutputFile(svg).write(Self.chart(results, sweep, copySweep)) }
        if let trace {
            try OutputFile(trace).write(OverheadReport.traceJSON(processes: results.map { r in
                (name: "\(r.algorithm) \(r.pageSize == 4096 ? "4K" : "2M") \(r.copier)\(r.deferredFlush ? " deferred" : "")",
                 events: r.trace)
            }))
        }
        if output.json {
            print(try JSONReport.render(for: self, results: all))
        } else {
            print(Self.table(results, sweep))
            if !copySweep.isEmpty { print(Self.copyTable(copySweep)) }
            if let trace { print("trace: \(trace) (open in https://ui.perfetto.dev)") }
        }
        if let bad = results.first(where: { !$0.dataIntact }) {
            throw Failure(description: "svmemu numa: BYTES DIFFER in variant \(bad.algorithm) \(bad.copier)")
        }
    }

    /// The storm: each algorithm against the lock holders, with a progress
    /// line on standard error.
    func stormResults() throws -> StormResults {
        var settings = NUMAStormSettings()
        settings.pages = stormPages
        settings.holders = holders
        settings.rounds = rounds
        settings.seed = threads.seed
        settings.schedule = try harnessSchedule()
        let progress = ProgressLine(label: "svmemu numa --storm")
        var results: [NUMAStormResult] = []
        for a in settings.algorithms {
            progress.say(a.rawValue)
            results.append(try NUMABench.storm(a, settings: settings))
        }
        progress.done()
        return StormResults(storm: results)
    }

    /// The storm, printed.
    func runStorm() throws {
        let results = try stormResults().storm
        if output.json {
            print(try JSONReport.render(for: self, results: StormResults(storm: results)))
        } else {
            print(Self.stormTable(results))
        }
        if let bad = results.first(where: { !$0.dataIntact }) {
            throw Failure(description: "svmemu numa --storm: BYTES DIFFER under \(bad.algorithm)")
        }
    }

    static func stormTable(_ rows: [NUMAStormResult]) -> String {
        func col(_ s: String, _ n: Int) -> String { s.count >= n ? " " + s : String(repeating: " ", count: n - s.count) + s }
        func us(_ ns: UInt64) -> String { String(format: "%.1f", Double(ns) / 1000) }
        var s = col("algorithm", 16) + col("migrated", 9) + col("not moved", 10) + col("stalls", 7) + col("backoffs", 9)
            + col("waits", 7) + col("wait p50 us", 12) + col("wait p99 us", 12) + col("wait max us", 12)
            + col("holder p99 us", 14) + col("intact", 7) + "\n"
        for r in rows {
            s += col(r.algorithm, 16) + col("\(r.pagesMigrated)", 9) + col("\(r.pagesNotMigrated)", 10) + col("\(r.stalls)", 7)
                + col("\(r.deadlockBackoffs)", 9) + col("\(r.lockWaits)", 7) + col(us(r.lockWaitP50Nanos), 12)
                + col(us(r.lockWaitP99Nanos), 12) + col(us(r.lockWaitMaxNanos), 12) + col(us(r.holderWaitP99Nanos), 14)
                + col(r.dataIntact ? "yes" : "NO", 7) + "\n"
        }
        s += "\nMigrator lock and writeback waits by length (count per bucket, upper bound)\n"
        for r in rows where !r.lockWaitHistogram.isEmpty {
            s += col(r.algorithm, 16) + ":"
            for b in r.lockWaitHistogram {
                let bound = b.upToNanos >= 1_000_000 ? "\(b.upToNanos / 1_000_000)ms" : b.upToNanos >= 1000 ? "\(b.upToNanos / 1000)us" : "\(b.upToNanos)ns"
                s += " <\(bound):\(b.count)"
            }
            s += "\n"
        }
        return s
    }

    static func copyTable(_ rows: [NUMACopyPoint]) -> String {
        func col(_ s: String, _ n: Int) -> String { s.count >= n ? " " + s : String(repeating: " ", count: n - s.count) + s }
        var s = "Copier sweep (one batch's copy, median)\n"
        s += col("ring", 6) + col("folio", 6) + col("folios", 7) + col("single us", 10) + col("threads", 8) + col("multi us", 10) + col("speedup", 8)
            + col("split", 6) + col("2-thread memcpy us", 19) + col("of 2-thread", 12) + "\n"
        for p in rows {
            s += col("\(p.ringBytes >> 20)M", 6) + col(p.folioBytes == 4096 ? "4K" : "2M", 6) + col("\(p.folios)", 7) + col(String(format: "%.1f", p.singleMicros), 10)
                + col("\(p.threads)", 8) + col(String(format: "%.1f", p.multiMicros), 10) + col(String(format: "%.2f", p.speedup), 8)
                + col(String(format: "%.0f%%", p.splitShare * 100), 6) + col(String(format: "%.1f", p.twoThreadMicros), 19)
                + col(String(format: "%.2f", p.ratioToTwoThread), 12) + "\n"
        }
        return s
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

    /// Bar charts: pages per second and IPIs per migrated page per variant;
    /// with the sweeps, total time and first-folio latency per batch size,
    /// and the multi-threaded copier's speedup per batch shape and working set.
    static func chart(_ rows: [NUMAVariantResult], _ sweep: [NUMABatchPoint] = [], _ copySweep: [NUMACopyPoint] = []) -> String {
        typealias Bar = (label: String, value: Double)
        func variant(_ r: NUMAVariantResult) -> String {
            "\(r.algorithm) \(r.pageSize == 4096 ? "4K" : "2M") \(r.copier)\(r.deferredFlush ? " deferred" : "")"
        }
        var panels: [(title: String, format: String, bars: [Bar])] = [
            ("Pages migrated per second", "%.0f", rows.map { (variant($0), $0.pagesPerSecond) }),
            ("IPIs per migrated page", "%.4f", rows.map { (variant($0), $0.ipisPerPage) }),
        ]
        if !sweep.isEmpty {
            panels.append(("One move of the buffer (ms) by batch size (4K pages)", "%.1f",
                           sweep.map { ("batch \($0.batchPages)", $0.totalMillis) }))
            panels.append(("First folio's latency (us) by batch size", "%.1f",
                           sweep.map { ("batch \($0.batchPages)", $0.firstFolioMicros) }))
        }
        if !copySweep.isEmpty {
            panels.append(("Multi-threaded copy: speedup over one thread", "%.2fx", copySweep.map {
                ("\($0.threads) threads, \($0.folios) x \($0.folioBytes == 4096 ? "4K" : "2M"), \($0.ringBytes >> 20)M ring", $0.speedup)
            }))
        }
        let w = 900, barH = 18, gap = 6, left = 300
        let h = 20 + panels.reduce(0) { $0 + 40 + $1.bars.count * (barH + gap) }
        var s = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(w)\" height=\"\(h)\" font-family=\"sans-serif\" font-size=\"12\">\n"
        var y = 20
        for panel in panels {
            s += "<text x=\"10\" y=\"\(y)\" font-weight=\"bold\">\(panel.title)</text>\n"
            y += 14
            let top = max(1e-9, panel.bars.map(\.value).max() ?? 1)
            for bar in panel.bars {
                let bw = Int(Double(w - left - 80) * bar.value / top)
                s += "<text x=\"10\" y=\"\(y + 13)\">\(bar.label)</text>"
                s += "<rect x=\"\(left)\" y=\"\(y)\" width=\"\(max(1, bw))\" height=\"\(barH)\" fill=\"#4a7ab5\"/>"
                s += "<text x=\"\(left + bw + 4)\" y=\"\(y + 13)\">\(String(format: panel.format, bar.value))</text>\n"
                y += barH + gap
            }
            y += 26
        }
        return s + "</svg>\n"
    }
}
