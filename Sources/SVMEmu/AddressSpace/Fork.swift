import CSVMSupport

// fork(): a child address space that shares the parent's pages, private
// anonymous ones write-protected for copy-on-write (`dup_mmap()`,
// `copy_page_range()`, `copy_present_pte()`, `copy_nonpresent_pte()`).
// The write fault that breaks the sharing is `do_wp_page()` in Fault.swift.
extension AddressSpace {

    /// Creates a child address space that maps what this one maps, as
    /// `fork()` does for the process's mm.
    ///
    /// Takes this address space's mmap lock for writing (the caller must
    /// not hold it) and returns with it dropped. Every VMA is copied. In a
    /// private (copy-on-write) VMA each mapped anonymous page becomes shared:
    /// the child's entry takes a folio reference and a map count, the page
    /// loses anon-exclusive, and a writable entry becomes read-only in both
    /// address spaces, so the first write in either copies the page
    /// (`do_wp_page()`). A writable device-private entry becomes a read-only
    /// one in both; a write in either faults the page back to RAM first.
    /// Migration entries are copied (read-only for copy-on-write), so a
    /// migration in flight finishes in both address spaces. Shared VMAs share
    /// their pages as they are. The range of each private VMA is invalidated
    /// (`MMU_NOTIFY_PROTECTION_PAGE`) and the parent's TLBs flushed before
    /// the lock is dropped.
    ///
    /// One difference from the kernel: a 2 MiB mapping (PMD) in a private
    /// VMA is split to PTEs in the parent first (`copy_huge_pmd()` shares the
    /// PMD; it splits only in the cases it cannot share). The folio stays
    /// large.
    ///
    /// - Returns: the child address space. Its rmap family is this one's and
    ///   its VMAs keep their `vm_pgoff`, so migrations and evictions reach
    ///   the pages it shares wherever either side later moves them.
    /// - Throws: ``Errno/noMemory`` when a hugetlb page that may be pinned
    ///   must be copied for the child and the hugetlb pool has no free page
    ///   (the child is released; the parent keeps its mappings).
    ///
    /// The corresponding kernel function is `dup_mmap()`.
    public func fork() throws(Errno) -> AddressSpace {
        let child = AddressSpace(kernel: kernel, family: anonFamily)
        mmapWriteLock()
        defer { mmapWriteUnlock() }
        child.mmapWriteLock()
        defer { child.mmapWriteUnlock() }
        child.vmas = vmas.map { VMA(mm: child, start: $0.start, end: $0.end, flags: $0.flags, file: $0.file, pageOffset: $0.pageOffset) }
        child.relinkFileMappings(vmas.compactMap(\.file))
        // anon_vma_fork(): the child's VMAs (same bounds, same vm_pgoff) join
        // the family's rmap after the parent's, before any entry is copied,
        // so that a walk meets a copied entry in the parent first.
        child.relinkAnonMappings()
        for vma in vmas {
            // VM_PFNMAP: the child faults (and gets SIGBUS) instead; a
            // VM_MIXEDMAP mapping is copied (vma_needs_copy()).
            if vma.flags.contains(.special) { continue }
            if vma.flags.contains(.hugetlb) {
                try copyHugetlbRange(to: child, vma)
                continue
            }
            copyPageRange(to: child, vma)
        }
        return child
    }

    /// `copy_page_range()` for one VMA: every entry of `vma` into `child`.
    /// We enter with both mmap locks held for writing and no page-table
    /// lock, and return the same way.
    private func copyPageRange(to child: AddressSpace, _ vma: VMA) {
        let cow = !vma.flags.contains(.shared)
        let range = MMUNotifierRange(start: vma.start, end: vma.end, event: .protectionPage, owner: nil)
        if cow { invalidateRangeStart(range) }
        var wrprotected = false
        var a = vma.start
        while a < vma.end {
            let pmdStart = a & AddressSpace.pmdMask
            let next = min(pmdStart + AddressSpace.pmdSize, vma.end)
            var pmd = loadPMD(a)
            if pmd.kind != .none && pmd.kind != .table {
                splitHugePMD(pmdStart)
                pmd = loadPMD(a)
            }
            if pmd.kind == .table {
                _ = child.ensurePTETable(a)
                if copyPTERange(to: child, vma, a, next, cow: cow) { wrprotected = true }
            }
            a = next
        }
        // dup_mmap()'s flush_tlb_mm(oldmm): no CPU of the parent may keep
        // writing a page the child now shares.
        if wrprotected { flushTLBRange(vma.start, vma.end) }
        if cow { invalidateRangeEnd(range) }
    }

    /// `copy_pte_range()`: the PTEs of `[start, end)` (one PTE table) into
    /// `child`, under the child's PTE lock and then the parent's, as the
    /// kernel nests them. Returns whether a writable parent entry was made
    /// read-only (the parent's TLBs then need a flush).
    private func copyPTERange(to child: AddressSpace, _ vma: VMA, _ start: UInt64, _ end: UInt64, cow: Bool) -> Bool {
        child.ptl(at: start).withLock(nesting: ptl(at: start)) { () -> Bool in
            var wrprotected = false
            var a = start
            while a < end {
                defer { a += PageGeometry.pageSize64 }
                let pte = loadPTE(a)
                switch pte.kind {
                case .none, .table:
                    continue
                case .present:
                    if copyPresentPTE(to: child, a, pte, cow: cow) { wrprotected = true }
                case .devicePrivate, .migration:
                    copyNonpresentPTE(to: child, a, pte, cow: cow)
                case .deviceExclusive:
                    // copy_nonpresent_pte(): restore the CPU mapping in the
                    // parent, then copy it as a present page. The mmap lock
                    // held for writing keeps make_device_exclusive() and the
                    // restoring fault out, so no folio lock is needed here.
                    let present = restoredExclusivePTE(pte, vma)
                    storePTE(a, present)
                    if copyPresentPTE(to: child, a, present, cow: cow) { wrprotected = true }
                }
            }
            return wrprotected
        }
    }

    /// `copy_present_pte()`: the child maps the same page. A private page
    /// becomes shared (anon-exclusive cleared, one more reference and map
    /// count) and read-only in both. Returns whether the parent's entry lost
    /// its write permission. Caller holds both PTE locks of `address`.
    private func copyPresentPTE(to child: AddressSpace, _ address: UInt64, _ pte: PageTableEntry, cow: Bool) -> Bool {
        if pte.isSpecial {
            // The zero page: no reference, no rmap.
            child.storePTE(address, pte.without(PageTableEntry.youngBit))
            return false
        }
        let page = Page(pfn: pte.pfn, kernel: kernel)
        let folio = page.folio
        folio.get()
        // folio_try_dup_anon_rmap_pte(): the page is no longer exclusive.
        if cow { page.meta.clearFlags(PageFlags.anonExclusive.rawValue) }
        page.atomicMapcount.wrappingAdd(1, ordering: .acquiringAndReleasing)
        var childPTE = pte.without(PageTableEntry.youngBit)
        if !cow { childPTE = childPTE.without(PageTableEntry.dirtyBit) }
        guard cow && pte.isWrite else {
            child.storePTE(address, childPTE)
            return false
        }
        storePTE(address, pte.without(PageTableEntry.writeBit))
        child.storePTE(address, childPTE.without(PageTableEntry.writeBit))
        return true
    }

    /// `copy_nonpresent_pte()`: a device-private entry is shared like a
    /// present page (reference, map count) and made read-only in both for
    /// copy-on-write; a migration entry holds neither, and is copied
    /// read-only for copy-on-write (a read-exclusive one becomes plain
    /// read). Caller holds both PTE locks of `address`.
    private func copyNonpresentPTE(to child: AddressSpace, _ address: UInt64, _ pte: PageTableEntry, cow: Bool) {
        var entry = pte
        if pte.kind == .devicePrivate {
            let page = Page(pfn: pte.pfn, kernel: kernel)
            page.folio.get()
            if cow { page.meta.clearFlags(PageFlags.anonExclusive.rawValue) }
            page.atomicMapcount.wrappingAdd(1, ordering: .acquiringAndReleasing)
            if cow && pte.isWrite {
                entry = pte.without(PageTableEntry.writeBit)
                storePTE(address, entry)
            }
        } else if cow && (pte.isWrite || pte.isReadExclusive) {
            entry = pte.without(PageTableEntry.writeBit | PageTableEntry.readExclusiveBit)
            storePTE(address, entry)
        }
        child.storePTE(address, entry)
    }
}
