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

    @Option(name: .long, parsing: .unconditional, help: "Lock-holding threads of the storm (1-32).")
    var holders = 2

    @Option(name: .long, help: "Also write an SVG bar chart (pages per second and IPIs per page per variant; the batch-size and copier sweeps) to this file.")
    var svg: String?

    @Option(name: .long, help: "Write a Chrome/Perfetto trace-event timeline of the migrator's phases (unmap, flush, tlbFlush, copy, remap) per variant to this JSON file (the first 65536 events per CPU).")
    var trace: String?

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

    /// The results of `--json` (`NUMABench.runAll`'s).
    typealias Results = NUMABenchResults

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
        try HostResources.checkMemory(needed: Self.memoryNeeded(bufferBytes: ByteSize.parse(size)!), available: available,
                                      for: "svmemu numa --size \(size)")
    }

    struct Failure: Error, CustomStringConvertible { let description: String }

    /// The variants, the batch-size sweep and (on real threads) the copier
    /// sweep, with a progress line on standard error.
    func variantResults() throws -> Results {
        var settings = NUMABenchSettings()
        settings.bufferBytes = ByteSize.parse(size)!
        settings.readers = readers
        settings.rounds = rounds
        settings.seed = threads.seed
        settings.schedule = try harnessSchedule()
        settings.variants = settings.deterministicVariants(variants == .all ? NUMAVariant.all(copyThreads: copyThreads)
                                                           : NUMAVariant.standard(copyThreads: copyThreads))
        if checkTLB { settings.checksStaleTLBEntries = true }
        if trace != nil { settings.traceEventsPerCPU = OverheadCommand.traceEventsPerCPU }
        let progress = ProgressLine(label: "svmemu numa")
        defer { progress.done() }
        return try NUMABench.runAll(settings, sweeps: !noSweep, copyThreads: copyThreads, progress: progress.say)
    }

    func run() throws {
        try preflight()
        warnIfDebugBuild("svmemu numa")
        if storm { return try runStorm() }
        let all = try variantResults()
        let results = all.variants, sweep = all.batchSweep, copySweep = all.copySweep
        if let svg { try OutputFile(svg).write(Self.chart(results, sweep, copySweep, title: chartTitle)) }
        if let trace {
            try OutputFile(trace).write(OverheadReport.traceJSON(processes: results.map { (name: $0.label, events: $0.trace) }))
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
        settings.pages = pages
        settings.holders = holders
        settings.rounds = rounds
        settings.seed = threads.seed
        settings.schedule = try harnessSchedule()
        let progress = ProgressLine(label: "svmemu numa --storm")
        defer { progress.done() }
        return StormResults(storm: try NUMABench.storm(settings, progress: progress.say))
    }

    /// The storm, printed.
    func runStorm() throws {
        let results = try stormResults().storm
        try printReport(StormResults(storm: results), json: output.json, text: Self.stormTable(results) + "\n")
        if let bad = results.first(where: { !$0.dataIntact }) {
            throw Failure(description: "svmemu numa --storm: BYTES DIFFER under \(bad.algorithm)")
        }
    }

    /// The storm's figures, one row per algorithm, then each algorithm's
    /// lock-wait histogram.
    static func stormTable(_ rows: [NUMAStormResult]) -> String {
        func us(_ ns: UInt64) -> String { Cell.fixed(Double(ns) / 1000, 1) }
        var t = Table(["algorithm", "migrated", "not moved", "stalls", "backoffs", "waits", "wait p50 µs", "wait p99 µs",
                       "wait max µs", "holder p99 µs", "intact"], align: [.left, .right])
        for r in rows {
            t.add([r.algorithm, "\(r.pagesMigrated)", "\(r.pagesNotMigrated)", "\(r.stalls)", "\(r.deadlockBackoffs)",
                   "\(r.lockWaits)", us(r.lockWaitP50Nanos), us(r.lockWaitP99Nanos), us(r.lockWaitMaxNanos),
                   us(r.holderWaitP99Nanos), r.dataIntact ? "yes" : "NO"])
        }
        var s = t.text + "\nMigrator lock and writeback waits by length (count per bucket, upper bound)\n"
        for r in rows where !r.lockWaitHistogram.isEmpty {
            s += r.algorithm + ":"
            for b in r.lockWaitHistogram {
                let bound = b.upToNanos >= 1_000_000 ? "\(b.upToNanos / 1_000_000)ms" : b.upToNanos >= 1000 ? "\(b.upToNanos / 1000)µs" : "\(b.upToNanos)ns"
                s += " <\(bound):\(b.count)"
            }
            s += "\n"
        }
        return s
    }

    /// The copier sweep, one row per batch shape and working set.
    static func copyTable(_ rows: [NUMACopyPoint]) -> String {
        var t = Table(["ring", "folio", "folios", "single µs", "threads", "multi µs", "speedup", "split",
                       "2-thread memcpy µs", "of 2-thread"], align: [.right])
        for p in rows {
            t.add(["\(p.ringBytes >> 20)M", p.folioBytes == 4096 ? "4K" : "2M", "\(p.folios)", Cell.fixed(p.singleMicros, 1),
                   "\(p.threads)", Cell.fixed(p.multiMicros, 1), Cell.fixed(p.speedup, 2), Cell.percent(p.splitShare, decimals: 0),
                   Cell.fixed(p.twoThreadMicros, 1), Cell.fixed(p.ratioToTwoThread, 2)])
        }
        return "Copier sweep (one batch's copy, median)\n" + t.text
    }

    /// The variants, one row each, then the batch-size sweep.
    static func table(_ rows: [NUMAVariantResult], _ sweep: [NUMABatchPoint]) -> String {
        var t = Table(["algorithm", "page", "copier", "defer", "pages/s", "IPIs/page", "flushes", "flush µs", "copy µs",
                       "read p50 ns", "read p99 ns", "intact"], align: [.left, .right, .left, .right])
        for r in rows {
            t.add([r.algorithm, r.pageSize == 4096 ? "4K" : "2M", r.copier, r.deferredFlush ? "yes" : "no",
                   Cell.fixed(r.pagesPerSecond, 0), Cell.fixed(r.ipisPerPage, 4), "\(r.flushes)", Cell.fixed(r.flushWaitMicros, 0),
                   Cell.fixed(r.copyMicros, 0), "\(r.readerLatencyP50Nanos)", "\(r.readerLatencyP99Nanos)", r.dataIntact ? "yes" : "NO"])
        }
        var s = t.text
        if !sweep.isEmpty {
            var b = Table(["batch", "total ms", "first folio µs", "pages/s"], align: [.right])
            for p in sweep {
                b.add(["\(p.batchPages)", Cell.fixed(p.totalMillis, 1), Cell.fixed(p.firstFolioMicros, 1), Cell.fixed(p.pagesPerSecond, 0)])
            }
            s += "\nBatch size (mainline, 4K, one move of the buffer)\n" + b.text
        }
        return s
    }

    /// What the chart's title says ran: the buffer, readers and rounds.
    var chartTitle: String {
        "svmemu numa: migrate_pages of a \(ByteSize.parse(size).map(Chart.size) ?? size) buffer between two nodes, \(readers) reader\(readers == 1 ? "" : "s"), "
            + "\(rounds) round\(rounds == 1 ? "" : "s")"
    }

    /// Bar charts: pages per second and IPIs per migrated page per variant
    /// (IPIs on a log axis: they span decades); with the sweeps, total time
    /// and first-folio latency per batch size, and the multi-threaded
    /// copier's speedup per batch shape and working set, with the 1.0x line.
    /// A deterministic run (its results carry schedule steps) says "virtual time".
    static func chart(_ rows: [NUMAVariantResult], _ sweep: [NUMABatchPoint] = [], _ copySweep: [NUMACopyPoint] = [],
                      title: String = "svmemu numa: migrate_pages between two nodes") -> String {
        let virtual = rows.contains { $0.scheduleSteps != nil }
        var chart = Chart(title: title, subtitle: Chart.timeBase(virtual: virtual))
        chart.panels = [
            ChartPanel("Pages migrated per second", unit: virtual ? "pages per second of virtual time" : "pages per second",
                       bars: rows.map { ChartBar($0.label, $0.pagesPerSecond) }),
            ChartPanel("IPIs per migrated page", unit: "TLB-flush IPIs received per page", scale: .log,
                       bars: rows.map { ChartBar($0.label, $0.ipisPerPage) }, format: { Cell.fixed($0, 4) }),
        ]
        if !sweep.isEmpty {
            chart.panels.append(ChartPanel("One move of the buffer by batch size (4K pages)", unit: "ms",
                                           bars: sweep.map { ChartBar("batch \($0.batchPages)", $0.totalMillis) },
                                           format: { Cell.fixed($0, 1) + " ms" }))
            chart.panels.append(ChartPanel("First folio's latency by batch size", unit: "µs",
                                           bars: sweep.map { ChartBar("batch \($0.batchPages)", $0.firstFolioMicros) },
                                           format: { Cell.fixed($0, 1) + " µs" }))
        }
        if !copySweep.isEmpty {
            chart.panels.append(ChartPanel(
                "Multi-threaded copy: speedup over one thread", unit: "speedup (one thread's time / the copier's)", scale: .linear,
                reference: 1, referenceLabel: "1.0x: no gain",
                bars: copySweep.enumerated().map { i, p in
                    ChartBar("\(p.threads) threads, \(p.folios) x \(p.folioBytes == 4096 ? "4K" : "2M"), \(p.ringBytes >> 20)M ring", p.speedup,
                             groupStart: i > 0 && copySweep[i - 1].ringBytes != p.ringBytes)
                }, format: { Cell.fixed($0, 2) + "x" }))
        }
        return chart.svg()
    }
}
