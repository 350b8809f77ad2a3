import GPUSVM
import SVMEmu

/// GPU accesses, the GPU fault handler, the notifier callback and the
/// garbage collector (xe_svm.c).
extension XeDevice {

    /// Reads `buffer.count` bytes at `address` as the GPU sees them, faulting
    /// on every page the GPU page table does not map.
    /// - Throws: what ``handlePageFault(_:write:)`` throws.
    public func read(_ address: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(Errno) {
        try pageTable.read(address, into: buffer) { (page, write) throws(Errno) in try handlePageFault(page, write: write) }
    }

    /// Writes bytes at `address` as the GPU.
    /// - Throws: what ``handlePageFault(_:write:)`` throws.
    public func write(_ address: UInt64, from buffer: UnsafeRawBufferPointer) throws(Errno) {
        try pageTable.write(address, from: buffer) { (page, write) throws(Errno) in try handlePageFault(page, write: write) }
    }

    /// The GPU fault handler: makes the GPU page table map the range around
    /// `address` (`xe_svm_handle_pagefault()`).
    ///
    /// Under the VM lock: collect garbage first, so the view of the ranges
    /// is current; find or insert the range; if it is bound and not
    /// invalidated, done (another fault won); if the policy wants it in VRAM
    /// and it is not, migrate it (once per fault; a failure only means it
    /// stays where it is); get its pages; then bind under the notifier lock,
    /// if the pages are still valid. Starts over when the pages went away
    /// before the bind, when the range was unmapped meanwhile, or when it
    /// mixes system and VRAM pages (evicted to RAM first).
    ///
    /// Deliberate differences from Xe: the fault asks for write permission
    /// only for a write (Xe asks with the GPU VMA's permission, so a GPU
    /// read of read-only memory fails there); a range faulted read-only is
    /// faulted again for a write; an error other than a lost race ends the
    /// fault (Xe retries EFAULT and EPERM too); the passes are bounded by
    /// ``XeSettings/faultRetryLimit``.
    ///
    /// - Throws: ``Errno/noEntry`` or ``Errno/badAddress`` (no VMA, PROT_NONE),
    ///   ``Errno/notPermitted`` (a write to read-only memory), ``Errno/busy``
    ///   (no stable snapshot, or the retry limit).
    ///
    /// The corresponding kernel function is `xe_svm_handle_pagefault()`.
    public func handlePageFault(_ address: UInt64, write: Bool) throws(Errno) {
        faultCount.add(1, ordering: .relaxed)
        let t = kernel.phases.begin()
        defer { kernel.phases.end(.fault, t) }
        let s = settings
        var ctx = GPUSVMContext()
        ctx.readOnly = !write
        ctx.devmemPossible = s.migrateOnFault
        var migrateTries = 1
        try svmLock.withLock { () throws(Errno) in
            var passes = 0
            while true {
                passes += 1
                if passes > max(1, s.faultRetryLimit) { throw .busy }
                if passes > 1 { retryCount.add(1, ordering: .relaxed) }
                collectGarbage()
                let range = try svm.rangeFindOrInsert(faultAddress: address, gpuvaStart: mm.baseAddress,
                                                      gpuvaEnd: mm.endAddress, context: ctx)
                if rangeIsValid(range, write: write) { return }
                if write && range.flags.contains(.readOnly) {
                    svm.rangeUnmapPages(range, context: GPUSVMContext())
                }
                if migrateTries > 0 && needsMigrateToVRAM(range, s) {
                    migrateTries -= 1
                    try? allocateVRAM(for: range)
                }
                do throws(Errno) {
                    try svm.rangeGetPages(range, context: ctx)
                } catch {
                    if error == .notSupported {
                        // Mixed system and VRAM pages: evict them all and start over.
                        try? svm.rangeEvict(range)
                        continue
                    }
                    if error == .badAddress && range.flags.contains(.unmapped) { continue }
                    if (error == .notPermitted || error == .badAddress) && !rangeFitsOneVMA(range, write: write) {
                        // mprotect split the VMA under the range: the range
                        // goes, and the next pass sizes a new one to the VMA.
                        removeRange(range)
                        continue
                    }
                    throw error
                }
                let bound = svm.withNotifierLock { () -> Bool in
                    guard svm.rangePagesValid(range) else { return false }
                    bind(range)
                    return true
                }
                if bound { return }
            }
        }
    }

    /// Whether the fault should move the range to VRAM first
    /// (`xe_svm_range_needs_migrate_to_vram()`): it may migrate, it is not
    /// in VRAM (advisory), and the policy wants VRAM for its size.
    func needsMigrateToVRAM(_ range: GPUSVMRange, _ s: XeSettings) -> Bool {
        let f = range.flags
        return s.migrateOnFault && f.contains(.migrateDevmem) && !f.contains(.hasDevmemPages)
            && range.size > s.noMigrationAtOrBelow && !s.failDeviceAllocation
    }

    /// The GPU SVM invalidate callback (`xe_svm_invalidate()`), notifier lock
    /// held for writing: zap the GPU entries of every bound range overlapping
    /// the invalidation and invalidate the GPU TLB once for them; then unmap
    /// the pages of every overlapping range, and for an MMU_NOTIFY_UNMAP mark
    /// it unmapped and queue it for the garbage collector.
    func invalidate(_ svm: GPUSVM, _ notifier: GPUSVMNotifier, _ mmuRange: MMUNotifierRange) {
        let start = max(notifier.start, mmuRange.start), end = min(notifier.end, mmuRange.end)
        let ranges = svm.ranges(in: notifier, start, end)
        guard !ranges.isEmpty else { return }
        let zapped = pageTableLock.withLock { () -> Bool in
            var any = false
            for r in ranges where !r.flags.contains(.unmapped) && r.driverData & RangeBinding.present != 0 {
                pageTable.clear(r.start, r.end)
                r.driverData |= RangeBinding.invalidated
                any = true
            }
            return any
        }
        if zapped { tlbInvalidationCount.add(1, ordering: .relaxed) }
        var ctx = GPUSVMContext()
        ctx.inNotifier = true
        for r in ranges {
            svm.rangeUnmapPages(r, context: ctx)
            if mmuRange.event == .unmap {
                svm.rangeSetUnmapped(r, mmuRange)
                garbage.withLock { list in
                    if !list.contains(where: { $0 === r }) { list.append(r) }
                }
            }
        }
    }

    /// The garbage collector (`xe_svm_garbage_collector()`): every range the
    /// CPU unmapped is unbound (its GPU entries were zapped already) and
    /// removed. Of a partially unmapped range, VRAM pages may remain mapped
    /// by the CPU: as in Xe they stay where they are, their allocation alive
    /// until they are freed or a CPU fault takes them back; a new, smaller
    /// range over them finds them (or evicts them, if mixed). Caller holds
    /// the VM lock.
    func collectGarbage() {
        while let r = garbage.withLock({ $0.isEmpty ? nil : $0.removeFirst() }) {
            removeRange(r)
            collectedCount.add(1, ordering: .relaxed)
        }
    }

    /// Unbinds and removes a range (`__xe_svm_garbage_collector()`'s unbind
    /// and `drm_gpusvm_range_remove()`). Caller holds the VM lock.
    func removeRange(_ r: GPUSVMRange) {
        pageTableLock.withLock {
            if r.driverData & RangeBinding.present != 0 && r.driverData & RangeBinding.invalidated == 0 {
                pageTable.clear(r.start, r.end)
            }
            r.driverData = 0
        }
        garbage.withLock { $0.removeAll { $0 === r } }
        svm.rangeRemove(r)
    }

    /// Whether one readable VMA (writable, for a write) still covers the
    /// whole range. Caller holds no mmap lock.
    func rangeFitsOneVMA(_ range: GPUSVMRange, write: Bool) -> Bool {
        mm.withMmapReadLock {
            guard let vma = mm.vma(containing: range.start) else { return false }
            return vma.end >= range.end && vma.flags.contains(.read) && (!write || vma.flags.contains(.write))
        }
    }
}
