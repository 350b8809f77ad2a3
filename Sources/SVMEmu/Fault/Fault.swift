import CSVMSupport

// Page-fault handling (`handle_mm_fault()`): demand zero, the zero page,
// THP faults, write-protect faults, migration-entry waits and device-private
// faults. Returning means "retry the access".
extension AddressSpace {
    /// How long one wait on a migration entry may sleep before the fault is
    /// retried (and the entry looked at again).
    static let migrationWaitNanos: UInt64 = 100_000_000

    /// A page fault at `address`. Called by the access path with no lock
    /// held; takes the mmap lock for reading and returns with it dropped.
    /// Returning means "retry the access".
    @usableFromInline
    func handleMMFault(_ address: UInt64, write: Bool) throws(Errno) {
        // lock_mm_and_find_vma(): a trylock first, the sleeping lock only when it fails.
        mmapLock.downReadTryingFirst()
        state.mmapLockHolders.add(1, ordering: .relaxed)
        var lockState = FaultLockState(held: true, mayDrop: true)
        defer { if lockState.held { mmapReadUnlock() } }
        try handleMMFaultLocked(address, write: write, &lockState)
    }

    /// `handle_mm_fault()` for a caller that holds the mmap lock for reading.
    /// With `lockState.mayDrop` the handler may drop it to sleep (the kernel's
    /// VM_FAULT_RETRY); otherwise it sleeps holding it (FAULT_FLAG_ALLOW_RETRY unset).
    /// We enter with no page-table lock and return with none; `lockState.held`
    /// tells whether the mmap lock is still held.
    func handleMMFaultLocked(_ address: UInt64, write: Bool, _ holdsMmapLock: inout FaultLockState) throws(Errno) {
        guard let vma = vma(containing: address) else { throw .badAddress }
        guard vma.flags.contains(.read) else { throw .permissionDenied }
        if write && !vma.flags.contains(.write) { throw .permissionDenied }
        // Counted only once the fault gets this far, as in the kernel: a fault
        // with no VMA or an access error is rejected by the arch fault handler
        // (bad_area) before handle_mm_fault() and never counts in vmstat pgfault.
        kernel.vmstat.count(.pgfault)
        // A VM_PFNMAP/VM_IO mapping without a fault handler: handle_mm_fault()
        // returns VM_FAULT_SIGBUS.
        if vma.flags.contains(.special) { throw .ioError }
        if vma.flags.contains(.hugetlb) { return try hugetlbFault(vma, address, write: write) }

        var pmd = loadPMD(address)
        if pmd.isNone {
            if vma.isAnonymous && vma.allowsHugePage(at: address, mode: kernel.configuration.transparentHugepage),
               hugeAnonymousFault(vma, address, write: write) {
                return
            }
            pmd = ensurePTETable(address)
        }
        switch pmd.kind {
        case .none, .deviceExclusive:
            return
        case .present:
            hugePMDFault(vma, address, write: write)
            return
        case .migration:
            // pmd_migration_entry_wait(): sleeps with the mmap lock held.
            migrationEntryWait(at: address)
            return
        case .devicePrivate:
            try devicePrivatePMDFault(vma, address, &holdsMmapLock)
            return
        case .table:
            break
        }
        try ptePageFault(vma, address, write: write, &holdsMmapLock)
    }

    /// A fault on a PTE-table-mapped address (`handle_pte_fault()`).
    /// We enter with the mmap lock held for reading and no page-table lock;
    /// Takes the PTE lock and returns with it dropped. The lock is not taken in
    /// the scoped form because a device-private entry hands it, held, to
    /// ``devicePrivateFault(_:_:_:_:_:)``, which drops it (as
    /// `handle_pte_fault()` hands `vmf->ptl` to `do_swap_page()`); every other
    /// entry is handled under the lock, which is dropped in one place before
    /// anything that allocates or sleeps.
    private func ptePageFault(_ vma: VMA, _ address: UInt64, write: Bool, _ holdsMmapLock: inout FaultLockState) throws(Errno) {
        // handle_pte_fault() reads the entry without the lock (vmf->orig_pte);
        // on a device-private one the kernel's own code runs up to the page
        // reference before do_swap_page() takes the PTE lock, both passes of
        // 6.12's fault included (the machine's measured span; 0 without a
        // profile that has it). The entry is read again under the lock below.
        if _slowPath(svm_det_active()), loadPTE(address).kind == .devicePrivate {
            DeterministicScheduler.charge(\.deviceFaultToReference, "device-private fault to its reference")
        }
        let lock = ptl(at: address)
        lock.lock()
        guard loadPMD(address).kind == .table else { lock.unlock(); return }
        let pte = loadPTE(address)
        if pte.kind == .devicePrivate {
            // Returns with the PTE lock dropped.
            return try devicePrivateFault(vma, address, pte, lock, &holdsMmapLock)
        }
        let next: PTEFaultNext
        switch pte.kind {
        case .none:
            if vma.file != nil {
                next = .fileFault
            } else if !write && vma.isAnonymous {
                // do_anonymous_page() on a read: map the shared zero page.
                storePTE(address, .present(pfn: kernel.zeroPage.pfn, write: false, special: true))
                next = .mappedZeroPage
            } else {
                next = .newPage
            }
        case .present:
            if pte.isProtNone {
                storePTE(address, pte.without(PageTableEntry.protNoneBit))
                next = .done
            } else if write && !pte.isWrite && pte.isSpecial {
                next = .copyZeroPage
            } else if write && !pte.isWrite {
                let page = Page(pfn: pte.pfn, kernel: kernel)
                let shared = vma.flags.contains(.shared)
                // do_wp_page(): a shared mapping writes the page itself
                // (wp_page_shared()); a private one reuses only an anonymous
                // page exclusive to this mm; any other page, a page-cache
                // or driver page of a private mapping included, is copied.
                if shared || (page.folio.isAnon && canReuseAnonPage(page)) {
                    // Deferred migration flushes first: no stale reader may
                    // race a writer.
                    kernel.deferredTLB.willMakeWritable()
                    if shared {
                        page.folio.markDirty()
                    } else {
                        page.meta.setFlags(PageFlags.anonExclusive.rawValue)
                        page.folio.meta.mappingMM = id
                    }
                    storePTE(address, pte.with(PageTableEntry.writeBit | PageTableEntry.dirtyBit | PageTableEntry.youngBit))
                    kernel.vmstat.count(.wpFaults)
                    next = .done
                } else {
                    next = .copyPage
                }
            } else {
                next = .done
            }
        case .migration:
            next = .waitOnMigration
        case .deviceExclusive:
            next = .restoreExclusive
        case .devicePrivate, .table:
            next = .done
        }
        if next == .waitOnMigration {
            // migration_entry_wait() from do_swap_page(): queued before the
            // PTE lock goes; the mmap lock stays held through the sleep
            // (the kernel returns no VM_FAULT_RETRY here), so an munmap
            // waits for the migration to end.
            waitOnMigration(pfn: pte.pfn) { lock.unlock() }
            return
        }
        lock.unlock()
        switch next {
        case .done:
            return
        case .mappedZeroPage:
            kernel.vmstat.count(.zeroPageMaps)
        case .newPage:
            try newAnonymousPage(vma, address, expect: pte)
        case .fileFault:
            try fileFault(vma, address, write: write)
        case .copyZeroPage:
            kernel.vmstat.count(.wpFaults)
            try newAnonymousPage(vma, address, expect: pte)
        case .copyPage:
            kernel.vmstat.count(.wpFaults)
            try wpPageCopy(vma, address, pte)
        case .waitOnMigration:
            return   // waited above, under the PTE lock
        case .restoreExclusive:
            removeDeviceExclusiveEntry(vma, address, pte, &holdsMmapLock)
        }
    }

    /// What a PTE fault does once the PTE lock is dropped.
    private enum PTEFaultNext { case done, mappedZeroPage, newPage, fileFault, copyZeroPage, copyPage, waitOnMigration, restoreExclusive }

    /// Allocates a zeroed page and maps it writable if the entry is still
    /// `expect` (none, or the zero page for a write-protect fault).
    /// We enter with the mmap lock held for reading and no page-table lock;
    /// the new mapping owns the folio's one reference.
    private func newAnonymousPage(_ vma: VMA, _ address: UInt64, expect: PageTableEntry) throws(Errno) {
        // vma_alloc_zeroed_movable_folio(): GFP_HIGHUSER_MOVABLE, a blocking allocation.
        guard let folio = kernel.allocateFolio(order: 0, zeroed: true, blocking: true) else { throw .noMemory }
        // Replacing the zero page (wp_page_copy()): the notifiers hear of it
        // first (MMU_NOTIFY_CLEAR), so that a device mirroring the zero page
        // drops it before the new page is mapped.
        let page = address & PageGeometry.pageMask
        let range = MMUNotifierRange(start: page, end: page + PageGeometry.pageSize64, event: .clear, owner: nil)
        if !expect.isNone { invalidateRangeStart(range) }
        defer { if !expect.isNone { invalidateRangeEnd(range) } }
        let mapped = withPTL(address) { () -> Bool in
            guard loadPMD(address).kind == .table, loadPTE(address) == expect else { return false }
        if vma.isAnonymous {
            addNewAnonRmap(folio, vma, address: address, pmdMapped: false)
        } else {
            folio.set([.shmem, .uptodate, .lru])
            folio.meta.mappingMM = id
            folio.meta.index = vma.linearPageIndex(address)
                folio.page(0).atomicMapcount.wrappingAdd(1, ordering: .acquiringAndReleasing)
                folio.largeMapcountAdd(1)
        }
        let writable = vma.flags.contains(.write)
        if !expect.isNone {
            // ptep_clear_flush(): no CPU may keep the zero page's translation
            // once the new page is mapped.
            storePTE(address, .none)
            flushTLBRange(address & PageGeometry.pageMask, (address & PageGeometry.pageMask) + PageGeometry.pageSize64)
        }
        storePTE(address, .present(pfn: folio.pfn, write: writable, dirty: writable))
            return true
        }
        guard mapped else {
            folio.put()
            return
        }
        kernel.vmstat.count(.demandZeroFaults)
    }

    /// `do_huge_pmd_anonymous_page()`: the huge zero page on a read, a new 2 MiB
    /// folio on a write. Returns false to fall back to 4 KiB pages (no 2 MiB
    /// folio free). We enter with the mmap lock held for reading and no
    /// page-table lock; we take the PMD lock and return with it dropped.
    private func hugeAnonymousFault(_ vma: VMA, _ address: UInt64, write: Bool) -> Bool {
        let haddr = address & AddressSpace.pmdMask
        if !write {
            withPMDLock(haddr) {
            if loadPMD(haddr).isNone {
                storePMD(haddr, .present(pfn: kernel.hugeZeroPage.pfn, write: false, special: true))
                kernel.vmstat.count(.thpZeroPageMap)
            }
            }
            return true
        }
        guard let folio = kernel.allocateFolio(order: PageGeometry.pmdOrder, zeroed: true) else { return false }
        let mapped = withPMDLock(haddr) { () -> Bool in
            guard loadPMD(haddr).isNone else { return false }
            addNewAnonRmap(folio, vma, address: haddr, pmdMapped: true)
            storePMD(haddr, .present(pfn: folio.pfn, write: vma.flags.contains(.write), dirty: true))
            return true
        }
        if mapped {
            kernel.vmstat.count(.thpFaultAlloc)
        } else {
            folio.put()
        }
        return true
    }

    /// A fault on a present huge PMD: PROT_NONE hinting, write to the huge zero
    /// page (split, then handled per PTE), write-protect reuse.
    /// We enter with the mmap lock held for reading and no page-table lock;
    /// we take the PMD lock and return with it dropped.
    private func hugePMDFault(_ vma: VMA, _ address: UInt64, write: Bool) {
        let haddr = address & AddressSpace.pmdMask
        // Whether the entry is the huge zero page, to split out of the lock.
        let writesHugeZero = withPMDLock(haddr) { () -> Bool in
        let pmd = loadPMD(haddr)
            guard pmd.kind == .present else { return false }
        if pmd.isProtNone {
            storePMD(haddr, pmd.without(PageTableEntry.protNoneBit))
        } else if write && !pmd.isWrite {
                if pmd.isSpecial { return true }
                let folio = Folio(pfn: pmd.pfn, kernel: kernel)
                // Not exclusive and referenced elsewhere: split, copy per PTE.
                if !folio.page(0).isAnonExclusive && folio.refCount != 1 { return true }
                kernel.deferredTLB.willMakeWritable()
            folio.meta.setFlags(PageFlags.anonExclusive.rawValue)  // a PMD mapping's exclusivity is its head's
            storePMD(haddr, pmd.with(PageTableEntry.writeBit | PageTableEntry.dirtyBit | PageTableEntry.youngBit))
            kernel.vmstat.count(.wpFaults)
        }
            return false
        }
        // do_huge_pmd_wp_page() on the huge zero page or a shared folio:
        // split, retry per PTE.
        if writesHugeZero { splitHugePMD(haddr) }
    }

    /// `wp_can_reuse_anon_folio()`: whether a write fault may make the
    /// read-only mapping of `page` writable in place. An anon-exclusive page
    /// may; otherwise only a small folio whose one reference is this
    /// mapping's, checked under the folio lock (a trylock: a busy folio is
    /// copied). Caller holds the PTE lock of the mapping.
    private func canReuseAnonPage(_ page: Page) -> Bool {
        if page.isAnonExclusive { return true }
        let folio = page.folio
        guard !folio.isLarge, folio.refCount == 1, folio.tryLock() else { return false }
        defer { folio.unlock() }
        return folio.refCount == 1
    }

    /// `wp_page_copy()`: a write to a page shared with another address space
    /// (after fork) gets a private copy. The old page's bytes are copied
    /// (it is read-only in every mapping, so they are stable) with a
    /// reference held; then, inside an `MMU_NOTIFY_CLEAR` invalidation and
    /// under the PTE lock, if the entry is still `old`, it is cleared and
    /// flushed and the copy is mapped writable (`ptep_clear_flush()`, then
    /// `set_pte_at()`); the old page loses this mapping and its reference.
    /// We enter with the mmap lock held for reading and no page-table lock,
    /// and return the same way; a changed entry just retries the access.
    private func wpPageCopy(_ vma: VMA, _ address: UInt64, _ old: PageTableEntry) throws(Errno) {
        let addr = address & PageGeometry.pageMask
        let oldPage = Page(pfn: old.pfn, kernel: kernel)
        let oldFolio = oldPage.folio
        guard oldFolio.tryGet() else { return }
        defer { oldFolio.put() }
        // folio_prealloc(): GFP_HIGHUSER_MOVABLE, a blocking allocation.
        guard let folio = kernel.allocateFolio(order: 0, blocking: true) else { throw .noMemory }
        folio.page(0).copyBytes(from: oldPage)
        let range = MMUNotifierRange(start: addr, end: addr + PageGeometry.pageSize64, event: .clear, owner: nil)
        invalidateRangeStart(range)
        defer { invalidateRangeEnd(range) }
        let replaced = withPTL(addr) { () -> Bool in
            guard loadPMD(addr).kind == .table, loadPTE(addr).without(PageTableEntry.youngBit | PageTableEntry.dirtyBit)
                    == old.without(PageTableEntry.youngBit | PageTableEntry.dirtyBit) else { return false }
            addNewAnonRmap(folio, vma, address: addr, pmdMapped: false)
            storePTE(addr, .none)
            flushTLBRange(addr, addr + PageGeometry.pageSize64)
            storePTE(addr, .present(pfn: folio.pfn, write: true, dirty: true))
            removeRmap(page: oldPage)
            return true
        }
        finishCopyOnWrite(replaced, old: oldFolio, new: folio)
    }

    /// The end of a copy-on-write fault, at either level: when the copy
    /// `new` replaced the mapping, the old folio loses that mapping's
    /// reference (the caller's own reference, taken before the copy, is
    /// dropped by the caller); otherwise the unused copy is freed. Caller
    /// holds no page-table lock (a put may free).
    func finishCopyOnWrite(_ replaced: Bool, old: Folio, new: Folio) {
        if replaced {
            old.put()  // the old mapping's reference
            kernel.vmstat.count(.cowFaults)
        } else {
            new.put()
        }
    }

    /// `migration_entry_wait()`: sleep until the folio under migration is
    /// unlocked (the migration's end), at most `migrationWaitNanos`, then retry.
    /// No reference is taken: a waiter must not make the migration's reference
    /// check fail.
    ///
    /// The caller holds the lock that guards the migration entry and passes
    /// `dropLocks`, which releases it once the waiter is queued
    /// (`migration_entry_wait_on_locked()`): the migration needs that lock
    /// to remove its entry, so the folio stays this migration's until the
    /// waiter is on its queue. Without that lock the folio could be freed and
    /// reused first, and the wait would be on a stranger's lock.
    func waitOnMigration(pfn: UInt64, dropLocks: () -> Void) {
        kernel.vmstat.count(.migrationEntryWaits)
        let folio = Page(pfn: pfn, kernel: kernel).folio
        _ = folio.waitUnlocked(timeoutNanos: AddressSpace.migrationWaitNanos, afterQueued: dropLocks)
    }

    /// `migration_entry_wait()` for the PTE at `address`, or
    /// `pmd_migration_entry_wait()` (and `migration_entry_wait_huge()`) when
    /// a PMD maps it: takes the lock that guards the entry, and when the
    /// entry still is a migration entry queues on its folio, drops the lock,
    /// runs `dropLocks` and sleeps until the migration unlocks the folio (or
    /// `migrationWaitNanos`). Anything else there: returns at once (the
    /// caller retries). Caller holds no page-table lock.
    func migrationEntryWait(at address: UInt64, dropLocks: () -> Void = {}) {
        let pmd = loadPMD(address)
        if pmd.kind == .table {
            let ptl = ptl(at: address)
            ptl.lock()
            let pte = loadPTE(address)
            guard pte.kind == .migration else { ptl.unlock(); dropLocks(); return }
            waitOnMigration(pfn: pte.pfn) { ptl.unlock(); dropLocks() }
            return
        }
        let lock = pmdLock(at: address)
        lock.lock()
        let now = loadPMD(address)
        guard now.kind == .migration else { lock.unlock(); dropLocks(); return }
        waitOnMigration(pfn: now.pfn) { lock.unlock(); dropLocks() }
    }
}

/// Whether a fault handler holds the mmap lock, and may drop it to sleep.
struct FaultLockState {
    var held: Bool
    let mayDrop: Bool
    /// Drops the mmap lock before a sleep when the caller allows it.
    mutating func dropForWait(_ mm: AddressSpace) {
        if held && mayDrop {
            mm.mmapReadUnlock()
            held = false
        }
    }
}
