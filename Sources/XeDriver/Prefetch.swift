import GPUSVM
import SVMEmu

/// Migrations a user asks for, not a GPU fault: Xe's VM_BIND prefetch to
/// VRAM, and its prefetch to system memory.
extension XeDevice {

    /// Prefetches `[address, address + pages * 4096)` to VRAM and binds it
    /// (`xe_vm_bind` with DRM_XE_VM_BIND_OP_PREFETCH to VRAM,
    /// `prefetch_ranges()`): for every range over the span (created as a GPU
    /// fault would), migrate it to VRAM, get its pages, bind them.
    ///
    /// - Returns: how many pages of the span the GPU maps in VRAM afterwards.
    /// - Throws: ``Errno/invalidArgument`` for an unaligned or empty span;
    ///   ``Errno/noEntry`` when some page of the span is not in VRAM
    ///   afterwards (VRAM full, raced, or no VMA); a range's own error.
    @discardableResult
    public func migrateToDevice(_ address: UInt64, pages: Int) throws(Errno) -> Int {
        guard address & ~PageGeometry.pageMask == 0, pages > 0 else { throw .invalidArgument }
        let end = address + UInt64(pages) << PageGeometry.pageShift
        var ctx = GPUSVMContext()
        ctx.readOnly = false
        try svmLock.withLock { () throws(Errno) in
            collectGarbage()
            var a = address
            while a < end {
                let range: GPUSVMRange
                do throws(Errno) {
                    range = try svm.rangeFindOrInsert(faultAddress: a, gpuvaStart: mm.baseAddress, gpuvaEnd: mm.endAddress, context: ctx)
                } catch {
                    // A read-only page: prefetch it without write permission.
                    guard error == .notPermitted else { throw error }
                    var ro = ctx
                    ro.readOnly = true
                    range = try svm.rangeFindOrInsert(faultAddress: a, gpuvaStart: mm.baseAddress, gpuvaEnd: mm.endAddress, context: ro)
                }
                var c = ctx
                if let vma = mm.withMmapReadLock({ mm.vma(containing: a) }), !vma.flags.contains(.write) { c.readOnly = true }
                if !range.flags.contains(.hasDevmemPages) && range.flags.contains(.migrateDevmem) {
                    try? allocateVRAM(for: range)
                }
                for _ in 0..<4 {
                    do throws(Errno) {
                        try svm.rangeGetPages(range, context: c)
                    } catch {
                        if error == .notSupported { try? svm.rangeEvict(range); continue }
                        if error == .badAddress && range.flags.contains(.unmapped) { break }
                        throw error
                    }
                    let bound = svm.withNotifierLock { () -> Bool in
                        guard svm.rangePagesValid(range) else { return false }
                        bind(range)
                        return true
                    }
                    if bound { break }
                }
                a = range.end
            }
        }
        let n = devicePagesMapped(address, end)
        if n < pages { throw .noEntry }
        return n
    }

    /// Migrates this device's VRAM pages of `[address, address + pages * 4096)`
    /// back to system memory (Xe's prefetch to system memory, which is
    /// `drm_gpusvm_range_evict()`: `hmm_range_fault()` with a fault request
    /// and no device-private owner, so each VRAM page takes the CPU fault
    /// path). Takes no driver lock.
    ///
    /// - Returns: pages that were in this device's VRAM before and are not now.
    /// - Throws: ``Errno/invalidArgument`` for an unaligned or empty span;
    ///   what `hmm_range_fault()` throws (``Errno/badAddress`` for a page
    ///   without a readable VMA).
    @discardableResult
    public func migrateToSystem(_ address: UInt64, pages: Int) throws(Errno) -> Int {
        guard address & ~PageGeometry.pageMask == 0, pages > 0 else { throw .invalidArgument }
        let end = address + UInt64(pages) << PageGeometry.pageShift
        let before = try vramPages(address, end)
        guard before > 0 else { return 0 }
        let deadline = HostClock.nanos() + GPUSVM.rangeTimeoutNanos
        var hmm = HMMRange(start: address, end: end, defaultFlags: .requestFault, devicePrivateOwner: nil)
        try faultRetryingBusy(&hmm, until: deadline)
        let after = try vramPages(address, end)
        return max(0, before - after)
    }

    /// Pages of the span the CPU page tables show in this device's VRAM (a
    /// snapshot without faults).
    func vramPages(_ start: UInt64, _ end: UInt64) throws(Errno) -> Int {
        var hmm = HMMRange(start: start, end: end, devicePrivateOwner: owner)
        try faultRetryingBusy(&hmm)
        return hmm.hmmPfns.reduce(0) { n, p in
            n + (p.isValid && pagemap.pageMap.contains(pfn: p.pfn) ? 1 : 0)
        }
    }

    /// `hmm_range_fault()` under the mmap lock, again while it returns
    /// EBUSY (an invalidation raced it), up to `deadline` (host nanoseconds).
    private func faultRetryingBusy(_ hmm: inout HMMRange, until deadline: UInt64 = .max) throws(Errno) {
        while true {
            mm.mmapReadLock()
            var err: Errno? = nil
            do { try mm.hmmRangeFault(&hmm) } catch { err = error }
            mm.mmapReadUnlock()
            guard let err else { return }
            if err != .busy || HostClock.nanos() > deadline { throw err }
        }
    }

    /// Pages of `[start, end)` the GPU page table maps to VRAM.
    func devicePagesMapped(_ start: UInt64, _ end: UInt64) -> Int {
        pageTableLock.withLock {
            var n = 0
            var a = start
            while a < end {
                if a >= pageTable.base && a < pageTable.end && pageTable.get(a) & DevicePageTable.device != 0 { n += 1 }
                a += PageGeometry.pageSize64
            }
            return n
        }
    }
}
