import CSVMSupport

/// The reservations of one private hugetlb mapping (the owner's `resv_map`):
/// the pool reserved one page per 2 MiB when the mapping was made, and a
/// fault consumes the reservation of its huge page once. What remains
/// unconsumed goes back to the pool when the mapping is unmapped.
///
/// Keyed by the huge page's address (the emulator does not move hugetlb
/// mappings). The set is changed under its own lock; a fault changes it
/// under the page's hugetlb fault mutex too.
final class HugeTLBReservation: @unchecked Sendable {
    /// Huge pages whose reservation a fault consumed.
    private let consumed = LockedValue<Set<UInt64>>([])

    /// Consumes the reservation of the huge page at `haddr`: true the first
    /// time (the fault allocates a reserved page), false once consumed.
    ///
    /// The corresponding kernel function is `vma_needs_reservation()` +
    /// `vma_commit_reservation()`.
    func consume(_ haddr: UInt64) -> Bool { consumed.withLock { $0.insert(haddr).inserted } }
    /// Gives back a reservation `consume` took when the fault could not use it.
    ///
    /// The corresponding kernel function is `vma_end_reservation()`.
    func restore(_ haddr: UInt64) { _ = consumed.withLock { $0.remove(haddr) } }
    /// Forgets `[start, end)` and returns how many of its huge pages still
    /// held an unconsumed reservation.
    func close(_ start: UInt64, _ end: UInt64) -> Int {
        consumed.withLock { set in
            var unused = 0
            var a = start
            while a < end {
                if set.remove(a) == nil { unused += 1 }
                a += PageGeometry.pmdSize64
            }
            return unused
        }
    }
}

// MAP_HUGETLB mappings: mmap with a pool reservation, the hugetlb fault
// (`hugetlb_fault()`: no-page and write-protect), the unmap's return of
// unused reservations, fork's copy, and the checks that keep every cut of a
// hugetlb VMA on a 2 MiB boundary.
extension AddressSpace {
    /// Maps private anonymous memory backed by 2 MiB hugetlb pages
    /// (`mmap(MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB)`).
    ///
    /// Takes the mmap lock for writing: the caller must not hold it. The
    /// length is rounded up to whole 2 MiB pages, as the kernel rounds it,
    /// and the pool reserves one page per 2 MiB at once
    /// (``HugeTLBPool/reservedPages``), so that no fault of the mapping can
    /// run out of pages. Each first touch of a 2 MiB page maps a whole
    /// zeroed pool page with one PMD entry: read-only on a read (still
    /// exclusive: the first write makes it writable in place), writable on a
    /// write; later writes after `fork()` copy the 2 MiB page. The mapping is
    /// not anonymous memory (``VMA/isAnonymous`` is false): THP, MADV_FREE,
    /// MADV_COLLAPSE and device-exclusive access do not apply, and
    /// ``Kernel/migrateVMASetup(_:)`` refuses it. ``munmap(_:length:)``,
    /// ``mprotect(_:length:protection:)`` and MADV_DONTNEED must cut it on
    /// 2 MiB boundaries.
    ///
    /// - Parameters:
    ///   - address: with a value, MAP_FIXED: must be 2 MiB aligned; what was
    ///     mapped there is unmapped first. Without, the emulator picks a free
    ///     2 MiB-aligned range.
    ///   - length: bytes to map, rounded up to whole 2 MiB pages.
    ///   - protection: ``Protection/read`` and/or ``Protection/write``;
    ///     write implies read.
    /// - Returns: the start of the new mapping.
    /// - Throws: ``Errno/invalidArgument`` for a zero length, a fixed address
    ///   that is not 2 MiB aligned or out of range, or a fixed range that
    ///   would cut another hugetlb mapping off a 2 MiB boundary;
    ///   ``Errno/noMemory`` when the pool's free, unreserved pages cannot
    ///   cover the mapping (the kernel test's SKIP case) or no range is free.
    ///   Nothing changes then.
    ///
    /// The corresponding kernel function is `hugetlbfs_file_mmap()` (via
    /// `ksys_mmap_pgoff()` and `hugetlb_reserve_pages()`).
    @discardableResult
    public func mmapHugeTLB(address: UInt64? = nil, length: Int, protection: Protection = .readWrite) throws(Errno) -> UInt64 {
        guard length > 0, UInt64(length) <= endAddress - baseAddress else { throw .invalidArgument }
        let len = (UInt64(length) + PageGeometry.pmdSize64 - 1) & PageGeometry.pmdMask
        var flags: VMAFlags = [.hugetlb]
        if protection.contains(.read) { flags.insert(.read) }
        if protection.contains(.write) { flags.insert([.write, .read]) }
        let pages = Int(len >> PageGeometry.pmdShift)
        mmapWriteLock(); defer { mmapWriteUnlock() }
        let start: UInt64
        if let address {
            guard address & ~PageGeometry.pmdMask == 0, address >= baseAddress, address <= endAddress, len <= endAddress - address else {
                throw .invalidArgument
            }
            try hugetlbCheckSplit(address, address + len)
            guard kernel.hugetlb.reserve(pages) else { throw .noMemory }
            start = address
            unmapLocked(start, start + len)
        } else {
            guard let s = freeRange(length: len, align: PageGeometry.pmdSize64) else { throw .noMemory }
            guard kernel.hugetlb.reserve(pages) else { throw .noMemory }
            start = s
        }
        let vma = VMA(mm: kernelView, start: start, end: start + len, flags: flags)
        vma.hugetlbReservation = HugeTLBReservation()
        vmas.insert(vma, at: vmas.firstIndex { $0.start > start } ?? vmas.count)
        relinkAnonMappings()
        return start
    }

    /// `hugetlb_vm_op_split()` for every VMA that `[start, end)` would cut:
    /// a hugetlb VMA may be cut only on a 2 MiB boundary.
    /// Caller holds the mmap lock.
    func hugetlbCheckSplit(_ start: UInt64, _ end: UInt64) throws(Errno) {
        for cut in [start, end] where cut & ~PageGeometry.pmdMask != 0 {
            if let v = vma(containing: cut), v.flags.contains(.hugetlb), v.start != cut { throw .invalidArgument }
        }
    }

    /// `madvise_dontneed_free_valid_vma()` for hugetlb VMAs in `[start, end)`:
    /// MADV_FREE does not apply to them, and MADV_DONTNEED must start on a
    /// 2 MiB boundary (its end is rounded down to one). Caller holds the
    /// mmap lock.
    func hugetlbCheckMadvise(_ start: UInt64, _ end: UInt64, free: Bool) throws(Errno) {
        for v in vmas where v.end > start && v.start < end && v.flags.contains(.hugetlb) {
            if free || max(v.start, start) & ~PageGeometry.pmdMask != 0 { throw .invalidArgument }
        }
    }

    /// `mremap()`'s hugetlb rules: both lengths rounded up to 2 MiB, the
    /// address on a 2 MiB boundary, no growth (the kernel's reservations
    /// cannot follow it), and, in the emulator, no move (the reservations
    /// are keyed by address). Shrinking in place is allowed. Caller holds
    /// the mmap lock.
    func hugetlbMremapLengths(_ vma: VMA, _ oldAddress: UInt64, _ oldLen: inout UInt64, _ newLen: inout UInt64, moves: Bool) throws(Errno) {
        guard vma.flags.contains(.hugetlb) else { return }
        let align = { (x: UInt64) in (x + PageGeometry.pmdSize64 - 1) & PageGeometry.pmdMask }
        guard oldAddress & ~PageGeometry.pmdMask == 0, align(newLen) <= align(oldLen), !moves else { throw .invalidArgument }
        oldLen = align(oldLen)
        newLen = align(newLen)
    }

    /// `hugetlb_vm_op_close()`: the unused reservations of a hugetlb VMA
    /// go back to the pool. Caller holds the mmap lock for writing, and the
    /// VMA's entries are gone.
    func hugetlbClose(_ vma: VMA) {
        guard let resv = vma.hugetlbReservation else { return }
        kernel.hugetlb.unreserve(resv.close(vma.start, vma.end))
        vma.hugetlbReservation = nil
    }

    /// A fault in a hugetlb VMA (`hugetlb_fault()`): a none entry gets a
    /// zeroed pool page (`hugetlb_no_page()`), a write to a read-only one
    /// reuses or copies it (`hugetlb_wp()`), and a migration entry is waited
    /// on after the fault mutex is dropped (`migration_entry_wait_huge()`:
    /// the migration holds the folio lock, which ranks below the mutex).
    /// Faults on the same huge page serialize on its fault mutex. We enter
    /// with the mmap lock held for reading and no page-table lock, and
    /// return the same way: the migration wait sleeps with the mmap lock
    /// held, as the kernel's keeps the VMA lock.
    ///
    /// Throws ``Errno/ioError`` (SIGBUS) when no pool page is free for a
    /// page without a reservation.
    func hugetlbFault(_ vma: VMA, _ address: UInt64, write: Bool) throws(Errno) {
        let haddr = address & PageGeometry.pmdMask
        let migrating = try kernel.hugetlb.withFaultMutex(id, haddr) { () throws(Errno) -> UInt64? in
            let pmd = loadPMD(haddr)
            switch pmd.kind {
            case .none:
                try hugetlbNoPage(vma, haddr, write: write)
            case .present where pmd.isProtNone:
                withPMDLock(haddr) {
                    let now = loadPMD(haddr)
                    if now.kind == .present { storePMD(haddr, now.without(PageTableEntry.protNoneBit)) }
                }
            case .present where write && !pmd.isWrite:
                try hugetlbWP(vma, haddr, pmd)
            case .present:
                break
            case .migration:
                return pmd.pfn
            default:
                // Only present and migration entries are ever made under a hugetlb VMA.
                kernel.warn("hugetlb_fault: unexpected entry under a hugetlb mapping", "\(pmd) at 0x\(String(haddr, radix: 16))")
                throw .ioError
            }
            return nil
        }
        if migrating != nil {
            // migration_entry_wait_huge(): queued under the PMD lock, the
            // mmap lock held through the sleep (the kernel keeps the VMA lock).
            migrationEntryWait(at: haddr)
        }
    }

    /// `hugetlb_no_page()`: a zeroed pool page, mapped by one PMD entry.
    /// A private mapping maps it read-only on a read (exclusive, so the
    /// first write reuses it) and writable and dirty on a write. The page
    /// comes from the VMA's reservation the first time, else from the free,
    /// unreserved pages. Caller holds the page's fault mutex.
    private func hugetlbNoPage(_ vma: VMA, _ haddr: UInt64, write: Bool) throws(Errno) {
        let reserved = vma.hugetlbReservation?.consume(haddr) ?? false
        guard let folio = kernel.hugetlb.allocate(reserved: reserved) else {
            if reserved { vma.hugetlbReservation?.restore(haddr) }
            throw .ioError
        }
        folio.zeroBytes()
        let writable = write && vma.flags.contains(.write)
        let mapped = withPMDLock(haddr) { () -> Bool in
            guard loadPMD(haddr).isNone else { return false }
            addHugetlbAnonRmap(folio, vma, haddr)
            storePMD(haddr, .present(pfn: folio.pfn, write: writable, dirty: writable))
            return true
        }
        if !mapped {
            if reserved { vma.hugetlbReservation?.restore(haddr) }
            folio.put()
        }
    }

    /// `hugetlb_add_new_anon_rmap()`: anonymous, exclusive, entirely mapped
    /// once, and not on the LRU (hugetlb pages never are) but on the pool's
    /// active list, where migration may isolate it
    /// (`folio_set_hugetlb_migratable()`).
    private func addHugetlbAnonRmap(_ folio: Folio, _ vma: VMA, _ haddr: UInt64) {
        addNewAnonRmap(folio, vma, address: haddr, pmdMapped: true)
        folio.clear(.lru)
        folio.set(.hugetlbMigratable)
    }

    /// `hugetlb_wp()`: a write to a read-only hugetlb entry. An exclusive
    /// page (or one this mapping alone maps) becomes writable in place;
    /// otherwise (shared with a fork) the 2 MiB page is copied into a free
    /// pool page, mapped writable in its place inside an `MMU_NOTIFY_CLEAR`
    /// invalidation (clear, flush, set), and the old page loses this mapping
    /// and its reference. Caller holds the page's fault mutex and the mmap
    /// lock for reading.
    private func hugetlbWP(_ vma: VMA, _ haddr: UInt64, _ old: PageTableEntry) throws(Errno) {
        let oldFolio = Folio(pfn: old.pfn, kernel: kernel)
        let bits = PageTableEntry.writeBit | PageTableEntry.dirtyBit | PageTableEntry.youngBit
        let reused = withPMDLock(haddr) { () -> Bool? in
            let now = loadPMD(haddr)
            guard now.kind == .present, now.pfn == old.pfn else { return nil }
            guard oldFolio.page(0).isAnonExclusive || oldFolio.mapCount == 1 else { return false }
            kernel.deferredTLB.willMakeWritable()
            oldFolio.meta.setFlags(PageFlags.anonExclusive.rawValue)  // hugetlb: the head's flag (hugetlb_add_anon_rmap())
            oldFolio.meta.mappingMM = id
            storePMD(haddr, now.with(bits))
            kernel.vmstat.count(.wpFaults)
            return true
        }
        guard reused == false else { return }
        guard oldFolio.tryGet() else { return }
        defer { oldFolio.put() }
        kernel.vmstat.count(.wpFaults)
        guard let folio = kernel.hugetlb.allocate(reserved: false) else { throw .ioError }
        folio.copyBytes(from: oldFolio)
        let replaced = withInvalidation(haddr, haddr + PageGeometry.pmdSize64, .clear) { () -> Bool in
            withPMDLock(haddr) { () -> Bool in
                let now = loadPMD(haddr)
                guard now.kind == .present, now.pfn == old.pfn, !now.isWrite else { return false }
                addHugetlbAnonRmap(folio, vma, haddr)
                storePMD(haddr, .none)
                flushTLBRange(haddr, haddr + PageGeometry.pmdSize64)
                storePMD(haddr, .present(pfn: folio.pfn, write: true, dirty: true))
                removeEntireRmap(oldFolio)
                return true
            }
        }
        finishCopyOnWrite(replaced, old: oldFolio, new: folio)
    }

    /// `copy_hugetlb_page_range()` for fork: every mapped 2 MiB page of
    /// `vma` is shared with `child` read-only (copy-on-write in both), its
    /// reference and map count taken for the child and anon-exclusive
    /// cleared, inside an `MMU_NOTIFY_PROTECTION_PAGE` invalidation and
    /// with a parent TLB flush when an entry lost write permission. An
    /// exclusive page that may be pinned for DMA, in an address space that
    /// has pinned (`folio_needs_cow_for_dma()`), is copied for the child at
    /// once instead (the pin must keep seeing the parent's page). A migration entry is
    /// copied as it is, made read-only in both (the migration then maps the
    /// new page in both). The child's VMA owns no reservation, as in the
    /// kernel. We enter with both mmap locks held
    /// for writing and no page-table lock, and return the same way.
    ///
    /// Throws ``Errno/noMemory`` when a pinned page needs a copy and the
    /// pool has no free, unreserved page (fork then fails).
    func copyHugetlbRange(to child: AddressSpace, _ vma: VMA) throws(Errno) {
        let range = MMUNotifierRange(start: vma.start, end: vma.end, event: .protectionPage, owner: nil)
        invalidateRangeStart(range)
        defer { invalidateRangeEnd(range) }
        incTLBFlushPending()
        defer { decTLBFlushPending() }
        var wrprotected = false
        defer { if wrprotected { flushTLBRange(vma.start, vma.end) } }
        var haddr = vma.start
        while haddr < vma.end {
            defer { haddr += PageGeometry.pmdSize64 }
            let pmd = loadPMD(haddr)
            guard pmd.kind == .present || pmd.kind == .migration else { continue }
            // A page that may be pinned, referenced under the PMD lock: a
            // migration may replace an entry read without it.
            let pinned = pmd.kind != .present ? nil : withPMDLock(haddr) { () -> (Folio, PageTableEntry)? in
                let now = loadPMD(haddr)
                guard now.kind == .present else { return nil }
                let folio = Folio(pfn: now.pfn, kernel: kernel)
                guard folio.page(0).isAnonExclusive && needsCOWForDMA(folio) else { return nil }
                folio.get()
                return (folio, now)
            }
            if let (folio, now) = pinned {
                defer { folio.put() }
                guard let copy = kernel.hugetlb.allocate(reserved: false) else { throw .noMemory }
                copy.copyBytes(from: folio)
                child.withPMDLock(haddr) {
                    // The child's copy of `vma` has its bounds and vm_pgoff.
                    child.addHugetlbAnonRmap(copy, vma, haddr)
                    child.storePMD(haddr, .present(pfn: copy.pfn, write: now.isWrite, dirty: true))
                }
                continue
            }
            child.pmdLock(at: haddr).withLock(nesting: pmdLock(at: haddr)) {
                let now = loadPMD(haddr)
                if now.kind == .migration {
                    // A page under migration: the child gets the entry too
                    // (the migration's rmap walk finds both, as they share
                    // the fork family), read-only in both, since a private
                    // mapping now shares the page copy-on-write.
                    var entry = now
                    if now.isWrite || now.isReadExclusive {
                        entry = now.without(PageTableEntry.writeBit | PageTableEntry.readExclusiveBit)
                        storePMD(haddr, entry)
                    }
                    child.storePMD(haddr, entry)
                    return
                }
                guard now.kind == .present else { return }
                let folio = Folio(pfn: now.pfn, kernel: kernel)
                folio.get()
                folio.atomicEntireMapcount.wrappingAdd(1, ordering: .acquiringAndReleasing)
                folio.largeMapcountAdd(1)
                folio.meta.clearFlags(PageFlags.anonExclusive.rawValue)  // the head's flag, as it was set
                let shared = now.without(PageTableEntry.writeBit)
                if now.isWrite {
                    // huge_ptep_set_wrprotect(): atomically, keeping a dirty bit set meanwhile.
                    clearPMDBits(haddr, PageTableEntry.writeBit)
                    wrprotected = true
                }
                child.storePMD(haddr, shared)
            }
        }
    }
}
