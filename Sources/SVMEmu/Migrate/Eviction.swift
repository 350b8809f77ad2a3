import CSVMSupport

// Eviction: migrating device pages back to system memory without a VMA
// (`migrate_device_range()`, `migrate_device_pfns()`), e.g. when a driver
// frees its device memory. The pages are found by pfn and unmapped through
// the reverse map.
extension Kernel {

    /// Takes a reference on and trylocks the folio at `pfn`
    /// (`migrate_device_pfn_lock()`): a free page, a tail page or a lock held
    /// elsewhere gives an empty entry.
    ///
    /// Caller holds no lock. Returns, for a head page it could take, an entry
    /// with MIGRATE (and COMPOUND for a large folio) whose folio is locked
    /// and holds one extra reference, both owned by the eviction.
    func migrateDevicePfnLock(_ pfn: UInt64) -> MigratePFN {
        guard isValid(pfn: pfn) else { return .empty }
        let m = metaPtr(pfn)
        guard m.head == pfn else { return .empty }
        let folio = Folio(pfn: pfn, kernel: self)
        guard folio.tryGet() else { return .empty }
        guard folio.tryLock() else {
            folio.put()
            return .empty
        }
        return MigratePFN(pfn: pfn).with(MigratePFN.migrateBit | (folio.isLarge ? MigratePFN.compoundBit : 0))
    }

    /// Collects and unmaps `count` device pages from `startPfn`, for a
    /// migration that is not tied to a VMA (eviction of device memory).
    ///
    /// The first step of an eviction; ``Kernel/migrateDevicePages(_:_:count:)``
    /// and ``Kernel/migrateDeviceFinalize(_:_:count:)`` follow, with the
    /// driver allocating and copying in between as for
    /// ``Kernel/migrateVMASetup(_:)``. The caller holds no mmap lock (the
    /// pages may be mapped in any address space) and must not hold the folio
    /// lock of any page in the range.
    ///
    /// Each page in use is referenced and trylocked: a free page, a tail page
    /// or a page locked elsewhere gets an empty entry. Every mapping of a
    /// collected page is then replaced by a migration entry through the
    /// reverse map, and a page that is still mapped or holds references its
    /// mappings do not explain is restored, unlocked, released and its entry
    /// cleared.
    ///
    /// On return every `src[i]` with MIGRATE names a folio (a 2 MiB folio
    /// with COMPOUND) that is locked, unmapped and holds one extra reference
    /// owned by the eviction until ``Kernel/migrateDeviceFinalize(_:_:count:)``.
    ///
    /// - Parameters:
    ///   - src: filled with one entry per pfn; must hold at least `count`.
    ///   - startPfn: the first device pfn to evict.
    ///   - count: how many pfns.
    /// - Throws: ``Errno/invalidArgument`` when `count` is negative or `src`
    ///   holds fewer than `count` entries; nothing changes then.
    ///
    /// The corresponding kernel function is `migrate_device_range()`.
    public func migrateDeviceRange(_ src: inout [MigratePFN], startPfn: UInt64, count: Int) throws(Errno) {
        guard count >= 0, src.count >= count else { throw .invalidArgument }
        for i in 0..<count { src[i] = migrateDevicePfnLock(startPfn + UInt64(i)) }
        _ = migrateDeviceUnmap(&src, count, faultPage: nil, faultPageLocked: false)
    }

    /// Collects and unmaps the device pages whose pfns `src` holds, for an
    /// eviction of scattered pages.
    ///
    /// Like ``Kernel/migrateDeviceRange(_:startPfn:count:)``, with the same
    /// contract, for pfns the caller lists in `src` as `MigratePFN(pfn:)`
    /// entries (an entry without VALID stays empty).
    ///
    /// - Parameters:
    ///   - src: on entry the pfns, on return the collected entries.
    ///   - count: how many entries; `src` must hold at least that many.
    /// - Throws: ``Errno/invalidArgument`` when `count` is negative or `src`
    ///   holds fewer than `count` entries; nothing changes then.
    ///
    /// The corresponding kernel function is `migrate_device_pfns()`.
    public func migrateDevicePfns(_ src: inout [MigratePFN], count: Int) throws(Errno) {
        guard count >= 0, src.count >= count else { throw .invalidArgument }
        for i in 0..<count { src[i] = src[i].isValid ? migrateDevicePfnLock(src[i].pfn) : .empty }
        _ = migrateDeviceUnmap(&src, count, faultPage: nil, faultPageLocked: false)
    }
}

extension Kernel {
    /// Moves one small device-coherent folio to a new system page, so that
    /// it can be pinned long-term (`migrate_device_coherent_folio()`): lock
    /// it, unmap it as eviction does, allocate and lock a system page, then
    /// pages, copy (the CPU reaches coherent memory), finalize.
    ///
    /// The caller holds one reference, which the migration consumes (the
    /// unmap step trades it, and finalize or the restore pass drops it), and
    /// no page-table or folio lock. Returns whether the folio moved; false
    /// (the kernel's -EBUSY) when it was still referenced elsewhere or no
    /// system page was free.
    func migrateDeviceCoherentFolio(_ folio: Folio) -> Bool {
        if folio.isLarge { warn("migrate_device_coherent_folio: large folio", "\(folio)") }
        folio.lock()
        var src = [MigratePFN(pfn: folio.pfn).with(MigratePFN.migrateBit)]
        _ = migrateDeviceUnmap(&src, 1, faultPage: nil, faultPageLocked: false)
        guard src[0].isMigrating else { return false }
        var dst = [MigratePFN.empty]
        let dfolio = allocateFolio(order: 0)
        if let dfolio {
            dfolio.lock()
            dst[0] = MigratePFN(pfn: dfolio.pfn)
        }
        migrateDevicePages(&src, &dst, count: 1)
        if src[0].isMigrating, let dfolio { dfolio.copyBytes(from: folio) }
        migrateDeviceFinalize(src, &dst, count: 1)
        return src[0].isMigrating
    }
}
