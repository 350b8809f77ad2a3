import CSVMSupport

// migrate_vma_setup(): argument checks, the collect walk (Collect.swift,
// Compound.swift) and the unmap step (Unmap.swift). The protocol and its
// contract are documented on `migrateVMASetup(_:)`.
extension Kernel {

    /// Prepares the migration of a virtual range: collects, locks and unmaps
    /// every page of `[args.start, args.end)` that `args.flags` selects.
    ///
    /// A migration over a virtual range is four steps, the same whichever way
    /// the pages move (system RAM to device memory from a GPU fault, device
    /// memory back to RAM from `migrateToRAM`):
    ///
    /// 1. **Setup** (this function). The walk visits every base page of the
    ///    range under an MMU-notifier invalidation of kind
    ///    ``MMUNotifyEvent/migrate`` carrying `args.pgmapOwner`, so the
    ///    driver's own notifier can tell its own migration apart. A selected
    ///    page gets a reference, its folio lock (trylock: a page locked
    ///    elsewhere is skipped) and a migration entry in place of its mapping;
    ///    the TLB flush for the range is accounted. A hole (no page yet, or
    ///    the zero page with ``MigrateSelect/system``) in an anonymous VMA is
    ///    reported as ``MigratePFN/hole`` so the driver may fill it. The
    ///    unmap step then isolates system folios from the LRU, unmaps any
    ///    mapping left through the reverse map, and checks that nobody else
    ///    holds a reference; a page that fails gets its mapping back, is
    ///    unlocked and released, and its entry is cleared. What remains is
    ///    `src[i]` with ``MigratePFN/isMigrating`` set: the pages this
    ///    migration owns. With ``MigrateSelect/compound`` a whole 2 MiB folio
    ///    (or an aligned 2 MiB hole) is one compound entry followed by 511
    ///    empty ones.
    /// 2. **Allocate and copy** (the driver). For each entry with MIGRATE set,
    ///    the driver may allocate a destination, copy the source's bytes into
    ///    it (and wait for the copy engine), and set `dst[i]` to
    ///    `MigratePFN(page:)` of the destination. Destinations must be locked:
    ///    ``Kernel/zoneDevicePageInit(_:order:)`` returns device pages locked;
    ///    system folios from ``Kernel/allocateFolio(order:node:zeroed:blocking:)`` need
    ///    ``Folio/lock(file:line:)``. An entry the driver leaves empty stays where it
    ///    is; a driver moving device-private pages back to RAM migrates every
    ///    one it can, since the CPU cannot reach a page left behind (its
    ///    fault retries).
    /// 3. **Pages** (``Kernel/migrateVMAPages(_:)``): the source's identity
    ///    moves to the destination, or the hole is filled. MIGRATE still set
    ///    on `src[i]` afterwards is the only sign of success. Both pages are
    ///    still locked and the mmap lock is still held, so the driver may now
    ///    update its device page table for the entries that succeeded.
    /// 4. **Finalize** (``Kernel/migrateVMAFinalize(_:)``): each migration
    ///    entry becomes a mapping of the destination (success) or of the
    ///    source (failure); both are unlocked and the migration's references
    ///    are dropped.
    ///
    /// On entry the caller holds the mmap lock of `args.vma`'s address space
    /// (read or write; an unlocked call is reported as a diagnostic) and keeps
    /// it until ``Kernel/migrateVMAFinalize(_:)`` returns. With
    /// `args.faultPage` set (a call from `migrateToRAM`), that page is the
    /// device-private page the CPU fault is migrating: under the trylock
    /// policies the fault path already holds its folio lock and a reference,
    /// and keeps both (finalize does not unlock it); under
    /// ``DeviceFaultPolicy/legacy`` the fault path holds only a reference and
    /// collect trylocks the page like any other.
    ///
    /// On return, `args.npages` entries were walked and `args.cpages` of them
    /// were collected (a compound entry counts once). Every `src[i]` with
    /// MIGRATE and a VALID pfn names a page that is locked, unmapped (a
    /// migration entry stands in each of its mappings, so CPU faults on it
    /// wait) and holds one extra reference that the migration owns until
    /// finalize drops it. `dst` is left as the caller prepared it (cleared by
    /// ``MigrateVMA/prepare(vma:start:end:flags:pgmapOwner:faultPage:)``).
    /// ``Kernel/migrateVMAFinalize(_:)`` must follow every successful setup,
    /// even one that collected nothing.
    ///
    /// - Parameters:
    ///   - args: the range, selection and owner, and `src`/`dst` arrays with
    ///     at least one entry per base page of the page-aligned range;
    ///     `src`, `cpages` and `npages` are filled in.
    /// - Throws: ``Errno/invalidArgument`` (`-EINVAL`), with nothing changed,
    ///   when `args.vma` is nil, unmapped, hugetlb, or a special (VM_PFNMAP / VM_IO / VM_MIXEDMAP)
    ///   mapping; the range is empty; `start` or `end` lies outside the VMA;
    ///   `src` or `dst` holds fewer entries than the page-aligned range has
    ///   pages (an unaligned start is masked down, which can add a page);
    ///   `faultPage` is not a device-private page; `faultPage` is not locked
    ///   under the trylock policies (legacy kernels did not check); or these
    ///   arguments were set up before and not finalized (also a diagnostic).
    ///
    /// The corresponding kernel function is `migrate_vma_setup()`.
    public func migrateVMASetup(_ args: inout MigrateVMA) throws(Errno) {
        let pageCount = Int64(bitPattern: args.end &- args.start) >> PageGeometry.pageShift
        args.start &= PageGeometry.pageMask
        args.end &= PageGeometry.pageMask
        // VM_SPECIAL: VM_IO | VM_PFNMAP | VM_MIXEDMAP (| VM_DONTEXPAND); and VM_HUGETLB.
        guard let vma = args.vma, vma.isLive, vma.flags.isDisjoint(with: [.special, .hugetlb, .mixedMap]) else {
            throw .invalidArgument
        }
        guard pageCount > 0 else { throw .invalidArgument }
        guard args.start >= vma.start, args.start < vma.end else { throw .invalidArgument }
        guard args.end > vma.start, args.end <= vma.end else { throw .invalidArgument }
        // The walk covers the masked range, which is a page longer than
        // pageCount when start was unaligned: src and dst must hold every
        // page the walk visits.
        let walked = Int((args.end - args.start) >> PageGeometry.pageShift)
        guard args.src.count >= walked, args.dst.count >= walked else { throw .invalidArgument }
        // Legacy kernels (v6.1-v6.14) did not lock the fault page in the PTE
        // fault path; collect trylocked it like any other page. Whether the
        // fault path holds it comes with the VMFault; without one, the
        // policy's contract says.
        let faultPageLocked = args.faultPageLocked ?? (deviceFaultPolicy != .legacy)
        if let fp = args.faultPage {
            guard fp.folio.isDevicePrivate else { throw .invalidArgument }
            if faultPageLocked && !fp.folio.isLocked { throw .invalidArgument }
        }
        if args.phase == .setUp || args.phase == .pagesDone {
            warn("migrate_vma_setup: previous migration of these arguments was not finalized (call migrate_vma_finalize first)",
                 "range 0x\(String(args.start, radix: 16))")
            throw .invalidArgument
        }
        if !vma.mm.isMmapLocked {
            warn("migrate_vma_setup: caller must hold the mmap lock (mmap_assert_locked)", "\(vma)", kind: .lockNotHeld)
        }
        args.faultPageLocked = args.faultPage != nil && faultPageLocked
        for i in 0..<walked { args.src[i] = .empty }
        args.cpages = 0
        args.npages = 0
        args.phase = .setUp
        // A fault's migration (migrate_to_ram): the kernel's own code from the
        // fault's page reference to the collect's PMD (the driver's callback,
        // this setup, the notifier, the walk), the machine's measured span
        // (0 without a profile that has it).
        if args.faultPage != nil, _slowPath(svm_det_active()) {
            DeterministicScheduler.charge(\.referenceToCollect, "migrate_to_ram to its collect")
        }
        let t = phases.begin()
        migrateVMACollect(&args, vma)
        if args.cpages > 0 {
            vmstat.count(.migrateVMACollected, UInt64(args.cpages))
            let u = phases.endAndBegin(.collect, t)
            migrateVMAUnmap(&args)
            phases.end(.unmap, u)
        } else {
            phases.end(.collect, t)
        }
    }
}
