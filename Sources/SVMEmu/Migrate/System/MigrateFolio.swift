import CSVMSupport

/// migrate_pages() folio by folio: the unmap, move and undo of one folio,
/// the split of a folio that cannot move whole, the unbatched path, and
/// the LRU isolation and putback around them.
extension Kernel {
    /// `migrate_folio_unmap()` for one isolated folio: see `migratePages`.
    /// `othersHeld`: other folios of the batch are locked (the -EDEADLOCK
    /// rule of batched-v6.3-rc); `force`: the unbatched algorithm's
    /// "pass > 2", before which it never sleeps.
    func migrateFolioUnmap(_ src: Folio, mode: MigrateMode, othersHeld: Bool, force: Bool, batchFlush: Bool,
                           _ ctx: inout MigrateContext, _ newFolio: (Folio) -> Folio?) -> UnmapOutcome {
        if src.refCount == 1 {
            // Only the isolation reference is left: the folio was freed under us.
            src.put()
            return .freed
        }
        guard let dst = newFolio(src) else { return .noMemory }
        if dst.order != src.order {
            warn("migrate_pages: new folio's order differs from the source's", "src \(src), dst \(dst)")
            dst.put()
            return .busy
        }
        let algorithm = ctx.policy.algorithm
        let limit = ctx.policy.waitLimitNanos
        if !src.tryLock() {
            var mayWait: Bool
            switch algorithm {
            case .neverBlock: mayWait = false
            case .unbatched: mayWait = force && mode != .async
            case .batched, .batchedV63rc:
                mayWait = mode != .async && !(algorithm == .batched && mode == .syncLight && !src.test(.uptodate))
            }
            if ctx.policy.memalloc { mayWait = false }
            guard mayWait else { dst.put(); return .again }
            if algorithm == .batchedV63rc && othersHeld {
                dst.put()
                return .deadlock
            }
            if !ctx.timedWait({ src.lock(timeoutNanos: limit) }) {
                warn("migrate_pages: hung task: a folio lock wait reached the limit", "\(src), \(limit / 1_000_000) ms", kind: .hungTask)
                dst.put()
                return .again
            }
        }
        if src.isWriteback {
            guard mode == .sync else { src.unlock(); dst.put(); return .busy }
            guard force else { src.unlock(); dst.put(); return .again }
            if !ctx.timedWait({ src.waitWriteback(timeoutNanos: limit) }) {
                warn("migrate_pages: hung task: a writeback wait reached the limit", "\(src), \(ctx.unmapped.count) other folios locked, \(limit / 1_000_000) ms", kind: .hungTask)
                src.unlock()
                dst.put()
                return .again
            }
        }
        _ = dst.tryLock()  // a new folio: nobody else can hold it
        var wasMapped = false
        var deferred: (TLBContext, UInt64, UInt64)? = nil
        if src.isMapped {
            wasMapped = true
            if batchFlush {
                withUnsafeMutablePointer(to: &ctx.batch) { tryToMigrate(src, batch: $0) }
                deferred = ctx.batch.takeFolio(deferrable: ctx.policy.deferredFlush)
                // From here CPUs may read the old frame through translations
                // whose flush is deferred, also once the new page is mapped:
                // the stale-entry checker reads this flag.
                if deferred != nil { src.set(.deferredFlush) }
            } else {
                tryToMigrate(src)
            }
        }
        if src.isMapped {
            if wasMapped { removeMigrationPTEs(src, src) }
            src.clear(.deferredFlush)  // mapped again: stale entries name the mapped frame
            src.unlock()
            dst.unlock()
            dst.put()
            return .again
        }
        return .unmapped(UnmappedFolio(src: src, dst: dst, wasMapped: wasMapped, deferred: deferred.map { (context: $0.0, start: $0.1, end: $0.2) }))
    }

    /// `migrate_folio_move()` for one unmapped, copied folio: the reference
    /// check, then the destination takes the source's place. Returns false
    /// (-EAGAIN) when someone else holds a reference to the source.
    func migrateFolioMove(_ u: UnmappedFolio, _ ctx: inout MigrateContext) -> Bool {
        let src = u.src, dst = u.dst
        guard folioMigrateMapping(dst, src, extraCount: 0) else { return false }
        folioMigrateFlags(dst, src)
        dst.set(.lru)
        if u.wasMapped { removeMigrationPTEs(src, dst) }
        // The old frame waits for the deferred flush (the isolation
        // reference is its last one), held before the new folio's lock
        // drops: whoever takes that lock next to write the folio (pwrite)
        // finds the flush pending and gives it up first.
        let holdsFull = u.deferred.map { d in deferredTLB.hold(src, d.context, d.start, d.end) }
        dst.unlock()
        src.unlock()
        if ctx.stats.firstFolioNanos == 0 { ctx.stats.firstFolioNanos = max(1, HostClock.nanos() - ctx.start) }
        ctx.stats.succeeded += src.pageCount
        if src.isLarge { ctx.stats.thpSucceeded += 1 }
        if let full = holdsFull {
            ctx.stats.deferredFolios += 1
            if full { deferredTLB.flush() }
        } else {
            src.put()
        }
        dst.put()
        return true
    }

    /// `migrate_folio_undo_src()` / `_dst()`: the source gets its mappings
    /// back and is unlocked (still isolated); the destination is freed.
    func migrateFolioUndo(_ u: UnmappedFolio) {
        if u.wasMapped { removeMigrationPTEs(u.src, u.src) }
        if u.deferred != nil { u.src.clear(.deferredFlush) }  // mapped again
        u.src.unlock()
        u.dst.unlock()
        u.dst.put()
    }

    /// `try_split_folio()`: split an isolated THP (taking its lock) into
    /// 512 isolated small folios appended to `split`. False when it cannot
    /// be split (other references).
    func trySplitFolio(_ folio: Folio, into split: inout [Folio], _ ctx: inout MigrateContext) -> Bool {
        guard folio.lock(timeoutNanos: ctx.policy.waitLimitNanos) else { return false }
        var mapped = [Bool](repeating: false, count: folio.pageCount)
        for i in 1..<folio.pageCount { mapped[i] = folio.page(i).mapCount > 0 || folio.entireMapCount > 0 }
        let ok = splitFolio(folio)
        folio.unlock()
        guard ok else { return false }
        split.append(folio)
        for i in 1..<mapped.count where mapped[i] {
            let tail = Folio(pfn: folio.pfn + UInt64(i), kernel: self)
            tail.get()  // the isolation reference the split list holds
            split.append(tail)
        }
        return true
    }

    /// Before v6.3 (`unmap_and_move()` in a loop of 10 passes): each folio is
    /// unmapped, flushed, copied and remapped before the next; the folio lock
    /// and writeback are waited for only from the fourth pass. A THP with no
    /// 2 MiB destination is split and its pieces join the list.
    func migratePagesUnbatched(_ from: inout [Folio], _ ret: inout [Folio], _ ctx: inout MigrateContext,
                               _ newFolio: (Folio) -> Folio?) -> Int {
        var nrFailed = 0
        var retry = 1
        var pass = 0
        let mode = ctx.mode
        while pass < Kernel.migratePagesRetry && retry > 0 {
            retry = 0
            var keep: [Folio] = []
            var i = 0
            while i < from.count {
                let folio = from[i]
                i += 1
                let t0 = HostClock.nanos()
                let mark = phases.begin()
                // Each folio's flush is inside its unmap (try_to_migrate without TTU_BATCH_FLUSH).
                let outcome = migrateFolioUnmap(folio, mode: mode, othersHeld: false, force: pass > 2,
                                                batchFlush: false, &ctx, newFolio)
                phases.end(.unmap, mark)
                ctx.stats.unmapNanos += HostClock.nanos() - t0
                switch outcome {
                case .freed:
                    ctx.stats.succeeded += folio.pageCount
                case .unmapped(let u):
                    ctx.unmapped.append(u)
                    if moveUnmapped(passes: 1, ret: &keep, &ctx) > 0 {
                        // The reference check failed: retried in the next pass.
                        ctx.stats.failedPages -= folio.pageCount
                        if folio.isLarge { ctx.stats.thpFailed -= 1 }
                        retry += 1
                    }
                case .again:
                    retry += 1
                    keep.append(folio)
                case .busy:
                    nrFailed += 1
                    ctx.stats.failedPages += folio.pageCount
                    if folio.isLarge { ctx.stats.thpFailed += 1 }
                    ret.append(folio)
                case .noMemory:
                    if folio.isLarge && ctx.reason != .numaMisplaced {
                        var pieces: [Folio] = []
                        if trySplitFolio(folio, into: &pieces, &ctx) {
                            ctx.stats.thpSplit += 1
                            from.append(contentsOf: pieces)
                            continue
                        }
                    }
                    ctx.stats.failedPages += folio.pageCount
                    if folio.isLarge { ctx.stats.thpFailed += 1 }
                    keep.append(folio)
                    keep.append(contentsOf: from[i...])
                    from = keep
                    ret.append(contentsOf: from)
                    from.removeAll()
                    return -Int(Errno.noMemory.rawValue)
                case .deadlock:
                    keep.append(folio)  // not produced by this algorithm
                }
            }
            from = keep
            pass += 1
        }
        for f in from {
            nrFailed += 1
            ctx.stats.failedPages += f.pageCount
            if f.isLarge { ctx.stats.thpFailed += 1 }
        }
        ret.append(contentsOf: from)
        from.removeAll()
        return nrFailed
    }

    /// Isolates a folio from the LRU for migration, taking the isolation
    /// reference the migration list owns. False when it is not on the LRU
    /// (already isolated, or not a folio the LRU holds).
    ///
    /// The corresponding kernel function is `folio_isolate_lru()`.
    public func isolateFolioLRU(_ folio: Folio) -> Bool {
        guard !folio.isZoneDevice, !folio.isZeroPage else { return false }
        return isolateLRU(folio)
    }

    /// Puts every folio of a migration list back on the LRU (a hugetlb
    /// folio back on the pool's active list, `folio_putback_hugetlb()`),
    /// dropping the isolation reference, and empties the list.
    ///
    /// The corresponding kernel function is `putback_movable_pages()`.
    public func putbackMovableFolios(_ folios: inout [Folio]) {
        for f in folios {
            if f.isLarge && f.test(.hugetlb) {
                if f.test(.hugetlbMigratable) {
                    warn("putback_movable_pages: hugetlb folio is not isolated", "\(f)")
                    continue
                }
                hugetlb.putback(f)
                continue
            }
            if f.test(.lru) {
                warn("putback_movable_pages: folio is already on the LRU", "\(f)")
                continue
            }
            putbackLRU(f)
        }
        folios.removeAll()
    }

    /// The node whose RAM holds `folio`, or nil for device memory and the zero pages.
    ///
    /// The corresponding kernel function is `folio_nid()`.
    public func nodeID(of folio: Folio) -> Int? {
        guard !folio.isZoneDevice else { return nil }
        for n in nodes where folio.pfn >= n.startPfn && folio.pfn < n.startPfn + n.pageCount { return n.id }
        return nil
    }
}
