import CSVMSupport

/// Tearing down and rewriting ranges of page tables: zap (munmap, DONTNEED),
/// PMD split, protection changes, MADV_FREE.
///
/// Lock rules: callers hold the mmap lock (write for munmap/mprotect, read for
/// madvise); entries change only under their PTE table lock (PTEs) or PMD lock
/// (PMD entries). Pages whose last reference a zap drops are freed after the
/// locks are dropped and the TLB flush is accounted (like `mmu_gather`).
extension AddressSpace {

    /// Removes every mapping in `[start, end)` of `vma`. With `freeTables`, PTE
    /// tables whose whole 2 MiB is unmapped are freed (only under the mmap write lock).
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
            case .present, .migration, .devicePrivate:
                if a == pmdStart && next == pmdStart + AddressSpace.pmdSize {
                    zapHugePMD(pmdStart, &toPut)
                    cleared = (min(cleared.lo, pmdStart), max(cleared.hi, next))
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
        let lock = ptl(start)
        svm_mutex_lock(lock)
        defer { svm_mutex_unlock(lock) }
        guard loadPMD(start).kind == .table else { return }
        var a = start
        while a < end {
            let pte = loadPTE(a)
            if !pte.isNone { cleared = (min(cleared.lo, a), max(cleared.hi, a + 4096)) }
            switch pte.kind {
            case .present:
                storePTE(a, .none)
                if !pte.isSpecial {
                    let page = Page(pfn: pte.pfn, kernel: kernel)
                    let folio = page.folio
                    if pte.isDirty { folio.markDirty() }
                    removeRmap(page: page)
                    toPut.append(folio)
                }
            case .devicePrivate:
                storePTE(a, .none)
                let page = Page(pfn: pte.pfn, kernel: kernel)
                removeRmap(page: page)
                toPut.append(page.folio)
            case .migration:
                // A migration entry holds neither a mapping nor a reference.
                storePTE(a, .none)
            case .none, .table:
                break
            }
            a += 4096
        }
    }

    private func zapHugePMD(_ pmdStart: UInt64, _ toPut: inout [Folio]) {
        let lock = pmdLock(pmdStart)
        svm_mutex_lock(lock)
        defer { svm_mutex_unlock(lock) }
        let pmd = loadPMD(pmdStart)
        storePMD(pmdStart, .none)
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
    }

    /// Returns a PTE table: clears it so that it is fresh for the next user.
    func freePTETable(_ pmdStart: UInt64) {
        let lock = pmdLock(pmdStart)
        svm_mutex_lock(lock)
        let ptlock = ptl(pmdStart)
        svm_mutex_lock(ptlock)
        if loadPMD(pmdStart).kind == .table {
            svm_memset(pteSlot(pmdStart), 0, 512 * 8)
            storePMD(pmdStart, .none)
        }
        svm_mutex_unlock(ptlock)
        svm_mutex_unlock(lock)
    }

    /// Splits a huge PMD entry into a table of 512 PTEs of the same kind: a THP
    /// (or device THP) becomes PTE-mapped, each PTE mapping holding a reference;
    /// a huge zero page becomes 512 zero-page PTEs; a PMD migration entry becomes
    /// 512 PTE migration entries. The folio itself stays large.
    /// The corresponding kernel function is `__split_huge_pmd()`.
    public func splitHugePMD(_ address: UInt64) {
        let pmdStart = address & AddressSpace.pmdMask
        let lock = pmdLock(pmdStart)
        svm_mutex_lock(lock)
        defer { svm_mutex_unlock(lock) }
        let pmd = loadPMD(pmdStart)
        let ptes = pteSlot(pmdStart)
        switch pmd.kind {
        case .none, .table:
            return
        case .present where pmd.isSpecial:
            let zero = PageTableEntry.present(pfn: kernel.zeroPage.pfn, write: false, special: true)
            for i in 0..<512 { svm_store64(ptes + i, zero.rawValue) }
        case .present, .devicePrivate:
            let folio = Folio(pfn: pmd.pfn, kernel: kernel)
            let flags = pmd.rawValue & (PageTableEntry.writeBit | PageTableEntry.dirtyBit | PageTableEntry.youngBit | PageTableEntry.protNoneBit)
            for i in 0..<512 {
                let e = PageTableEntry.make(pmd.kind, pfn: pmd.pfn + UInt64(i), flags: flags)
                svm_store64(ptes + i, e.rawValue)
                _ = svm_add32(kernel.metaPtr(pmd.pfn + UInt64(i)).mapWord, 1)
            }
            _ = svm_add32(folio.meta.entireMapWord, -1)
            folio.refAdd(511)
        case .migration:
            let flags = pmd.rawValue & (PageTableEntry.writeBit | PageTableEntry.readExclusiveBit | PageTableEntry.dirtyBit | PageTableEntry.youngBit)
            for i in 0..<512 {
                svm_store64(ptes + i, PageTableEntry.make(.migration, pfn: pmd.pfn + UInt64(i), flags: flags).rawValue)
            }
        }
        storePMD(pmdStart, .table)
        if pmd.kind == .present { flushTLBRange(pmdStart, pmdStart + AddressSpace.pmdSize) }
        kernel.vmstat.count(.thpSplitPmd)
    }

    /// Rewrites protection bits over `[start, end)` (`change_protection()`).
    func changeProtection(start: UInt64, end: UInt64, write: Bool, none: Bool) {
        func rewrite(_ e: PageTableEntry) -> PageTableEntry {
            var e = e
            switch e.kind {
            case .present:
                if !write { e = e.without(PageTableEntry.writeBit) }
                e = none ? e.with(PageTableEntry.protNoneBit) : e.without(PageTableEntry.protNoneBit)
            case .migration:
                // change_pte_range(): a writable migration entry of an
                // anonymous folio becomes read-EXCLUSIVE (the folio was
                // exclusive when collect made it writable), others readable.
                if !write && e.isWrite {
                    let anon = Page(pfn: e.pfn, kernel: kernel).folio.isAnon
                    e = e.without(PageTableEntry.writeBit)
                    if anon { e = e.with(PageTableEntry.readExclusiveBit) }
                }
                e = none ? e.with(PageTableEntry.protNoneBit) : e.without(PageTableEntry.protNoneBit)
            case .devicePrivate:
                if !write { e = e.without(PageTableEntry.writeBit) }
                e = none ? e.with(PageTableEntry.protNoneBit) : e.without(PageTableEntry.protNoneBit)
            default:
                break
            }
            return e
        }
        walkLeaves(start, end, splitPartial: { _ in true },
                   pte: { p, e in if !e.isNone { storePTE(p, rewrite(e)) } },
                   pmd: { p, e in storePMD(p, rewrite(e)) })
    }

    /// MADV_FREE: clean, lazily freeable. Without reclaim the contents stay.
    func lazyFree(start: UInt64, end: UInt64) {
        walkLeaves(start, end, splitPartial: { $0.kind == .present },
                   pte: { p, e in
                       guard e.kind == .present && !e.isSpecial else { return }
                       storePTE(p, e.without(PageTableEntry.dirtyBit | PageTableEntry.youngBit))
                       Page(pfn: e.pfn, kernel: kernel).folio.clear([.dirty, .swapBacked])
                   },
                   pmd: { p, e in
                       guard e.kind == .present && !e.isSpecial else { return }
                       storePMD(p, e.without(PageTableEntry.dirtyBit | PageTableEntry.youngBit))
                       Folio(pfn: e.pfn, kernel: kernel).clear([.dirty, .swapBacked])
                   })
    }

    /// The walk `changeProtection` and `lazyFree` share, one PMD at a time:
    /// a huge entry the range covers only in part is split first when
    /// `splitPartial` says so; PTE tables are visited under their PTE lock
    /// (`pte` for each entry), whole huge entries (anything but none and a
    /// table) under the PMD lock (`pmd`). One TLB flush for the range at the end.
    private func walkLeaves(_ start: UInt64, _ end: UInt64, splitPartial: (PageTableEntry) -> Bool,
                            pte: (UInt64, PageTableEntry) -> Void, pmd: (UInt64, PageTableEntry) -> Void) {
        var a = start
        while a < end {
            let pmdStart = a & AddressSpace.pmdMask
            let next = min(pmdStart + AddressSpace.pmdSize, end)
            var entry = loadPMD(a)
            let partial = !(a == pmdStart && next == pmdStart + AddressSpace.pmdSize)
            if entry.kind != .none && entry.kind != .table && partial && splitPartial(entry) {
                splitHugePMD(pmdStart)
                entry = loadPMD(a)
            }
            if entry.kind == .table {
                let lock = ptl(a)
                svm_mutex_lock(lock)
                var p = a
                while p < next {
                    pte(p, loadPTE(p))
                    p += 4096
                }
                svm_mutex_unlock(lock)
            } else if entry.kind != .none {
                let lock = pmdLock(pmdStart)
                svm_mutex_lock(lock)
                let e = loadPMD(pmdStart)
                if e.kind != .none && e.kind != .table { pmd(pmdStart, e) }
                svm_mutex_unlock(lock)
            }
            a = next
        }
        flushTLBRange(start, end)
    }
}
