import CSVMSupport

// hugetlb folios in migrate_pages(): isolated from the pool's active list
// (they are never on the LRU), migrated before the rest of the list, one at
// a time and without a batched flush, by unmap_and_move_huge_page(); the
// destination comes from the pool (HugeTLBPool.allocateMigrationTarget).

/// What `unmap_and_move_huge_page()` reports for one hugetlb folio.
enum HugeTLBMigrateOutcome {
    /// Migrated, or freed under us: the source is back in the pool.
    case migrated
    /// -EAGAIN: locked, still mapped, or referenced elsewhere; retried in a later pass.
    case again
    /// -EBUSY: a permanent failure for this call.
    case busy
    /// -ENOMEM: no destination.
    case noMemory
}

extension Kernel {

    /// Isolates a hugetlb folio for migration: only an in-use one on the
    /// pool's active list (mapped by a fault, not isolated already) whose
    /// reference count is not zero; the migration list owns the reference
    /// taken. False when it cannot be isolated (not hugetlb, free, or on
    /// another migration list).
    ///
    /// Takes the hugetlb pool lock; the caller holds a reference or a
    /// page-table lock of a mapping, so the folio cannot be freed meanwhile.
    /// Put the folio back with ``putbackMovableFolios(_:)``.
    ///
    /// - Parameters:
    ///   - folio: a hugetlb folio (``PageFlags/hugetlb``).
    /// - Returns: whether it was isolated.
    ///
    /// The corresponding kernel function is `folio_isolate_hugetlb()`.
    public func isolateHugetlbFolio(_ folio: Folio) -> Bool {
        hugetlb.isolate(folio)
    }

    /// The destination a migration to `node` allocates for `src`: a pool
    /// page (or a temporary one) for a hugetlb folio
    /// (``HugeTLBPool/allocateMigrationTarget(node:fallback:)``), else a
    /// folio of `src`'s order from `node`'s memory. What move_pages and
    /// migrate_pages pass to ``migratePages(_:mode:reason:policy:newFolio:)``
    /// (with `__GFP_THISNODE`: `node` only).
    ///
    /// - Parameters:
    ///   - src: the folio to migrate.
    ///   - node: the node the destination must be on.
    /// - Returns: the destination with one reference for the caller, or nil
    ///   when `node` has no memory for it.
    ///
    /// The corresponding kernel function is `alloc_migration_target()`.
    public func allocateMigrationTarget(for src: Folio, node: Int) -> Folio? {
        if src.isLarge && src.test(.hugetlb) { return hugetlb.allocateMigrationTarget(node: node) }
        return allocateFolio(order: src.order, node: node)
    }

    /// `migrate_hugetlbs()`: up to `NR_MAX_MIGRATE_PAGES_RETRY` passes over
    /// the hugetlb folios of the list, each folio unmapped, copied and
    /// remapped alone (``unmapAndMoveHugePage(_:force:_:_:)``); the folio
    /// lock is waited for (in SYNC only) from the fourth pass. Migrated
    /// folios leave `from`; permanent failures go to `ret`; those still
    /// failing with -EAGAIN after the passes stay in `from`. -ENOMEM stops
    /// at once, the folio and the ones not tried staying in `from`.
    ///
    /// Returns the folios that failed, or -ENOMEM; counts `succeeded` and
    /// `failedPages` in `ctx` (a hugetlb folio is no THP).
    func migrateHugetlbs(_ from: inout [Folio], ret: inout [Folio], _ ctx: inout MigrateContext,
                         _ newFolio: (Folio) -> Folio?) -> Int {
        var nrFailed = 0
        var retry = 1
        var retryPages = 0
        var pass = 0
        var keep: [Folio] = []
        keep.reserveCapacity(from.count)
        while pass < Kernel.migratePagesRetry && retry > 0 {
            retry = 0
            retryPages = 0
            keep.removeAll(keepingCapacity: true)
            var i = 0
            while i < from.count {
                let folio = from[i]
                i += 1
                let pages = folio.pageCount
                switch unmapAndMoveHugePage(folio, force: pass > 2, &ctx, newFolio) {
                case .migrated:
                    ctx.stats.succeeded += pages
                case .again:
                    retry += 1
                    retryPages += pages
                    keep.append(folio)
                case .busy:
                    nrFailed += 1
                    ctx.stats.failedPages += pages
                    ret.append(folio)
                case .noMemory:
                    ctx.stats.failedPages += pages + retryPages
                    keep.append(contentsOf: from[(i - 1)...])
                    from = keep
                    return -Int(Errno.noMemory.rawValue)
                }
            }
            swap(&from, &keep)
            pass += 1
        }
        nrFailed += retry
        ctx.stats.failedPages += retryPages
        return nrFailed
    }

    /// `unmap_and_move_huge_page()` for one isolated hugetlb folio: allocate
    /// the destination (`newFolio`, from the pool), lock the source (without
    /// sleeping unless `force` and the mode is SYNC, as the kernel waits
    /// only there; never under the never-block algorithm), lock the
    /// destination, replace every PMD mapping by a migration entry with an
    /// immediate flush (``tryToMigrateHugetlb(_:)``), then, if nothing maps
    /// it any more and only the isolation reference is left
    /// (`folio_migrate_mapping()` with no mapping: hugetlb folios here are
    /// private, anonymous), copy the 2 MiB and its flags, and map the
    /// destination (or the source again) where the source was. No writeback
    /// wait: hugetlb folios are never under writeback.
    ///
    /// On success the source takes over the destination's temporary status
    /// (`move_hugetlb_state()`) and both are put back
    /// (`folio_putback_hugetlb()`): the source's last reference returns it
    /// to the pool (or its node, when temporary). Otherwise the destination
    /// goes back and the source stays isolated for a later pass.
    ///
    /// Enter holding the isolation reference, no folio lock and no
    /// page-table lock; may sleep.
    func unmapAndMoveHugePage(_ src: Folio, force: Bool, _ ctx: inout MigrateContext,
                              _ newFolio: (Folio) -> Folio?) -> HugeTLBMigrateOutcome {
        if src.refCount == 1 {
            // Only the isolation reference is left: the folio was freed under us.
            hugetlb.putback(src)
            return .migrated
        }
        guard let dst = newFolio(src) else { return .noMemory }
        guard dst.order == src.order, dst.test(.hugetlb) else {
            warn("migrate_pages: the destination of a hugetlb folio must be a hugetlb folio of its order (alloc_hugetlb_folio_nodemask)",
                 "src \(src), dst \(dst)")
            dst.put()
            return .busy
        }
        let t0 = HostClock.nanos()
        let mark = phases.begin()
        if !src.tryLock() {
            guard force && ctx.mode == .sync && ctx.policy.algorithm != .neverBlock else {
                hugetlb.putback(dst)
                return .again
            }
            let limit = ctx.policy.waitLimitNanos
            if !ctx.timedWait({ src.lock(timeoutNanos: limit) }) {
                warn("migrate_pages: hung task: a folio lock wait reached the limit", "\(src), \(limit / 1_000_000) ms", kind: .hungTask)
                hugetlb.putback(dst)
                return .again
            }
        }
        _ = dst.tryLock()  // a new folio: nobody else can hold it
        let wasMapped = src.isMapped
        if wasMapped { tryToMigrateHugetlb(src) }
        let t1 = HostClock.nanos()
        ctx.stats.unmapNanos += t1 - t0
        var migrated = false
        if !src.isMapped && folioMigrateMapping(dst, src, extraCount: 0) {
            // migrate_folio(): the reference check passed, no turning back.
            let copyMark = phases.endAndBegin(.unmap, mark)
            if _slowPath(svm_det_active()) { DeterministicScheduler.copied(bytes: src.size) }
            dst.copyBytes(from: src)
            folioMigrateFlags(dst, src)
            phases.end(.copy, copyMark)
            migrated = true
        } else {
            phases.end(.unmap, mark)
        }
        let t2 = HostClock.nanos()
        if migrated { ctx.stats.copyNanos += t2 - t1 }
        let remapMark = phases.begin()
        if wasMapped { removeMigrationHugetlbPTEs(src, migrated ? dst : src) }
        phases.end(.remap, remapMark)
        ctx.stats.remapNanos += HostClock.nanos() - t2
        dst.unlock()
        if migrated {
            hugetlb.moveState(src, dst)
            if ctx.stats.firstFolioNanos == 0 { ctx.stats.firstFolioNanos = max(1, HostClock.nanos() - ctx.start) }
        }
        src.unlock()
        if migrated { hugetlb.putback(src) }
        hugetlb.putback(dst)
        return migrated ? .migrated : .again
    }

    /// `try_to_migrate()` for a hugetlb folio: every PMD entry that maps it,
    /// in the address space its rmap names and the rest of that one's fork
    /// family (`rmap_walk_anon()`), becomes a migration entry, inside an
    /// `MMU_NOTIFY_CLEAR` invalidation, flushed at once (hugetlb unmaps
    /// never batch their flush), the mapping's rmap and reference dropped.
    /// An exclusive folio that may be pinned is left mapped and the walk
    /// stops (`hugetlb_try_share_anon_rmap()` refuses to share it): the
    /// migration then fails with -EAGAIN.
    ///
    /// Caller holds the folio lock and a reference, and no page-table lock;
    /// each entry changes under its PMD lock.
    func tryToMigrateHugetlb(_ folio: Folio) {
        var stop = false
        rmapWalkAnon(folio, pages: 0..<1, hint: nil) { _, mm, address in
            guard !stop, address & ~PageGeometry.pmdMask == 0 else { return }
            let end = address + PageGeometry.pmdSize64
            let range = MMUNotifierRange(start: address, end: end, event: .clear, owner: nil)
            mm.invalidateRangeStart(range)
            defer { mm.invalidateRangeEnd(range) }
            let unmapped = mm.withPMDLock(address) { () -> Bool in
                let pmd = mm.loadPMD(address)
                guard pmd.kind == .present, pmd.pfn == folio.pfn else { return false }
                let exclusive = folio.page(0).isAnonExclusive
                if exclusive && folio.isMaybeDMAPinned {
                    stop = true
                    return false
                }
                setPMDMigrationEntry(mm, address, pmd, folio, anonExclusive: exclusive)
                return true
            }
            guard unmapped else { return }
            mm.flushTLBRange(address, end)
            folio.put()
        }
    }

    /// `remove_migration_ptes()` for a hugetlb folio: every PMD migration
    /// entry of `src` in its rmap's fork family becomes a mapping of `dst`
    /// (`src` itself on a restore), which takes a reference and an entire
    /// map count (`hugetlb_add_anon_rmap()`, exclusive unless the entry was
    /// plainly readable). Caller holds both folio locks and no page-table
    /// lock.
    func removeMigrationHugetlbPTEs(_ src: Folio, _ dst: Folio) {
        rmapWalkAnon(src, pages: 0..<1, hint: nil) { _, mm, address in
            guard address & ~PageGeometry.pmdMask == 0 else { return }
            mm.withPMDLock(address) {
                let pmd = mm.loadPMD(address)
                guard pmd.kind == .migration, pmd.pfn == src.pfn else { return }
                dst.get()
                mm.addEntireAnonRmap(dst, address: address, exclusive: pmd.isWrite || pmd.isReadExclusive)
                mm.storePMD(address, PageTableEntry.replacing(migration: pmd, with: dst, pfn: dst.pfn))
            }
        }
    }
}
