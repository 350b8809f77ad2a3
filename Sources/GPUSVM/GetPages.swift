import SVMEmu

extension GPUSVM {

    /// Faults in and maps the pages of `range` for the device.
    ///
    /// The protocol of every `hmm_range_fault()` user, kept here once:
    /// `mmu_interval_read_begin()` on the range's notifier; `hmm_range_fault()`
    /// under the mmap lock (read), with a fault request (and a write request
    /// unless ``GPUSVMContext/readOnly``), device-private pages of
    /// ``devicePrivateOwner`` reported rather than faulted, retried from a new
    /// sequence on ``Errno/busy``; then, under ``notifierLock`` (read),
    /// `mmu_interval_read_retry()`: if an invalidation ran meanwhile,
    /// everything starts over; otherwise the pages are recorded in
    /// ``GPUSVMRange/addresses``, the range's flags say `hasDMAMapping` (and
    /// `hasDevmemPages` for device pages) and its sequence is set. A range
    /// whose pages are still valid returns at once.
    ///
    /// The flags change under the notifier lock, which the invalidation
    /// callback takes for writing before it unmaps: a driver that then
    /// checks ``rangePagesValid(_:)`` under the same lock and binds only if
    /// it says so can never bind pages an invalidation already took away.
    ///
    /// Caller holds the driver SVM lock and no mmap lock.
    ///
    /// - Throws: ``Errno/busy`` when no stable snapshot came within
    ///   one second (HMM_RANGE_DEFAULT_TIMEOUT); ``Errno/badAddress`` when the
    ///   range was unmapped meanwhile, a page cannot be faulted (no VMA,
    ///   PROT_NONE), or ``GPUSVMContext/devmemOnly`` and a page is in system
    ///   memory; ``Errno/notPermitted`` for a write request on a read-only
    ///   VMA; ``Errno/notSupported`` when the range mixes system and device
    ///   pages, or device pages of different allocations, without
    ///   ``GPUSVMContext/allowMixed`` (the driver evicts the range and retries).
    ///
    /// The corresponding kernel function is `drm_gpusvm_range_get_pages()`.
    public func rangeGetPages(_ range: GPUSVMRange, context: GPUSVMContext) throws(Errno) {
        let notifier = range.notifier.interval!
        let deadline = HostClock.nanos() + GPUSVM.rangeTimeoutNanos
        let request = context.readOnly ? HMMPFN.requestFault
            : HMMPFN(rawValue: HMMPFN.requestFault.rawValue | HMMPFN.requestWrite.rawValue)
        while true {
            if HostClock.nanos() > deadline { throw .busy }
            var hmm = HMMRange(notifier: notifier, start: range.start, end: range.end,
                               defaultFlags: request, devicePrivateOwner: devicePrivateOwner)
            hmm.notifierSeq = notifier.readBegin()
            if pagesValidUnlocked(range, readOnly: context.readOnly) {
                range.notifierSeq = hmm.notifierSeq
                return
            }
            var fault: Errno? = nil
            while true {
                mm.mmapReadLock()
                do { try mm.hmmRangeFault(&hmm) } catch { fault = error }
                mm.mmapReadUnlock()
                guard fault == .busy, HostClock.nanos() <= deadline else { break }
                fault = nil
                hmm.notifierSeq = notifier.readBegin()
            }
            if let fault { throw fault }
            let outcome: Result<Bool, Errno> = notifierLock.withReadLock {
                if range.flags.contains(.unmapped) { return .failure(.badAddress) }
                if notifier.readRetry(hmm.notifierSeq) { return .success(false) }
                return mapPages(range, hmm, context).map { true }
            }
            switch outcome {
            case .failure(let e): throw e
            case .success(false): continue
            case .success(true):
                range.notifierSeq = hmm.notifierSeq
                return
            }
        }
    }

    /// Records the snapshot in the range (the DMA-mapping loop of
    /// `drm_gpusvm_get_pages()`). Caller holds the notifier lock.
    private func mapPages(_ range: GPUSVMRange, _ hmm: HMMRange, _ context: GPUSVMContext) -> Result<Void, Errno> {
        var addresses: [GPUSVMAddress] = []
        addresses.reserveCapacity(hmm.hmmPfns.count)
        var i = 0
        var zdd: UInt64? = nil
        var sawSystem = false, sawDevice = false
        while i < hmm.hmmPfns.count {
            let p = hmm.hmmPfns[i]
            guard p.isValid else { return .failure(.badAddress) }
            // The largest order the CPU mapping allows inside the range.
            var order: UInt8 = 0
            if p.mapOrder == PageGeometry.pmdOrder && p.pfn & (PageGeometry.pmdPages64 - 1) == 0
                && i + PageGeometry.pmdPages <= hmm.hmmPfns.count {
                order = UInt8(PageGeometry.pmdOrder)
            }
            let folio = kernel.pfnToPage(p.pfn).folio
            if folio.isZoneDevice {
                // Device pages of one allocation only (the zdd), unless mixed is allowed.
                let data = folio.page(0).zoneDeviceData
                if !context.allowMixed && ((zdd != nil && zdd != data) || sawSystem) { return .failure(.notSupported) }
                zdd = data
                sawDevice = true
            } else {
                if !context.allowMixed && sawDevice { return .failure(.notSupported) }
                if context.devmemOnly { return .failure(.badAddress) }
                sawSystem = true
            }
            addresses.append(GPUSVMAddress(pfn: p.pfn, order: order, device: folio.isZoneDevice, write: p.isWrite))
            i += 1 << Int(order)
        }
        range.addresses = addresses
        var f = range.flags
        f.insert(.hasDMAMapping)
        if sawDevice { f.insert(.hasDevmemPages) } else { f.remove(.hasDevmemPages) }
        if context.readOnly { f.insert(.readOnly) } else { f.remove(.readOnly) }
        range.setFlags(f)
        return .success(())
    }

    /// `drm_gpusvm_pages_valid_unlocked()`: valid pages with the permission
    /// asked for (SVMEmu: pages faulted read-only do not serve a write).
    private func pagesValidUnlocked(_ range: GPUSVMRange, readOnly: Bool) -> Bool {
        guard !range.addresses.isEmpty else { return false }
        return notifierLock.withReadLock {
            let f = range.flags
            return !f.isDisjoint(with: [.hasDevmemPages, .hasDMAMapping]) && (readOnly || !f.contains(.readOnly))
        }
    }

    /// Unmaps the range's pages for the device: the flags no longer say
    /// `hasDMAMapping` or `hasDevmemPages`, so ``rangePagesValid(_:)`` is
    /// false until the next ``rangeGetPages(_:context:)``.
    ///
    /// With ``GPUSVMContext/inNotifier`` the caller is the invalidation
    /// callback and holds the notifier lock for writing; otherwise this takes
    /// it. Every range the invalidation overlaps must be unmapped there.
    ///
    /// The corresponding kernel function is `drm_gpusvm_range_unmap_pages()`.
    public func rangeUnmapPages(_ range: GPUSVMRange, context: GPUSVMContext) {
        if context.inNotifier {
            if !notifierWriteHeld.load(ordering: .relaxed) {
                kernel.warn("drm_gpusvm_range_unmap_pages: in_notifier without the notifier lock held for writing", "\(range)")
            }
            unmapPagesLocked(range)
        } else {
            notifierLock.withWriteLock { unmapPagesLocked(range) }
        }
    }

    /// `__drm_gpusvm_unmap_pages()`. Caller holds the notifier lock for writing.
    func unmapPagesLocked(_ range: GPUSVMRange) {
        var f = range.flags
        guard f.contains(.hasDMAMapping) else { return }
        f.remove([.hasDMAMapping, .hasDevmemPages])
        range.setFlags(f)
    }

    /// Migrates every device page of the range back to system memory, this
    /// device's included: `hmm_range_fault()` with a fault request and no
    /// device-private owner, so each device page takes the CPU fault path
    /// (`migrate_to_ram`). Retried on ``Errno/busy`` for up to a second.
    ///
    /// Caller holds no mmap lock.
    ///
    /// - Throws: ``Errno/timedOut`` when the second passed, or the fault's error.
    ///
    /// The corresponding kernel function is `drm_gpusvm_range_evict()`.
    public func rangeEvict(_ range: GPUSVMRange) throws(Errno) {
        try evict(range.notifier.interval, range.start, range.end)
    }

    /// `rangeEvict` for any page-aligned span inside one notifier's interval.
    func evict(_ notifier: MMUIntervalNotifier, _ start: UInt64, _ end: UInt64) throws(Errno) {
        let deadline = HostClock.nanos() + GPUSVM.rangeTimeoutNanos
        var hmm = HMMRange(notifier: notifier, start: start, end: end, defaultFlags: .requestFault, devicePrivateOwner: nil)
        while true {
            hmm.notifierSeq = notifier.readBegin()
            if HostClock.nanos() > deadline { throw .timedOut }
            mm.mmapReadLock()
            var err: Errno? = nil
            do { try mm.hmmRangeFault(&hmm) } catch { err = error }
            mm.mmapReadUnlock()
            guard let err else { return }
            if err != .busy { throw err }
        }
    }
}
