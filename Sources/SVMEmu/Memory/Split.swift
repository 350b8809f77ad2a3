import Synchronization
import CSVMSupport

extension Kernel {
    /// Splits a large anonymous system folio into 512 order-0 folios
    /// (`split_folio()` / `split_huge_page()`).
    ///
    /// Contract: the caller holds the folio lock and one reference. A PMD
    /// mapping is split to PTEs first. The split succeeds only when nobody
    /// else holds a reference (count == PTE mappings + the caller's), as
    /// `can_split_folio()` requires; afterwards the head page is the caller's
    /// folio (still locked, still referenced), each other page is its own
    /// folio holding one reference per mapping, and unmapped tails are freed.
    /// Returns false (nothing changed) when the folio cannot be split.
    ///
    /// The caller holds no page-table lock: the PMD and PTE locks are taken
    /// inside. A device folio's page map hears of every new folio through
    /// ``DevicePageMapOperations/folioSplit``.
    ///
    /// - Parameters:
    ///   - folio: a locked folio the caller holds a reference on; a small
    ///     folio is returned as it is (true), an unlocked one is reported as
    ///     a diagnostic (false).
    /// - Returns: whether the folio is now (or already was) small.
    ///
    /// The corresponding kernel function is `split_folio()`.
    @discardableResult
    public func splitFolio(_ folio: Folio) -> Bool {
        guard folio.isLarge else { return true }
        guard folio.isLocked else {
            warn("split_folio: caller must hold the folio lock", "\(folio)", kind: .lockNotHeld)
            return false
        }
        if folio.entireMapCount > 0 {
            // split_huge_pmd_address() where the rmap finds the PMD mapping.
            rmapWalkAnon(folio, pages: 0..<1, hint: nil) { _, mm, address in
                let pmd = mm.loadPMD(address)
                if pmd.kind != .none && pmd.kind != .table && pmd.pfn == folio.pfn { mm.splitHugePMD(address) }
            }
        }
        if folio.entireMapCount > 0 { return false }
        // The PTE lock of a mapping (the one the rmap names, else any):
        // the table where the folio's pages are mapped there.
        let named = folio.meta.mappingMM
        let table = { (mm: AddressSpace, address: UInt64) in mm.loadPMD(address).kind == .table }
        // Inside the walk: the address space is valid only there.
        let split = { (mm: AddressSpace, address: UInt64) in mm.withPTL(address) { self.splitPTEMappedFolio(folio) } }
        if let done = rmapFirst(folio, page: 0, hint: nil, where: { mm, a in mm.id == named && table(mm, a) }, split)
            ?? rmapFirst(folio, page: 0, hint: nil, where: table, split) {
            return done
        }
        return splitPTEMappedFolio(folio)
    }

    /// The split proper (`__split_huge_page()`) of a folio no PMD maps: the
    /// reference check, then 512 order-0 folios. The caller holds the folio
    /// lock, one reference and, for a mapped folio, the PTE lock of its
    /// mapping, which keeps the map counts still while they become
    /// reference counts.
    private func splitPTEMappedFolio(_ folio: Folio) -> Bool {
        var mapped: Int32 = 0
        for i in 0..<PageGeometry.pmdPages { mapped += metaPtr(folio.pfn + UInt64(i)).mapcount }
        guard Int32(folio.refCount) == mapped + 1 else { return false }

        let head = folio.meta
        let inherited = head.flags & (PageFlags.anon.rawValue | PageFlags.dirty.rawValue | PageFlags.uptodate.rawValue
                                      | PageFlags.lru.rawValue | PageFlags.swapBacked.rawValue | PageFlags.shmem.rawValue
                                      | PageFlags.zoneDevice.rawValue)
        let mmID = head.mappingMM
        let index = head.index
        var freed: [UInt64] = []
        for i in 1..<PageGeometry.pmdPages64 {
            let m = metaPtr(folio.pfn + i)
            let own = m.flags & PageFlags.anonExclusive.rawValue
            m.atomicFlags.store(inherited | own, ordering: .releasing)
            let refs = m.mapcount
            m.atomicRefcount.store(refs, ordering: .releasing)
            m.atomicEntireMapcount.store(0, ordering: .releasing)  // page[1]'s held _large_mapcount
            m.order = 0
            m.head = folio.pfn + i
            m.mappingMM = mmID
            m.index = index + i
            m.pgmap = head.pgmap
            if refs == 0 { freed.append(folio.pfn + i) }
        }
        head.atomicRefcount.store(head.mapcount + 1, ordering: .releasing)
        head.clearFlags(PageFlags.head.rawValue)
        head.order = 0
        vmstat.count(.thpSplitPage)
        if let pgmap = folio.pageMap {
            // Device folios: the driver hears of every new folio, then the end.
            if let split = pgmap.operations.folioSplit {
                for i in 1..<PageGeometry.pmdPages { split(folio, Folio(pfn: folio.pfn + UInt64(i), kernel: self)) }
                split(folio, nil)
            }
            for pfn in freed { pgmap.freeFolio(Folio(pfn: pfn, kernel: self)) }
        } else if !freed.isEmpty, let node = nodes.first(where: { $0.region == head.region }) {
            for pfn in freed { node.release(pfn: pfn, order: 0) }
        }
        return true
    }

    /// `migrate_vma_split_folio()`: split a PTE-mapped large folio so its pages
    /// can be collected one by one. The fault path's reference on the fault
    /// folio serves as the split's caller pin (and, in the trylock policies,
    /// its lock as the split's lock); after the split that reference (and
    /// lock) move to the fault page's new folio, which is what the fault path
    /// releases when migrate_to_ram returns.
    ///
    /// Caller holds no page-table lock (collect drops the PTE lock first).
    /// For a folio that is not the fault folio we take (and drop again) our
    /// own reference and trylock, so on return the caller's locks and
    /// references are as on entry.
    func splitFolioForMigration(_ folio: Folio, faultPage: Page?, faultPageLocked: Bool) -> Bool {
        let isFault = faultPage?.folio == folio
        if !isFault {
            guard folio.tryGet() else { return false }
        }
        if !(isFault && faultPageLocked) {
            guard folio.tryLock() else {
                if !isFault { folio.put() }
                return false
            }
        }
        let ok = splitFolio(folio)
        if !isFault {
            folio.unlock()
            folio.put()
            return ok
        }
        if !faultPageLocked { folio.unlock() }
        if ok, let fp = faultPage, fp.folio != folio {
            let newFaultFolio = fp.folio
            newFaultFolio.get()
            if faultPageLocked {
                newFaultFolio.lock()
                folio.unlock()
            }
            folio.put()
        }
        return ok
    }

    /// Splits a large folio that a migration holds locked and unmapped (PMD
    /// migration entry) into 512 order-0 folios, each locked and holding the
    /// migration's reference, and rewrites `src[i ... i+511]` as small entries
    /// (`migrate_vma_split_unmapped_folio()`). Device folios call the page
    /// map's `folioSplit` for each new folio, then once with no tail.
    /// Caller holds no page-table lock; the migration owns the folio's lock
    /// and extra reference, which every new folio then has too.
    func splitMigratingFolio(_ src: inout [MigratePFN], _ i: Int, faultPage: Page?, hint: AddressSpace? = nil) -> Bool {
        guard let head = page(src[i]) else { return false }
        let folio = head.folio
        guard folio.isLarge else { return false }
        rmapWalkAnon(folio, pages: 0..<1, hint: hint) { _, mm, address in
            let pmd = mm.loadPMD(address)
            if pmd.kind == .migration && pmd.pfn == folio.pfn { mm.splitHugePMD(address) }
        }
        let m = folio.meta
        let inherited = m.flags & (PageFlags.anon.rawValue | PageFlags.dirty.rawValue | PageFlags.uptodate.rawValue
                                   | PageFlags.swapBacked.rawValue | PageFlags.zoneDevice.rawValue | PageFlags.shmem.rawValue)
        let mmID = m.mappingMM, index = m.index, pgmap = m.pgmap
        let write = src[i].isWrite ? MigratePFN.writeBit : 0
        for j in 1..<UInt64(Kernel.hugePages) {
            let t = metaPtr(folio.pfn + j)
            t.atomicFlags.store(inherited | PageFlags.locked.rawValue, ordering: .releasing)
            t.atomicRefcount.store(1, ordering: .releasing)
            t.order = 0
            t.head = folio.pfn + j
            t.mappingMM = mmID
            t.index = index + j
            t.pgmap = pgmap
            src[i + Int(j)] = MigratePFN(pfn: folio.pfn + j).with(MigratePFN.migrateBit | write)
        }
        m.clearFlags(PageFlags.head.rawValue)
        m.order = 0
        src[i] = src[i].without(MigratePFN.compoundBit)
        if let pgmap = folio.pageMap, let split = pgmap.operations.folioSplit {
            for j in 1..<Kernel.hugePages { split(folio, Folio(pfn: folio.pfn + UInt64(j), kernel: self)) }
            split(folio, nil)
        }
        vmstat.count(.thpMigrationSplit)
        return true
    }
}

extension AddressSpace {

    /// Splits a huge PMD entry into a table of 512 PTEs of the same kind: a THP
    /// (or device THP) becomes PTE-mapped, each PTE mapping holding a reference;
    /// a huge zero page becomes 512 zero-page PTEs; a PMD migration entry becomes
    /// 512 PTE migration entries. The folio itself stays large.
    ///
    /// The MMU notifiers hear of the split first (`MMU_NOTIFY_CLEAR` over the
    /// 2 MiB), as in the kernel.
    ///
    /// Caller holds the mmap lock (either mode) or otherwise keeps the range
    /// mapped, and no page-table lock: we take the PMD lock and return with
    /// it dropped. Nothing happens when the entry is none or already a table.
    ///
    /// - Parameters:
    ///   - address: any address in the 2 MiB region.
    ///
    /// The corresponding kernel function is `__split_huge_pmd()`.
    public func splitHugePMD(_ address: UInt64) {
        let pmdStart = address & AddressSpace.pmdMask
        // Nothing to split (checked again under the lock).
        switch loadPMD(pmdStart).kind {
        case .none, .table, .deviceExclusive: return
        default: break
        }
        // The notifiers hear of it first (MMU_NOTIFY_CLEAR over the 2 MiB):
        // a device that mirrors the huge zero page must not keep its frames
        // once the PTEs map the small zero page.
        withInvalidation(pmdStart, pmdStart + AddressSpace.pmdSize, .clear) {
        withPMDLock(pmdStart) {
        let pmd = loadPMD(pmdStart)
        let ptes = pteSlot(pmdStart)
        switch pmd.kind {
        case .none, .table, .deviceExclusive:
            return
        case .present where pmd.isSpecial:
            // The huge zero page (__split_huge_zero_page_pmd()): clear the
            // PMD and flush first, so that no CPU keeps a 2 MiB translation
            // of the huge zero page while the PTEs map the small one; then
            // fill the table and install it. A walk meanwhile finds no entry
            // and faults, and the fault waits for the PMD lock.
            _ = exchangePMD(pmdStart, .none)
            flushTLBRange(pmdStart, pmdStart + AddressSpace.pmdSize)
            let zero = PageTableEntry.present(pfn: kernel.zeroPage.pfn, write: false, special: true)
            for i in 0..<PageGeometry.pmdPages { UnsafeAtomic(ptes + i).store(zero.rawValue, ordering: .releasing) }
            storePMD(pmdStart, .table)
        case .present:
            let folio = Folio(pfn: pmd.pfn, kernel: kernel)
            // A hugetlb page is mapped whole or not at all; VMA cuts keep to
            // its 2 MiB, so no caller should get here.
            if folio.test(.hugetlb) { return kernel.warn("split_huge_pmd: a hugetlb mapping cannot be split", "\(folio)") }
            // pmdp_invalidate(): the entry stays a huge mapping for software
            // but no CPU can walk it (here: PROT_NONE, which the hardware walk
            // refuses), in one exchange that returns every accessed or dirty
            // bit set up to that instant; then the flush, so that no CPU
            // holds the 2 MiB translation once the PTEs are visible.
            let old = exchangePMD(pmdStart, pmd.with(PageTableEntry.protNoneBit))
            flushTLBRange(pmdStart, pmdStart + AddressSpace.pmdSize)
            let flags = old.rawValue & (PageTableEntry.writeBit | PageTableEntry.dirtyBit | PageTableEntry.youngBit | PageTableEntry.protNoneBit)
                & (pmd.isProtNone ? ~0 : ~PageTableEntry.protNoneBit)
            mapSplitFolio(folio, .present, flags: flags, ptes)
            storePMD(pmdStart, .table)
        case .devicePrivate:
            // Not present for any CPU: no translation to flush.
            let folio = Folio(pfn: pmd.pfn, kernel: kernel)
            let flags = pmd.rawValue & (PageTableEntry.writeBit | PageTableEntry.dirtyBit | PageTableEntry.youngBit | PageTableEntry.protNoneBit)
            mapSplitFolio(folio, .devicePrivate, flags: flags, ptes)
            storePMD(pmdStart, .table)
        case .migration:
            let flags = pmd.rawValue & (PageTableEntry.writeBit | PageTableEntry.readExclusiveBit | PageTableEntry.dirtyBit | PageTableEntry.youngBit)
            for i in 0..<PageGeometry.pmdPages {
                UnsafeAtomic(ptes + i).store(PageTableEntry.make(.migration, pfn: pmd.pfn + UInt64(i), flags: flags).rawValue, ordering: .releasing)
            }
            storePMD(pmdStart, .table)
        }
        kernel.vmstat.count(.thpSplitPmd)
    }
    }
    }

    /// The PTEs of a split 2 MiB mapping of `folio`: one `kind` entry per
    /// page, each counted in its page's map count and holding a reference;
    /// the folio's entire mapping (one map count, one reference) goes.
    /// Caller holds the PMD lock and installs the table after.
    private func mapSplitFolio(_ folio: Folio, _ kind: PageTableEntry.Kind, flags: UInt64, _ ptes: UnsafeMutablePointer<UInt64>) {
        // The PMD's PageAnonExclusive (its head's) goes to every page the
        // PTEs now map (folio_add_anon_rmap_ptes() with RMAP_EXCLUSIVE).
        let exclusive = folio.isAnon && folio.page(0).isAnonExclusive ? PageFlags.anonExclusive.rawValue : 0
        for i in 0..<PageGeometry.pmdPages {
            UnsafeAtomic(ptes + i).store(PageTableEntry.make(kind, pfn: folio.pfn + UInt64(i), flags: flags).rawValue, ordering: .releasing)
            let m = kernel.metaPtr(folio.pfn + UInt64(i))
            m.atomicMapcount.wrappingAdd(1, ordering: .acquiringAndReleasing)
            if exclusive != 0 { m.setFlags(exclusive) }
        }
        folio.meta.atomicEntireMapcount.wrappingAdd(-1, ordering: .acquiringAndReleasing)
        folio.largeMapcountAdd(Int32(PageGeometry.pmdPages - 1))
        folio.refAdd(Int32(PageGeometry.pmdPages - 1))
    }
}
