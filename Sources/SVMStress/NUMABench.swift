// Huang Ying's migrate_pages benchmark on the emulator: reader threads touch
// a buffer (pmbench-like) while a migrator moves it node 0 -> 1 -> 0 with
// move_pages, for every algorithm, copier and deferral setting.

import Foundation
import SVMEmu
import Synchronization

/// Which copier a variant uses.
public enum NUMACopierKind: String, Sendable, CaseIterable, Codable {
    case single
    case multiThread = "multi-thread"
    case dma
}

/// One configuration of the benchmark.
public struct NUMAVariant: Sendable, Hashable, Codable {
    /// The migrate_pages algorithm.
    public var algorithm: MigrationAlgorithm
    /// The migrate mode.
    public var mode: MigrateMode
    /// Which copier moves the bytes.
    public var copier: NUMACopierKind
    /// Threads (or DMA channels) of the copier; 1 for the single-thread copier.
    public var copyThreads: Int
    /// Whether the TLB flush is deferred (the buffer is mapped read-only).
    public var deferredFlush: Bool
    /// 4096 or 2 MiB.
    public var pageSize: Int
    /// A variant; by default synchronous, single-thread, flushed at once, 4 KiB.
    public init(algorithm: MigrationAlgorithm, mode: MigrateMode = .sync, copier: NUMACopierKind = .single,
                copyThreads: Int = 1, deferredFlush: Bool = false, pageSize: Int = 4096) {
        self.algorithm = algorithm
        self.mode = mode
        self.copier = copier
        self.copyThreads = copyThreads
        self.deferredFlush = deferredFlush
        self.pageSize = pageSize
    }
    /// The variant in a few words ("batched 4K multi-threadx2 deferred").
    public var label: String {
        var s = "\(algorithm.rawValue) \(pageSize == 4096 ? "4K" : "2M") \(copier.rawValue)"
        if copier != .single { s += "x\(copyThreads)" }
        if deferredFlush { s += " deferred" }
        return s
    }

    /// The variants the benchmark runs by default: every algorithm on 4 KiB
    /// pages, deferral and the copiers on the mainline algorithm, and 2 MiB
    /// folios single- and multi-threaded.
    public static func standard(copyThreads: Int) -> [NUMAVariant] {
        var v = MigrationAlgorithm.allCases.map { NUMAVariant(algorithm: $0) }
        v.append(NUMAVariant(algorithm: .batched, deferredFlush: true))
        v.append(NUMAVariant(algorithm: .batched, copier: .multiThread, copyThreads: copyThreads))
        v.append(NUMAVariant(algorithm: .batched, copier: .dma, copyThreads: dmaChannels))
        v.append(NUMAVariant(algorithm: .unbatched, pageSize: 2 << 20))
        v.append(NUMAVariant(algorithm: .batched, pageSize: 2 << 20))
        v.append(NUMAVariant(algorithm: .batched, copier: .multiThread, copyThreads: copyThreads, pageSize: 2 << 20))
        return v
    }

    /// DMA channels of the offload copier's variants (the series' 16).
    public static let dmaChannels = 16

    /// Every combination: each algorithm with each copier, with and without
    /// the deferred flush, on 4 KiB pages and on 2 MiB folios.
    public static func all(copyThreads: Int) -> [NUMAVariant] {
        var v: [NUMAVariant] = []
        for pageSize in [PageGeometry.pageSize, PageGeometry.pmdSize] {
            for algorithm in MigrationAlgorithm.allCases {
                for copier in NUMACopierKind.allCases {
                    let threads = copier == .single ? 1 : copier == .dma ? dmaChannels : copyThreads
                    for deferred in [false, true] {
                        v.append(NUMAVariant(algorithm: algorithm, copier: copier, copyThreads: threads,
                                             deferredFlush: deferred, pageSize: pageSize))
                    }
                }
            }
        }
        return v
    }
}

/// What one variant measured (the keys of `svmemu numa --json`'s `variants`).
public struct NUMAVariantResult: Sendable, Codable {
    /// The migration algorithm (`MigrationAlgorithm`'s raw value).
    public var algorithm: String
    /// The migrate mode.
    public var mode: String
    /// The copier's name.
    public var copier: String
    /// Copier threads (1 for the single-thread copier).
    public var copyThreads: Int
    /// Whether the TLB flush was deferred.
    public var deferredFlush: Bool
    /// 4096 or 2 MiB.
    public var pageSize: Int
    /// Base pages migrated (pgmigrate_success).
    public var pagesMigrated: Int
    /// Pages migrated per second of the moves.
    public var pagesPerSecond: Double
    /// IPIs the flushers sent (tlb_ipis_sent) per migrated base page. (A CPU
    /// counts nr_tlb_remote_flush_received once per inbox drain, and IPIs
    /// that meet in its inbox merge, so that counter undercounts them.)
    public var ipisPerPage: Double
    /// Shootdown rounds (nr_tlb_remote_flush) during the run, deferred flushes included.
    public var flushes: Int
    /// Time flushers waited for other CPUs (the tlbFlush phase), microseconds.
    public var flushWaitMicros: Double
    /// Time in the copy phase, microseconds.
    public var copyMicros: Double
    /// The readers' access latency: median, nanoseconds.
    public var readerLatencyP50Nanos: UInt64
    /// The 99th percentile, nanoseconds.
    public var readerLatencyP99Nanos: UInt64
    /// Accesses the readers timed.
    public var readerAccesses: Int
    /// Accesses the stale-entry checker reported (vmstat tlb_stale_accesses);
    /// 0 by construction when `checksStaleTLBEntries` is off (release builds
    /// without `--check-tlb`).
    public var staleEntryDiagnostics: Int
    /// Whether the stale-entry checker was on.
    public var checksStaleTLBEntries: Bool
    /// Deferred flushes done (the batched flush of the deferred variants).
    public var deferredFlushes: Int
    /// The migrator's lock waits: 99th percentile, nanoseconds.
    public var lockWaitP99Nanos: UInt64
    /// The migrator's phases (`kernel.phases`): unmap, batched flush, copy,
    /// remap; the flush's wait for other CPUs is `flushWaitMicros`.
    public var unmapMicros: Double
    /// The batched flush, microseconds.
    public var flushMicros: Double
    /// The remap, microseconds.
    public var remapMicros: Double
    /// IPIs the flushers sent (tlb_ipis_sent).
    public var ipisSent: Int
    /// Wall (or virtual) time of the moves.
    public var seconds: Double
    /// Every read and the buffer after the moves matched the pattern.
    public var dataIntact: Bool
    /// Scheduling points of a deterministic run (nil, and absent from the
    /// JSON, on real threads).
    public var scheduleSteps: UInt64? = nil
    /// The machine profile a deterministic run charged (`--machine`); nil,
    /// and absent from the JSON, without one.
    public var machine: String? = nil
    /// Scheduling points per host second (the engine's speed; the one field
    /// of a deterministic run that depends on the host).
    public var stepsPerSecond: Double? = nil
    /// The phases as trace events (with `NUMABenchSettings.traceEventsPerCPU`); not encoded.
    public var trace: [OverheadTraceEvent] = []

    /// The variant in a few words, as charts and traces name it ("batched 4K dma deferred").
    public var label: String { "\(algorithm) \(pageSize == 4096 ? "4K" : "2M") \(copier)\(deferredFlush ? " deferred" : "")" }

    enum CodingKeys: String, CodingKey {
        case algorithm, mode, copier, copyThreads, deferredFlush, pageSize, pagesMigrated, pagesPerSecond, ipisPerPage,
             flushes, flushWaitMicros, copyMicros, readerLatencyP50Nanos, readerLatencyP99Nanos, readerAccesses,
             staleEntryDiagnostics, checksStaleTLBEntries, deferredFlushes, lockWaitP99Nanos, unmapMicros, flushMicros,
             remapMicros, ipisSent, seconds, dataIntact, scheduleSteps, machine, stepsPerSecond
    }
}

/// One point of the batch-size sweep: total migration time and the first
/// folio's latency (from the call to its remap) against the batch size.
public struct NUMABatchPoint: Sendable, Codable {
    /// Pages per migrate_pages batch.
    public var batchPages: Int
    /// One move of the buffer, milliseconds.
    public var totalMillis: Double
    /// From the call to the first folio's remap, microseconds.
    public var firstFolioMicros: Double
    /// Pages migrated per second.
    public var pagesPerSecond: Double
}

/// The benchmark's settings.
public struct NUMABenchSettings: Sendable {
    /// The buffer moved between the nodes, bytes.
    public var bufferBytes = 64 << 20
    /// Threads reading random words of the buffer while it moves.
    public var readers = 2
    /// Moves of the whole buffer (0 -> 1, 1 -> 0, ...).
    public var rounds = 4
    /// The variants ``NUMABench/runAll(_:sweeps:copyThreads:progress:)`` runs.
    public var variants: [NUMAVariant] = NUMAVariant.standard(copyThreads: 2)
    /// The batch sizes of the batch-size sweep, pages.
    public var batchSweep: [Int] = [1, 8, 32, 128, 512]
    /// Run the stale-entry checker (`KernelConfiguration.checksStaleTLBEntries`);
    /// on in debug builds, off in release builds unless asked.
    public var checksStaleTLBEntries = _isDebugAssertConfiguration()
    /// Trace events kept per CPU for a timeline of the phases (0: none).
    public var traceEventsPerCPU = 0
    /// Seed of the buffer's byte pattern.
    public var seed: UInt64 = 0x4e55
    /// Real threads (the default), or the readers and the migrator as
    /// emulated threads of a deterministic scheduler: every time is then
    /// virtual. The multi-threaded copier's workers are host threads, so a
    /// deterministic run has no multi-thread variant (``deterministicVariants(_:)``).
    public var schedule = HarnessSchedule()
    /// The defaults.
    public init() {}

    /// `variants` without those a deterministic run cannot make (the
    /// multi-threaded copier); all of them on real threads.
    public func deterministicVariants(_ variants: [NUMAVariant]) -> [NUMAVariant] {
        schedule.deterministic ? variants.filter { $0.copier != .multiThread } : variants
    }
}

/// Runs the benchmark.
public enum NUMABench {
    /// Measures one variant on a fresh machine.
    ///
    /// With `against`, the run compares two copiers on one machine instead:
    /// every other pair of moves (there and back) uses `against`'s copier
    /// rather than `v`'s, and `pairSeconds` receives the seconds of each
    /// pair of moves in order (even indexes `v`'s, odd `against`'s): two
    /// copiers measured in the same run, as every ratio of the benchmarks
    /// is, see the same readers and the same host.
    public static func run(_ v: NUMAVariant, settings s: NUMABenchSettings, batchPages: Int = Kernel.maxBatchedMigration,
                           firstFolio: UnsafeMutablePointer<UInt64>? = nil, against: NUMAVariant? = nil,
                           pairSeconds: UnsafeMutablePointer<[Double]>? = nil) throws -> NUMAVariantResult {
        if s.schedule.deterministic && v.copier == .multiThread {
            throw HarnessScheduleError(description: "the multi-threaded copier's workers are host threads: no deterministic run")
        }
        let (machine, base) = try boot(bytes: s.bufferBytes, slack: 32 << 20, schedule: s.schedule, threads: s.readers + 1,
                                       seed: s.seed) { config in
            config.addressSpaceSize = UInt64(max(4 << 30, s.bufferBytes * 4))
            config.transparentHugepage = v.pageSize == 4096 ? .never : .always
            config.checksStaleTLBEntries = s.checksStaleTLBEntries
            config.traceEventsPerCPU = s.traceEventsPerCPU
            // Every round copies into frames the machine has not used yet (and the
            // deferred flush keeps the old ones out of reach): without this the
            // host's first-touch faults, zeroing each frame, would be timed as
            // the copy.
            config.populatesRAM = true
        }
        let kernel = machine.kernel, mm = machine.mm
        let seed = s.seed
        // The read-mostly buffer: mapped read-only, as pmbench's read phase sees it.
        if v.deferredFlush { try mm.mprotect(base, length: s.bufferBytes, protection: .read) }
        let addresses = stride(from: base, to: base + UInt64(s.bufferBytes), by: v.pageSize).map { $0 }

        var policy = MigratePagesPolicy(algorithm: v.algorithm, deferredFlush: v.deferredFlush, batchPages: batchPages)
        var workerCopiers: [MultiThreadCopier] = []
        func copier(_ v: NUMAVariant) -> (any FolioCopier)? {
            switch v.copier {
            case .single: return nil
            case .multiThread:
                let mt = MultiThreadCopier(threads: v.copyThreads)
                workerCopiers.append(mt)
                return mt
            case .dma: return OffloadCopier(model: .pcie5, channels: min(16, max(1, v.copyThreads)))
            }
        }
        policy.copier = copier(v)
        let copiers = [policy.copier, against.map { copier($0) } ?? policy.copier]
        defer { for mt in workerCopiers { mt.shutdown() } }

        let stop = Atomic<Bool>(false)
        let bad = Atomic<Int>(0)
        let histograms = ReaderHistograms(count: s.readers)
        kernel.phases.virtualTime = s.schedule.deterministic
        let nanosPerTick = kernel.phases.nanosPerTick
        let threads = HarnessThreads(s.schedule)
        let started = Atomic<Int>(0)
        for r in 0..<s.readers {
            threads.spawn("reader\(r)") {
                var x = UInt64(r + 1) &* 0x9E37_79B9_7F4A_7C15
                let words = UInt64(s.bufferBytes / 8)
                started.add(1, ordering: .relaxed)
                var h = WaitHistogram()
                while !stop.load(ordering: .relaxed) {
                    x ^= x << 13; x ^= x >> 7; x ^= x << 17
                    let addr = base + (x % words) * 8
                    // One access, timed with the cycle counter (a clock call
                    // costs several accesses).
                    let t0 = HostClock.ticks()
                    var ok = false
                    do { ok = try mm.verifyPattern(addr, length: 8, seed: seed) == nil } catch {}
                    h.record(UInt64(Double(HostClock.ticks() &- t0) * nanosPerTick))
                    if !ok { bad.add(1, ordering: .relaxed) }
                }
                histograms.store(r, h)
            }
        }

        let vm = kernel.vmstat
        let flushes0 = vm[.tlbRemoteFlush], pages0 = vm[.pgmigrateSuccess]
        let deferred0 = kernel.deferredTLB.flushes
        let stale0 = vm[.tlbStaleAccesses], sent0 = vm[.tlbIPIsSent]
        // The migrator: the calling thread, or the emulated thread "main".
        let (stats, seconds, phases) = try threads.run(leaving: kernel.cpus) {
            if s.schedule.deterministic {
                // Every reader under way; in virtual time a warm-up would only add reads.
                while started.load(ordering: .relaxed) < s.readers { HostThread.yield() }
            } else {
                while started.load(ordering: .relaxed) < s.readers { HostClock.sleep(nanos: 100_000) }
                HostClock.sleep(nanos: 2_000_000)
            }
            kernel.phases.reset()
            kernel.phases.isEnabled = true
            var stats = MigrateStats()
            var status: [PageStatus] = []
            let t0 = HostClock.nanos()
            defer {
                stop.store(true, ordering: .relaxed)
                _ = threads.waitForHelpers()
            }
            var pairStart = t0
            for round in 0..<s.rounds {
                let target = (round + 1) & 1
                var one = MigrateStats()
                var roundPolicy = policy
                roundPolicy.copier = copiers[(round >> 1) & 1]
                _ = try mm.movePages(addresses, nodes: Array(repeating: target, count: addresses.count), status: &status,
                                     policy: roundPolicy, stats: &one)
                if round == 0 { firstFolio?.pointee = one.firstFolioNanos }
                stats.merge(one)
                if round & 1 == 1, let pairSeconds {
                    let now = HostClock.nanos()
                    pairSeconds.pointee.append(Double(now - pairStart) / 1e9)
                    pairStart = now
                }
            }
            // The deferred flush still pending belongs to this run.
            kernel.deferredTLB.flush()
            let seconds = Double(HostClock.nanos() - t0) / 1e9
            kernel.phases.isEnabled = false
            return (stats, seconds, kernel.phases.totals())
        }
        func micros(_ p: MigrationPhase) -> Double { (phases[p]?.nanos ?? 0) / 1000 }
        let pages = Int(vm[.pgmigrateSuccess] - pages0)
        var readers = WaitHistogram()
        for h in histograms.all { readers.merge(h) }
        var verified = false
        do { verified = try mm.verifyPattern(base, length: s.bufferBytes, seed: seed) == nil } catch {}
        let intact = bad.load(ordering: .relaxed) == 0 && verified
        let stale = Int(vm[.tlbStaleAccesses] - stale0)
        let trace = s.traceEventsPerCPU > 0
            ? kernel.phases.traceEvents().map {
                OverheadTraceEvent(name: $0.phase.name, cpu: $0.cpu, startNanos: $0.startNanos, endNanos: $0.endNanos)
            }
            : []
        try machine.finishAudited("numa \(v.label)")
        return NUMAVariantResult(
            algorithm: v.algorithm.rawValue, mode: v.mode.rawValue, copier: policy.copier?.name ?? "single",
            copyThreads: v.copier == .single ? 1 : v.copyThreads, deferredFlush: v.deferredFlush, pageSize: v.pageSize,
            pagesMigrated: pages, pagesPerSecond: Double(pages) / seconds,
            ipisPerPage: pages == 0 ? 0 : Double(vm[.tlbIPIsSent] - sent0) / Double(pages),
            flushes: Int(vm[.tlbRemoteFlush] - flushes0), flushWaitMicros: micros(.tlbFlush),
            copyMicros: micros(.copy),
            readerLatencyP50Nanos: readers.quantile(0.5), readerLatencyP99Nanos: readers.quantile(0.99),
            readerAccesses: Int(readers.count), staleEntryDiagnostics: stale,
            checksStaleTLBEntries: s.checksStaleTLBEntries,
            deferredFlushes: Int(kernel.deferredTLB.flushes - deferred0), lockWaitP99Nanos: stats.lockWaits.quantile(0.99),
            unmapMicros: micros(.unmap), flushMicros: micros(.flush), remapMicros: micros(.remap),
            ipisSent: Int(vm[.tlbIPIsSent] - sent0),
            seconds: seconds, dataIntact: intact, scheduleSteps: threads.steps,
            machine: s.schedule.deterministic ? s.schedule.machine?.name : nil,
            stepsPerSecond: threads.stepsPerSecond, trace: trace)
    }

    /// A machine for `bytes` moving between two nodes (each with room for
    /// it twice plus `slack`), checked against `schedule` for `threads`
    /// threads, booted with what `configure` adds, and the buffer mapped
    /// and filled with the pattern of `seed`.
    static func boot(bytes: Int, slack: Int, schedule: HarnessSchedule, threads: Int, seed: UInt64,
                     _ configure: (inout KernelConfiguration) -> Void) throws -> (Machine, UInt64) {
        if let problem = schedule.problem(threads: threads) { throw HarnessScheduleError(description: problem) }
        var config = KernelConfiguration()
        let nodeBytes = Machine.nodeBytes(bytes * 2, slack: slack)
        config.nodeSizes = [nodeBytes, nodeBytes]
        config.maxPhysicalBytes = UInt64(nodeBytes) * 2 + (256 << 20)
        configure(&config)
        let machine = try Machine(booting: config, cpus: schedule.deterministic ? schedule.cpus : nil)
        let base = try machine.mm.mmap(length: bytes)
        try machine.mm.fillPattern(base, length: bytes, seed: seed)
        return (machine, base)
    }

    /// Everything `svmemu numa` measures: each of `settings.variants` on a
    /// fresh machine, then (with `sweeps`) the batch-size sweep and, on real
    /// threads, the copier sweep with `copyThreads` threads (at least 2).
    /// `progress` hears what starts.
    public static func runAll(_ settings: NUMABenchSettings, sweeps: Bool, copyThreads: Int,
                              progress: (String) -> Void = { _ in }) throws -> NUMABenchResults {
        var results: [NUMAVariantResult] = []
        for v in settings.variants {
            progress(v.label)
            results.append(try run(v, settings: settings))
        }
        var batchSweep: [NUMABatchPoint] = []
        var copySweep: [NUMACopyPoint] = []
        if sweeps {
            progress("batch-size sweep")
            batchSweep = try sweep(settings: settings)
            if !settings.schedule.deterministic {
                progress("copier sweep")
                copySweep = NUMABench.copySweep(threads: max(2, copyThreads))
            }
        }
        return NUMABenchResults(variants: results, batchSweep: batchSweep, copySweep: copySweep)
    }

    /// The goal figure of `svmemu bench goals`: the 2 MiB batched variant
    /// with two copy threads against one, `pairs` times; returns each
    /// pair's pagesPerSecond ratio (two over one). Each pair is one run of
    /// ``copierComparisonMoves`` moves of the default buffer, the two
    /// copiers taking turns every two moves (there and back): both see the
    /// same readers and the same host. Two separate runs do not: measured
    /// so, a copier against itself gave ratios from 0.79 to 1.62 on the
    /// project's 2-core machine while other work ran. `progress` hears
    /// "pair i/n".
    ///
    /// - Throws: ``HarnessFailure`` when the bytes differ after a run.
    public static func copyThreadRatios(pairs: Int, progress: (String) -> Void = { _ in }) throws -> [Double] {
        try copierRatios(pairs: pairs, against: NUMAVariant(algorithm: .batched, copier: .multiThread, copyThreads: 2,
                                                            pageSize: PageGeometry.pmdSize), progress: progress)
    }

    /// Moves of the buffer in one run of ``copierRatios(pairs:against:progress:)``.
    /// At 32 (0.3 s a run on the project's idle 2-core VM) the one-thread
    /// copier against itself gave 0.946-1.075 over 12 runs, a noise as large
    /// as the two-thread copier's gain here; at 128 (1 s) it gave
    /// 0.972-1.028, and two threads against one 0.986-1.158 over 36 runs.
    public static let copierComparisonMoves = 128

    /// ``copyThreadRatios(pairs:progress:)`` with any copier against the
    /// single-threaded one (itself included: the measurement's own spread).
    public static func copierRatios(pairs: Int, against other: NUMAVariant,
                                    progress: (String) -> Void = { _ in }) throws -> [Double] {
        var settings = NUMABenchSettings()
        settings.rounds = copierComparisonMoves
        let single = NUMAVariant(algorithm: .batched, pageSize: PageGeometry.pmdSize)
        settings.variants = [single, other]
        var ratios: [Double] = []
        for pair in 0..<pairs {
            progress("pair \(pair + 1)/\(pairs)")
            var seconds: [Double] = []
            let r = try run(single, settings: settings, against: other, pairSeconds: &seconds)
            guard r.dataIntact else { throw HarnessFailure("svmemu bench goals: numa's bytes differ after the migration") }
            var mine = 0.0, theirs = 0.0
            for (i, t) in seconds.enumerated() { if i & 1 == 0 { mine += t } else { theirs += t } }
            ratios.append(mine / max(theirs, 1e-9))
        }
        return ratios
    }

    /// The batch-size sweep on the mainline algorithm, 4 KiB pages.
    public static func sweep(settings s: NUMABenchSettings) throws -> [NUMABatchPoint] {
        var out: [NUMABatchPoint] = []
        var one = s
        one.rounds = 1
        for b in s.batchSweep {
            var first: UInt64 = 0
            let r = try run(NUMAVariant(algorithm: .batched), settings: one, batchPages: b, firstFolio: &first)
            out.append(NUMABatchPoint(batchPages: b, totalMillis: r.seconds * 1000, firstFolioMicros: Double(first) / 1000,
                                      pagesPerSecond: r.pagesPerSecond))
        }
        return out
    }
}

/// Each reader's latency histogram, handed over when it stops.
final class ReaderHistograms: @unchecked Sendable {
    private let lock = NSLock()
    private var list: [WaitHistogram]
    init(count: Int) { list = Array(repeating: WaitHistogram(), count: count) }
    func store(_ i: Int, _ h: WaitHistogram) { lock.withLock { list[i] = h } }
    var all: [WaitHistogram] { lock.withLock { list } }
}

/// What `svmemu numa --json` reports: the variants, the batch-size sweep
/// and the copier sweep (empty when not run).
public struct NUMABenchResults: Encodable, Sendable {
    /// One result per variant, in the order they ran.
    public var variants: [NUMAVariantResult]
    /// The batch-size sweep.
    public var batchSweep: [NUMABatchPoint]
    /// The copier sweep.
    public var copySweep: [NUMACopyPoint]
}
