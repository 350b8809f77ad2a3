import CSVMSupport

// Tearing down ranges of page tables (munmap, MADV_DONTNEED): the zap walk
// and the freeing of PTE tables. The lock rules are on `zapRange`.
extension AddressSpace {

    /// Removes every mapping in `[start, end)` of `vma`. With `freeTables`, PTE
    /// tables whose whole 2 MiB is unmapped are freed (only under the mmap write lock).
    ///
    /// Caller holds the mmap lock (write for munmap, read for MADV_DONTNEED;
    /// write when `freeTables`) and no page-table lock; entries change only
    /// under their PTE table lock (PTEs) or PMD lock (PMD entries). Pages
    /// whose last reference the zap drops are freed after the locks are
    /// dropped and the TLB flush is accounted (like `mmu_gather`).
    ///
    /// The corresponding kernel function is `unmap_page_range()`.
    func zapRange(vma: VMA, start: UInt64, end: UInt64, freeTables: Bool) {
        var toPut: [Folio] = []
        // The range actually cleared (mmu_gather's start/end): only it is flushed.
        var cleared = (lo: UInt64.max, hi: UInt64(0))
        var a = start
        while a < end {
            let pmdStart = a & AddressSpace.pmdMask
            let next = min(pmdStart + AddressSpace.pmdSize, end)
            let pmd = loadPMD(a)
            switch pmd.kind {
            case .none:
                break
            case .table:
                zapPTEs(a, next, &toPut, &cleared)
                if freeTables && a == pmdStart && next == pmdStart + AddressSpace.pmdSize {
                    freePTETable(pmdStart)
                }
            case .present, .migration, .devicePrivate, .deviceExclusive:
                if a == pmdStart && next == pmdStart + AddressSpace.pmdSize {
                    if zapHugePMD(pmdStart, &toPut) {
                        cleared = (min(cleared.lo, pmdStart), max(cleared.hi, next))
                    } else {
                        // Split meanwhile (zap_huge_pmd() finds no huge entry
                        // under the lock): the PTEs are zapped instead.
                        zapPTEs(a, next, &toPut, &cleared)
                    }
                } else {
                    splitHugePMD(pmdStart)
                    zapPTEs(a, next, &toPut, &cleared)
                }
            }
            a = next
        }
        if cleared.hi > cleared.lo { flushTLBRange(cleared.lo, cleared.hi) }
        for f in toPut { f.put() }
    }

    private func zapPTEs(_ start: UInt64, _ end: UInt64, _ toPut: inout [Folio], _ cleared: inout (lo: UInt64, hi: UInt64)) {
        withPTL(start) {
        guard loadPMD(start).kind == .table else { return }
        var a = start
        while a < end {
            let pte = loadPTE(a)
            if !pte.isNone { cleared = (min(cleared.lo, a), max(cleared.hi, a + PageGeometry.pageSize64)) }
            switch pte.kind {
            case .present:
                // ptep_get_and_clear_full(): the dirty bit a lockless walk
                // set after the load above is in what the exchange returns.
                let cleared = exchangePTE(a, .none)
                if !pte.isSpecial {
                    let page = Page(pfn: pte.pfn, kernel: kernel)
                    let folio = page.folio
                    if cleared.isDirty { folio.markDirty() }
                    removeRmap(page: page)
                    toPut.append(folio)
                }
            case .devicePrivate, .deviceExclusive:
                storePTE(a, .none)
                let page = Page(pfn: pte.pfn, kernel: kernel)
                // zap_nonpresent_ptes(): only anonymous folios ever get these
                // entries, in any VMA (a MAP_PRIVATE file mapping's copies too).
                if !page.folio.isAnon {
                    kernel.warn("zap_nonpresent_ptes: device entry of a folio that is not anonymous (WARN_ON_ONCE(!folio_test_anon))", "\(page)")
                }
                removeRmap(page: page)
                toPut.append(page.folio)
            case .migration:
                // A migration entry holds neither a mapping nor a reference.
                storePTE(a, .none)
            case .none, .table:
                break
            }
            a += PageGeometry.pageSize64
        }
    }
    }

    /// `zap_huge_pmd()`: clears a huge entry under the PMD lock. Returns
    /// false, changing nothing, when the entry is no longer huge (a split
    /// or a zap got there first since the caller looked without the lock).
    private func zapHugePMD(_ pmdStart: UInt64, _ toPut: inout [Folio]) -> Bool {
        withPMDLock(pmdStart) { () -> Bool in
        switch loadPMD(pmdStart).kind {
        case .none, .table: return false
        default: break
        }
        // pmdp_huge_get_and_clear_full(): the dirty bit comes with the entry.
        let pmd = exchangePMD(pmdStart, .none)
        switch pmd.kind {
        case .present where pmd.isSpecial:
            break
        case .present, .devicePrivate:
            let folio = Folio(pfn: pmd.pfn, kernel: kernel)
            if pmd.isDirty { folio.markDirty() }
            removeEntireRmap(folio)
            toPut.append(folio)
        default:
            break
        }
        return true
    }
    }

    /// Returns a PTE table: clears it so that it is fresh for the next user.
    /// Caller holds the mmap lock for writing and no page-table lock; the PMD
    /// lock, then the PTE lock, are taken and dropped inside.
    func freePTETable(_ pmdStart: UInt64) {
        withPMDLock(pmdStart) {
            withPTL(pmdStart) {
        if loadPMD(pmdStart).kind == .table {
            svm_memset(pteSlot(pmdStart), 0, PageGeometry.pmdPages * 8)
            storePMD(pmdStart, .none)
        }
            }
        }
    }
}
