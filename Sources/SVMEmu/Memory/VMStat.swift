import Synchronization
import CSVMSupport

/// Event counters of the emulated kernel, named like `/proc/vmstat` where the
/// kernel has the same counter.
///
/// Each case's ``name`` is the counter's name in ``VMStat/snapshot()``.
public enum VMStatItem: Int, CaseIterable, Sendable {
    /// Base pages allocated; frees, failed 4 KiB and 2 MiB allocations.
    case pgalloc, pgfree, allocFail, thpAllocFail
    /// Page faults (major ones, demand-zero pages, zero-page maps,
    /// write-protect faults, and those of them that copied the page).
    case pgfault, pgmajfault, demandZeroFaults, zeroPageMaps, wpFaults, cowFaults
    /// Device-exclusive entries made, and restored by a CPU fault.
    case deviceExclusiveMade, deviceExclusiveRestored
    /// THP faults, huge zero page maps, PMD and folio splits, collapses.
    case thpFaultAlloc, thpZeroPageMap, thpSplitPmd, thpSplitPage, thpCollapseAlloc
    /// Sleeps on a migration entry; sleeps on a folio lock.
    case migrationEntryWaits, folioLockWaits
    /// Pages migrated or not (by finalize); THP migrations that succeeded, failed, were split.
    case pgmigrateSuccess, pgmigrateFail, thpMigrationSuccess, thpMigrationFail, thpMigrationSplit
    /// migrate_vma entries collected, skipped, restored by the unmap step.
    case migrateVMACollected, migrateVMASkipped, migrateVMARestored
    /// CPU faults on device-private entries, those that returned to retry, `migrateToRAM` calls.
    case deviceFaults, deviceFaultRetries, migrateToRAMCalls
    /// TLB flush accounting (see ``AddressSpace/flushTLBRange(_:_:)``).
    case tlbLocalFlushAll, tlbLocalFlushOne, tlbRemoteFlush, tlbRemoteFlushReceived, tlbPagesFlushed
    /// IPIs sent by shootdowns; accesses through a stale TLB entry (the checker).
    case tlbIPIsSent, tlbStaleAccesses
    /// MMU-notifier invalidations started.
    case mmuNotifierInvalidations

    /// The /proc/vmstat-style name.
    public var name: String {
        switch self {
        case .pgalloc: "pgalloc"
        case .pgfree: "pgfree"
        case .allocFail: "alloc_fail"
        case .thpAllocFail: "thp_fault_fallback"
        case .pgfault: "pgfault"
        case .pgmajfault: "pgmajfault"
        case .demandZeroFaults: "demand_zero_faults"
        case .zeroPageMaps: "zero_page_maps"
        case .wpFaults: "wp_faults"
        case .cowFaults: "cow_faults"
        case .deviceExclusiveMade: "device_exclusive_made"
        case .deviceExclusiveRestored: "device_exclusive_restored"
        case .thpFaultAlloc: "thp_fault_alloc"
        case .thpZeroPageMap: "thp_zero_page_alloc"
        case .thpSplitPmd: "thp_split_pmd"
        case .thpSplitPage: "thp_split_page"
        case .thpCollapseAlloc: "thp_collapse_alloc"
        case .migrationEntryWaits: "migration_entry_waits"
        case .folioLockWaits: "folio_lock_waits"
        case .pgmigrateSuccess: "pgmigrate_success"
        case .pgmigrateFail: "pgmigrate_fail"
        case .thpMigrationSuccess: "thp_migration_success"
        case .thpMigrationFail: "thp_migration_fail"
        case .thpMigrationSplit: "thp_migration_split"
        case .migrateVMACollected: "migrate_vma_collected"
        case .migrateVMASkipped: "migrate_vma_skipped"
        case .migrateVMARestored: "migrate_vma_restored"
        case .deviceFaults: "device_private_faults"
        case .deviceFaultRetries: "device_private_fault_retries"
        case .migrateToRAMCalls: "migrate_to_ram_calls"
        case .tlbLocalFlushAll: "nr_tlb_local_flush_all"
        case .tlbLocalFlushOne: "nr_tlb_local_flush_one"
        case .tlbRemoteFlush: "nr_tlb_remote_flush"
        case .tlbRemoteFlushReceived: "nr_tlb_remote_flush_received"
        case .tlbPagesFlushed: "tlb_pages_flushed"
        case .tlbIPIsSent: "tlb_ipis_sent"
        case .tlbStaleAccesses: "tlb_stale_accesses"
        case .mmuNotifierInvalidations: "mmu_notifier_invalidations"
        }
    }
}

/// Counters, one cache line apart so that two CPUs counting different events
/// do not share a line.
public final class VMStat: @unchecked Sendable {
    private static let stride = 8  // UInt64 words between counters: 64 bytes
    private let words: UnsafeMutablePointer<UInt64>

    init() {
        let n = VMStatItem.allCases.count * VMStat.stride
        words = .allocate(capacity: n)
        words.initialize(repeating: 0, count: n)
    }
    deinit { words.deallocate() }

    /// Adds `n` to the counter: one relaxed atomic add, from any thread.
    @inlinable @inline(__always)
    public func count(_ item: VMStatItem, _ n: UInt64 = 1) {
        _ = UnsafeAtomic(word(item)).wrappingAdd(n, ordering: .relaxed).newValue
    }
    @usableFromInline func word(_ item: VMStatItem) -> UnsafeMutablePointer<UInt64> {
        words + item.rawValue * VMStat.stride
    }
    /// The counter's value: a relaxed snapshot.
    public subscript(_ item: VMStatItem) -> UInt64 { UnsafeAtomic(word(item)).load(ordering: .acquiring) }

    /// Every counter by its /proc/vmstat-style name.
    public func snapshot() -> [String: UInt64] {
        var d: [String: UInt64] = [:]
        for item in VMStatItem.allCases { d[item.name] = self[item] }
        return d
    }
}
