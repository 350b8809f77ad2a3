import SVMEmu

/// Migration commands and the CPU-fault callback, following the kernel's
/// migrate_vma recipe: setup, allocate and copy, pages, update the device page
/// table, finalize.
extension MirrorDevice {

    /// Migrates `[address, address + pages * 4096)` to device memory
    /// (dmirror_migrate_to_device). Every page of the range must lie in a
    /// readable VMA.
    ///
    /// - Returns: how many pages the range now has in device memory.
    /// - Throws: `.invalidArgument` for a range outside any readable VMA or not
    ///   page aligned; `.noEntry` when some page of the range did not end up in
    ///   this device's memory (dmirror reads the range back from the device).
    @discardableResult
    public func migrateToDevice(_ address: UInt64, pages: Int) throws(Errno) -> Int {
        guard address & ~PageGeometry.pageMask == 0, pages > 0 else { throw .invalidArgument }
        let end = address + UInt64(pages) << PageGeometry.pageShift
        mm.mmapReadLock()
        defer { mm.mmapReadUnlock() }
        try migrateRangeLocked(address, end, toDevice: true)
        return try countDevicePages(address, end)
    }

    /// Migrates device pages of this device in the range back to system memory
    /// (dmirror_migrate_to_system).
    /// - Returns: the number of pages migrated.
    /// - Throws: `.invalidArgument` for a range outside any readable VMA.
    @discardableResult
    public func migrateToSystem(_ address: UInt64, pages: Int) throws(Errno) -> Int {
        guard address & ~PageGeometry.pageMask == 0, pages > 0 else { throw .invalidArgument }
        let end = address + UInt64(pages) << PageGeometry.pageShift
        mm.mmapReadLock()
        defer { mm.mmapReadUnlock() }
        return try migrateRangeLocked(address, end, toDevice: false)
    }

    /// Migrates `[start, end)` (page aligned, inside readable VMAs) to this
    /// device or back, for a caller that already holds the mmap lock for
    /// reading (an ioctl front end walking VMAs, like nouveau's bind).
    /// - Returns: pages migrated.
    /// - Throws: `.invalidArgument` for a page outside any readable VMA.
    public func migrateHoldingMmapLock(_ start: UInt64, _ end: UInt64, toDevice: Bool) throws(Errno) -> Int {
        guard start & ~PageGeometry.pageMask == 0, end & ~PageGeometry.pageMask == 0, end > start else { throw .invalidArgument }
        return try migrateRangeLocked(start, end, toDevice: toDevice)
    }

    /// The batch loop, mmap lock held. Returns pages migrated. With 2 MiB
    /// granularity, batches are aligned 2 MiB and collected with
    /// SELECT_COMPOUND, so whole THPs and empty 2 MiB regions move as one folio.
    @discardableResult
    func migrateRangeLocked(_ start: UInt64, _ end: UInt64, toDevice: Bool,
                            granularity: MigrationGranularity? = nil) throws(Errno) -> Int {
        let s = settings
        // The dmirror commands (Commands.swift) always migrate like dmirror:
        // SELECT_COMPOUND over 2 MiB batches, whatever the device's setting.
        let huge = (granularity ?? s.migrationGranularity) == .huge2M
        let batch = huge ? PageGeometry.pmdSize64 : UInt64(max(1, min(PageGeometry.pmdPages, s.batchPages))) << PageGeometry.pageShift
        var addr = start
        var migrated = 0
        while addr < end {
            guard let vma = mm.vma(containing: addr), vma.flags.contains(.read) else { throw .invalidArgument }
            let next = min(end, vma.end, (addr / batch + 1) * batch)
            var flags: MigrateSelect = toDevice ? .system : (memoryType == .coherent ? .deviceCoherent : .devicePrivate)
            if huge { flags.insert(.compound) }
            // The sequence comes before collect: an invalidation that runs
            // from here on (a MADV_DONTNEED zapping what was just migrated)
            // makes the mapping below refuse (mmu_interval_read_begin).
            let seq = toDevice ? notifier.readBegin() : 0
            let done = try withArgs { (args) throws(Errno) -> Int? in
                args.prepare(vma: vma, start: addr, end: next, flags: flags, pgmapOwner: owner)
                try kernel.migrateVMASetup(&args)
                _ = toDevice ? allocateAndCopyToDevice(&args) : allocateAndCopyToSystem(&args, settings: s)
                kernel.migrateVMAPages(&args)
                let done = toDevice ? mapMigratedToDevice(args, seq: seq) : countMigrated(args)
                kernel.migrateVMAFinalize(&args)
                return done
            }
            // An invalidation ran: what migrated may be gone. Map what the
            // CPU's page table says now, under a new sequence.
            if let done { migrated += done } else { migrated += try mapDevicePagesFromSnapshot(addr, next) }
            addr = next
        }
        return migrated
    }

    /// dmirror_migrate_alloc_and_copy: a device page for every collected entry
    /// (zeroed for holes and the zero page), bytes copied, `dst` filled. A
    /// compound entry gets a 2 MiB device folio, or 512 small pages when that
    /// allocation fails (or is forced to fail). Two passes, as a DMA-driven
    /// driver does: allocate everything, then copy.
    /// - Returns: source entries given a destination.
    func allocateAndCopyToDevice(_ args: inout MigrateVMA) -> Int {
        let phases = kernel.phases
        let s0 = settings
        let failLarge = s0.failLargeDeviceAllocation
        let failAll = s0.failDeviceAllocation
        let a = phases.begin()
        let count = fillDestinations(&args, largeAllowed: !failLarge,
                                 needs: { e in e.isMigrating && !(kernel.page(e)?.isZoneDevice ?? false) },
                                 allocate: { order in failAll ? nil : takeDeviceFolio(order: order) })
        let c = phases.endAndBegin(.allocate, a)
        copyMigrated(args)
        phases.end(.copy, c)
        return count
    }

    /// Fills `dst` for every source entry `needs` selects, in order, until an
    /// allocation fails: a 2 MiB folio for a compound entry when `largeAllowed`
    /// (and no one-shot failure is pending), else 512 small pages. `allocate`
    /// returns a locked folio of the order asked, or nil.
    /// - Returns: source entries given a destination.
    func fillDestinations(_ args: inout MigrateVMA, largeAllowed: Bool, needs: (MigratePFN) -> Bool,
                          allocate: (Int) -> Folio?) -> Int {
        var count = 0
        var i = 0
        allocation: while i < args.npages {
            let e = args.src[i]
            defer { i += e.isCompound ? PageGeometry.pmdPages : 1 }
            guard needs(e) else { continue }
            let write = e.isWrite ? MigratePFN.writeBit : 0
            if e.isCompound {
                if largeAllowed, !consumeFailNextAllocation(), let big = allocate(PageGeometry.pmdOrder) {
                    args.dst[i] = MigratePFN(page: big.page(0)).with(MigratePFN.compoundBit | write)
                } else {
                    for j in 0..<PageGeometry.pmdPages {
                        guard let small = allocate(0) else { break allocation }
                        args.dst[i + j] = MigratePFN(page: small.page(0)).with(write)
                    }
                }
                count += 1
                continue
            }
            guard let folio = allocate(0) else { break }
            args.dst[i] = MigratePFN(page: folio.page(0)).with(write)
            count += 1
        }
        return count
    }

    /// Copies every source entry that has a destination, whatever the sizes:
    /// 2 MiB to 2 MiB, 4 KiB to 4 KiB, or a 2 MiB source into 512 small
    /// destinations. Holes and the zero page give zeroes.
    func copyMigrated(_ args: MigrateVMA) {
        // One reference to the engine and the kernel for the whole batch, not
        // a retain and release of each per page.
        let engine = copyEngine
        let kernel = self.kernel
        func copyOrZero(_ destination: UnsafeMutableRawPointer, _ source: UnsafeMutableRawPointer?, _ bytes: Int) {
            if let source {
                engine.copy(to: destination, from: source, bytes: bytes)
            } else {
                destination.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
            }
        }
        // A 4 KiB copy is issued when the next one's source is known (or
        // the batch ends), so that the engine can read ahead into it.
        var heldDestination: UnsafeMutableRawPointer? = nil, heldSource: UnsafeMutableRawPointer? = nil
        func issueHeld(then next: UnsafeMutableRawPointer?) {
            if let d = heldDestination, let s = heldSource {
                engine.copy(to: d, from: s, bytes: PageGeometry.pageSize, then: next, nextBytes: PageGeometry.pageSize)
            }
        }
        var i = 0
        while i < args.npages {
            let s = args.src[i]
            let source = kernel.page(s)?.unsafeBytes
            if s.isCompound {
                issueHeld(then: nil)
                heldDestination = nil
                if args.dst[i].isValid && args.dst[i].isCompound {
                    copyOrZero(kernel.pfnToPage(args.dst[i].pfn).unsafeBytes, source, PageGeometry.pmdSize)
                } else {
                    for j in 0..<PageGeometry.pmdPages where args.dst[i + j].isValid {
                        copyOrZero(kernel.pfnToPage(args.dst[i + j].pfn).unsafeBytes, source.map { $0 + j * PageGeometry.pageSize }, PageGeometry.pageSize)
                    }
                }
                i += PageGeometry.pmdPages
                continue
            }
            if args.dst[i].isValid {
                let destination = kernel.pfnToPage(args.dst[i].pfn).unsafeBytes
                if let source {
                    issueHeld(then: source)
                    heldDestination = destination
                    heldSource = source
                } else {
                    copyOrZero(destination, nil, PageGeometry.pageSize)
                }
            }
            i += 1
        }
        issueHeld(then: nil)
        engine.wait()
    }


    /// dmirror_migrate_finalize: map what migrated in the device page table,
    /// between `migrateVMAPages` and `migrateVMAFinalize`, unless an
    /// invalidation ran since `seq` (taken with `readBegin()` before setup).
    ///
    /// The check and the mapping are one step under the page-table lock,
    /// which the invalidation callback takes to set its sequence: either the
    /// invalidation comes first and nothing is mapped, or the mapping comes
    /// first and the invalidation clears it. Without the check (dmirror does
    /// none) a MADV_DONTNEED that zapped a migration entry after collect
    /// cleared the device page table too early: finalize then frees the
    /// destination, and the device keeps mapping a freed page.
    /// - Returns: pages mapped, or nil when an invalidation ran (nothing mapped).
    func mapMigratedToDevice(_ args: MigrateVMA, seq: UInt64) -> Int? {
        var count = 0
        let t = kernel.phases.begin()
        defer { kernel.phases.end(.pageTableUpdate, t) }
        let vmaWritable = args.vma?.flags.contains(.write) ?? false
        return pageTableLock.withLock { () -> Int? in
            if notifier.readRetry(seq) { return nil }
            for i in 0..<args.npages {
                let s = args.src[i], d = args.dst[i]
                guard s.isMigrating, d.isValid else { continue }
                let addr = args.start + UInt64(i) << PageGeometry.pageShift
                let write = s.isValid ? d.isWrite : vmaWritable
                let pages = d.isCompound ? PageGeometry.pmdPages : 1
                for j in 0..<pages {
                    pageTable.set(addr + UInt64(j) << PageGeometry.pageShift, pfn: d.pfn + UInt64(j), write: write, device: true)
                }
                count += pages
            }
            return count
        }
    }

    /// The retry of a mapping that `mapMigratedToDevice` refused, after
    /// finalize: snapshot `[start, end)` with hmm_range_fault (no fault
    /// requested; this device's pages are reported, not faulted) under a
    /// new sequence and map the device pages of this device it finds, the
    /// way drm_gpusvm maps after every migration. Caller holds the mmap lock
    /// for reading.
    /// - Returns: pages mapped.
    func mapDevicePagesFromSnapshot(_ start: UInt64, _ end: UInt64) throws(Errno) -> Int {
        var count = 0
        let t = kernel.phases.begin()
        defer { kernel.phases.end(.pageTableUpdate, t) }
        try withStableRange(notifier, start, end, flags: HMMPFN(rawValue: 0), mmapLocked: true) { range in
            count = 0
            var a = start
            for p in range.hmmPfns {
                if p.isValid, let folio = kernel.page(pfn: p.pfn)?.folio, folio.pageMap?.owner == owner {
                    pageTable.set(a, pfn: p.pfn, write: p.isWrite, device: true)
                    count += 1
                }
                a += PageGeometry.pageSize64
            }
        }
        return count
    }

    /// dmirror_devmem_fault_alloc_and_copy: a system page for every collected
    /// device page (a 2 MiB folio for a compound entry, 512 small ones when
    /// that fails or is forced to), bytes copied back, the device mapping dropped.
    /// - Returns: source entries given a destination; fewer than collected means OOM.
    func allocateAndCopyToSystem(_ args: inout MigrateVMA, settings s: MirrorSettings) -> Int {
        let phases = kernel.phases
        let a = phases.begin()
        let count = fillDestinations(&args, largeAllowed: !s.failLargeSystemAllocation,
                                 needs: { e in e.isMigrating && e.isValid },
                                 allocate: { order in
                                     // alloc_page_vma(GFP_HIGHUSER_MOVABLE, ...): a blocking
                                     // allocation, a might_sleep() point (with the driver lock held).
                                     guard let folio = kernel.allocateFolio(order: order, blocking: true) else { return nil }
                                     // lock_page(dpage): folio_lock()'s might_sleep() first. Nobody
                                     // else can see a fresh folio: the trylock cannot fail, and
                                     // (as lockdep leaves page locks out) it records no lock order
                                     // against the driver lock held here.
                                     kernel.mightSleep()
                                     if !folio.tryLock() { kernel.warn("mirror: a fresh folio was locked", "\(folio)") }
                                     return folio
                                 })
        // The device's entries go before the copy (as dmirror erases them
        // first): a GPU store lands in the device page before it is copied,
        // or finds no entry and faults. Cleared after the copy, a store in
        // between would be lost.
        let t = phases.endAndBegin(.allocate, a)
        pageTableLock.withLock {
            _ = pageTable.clear(args.start, args.start + UInt64(args.npages) << PageGeometry.pageShift)
        }
        let c = phases.endAndBegin(.pageTableUpdate, t)
        copyMigrated(args)
        phases.end(.copy, c)
        return count
    }

    func countMigrated(_ args: MigrateVMA) -> Int {
        var n = 0
        for i in 0..<args.npages where args.src[i].isMigrating && args.dst[i].isValid {
            n += args.dst[i].isCompound ? PageGeometry.pmdPages : 1
        }
        return n
    }

    /// Pages of `[start, end)` mapped to this device's memory; `.noEntry` if any is not.
    func countDevicePages(_ start: UInt64, _ end: UInt64) throws(Errno) -> Int {
        let count = pageTableLock.withLock { () -> Int in
            var n = 0
            var a = start
            while a < end {
                if pageTable.get(a) & DevicePageTable.device != 0 { n += 1 }
                a += PageGeometry.pageSize64
            }
            return n
        }
        if count != Int((end - start) >> PageGeometry.pageShift) { throw .noEntry }
        return count
    }

    /// The `migrateToRAM` callback (dmirror_devmem_fault): migrate the faulting
    /// page (or its whole folio, from a PMD fault) back to system memory.
    /// Called with the mmap lock held and a reference on `vmf.page`.
    func migrateToRAM(_ vmf: VMFault) -> VMFaultResult {
        migrateToRAMCount.add(1, ordering: .relaxed)
        let t = kernel.phases.begin()
        defer { kernel.phases.end(.fault, t) }
        let s = settings
        if s.driverLock == .exclusive {
            driverLockWaiting.add(1, ordering: .relaxed)
            return driverLock.withLock {
                driverLockWaiting.subtract(1, ordering: .relaxed)
                driverLockHolding.add(1, ordering: .relaxed)
                defer { driverLockHolding.subtract(1, ordering: .relaxed) }
                return migrateToRAMLocked(vmf, s)
            }
        }
        return migrateToRAMLocked(vmf, s)
    }

    private func migrateToRAMLocked(_ vmf: VMFault, _ s: MirrorSettings) -> VMFaultResult {
        let order = vmf.isPMD ? vmf.page.folio.order : 0
        let size = PageGeometry.pageSize64 << UInt64(order)
        let start = vmf.address & ~(size - 1)
        return withArgs { args -> VMFaultResult in
            args.prepare(vma: vmf.vma, start: start, end: start + size,
                         flags: order > 0 ? [.devicePrivate, .compound] : .devicePrivate,
                         pgmapOwner: owner, fault: vmf)
            if s.migrateToRAMLookupNanos > 0 { HostClock.sleep(nanos: s.migrateToRAMLookupNanos) }
            do { try kernel.migrateVMASetup(&args) } catch { return .sigbus }
            var wanted = 0
            for i in 0..<args.npages where args.src[i].isMigrating && args.src[i].isValid { wanted += 1 }
            let given = allocateAndCopyToSystem(&args, settings: s)
            if given < wanted {
                kernel.migrateVMAFinalize(&args)
                return .oom
            }
            // The DMA wait: by default only a call that copied something has
            // one, and it comes after its reference check passed (the page is
            // under a migration entry, so other faulters wait without
            // references); with the every-call shape every call waits here.
            if s.migrateToRAMWorkNanos > 0 && (given > 0 || s.migrateToRAMWorkShape == .everyCall) {
                switch s.migrateToRAMWait {
                case .sleep: HostClock.sleep(nanos: s.migrateToRAMWorkNanos)
                case .spin: HostClock.spin(nanos: s.migrateToRAMWorkNanos)
                case .fsleep: HostClock.fsleep(micros: (s.migrateToRAMWorkNanos + 999) / 1_000)
                }
            }
            kernel.migrateVMAPages(&args)
            kernel.migrateVMAFinalize(&args)
            return .done
        }
    }

    /// Evicts every device page back to system memory (dmirror's RELEASE /
    /// dmirror_device_evict_chunk): migrate_device_range over each chunk. A
    /// 2 MiB device folio comes back as a 2 MiB system folio: eviction never
    /// splits, so if no 2 MiB system folio is free it stays in VRAM.
    /// - Returns: pages evicted.
    @discardableResult
    public func evictAll() -> Int {
        var evicted = 0
        var src = [MigratePFN](repeating: .empty, count: PageGeometry.pmdPages)
        var dst = [MigratePFN](repeating: .empty, count: PageGeometry.pmdPages)
        for chunk in registeredPageMaps {
            var start: UInt64 = 0
            while start < chunk.pageCount {
                let n = Int(min(PageGeometry.pmdPages64, chunk.pageCount - start))
                for i in 0..<n { dst[i] = .empty }
                do { try kernel.migrateDeviceRange(&src, startPfn: chunk.startPfn + start, count: n) } catch { break }
                for i in 0..<n {
                    guard src[i].isMigrating, let spage = kernel.page(src[i]) else { continue }
                    let order = src[i].isCompound ? PageGeometry.pmdOrder : 0
                    guard let dfolio = kernel.allocateFolio(order: order) else { continue }
                    dfolio.lock()
                    copyEngine.copy(to: dfolio.unsafeBytes, from: spage.unsafeBytes, bytes: PageGeometry.pageSize << order)
                    dst[i] = MigratePFN(page: dfolio.page(0)).with(order > 0 ? MigratePFN.compoundBit : 0)
                }
                copyEngine.wait()
                kernel.migrateDevicePages(&src, &dst, count: n)
                for i in 0..<n where src[i].isMigrating && dst[i].isValid { evicted += dst[i].isCompound ? PageGeometry.pmdPages : 1 }
                kernel.migrateDeviceFinalize(src, &dst, count: n)
                start += UInt64(n)
            }
        }
        pageTableLock.withLock { _ = pageTable.clear(pageTable.base, pageTable.end) }
        return evicted
    }
}
