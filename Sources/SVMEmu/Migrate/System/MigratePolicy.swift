import CSVMSupport

/// The choices of one `migratePages` call beyond the kernel's mode: which
/// generation of the algorithm, how the move phase copies, whether
/// read-only folios defer their flush, and the emulator's bound on waits.
public struct MigratePagesPolicy: Sendable {
    /// Which kernel's migrate_pages runs (mainline by default).
    public var algorithm: MigrationAlgorithm = .batched
    /// The move phase's copier; nil copies on the migrating thread (`SingleThreadCopier`).
    public var copier: (any FolioCopier)? = nil
    /// migrc / LUF: folios whose every mapping was read-only skip the batched
    /// flush and hold their old frame until the kernel's deferred flush.
    public var deferredFlush = false
    /// Base pages per batch: `NR_MAX_BATCHED_MIGRATION` (512) in the kernel;
    /// the benchmark sweeps it.
    public var batchPages = Kernel.maxBatchedMigration
    /// PF_MEMALLOC (direct compaction): never wait for a folio lock.
    public var memalloc = false
    /// The longest the emulator lets one folio-lock or writeback wait sleep.
    /// The kernel's waits are unbounded; here a wait that reaches the limit
    /// is reported as a hung task (a diagnostic and `MigrateStats.stalls`)
    /// and the folio is treated as busy, so that a deadlock ends a test
    /// instead of hanging it.
    public var waitLimitNanos: UInt64 = 5_000_000_000
    public init(algorithm: MigrationAlgorithm = .batched, copier: (any FolioCopier)? = nil, deferredFlush: Bool = false,
                batchPages: Int = Kernel.maxBatchedMigration) {
        self.algorithm = algorithm
        self.copier = copier
        self.deferredFlush = deferredFlush
        self.batchPages = batchPages
    }
}

/// A small histogram of wait times: bucket `i` counts waits of
/// `[2^i, 2^(i+1))` nanoseconds (bucket 0 also holds 0 and 1 ns).
public struct WaitHistogram: Sendable, Hashable {
    public private(set) var buckets = [UInt64](repeating: 0, count: 40)
    public private(set) var count: UInt64 = 0
    public private(set) var totalNanos: UInt64 = 0
    public private(set) var maxNanos: UInt64 = 0
    public init() {}
    public mutating func record(_ nanos: UInt64) {
        let b = nanos < 2 ? 0 : min(39, 63 - nanos.leadingZeroBitCount)
        buckets[b] += 1
        count += 1
        totalNanos &+= nanos
        maxNanos = max(maxNanos, nanos)
    }
    public mutating func merge(_ o: WaitHistogram) {
        for i in 0..<40 { buckets[i] += o.buckets[i] }
        count += o.count
        totalNanos &+= o.totalNanos
        maxNanos = max(maxNanos, o.maxNanos)
    }
    /// The upper bound of the bucket holding quantile `q` (0...1), in ns.
    public func quantile(_ q: Double) -> UInt64 {
        guard count > 0 else { return 0 }
        let target = UInt64((Double(count) * q).rounded(.up))
        var seen: UInt64 = 0
        for (i, n) in buckets.enumerated() {
            seen += n
            if seen >= max(1, target) { return min(maxNanos, (UInt64(1) << UInt64(i + 1)) - 1) }
        }
        return maxNanos
    }
}

/// What one `migratePages` call did, in the kernel's units
/// (`struct migrate_pages_stats`) plus the emulator's timing.
public struct MigrateStats: Sendable, Hashable {
    /// Base pages migrated (pgmigrate_success).
    public var succeeded = 0
    /// Base pages that failed (pgmigrate_fail); folios never tried are not counted.
    public var failedPages = 0
    /// THPs migrated whole / failed / split (thp_migration_*).
    public var thpSucceeded = 0
    public var thpFailed = 0
    public var thpSplit = 0
    /// Batched flushes (`try_to_unmap_flush()` calls that flushed something).
    public var batchedFlushes = 0
    /// Folios whose flush was deferred (migrc / LUF).
    public var deferredFolios = 0
    /// -EDEADLOCK back-offs (batched-v6.3-rc).
    public var deadlockBackoffs = 0
    /// Waits that reached `waitLimitNanos` (reported as hung tasks).
    public var stalls = 0
    /// Folio-lock and writeback waits, by length.
    public var lockWaits = WaitHistogram()
    /// Time in the unmap, flush, copy and remap steps, and from the call's
    /// start to the first folio remapped at its destination (0: none).
    public var unmapNanos: UInt64 = 0
    public var flushNanos: UInt64 = 0
    public var copyNanos: UInt64 = 0
    public var remapNanos: UInt64 = 0
    public var firstFolioNanos: UInt64 = 0
    public init() {}

    /// Adds another call's statistics (the first-folio time stays the first one seen).
    public mutating func merge(_ o: MigrateStats) {
        succeeded += o.succeeded; failedPages += o.failedPages
        thpSucceeded += o.thpSucceeded; thpFailed += o.thpFailed; thpSplit += o.thpSplit
        batchedFlushes += o.batchedFlushes; deferredFolios += o.deferredFolios
        deadlockBackoffs += o.deadlockBackoffs; stalls += o.stalls
        lockWaits.merge(o.lockWaits)
        unmapNanos += o.unmapNanos; flushNanos += o.flushNanos; copyNanos += o.copyNanos; remapNanos += o.remapNanos
        if firstFolioNanos == 0 { firstFolioNanos = o.firstFolioNanos }
    }
}

/// The outcome of `migratePages`: how many folios were not migrated (the
/// kernel's non-negative return), the error that stopped it early (-ENOMEM),
/// and the statistics.
public struct MigratePagesResult: Sendable {
    /// Folios not migrated; a split THP counts as one whatever its pieces did.
    public var notMigrated = 0
    /// `.noMemory` when a destination could not be allocated and the call stopped.
    public var error: Errno? = nil
    public var stats = MigrateStats()
}

extension Kernel {
    /// `NR_MAX_BATCHED_MIGRATION`: base pages unmapped and flushed together (HPAGE_PMD_NR).
    public static let maxBatchedMigration = 512
    /// `NR_MAX_MIGRATE_PAGES_RETRY`.
    static let migratePagesRetry = 10
    /// `NR_MAX_MIGRATE_ASYNC_RETRY`: the ASYNC passes of a SYNC call's batch.
    static let migrateAsyncRetry = 3
    /// `NR_MAX_MIGRATE_SYNC_RETRY`: the passes of each folio retried alone.
    static let migrateSyncRetry = migratePagesRetry - migrateAsyncRetry
}
