import CSVMSupport

// The CPU fault on a device-private entry (`do_swap_page()`'s device-private
// branch and `do_huge_pmd_device_private()`), with the policy the kernel
// runs (`Kernel.deviceFaultPolicy`).
extension AddressSpace {

    /// The device-private branch of `do_swap_page()`, under the policy in
    /// force: legacy takes a reference and calls `migrateToRAM`; the trylock
    /// policies call it only when they win the folio lock, and otherwise
    /// return (trylock-wait first sleeps until the folio is unlocked).
    ///
    /// We enter with the mmap lock held for reading (as `holdsMmapLock`
    /// says) and the PTE lock `lock` held. We return with the PTE lock
    /// dropped on every path, no folio lock or reference of ours left, and
    /// the mmap lock dropped only when `holdsMmapLock` allowed a sleep.
    func devicePrivateFault(_ vma: VMA, _ address: UInt64, _ pte: PageTableEntry,
                            _ lock: SpinLockRef, _ holdsMmapLock: inout FaultLockState) throws(Errno) {
        lock.assertHeld("do_swap_page: device-private fault entered without the PTE lock", kernel)
        kernel.vmstat.count(.deviceFaults)
        let page = Page(pfn: pte.pfn, kernel: kernel)
        let folio = page.folio
        guard let pgmap = folio.pageMap, let migrateToRAM = pgmap.operations.migrateToRAM else {
            lock.unlock()
            kernel.warn("do_swap_page: device-private entry without a migrate_to_ram callback", "\(page)")
            throw .ioError
        }
        let result: VMFaultResult
        switch kernel.deviceFaultPolicy {
        case .legacy:
            // v6.1-v6.14: every faulter holds a reference while migrate_to_ram runs.
            folio.get()
            lock.unlock()
            kernel.vmstat.count(.migrateToRAMCalls)
            result = migrateToRAM(VMFault(vma: vma, address: address, page: page, isPMD: false, faultPageLocked: false))
            page.folio.put()
        case .trylock, .trylockWait:
            if folio.tryLock() {
                folio.get()
                lock.unlock()
                kernel.vmstat.count(.migrateToRAMCalls)
                result = migrateToRAM(VMFault(vma: vma, address: address, page: page, isPMD: false, faultPageLocked: true))
                // unlock_page(vmf->page): a split may have moved the lock and
                // reference to the page's new folio.
                let now = page.folio
                now.unlock()
                now.put()
            } else {
                lock.unlock()
                kernel.vmstat.count(.deviceFaultRetries)
                if kernel.deviceFaultPolicy == .trylockWait {
                    holdsMmapLock.dropForWait(self)
                    folio.waitUnlocked(timeoutNanos: AddressSpace.migrationWaitNanos)
                }
                return
            }
        }
        try Self.check(result)
    }

    /// A fault on a PMD-level device-private entry: trylock (or return and
    /// retry), then `migrateToRAM` with no PTE; the driver migrates the folio's order.
    ///
    /// We enter with the mmap lock held for reading and no page-table lock;
    /// we take the PMD lock and return with it dropped, with no folio lock
    /// or reference of ours left.
    func devicePrivatePMDFault(_ vma: VMA, _ address: UInt64, _ holdsMmapLock: inout FaultLockState) throws(Errno) {
        let haddr = address & AddressSpace.pmdMask
        let next: DevicePMDFaultNext = withPMDLock(haddr) {
        let pmd = loadPMD(haddr)
            guard pmd.kind == .devicePrivate else { return .gone }
        kernel.vmstat.count(.deviceFaults)
        let folio = Folio(pfn: pmd.pfn, kernel: kernel)
            guard let migrateToRAM = folio.pageMap?.operations.migrateToRAM else { return .noCallback(folio) }
            guard folio.tryLock() else { return .busy(folio) }
            folio.get()
            return .migrate(folio, migrateToRAM)
        }
        switch next {
        case .gone:
            return
        case .noCallback(let folio):
            kernel.warn("do_huge_pmd_device_private: no migrate_to_ram callback", "\(folio)")
            throw .ioError
        case .busy(let folio):
            kernel.vmstat.count(.deviceFaultRetries)
            if kernel.deviceFaultPolicy == .trylockWait {
                holdsMmapLock.dropForWait(self)
                folio.waitUnlocked(timeoutNanos: AddressSpace.migrationWaitNanos)
            }
        case .migrate(let folio, let migrateToRAM):
        kernel.vmstat.count(.migrateToRAMCalls)
        // The driver gets the head page: it migrates the whole folio.
        let page = folio.page(0)
        let result = migrateToRAM(VMFault(vma: vma, address: address, page: page, isPMD: true, faultPageLocked: true))
        folio.unlock()
        folio.put()
        try Self.check(result)
    }
    }

    /// What the PMD lock saw: no device-private entry any more, one without a
    /// callback, a folio locked by another fault, or a folio this fault
    /// locked and referenced for `migrateToRAM`.
    private enum DevicePMDFaultNext {
        case gone
        case noCallback(Folio)
        case busy(Folio)
        case migrate(Folio, @Sendable (VMFault) -> VMFaultResult)
    }

    private static func check(_ r: VMFaultResult) throws(Errno) {
        switch r {
        case .done: return
        case .sigbus: throw .ioError
        case .oom: throw .noMemory
        }
    }
}
