import CSVMSupport

// The unmap step shared by migrate_vma_setup() and eviction
// (`migrate_device_unmap()`), the reference check, and the rmap walks that
// install and remove migration entries. The reference rules are on
// `migrateDeviceUnmap`.
extension Kernel {

    /// The unmap step of ``Kernel/migrateVMASetup(_:)``: `migrateDeviceUnmap`
    /// over the collected entries, with the fault page of `args`.
    func migrateVMAUnmap(_ args: inout MigrateVMA) {
        args.cpages = migrateDeviceUnmap(&args.src, args.npages, faultPage: args.faultPage,
                                         faultPageLocked: args.faultPageLocked == true, mm: args.vma?.mm)
    }

    /// Unmaps the collected pages and keeps only those nobody else holds
    /// (`migrate_device_unmap()`). Returns how many entries still migrate (holes included).
    ///
    /// On entry each collected page holds one extra reference (from collect,
    /// or from `migrate_device_pfn_lock`) and is locked; the caller holds no
    /// page-table lock. System folios trade that reference for the
    /// LRU-isolation one. A page that is still mapped, or holds more
    /// references than its mappings explain, loses MIGRATE; the restore pass
    /// then puts its mapping back, unlocks it (not the fault folio: the fault
    /// path owns that lock) and drops the extra reference. On return every
    /// entry with MIGRATE and a page is locked, unmapped and holds the
    /// migration's one extra reference; the others are empty or holes.
    func migrateDeviceUnmap(_ src: inout [MigratePFN], _ npages: Int, faultPage: Page?, faultPageLocked: Bool,
                            mm hint: AddressSpace? = nil) -> Int {
        let faultFolio = faultPageLocked ? faultPage?.folio : nil
        var restore = 0
        var unmapped = 0
        for i in 0..<npages {
            guard let page = page(src[i]) else {
                if src[i].isMigrating { unmapped += 1 }
                continue
            }
            let folio = page.folio
            if !folio.isZoneDevice {
                guard isolateLRU(folio) else {
                    src[i] = src[i].without(MigratePFN.migrateBit)
                    restore += 1
                    continue
                }
                folio.put()  // the collect reference; isolation holds one now
            }
            if folio.isMapped { tryToMigrate(folio, hint: hint) }
            if folio.isMapped || !migrateVMACheckPage(page, faultPage: faultPage) {
                if !folio.isZoneDevice {
                    folio.get()
                    putbackLRU(folio)
                }
                src[i] = src[i].without(MigratePFN.migrateBit)
                restore += 1
                continue
            }
            unmapped += 1
        }
        var i = 0
        while i < npages && restore > 0 {
            defer { i += 1 }
            guard let page = page(src[i]), !src[i].isMigrating else { continue }
            let folio = page.folio
            removeMigrationPTEs(folio, folio, hint: hint)
            src[i] = .empty
            if folio != faultFolio { folio.unlock() }
            folio.put()
            restore -= 1
            vmstat.count(.migrateVMARestored)
        }
        return unmapped
    }

    /// Whether only the expected references are held (`migrate_vma_check_page()`):
    /// the caller's one, the fault path's one for the fault page, one more for
    /// ZONE_DEVICE pages (kept from the days free device pages held one), and a
    /// page-cache one for shared memory. Large folios always fail.
    /// Caller holds the folio lock, so no mapping can be added meanwhile.
    func migrateVMACheckPage(_ page: Page, faultPage: Page?) -> Bool {
        let folio = page.folio
        var extra = 1 + (page == faultPage ? 1 : 0)
        if folio.isZoneDevice { extra += 1 }
        if folio.test(.shmem) { extra += 1 }
        return folio.refCount - extra <= folio.mapCount
    }

    /// `folio_isolate_lru()`: takes the folio off the LRU with a reference.
    /// Returns false (no reference taken) when the folio was not on the LRU.
    func isolateLRU(_ folio: Folio) -> Bool {
        let old = folio.atomicFlags.bitwiseAnd(~PageFlags.lru.rawValue, ordering: .acquiringAndReleasing).oldValue
        guard old & PageFlags.lru.rawValue != 0 else { return false }
        folio.get()
        return true
    }

    /// `folio_putback_lru()`: back on the LRU; consumes the caller's
    /// isolation reference.
    func putbackLRU(_ folio: Folio) {
        folio.set(.lru)
        folio.put()
    }

    /// `try_to_migrate()`: replace every remaining mapping of the folio's pages
    /// by a migration entry, dropping the rmap and the mapping's reference;
    /// the anon rmap walk (`rmapWalkAnon`) finds each fork relative's
    /// mapping at the address its own VMA gives the page.
    /// Caller holds the folio lock and a reference, and no page-table lock;
    /// each PTE is rewritten under its PTE lock inside an MMU_NOTIFY_CLEAR
    /// invalidation, the lock dropped before the TLB flush. With `batch`
    /// (TTU_BATCH_FLUSH, used by migratePages) PTE ranges are gathered there
    /// instead of flushed.
    func tryToMigrate(_ folio: Folio, hint: AddressSpace? = nil, batch: UnsafeMutablePointer<UnmapFlushBatch>? = nil) {
        if folio.entireMapCount > 0 { tryToMigratePMD(folio, hint: hint) }
        if folio.test(.pageCache) {
            // rmap_walk_file(): every VMA of the file that maps the page.
            for i in 0..<folio.pageCount where folio.page(i).mapCount > 0 {
                let page = folio.page(i)
                rmapWalkFile(page) { mm, address in Kernel.tryToMigrateOne(folio, page, mm, address, batch) }
            }
            return
        }
        rmapWalkAnon(folio, pages: 0..<folio.pageCount, hint: hint) { i, mm, address in
            let page = folio.page(i)
            if page.mapCount > 0 { Kernel.tryToMigrateOne(folio, page, mm, address, batch) }
        }
    }

    /// `try_to_migrate_one()` for one PTE-mapped page at `address` in `mm`.
    /// We enter with no page-table lock and return with the PTE lock dropped
    /// and, when the entry still mapped the page, the mapping's reference
    /// dropped.
    @inline(never)  // called with a borrowed mm: no retain per page
    private static func tryToMigrateOne(_ folio: Folio, _ page: Page, _ mm: AddressSpace, _ address: UInt64,
                                 _ batch: UnsafeMutablePointer<UnmapFlushBatch>? = nil) {
        // MMU notifiers (MMU_NOTIFY_CLEAR) hear of it first.
        let range = MMUNotifierRange(start: address, end: address + PageGeometry.pageSize64, event: .clear, owner: nil)
        mm.invalidateRangeStart(range)
        defer { mm.invalidateRangeEnd(range) }
        let unmapped: PageTableEntry? = mm.withPTL(address) {
        let seen = mm.loadPTE(address)
        guard mm.loadPMD(address).kind == .table && (seen.kind == .present || seen.kind == .devicePrivate || seen.kind == .deviceExclusive)
                && seen.pfn == page.pfn else {
                return nil
        }
        // ptep_get_and_clear(): a present entry's accessed and dirty bits are
        // what the exchange returns, not what the load saw.
        let pte = seen.kind == .present ? mm.exchangePTE(address, .none) : seen
        let exclusive = page.isAnonExclusive
        if exclusive { page.meta.clearFlags(PageFlags.anonExclusive.rawValue) }
        if pte.kind == .present && pte.isDirty { folio.markDirty() }
        mm.storePTE(address, PageTableEntry.migration(pfn: page.pfn, write: pte.isWrite, readExclusive: !pte.isWrite && exclusive,
                                                      dirty: pte.kind == .present && pte.isDirty, young: pte.kind == .present && pte.isYoung)
                                .keepingProtection(of: pte))
        mm.removeRmap(page: page)
            return pte
        }
        guard let pte = unmapped else { return }
        if pte.kind == .present {
            // A read-only entry whose write-protect still waits for its flush
            // (mprotect, fork) may be writable in some CPU's TLB: it does
            // not let the folio's flush be deferred (mm_tlb_flush_pending()).
            if let batch { batch.pointee.add(mm, address, address + PageGeometry.pageSize64, writable: pte.isWrite || mm.tlbFlushPending) }
            else { mm.flushTLBRange(address, address + PageGeometry.pageSize64) }
        }
        folio.put()
    }

    /// `remove_migration_ptes(src, dst)`: every migration entry of `src`'s pages
    /// becomes a mapping of the matching page of `dst` (device-private entry for
    /// a device-private `dst`), each mapping taking a reference on `dst`.
    /// Caller holds the folio locks of `src` and `dst` and no page-table lock.
    func removeMigrationPTEs(_ src: Folio, _ dst: Folio, hint: AddressSpace? = nil) {
        if src.isLarge && dst.isLarge && removeMigrationPMD(src, dst, hint: hint) { return }
        let count = min(src.pageCount, dst.pageCount)
        if dst.test(.pageCache) {
            // rmap_walk_file() over the mapping `dst` holds: after a
            // migration the new folio took the old one's place in the cache
            // (the old one forgot its mapping); on a restore dst is src.
            for i in 0..<count {
                let page = src.page(i)
                rmapWalkFile(dst.page(i)) { mm, address in Kernel.removeMigrationPTE(page, dst, dst.page(i), mm, address, file: true) }
            }
            return
        }
        rmapWalkAnon(src, pages: 0..<count, hint: hint) { i, mm, address in
            Kernel.removeMigrationPTE(src.page(i), dst, dst.page(i), mm, address)
        }
    }

    /// `remove_migration_pte()` for one page: its migration entry at `address`
    /// becomes a mapping of `newPage` (of `dst`), which takes a reference
    /// and an anonymous rmap, or with `file` a file rmap.
    /// We enter with no page-table lock and return with the PTE lock dropped.
    @inline(never)  // called with a borrowed mm: no retain per page
    private static func removeMigrationPTE(_ page: Page, _ dst: Folio, _ newPage: Page, _ mm: AddressSpace, _ address: UInt64,
                                    file: Bool = false) {
        mm.withPTL(address) {
        let pte = mm.loadPTE(address)
            guard mm.loadPMD(address).kind == .table, pte.kind == .migration, pte.pfn == page.pfn else { return }
        dst.get()
        let entry = PageTableEntry.replacing(migration: pte, with: dst, pfn: newPage.pfn)
        if file { mm.addFileRmap(page: newPage) } else {
            mm.addAnonRmap(page: newPage, address: address, exclusive: pte.isWrite || pte.isReadExclusive)
        }
        mm.storePTE(address, entry)
        }
    }
}
