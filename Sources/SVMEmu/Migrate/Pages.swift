import CSVMSupport

// migrate_vma_pages() / migrate_device_pages(): move each page's identity
// (its anonymous mapping) from source to destination, or fill holes. The
// contract is on `migrateVMAPages(_:)` and `migrateDevicePages(_:_:count:)`.
extension Kernel {

    /// Moves each collected page's identity to its destination, or fills each
    /// hole with its destination: step 3 of the protocol that
    /// ``Kernel/migrateVMASetup(_:)`` describes.
    ///
    /// Call it after a successful ``Kernel/migrateVMASetup(_:)`` of the same
    /// arguments, once the driver has filled `dst` and its copies are
    /// complete (``CopyEngine/wait()``), and before
    /// ``Kernel/migrateVMAFinalize(_:)``; called out of that order it changes
    /// nothing and records a diagnostic.
    ///
    /// On entry the caller still holds the mmap lock it held for setup, and
    /// each `dst[i]` is either empty (keep the source) or `MigratePFN(page:)`
    /// of a destination page that is allocated (one reference, which the
    /// driver hands to the migration), LOCKED, and already holds the source's
    /// bytes: device pages come locked from
    /// ``Kernel/zoneDevicePageInit(_:order:)``, system folios need
    /// ``Folio/lock(file:line:)``. A compound source wants a compound destination (the
    /// head of a 2 MiB folio with ``MigratePFN/compoundBit``) or 512 small
    /// ones; a small source wants a small one. The destination's WRITE bit is
    /// ignored: write permission comes from the migration entry, or from
    /// VM_WRITE for a hole.
    ///
    /// For each entry a moved source passes its anonymous mapping, dirty and
    /// uptodate state to the destination; a hole is filled by mapping the
    /// destination directly (a PMD for a compound hole with a 2 MiB
    /// destination; 4 KiB destinations split it), inside a
    /// ``MMUNotifyEvent/migrate`` invalidation. A source still held by anyone
    /// but the migration (and, for the fault page, the fault path), a
    /// destination of the wrong kind (device memory for a shared mapping, a
    /// size that does not match), or a hole that is no longer empty makes
    /// that entry fail. A destination the driver got wrong (not a page of
    /// this machine, free, not locked, a COMPOUND pfn that is not a 2 MiB
    /// head) is reported as a diagnostic and its `dst[i]` cleared, so that
    /// finalize does not touch it.
    ///
    /// On return, success is told only by ``MigratePFN/isMigrating`` still
    /// set on `src[i]`; a compound source with small destinations has been
    /// split into 512 small entries. Nothing is unlocked and no reference is
    /// dropped yet: source and destination stay locked and the CPU page
    /// tables still hold migration entries, so the driver may update its
    /// device page table for the successful entries before calling
    /// ``Kernel/migrateVMAFinalize(_:)``.
    ///
    /// - Parameters:
    ///   - args: the arguments ``Kernel/migrateVMASetup(_:)`` filled, with
    ///     `dst` filled by the driver; `src` (MIGRATE bits) and `dst` are
    ///     updated.
    ///
    /// The corresponding kernel function is `migrate_vma_pages()`.
    public func migrateVMAPages(_ args: inout MigrateVMA) {
        switch args.phase {
        case .setUp: break
        case .idle:
            return warn("migrate_vma_pages: called before migrate_vma_setup", "range 0x\(String(args.start, radix: 16))")
        case .pagesDone:
            return warn("migrate_vma_pages: called twice for one migrate_vma_setup", "range 0x\(String(args.start, radix: 16))")
        case .finalized:
            return warn("migrate_vma_pages: called after migrate_vma_finalize", "range 0x\(String(args.start, radix: 16))")
        }
        let n = args.npages
        let context = PagesContext(vma: args.vma, start: args.start, end: args.end, owner: args.pgmapOwner, faultPage: args.faultPage)
        let t = phases.begin()
        migrateDevicePagesCore(&args.src, &args.dst, n, context)
        phases.end(.pages, t)
        args.phase = .pagesDone
    }

    /// Moves each collected device page's identity to its destination, for a
    /// migration without a VMA (eviction).
    ///
    /// The second step of an eviction: after
    /// ``Kernel/migrateDeviceRange(_:startPfn:count:)`` or
    /// ``Kernel/migrateDevicePfns(_:count:)``, and before
    /// ``Kernel/migrateDeviceFinalize(_:_:count:)``. The contract is
    /// ``Kernel/migrateVMAPages(_:)``'s, except that no mmap lock is needed
    /// (the pages were found by pfn and unmapped through the reverse map),
    /// holes cannot occur, and a compound source with small destinations is
    /// not split: that entry fails instead.
    ///
    /// - Parameters:
    ///   - src: the entries the collect step filled; MIGRATE is cleared on
    ///     each entry that fails.
    ///   - dst: the driver's locked destinations, or empty entries.
    ///   - count: entries to process; `src` and `dst` must hold at least that
    ///     many, or nothing is done and a diagnostic is recorded.
    ///
    /// The corresponding kernel function is `migrate_device_pages()`.
    public func migrateDevicePages(_ src: inout [MigratePFN], _ dst: inout [MigratePFN], count: Int) {
        guard src.count >= count, dst.count >= count else {
            return warn("migrate_device_pages: src or dst holds fewer than npages entries", "npages \(count)")
        }
        migrateDevicePagesCore(&src, &dst, count, nil)
    }

    struct PagesContext {
        let vma: VMA?
        let start: UInt64
        let end: UInt64
        let owner: DeviceOwner?
        let faultPage: Page?
    }

    /// A destination entry the driver got wrong is reported and dropped (set
    /// empty) so that finalize neither maps nor frees a page it must not touch.
    func validatedDestination(_ dst: inout [MigratePFN], _ i: Int) -> Page? {
        guard dst[i].isValid else { return nil }
        let pfn = dst[i].pfn
        guard isValid(pfn: pfn) else {
            warn("migrate_vma_pages: destination pfn is not a page of this machine (outside every node and device pool)",
                 "dst[\(i)] = \(dst[i])")
            dst[i] = .empty
            return nil
        }
        let page = Page(pfn: pfn, kernel: self)
        let folio = page.folio
        guard folio.refCount > 0 else {
            warn("migrate_vma_pages: destination page is free (allocate it, or zone_device_page_init it, first)", "\(page)")
            dst[i] = .empty
            return nil
        }
        guard folio.isLocked else {
            warn("migrate_vma_pages: destination page must be locked (lock_page, or as zone_device_page_init leaves it)", "\(page)")
            dst[i] = .empty
            return nil
        }
        guard !dst[i].isCompound || (folio.order == PageGeometry.pmdOrder && folio.pfn == pfn) else {
            warn("migrate_vma_pages: a COMPOUND destination must be the head of a 2 MiB folio", "\(page)")
            dst[i] = .empty
            return nil
        }
        return page
    }

    /// The loop of `migrate_vma_pages()` and `migrate_device_pages()`; `migrate`
    /// is nil for eviction. Caller holds what ``Kernel/migrateVMAPages(_:)``
    /// requires (the mmap lock when there is a VMA) and no page-table lock;
    /// every lock taken inside is dropped before it returns.
    func migrateDevicePagesCore(_ src: inout [MigratePFN], _ dst: inout [MigratePFN], _ npages: Int, _ migrate: PagesContext?) {
        var notified: MMUNotifierRange? = nil
        var i = -1
        while i + 1 < npages {
            i += 1
            // No destination (the tails of a compound entry, entries the
            // driver skipped): MIGRATE off, nothing else to look at. The
            // store is skipped when the bit is clear already.
            if !dst[i].isValid {
                if src[i].isMigrating { src[i] = src[i].without(MigratePFN.migrateBit) }
                continue
            }
            guard let newPage = validatedDestination(&dst, i) else {
                src[i] = src[i].without(MigratePFN.migrateBit)
                continue
            }
            let dstCompound = dst[i].isCompound
            guard let page = page(src[i]) else {
                guard src[i].isMigrating else { continue }
                guard let migrate, let vma = migrate.vma else {
                    warn("migrate_device_pages: a hole entry without a VMA (VM_BUG_ON(!migrate))", "src[\(i)]")
                    src[i] = src[i].without(MigratePFN.migrateBit)
                    continue
                }
                let addr = migrate.start + UInt64(i) << PageGeometry.pageShift
                if notified == nil {
                    let r = MMUNotifierRange(start: addr, end: migrate.end, event: .migrate, owner: migrate.owner)
                    vma.mm.invalidateRangeStart(r)
                    notified = r
                }
                if src[i].isCompound {
                    if dstCompound {
                        migrateVMAInsertHugePMD(vma, addr, newPage.folio, &src[i])
                        vmstat.count(src[i].isMigrating ? .thpMigrationSuccess : .thpMigrationFail)
                        continue
                    }
                    // 4 KiB destinations for a compound hole: 512 small holes.
                    for j in 0..<Kernel.hugePages where i + j < npages { src[i + j] = .hole }
                    vmstat.count(.thpMigrationSplit)
                } else if dstCompound {
                    src[i] = src[i].without(MigratePFN.migrateBit)
                    continue
                }
                migrateVMAInsertPage(vma, addr, newPage, &src[i])
                continue
            }
            guard src[i].isMigrating else { continue }
            if src[i].isCompound && !dstCompound {
                // Eviction never splits: the entry is dropped instead.
                guard migrate != nil, splitMigratingFolio(&src, i, faultPage: migrate?.faultPage, hint: migrate?.vma?.mm) else {
                    src[i] = src[i].without(MigratePFN.migrateBit | MigratePFN.compoundBit)
                    continue
                }
            } else if !src[i].isCompound && dstCompound {
                src[i] = src[i].without(MigratePFN.migrateBit)
                continue
            }
            let newFolio = newPage.folio
            let folio = page.folio
            let hasMapping = folio.test(.shmem)
            if newFolio.isDevicePrivate || newFolio.isDeviceCoherent {
                // Only anonymous memory may move to device memory.
                if hasMapping {
                    src[i] = src[i].without(MigratePFN.migrateBit)
                    continue
                }
            } else if newFolio.isZoneDevice || folio.test(.pageCache) {
                // Other ZONE_DEVICE types are not supported. A page-cache
                // folio stays where it is here: the kernel would replace it
                // in its file (folio_migrate_mapping() with the mapping, as
                // migrate_pages does); the emulator's migrate_vma keeps the
                // page cache out of device-driven migrations.
                src[i] = src[i].without(MigratePFN.migrateBit)
                continue
            }
            let extra = (migrate?.faultPage.map { $0.folio == folio } ?? false) ? 1 : 0
            if folioMigrateMapping(newFolio, folio, extraCount: extra) {
                folioMigrateFlags(newFolio, folio)
                if src[i].isCompound { vmstat.count(.thpMigrationSuccess) }
            } else {
                src[i] = src[i].without(MigratePFN.migrateBit)
                if src[i].isCompound { vmstat.count(.thpMigrationFail) }
            }
        }
        if let r = notified, let vma = migrate?.vma { vma.mm.invalidateRangeEnd(r) }
    }

    /// `folio_migrate_mapping()`: without a mapping (anonymous memory, or a
    /// page-cache folio truncated before the caller locked it) the source
    /// must hold exactly the caller's reference (plus `extraCount`, the fault
    /// path's); any other holder makes the migration of this page fail
    /// (-EAGAIN). A page-cache folio is replaced in its file's cache
    /// (`File.migrateFolio`, the expected count one more per page for the
    /// cache); a file being torn down is -EAGAIN.
    /// Caller holds the folio locks of both folios.
    func folioMigrateMapping(_ newFolio: Folio, _ folio: Folio, extraCount: Int) -> Bool {
        if folio.test(.pageCache) {
            // Holding the file keeps its teardown from running meanwhile.
            guard let file = file(id: folio.meta.mappingMM) else { return false }
            return file.migrateFolio(newFolio, folio, extraCount: extraCount)
        }
        let expected = 1 + extraCount
        guard folio.refCount == expected else { return false }
        newFolio.meta.mappingMM = folio.meta.mappingMM
        newFolio.meta.index = folio.meta.index
        // The mapping's anon bit and swap-backed in one flag update (the
        // kernel's are a plain store of `mapping` and `__folio_set_swapbacked()`).
        let carried = folio.meta.flags & (PageFlags.anon.rawValue | PageFlags.swapBacked.rawValue)
        if carried != 0 { newFolio.meta.setFlags(carried) }
        return true
    }

    /// `folio_migrate_flags()`: dirty and uptodate pass to the new folio.
    /// Caller holds the folio locks of both folios.
    func folioMigrateFlags(_ newFolio: Folio, _ folio: Folio) {
        let carried = folio.meta.flags & (PageFlags.dirty.rawValue | PageFlags.uptodate.rawValue)
        newFolio.meta.setFlags(carried)
        newFolio.meta.zoneDeviceData = newFolio.isZoneDevice ? newFolio.meta.zoneDeviceData : 0
    }

    /// Fills a hole with the destination page (`migrate_vma_insert_page()`):
    /// anonymous VMAs only, the PMD must not map 2 MiB, the PTE must still be
    /// none or the zero page. A device-private page gets a device-private entry
    /// (writable iff VM_WRITE), others a present PTE. Failure clears MIGRATE.
    ///
    /// We enter with the mmap lock held, no page-table lock, and `page`'s
    /// folio locked and referenced by the driver; we take the PTE lock and
    /// return with it dropped. On success the new PTE holds one new reference
    /// on the folio (the mapping's) and the rmap names `addr`.
    func migrateVMAInsertPage(_ vma: VMA, _ addr: UInt64, _ page: Page, _ src: inout MigratePFN) {
        let mm = vma.mm
        let folio = page.folio
        guard vma.isAnonymous, mm.covers(addr) else { src = src.without(MigratePFN.migrateBit); return }
        // A huge zero PMD is split into zero-page PTEs first, which the new
        // page then replaces; any other huge entry aborts (the kernel's
        // migrate_vma_insert_page() since device THP: "if (pmd_trans_huge(*pmdp))
        // { if (!is_huge_zero_pmd(*pmdp)) goto abort; split_huge_pmd(); }").
        // Found by hmm-tests' migrate_anon_huge_zero_err (a huge zero page
        // migrated with the 2 MiB device allocation forced to fail).
        let huge = mm.loadPMD(addr)
        if huge.kind == .present && huge.isSpecial { mm.splitHugePMD(addr) }
        let pmd = mm.ensurePTETable(addr)
        guard pmd.kind == .table else { src = src.without(MigratePFN.migrateBit); return }
        folio.set(.uptodate)
        let entry = PageTableEntry.holeMapping(of: folio, pfn: page.pfn, in: vma)
        // Whether the entry replaced was the zero page; nil: abort.
        let replaced: Bool? = mm.withPTL(addr) {
            let orig = mm.loadPTE(addr)
            // Only a none entry or the zero page may be replaced.
            guard orig.isNone || (orig.kind == .present && orig.isSpecial) else { return nil }
            mm.addNewAnonRmap(folio, vma, address: addr, pmdMapped: false)
            folio.get()
            if orig.kind == .present {
                // ptep_clear_flush() before the new page goes in.
                mm.storePTE(addr, .none)
                mm.flushTLBRange(addr, addr + PageGeometry.pageSize64)
            }
            mm.storePTE(addr, entry)
            return orig.kind == .present
        }
        guard replaced != nil else { src = src.without(MigratePFN.migrateBit); return }
        src = .hole
    }
}

extension PageTableEntry {
    /// The entry that maps a destination filling a hole (PTE or PMD): a
    /// device-private entry for device-private memory, else a present one;
    /// writable (and dirty) iff the VMA has VM_WRITE, inaccessible
    /// (protnone) in a PROT_NONE VMA: the VMA's `vm_page_prot`, as
    /// `migrate_vma_insert_page()` builds it.
    static func holeMapping(of folio: Folio, pfn: UInt64, in vma: VMA) -> PageTableEntry {
        let writable = vma.flags.contains(.write)
        let entry: PageTableEntry = folio.isDevicePrivate
            ? .devicePrivate(pfn: pfn, write: writable)
            : .present(pfn: pfn, write: writable, dirty: writable)
        return vma.flags.contains(.read) ? entry : entry.with(PageTableEntry.protNoneBit)
    }

    /// The entry that replaces a migration entry by a mapping of `folio`'s
    /// page `pfn` (`remove_migration_pte()` / `remove_migration_pmd()`): write
    /// permission from the migration entry, dirty only if both the entry and
    /// the folio are, young kept, and the VMA's protection (a PROT_NONE
    /// VMA's page stays inaccessible: `mk_pte(new, vma->vm_page_prot)`).
    static func replacing(migration: PageTableEntry, with folio: Folio, pfn: UInt64) -> PageTableEntry {
        let entry: PageTableEntry = folio.isDevicePrivate
            ? .devicePrivate(pfn: pfn, write: migration.isWrite)
            : .present(pfn: pfn, write: migration.isWrite, dirty: migration.isDirty && folio.isDirty, young: migration.isYoung)
        return entry.keepingProtection(of: migration)
    }

    /// This entry with `other`'s PROT_NONE bit: the VMA protection an entry
    /// passes on to the entry that replaces it.
    @inlinable func keepingProtection(of other: PageTableEntry) -> PageTableEntry {
        other.isProtNone ? with(PageTableEntry.protNoneBit) : without(PageTableEntry.protNoneBit)
    }
}
