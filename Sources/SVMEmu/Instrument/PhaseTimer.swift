import CSVMSupport
import Synchronization

/// The phases of a migration a fault's time is split into.
public enum MigrationPhase: Int, CaseIterable, Sendable, Codable {
    /// migrate_vma_collect: walk, references, locks, migration entries (incl. notifier and TLB flush).
    case collect
    /// migrate_vma_unmap: LRU isolation, try_to_migrate, reference checks,
    /// restore; in migrate_pages, a batch's `migrate_folio_unmap()` calls.
    case unmap
    /// Driver: destination allocation (zoneDevicePageInit / folio alloc).
    case allocate
    /// Driver: copying the bytes (memcpy or the copy engine, waiting
    /// included); in migrate_pages, the copier's copy of a batch.
    case copy
    /// migrate_vma_pages.
    case pages
    /// Driver: device page-table update.
    case pageTableUpdate
    /// migrate_vma_finalize.
    case finalize
    /// Waiting for other CPUs to answer a TLB shootdown (inside collect,
    /// unmap or whichever phase flushed).
    case tlbFlush
    /// The whole fault (GPU fault handler or CPU fault's migrateToRAM), outermost.
    case fault
    /// migrate_pages: the batch's one `try_to_unmap_flush()` (the local
    /// invalidation, the IPIs and the wait, which is also `tlbFlush`).
    case flush
    /// migrate_pages: `migrate_folio_move()` without the copy: the reference
    /// check, `remove_migration_ptes()`, unlocking.
    case remap

    /// The phase's name in reports.
    public var name: String {
        switch self {
        case .collect: "collect"
        case .unmap: "unmap"
        case .allocate: "allocate"
        case .copy: "copy"
        case .pages: "pages"
        case .pageTableUpdate: "pageTableUpdate"
        case .finalize: "finalize"
        case .tlbFlush: "tlbFlush"
        case .fault: "fault"
        case .flush: "flush"
        case .remap: "remap"
        }
    }
    /// Phases recorded inside another phase (the shootdown wait inside the
    /// phase that flushed): a breakdown that sums phases must leave them out.
    public var isNested: Bool { self == .tlbFlush }
    /// Phases the kernel's migrate_vma_* calls spend (the "migrate_vma fraction").
    public var isMigrateVMA: Bool { self == .collect || self == .unmap || self == .pages || self == .finalize }
}

/// Totals for one phase.
public struct PhaseTotals: Sendable, Hashable, Codable {
    /// Time spent in the phase, in nanoseconds.
    public var nanos: Double = 0
    /// How many times the phase ran.
    public var count: UInt64 = 0
    /// Totals of `nanos` over `count` runs.
    public init(nanos: Double = 0, count: UInt64 = 0) {
        self.nanos = nanos
        self.count = count
    }
}

/// Per-CPU phase timers, aggregated on demand. Off by default: every hook is
/// then one load and a branch. On: two cycle-counter reads and two adds into
/// the calling CPU's own cache lines (no sharing, no locks).
///
/// Trace events (for a Perfetto timeline) are kept per CPU in fixed buffers
/// when `traceCapacity` > 0.
public final class PhaseTimer: @unchecked Sendable {
    static let slots = 64
    static let phases = MigrationPhase.allCases.count
    /// Words per slot: (ticks, count) per phase, padded to whole cache lines.
    static let slotWords = ((phases * 2 + 7) / 8) * 8
    private let words: UnsafeMutablePointer<UInt64>
    private let enabledFlag = Atomic<Bool>(false)
    /// Nanoseconds per tick: calibrated at creation, or 1 in ``virtualTime``.
    public var nanosPerTick: Double { virtualTime ? 1 : calibratedNanosPerTick }
    private let calibratedNanosPerTick: Double
    /// Whether the timed threads are emulated threads of a
    /// ``DeterministicScheduler``, whose ticks are virtual nanoseconds
    /// (``HostClock/ticks()``). Set before timing; trace events then count
    /// from the virtual clock's origin rather than from the timer's creation.
    public var virtualTime = false

    // Trace: per slot, `traceCapacity` events of (start tick, end tick, phase, tag).
    /// Trace events kept per CPU (0: no trace).
    public let traceCapacity: Int
    private let trace: UnsafeMutablePointer<TraceEvent>
    private let traceCounts: UnsafeMutablePointer<Int>
    private let startTick: UInt64
    /// The CPUs whose slots the totals are kept in: the machine's, or for a
    /// timer of its own, a set of its own (one slot per host thread).
    let cpus: CPUSet

    /// One recorded phase, in ticks.
    public struct TraceEvent: Sendable {
        /// The tick the phase began.
        public var start: UInt64
        /// The tick it ended.
        public var end: UInt64
        /// The ``MigrationPhase`` raw value.
        public var phase: Int32
        /// The CPU slot that recorded it.
        public var cpu: Int32
    }

    /// A timer, off, keeping `traceCapacity` trace events per CPU. Calibrates
    /// the tick against the monotonic clock for about 2 ms.
    ///
    /// - Throws: ``HostMemoryRefusal`` when the host refuses the address
    ///   space of its own CPU slots (one per possible host thread).
    public convenience init(traceCapacity: Int = 0) throws(HostMemoryRefusal) {
        let cpus = try CPUSet(count: CPUSet.maxCPUs, checksStaleEntries: false, vmstat: VMStat())
        self.init(traceCapacity: traceCapacity, cpus: cpus)
    }

    init(traceCapacity: Int, cpus: CPUSet) {
        self.cpus = cpus
        let n = PhaseTimer.slots * PhaseTimer.slotWords
        words = .allocate(capacity: n)
        words.initialize(repeating: 0, count: n)
        self.traceCapacity = traceCapacity
        trace = .allocate(capacity: max(1, traceCapacity * PhaseTimer.slots))
        traceCounts = .allocate(capacity: PhaseTimer.slots * 8)
        traceCounts.initialize(repeating: 0, count: PhaseTimer.slots * 8)
        calibratedNanosPerTick = PhaseTimer.hostNanosPerTick
        startTick = HostClock.ticks()
    }

    /// The length of a host tick, measured once per process (2 ms of ticks
    /// against the host clock): the time-stamp counter's rate is constant,
    /// and a machine boots in every test.
    static let hostNanosPerTick: Double = {
#if arch(x86_64)
        let t0 = svm_rdtsc(), n0 = HostClock.hostNanos()
        var n1 = n0
        while n1 - n0 < 2_000_000 { n1 = HostClock.hostNanos() }
        let t1 = svm_rdtsc()
        return t1 > t0 ? Double(n1 - n0) / Double(t1 - t0) : 1
#else
        return 1
#endif
    }()
    deinit {
        words.deallocate()
        trace.deallocate()
        traceCounts.deallocate()
    }

    /// Whether phases are timed; may be switched at any time.
    public var isEnabled: Bool {
        get { enabledFlag.load(ordering: .relaxed) }
        set { enabledFlag.store(newValue, ordering: .relaxed) }
    }

    /// A start mark: 0 when timing is off.
    @inlinable @inline(__always)
    public func begin() -> UInt64 { isEnabledFast ? HostClock.ticks() : 0 }

    @usableFromInline var isEnabledFast: Bool { enabledFlag.load(ordering: .relaxed) }

    /// Ends a phase begun with `begin()`; nothing when the mark is 0.
    @inlinable @inline(__always)
    public func end(_ phase: MigrationPhase, _ mark: UInt64) {
        if mark != 0 { record(phase, mark, HostClock.ticks()) }
    }

    /// Ends `phase` and begins the next one with a single clock read (for
    /// back-to-back phases: collect then unmap, allocate then copy ...).
    @inlinable @inline(__always)
    public func endAndBegin(_ phase: MigrationPhase, _ mark: UInt64) -> UInt64 {
        guard mark != 0 else { return 0 }
        let now = HostClock.ticks()
        record(phase, mark, now)
        return now
    }

    @usableFromInline
    func record(_ phase: MigrationPhase, _ start: UInt64, _ end: UInt64) {
        let cpu = cpus.current().index
        let w = words + cpu * PhaseTimer.slotWords + phase.rawValue * 2
        w[0] &+= end &- start
        w[1] &+= 1
        if traceCapacity > 0 {
            let c = traceCounts + cpu * 8
            if c.pointee < traceCapacity {
                trace[cpu * traceCapacity + c.pointee] = TraceEvent(start: start, end: end, phase: Int32(phase.rawValue), cpu: Int32(cpu))
                c.pointee += 1
            }
        }
    }

    /// Runs `body` as one `phase`.
    @inlinable
    public func measure<R, E: Error>(_ phase: MigrationPhase, _ body: () throws(E) -> R) throws(E) -> R {
        let m = begin()
        defer { end(phase, m) }
        return try body()
    }

    /// Totals per phase across all CPUs. Call when the measured threads are done.
    public func totals() -> [MigrationPhase: PhaseTotals] {
        var out: [MigrationPhase: PhaseTotals] = [:]
        for phase in MigrationPhase.allCases {
            var t = PhaseTotals()
            for cpu in 0..<PhaseTimer.slots {
                let w = words + cpu * PhaseTimer.slotWords + phase.rawValue * 2
                t.nanos += Double(w[0]) * nanosPerTick
                t.count += w[1]
            }
            out[phase] = t
        }
        return out
    }

    /// Every trace event recorded, times in nanoseconds since this timer was created.
    public func traceEvents() -> [(phase: MigrationPhase, cpu: Int, startNanos: Double, endNanos: Double)] {
        var out: [(MigrationPhase, Int, Double, Double)] = []
        for cpu in 0..<PhaseTimer.slots {
            let n = traceCounts[cpu * 8]
            for i in 0..<n {
                let e = trace[cpu * traceCapacity + i]
                let origin = virtualTime ? 0 : startTick
                out.append((MigrationPhase(rawValue: Int(e.phase))!, cpu,
                            Double(e.start &- origin) * nanosPerTick, Double(e.end &- origin) * nanosPerTick))
            }
        }
        return out.map { (phase: $0.0, cpu: $0.1, startNanos: $0.2, endNanos: $0.3) }
    }

    /// Clears every total and trace event.
    public func reset() {
        words.update(repeating: 0, count: PhaseTimer.slots * PhaseTimer.slotWords)
        traceCounts.update(repeating: 0, count: PhaseTimer.slots * 8)
    }
}
