import CSVMSupport

/// migrate_vma_setup(): argument checks, then collect (walk the range, take a
/// reference on and lock each candidate, replace its mapping by a migration
/// entry), then unmap (see Unmap.swift).
///
/// Contract for the caller (the driver): hold the mmap lock of `vma.mm` for
/// reading; with `faultPage` (called from `migrateToRAM`), that page is locked
/// by the fault path (trylock policies). On return every entry with MIGRATE
/// and a page is locked, holds one extra reference owned by the migration, and
/// is unmapped (migration entries in the page tables).
extension Kernel {

    /// Prepares a migration of `[args.start, args.end)`.
    ///
    /// - Throws: `.invalidArgument` when: there is no VMA or it is special;
    ///   the range is empty; start or end lies outside the VMA; `src` or `dst`
    ///   holds fewer entries than the page-aligned range has pages (an
    ///   unaligned start is masked down, which can add a page); `faultPage` is not a
    ///   device-private page; `faultPage` is not locked (trylock policies; the
    ///   legacy kernels did not check). Nothing changes then.
    /// The corresponding kernel function is `migrate_vma_setup()`.
    public func migrateVMASetup(_ args: inout MigrateVMA) throws(Errno) {
        let pageCount = Int64(bitPattern: args.end &- args.start) >> PageGeometry.pageShift
        args.start &= PageGeometry.pageMask
        args.end &= PageGeometry.pageMask
        guard let vma = args.vma, vma.isLive, !vma.flags.contains(.special) else { throw .invalidArgument }
        guard pageCount > 0 else { throw .invalidArgument }
        guard args.start >= vma.start, args.start < vma.end else { throw .invalidArgument }
        guard args.end > vma.start, args.end <= vma.end else { throw .invalidArgument }
        // The walk covers the masked range, which is a page longer than
        // pageCount when start was unaligned: src and dst must hold every
        // page the walk visits.
        let walked = Int((args.end - args.start) >> PageGeometry.pageShift)
        guard args.src.count >= walked, args.dst.count >= walked else { throw .invalidArgument }
        // Legacy kernels (v6.1-v6.14) did not lock the fault page in the fault
        // path; collect trylocked it like any other page. The PMD-level device
        // fault always locks it, so under the legacy policy the fault path
        // says whether it holds the lock (a per-thread note set around
        // migrate_to_ram).
        var legacy = deviceFaultPolicy == .legacy
        if let fp = args.faultPage {
            guard fp.folio.isDevicePrivate else { throw .invalidArgument }
            if legacy && svm_fault_locked_folio() == fp.folio.pfn { legacy = false }
            if !legacy && !fp.folio.isLocked { throw .invalidArgument }
        }
        if args.phase == .setUp || args.phase == .pagesDone {
            warn("migrate_vma_setup: previous migration of these arguments was not finalized (call migrate_vma_finalize first)",
                 "range 0x\(String(args.start, radix: 16))")
            throw .invalidArgument
        }
        if !vma.mm.isMmapLocked {
            warn("migrate_vma_setup: caller must hold the mmap lock (mmap_assert_locked)", "\(vma)")
        }
        args.legacyFaultPage = legacy
        for i in 0..<walked { args.src[i] = .empty }
        args.cpages = 0
        args.npages = 0
        args.phase = .setUp
        let t = phases.begin()
        migrateVMACollect(&args, vma)
        if args.cpages > 0 {
            let u = phases.endAndBegin(.collect, t)
            migrateVMAUnmap(&args)
            phases.end(.unmap, u)
        } else {
            phases.end(.collect, t)
        }
    }
}
