import CSVMSupport

// The collect walk of `migrate_vma_setup()`: each PMD of the range, each
// PTE under its lock; candidates get a reference, their folio lock and a
// migration entry (see `Kernel.migrateVMASetup(_:)` for the whole protocol).
extension Kernel {

    /// migrate_vma_collect(): walk inside an MMU-notifier invalidation of kind
    /// MIGRATE carrying the owner.
    ///
    /// We enter with the mmap lock held (setup checked the arguments) and no
    /// page-table lock. We return with no page-table lock held, `src[0 ..<
    /// npages]` filled, and each collected page locked, referenced (the
    /// migration owns the reference) and replaced by a migration entry;
    /// `args.end` is trimmed to the pages walked.
    func migrateVMACollect(_ args: inout MigrateVMA, _ vma: VMA) {
        let mm = vma.mm
        mm.withInvalidation(args.start, args.end, .migrate, owner: args.pgmapOwner) {
            var a = args.start
            while a < args.end {
                let next = min((a & AddressSpace.pmdMask) + AddressSpace.pmdSize, args.end)
                if _slowPath(svm_det_active()) { DeterministicScheduler.charge(\.walk, "page-table walk") }
                collectPMD(&args, vma, a, next)
                a = next
            }
        }
        args.end = args.start + UInt64(args.npages) << PageGeometry.pageShift
    }

    /// Entries `[start, end)` not migrating (`migrate_vma_collect_skip()`).
    /// Touches only `args`; any lock state of the caller is unchanged.
    func collectSkip(_ args: inout MigrateVMA, _ start: UInt64, _ end: UInt64) {
        var a = start
        while a < end {
            args.dst[args.npages] = .empty
            args.src[args.npages] = .empty
            args.npages += 1
            a += PageGeometry.pageSize64
        }
    }

    /// A hole (`migrate_vma_collect_hole()`): MIGRATE without a page on
    /// anonymous VMAs, so the driver may fill it; nothing elsewhere.
    /// Touches only `args`; any lock state of the caller is unchanged.
    func collectHole(_ args: inout MigrateVMA, _ vma: VMA, _ start: UInt64, _ end: UInt64) {
        guard vma.isAnonymous else { return collectSkip(&args, start, end) }
        var a = start
        while a < end {
            args.dst[args.npages] = .empty
            args.src[args.npages] = .hole
            args.npages += 1
            args.cpages += 1
            a += PageGeometry.pageSize64
        }
    }

    /// One PMD's worth of the range (`migrate_vma_collect_pmd()`).
    ///
    /// We enter with the mmap lock held and no page-table lock; `[start, end)`
    /// lies in one PMD. A huge entry is collected whole (compound), split, or
    /// skipped; a PTE table is walked under its PTE lock. We return with no
    /// page-table lock held and the range's entries appended to `args`.
    func collectPMD(_ args: inout MigrateVMA, _ vma: VMA, _ start: UInt64, _ end: UInt64) {
        let mm = vma.mm
        var addr = start
        let compound = args.flags.contains(.compound) && Kernel.coversWholePMD(start, end)
        while true {  // "again:"
            let pmd = mm.loadPMD(start)
            switch pmd.kind {
            case .none:
                if compound && vma.isAnonymous {
                    return collectCompound(&args, MigratePFN(rawValue: MigratePFN.migrateBit | MigratePFN.compoundBit))
                }
                return collectHole(&args, vma, addr, end)
            case .present:
                if pmd.isSpecial {
                    // The huge zero page (migrate_vma_collect_huge_pmd since
                    // device THP, v6.19): not split. Without SELECT_SYSTEM the
                    // range is skipped; with it the range is a hole, compound
                    // when the walk covers the whole PMD. Filling it splits
                    // the huge zero PMD (migrate_vma_insert_page).
                    guard args.flags.contains(.system) else { return collectSkip(&args, addr, end) }
                    if compound && vma.isAnonymous {
                        return collectCompound(&args, MigratePFN(rawValue: MigratePFN.migrateBit | MigratePFN.compoundBit))
                    }
                    return collectHole(&args, vma, addr, end)
                }
                let folio = Folio(pfn: pmd.pfn, kernel: self)
                guard args.flags.contains(.system) else { return collectSkip(&args, addr, end) }
                if compound {
                    if !collectHugePMD(&args, vma, start) { collectSkip(&args, addr, end) }
                    return
                }
                guard folio.tryGet() else { return collectSkip(&args, addr, end) }
                if let fp = args.faultPage, fp.folio == folio {
                    folio.put()
                    warn("migrate_vma_collect_pmd: a THP cannot be the fault folio", "\(folio)")
                    return collectSkip(&args, addr, end)
                }
                guard folio.tryLock() else { folio.put(); return collectSkip(&args, addr, end) }
                let ok = splitFolio(folio)
                folio.unlock()
                folio.put()
                if !ok { return collectSkip(&args, addr, end) }
                continue
            case .devicePrivate:
                let folio = Folio(pfn: pmd.pfn, kernel: self)
                guard args.flags.contains(.devicePrivate), folio.isOwned(by: args.pgmapOwner) else {
                    return collectSkip(&args, addr, end)
                }
                if compound {
                    if !collectHugePMD(&args, vma, start) { collectSkip(&args, addr, end) }
                    return
                }
                // Walked per PTE: split the PMD; the PTE loop splits the folio.
                mm.splitHugePMD(start)
                continue
            case .migration, .deviceExclusive:
                return collectSkip(&args, addr, end)
            case .table:
                break
            }
            if collectPTEs(&args, vma, start: start, addr: &addr, end: end) { return }
        }
    }

    /// The PTE loop. Returns false to restart the PMD ("goto again") after a
    /// large folio was split; `addr` tells where to resume.
    ///
    /// We enter with no page-table lock held and take the PTE lock of
    /// `start`'s table; a page is collected only when its folio lock is
    /// taken by trylock (or is the fault page's, which the fault path holds).
    /// We return with the PTE lock dropped on every path, and the TLB flush
    /// accounted for any present entry that was replaced.
    private func collectPTEs(_ args: inout MigrateVMA, _ vma: VMA, start: UInt64,
                             addr: inout UInt64, end: UInt64) -> Bool {
        let mm = vma.mm
        let faultFolio = args.faultPage?.folio
        let faultPageLocked = args.faultPageLocked == true
        var unmapped = false
        let outcome: CollectPTEsEnd = mm.withPTL(start) {
            guard mm.loadPMD(start).kind == .table else { return .restart }
        while addr < end {
            var mpfn = MigratePFN.empty
            let pte = mm.loadPTE(addr)
            var page: Page? = nil
            switch pte.kind {
            case .none, .table:
                if vma.isAnonymous {
                    mpfn = .hole
                    args.cpages += 1
                }
            case .migration, .deviceExclusive:
                // Never waited on; a device-exclusive entry is not collected.
                break
            case .devicePrivate:
                let p = Page(pfn: pte.pfn, kernel: self)
                if args.flags.contains(.devicePrivate), p.folio.isOwned(by: args.pgmapOwner) {
                    if p.folio.isLarge {
                            return .split(p.folio)
                    }
                    mpfn = MigratePFN(pfn: pte.pfn).with(MigratePFN.migrateBit | (pte.isWrite ? MigratePFN.writeBit : 0))
                    page = p
                }
            case .present:
                if pte.isSpecial {
                    if args.flags.contains(.system) {
                        mpfn = .hole
                        args.cpages += 1
                    }
                    break
                }
                let p = Page(pfn: pte.pfn, kernel: self)
                let folio = p.folio
                if !folio.isZoneDevice && !args.flags.contains(.system) { break }
                if folio.isDeviceCoherent {
                    guard args.flags.contains(.deviceCoherent), folio.isOwned(by: args.pgmapOwner) else { break }
                }
                if folio.isLarge {
                        return .split(folio)
                }
                mpfn = MigratePFN(pfn: pte.pfn).with(MigratePFN.migrateBit | (pte.isWrite ? MigratePFN.writeBit : 0))
                page = p
            }
            if let page {
                let folio = page.folio
                folio.get()
                let ownsLock = (faultPageLocked && faultFolio == folio) || folio.tryLock()
                if ownsLock {
                    let anonExclusive = folio.isAnon && page.isAnonExclusive
                    // Clear the entry; an anon-exclusive page is shared first
                    // (folio_try_share_anon_rmap_pte), which fails for a page
                    // that may be pinned: the entry stays, the page is skipped.
                    if anonExclusive && folio.isMaybeDMAPinned {
                        if !(faultPageLocked && faultFolio == folio) { folio.unlock() }
                        folio.put()
                        args.dst[args.npages] = .empty
                        args.src[args.npages] = .empty
                        args.npages += 1
                        addr += PageGeometry.pageSize64
                        vmstat.count(.migrateVMASkipped)
                        continue
                    }
                    // ptep_get_and_clear(): the entry as it is now, with any
                    // accessed or dirty bit a lockless walk set since the load.
                    let taken = mm.exchangePTE(addr, .none)
                    if anonExclusive { page.meta.clearFlags(PageFlags.anonExclusive.rawValue) }
                    args.cpages += 1
                    if taken.kind == .present && taken.isDirty { folio.markDirty() }
                    let entry = PageTableEntry.migration(
                        pfn: page.pfn, write: mpfn.isWrite, readExclusive: !mpfn.isWrite && anonExclusive,
                        dirty: taken.kind == .present && taken.isDirty, young: taken.kind == .present && taken.isYoung)
                        .keepingProtection(of: taken)
                    mm.storePTE(addr, entry)
                    // Like a regular unmap: the rmap and the mapping's reference go;
                    // the reference taken above keeps the folio.
                    mm.removeRmap(page: page)
                    folio.put()
                    if pte.kind == .present { unmapped = true }
                } else {
                    folio.put()
                    mpfn = .empty
                }
            }
            args.dst[args.npages] = .empty
            args.src[args.npages] = mpfn
            args.npages += 1
            addr += PageGeometry.pageSize64
        }
        if unmapped { mm.flushTLBRange(start, end) }
            return .done
        }
        switch outcome {
        case .done:
            return true
        case .restart:
            return false
        case .split(let folio):
            // A large folio: drop the PTE lock, flush what was unmapped,
            // split, and walk the PMD again.
            if unmapped { mm.flushTLBRange(start, end) }
            if !splitFolioForMigration(folio, faultPage: args.faultPage, faultPageLocked: faultPageLocked) {
                collectSkip(&args, addr, end)
        return true
    }
            return false
        }
    }

    /// How the PTE loop ended: the range walked, the PMD changed under it, or
    /// a large folio to split before walking the PMD again.
    private enum CollectPTEsEnd { case done, restart, split(Folio) }

}
