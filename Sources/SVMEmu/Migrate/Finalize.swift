/// migrate_vma_finalize() / migrate_device_finalize(): replace migration
/// entries by mappings of the destination (MIGRATE still set and a
/// destination given) or of the source (restore), unlock and release both.
///
/// Reference rules: the source loses the migration's extra reference (a
/// migrated source usually reaches zero and is freed: to its node, or to its
/// page map's `folioFree`); the destination loses the driver's allocation
/// reference and keeps one per mapping installed. The fault folio stays
/// locked: the fault path unlocks it.
extension Kernel {

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

    /// The corresponding kernel function is `migrate_device_finalize()`.
    public func migrateDeviceFinalize(_ src: [MigratePFN], _ dst: inout [MigratePFN], count: Int) {
        guard src.count >= count, dst.count >= count else {
            return warn("migrate_device_finalize: src or dst holds fewer than npages entries", "npages \(count)")
        }
        migrateDeviceFinalizeCore(src, &dst, count, faultFolio: nil)
    }

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
