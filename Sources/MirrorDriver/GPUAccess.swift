import SVMEmu

/// GPU reads and writes through the device page table, faulting on a miss
/// (dmirror's READ and WRITE commands). Any thread may act as a GPU engine.
extension MirrorDevice {

    /// Reads `buffer.count` bytes at `address` as the GPU sees them,
    /// faulting (``gpuFaultCount``) where the device page table does not map
    /// a page with the permission the access needs.
    /// - Throws: `.badAddress` (EFAULT) for an address outside any readable VMA
    ///   (PROT_NONE included), other fault errors as hmm_range_fault returns them.
    public func read(_ address: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(Errno) {
        try pageTable.read(address, into: buffer) { (page, write) throws(Errno) in try countedGPUFault(page, write: write) }
    }

    /// Writes bytes at `address` as the GPU.
    /// - Throws: `.notPermitted` (EPERM) writing read-only memory, `.badAddress` (EFAULT).
    public func write(_ address: UInt64, from buffer: UnsafeRawBufferPointer) throws(Errno) {
        try pageTable.write(address, from: buffer) { (page, write) throws(Errno) in try countedGPUFault(page, write: write) }
    }

    /// The device page table's entry for the page holding `address`, or nil
    /// where a GPU access would fault. Takes the page-table lock; what it
    /// returns may change as soon as the lock is dropped, so a check that
    /// compares it with the CPU's page table runs at a quiescent point.
    public func deviceMapping(at address: UInt64) -> DeviceMapping? { pageTable.mapping(at: address) }

    private func countedGPUFault(_ page: UInt64, write: Bool) throws(Errno) {
        gpuFaultCount.add(1, ordering: .relaxed)
        try gpuFault(page, write: write)
    }

    /// The GPU fault handler.
    func gpuFault(_ page: UInt64, write: Bool) throws(Errno) {
        let t = kernel.phases.begin()
        defer { kernel.phases.end(.fault, t) }
        if settings.gpuFaultPolicy == .migrate {
            mm.mmapReadLock()
            if let vma = mm.vma(containing: page), vma.flags.contains(.read), !write || vma.flags.contains(.write) {
                let s = settings
                var start = page, end = page + PageGeometry.pageSize64
                if s.migrationGranularity == .huge2M {
                    let h = page & PageGeometry.pmdMask
                    if h >= vma.start && h + PageGeometry.pmdSize64 <= vma.end { start = h; end = h + PageGeometry.pmdSize64 }
                } else if s.gpuFaultPages > 1 {
                    // The window around the fault, clipped to the VMA (drm_gpusvm
                    // picks the largest aligned chunk that fits).
                    let n = min(PageGeometry.pmdPages, s.gpuFaultPages)
                    let window = UInt64(1 << (Int.bitWidth - 1 - n.leadingZeroBitCount)) << PageGeometry.pageShift  // a power of two
                    let w = page & ~(window - 1)
                    start = max(w, vma.start)
                    end = min(w + window, vma.end)
                }
                _ = try? migrateRangeLocked(start, end, toDevice: true)
            }
            mm.mmapReadUnlock()
            let mapped = pageTableLock.withLock { pageTable.get(page) & DevicePageTable.valid != 0 }
            if mapped { return }
        }
        try mirrorFault(page, page + PageGeometry.pageSize64, write: write)
    }

    /// dmirror_fault: hmm_range_fault, then map under the page-table lock
    /// unless an invalidation ran in between (then start over).
    func mirrorFault(_ start: UInt64, _ end: UInt64, write: Bool) throws(Errno) {
        let flags = write ? HMMPFN(rawValue: HMMPFN.requestFault.rawValue | HMMPFN.requestWrite.rawValue) : .requestFault
        try withStableRange(notifier, start, end, flags: flags) { range in
            var a = start
            for p in range.hmmPfns {
                if p.isValid {
                    let dev = kernel.pfnToPage(p.pfn).isZoneDevice
                    pageTable.set(a, pfn: p.pfn, write: p.isWrite, device: dev)
                }
                a += PageGeometry.pageSize64
            }
        }
    }

    /// The pattern every hmm_range_fault user follows: `readBegin`, snapshot
    /// (or fault) under the mmap lock, retrying on EBUSY, then `commit` under
    /// the page-table lock unless an invalidation ran meanwhile, in which case
    /// everything starts over. With `deadlineNanos`, gives up with `.busy`
    /// once that monotonic time has passed (dmirror's one-second bound).
    /// With `mmapLocked` the caller holds the mmap lock for reading and keeps
    /// it throughout; otherwise each attempt takes it.
    func withStableRange(_ notifier: MMUIntervalNotifier, _ start: UInt64, _ end: UInt64, flags: HMMPFN,
                         deadlineNanos: UInt64? = nil, mmapLocked: Bool = false, commit: (HMMRange) -> Void) throws(Errno) {
        while true {
            if let deadlineNanos, HostClock.nanos() > deadlineNanos { throw .busy }
            var range = HMMRange(notifier: notifier, start: start, end: end, defaultFlags: flags, devicePrivateOwner: owner)
            range.notifierSeq = notifier.readBegin()
            if !mmapLocked { mm.mmapReadLock() }
            do {
                try mm.hmmRangeFault(&range)
            } catch .busy {
                if !mmapLocked { mm.mmapReadUnlock() }
                continue
            } catch {
                if !mmapLocked { mm.mmapReadUnlock() }
                throw error
            }
            if !mmapLocked { mm.mmapReadUnlock() }
            let committed = pageTableLock.withLock { () -> Bool in
                if notifier.readRetry(range.notifierSeq) { return false }
                commit(range)
                return true
            }
            if committed { return }
        }
    }
}

extension MirrorDevice: VirtualMemoryAccessor {}
