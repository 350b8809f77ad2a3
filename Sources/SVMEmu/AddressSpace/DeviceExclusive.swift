import CSVMSupport

// Device-exclusive entries: a device takes a page for atomic access, the
// CPU's mapping is replaced by a non-present entry, and a CPU access faults
// and gets the mapping back (`make_device_exclusive()` in mm/rmap.c,
// `remove_device_exclusive_entry()` in mm/memory.c). The page never moves:
// the folio keeps the mapping's reference and map count throughout.
extension AddressSpace {

    /// Takes the page at `address` for exclusive (atomic) access by a device:
    /// the page is faulted in writable, its PTE is cleared and flushed, and a
    /// device-exclusive entry takes its place, so the next CPU
    /// access faults and restores the mapping (after the device's notifier
    /// has dropped its atomic mapping).
    ///
    /// The caller holds the mmap lock for reading (an unlocked call is
    /// reported as a diagnostic) and no page-table or folio lock. The change
    /// happens inside an invalidation of kind ``MMUNotifyEvent/exclusive``
    /// carrying `owner`, so the driver that asked can tell it apart. On
    /// return the page's folio is locked and holds one reference for the
    /// caller: the driver maps the page for atomic access, then unlocks and
    /// puts the folio. While the folio is locked a CPU fault on the entry
    /// waits, so the device mapping is in place before the CPU can take the
    /// page back. A 2 MiB mapping is split to PTEs first.
    ///
    /// - Parameters:
    ///   - address: an address in a private, writable VMA (anonymous, or a
    ///     MAP_PRIVATE file mapping, whose write fault makes an anonymous copy).
    ///   - owner: the device's owner, passed to the notifiers.
    /// - Returns: the page, its folio locked and referenced.
    /// - Throws: ``Errno/badAddress`` (EFAULT) without a VMA;
    ///   ``Errno/notSupported`` (EOPNOTSUPP) for a special or hugetlb mapping, or a
    ///   page that is not anonymous (a shared mapping's, after the write
    ///   fault), the zero page or a device page; the write fault's own error
    ///   (``Errno/permissionDenied`` for a read-only VMA, ``Errno/noMemory``).
    ///
    /// The corresponding kernel function is `make_device_exclusive()`.
    public func makeDeviceExclusive(_ address: UInt64, owner: DeviceOwner?) throws(Errno) -> Page {
        if !isMmapLocked { kernel.warn("make_device_exclusive: caller must hold the mmap lock", "0x\(String(address, radix: 16))", kind: .lockNotHeld) }
        let addr = address & PageGeometry.pageMask
        while true {
            guard let vma = vma(containing: addr) else { throw .badAddress }
            // A hugetlb folio is refused like a non-anonymous one (the kernel
            // faults it in first; its 2 MiB PMD is never split).
            guard vma.flags.isDisjoint(with: [.special, .hugetlb]) else { throw .notSupported }
            // get_user_pages(FOLL_WRITE | FOLL_SPLIT_PMD).
            let pmd = loadPMD(addr)
            if pmd.kind != .none && pmd.kind != .table {
                if pmd.kind == .migration {
                    migrationEntryWait(at: addr)
                    continue
                }
                splitHugePMD(addr)
                continue
            }
            let pte = pmd.kind == .table ? loadPTE(addr) : .none
            guard pte.kind == .present, pte.isWrite, !pte.isProtNone else {
                var state = FaultLockState(held: true, mayDrop: false)
                try handleMMFaultLocked(addr, write: true, &state)
                continue
            }
            let page = Page(pfn: pte.pfn, kernel: kernel)
            let folio = page.folio
            // Only anonymous folios: a shared mapping's page is refused after
            // its write fault, a MAP_PRIVATE file mapping's copy is taken.
            if pte.isSpecial || folio.isZoneDevice || !folio.isAnon { throw .notSupported }
            guard folio.tryGet() else { continue }
            folio.lock()
            let range = MMUNotifierRange(start: addr, end: addr + PageGeometry.pageSize64, event: .exclusive, owner: owner)
            invalidateRangeStart(range)
            let done = withPTL(addr) { () -> Bool in
                let now = loadPTE(addr)
                guard loadPMD(addr).kind == .table, now.kind == .present, now.isWrite, now.pfn == page.pfn else { return false }
                // ptep_clear_flush(), then the entry: the CPU keeps no
                // translation the device's atomics could race.
                let cleared = exchangePTE(addr, .none)
                flushTLBRange(addr, addr + PageGeometry.pageSize64)
                if cleared.isDirty { folio.markDirty() }
                // One entry type since v6.15: no write permission is kept
                // in it; the restore takes it from the VMA.
                storePTE(addr, PageTableEntry.deviceExclusive(pfn: page.pfn)
                    .with(now.rawValue & PageTableEntry.softDirtyBit))
                return true
            }
            invalidateRangeEnd(range)
            if done {
                kernel.vmstat.count(.deviceExclusiveMade)
                return page
            }
            folio.unlock()
            folio.put()
        }
    }

    /// The present PTE a device-exclusive entry of `vma` stands for
    /// (`restore_exclusive_pte()`, as since v6.15): old, with the VMA's
    /// protection (PROT_NONE included) and the entry's soft-dirty bit;
    /// writable when the VMA allows writes and the page could be made
    /// writable without a write fault (``canChangeWritable(_:_:)``: the
    /// anonymous page is still exclusive), and then dirty if the folio is.
    /// The entry itself carries no write permission: mprotect leaves it
    /// alone. Caller holds the PTE lock of the entry.
    func restoredExclusivePTE(_ entry: PageTableEntry, _ vma: VMA) -> PageTableEntry {
        var pte = PageTableEntry.present(pfn: entry.pfn, write: false, young: false)
            .with(entry.rawValue & PageTableEntry.softDirtyBit)
        if !vma.flags.contains(.read) { pte = pte.with(PageTableEntry.protNoneBit) }
        if canChangeWritable(vma, pte) {
            pte = pte.with(PageTableEntry.writeBit)
            if Page(pfn: entry.pfn, kernel: kernel).folio.isDirty { pte = pte.with(PageTableEntry.dirtyBit) }
        }
        return pte
    }

    /// A CPU fault on a device-exclusive entry: lock the folio (or, when
    /// the mmap lock may be dropped and the folio is busy, wait and retry),
    /// tell the notifiers (`MMU_NOTIFY_CLEAR`: the device drops its atomic
    /// mapping), and if the entry is unchanged put the CPU mapping back.
    /// We enter with the mmap lock held for reading and no page-table lock;
    /// we return with no page-table or folio lock, and the mmap lock dropped
    /// only when `holdsMmapLock` allowed a sleep.
    func removeDeviceExclusiveEntry(_ vma: VMA, _ address: UInt64, _ entry: PageTableEntry,
                                    _ holdsMmapLock: inout FaultLockState) {
        let addr = address & PageGeometry.pageMask
        let folio = Page(pfn: entry.pfn, kernel: kernel).folio
        guard folio.tryGet() else { return }
        defer { folio.put() }
        // folio_lock_or_retry().
        if !folio.tryLock() {
            if holdsMmapLock.mayDrop {
                holdsMmapLock.dropForWait(self)
                folio.waitUnlocked(timeoutNanos: AddressSpace.migrationWaitNanos)
                return
            }
            folio.lock()
        }
        defer { folio.unlock() }
        let range = MMUNotifierRange(start: addr, end: addr + PageGeometry.pageSize64, event: .clear, owner: nil)
        invalidateRangeStart(range)
        defer { invalidateRangeEnd(range) }
        withPTL(addr) {
            guard loadPMD(addr).kind == .table, loadPTE(addr) == entry else { return }
            storePTE(addr, restoredExclusivePTE(entry, vma))
            kernel.vmstat.count(.deviceExclusiveRestored)
        }
    }
}
