import Synchronization
import CSVMSupport

/// `mremap()` flags.
public struct MRemapFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// MREMAP_MAYMOVE: the mapping may move when it cannot be resized in place.
    public static let mayMove = MRemapFlags(rawValue: 1)
    /// MREMAP_FIXED: move to `newAddress`, unmapping what was there (needs MAYMOVE).
    public static let fixed = MRemapFlags(rawValue: 2)
    /// MREMAP_DONTUNMAP: move the pages but keep the old VMA, now empty (needs
    /// MAYMOVE and an unchanged length).
    public static let dontUnmap = MRemapFlags(rawValue: 4)
}

// `mremap()`: resizing and moving a mapping together with its pages. The
// contract is on `mremap(_:oldLength:newLength:flags:newAddress:)`.
extension AddressSpace {

    /// Resizes and/or moves the mapping at `oldAddress`, together with its
    /// pages.
    ///
    /// A move never copies bytes: page-table entries (present, zero page, migration
    /// and device-private entries) are moved from the old range to the new one,
    /// a 2 MiB entry whole when both addresses and the extent are 2 MiB aligned,
    /// else after `splitHugePMD`. The moved VMA keeps the `vm_pgoff` of the
    /// range it came from (`copy_vma()`), so every moved folio keeps its
    /// `index`, and the rmap finds it at the new address in this address
    /// space and at the old one in any fork relative that still maps it.
    ///
    /// Locking: the caller must not hold the mmap lock; it is taken for
    /// writing throughout (no fault, no migrate_vma can run); each entry moves
    /// under the old and new page-table locks (old first), which excludes the
    /// lockless CPU access path and each visit of an rmap walker such as
    /// eviction. The moved VMA is linked into the anon rmap after the old
    /// one and before any entry moves, so a walk finds each entry at one end
    /// or the other (or, when it began before the link, runs again). Like
    /// the kernel, the old range is
    /// invalidated (MMU_NOTIFY_UNMAP) before entries move, and one TLB flush of
    /// the old range is accounted per 2 MiB extent in which a present entry moved.
    ///
    /// - Parameters:
    ///   - oldAddress: the start of the mapping to change, page aligned.
    ///   - oldLength: bytes of it to change, rounded up to whole pages.
    ///   - newLength: bytes the mapping has afterwards, rounded up to whole
    ///     pages.
    ///   - flags: MAYMOVE, FIXED, DONTUNMAP.
    ///   - newAddress: with FIXED, where the mapping moves (page aligned).
    /// - Returns: the mapping's address afterwards.
    /// - Throws: ``Errno/invalidArgument`` for unknown flag combinations
    ///   (FIXED or DONTUNMAP without MAYMOVE, DONTUNMAP with a length change),
    ///   unaligned addresses, zero lengths, or overlapping old and new ranges;
    ///   for a hugetlb mapping, an address off a 2 MiB boundary, growth, or
    ///   a move (the emulator only shrinks them, lengths rounded up to 2 MiB);
    ///   ``Errno/badAddress`` when `[oldAddress, oldAddress + oldLength)` is
    ///   not inside one VMA; ``Errno/noMemory`` when the mapping can neither
    ///   grow in place nor move. Nothing changes then.
    ///
    /// The corresponding kernel function is `mremap()` (`move_vma()`,
    /// `move_page_tables()`).
    @discardableResult
    public func mremap(_ oldAddress: UInt64, oldLength: Int, newLength: Int,
                       flags: MRemapFlags = [], newAddress: UInt64? = nil) throws(Errno) -> UInt64 {
        guard flags.isSubset(of: [.mayMove, .fixed, .dontUnmap]) else { throw .invalidArgument }
        if flags.contains(.fixed) || flags.contains(.dontUnmap) {
            guard flags.contains(.mayMove) else { throw .invalidArgument }
        }
        // The kernel allows old_len == 0 only to duplicate a shared mapping;
        // not modelled.
        guard oldAddress & ~PageGeometry.pageMask == 0, oldLength > 0, newLength > 0 else { throw .invalidArgument }
        var oldLen = PageGeometry.pageAlign(UInt64(oldLength))
        var newLen = PageGeometry.pageAlign(UInt64(newLength))
        if flags.contains(.dontUnmap) && oldLen != newLen { throw .invalidArgument }
        guard covers(oldAddress), oldAddress + oldLen <= endAddress else { throw .badAddress }
        var target: UInt64? = nil
        if flags.contains(.fixed) {
            guard let n = newAddress, n & ~PageGeometry.pageMask == 0, n >= baseAddress, n <= endAddress, newLen <= endAddress - n else {
                throw .invalidArgument
            }
            // The old and new ranges must not overlap.
            if n < oldAddress + oldLen && oldAddress < n + newLen { throw .invalidArgument }
            target = n
        }

        mmapWriteLock(); defer { mmapWriteUnlock() }
        // vma_to_resize(): the old range must lie in one VMA.
        guard let vma = vma(containing: oldAddress), oldAddress + oldLen <= vma.end else { throw .badAddress }
        try hugetlbMremapLengths(vma, oldAddress, &oldLen, &newLen, moves: target != nil || flags.contains(.dontUnmap))

        if let target {
            unmapLocked(target, target + newLen)
            var moveLen = oldLen
            if newLen < oldLen {
                unmapLocked(oldAddress + newLen, oldAddress + oldLen)
                moveLen = newLen
            }
            moveVMALocked(oldAddress, length: moveLen, to: target, newLength: newLen,
                          keepOld: flags.contains(.dontUnmap))
            return target
        }
        if newLen <= oldLen && !flags.contains(.dontUnmap) {
            // Shrinking (or no change) happens in place.
            if newLen < oldLen { unmapLocked(oldAddress + newLen, oldAddress + oldLen) }
            return oldAddress
        }
        if !flags.contains(.dontUnmap), oldAddress + oldLen == vma.end,
           fullyFree(vma.end, oldAddress + newLen) {
            // Grow in place: the VMA is extended (vma_expand()), its
            // vm_pgoff unchanged.
            vma.end = oldAddress + newLen
            if let file = vma.file { relinkFileMappings([file]) }
            relinkAnonMappings()
            return oldAddress
        }
        guard flags.contains(.mayMove) else { throw .noMemory }
        guard let to = freeRangeForMove(length: newLen) else { throw .noMemory }
        moveVMALocked(oldAddress, length: oldLen, to: to, newLength: newLen, keepOld: flags.contains(.dontUnmap))
        return to
    }

    /// Nothing is mapped in `[start, end)`. Caller holds the mmap lock.
    private func fullyFree(_ start: UInt64, _ end: UInt64) -> Bool {
        guard end <= endAddress else { return false }
        return !vmas.contains { $0.start < end && start < $0.end }
    }

    /// A free range for a moved mapping, 2 MiB aligned when it is that large
    /// (as `get_unmapped_area()` does for anonymous THP-sized mappings).
    private func freeRangeForMove(length: UInt64) -> UInt64? {
        let align = length >= AddressSpace.pmdSize ? AddressSpace.pmdSize : PageGeometry.pageSize64
        var candidate = (baseAddress + align - 1) & ~(align - 1)
        for v in vmas {
            if candidate + length <= v.start { return candidate }
            candidate = max(candidate, (v.end + align - 1) & ~(align - 1))
        }
        return candidate + length <= endAddress ? candidate : nil
    }

    /// `move_vma()`: a new VMA with the old one's flags and `vm_pgoff` at `to`
    /// (extended to `newLength`; `copy_vma()`), the page tables of
    /// `[from, from + length)` moved into it, then the old range unmapped
    /// unless `keepOld` (MREMAP_DONTUNMAP leaves it mapped and empty).
    /// Caller holds the mmap lock for writing; `to` is free.
    private func moveVMALocked(_ from: UInt64, length: UInt64, to: UInt64, newLength: UInt64, keepOld: Bool) {
        splitVMA(at: from)
        splitVMA(at: from + length)
        guard let old = vma(containing: from) else { return }
        let moved = VMA(mm: kernelView, start: to, end: to + newLength, flags: old.flags, file: old.file, pageOffset: old.pageOffset)
        let i = vmas.firstIndex { $0.start > to } ?? vmas.count
        vmas.insert(moved, at: i)
        // The rmaps must find the moved entries (take_rmap_locks()): the
        // file's i_mmap, and the anon rmap, where the new VMA is linked
        // after the old one (a walk meets the old place first).
        if let file = old.file { relinkFileMappings([file]) }
        relinkAnonMappings()
        withInvalidation(from, from + length, .unmap) {
            movePageTables(from, to, length)
        }
        if !keepOld { unmapLocked(from, from + length) }
    }

    /// `move_page_tables()`: per 2 MiB extent, a huge entry moves whole when
    /// both sides are aligned and the extent is a full 2 MiB (`move_huge_pmd()`),
    /// else it is split and the PTEs move one by one (`move_ptes()`).
    private func movePageTables(_ from: UInt64, _ to: UInt64, _ length: UInt64) {
        var done: UInt64 = 0
        while done < length {
            let old = from + done, new = to + done
            // The extent ends at the next 2 MiB boundary of either side.
            let oldNext = (old & AddressSpace.pmdMask) + AddressSpace.pmdSize
            let newNext = (new & AddressSpace.pmdMask) + AddressSpace.pmdSize
            let extent = min(oldNext - old, newNext - new, length - done)
            let pmd = loadPMD(old)
            switch pmd.kind {
            case .none:
                break
            case .present, .migration, .devicePrivate, .deviceExclusive:
                if extent == AddressSpace.pmdSize && moveHugePMD(old, new) { break }
                splitHugePMD(old)
                movePTEs(old, new, extent)
            case .table:
                movePTEs(old, new, extent)
            }
            done += extent
        }
    }

    /// Moves a 2 MiB entry; false when the destination PMD slot is in use.
    /// Caller holds the mmap lock for writing and no page-table lock; both PMD
    /// locks are taken (old first) and held across the TLB flush of the old
    /// range, as `move_huge_pmd()` does: once they drop, an rmap walker can
    /// find the folio at its new address only, unmap and free it there, and
    /// a CPU still holding the old translation would reach the freed frame
    /// (CVE-2018-18281).
    private func moveHugePMD(_ old: UInt64, _ new: UInt64) -> Bool {
        var dest = loadPMD(new)
        if dest.kind == .table && tableIsEmpty(new) {
            freePTETable(new)
            dest = loadPMD(new)
        }
        guard dest.isNone else { return false }
        pmdLock(at: old).withLock(nesting: pmdLock(at: new)) {
            let e = loadPMD(old)
            guard e.kind == .present || e.kind == .migration || e.kind == .devicePrivate else { return }
            let cleared = exchangePMD(old, .none)
            storePMD(new, cleared)
            if cleared.kind == .present { flushTLBRange(old, old + AddressSpace.pmdSize) }
        }
        return true
    }

    private func tableIsEmpty(_ address: UInt64) -> Bool {
        let base = pteSlot(address & AddressSpace.pmdMask)
        for i in 0..<PageGeometry.pmdPages where UnsafeAtomic(base + i).load(ordering: .acquiring) != 0 { return false }
        return true
    }

    /// Moves the PTEs of `[old, old + extent)` (inside one PTE table on each side).
    /// Caller holds the mmap lock for writing and no page-table lock; both PTE
    /// locks are taken (old first) and held across the TLB flush of the old
    /// range, as `move_ptes()` does (see ``moveHugePMD(_:_:)`` for why).
    private func movePTEs(_ old: UInt64, _ new: UInt64, _ extent: UInt64) {
        _ = ensurePTETable(new)
        ptl(at: old).withLock(nesting: ptl(at: new)) {
            var flushNeeded = false
            var off: UInt64 = 0
            while off < extent {
                if !loadPTE(old + off).isNone {
                    // ptep_get_and_clear(): the accessed and dirty bits a
                    // lockless walk sets meanwhile move with the entry.
                    let e = exchangePTE(old + off, .none)
                    storePTE(new + off, e)
                    if e.kind == .present { flushNeeded = true }
                }
                off += PageGeometry.pageSize64
            }
            if flushNeeded { flushTLBRange(old, old + extent) }
        }
    }
}
