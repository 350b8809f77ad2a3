import SVMEmu

extension DRMPagemap {

    /// Migrates `[start, end)` of the allocation's address space into
    /// `devmem`, all or nothing.
    ///
    /// The recipe: `migrate_vma_setup()` with SELECT_SYSTEM and
    /// SELECT_DEVICE_COHERENT (and SELECT_COMPOUND when ``largeFolios`` and
    /// the range is 2 MiB aligned, so a THP or an empty 2 MiB region moves
    /// as one folio), `pgmap_owner` this memory's owner; every page must be
    /// collected, else nothing moves (``Errno/busy``: raced, or pages in
    /// device memory already, which SELECT_SYSTEM does not collect); the
    /// driver's `populate_devmem_pfn` names the device pages, each is
    /// initialised (`zone_device_page_init`, a 2 MiB folio for a compound
    /// entry) and takes a reference on the allocation; `copy_to_devmem`;
    /// `migrate_vma_pages()`; every page must have moved (else
    /// ``Errno/busy``: raced while finalizing); `migrate_vma_finalize()`.
    ///
    /// The caller holds the mmap lock for reading and passes its reference
    /// to `devmem`: it is consumed even on error (released at once when no
    /// page took it).
    ///
    /// - Throws: ``Errno/noEntry`` (no VMA at `start`),
    ///   ``Errno/invalidArgument`` (the range leaves the VMA),
    ///   ``Errno/busy`` (not anonymous, not every page collected or moved),
    ///   or the driver's error.
    ///
    /// The corresponding kernel function is `drm_pagemap_migrate_to_devmem()`.
    public func migrateToDevmem(_ devmem: DRMPagemapDevmem, start: UInt64, end: UInt64) throws(Errno) {
        let mm = devmem.mm
        guard let vma = mm.vma(containing: start) else { devmem.operations.devmemRelease(devmem); throw .noEntry }
        guard end <= vma.end, start >= vma.start, end > start else { devmem.operations.devmemRelease(devmem); throw .invalidArgument }
        guard vma.isAnonymous else { devmem.operations.devmemRelease(devmem); throw .busy }
        let npages = Int((end - start) >> PageGeometry.pageShift)
        var flags: MigrateSelect = [.system, .deviceCoherent]
        if largeFolios && start & ~PageGeometry.pmdMask == 0 && end & ~PageGeometry.pmdMask == 0 { flags.insert(.compound) }
        let zdd = DRMPagemapZDD.make(devmem)   // owns the caller's reference
        defer { zdd.put() }
        var args = MigrateVMA(vma: vma, start: start, end: end, flags: flags, pgmapOwner: owner)
        try kernel.migrateVMASetup(&args)
        let collected = DRMPagemap.pagesMigrating(args.src, npages)
        if args.cpages == 0 { throw .busy }
        var err: Errno? = nil
        if collected != npages {
            err = .busy   // some but not all: raced, or device pages already
        } else {
            var pfns = [UInt64](repeating: 0, count: npages)
            if let e = devmem.operations.populateDevmemPfn(devmem, npages, &pfns) {
                err = e
            } else if let e = initDevicePages(&args, pfns, zdd) {
                err = e
            } else {
                let t = kernel.phases.begin()
                err = devmem.operations.copyToDevmem(args.dst, args.src, npages)
                kernel.phases.end(.copy, t)
            }
            if err != nil { DRMPagemap.unlockPutPages(kernel, &args.dst, npages) }
        }
        kernel.migrateVMAPages(&args)
        if err == nil && DRMPagemap.pagesMoved(args.src, args.dst, npages) < npages { err = .busy }
        kernel.migrateVMAFinalize(&args)
        if let err { throw err }
    }

    /// Gives every collected entry its device page (`drm_pagemap_get_devmem_page()`):
    /// initialised, locked, one reference, its zone device data the allocation's.
    private func initDevicePages(_ args: inout MigrateVMA, _ pfns: [UInt64], _ zdd: DRMPagemapZDD) -> Errno? {
        var i = 0
        while i < args.npages {
            let s = args.src[i]
            let step = s.isCompound ? PageGeometry.pmdPages : 1
            defer { i += step }
            guard s.isMigrating else { continue }
            if s.isCompound {
                // 512 contiguous, aligned pfns make one 2 MiB folio.
                guard pfns[i] & (PageGeometry.pmdPages64 - 1) == 0,
                      pfns[i + PageGeometry.pmdPages - 1] == pfns[i] + PageGeometry.pmdPages64 - 1 else { return .invalidArgument }
            }
            guard let folio = kernel.zoneDevicePageInit(kernel.pfnToPage(pfns[i]), order: s.isCompound ? PageGeometry.pmdOrder : 0) else {
                return .noMemory
            }
            zdd.get()
            folio.page(0).zoneDeviceData = zdd.token
            args.dst[i] = MigratePFN(pfn: pfns[i]).with(s.isCompound ? MigratePFN.compoundBit : 0)
        }
        return nil
    }

    /// Migrates the allocation holding `vmf.page` back to RAM around the
    /// fault: the allocation's size, aligned, clipped to the VMA
    /// (`__drm_pagemap_migrate_to_ram()`). `migrate_vma_setup()` with
    /// SELECT_DEVICE_PRIVATE and SELECT_DEVICE_COHERENT (SELECT_COMPOUND for
    /// a PMD fault), `fault_page` set; nothing collected means another fault
    /// won, and the CPU retries; system pages of the source folio's order
    /// for the pages of the same allocation only; `copy_to_ram`;
    /// `migrate_vma_pages()`; `migrate_vma_finalize()`.
    ///
    /// The page map's `migrate_to_ram` callback: called with the mmap lock
    /// held and a reference (or, with the trylock policies, the lock) on
    /// `vmf.page`.
    ///
    /// - Returns: `.done`, or `.sigbus` when setup fails or RAM runs out.
    ///
    /// The corresponding kernel function is `drm_pagemap_migrate_to_ram()`.
    public static func migrateToRAM(_ vmf: VMFault) -> VMFaultResult {
        let kernel = vmf.mm.kernel
        let token = vmf.page.folio.page(0).zoneDeviceData
        guard let zdd = DRMPagemapZDD.from(token) else { return .sigbus }
        let devmem = zdd.devmem
        let size = devmem.size
        var start = vmf.address & ~(size - 1), end = start + size
        start = max(start, vmf.vma.start)
        end = min(end, vmf.vma.end)
        let npages = Int((end - start) >> PageGeometry.pageShift)
        var flags: MigrateSelect = [.devicePrivate, .deviceCoherent]
        if vmf.isPMD && start & ~PageGeometry.pmdMask == 0 && end & ~PageGeometry.pmdMask == 0 { flags.insert(.compound) }
        var args = MigrateVMA(vma: vmf.vma, start: start, end: end, flags: flags, pgmapOwner: devmem.pagemap.owner, fault: vmf)
        do { try kernel.migrateVMASetup(&args) } catch { return .sigbus }
        if args.cpages == 0 { return .done }   // raced with another CPU fault
        let t = kernel.phases.begin()
        var err = populateRAM(kernel, &args.src, &args.dst, npages, only: token)
        let c = kernel.phases.endAndBegin(.allocate, t)
        if err == nil { err = devmem.operations.copyToRAM(args.src, args.dst, npages) }
        kernel.phases.end(.copy, c)
        if err != nil { unlockPutPages(kernel, &args.dst, npages) }
        kernel.migrateVMAPages(&args)
        kernel.migrateVMAFinalize(&args)
        return err == nil ? .done : .sigbus
    }

    /// Evicts every page of `devmem` to RAM without a VMA
    /// (`migrate_device_pfns()` over the allocation's pfns, system pages,
    /// `copy_to_ram`, `migrate_device_pages()`, `migrate_device_finalize()`),
    /// until the allocation is detached: retried twice, as pages the CPU or
    /// another migration held are skipped.
    ///
    /// Caller holds no mmap lock and no folio lock of the allocation, and
    /// keeps the device memory from being reused until this returns.
    ///
    /// - Throws: ``Errno/busy`` when pages still refer to the allocation
    ///   after the retries; ``Errno/noMemory`` when RAM ran out.
    ///
    /// The corresponding kernel function is `drm_pagemap_evict_to_ram()`.
    public static func evictToRAM(_ devmem: DRMPagemapDevmem) throws(Errno) {
        let kernel = devmem.pagemap.kernel
        let npages = devmem.pageCount
        var pfns = [UInt64](repeating: 0, count: npages)
        var src = [MigratePFN](repeating: .empty, count: npages)
        var dst = [MigratePFN](repeating: .empty, count: npages)
        var err: Errno? = nil
        for _ in 0..<3 {
            if devmem.isDetached { return }
            if let e = devmem.operations.populateDevmemPfn(devmem, npages, &pfns) { throw e }
            for i in 0..<npages { src[i] = MigratePFN(pfn: pfns[i]); dst[i] = .empty }
            try kernel.migrateDevicePfns(&src, count: npages)
            err = populateRAM(kernel, &src, &dst, npages, only: nil)
            if err == nil { err = devmem.operations.copyToRAM(src, dst, npages) }
            if err != nil { unlockPutPages(kernel, &dst, npages) }
            kernel.migrateDevicePages(&src, &dst, count: npages)
            kernel.migrateDeviceFinalize(src, &dst, count: npages)
            if devmem.isDetached { return }
        }
        throw err ?? .busy
    }

    /// `drm_pagemap_migrate_populate_ram_pfn()`: a locked system folio of the
    /// source's order for every collected device page (of the allocation
    /// `only`, when given). On failure every folio given is released and
    /// ``Errno/noMemory`` returned.
    static func populateRAM(_ kernel: Kernel, _ src: inout [MigratePFN], _ dst: inout [MigratePFN], _ npages: Int,
                            only token: UInt64?) -> Errno? {
        var i = 0
        while i < npages {
            let s = src[i]
            let step = s.isCompound ? PageGeometry.pmdPages : 1
            defer { i += step }
            guard s.isMigrating, let page = kernel.page(s) else { continue }
            if let token, page.folio.page(0).zoneDeviceData != token { continue }
            guard let folio = kernel.allocateFolio(order: s.isCompound ? PageGeometry.pmdOrder : 0) else {
                unlockPutPages(kernel, &dst, npages)
                return .noMemory
            }
            if !folio.tryLock() { kernel.warn("drm_pagemap: a fresh folio was locked", "\(folio)") }
            dst[i] = MigratePFN(pfn: folio.pfn).with(s.isCompound ? MigratePFN.compoundBit : 0)
        }
        return nil
    }

    /// `drm_pagemap_migration_unlock_put_pages()`: unlock, put and forget
    /// every destination page.
    static func unlockPutPages(_ kernel: Kernel, _ dst: inout [MigratePFN], _ npages: Int) {
        for i in 0..<npages where dst[i].isValid {
            guard let folio = kernel.page(dst[i])?.folio else { continue }
            folio.unlock()
            folio.put()
            dst[i] = .empty
        }
    }

    /// Base pages collected (a compound entry counts 512, a hole 1 or 512).
    static func pagesMigrating(_ src: [MigratePFN], _ npages: Int) -> Int {
        var n = 0, i = 0
        while i < npages {
            let s = src[i]
            let step = s.isCompound ? PageGeometry.pmdPages : 1
            if s.isMigrating { n += step }
            i += step
        }
        return n
    }

    /// Base pages that moved: MIGRATE still set after `migrate_vma_pages()`.
    static func pagesMoved(_ src: [MigratePFN], _ dst: [MigratePFN], _ npages: Int) -> Int {
        var n = 0, i = 0
        while i < npages {
            let s = src[i]
            let step = s.isCompound ? PageGeometry.pmdPages : 1
            if s.isMigrating && dst[i].isValid { n += step }
            i += step
        }
        return n
    }
}
