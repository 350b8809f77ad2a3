/// How hard `migratePages` may try: which waits it may sleep in.
///
/// The mainline rules (since v6.5): `async` never waits for a folio lock or
/// for writeback (a locked folio is retried later, one under writeback fails
/// with -EBUSY); `syncLight` waits for the folio lock only when the folio is
/// uptodate, never for writeback; `sync` waits for both. A caller marked as
/// reclaiming memory (`MigratePagesPolicy.memalloc`, PF_MEMALLOC: direct
/// compaction) never waits for a folio lock whatever the mode.
public enum MigrateMode: String, Sendable, CaseIterable, Codable {
    /// MIGRATE_ASYNC.
    case async
    /// MIGRATE_SYNC_LIGHT.
    case syncLight = "sync-light"
    /// MIGRATE_SYNC.
    case sync
}

/// Why folios are migrated (`enum migrate_reason`); carried into the trace
/// and the statistics, and one rule depends on it: a large folio migrated for
/// NUMA balancing is not split when it finds no 2 MiB destination.
public enum MigrateReason: String, Sendable, CaseIterable, Codable {
    /// MR_COMPACTION.
    case compaction
    /// MR_MEMORY_HOTPLUG.
    case memoryHotplug = "memory-hotplug"
    /// MR_SYSCALL: move_pages(2), migrate_pages(2).
    case syscall
    /// MR_MEMPOLICY_MBIND.
    case mempolicyMbind = "mempolicy-mbind"
    /// MR_NUMA_MISPLACED: NUMA balancing.
    case numaMisplaced = "numa-misplaced"
    /// MR_DEMOTION: memory tiering.
    case demotion
}

/// Which generation of the kernel's `migrate_pages()` runs, chosen per call
/// like the device fault policy. Each is faithful to the kernel it names.
public enum MigrationAlgorithm: String, Sendable, CaseIterable, Codable {
    /// Before v6.3: one folio at a time, unmapped (a TLB flush per mapping),
    /// copied and remapped before the next is touched; up to 10 passes, and a
    /// folio lock or writeback is waited for only from the fourth pass on.
    case unbatched
    /// v6.3-rc1 (Huang Ying's first batching series): up to
    /// `NR_MAX_BATCHED_MIGRATION` (512) base pages are unmapped in every
    /// mode, flushed once, then moved. While other folios of the batch are
    /// locked, a folio whose lock would block returns -EDEADLOCK: the batch
    /// moves and unlocks what it holds, then retries that folio with the
    /// blocking lock allowed. Writeback is still waited for in SYNC with the
    /// other folios held: the deadlock Hugh Dickins and Pengfei Xu hit.
    case batchedV63rc = "batched-v6.3-rc"
    /// Mainline since March 2023: each batch runs in ASYNC first (3 passes,
    /// one batched flush), then every folio that failed is retried alone in
    /// the requested mode (7 passes). ASYNC callers get 10 batched passes.
    case batched
    /// Douglas Anderson's RFC (April 2023): mainline, but every mode only
    /// tries the folio lock and never sleeps on it (what merged in v6.5 kept
    /// only the SYNC_LIGHT uptodate rule).
    case neverBlock = "never-block"
}
