import CSVMSupport

/// `madvise()` advice the emulator implements.
public enum MadviseAdvice: String, Sendable, CaseIterable {
    /// MADV_DONTNEED: drop the pages; the next touch sees zeroes.
    case dontNeed
    /// MADV_FREE: the contents may be discarded lazily (clean + lazyfree).
    case free
    /// MADV_HUGEPAGE: allow 2 MiB folios in `.madvise` THP mode.
    case hugePage
    /// MADV_NOHUGEPAGE: forbid 2 MiB folios.
    case noHugePage
    /// MADV_COLLAPSE: collapse the range's 2 MiB-aligned regions into THPs now.
    case collapse
}

extension AddressSpace {
    static let pmdSize = PageGeometry.pmdSize64
    static let pmdMask = PageGeometry.pmdMask

    /// Maps anonymous memory (`mmap(MAP_ANONYMOUS | MAP_PRIVATE or MAP_SHARED)`).
    ///
    /// Takes the mmap lock for writing: the caller must not hold it. The new
    /// VMA has no pages; the first touch of each page faults one in (a 2 MiB
    /// folio where ``KernelConfiguration/transparentHugepage`` allows).
    ///
    /// - Parameters:
    ///   - address: with a value, MAP_FIXED: must be page aligned; what was mapped
    ///     there is unmapped first. Without, the emulator picks a free range, 2 MiB
    ///     aligned when `length` is at least 2 MiB (as `thp_get_unmapped_area()`).
    ///   - length: bytes to map, rounded up to whole pages.
    ///   - protection: ``Protection/read`` and/or ``Protection/write``;
    ///     write implies read.
    ///   - shared: MAP_SHARED: pages behave like shmem (they have a mapping
    ///     besides the anonymous one) and cannot move to device-private memory.
    ///   - special: a VM_PFNMAP | VM_IO mapping, what a driver's `remap_pfn_range()`
    ///     of device registers leaves: no struct pages behind it, CPU faults in
    ///     it are SIGBUS (`.ioError`) and `migrateVMASetup` refuses it.
    /// - Returns: the start of the new mapping.
    /// - Throws: ``Errno/invalidArgument`` for a zero length or an unaligned or
    ///   out-of-range fixed address; ``Errno/noMemory`` when no range is free.
    ///   Nothing changes then.
    ///
    /// The corresponding kernel function is `do_mmap()`.
    @discardableResult
    public func mmap(address: UInt64? = nil, length: Int, protection: Protection = .readWrite,
                     shared: Bool = false, special: Bool = false) throws(Errno) -> UInt64 {
        mmapWriteLock(); defer { mmapWriteUnlock() }
        return try mapRegionLocked(address: address, length: length, protection: protection, shared: shared,
                                   special: special, file: nil, pageOffset: nil).start
    }

    func freeRange(length: UInt64, align: UInt64) -> UInt64? {
        var candidate = (baseAddress + align - 1) & ~(align - 1)
        for v in vmas {
            if candidate + length <= v.start { return candidate }
            candidate = max(candidate, (v.end + align - 1) & ~(align - 1))
        }
        return candidate + length <= endAddress ? candidate : nil
    }

    /// Unmaps `[address, address + length)`: drops every page's mapping and
    /// reference and frees empty page tables. Unmapping a range with nothing
    /// mapped succeeds, as in the kernel.
    ///
    /// Takes the mmap lock for writing (the caller must not hold it), so no
    /// fault or migration of the range is in progress; MMU notifiers hear of
    /// it (``MMUNotifyEvent/unmap``) before the entries go, and a page whose
    /// last reference goes is freed after the TLB flush. Migration entries
    /// are dropped too: the migration that made them still owns its pages.
    ///
    /// - Parameters:
    ///   - address: page aligned.
    ///   - length: bytes, rounded up to whole pages.
    /// - Throws: ``Errno/invalidArgument`` for an unaligned address, a zero
    ///   length, a range outside the address space, or a range that would
    ///   cut a hugetlb mapping off a 2 MiB boundary; nothing changes then.
    ///
    /// The corresponding kernel function is `do_munmap()`.
    public func munmap(_ address: UInt64, length: Int) throws(Errno) {
        let (start, end) = try checkRange(address, length)
        mmapWriteLock(); defer { mmapWriteUnlock() }
        try hugetlbCheckSplit(start, end)
        unmapLocked(start, end)
    }

    func checkRange(_ address: UInt64, _ length: Int) throws(Errno) -> (UInt64, UInt64) {
        guard length > 0, address & ~PageGeometry.pageMask == 0 else { throw .invalidArgument }
        let end = address &+ PageGeometry.pageAlign(UInt64(length))
        guard address >= baseAddress, end <= endAddress, end > address else { throw .invalidArgument }
        return (address, end)
    }

    /// Unmaps `[start, end)` (both page aligned). Caller holds the mmap lock
    /// for writing and no page-table lock.
    func unmapLocked(_ start: UInt64, _ end: UInt64) {
        splitVMA(at: start)
        splitVMA(at: end)
        let victims = vmas.filter { $0.start >= start && $0.end <= end }
        guard !victims.isEmpty else { return }
        kernel.deferredTLB.mappingWillChange()
        withInvalidation(start, end, .unmap) {
            for v in victims { zapRange(vma: v, start: v.start, end: v.end, freeTables: true) }
        }
        vmas.removeAll { v in victims.contains { $0 === v } }
        for v in victims {
            v.isLive = false
            hugetlbClose(v)
        }
        let files = victims.compactMap(\.file)
        if !files.isEmpty { relinkFileMappings(files) }
        relinkAnonMappings()
    }

    /// Splits the VMA containing `address` so that one ends and one begins
    /// there; the second piece's `vm_pgoff` is the linear index of its first
    /// page, so every page keeps its index (`__split_vma()`). A hugetlb VMA
    /// is split only on a 2 MiB boundary (callers check first).
    /// Caller holds the mmap lock for writing.
    func splitVMA(at address: UInt64) {
        guard let i = vmas.firstIndex(where: { $0.start < address && address < $0.end }) else { return }
        let old = vmas[i]
        if old.flags.contains(.hugetlb) && address & ~PageGeometry.pmdMask != 0 { return }
        let tail = VMA(mm: kernelView, start: address, end: old.end, flags: old.flags, file: old.file,
                       pageOffset: old.linearPageIndex(address))
        tail.hugetlbReservation = old.hugetlbReservation
        old.end = address
        vmas.insert(tail, at: i + 1)
        if let file = old.file { relinkFileMappings([file]) }
        relinkAnonMappings()
    }

    /// Every page of `[start, end)` lies in some VMA. Caller holds the mmap lock.
    func fullyMapped(_ start: UInt64, _ end: UInt64) -> Bool {
        var a = start
        for v in vmas where v.end > a {
            if v.start > a { return false }
            a = v.end
            if a >= end { return true }
        }
        return a >= end
    }

    /// Changes protection (`mprotect()`): VMAs split at the edges, entries lose
    /// write permission when write is removed (writable migration and
    /// device-private entries become readable), PROT_NONE makes present entries
    /// inaccessible. When write is granted, a present entry that would not
    /// need a write fault becomes writable at once: in a private mapping an
    /// anonymous page exclusive to this address space, in a shared one a
    /// dirty entry (`MM_CP_TRY_CHANGE_WRITABLE`); the others (pages shared
    /// copy-on-write, page-cache pages of a private mapping, clean shared
    /// entries, the zero page) get write permission on their next write
    /// fault. A device-exclusive entry is left as it is (since v6.15): the
    /// CPU access that restores it takes write permission from the VMA.
    ///
    /// Takes the mmap lock for writing (the caller must not hold it); MMU
    /// notifiers hear of it (``MMUNotifyEvent/protectionVMA``) and the TLB
    /// flush is accounted. A zero length at an aligned address does nothing.
    ///
    /// - Parameters:
    ///   - address: page aligned.
    ///   - length: bytes, rounded up to whole pages.
    ///   - protection: the new protection; write implies read.
    /// - Throws: ``Errno/invalidArgument`` (unaligned, out of range, or a
    ///   range that would cut a hugetlb mapping off a 2 MiB boundary),
    ///   ``Errno/noMemory`` when a page of the range is not mapped; nothing
    ///   changes then.
    ///
    /// The corresponding kernel function is `do_mprotect_pkey()`.
    public func mprotect(_ address: UInt64, length: Int, protection: Protection) throws(Errno) {
        if length == 0 && address & ~PageGeometry.pageMask == 0 { return }
        let (start, end) = try checkRange(address, length)
        mmapWriteLock(); defer { mmapWriteUnlock() }
        guard fullyMapped(start, end) else { throw .noMemory }
        try hugetlbCheckSplit(start, end)
        if protection.contains(.write) { kernel.deferredTLB.willMakeWritable() }
        splitVMA(at: start)
        splitVMA(at: end)
        withInvalidation(start, end, .protectionVMA) {
            for v in vmas where v.start >= start && v.end <= end {
                var f = v.flags.subtracting([.read, .write])
                if protection.contains(.read) { f.insert(.read) }
                if protection.contains(.write) { f.insert([.read, .write]) }
                v.flags = f
                // mprotect_fixup(): MM_CP_TRY_CHANGE_WRITABLE for a writable
                // VMA; hugetlb_change_protection() ignores it.
                let upgrade = f.contains(.write) && !f.contains(.hugetlb)
                changeProtection(start: v.start, end: v.end, write: f.contains(.write), none: !f.contains(.read),
                                 tryChangeWritable: upgrade ? v : nil)
            }
        }
    }

    /// Gives the kernel advice about a range: drop its pages, let them be
    /// freed lazily, allow or forbid 2 MiB folios, or collapse into them now.
    ///
    /// Takes the mmap lock itself (the caller must not hold it): for writing
    /// for ``MadviseAdvice/hugePage``, ``MadviseAdvice/noHugePage`` and
    /// ``MadviseAdvice/collapse``, for reading for ``MadviseAdvice/dontNeed``
    /// and ``MadviseAdvice/free`` (which run inside an MMU_NOTIFY_CLEAR
    /// invalidation). A zero length at an aligned address does nothing.
    ///
    /// - Parameters:
    ///   - address: page aligned.
    ///   - length: bytes, rounded up to whole pages.
    ///   - advice: what to do.
    /// - Throws: ``Errno/invalidArgument`` (unaligned, out of range;
    ///   ``MadviseAdvice/free`` on a hugetlb mapping, or
    ///   ``MadviseAdvice/dontNeed`` starting inside one's 2 MiB page, whose
    ///   end is otherwise rounded down to a 2 MiB boundary),
    ///   ``Errno/noMemory`` when a page of the range is not mapped; nothing
    ///   changes then. ``MadviseAdvice/collapse`` also throws
    ///   ``Errno/invalidArgument`` when no aligned 2 MiB region fits or a VMA
    ///   forbids huge pages, ``Errno/tryAgain`` when a region holds entries
    ///   that cannot be collapsed (migration or device-private entries, pages
    ///   locked or referenced elsewhere), and ``Errno/noMemory`` when no 2 MiB
    ///   folio is free; every other region is still collapsed, and the first
    ///   failure is the one thrown.
    ///
    /// The corresponding kernel function is `do_madvise()`.
    public func madvise(_ address: UInt64, length: Int, advice: MadviseAdvice) throws(Errno) {
        if length == 0 && address & ~PageGeometry.pageMask == 0 { return }
        let (start, end) = try checkRange(address, length)
        switch advice {
        case .collapse:
            guard withMmapReadLock({ fullyMapped(start, end) }) else { throw .noMemory }
            try collapse(start, end)
        case .hugePage, .noHugePage:
            mmapWriteLock(); defer { mmapWriteUnlock() }
            guard fullyMapped(start, end) else { throw .noMemory }
            splitVMA(at: start)
            splitVMA(at: end)
            // A hugetlb VMA keeps its flags (VM_NO_KHUGEPAGED): no split, no change.
            for v in vmas where v.start >= start && v.end <= end && !v.flags.contains(.hugetlb) {
                if advice == .hugePage { v.flags.remove(.noHugepage); v.flags.insert(.hugepage) }
                else { v.flags.remove(.hugepage); v.flags.insert(.noHugepage) }
            }
        case .dontNeed, .free:
            mmapReadLock(); defer { mmapReadUnlock() }
            guard fullyMapped(start, end) else { throw .noMemory }
            try hugetlbCheckMadvise(start, end, free: advice == .free)
            withInvalidation(start, end, .clear) {
                for v in vmas where v.end > start && v.start < end {
                    let s = max(v.start, start), e = min(v.end, end)
                    // A hugetlb VMA's end is rounded down to its 2 MiB pages.
                    let zapEnd = v.flags.contains(.hugetlb) ? max(s, e & PageGeometry.pmdMask) : e
                    if advice == .dontNeed { zapRange(vma: v, start: s, end: zapEnd, freeTables: false) }
                    else if v.isAnonymous { lazyFree(start: s, end: e) }
                }
            }
        }
    }
}
