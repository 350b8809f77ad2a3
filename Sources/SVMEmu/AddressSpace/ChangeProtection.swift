import CSVMSupport

// Rewriting the entries of a range in place, under the page-table locks:
// protection changes (mprotect) and MADV_FREE, over one shared leaf walk.
extension AddressSpace {

    /// Rewrites protection bits over `[start, end)` (`change_protection()`).
    /// With `tryChangeWritable` (`MM_CP_TRY_CHANGE_WRITABLE`: mprotect of a
    /// writable VMA, the range's only VMA) a present entry that need not
    /// fault to become writable becomes writable at once
    /// (``canChangeWritable(_:_:)``). A device-exclusive entry is left
    /// alone, as since v6.15, but for the emulator's PROT_NONE mark.
    /// Caller holds the mmap lock for writing and no page-table lock.
    func changeProtection(start: UInt64, end: UInt64, write: Bool, none: Bool, tryChangeWritable vma: VMA? = nil) {
        func rewrite(_ e: PageTableEntry) -> PageTableEntry {
            var e = e
            switch e.kind {
            case .present:
                if !write { e = e.without(PageTableEntry.writeBit) }
                e = none ? e.with(PageTableEntry.protNoneBit) : e.without(PageTableEntry.protNoneBit)
                if let vma, !e.isWrite, canChangeWritable(vma, e) { e = e.with(PageTableEntry.writeBit) }
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
            case .deviceExclusive:
                // It carries no write permission (the restore takes it from
                // the VMA); only the VMA's PROT_NONE, which the emulator
                // keeps in non-present entries for the rmap walks, follows.
                e = none ? e.with(PageTableEntry.protNoneBit) : e.without(PageTableEntry.protNoneBit)
            default:
                break
            }
            return e
        }
        walkLeaves(start, end, splitPartial: { _ in true },
                   pte: { p, e in
                       // ptep_modify_prot_start() / _commit(): a present entry
                       // is taken out whole (a walk meanwhile faults and waits
                       // for the lock), so no accessed or dirty bit is lost.
                       if e.kind == .present { storePTE(p, rewrite(exchangePTE(p, .none))) }
                       else if !e.isNone { storePTE(p, rewrite(e)) }
                   },
                   pmd: { p, e in
                       // pmdp_invalidate(): the same for a huge entry.
                       if e.kind == .present { storePMD(p, rewrite(exchangePMD(p, .none))) }
                       else { storePMD(p, rewrite(e)) }
                   })
    }

    /// Whether the present entry `e` (PTE or PMD) of `vma`, read-only, may
    /// be made writable without a write fault (`can_change_pte_writable()`,
    /// `can_change_pmd_writable()`): the VMA allows writes and the entry is
    /// accessible; in a private mapping the page must be an anonymous page
    /// exclusive to this address space (the write fault would reuse it
    /// without a copy); in a shared one the entry must be dirty (the
    /// emulator's shared mappings take a write fault to dirty the folio,
    /// as a mapping with write-notify does). The zero page and a special
    /// mapping's pages never qualify. No soft-dirty or userfaultfd-wp
    /// tracking exists in the emulator to require a fault. Caller holds
    /// the page-table lock of the entry.
    func canChangeWritable(_ vma: VMA, _ e: PageTableEntry) -> Bool {
        guard vma.flags.contains(.write), !vma.flags.contains(.special), e.kind == .present, !e.isProtNone else { return false }
        if vma.flags.contains(.shared) { return e.isDirty }
        // vm_normal_page(): the zero page and the huge zero page have none.
        guard !e.isSpecial else { return false }
        let page = Page(pfn: e.pfn, kernel: kernel)
        return page.folio.isAnon && page.isAnonExclusive
    }

    /// MADV_FREE: clean, lazily freeable. Without reclaim the contents stay.
    /// Caller holds the mmap lock for reading and no page-table lock.
    func lazyFree(start: UInt64, end: UInt64) {
        walkLeaves(start, end, splitPartial: { $0.kind == .present },
                   pte: { p, e in
                       guard e.kind == .present && !e.isSpecial else { return }
                       // ptep_get_and_clear_full(), then the clean, old entry.
                       storePTE(p, exchangePTE(p, .none).without(PageTableEntry.dirtyBit | PageTableEntry.youngBit))
                       Page(pfn: e.pfn, kernel: kernel).folio.clear([.dirty, .swapBacked])
                   },
                   pmd: { p, e in
                       guard e.kind == .present && !e.isSpecial else { return }
                       storePMD(p, exchangePMD(p, .none).without(PageTableEntry.dirtyBit | PageTableEntry.youngBit))
                       Folio(pfn: e.pfn, kernel: kernel).clear([.dirty, .swapBacked])
                   })
    }

    /// The walk `changeProtection` and `lazyFree` share, one PMD at a time:
    /// a huge entry the range covers only in part is split first when
    /// `splitPartial` says so; PTE tables are visited under their PTE lock
    /// (`pte` for each entry), whole huge entries (anything but none and a
    /// table) under the PMD lock (`pmd`). One TLB flush for the range at the end;
    /// from the first entry changed until that flush returns the address
    /// space has a flush pending (``tlbFlushPending``), as under the kernel's
    /// `tlb_gather_mmu()` / `tlb_finish_mmu()`.
    /// Caller holds the mmap lock and no page-table lock; `pte` and `pmd` run
    /// with the PTE or PMD lock held and must not take another.
    func walkLeaves(_ start: UInt64, _ end: UInt64, splitPartial: (PageTableEntry) -> Bool,
                            pte: (UInt64, PageTableEntry) -> Void, pmd: (UInt64, PageTableEntry) -> Void) {
        incTLBFlushPending()
        defer { decTLBFlushPending() }
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
                withPTL(a) {
                var p = a
                while p < next {
                    pte(p, loadPTE(p))
                    p += PageGeometry.pageSize64
                }
                }
            } else if entry.kind != .none {
                withPMDLock(pmdStart) {
                let e = loadPMD(pmdStart)
                if e.kind != .none && e.kind != .table { pmd(pmdStart, e) }
                }
            }
            a = next
        }
        flushTLBRange(start, end)
    }
}
