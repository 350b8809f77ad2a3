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
    @discardableResult
    public func splitFolio(_ folio: Folio) -> Bool {
        guard folio.isLarge else { return true }
        guard folio.isLocked else {
            warn("split_folio: caller must hold the folio lock", "\(folio)")
            return false
        }
        let rmap = rmapAddress(of: folio.page(0))
        if let (mm, address) = rmap, folio.entireMapCount > 0 {
            let pmd = mm.loadPMD(address)
            if pmd.kind != .none && pmd.kind != .table && pmd.pfn == folio.pfn { mm.splitHugePMD(address) }
        }
        if folio.entireMapCount > 0 { return false }
        var lock: UnsafeMutablePointer<UInt32>? = nil
        if let (mm, address) = rmap, mm.covers(address) {
            lock = mm.ptl(address)
            svm_mutex_lock(lock!)
        }
        defer { if let lock { svm_mutex_unlock(lock) } }
        var mapped: Int32 = 0
        for i in 0..<512 { mapped += metaPtr(folio.pfn + UInt64(i)).mapcount }
        guard Int32(folio.refCount) == mapped + 1 else { return false }

        let head = folio.meta
        let inherited = head.flags & (PageFlags.anon.rawValue | PageFlags.dirty.rawValue | PageFlags.uptodate.rawValue
                                      | PageFlags.lru.rawValue | PageFlags.swapBacked.rawValue | PageFlags.shmem.rawValue
                                      | PageFlags.zoneDevice.rawValue)
        let mmID = head.mappingMM
        let index = head.index
        var freed: [UInt64] = []
        for i in 1..<UInt64(512) {
            let m = metaPtr(folio.pfn + i)
            let own = m.flags & PageFlags.anonExclusive.rawValue
            svm_store32(m.flagsWord, inherited | own)
            let refs = m.mapcount
            svm_storei32(m.refWord, refs)
            m.order = 0
            m.head = folio.pfn + i
            m.mappingMM = mmID
            m.index = index + i
            m.pgmap = head.pgmap
            if refs == 0 { freed.append(folio.pfn + i) }
        }
        svm_storei32(head.refWord, head.mapcount + 1)
        head.clearFlags(PageFlags.head.rawValue)
        head.order = 0
        vmstat.count(.thpSplitPage)
        if let pgmap = folio.pageMap {
            // Device folios: the driver hears of every new folio, then the end.
            if let split = pgmap.operations.folioSplit {
                for i in 1..<512 { split(folio, Folio(pfn: folio.pfn + UInt64(i), kernel: self)) }
                split(folio, nil)
            }
            for pfn in freed { pgmap.freeFolio(Folio(pfn: pfn, kernel: self)) }
        } else if !freed.isEmpty, let node = nodes.first(where: { $0.region == head.region }) {
            for pfn in freed { node.release(pfn: pfn, order: 0) }
        }
        return true
    }
}
