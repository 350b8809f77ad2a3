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
    /// (`do_wp_page()`). The exception is an anonymous page that is
    /// exclusive and may be pinned (``Folio/isMaybeDMAPinned``) in an
    /// address space that has pinned (``pinUserPages(_:count:flags:)`` ran
    /// in it): the child gets its own copy of the page at once, writable
    /// if the VMA is, and this address space keeps the pinned page
    /// exclusive and its entry unchanged, so the pin goes on seeing what
    /// this address space writes (`folio_try_dup_anon_rmap_pte()` refuses,
    /// then `copy_present_page()`). A writable device-private entry becomes
    /// a read-only one in both; a write in either faults the page back to
    /// RAM first. A device-exclusive entry is restored to a present mapping
    /// first (the device's notifier hears of it), then copied as one.
    /// Migration entries are copied (read-only for copy-on-write), so a
    /// migration in flight finishes in both address spaces. Shared VMAs share
    /// their pages as they are. The range of each private VMA is invalidated
    /// (`MMU_NOTIFY_PROTECTION_PAGE`) and the parent's TLBs flushed before
    /// the lock is dropped.
    ///
    /// One difference from the kernel: a 2 MiB mapping (PMD) in a private
    /// VMA is split to PTEs in the parent first (`copy_huge_pmd()` shares the
    /// PMD; it splits only in the cases it cannot share, a folio that may be
    /// pinned among them, and then copies PTE by PTE as here). The folio
    /// stays large.
    ///
    /// - Returns: the child address space. Its rmap family is this one's and
    ///   its VMAs keep their `vm_pgoff`, so migrations and evictions reach
    ///   the pages it shares wherever either side later moves them.
    /// - Throws: ``Errno/noMemory`` when a page that may be pinned must be
    ///   copied for the child and no page is free (a hugetlb page: the
    ///   hugetlb pool has none), or when the host refuses the child's page
    ///   tables (`mm_alloc()` fails). The child is released; the parent
    ///   keeps its mappings.
    ///
    /// The corresponding kernel function is `dup_mmap()`.
    public func fork() throws(Errno) -> AddressSpace {
        let child: AddressSpace
        do { child = try AddressSpace(kernel: kernel, family: anonFamily) } catch { throw .noMemory }
        mmapWriteLock()
        defer { mmapWriteUnlock() }
        child.mmapWriteLock()
        defer { child.mmapWriteUnlock() }
        child.vmas = vmas.map { VMA(mm: child.kernelView, start: $0.start, end: $0.end, flags: $0.flags, file: $0.file, pageOffset: $0.pageOffset) }
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
            try copyPageRange(to: child, vma)
        }
        return child
    }

    /// `folio_needs_cow_for_dma()`: fork must copy `folio` for the child
    /// rather than share it, because it may be pinned and this address
    /// space has pinned pages (`MMF_HAS_PINNED`). Caller holds the mmap
    /// lock for writing (no pin can start meanwhile).
    func needsCOWForDMA(_ folio: Folio) -> Bool {
        state.hasPinned.load(ordering: .relaxed) && folio.isMaybeDMAPinned
    }

    /// `copy_page_range()` for one VMA: every entry of `vma` into `child`.
    /// We enter with both mmap locks held for writing and no page-table
    /// lock, and return the same way. Throws ``Errno/noMemory`` when a page
    /// to copy for the child cannot be allocated.
    private func copyPageRange(to child: AddressSpace, _ vma: VMA) throws(Errno) {
        let cow = !vma.flags.contains(.shared)
        let range = MMUNotifierRange(start: vma.start, end: vma.end, event: .protectionPage, owner: nil)
        if cow { invalidateRangeStart(range) }
        // The parent's write-protected entries wait for the flush below: a
        // flush is pending meanwhile (a CPU may still write through them).
        incTLBFlushPending()
        defer { decTLBFlushPending() }
        var wrprotected = false
        defer {
            // dup_mmap()'s flush_tlb_mm(oldmm): no CPU of the parent may keep
            // writing a page the child now shares.
            if wrprotected { flushTLBRange(vma.start, vma.end) }
            if cow { invalidateRangeEnd(range) }
        }
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
                try copyPTERange(to: child, vma, a, next, cow: cow, wrprotected: &wrprotected)
            }
            a = next
        }
    }

    /// `copy_pte_range()`: the PTEs of `[start, end)` (one PTE table) into
    /// `child`, under the child's PTE lock and then the parent's, as the
    /// kernel nests them. Sets `wrprotected` when a writable parent entry
    /// was made read-only (the parent's TLBs then need a flush). An entry
    /// that needs a page of its own for the child (a page that may be
    /// pinned) stops the walk: the page is allocated with both locks
    /// dropped (it may sleep), and the walk resumes at that entry with it;
    /// if the entry no longer needs it, it is freed (`-EAGAIN` and the
    /// `prealloc` folio). Throws ``Errno/noMemory`` when no page is free.
    private func copyPTERange(to child: AddressSpace, _ vma: VMA, _ start: UInt64, _ end: UInt64, cow: Bool,
                              wrprotected: inout Bool) throws(Errno) {
        var prealloc: Folio? = nil
        var a = start
        while a < end {
            let needsPage = child.ptl(at: a).withLock(nesting: ptl(at: a)) { () -> Bool in
                while a < end {
                    let pte = loadPTE(a)
                    var copied = PresentCopy.shared(wrprotected: false)
                    switch pte.kind {
                    case .none, .table:
                        break
                    case .present:
                        copied = copyPresentPTE(to: child, vma, a, pte, cow: cow, prealloc: &prealloc)
                    case .devicePrivate, .migration:
                        copyNonpresentPTE(to: child, a, pte, cow: cow)
                    case .deviceExclusive:
                        // copy_nonpresent_pte(): restore the CPU mapping in the
                        // parent, then copy it as a present page. The mmap lock
                        // held for writing keeps make_device_exclusive() and the
                        // restoring fault out, so no folio lock is needed here.
                        let present = restoredExclusivePTE(pte, vma)
                        storePTE(a, present)
                        copied = copyPresentPTE(to: child, vma, a, present, cow: cow, prealloc: &prealloc)
                    }
                    switch copied {
                    case .needsPage:
                        return true
                    case .shared(let wp):
                        if wp { wrprotected = true }
                    }
                    a += PageGeometry.pageSize64
                    // A page allocated for one entry serves no other.
                    if prealloc != nil { return false }
                }
                return false
            }
            if let unused = prealloc {
                unused.put()
                prealloc = nil
            }
            if needsPage {
                guard let folio = kernel.allocateFolio(order: 0) else { throw .noMemory }
                prealloc = folio
            }
        }
    }

    /// What ``copyPresentPTE(to:_:_:_:cow:prealloc:)`` did.
    private enum PresentCopy {
        /// The child maps the entry's page (or its own copy); `wrprotected`:
        /// the parent's entry lost its write permission.
        case shared(wrprotected: Bool)
        /// The child needs a page of its own and `prealloc` held none.
        case needsPage
    }

    /// `copy_present_ptes()` for one PTE: the child maps the same page. A
    /// private page becomes shared (anon-exclusive cleared, one more
    /// reference and map count) and read-only in both. An anonymous page
    /// that is exclusive and may be pinned, in an address space that has
    /// pinned, is not shared (`folio_try_dup_anon_rmap_pte()` fails with
    /// `-EBUSY`): the child maps a copy in `prealloc`
    /// (`copy_present_page()`), or `.needsPage` asks for one. Caller holds
    /// both PTE locks of `address`.
    private func copyPresentPTE(to child: AddressSpace, _ vma: VMA, _ address: UInt64, _ pte: PageTableEntry,
                                cow: Bool, prealloc: inout Folio?) -> PresentCopy {
        if pte.isSpecial {
            // The zero page: no reference, no rmap.
            child.storePTE(address, pte.without(PageTableEntry.youngBit))
            return .shared(wrprotected: false)
        }
        let page = Page(pfn: pte.pfn, kernel: kernel)
        let folio = page.folio
        if folio.isAnon && page.isAnonExclusive && needsCOWForDMA(folio) {
            guard let copy = prealloc else { return .needsPage }
            prealloc = nil
            copyPresentPage(to: child, vma, address, page, pte, copy)
            return .shared(wrprotected: false)
        }
        folio.get()
        // folio_try_dup_anon_rmap_pte(): the page is no longer exclusive.
        if cow { page.meta.clearFlags(PageFlags.anonExclusive.rawValue) }
        page.atomicMapcount.wrappingAdd(1, ordering: .acquiringAndReleasing)
        folio.largeMapcountAdd(1)
        var childPTE = pte.without(PageTableEntry.youngBit)
        if !cow { childPTE = childPTE.without(PageTableEntry.dirtyBit) }
        guard cow && pte.isWrite else {
            child.storePTE(address, childPTE)
            return .shared(wrprotected: false)
        }
        // ptep_set_wrprotect(): the write bit alone is cleared, atomically,
        // so a dirty bit a lockless walk sets meanwhile stays.
        clearPTEBits(address, PageTableEntry.writeBit)
        child.storePTE(address, childPTE.without(PageTableEntry.writeBit))
        return .shared(wrprotected: true)
    }

    /// `copy_present_page()`: the child gets `copy`, a new anonymous page
    /// holding the bytes of `page`, exclusive to it, mapped dirty and
    /// writable if the VMA is (`maybe_mkwrite()`). The parent's entry and
    /// page stay as they are. `copy` (its one reference becomes the child's
    /// mapping's) came from the allocator. Caller holds both PTE locks of
    /// `address`.
    private func copyPresentPage(to child: AddressSpace, _ vma: VMA, _ address: UInt64, _ page: Page,
                                 _ pte: PageTableEntry, _ copy: Folio) {
        copy.page(0).copyBytes(from: page)
        // The child's copy of `vma` has its bounds and vm_pgoff.
        child.addNewAnonRmap(copy, vma, address: address, pmdMapped: false)
        let entry = PageTableEntry.present(pfn: copy.pfn, write: vma.flags.contains(.write), dirty: true)
        child.storePTE(address, entry.with(pte.rawValue & PageTableEntry.protNoneBit))
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
            page.folio.largeMapcountAdd(1)
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
