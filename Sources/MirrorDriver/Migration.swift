import SVMEmu
#if canImport(Glibc)
import Glibc
#endif

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
        guard address & 4095 == 0, pages > 0 else { throw .invalidArgument }
        let end = address + UInt64(pages) << 12
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
        guard address & 4095 == 0, pages > 0 else { throw .invalidArgument }
        let end = address + UInt64(pages) << 12
        mm.mmapReadLock()
        defer { mm.mmapReadUnlock() }
        return try migrateRangeLocked(address, end, toDevice: false)
    }

    /// The batch loop, mmap lock held. Returns pages migrated.
    @discardableResult
    func migrateRangeLocked(_ start: UInt64, _ end: UInt64, toDevice: Bool) throws(Errno) -> Int {
        let batch = UInt64(max(1, min(512, settings.batchPages))) << 12
        var addr = start
        var migrated = 0
        while addr < end {
            guard let vma = mm.vma(containing: addr), vma.flags.contains(.read) else { throw .invalidArgument }
            let next = min(end, vma.end, (addr / batch + 1) * batch)
            migrated += try withArgs { (args) throws(Errno) -> Int in
                args.prepare(vma: vma, start: addr, end: next,
                             flags: toDevice ? .system : .devicePrivate, pgmapOwner: owner)
                try kernel.migrateVMASetup(&args)
                let n = toDevice ? allocateAndCopyToDevice(&args) : allocateAndCopyToSystem(&args)
                kernel.migrateVMAPages(&args)
                let done = toDevice ? mapMigratedToDevice(args) : countMigrated(args)
                kernel.migrateVMAFinalize(&args)
                _ = n
                return done
            }
            addr = next
        }
        return migrated
    }

    /// dmirror_migrate_alloc_and_copy: a device page for every collected entry
    /// (zeroed for holes and the zero page), bytes copied, `dst` filled.
    /// Two passes, as a DMA-driven driver does: allocate everything, then copy.
    func allocateAndCopyToDevice(_ args: inout MigrateVMA) -> Int {
        let phases = kernel.phases
        var count = 0
        let a = phases.begin()
        for i in 0..<args.npages {
            let s = args.src[i]
            guard s.isMigrating else { continue }
            if let spage = kernel.page(s), spage.isZoneDevice { continue }
            guard let dfolio = allocateDeviceFolio(order: 0) else { break }
            var d = MigratePFN(page: dfolio.page(0))
            if s.isWrite { d = d.with(MigratePFN.writeBit) }
            args.dst[i] = d
            count += 1
        }
        phases.end(.allocate, a)
        let c = phases.begin()
        for i in 0..<args.npages where args.dst[i].isValid {
            let dpage = kernel.pfnToPage(args.dst[i].pfn)
            if let spage = kernel.page(args.src[i]) {
                copyEngine.copy(to: dpage.bytes, from: spage.bytes, bytes: 4096)
            } else {
                dpage.bytes.initializeMemory(as: UInt8.self, repeating: 0, count: 4096)
            }
        }
        copyEngine.wait()
        phases.end(.copy, c)
        return count
    }

    /// dmirror_migrate_finalize_and_map: map what migrated in the device page table.
    func mapMigratedToDevice(_ args: MigrateVMA) -> Int {
        var count = 0
        let t = kernel.phases.begin()
        defer { kernel.phases.end(.pageTableUpdate, t) }
        pageTableLock.withLock { _ in
            for i in 0..<args.npages {
                let s = args.src[i], d = args.dst[i]
                guard s.isMigrating, d.isValid else { continue }
                let addr = args.start + UInt64(i) << 12
                let write = s.isValid ? d.isWrite : (args.vma?.flags.contains(.write) ?? false)
                pageTable.set(addr, pfn: d.pfn, write: write, device: true)
                count += 1
            }
        }
        return count
    }

    /// dmirror_devmem_fault_alloc_and_copy: a system page for every collected
    /// device page, bytes copied back, the device mapping dropped.
    func allocateAndCopyToSystem(_ args: inout MigrateVMA) -> Int {
        let phases = kernel.phases
        var count = 0
        let a = phases.begin()
        for i in 0..<args.npages {
            let s = args.src[i]
            guard s.isMigrating, s.isValid else { continue }
            guard let dfolio = kernel.allocateFolio(order: 0) else { break }
            dfolio.lock()
            var d = MigratePFN(page: dfolio.page(0))
            if s.isWrite { d = d.with(MigratePFN.writeBit) }
            args.dst[i] = d
            count += 1
        }
        phases.end(.allocate, a)
        let c = phases.begin()
        for i in 0..<args.npages where args.dst[i].isValid {
            if let spage = kernel.page(args.src[i]) {
                copyEngine.copy(to: kernel.pfnToPage(args.dst[i].pfn).bytes, from: spage.bytes, bytes: 4096)
            }
        }
        copyEngine.wait()
        phases.end(.copy, c)
        let t = phases.begin()
        pageTableLock.withLock { _ in
            for i in 0..<args.npages where args.dst[i].isValid {
                pageTable.clear(args.start + UInt64(i) << 12)
            }
        }
        phases.end(.pageTableUpdate, t)
        return count
    }

    func countMigrated(_ args: MigrateVMA) -> Int {
        var n = 0
        for i in 0..<args.npages where args.src[i].isMigrating && args.dst[i].isValid { n += 1 }
        return n
    }

    /// Pages of `[start, end)` mapped to this device's memory; `.noEntry` if any is not.
    func countDevicePages(_ start: UInt64, _ end: UInt64) throws(Errno) -> Int {
        let count = pageTableLock.withLock { _ -> Int in
            var n = 0
            var a = start
            while a < end {
                if pageTable.get(a) & DevicePageTable.device != 0 { n += 1 }
                a += 4096
            }
            return n
        }
        if count != Int((end - start) >> 12) { throw .noEntry }
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
            return driverLock.withLock { _ in migrateToRAMLocked(vmf, s) }
        }
        return migrateToRAMLocked(vmf, s)
    }

    private func migrateToRAMLocked(_ vmf: VMFault, _ s: MirrorSettings) -> VMFaultResult {
        let order = vmf.isPMD ? vmf.page.folio.order : 0
        let size = UInt64(4096) << UInt64(order)
        let start = vmf.address & ~(size - 1)
        return withArgs { args -> VMFaultResult in
            args.prepare(vma: vmf.vma, start: start, end: start + size,
                         flags: .devicePrivate, pgmapOwner: owner, faultPage: vmf.page)
            do { try kernel.migrateVMASetup(&args) } catch { return .sigbus }
            if s.migrateToRAMWorkNanos > 0 { MirrorDevice.sleep(nanos: s.migrateToRAMWorkNanos) }
            var wanted = 0
            for i in 0..<args.npages where args.src[i].isMigrating && args.src[i].isValid { wanted += 1 }
            let copied = allocateAndCopyToSystem(&args)
            if copied < wanted {
                kernel.migrateVMAFinalize(&args)
                return .oom
            }
            kernel.migrateVMAPages(&args)
            kernel.migrateVMAFinalize(&args)
            return .done
        }
    }

    /// Evicts every device page back to system memory (dmirror's RELEASE /
    /// dmirror_device_evict_chunk): migrate_device_range over each chunk.
    /// - Returns: pages evicted.
    @discardableResult
    public func evictAll() -> Int {
        var evicted = 0
        for chunk in registeredPageMaps {
            var start: UInt64 = 0
            while start < chunk.pageCount {
                let n = Int(min(512, chunk.pageCount - start))
                var src = [MigratePFN](repeating: .empty, count: n)
                var dst = [MigratePFN](repeating: .empty, count: n)
                do { try kernel.migrateDeviceRange(&src, startPfn: chunk.startPfn + start, count: n) } catch { break }
                for i in 0..<n {
                    guard src[i].isMigrating, let spage = kernel.page(src[i]) else { continue }
                    guard let dfolio = kernel.allocateFolio(order: 0) else { continue }
                    dfolio.lock()
                    dfolio.bytes.copyMemory(from: spage.bytes, byteCount: 4096)
                    dst[i] = MigratePFN(page: dfolio.page(0))
                }
                kernel.migrateDevicePages(&src, &dst, count: n)
                for i in 0..<n where src[i].isMigrating && dst[i].isValid { evicted += 1 }
                kernel.migrateDeviceFinalize(src, &dst, count: n)
                start += UInt64(n)
            }
        }
        return evicted
    }

    static func sleep(nanos: UInt64) {
        var ts = timespec(tv_sec: Int(nanos / 1_000_000_000), tv_nsec: Int(nanos % 1_000_000_000))
        var rest = timespec()
        while nanosleep(&ts, &rest) != 0 && errno == EINTR { ts = rest }
    }
}
