import CSVMSupport

/// The state one `migratePages` call carries through its batches (what the
/// kernel keeps on its stack and in `struct migrate_pages_stats`).
struct MigrateContext {
    let mode: MigrateMode
    let reason: MigrateReason
    let policy: MigratePagesPolicy
    let copier: any FolioCopier
    let start: UInt64
    var stats = MigrateStats()
    var batch = UnmapFlushBatch()
    /// Folios unmapped and locked, waiting for the move (reused per batch).
    var unmapped: [UnmappedFolio] = []
    /// Copy jobs of the move phase (reused per batch).
    var jobs: [FolioCopyJob] = []

    /// One bounded sleep of the migration (a folio lock, a writeback): its
    /// time goes into the lock-wait histogram, and a wait that reached the
    /// policy's limit counts as a stall. Returns what `wait` returned.
    mutating func timedWait(_ wait: () -> Bool) -> Bool {
        let t = HostClock.nanos()
        let done = wait()
        stats.lockWaits.record(HostClock.nanos() - t)
        if !done { stats.stalls += 1 }
        return done
    }
}

/// A folio between `migrate_folio_unmap()` and `migrate_folio_move()`: the
/// source locked and unmapped (migration entries in its place), the
/// destination allocated and locked; what the kernel records in the
/// destination's private field (`__migrate_folio_record()`).
struct UnmappedFolio {
    var src: Folio
    var dst: Folio
    var wasMapped: Bool
    /// The read-only range whose flush is deferred with this folio's old frame.
    var deferred: (context: TLBContext, start: UInt64, end: UInt64)?
    var copied = false
}

/// What `migrate_folio_unmap()` reports for one folio.
enum UnmapOutcome {
    /// Freed under us (only the isolation reference was left): counts as migrated.
    case freed
    case unmapped(UnmappedFolio)
    /// -EAGAIN: try again in a later pass.
    case again
    /// -EBUSY: permanent failure for this call.
    case busy
    /// -ENOMEM: no destination.
    case noMemory
    /// -EDEADLOCK (batched-v6.3-rc): the lock would block while others are held.
    case deadlock
}

extension Kernel {

    /// Migrates isolated folios to new folios that `newFolio` allocates
    /// (on the target node), in batches, with the rules of `mode` and the
    /// algorithm of `policy`.
    ///
    /// Protocol, per batch of up to `policy.batchPages` base pages: for each
    /// folio `migrate_folio_unmap()` allocates the destination, locks the
    /// source (waiting only where the mode and algorithm allow), waits for
    /// writeback only in `.sync`, locks the destination, and replaces every
    /// mapping by a migration entry (`try_to_migrate()`); in ASYNC (and in
    /// every mode for batched-v6.3-rc) the TLB flushes of the batch are
    /// gathered and issued once (`try_to_unmap_flush()`). Then
    /// `migrate_folio_move()` copies the batch with the policy's copier,
    /// checks that only the isolation reference is left
    /// (`folio_migrate_mapping()`; another holder means -EAGAIN and a retry),
    /// remaps the destination where the source was (`remove_migration_ptes()`)
    /// and unlocks both. What cannot move is restored (`migrate_folio_undo_src()`).
    /// A THP that gets no 2 MiB destination is split and its pieces migrated
    /// afterwards in ASYNC with one pass.
    ///
    /// hugetlb folios on the list (isolated with `isolateHugetlbFolio`) go
    /// first, each alone (`migrate_hugetlbs()`, `unmap_and_move_huge_page()`):
    /// no batch and no batched flush, the lock waited for only in SYNC from
    /// the fourth pass, the destination a hugetlb folio (from the pool);
    /// their sources go back to the pool.
    ///
    /// Page-cache folios move as the kernel's `filemap_migrate_folio()`
    /// moves them: unmapped through their file's mappings (`i_mmap`), the
    /// cache entry switched to the destination under the cache lock when
    /// only the isolation and cache references are held (a pin or another
    /// reference is -EAGAIN), the cache's reference and the dirty bit
    /// moving with it.
    ///
    /// Enter with every folio isolated from the LRU (`isolateFolioLRU`) or,
    /// for hugetlb, from the pool's active list, its isolation reference
    /// owned by the list, no folio lock held and no page-table lock held;
    /// may sleep. On return `folios` holds the folios that were not
    /// migrated, still isolated: the caller puts them back
    /// (`putbackMovableFolios`). Migrated sources are freed (hugetlb ones
    /// to the pool), or held by the deferred flush.
    ///
    /// With `phases` on, each batch's steps are timed as the phases `unmap`,
    /// `flush` (the batched flush), `copy` and `remap`; the shootdown wait is
    /// also `tlbFlush`, inside `flush` (or inside `unmap` for the unbatched
    /// algorithm, whose every folio flushes as it is unmapped).
    ///
    /// - Parameters:
    ///   - folios: the list (`from`); on return, the folios left.
    ///   - mode: which waits are allowed.
    ///   - reason: why (a NUMA-balancing THP is not split).
    ///   - policy: algorithm, copier, deferral, batch size, wait bound.
    ///   - newFolio: allocates the destination for a source folio, of the
    ///     same order (`get_new_folio`); nil when there is no memory.
    /// - Returns: folios not migrated, the error that stopped the call
    ///   (`.noMemory`), and the statistics; vmstat counts pgmigrate_success,
    ///   pgmigrate_fail and thp_migration_success/fail/split.
    ///
    /// The corresponding kernel function is `migrate_pages()`.
    public func migratePages(_ folios: inout [Folio], mode: MigrateMode, reason: MigrateReason,
                             policy: MigratePagesPolicy = MigratePagesPolicy(),
                             newFolio: (Folio) -> Folio?) -> MigratePagesResult {
        var ctx = MigrateContext(mode: mode, reason: reason, policy: policy,
                                 copier: policy.copier ?? SingleThreadCopier(), start: HostClock.nanos())
        let copier = ctx.copier
        copier.begin()
        defer { copier.end() }
        ctx.unmapped.reserveCapacity(max(1, min(policy.batchPages, Kernel.maxBatchedMigration)))
        ctx.jobs.reserveCapacity(ctx.unmapped.capacity)
        var from: [Folio] = []
        from.reserveCapacity(folios.count)
        var huge: [Folio] = []
        for f in folios {
            if f.isLarge && f.test(.hugetlb) {
                if f.test(.hugetlbMigratable) || f.refCount < 1 {
                    warn("migrate_pages: hugetlb folio on the list is not isolated (folio_isolate_hugetlb)", "\(f)")
                    continue
                }
                huge.append(f)
                continue
            }
            if f.test(.lru) || f.refCount < 1 || f.isZoneDevice {
                warn("migrate_pages: folio on the list is not isolated from the LRU", "\(f)")
                continue
            }
            from.append(f)
        }
        var ret: [Folio] = []
        var result = MigratePagesResult()
        // hugetlb folios first, one by one, whatever the algorithm.
        var hugeFailed = 0
        if !huge.isEmpty {
            hugeFailed = migrateHugetlbs(&huge, ret: &ret, &ctx, newFolio)
            ret.append(contentsOf: huge)
            if hugeFailed < 0 {
                result.error = Errno(rawValue: Int32(-hugeFailed))
                hugeFailed = 0
                ret.append(contentsOf: from)
                from.removeAll()
            }
        }
        if policy.algorithm == .unbatched {
            result.notMigrated = migratePagesUnbatched(&from, &ret, &ctx, newFolio)
            if result.notMigrated < 0 { result.error = Errno(rawValue: Int32(-result.notMigrated)); result.notMigrated = 0 }
        } else {
            var gathered = 0
            var split: [Folio] = []
            let batchPages = max(1, policy.batchPages)
            while !from.isEmpty {
                // Cut a batch: folios until the pages reach the batch size (the
                // folio that reaches it included).
                var n = 0, cut = 0
                while cut < from.count {
                    n += from[cut].pageCount
                    cut += 1
                    if n >= batchPages { break }
                }
                var batch = Array(from[0..<cut])
                from.removeFirst(cut)
                let rc: Int
                if mode == .async || policy.algorithm == .batchedV63rc {
                    rc = migratePagesBatch(&batch, mode: mode, passes: Kernel.migratePagesRetry, ret: &ret, split: &split,
                                           allowSplit: true, &ctx, newFolio)
                } else {
                    rc = migratePagesSync(&batch, ret: &ret, split: &split, &ctx, newFolio)
                }
                ret.append(contentsOf: batch)
                if rc < 0 {
                    result.error = Errno(rawValue: Int32(-rc))
                    ret.append(contentsOf: split)
                    ret.append(contentsOf: from)
                    from.removeAll()
                    break
                }
                if !split.isEmpty {
                    // Pieces of split THPs: minimal effort, ASYNC, one pass; the
                    // THP already counts as one failed folio in the return value.
                    var pieces = split
                    split.removeAll()
                    _ = migratePagesBatch(&pieces, mode: .async, passes: 1, ret: &ret, split: &split,
                                          allowSplit: false, &ctx, newFolio)
                    ret.append(contentsOf: pieces)
                }
                gathered += rc
            }
            result.notMigrated = gathered
        }
        result.notMigrated += hugeFailed
        folios = ret
        if folios.isEmpty { result.notMigrated = 0 }
        let s = ctx.stats
        if s.succeeded > 0 { vmstat.count(.pgmigrateSuccess, UInt64(s.succeeded)) }
        if s.failedPages > 0 { vmstat.count(.pgmigrateFail, UInt64(s.failedPages)) }
        if s.thpSucceeded > 0 { vmstat.count(.thpMigrationSuccess, UInt64(s.thpSucceeded)) }
        if s.thpFailed > 0 { vmstat.count(.thpMigrationFail, UInt64(s.thpFailed)) }
        if s.thpSplit > 0 { vmstat.count(.thpMigrationSplit, UInt64(s.thpSplit)) }
        result.stats = s
        return result
    }

    /// `migrate_pages_sync()`: the whole batch in ASYNC first (3 passes, one
    /// batched flush), then each folio that failed alone in the requested
    /// mode (7 passes). The ASYNC attempt's failures are not counted: they
    /// are retried.
    func migratePagesSync(_ from: inout [Folio], ret: inout [Folio], split: inout [Folio],
                          _ ctx: inout MigrateContext, _ newFolio: (Folio) -> Folio?) -> Int {
        var failed: [Folio] = []
        let saved = ctx.stats
        ctx.stats = MigrateStats()
        let rc = migratePagesBatch(&from, mode: .async, passes: Kernel.migrateAsyncRetry, ret: &failed, split: &split,
                                   allowSplit: true, &ctx, newFolio)
        var astats = ctx.stats
        ctx.stats = saved
        if rc < 0 {
            ctx.stats.merge(astats)
            ret.append(contentsOf: failed)
            return rc
        }
        // Keep what the ASYNC attempt achieved, not its failures.
        astats.failedPages = 0
        astats.thpFailed = astats.thpSplit
        ctx.stats.merge(astats)
        var nrFailed = astats.thpSplit
        from.append(contentsOf: failed)
        let mode = ctx.mode
        while !from.isEmpty {
            var one = [from.removeFirst()]
            let r = migratePagesBatch(&one, mode: mode, passes: Kernel.migrateSyncRetry, ret: &ret, split: &split,
                                      allowSplit: true, &ctx, newFolio)
            ret.append(contentsOf: one)
            if r < 0 {
                ret.append(contentsOf: from)
                from.removeAll()
                return r
            }
            nrFailed += r
        }
        return nrFailed
    }

    /// `migrate_pages_batch()`: unmap as many folios of `from` as possible
    /// (up to `passes` passes over those that said -EAGAIN), flush once, then
    /// move the unmapped ones (up to `passes` passes over -EAGAIN), and undo
    /// what did not move. Permanent failures go to `ret`; folios still
    /// failing after the passes stay in `from`; split THP pieces go to
    /// `split`. Returns the folios that failed, or -ENOMEM.
    func migratePagesBatch(_ from: inout [Folio], mode: MigrateMode, passes: Int, ret: inout [Folio], split: inout [Folio],
                           allowSplit: Bool, _ ctx: inout MigrateContext, _ newFolio: (Folio) -> Folio?) -> Int {
        let algorithm = ctx.policy.algorithm
        let batchFlush = algorithm == .batchedV63rc || mode == .async
        var nrFailed = 0
        var rcSaved = 0
        while true {
            var stop: UnmapOutcome? = nil
            var retry = 1, thpRetry = 0, retryPages = 0
            var pass = 0
            let t0 = HostClock.nanos()
            let unmapMark = phases.begin()
            while pass < passes && retry > 0 && stop == nil {
                retry = 0; thpRetry = 0; retryPages = 0
                var keep: [Folio] = []
                var i = 0
                while i < from.count {
                    let folio = from[i]
                    i += 1
                    let isTHP = folio.isLarge
                    let pages = folio.pageCount
                    let outcome = migrateFolioUnmap(folio, mode: mode, othersHeld: !ctx.unmapped.isEmpty, force: true,
                                                    batchFlush: batchFlush, &ctx, newFolio)
                    switch outcome {
                    case .freed:
                        ctx.stats.succeeded += pages
                        if isTHP { ctx.stats.thpSucceeded += 1 }
                    case .unmapped(let u):
                        ctx.unmapped.append(u)
                    case .again:
                        retry += 1
                        if isTHP { thpRetry += 1 }
                        retryPages += pages
                        keep.append(folio)
                    case .busy:
                        nrFailed += 1
                        if isTHP { ctx.stats.thpFailed += 1 }
                        ctx.stats.failedPages += pages
                        ret.append(folio)
                    case .noMemory:
                        nrFailed += 1
                        if isTHP { ctx.stats.thpFailed += 1 }
                        if isTHP && allowSplit && ctx.reason != .numaMisplaced && trySplitFolio(folio, into: &split, &ctx) {
                            ctx.stats.thpSplit += 1
                            continue
                        }
                        ctx.stats.failedPages += pages + retryPages
                        ctx.stats.thpFailed += thpRetry
                        rcSaved = -Int(Errno.noMemory.rawValue)
                        keep.append(folio)
                        stop = .noMemory
                    case .deadlock:
                        ctx.stats.deadlockBackoffs += 1
                        keep.append(folio)
                        stop = .deadlock
                    }
                    if stop != nil {
                        keep.append(contentsOf: from[i...])
                        break
                    }
                }
                from = keep
                pass += 1
            }
            if stop == nil {
                nrFailed += retry
                ctx.stats.thpFailed += thpRetry
                ctx.stats.failedPages += retryPages
            }
            let t1 = HostClock.nanos()
            ctx.stats.unmapNanos += t1 - t0
            let flushMark = phases.endAndBegin(.unmap, unmapMark)
            // One flush for every folio unmapped above.
            if !ctx.batch.isEmpty {
                ctx.batch.flush()
                ctx.stats.batchedFlushes += 1
                phases.end(.flush, flushMark)
            }
            ctx.stats.flushNanos += HostClock.nanos() - t1
            nrFailed += moveUnmapped(passes: passes, ret: &ret, &ctx)
            if case .deadlock = stop {
                // Nothing is held now: retry, the blocking lock allowed.
                continue
            }
            return rcSaved != 0 ? rcSaved : nrFailed
        }
    }

    /// The move half of `migrate_pages_batch()`: copy the unmapped folios,
    /// then per folio check references and remap; -EAGAIN is retried up to
    /// `passes` times, then undone. Returns the folios that failed.
    func moveUnmapped(passes: Int, ret: inout [Folio], _ ctx: inout MigrateContext) -> Int {
        guard !ctx.unmapped.isEmpty else { return 0 }
        var failed = 0
        var retry = 1
        var pass = 0
        while pass < passes && retry > 0 {
            retry = 0
            copyUnmapped(&ctx)
            let t0 = HostClock.nanos()
            let mark = phases.begin()
            var i = 0
            while i < ctx.unmapped.count {
                if migrateFolioMove(ctx.unmapped[i], &ctx) {
                    ctx.unmapped.swapAt(i, ctx.unmapped.count - 1)
                    ctx.unmapped.removeLast()
                } else {
                    retry += 1
                    i += 1
                }
            }
            ctx.stats.remapNanos += HostClock.nanos() - t0
            phases.end(.remap, mark)
            pass += 1
        }
        // What did not move: undo.
        for u in ctx.unmapped {
            failed += 1
            if u.src.isLarge { ctx.stats.thpFailed += 1 }
            ctx.stats.failedPages += u.src.pageCount
            migrateFolioUndo(u)
            ret.append(u.src)
        }
        ctx.unmapped.removeAll(keepingCapacity: true)
        return failed
    }

    /// Copies every unmapped folio not copied yet, with the policy's copier.
    func copyUnmapped(_ ctx: inout MigrateContext) {
        ctx.jobs.removeAll(keepingCapacity: true)
        for i in ctx.unmapped.indices where !ctx.unmapped[i].copied {
            let u = ctx.unmapped[i]
            ctx.jobs.append(FolioCopyJob(destination: u.dst.unsafeBytes, source: UnsafeRawPointer(u.src.unsafeBytes), bytes: u.src.size))
            ctx.unmapped[i].copied = true
        }
        guard !ctx.jobs.isEmpty else { return }
        let t0 = HostClock.nanos()
        let mark = phases.begin()
        let copier = ctx.copier
        ctx.jobs.withUnsafeBufferPointer { copier.copy($0) }
        phases.end(.copy, mark)
        ctx.stats.copyNanos += HostClock.nanos() - t0
    }
}
