import CSVMSupport

// MADV_COLLAPSE: synchronous collapse of PTE-mapped 2 MiB regions into THPs.
extension AddressSpace {

    /// Collapses every 2 MiB-aligned region of `[start, end)` that lies in one
    /// VMA into one PMD-mapped THP: a new 2 MiB folio gets the bytes of the
    /// present pages (zeroes for none and the zero page), the old pages lose
    /// their mappings, the PTE table goes. Like the kernel, this ignores the
    /// THP sysfs mode but not VM_NOHUGEPAGE.
    ///
    /// - Throws: `.invalidArgument` when no aligned 2 MiB region fits or a VMA
    ///   forbids huge pages; `.tryAgain` (EAGAIN) when a region has entries
    ///   that cannot be collapsed (migration or device-private entries, pages
    ///   locked or referenced elsewhere); `.noMemory` when no 2 MiB folio is free.
    ///
    /// Caller holds no lock; we take the mmap lock for writing and return with
    /// it dropped. Every region that can be collapsed is; the first failure
    /// is the one thrown.
    ///
    /// The corresponding kernel function is `madvise_collapse()`.
    func collapse(_ start: UInt64, _ end: UInt64) throws(Errno) {
        mmapWriteLock()
        defer { mmapWriteUnlock() }
        var haddr = (start + AddressSpace.pmdSize - 1) & AddressSpace.pmdMask
        guard haddr + AddressSpace.pmdSize <= end else { throw .invalidArgument }
        var failure: Errno? = nil
        while haddr + AddressSpace.pmdSize <= end {
            defer { haddr += AddressSpace.pmdSize }
            guard let vma = vma(containing: haddr), haddr + AddressSpace.pmdSize <= vma.end, vma.isAnonymous else {
                failure = failure ?? .invalidArgument
                continue
            }
            guard !vma.flags.contains(.noHugepage) else { failure = failure ?? .invalidArgument; continue }
            let pmd = loadPMD(haddr)
            if pmd.kind == .present && !pmd.isSpecial { continue }  // already a THP
            if pmd.kind == .present && pmd.isSpecial { splitHugePMD(haddr) }
            guard loadPMD(haddr).kind == .table else {
                if !loadPMD(haddr).isNone { failure = failure ?? .tryAgain }
                continue
            }
            if let e = collapseOne(vma, haddr) { failure = failure ?? e }
        }
        if let failure { throw failure }
    }

    /// `collapse_huge_page()` for one region. Returns an error, or nil when done.
    /// Caller holds the mmap lock for writing and no page-table lock; the PTE
    /// and PMD locks are taken and dropped inside.
    private func collapseOne(_ vma: VMA, _ haddr: UInt64) -> Errno? {
        // Every entry must be none, the zero page, or a present small page
        // nobody else holds (refcount == 1: its mapping).
        for i in 0..<PageGeometry.pmdPages {
            let e = loadPTE(haddr + UInt64(i) << PageGeometry.pageShift)
            switch e.kind {
            case .none: continue
            case .present:
                if e.isSpecial { continue }
                let folio = Page(pfn: e.pfn, kernel: kernel).folio
                if folio.isLarge || folio.isZoneDevice || folio.refCount != 1 || folio.isLocked { return .tryAgain }
            default:
                return .tryAgain
            }
        }
        guard let huge = kernel.allocateFolio(order: PageGeometry.pmdOrder) else { return .noMemory }
        return withInvalidation(haddr, haddr + AddressSpace.pmdSize, .clear) { () -> Errno? in
            // pmdp_collapse_flush(): the old entries go and every CPU's TLB
            // forgets them before a byte is copied, so no CPU writes a page
            // after its copy (faults wait behind the mmap write lock).
            var entries = [PageTableEntry](repeating: .none, count: PageGeometry.pmdPages)
            withPTL(haddr) {
                for i in 0..<PageGeometry.pmdPages {
                    let a = haddr + UInt64(i) << PageGeometry.pageShift
                    entries[i] = exchangePTE(a, .none)
                }
            }
            flushTLBRange(haddr, haddr + AddressSpace.pmdSize)
            var old: [Folio] = []
            old.reserveCapacity(PageGeometry.pmdPages)
            var dirty = false
            for i in 0..<PageGeometry.pmdPages {
                let e = entries[i]
                if e.kind == .present && !e.isSpecial {
                    let page = Page(pfn: e.pfn, kernel: kernel)
                    huge.page(i).copyBytes(from: page)
                    dirty = dirty || e.isDirty || page.folio.isDirty
                    removeRmap(page: page)
                    old.append(page.folio)
                } else {
                    huge.page(i).zeroBytes()
                }
            }
            freePTETable(haddr)
            if dirty { huge.markDirty() }
            // collapse_huge_page(): the rmap and the new PMD under the PMD lock
            // (set_pmd_at's contract), as a racing lockless walker expects.
            withPMDLock(haddr) {
                addNewAnonRmap(huge, vma, address: haddr, pmdMapped: true)
                storePMD(haddr, .present(pfn: huge.pfn, write: vma.flags.contains(.write), dirty: dirty))
            }
            for f in old { f.put() }
            kernel.vmstat.count(.thpCollapseAlloc)
            return nil
        }
    }
}
