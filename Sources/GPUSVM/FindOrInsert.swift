import SVMEmu

extension GPUSVM {

    /// The range holding `faultAddress`, created (with its notifier, if the
    /// interval has none yet) when there is none.
    ///
    /// A new range gets the largest chunk size whose aligned block around the
    /// fault lies inside the VMA, the notifier and `[gpuvaStart, gpuvaEnd)`
    /// and overlaps no existing range (and, below
    /// ``GPUSVMContext/checkPagesThreshold``, whose pages the CPU has all
    /// faulted in); 4 KiB always fits. It may migrate to device memory when
    /// the context allows it and the VMA is anonymous and not hugetlb.
    ///
    /// Caller holds the driver SVM lock and no mmap lock (this takes it for
    /// reading).
    ///
    /// - Parameters:
    ///   - faultAddress: the GPU fault's address.
    ///   - gpuvaStart: first address of the GPU VA window mirroring the CPU.
    ///   - gpuvaEnd: one past its last address.
    ///   - context: `readOnly`, `devmemPossible`, `checkPagesThreshold`.
    /// - Returns: the range.
    /// - Throws: ``Errno/invalidArgument`` for an address outside the
    ///   mirrored window or no chunk that fits; ``Errno/noEntry`` when no VMA
    ///   holds the address; ``Errno/notPermitted`` when the context wants
    ///   write access and the VMA is read-only. A notifier inserted for the
    ///   call is removed again on error.
    ///
    /// The corresponding kernel function is `drm_gpusvm_range_find_or_insert()`.
    public func rangeFindOrInsert(faultAddress: UInt64, gpuvaStart: UInt64, gpuvaEnd: UInt64,
                                  context: GPUSVMContext) throws(Errno) -> GPUSVMRange {
        guard faultAddress >= mmStart, faultAddress <= mmStart &+ mmRange else { throw .invalidArgument }
        var notifier = notifierFind(faultAddress, faultAddress + 1)
        var inserted = false
        if notifier == nil {
            let n = GPUSVMNotifier(start: faultAddress & ~(notifierSize - 1),
                                   end: (faultAddress & ~(notifierSize - 1)) &+ notifierSize)
            n.interval = mm.insertIntervalNotifier(start: n.start, end: n.end) { [unowned self, unowned n] mni, range, seq in
                notifierInvalidate(n, mni, range, seq)
            }
            notifier = n
            inserted = true
        }
        let n = notifier!
        func undo() {
            if inserted { mm.removeIntervalNotifier(n.interval) }
        }
        mm.mmapReadLock()
        defer { mm.mmapReadUnlock() }
        guard let vma = mm.vma(containing: faultAddress) else { undo(); throw .noEntry }
        if !context.readOnly && !vma.flags.contains(.write) { undo(); throw .notPermitted }
        if let found = rangeFind(n, faultAddress, faultAddress + 1) { return found }
        let migrate = context.devmemPossible && vma.isAnonymous && !vma.flags.contains(.hugetlb)
        guard let chunk = rangeChunkSize(n, vma, faultAddress, gpuvaStart, gpuvaEnd, context) else { undo(); throw .invalidArgument }
        let start = faultAddress & ~(chunk - 1)
        let range = GPUSVMRange(start: start, end: start + chunk, notifier: n, migrateDevmem: migrate)
        notifierLock.withWriteLock { n.insert(range) }
        if inserted {
            var lo = 0
            while lo < notifiers.count && notifiers[lo].start < n.start { lo += 1 }
            notifiers.insert(n, at: lo)
        }
        return range
    }

    /// The chunk size for a new range at `address` (`drm_gpusvm_range_chunk_size()`),
    /// or nil when none fits. Caller holds the mmap lock.
    func rangeChunkSize(_ n: GPUSVMNotifier, _ vma: VMA, _ address: UInt64, _ gpuvaStart: UInt64, _ gpuvaEnd: UInt64,
                        _ context: GPUSVMContext) -> UInt64? {
        for chunk in chunkSizes {
            let start = address & ~(chunk - 1), end = start + chunk
            guard start >= vma.start, end <= vma.end, start >= n.start, end <= n.end,
                  start >= gpuvaStart, end <= gpuvaEnd else { continue }
            if chunk == PageGeometry.pageSize64 { return chunk }
            // Larger than a page: no overlap with an existing range, and
            // (below the threshold) only over pages the CPU has faulted in.
            if rangeFind(n, start, end) != nil { continue }
            if chunk <= context.checkPagesThreshold && !checkPages(n, start, end) { continue }
            return chunk
        }
        return nil
    }

    /// Whether the CPU has every page of `[start, end)` faulted in
    /// (`drm_gpusvm_check_pages()`): a snapshot with no fault requested.
    /// Caller holds the mmap lock.
    func checkPages(_ n: GPUSVMNotifier, _ start: UInt64, _ end: UInt64) -> Bool {
        let deadline = HostClock.nanos() + GPUSVM.rangeTimeoutNanos
        var range = HMMRange(notifier: n.interval, start: start, end: end, devicePrivateOwner: devicePrivateOwner)
        while true {
            range.notifierSeq = n.interval.readBegin()
            do {
                try mm.hmmRangeFault(&range)
                break
            } catch {
                if error != .busy || HostClock.nanos() > deadline { return false }
            }
        }
        return range.hmmPfns.allSatisfy(\.isValid)
    }

    /// Removes `range`: unmaps its pages, takes it off its notifier and,
    /// with the notifier's last range, removes the notifier. Caller holds
    /// the driver SVM lock and has unbound the range from the GPU.
    ///
    /// The corresponding kernel function is `drm_gpusvm_range_remove()`.
    public func rangeRemove(_ range: GPUSVMRange) {
        let n = range.notifier
        notifierLock.withWriteLock {
            unmapPagesLocked(range)
            range.addresses = []
            if let i = n.ranges.firstIndex(where: { $0 === range }) { n.ranges.remove(at: i) }
        }
        if n.ranges.isEmpty {
            if !n.removed { mm.removeIntervalNotifier(n.interval) }
            n.removed = true
            notifiers.removeAll { $0 === n }
        }
    }

    /// HMM_RANGE_DEFAULT_TIMEOUT: one second.
    public static let rangeTimeoutNanos: UInt64 = 1_000_000_000
}
