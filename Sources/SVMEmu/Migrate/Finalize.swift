// migrate_vma_finalize() / migrate_device_finalize(): replace migration
// entries by mappings of the destination or of the source, unlock and
// release both. The contract is on `migrateVMAFinalize(_:)`.
extension Kernel {

    /// Ends a migration: every migration entry becomes a mapping again, and
    /// the pages are unlocked and released. Step 4 of the protocol that
    /// ``Kernel/migrateVMASetup(_:)`` describes.
    ///
    /// Call it once after every successful ``Kernel/migrateVMASetup(_:)``,
    /// whether or not ``Kernel/migrateVMAPages(_:)`` ran (without it every
    /// entry is restored), with the mmap lock still held. A call before setup
    /// or a second call records a diagnostic and changes nothing.
    ///
    /// For each entry: when MIGRATE is still set and a destination is given,
    /// the source's migration entries become mappings of the destination
    /// (each mapping taking a reference on it); otherwise they become
    /// mappings of the source again, and a destination the driver supplied is
    /// unlocked and released. Then the source is unlocked (except the fault
    /// page's folio: the fault path holds that lock and drops it when
    /// `migrateToRAM` returns) and loses the migration's extra reference, and
    /// the destination is unlocked and loses the driver's allocation
    /// reference. A migrated source usually reaches zero references here and
    /// is freed: to its node, or through its page map's
    /// ``DevicePageMapOperations/folioFree``. Success and failure are counted
    /// in ``Kernel/vmstat`` (`pgmigrate_success`, `pgmigrate_fail`).
    ///
    /// On return no page of the migration is locked by it (but the fault
    /// page), it owns no reference, and CPU faults that waited on its
    /// migration entries proceed. The arguments may be reused with
    /// ``MigrateVMA/prepare(vma:start:end:flags:pgmapOwner:faultPage:)``.
    ///
    /// - Parameters:
    ///   - args: the arguments of the migration being ended.
    ///
    /// The corresponding kernel function is `migrate_vma_finalize()`.
    public func migrateVMAFinalize(_ args: inout MigrateVMA) {
        switch args.phase {
        case .setUp, .pagesDone: break
        case .idle:
            return warn("migrate_vma_finalize: called before migrate_vma_setup", "range 0x\(String(args.start, radix: 16))")
        case .finalized:
            return warn("migrate_vma_finalize: called twice for one migrate_vma_setup", "range 0x\(String(args.start, radix: 16))")
        }
        let t = phases.begin()
        migrateDeviceFinalizeCore(args.src, &args.dst, args.npages,
                                  faultFolio: args.faultPageLocked == true ? args.faultPage?.folio : nil, mm: args.vma?.mm)
        phases.end(.finalize, t)
        args.phase = .finalized
    }

    /// Ends an eviction: the last step after
    /// ``Kernel/migrateDevicePages(_:_:count:)``.
    ///
    /// The contract is ``Kernel/migrateVMAFinalize(_:)``'s, without an mmap
    /// lock or a fault page: each source's migration entries, found through
    /// the reverse map, become mappings of the destination (MIGRATE still set
    /// and a destination given) or of the source; both are unlocked, the
    /// source loses the reference ``Kernel/migrateDeviceRange(_:startPfn:count:)``
    /// took and the destination its allocation reference.
    ///
    /// - Parameters:
    ///   - src: the entries of the eviction.
    ///   - dst: the destinations given to ``Kernel/migrateDevicePages(_:_:count:)``.
    ///   - count: entries to process; `src` and `dst` must hold at least that
    ///     many, or nothing is done and a diagnostic is recorded.
    ///
    /// The corresponding kernel function is `migrate_device_finalize()`.
    public func migrateDeviceFinalize(_ src: [MigratePFN], _ dst: inout [MigratePFN], count: Int) {
        guard src.count >= count, dst.count >= count else {
            return warn("migrate_device_finalize: src or dst holds fewer than npages entries", "npages \(count)")
        }
        migrateDeviceFinalizeCore(src, &dst, count, faultFolio: nil)
    }

    /// The loop of `migrate_vma_finalize()` and `migrate_device_finalize()`.
    /// Caller holds no page-table lock; `faultFolio` is the folio whose lock
    /// the fault path holds (nil when it holds none), which stays locked.
    func migrateDeviceFinalizeCore(_ src: [MigratePFN], _ dst: inout [MigratePFN], _ npages: Int, faultFolio: Folio?,
                                   mm hint: AddressSpace? = nil) {
        // Counted once per call, like the kernel's count_vm_events() after a batch.
        var succeeded: UInt64 = 0, failed: UInt64 = 0
        defer {
            if succeeded > 0 { vmstat.count(.pgmigrateSuccess, succeeded) }
            if failed > 0 { vmstat.count(.pgmigrateFail, failed) }
        }
        for i in 0..<npages {
            var dstFolio: Folio? = nil
            if dst[i].isValid {
                if isValid(pfn: dst[i].pfn) {
                    dstFolio = Page(pfn: dst[i].pfn, kernel: self).folio
                } else {
                    warn("migrate_vma_finalize: destination pfn is not a page of this machine", "dst[\(i)] = \(dst[i])")
                }
            }
            guard let page = page(src[i]) else {
                if let d = dstFolio {
                    if d == faultFolio { warn("migrate_vma_finalize: destination is the fault folio", "\(d)") }
                    d.unlock()
                    d.put()
                }
                continue
            }
            let srcFolio = page.folio
            var target = dstFolio ?? srcFolio
            if !src[i].isMigrating || dstFolio == nil {
                if let d = dstFolio {
                    d.unlock()
                    d.put()
                }
                target = srcFolio
                failed += UInt64(srcFolio.pageCount)
            } else {
                succeeded += UInt64(srcFolio.pageCount)
            }
            if !target.isZoneDevice { target.set(.lru) }
            removeMigrationPTEs(srcFolio, target, hint: hint)
            if srcFolio != faultFolio { srcFolio.unlock() }
            srcFolio.put()
            if target != srcFolio {
                target.unlock()
                target.put()
            }
        }
    }
}
