import CSVMSupport

// 2 MiB (order-9) folios in migrate_vma: collecting a whole PMD as one
// compound entry, splitting compound sources and holes when the driver
// supplies 4 KiB destinations, inserting a PMD for a compound hole, and the
// PMD-level forms of try_to_migrate and remove_migration_ptes.
//
// Layout of a compound entry: `src[i] = migrate_pfn(head) | MIGRATE |
// COMPOUND (| WRITE)` and `src[i+1 ... i+511] = 0`; a compound hole is
// `MIGRATE | COMPOUND` without VALID. The driver answers with
// `dst[i] = migrate_pfn(head) | COMPOUND` for a 2 MiB destination, or with
// 512 small destinations in `dst[i ... i+511]`.
extension Kernel {
    static let hugePages = PageGeometry.pmdPages

    /// Whether `[start, end)` is exactly one aligned 2 MiB region.
    @inline(__always) static func coversWholePMD(_ start: UInt64, _ end: UInt64) -> Bool {
        start & ~PageGeometry.pmdMask == 0 && end == start + PageGeometry.pmdSize64
    }

    /// Records a compound entry: the entry, then 511 empty ones.
    func collectCompound(_ args: inout MigrateVMA, _ entry: MigratePFN) {
        args.src[args.npages] = entry
        args.dst[args.npages] = .empty
        for j in 1..<Kernel.hugePages {
            args.src[args.npages + j] = .empty
            args.dst[args.npages + j] = .empty
        }
        args.npages += Kernel.hugePages
        args.cpages += 1
    }

    /// Collects a PMD-mapped THP or device-private PMD whole
    /// (`migrate_vma_collect_huge_pmd()`): reference, lock (the fault folio is
    /// already locked), a PMD migration entry in place of the mapping, the
    /// rmap and mapping reference dropped. Returns false to skip the range.
    ///
    /// We enter with the mmap lock held and no page-table lock; we take the
    /// PMD lock and return with it dropped. On true the folio is locked (by
    /// us, or already by the fault path for the fault folio) and holds the
    /// migration's extra reference; on false nothing changed.
    func collectHugePMD(_ args: inout MigrateVMA, _ vma: VMA, _ haddr: UInt64) -> Bool {
        let mm = vma.mm
        let collected: (pmd: PageTableEntry, folio: Folio)? = mm.withPMDLock(haddr) {
        let pmd = mm.loadPMD(haddr)
            guard pmd.kind == .present || pmd.kind == .devicePrivate, !pmd.isSpecial else { return nil }
        let folio = Folio(pfn: pmd.pfn, kernel: self)
        folio.get()
        let isFault = args.faultPageLocked == true && args.faultPage?.folio == folio
        guard isFault || folio.tryLock() else {
            folio.put()
                return nil
        }
        setPMDMigrationEntry(mm, haddr, pmd, folio, anonExclusive: folio.isAnon && folio.page(0).isAnonExclusive)
            return (pmd, folio)
        }
        guard let (pmd, folio) = collected else { return false }
        folio.put()
        if pmd.kind == .present { mm.flushTLBRange(haddr, haddr + PageGeometry.pmdSize64) }
        collectCompound(&args, MigratePFN(pfn: folio.pfn).with(
            MigratePFN.migrateBit | MigratePFN.compoundBit | (pmd.isWrite ? MigratePFN.writeBit : 0)))
        return true
    }

    /// Inserts a 2 MiB destination for a compound hole as one PMD
    /// (`migrate_vma_insert_huge_pmd_page()`): the PMD must be none or the
    /// huge zero page. Failure clears MIGRATE.
    ///
    /// We enter with the mmap lock held, no page-table lock, and `folio`
    /// locked and referenced by the driver; we take the PMD lock and return
    /// with it dropped. On success the PMD maps `folio` and holds one new
    /// reference on it (the mapping's).
    func migrateVMAInsertHugePMD(_ vma: VMA, _ haddr: UInt64, _ folio: Folio, _ src: inout MigratePFN) {
        let mm = vma.mm
        guard vma.isAnonymous, mm.covers(haddr), haddr >= vma.start, haddr + PageGeometry.pmdSize64 <= vma.end else {
            src = src.without(MigratePFN.migrateBit)
            return
        }
        let entry = PageTableEntry.holeMapping(of: folio, pfn: folio.pfn, in: vma)
        let replacedZero: Bool? = mm.withPMDLock(haddr) {
        let pmd = mm.loadPMD(haddr)
        let replacingZero = pmd.kind == .present && pmd.isSpecial
            guard pmd.isNone || replacingZero else { return nil }
        folio.set(.uptodate)
        mm.addNewAnonRmap(folio, vma, address: haddr, pmdMapped: true)
        folio.get()
        if replacingZero {
            mm.storePMD(haddr, .none)
            mm.flushTLBRange(haddr, haddr + PageGeometry.pmdSize64)
        }
        mm.storePMD(haddr, entry)
            return replacingZero
        }
        guard replacedZero != nil else {
            src = src.without(MigratePFN.migrateBit)
            return
        }
        src = MigratePFN(rawValue: MigratePFN.migrateBit | MigratePFN.compoundBit)
    }

    /// `set_pmd_migration_entry()`: the PMD mapping `pmd` of `folio` (present or
    /// device-private) becomes a PMD migration entry; the folio is shared
    /// (anon-exclusive cleared), its dirty bit kept, its PMD rmap dropped.
    ///
    /// Caller holds the PMD lock and the folio lock, and keeps both; it
    /// flushes the TLB for a present mapping after dropping the PMD lock, and
    /// drops the mapping's reference.
    func setPMDMigrationEntry(_ mm: AddressSpace, _ haddr: UInt64, _ pmd: PageTableEntry, _ folio: Folio, anonExclusive: Bool) {
        mm.assertPMDLockHeld(haddr, "set_pmd_migration_entry: PMD lock not held")
        // folio_try_share_anon_rmap_pmd(): the head carries the mapping's flag.
        if anonExclusive { folio.meta.clearFlags(PageFlags.anonExclusive.rawValue) }
        // pmdp_invalidate(): the entry as it is now, with any accessed or
        // dirty bit a lockless walk set since the caller loaded it.
        let pmd = pmd.kind == .present ? mm.exchangePMD(haddr, .none) : pmd
        let present = pmd.kind == .present
        if present && pmd.isDirty { folio.markDirty() }
        mm.storePMD(haddr, PageTableEntry.migration(pfn: folio.pfn, write: pmd.isWrite, readExclusive: !pmd.isWrite && anonExclusive,
                                                    dirty: present && pmd.isDirty, young: present && pmd.isYoung)
                              .keepingProtection(of: pmd))
        mm.removeEntireRmap(folio)
    }

    /// `try_to_migrate()` for a PMD-mapped folio: a PMD migration entry where
    /// the anon rmap walk finds a PMD mapping it.
    ///
    /// Caller holds the folio lock and a reference, and no page-table lock.
    /// We take the PMD lock inside an MMU_NOTIFY_CLEAR invalidation and return
    /// with it dropped, the TLB flush accounted and the mapping's reference
    /// dropped.
    func tryToMigratePMD(_ folio: Folio, hint: AddressSpace? = nil) {
        guard folio.entireMapCount > 0 else { return }
        rmapWalkAnon(folio, pages: 0..<1, hint: hint) { _, mm, address in
            // Only a VMA that maps the folio's head 2 MiB-aligned can map it by a PMD.
            guard address & ~PageGeometry.pmdMask == 0, folio.entireMapCount > 0 else { return }
            let range = MMUNotifierRange(start: address, end: address + PageGeometry.pmdSize64, event: .clear, owner: nil)
            mm.invalidateRangeStart(range)
            defer { mm.invalidateRangeEnd(range) }
            let unmapped: PageTableEntry? = mm.withPMDLock(address) {
                let pmd = mm.loadPMD(address)
                guard (pmd.kind == .present || pmd.kind == .devicePrivate) && pmd.pfn == folio.pfn else { return nil }
                setPMDMigrationEntry(mm, address, pmd, folio, anonExclusive: folio.page(0).isAnonExclusive)
                return pmd
            }
            guard let pmd = unmapped else { return }
            if pmd.kind == .present { mm.flushTLBRange(address, address + PageGeometry.pmdSize64) }
            folio.put()
        }
    }

    /// `remove_migration_pmd()`: a PMD migration entry of `src`, where the anon
    /// rmap walk finds one, becomes a PMD mapping of `dst` (same size).
    /// Returns whether one was found.
    ///
    /// Caller holds the folio locks of `src` and `dst` and no page-table
    /// lock; we take the PMD lock and return with it dropped. The new
    /// mapping holds one new reference on `dst`.
    @discardableResult
    func removeMigrationPMD(_ src: Folio, _ dst: Folio, hint: AddressSpace? = nil) -> Bool {
        var found = false
        rmapWalkAnon(src, pages: 0..<1, hint: hint) { _, mm, address in
            guard address & ~PageGeometry.pmdMask == 0 else { return }
            let replaced = mm.withPMDLock(address) { () -> Bool in
                let pmd = mm.loadPMD(address)
                guard pmd.kind == .migration, pmd.pfn == src.pfn else { return false }
                dst.get()
                let entry = PageTableEntry.replacing(migration: pmd, with: dst, pfn: dst.pfn)
                mm.addEntireAnonRmap(dst, address: address, exclusive: pmd.isWrite || pmd.isReadExclusive)
                mm.storePMD(address, entry)
                return true
            }
            if replaced { found = true }
        }
        return found
    }
}
