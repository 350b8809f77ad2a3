import CSVMSupport

/// MADV_COLLAPSE: synchronous collapse of PTE-mapped 2 MiB regions into THPs.
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
    /// Caller holds no lock. The corresponding kernel function is `madvise_collapse()`.
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
    private func collapseOne(_ vma: VMA, _ haddr: UInt64) -> Errno? {
        // Every entry must be none, the zero page, or a present small page
        // nobody else holds (refcount == 1: its mapping).
        for i in 0..<512 {
            let e = loadPTE(haddr + UInt64(i) << 12)
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
        guard let huge = kernel.allocateFolio(order: 9) else { return .noMemory }
        return withInvalidation(haddr, haddr + AddressSpace.pmdSize, .clear) { () -> Errno? in
            var old: [Folio] = []
            old.reserveCapacity(512)
            var dirty = false
            withPTL(haddr) {
                for i in 0..<512 {
                    let a = haddr + UInt64(i) << 12
                    let e = loadPTE(a)
                    let dst = huge.bytes + i * 4096
                    if e.kind == .present && !e.isSpecial {
                        let page = Page(pfn: e.pfn, kernel: kernel)
                        svm_memcpy(dst, page.bytes, 4096)
                        dirty = dirty || e.isDirty || page.folio.isDirty
                        removeRmap(page: page)
                        old.append(page.folio)
                    } else {
                        svm_memset(dst, 0, 4096)
                    }
                    storePTE(a, .none)
                }
            }
            freePTETable(haddr)
            addNewAnonRmap(huge, address: haddr, pmdMapped: true)
            if dirty { huge.markDirty() }
            storePMD(haddr, .present(pfn: huge.pfn, write: vma.flags.contains(.write), dirty: dirty))
            flushTLBRange(haddr, haddr + AddressSpace.pmdSize)
            for f in old { f.put() }
            kernel.vmstat.count(.thpCollapseAlloc)
            return nil
        }
    }
}
