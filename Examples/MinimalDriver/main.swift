// The smallest device-memory driver: copy this file to start a prototype.
//
// It registers device-private memory (the emulated VRAM), migrates a buffer
// there with migrate_vma, and lets the CPU fault it back through migrateToRAM.
// Docs/writing-a-driver.md walks through it. Run: swift run minimal-driver
import SVMEmu
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A device with a pool of device-private pages. Like a real driver it sees
/// only what the kernel exports (the public SVMEmu API).
final class TinyDevice: @unchecked Sendable {
    let kernel: Kernel
    /// Our `pgmap_owner`: migrate_vma selects device pages only of this owner.
    let owner = DeviceOwner.unique()
    /// Free device pages (pfns). The kernel gives pages back through folioFree.
    private let freePfns = LockedValue<[UInt64]>([])
    let migrateToRAMCalls = Atomic<Int>(0)
    /// The device's page table (virtual page -> device pfn). Its lock is the
    /// one the notifier's invalidation takes: checking the sequence and
    /// mapping under it is what makes a mapping safe.
    let pageTable = LockedValue<[UInt64: UInt64]>([:])
    /// Tells us when the CPU's page table changes, so that the device drops
    /// its mappings (an MMU interval notifier over the whole address space).
    private(set) var notifier: MMUIntervalNotifier! = nil
    let mm: AddressSpace

    init(kernel: Kernel, mm: AddressSpace, bytes: UInt64) throws(Errno) {
        self.kernel = kernel
        self.mm = mm
        // RULE: a device-private pool needs an owner, folioFree and migrateToRAM,
        // or memremapPages throws EINVAL. Capture `self` weakly: the kernel keeps
        // the page map (and these closures) for as long as it lives.
        let ops = DevicePageMapOperations(
            folioFree: { [weak self] folio in
                // The last reference went: the page is ours again (free).
                self?.freePfns.withLock { $0.append(folio.pfn) }
            },
            migrateToRAM: { [weak self] vmf in self?.migrateToRAM(vmf) ?? .sigbus })
        let pgmap = try kernel.memremapPages(type: .private, owner: owner, bytes: bytes, operations: ops)
        // Pages of a new page map start free (reference count 0).
        freePfns.withLock { $0 = (0..<pgmap.pageCount).reversed().map { pgmap.startPfn + $0 } }
        // RULE: every invalidation takes the page-table lock, records its
        // sequence (setSeq) and drops the device's mappings of the range.
        // Our own migrations are skipped: we map their result ourselves.
        let owner = self.owner, pageTable = self.pageTable
        notifier = mm.insertIntervalNotifier(start: mm.baseAddress, end: mm.endAddress) { n, range, seq in
            if range.event == .migrate && range.owner == owner { return true }
            pageTable.withLock { t in
                n.setSeq(seq)
                t = t.filter { $0.key < range.start || $0.key >= range.end }
            }
            return true
        }
    }

    deinit { mm.removeIntervalNotifier(notifier) }

    /// Hands out a device page: zoneDevicePageInit takes its reference count
    /// from 0 to 1 and returns it LOCKED, as migrate_vma_pages requires.
    func allocatePage() -> Page? {
        guard let pfn = freePfns.withLock({ $0.popLast() }), let page = kernel.page(pfn: pfn) else { return nil }
        return kernel.zoneDevicePageInit(page)?.page(0)
    }

    /// Migrates `[start, start + pages * 4 KiB)` of `mm` to device memory.
    /// Returns how many pages moved (a page can be skipped, e.g. when its lock
    /// is held elsewhere; that is not an error, it just stays in RAM).
    func migrateToDevice(_ start: UInt64, pages: Int) throws(Errno) -> Int {
        // RULE: take the notifier sequence BEFORE setup. Any invalidation of
        // the range from now on (a MADV_DONTNEED, an munmap) changes it.
        let seq = notifier.readBegin()
        // RULE: hold the mmap lock (read) across setup, pages and finalize.
        mm.mmapReadLock()
        defer { mm.mmapReadUnlock() }
        guard let vma = mm.vma(containing: start) else { throw .badAddress }
        var args = MigrateVMA(vma: vma, start: start, end: start + UInt64(pages) << PageGeometry.pageShift,
                              flags: .system, pgmapOwner: owner)
        // 1. setup: the kernel collects the pages, takes a reference on each,
        //    LOCKS it, and replaces its mapping by a migration entry. CPU
        //    accesses to the range now wait. On a thrown error nothing changed:
        //    do not call pages or finalize.
        try kernel.migrateVMASetup(&args)
        // 2. allocate and copy: the DRIVER copies. src[i] with MIGRATE is ours
        //    to move; without VALID it is a hole or the zero page (no bytes:
        //    give a zeroed page). Leaving dst[i] empty keeps that page in RAM.
        for i in 0..<args.npages where args.src[i].isMigrating {
            guard let dst = allocatePage() else { break }  // out of VRAM: the rest stays
            if let src = kernel.page(args.src[i]) {
                dst.copyBytes(from: src)
            } else {
                dst.zeroBytes()
            }
            args.dst[i] = MigratePFN(page: dst)
        }
        // 3. pages: the kernel moves each page's identity to its destination.
        //    A page that still has other users loses MIGRATE here (not an error).
        kernel.migrateVMAPages(&args)
        var moved = 0
        for i in 0..<args.npages where args.src[i].isMigrating && args.dst[i].isValid { moved += 1 }
        // RULE: map in the device only under the page-table lock, and only if
        // no invalidation ran since readBegin. If one did, the pages it
        // zapped are freed by finalize: mapped now, the device would keep a
        // freed page. Map nothing then; a device access faults and maps what
        // hmm_range_fault reports, with the same check (MirrorDriver does that).
        let mapped = pageTable.withLock { t -> Bool in
            if notifier.readRetry(seq) { return false }
            for i in 0..<args.npages where args.src[i].isMigrating && args.dst[i].isValid {
                t[start + UInt64(i) << PageGeometry.pageShift] = args.dst[i].pfn
            }
            return true
        }
        if !mapped { print("an invalidation ran during the migration: nothing mapped in the device") }
        // 4. finalize: ALWAYS after a successful setup, even if nothing was
        //    copied. It maps destinations (or puts sources back), unlocks every
        //    page and drops the extra references. Exactly once.
        kernel.migrateVMAFinalize(&args)
        return moved
    }

    /// The CPU touched one of our pages. Called with the mmap lock held and a
    /// reference on `vmf.page`; under the trylock policies (the default) the
    /// fault path has also LOCKED `vmf.page` and will unlock it after we return.
    /// RULE: migrate the page or return `.sigbus`.
    func migrateToRAM(_ vmf: VMFault) -> VMFaultResult {
        migrateToRAMCalls.add(1, ordering: .relaxed)
        let start = vmf.address & PageGeometry.pageMask
        // faultPage tells setup the page is the one this fault holds.
        var args = MigrateVMA(vma: vmf.vma, start: start, end: start + PageGeometry.pageSize64,
                              flags: .devicePrivate, pgmapOwner: owner, faultPage: vmf.page)
        do { try kernel.migrateVMASetup(&args) } catch { return .sigbus }
        // Our notifier skipped this migration's invalidation (our owner):
        // drop the device's mapping ourselves, before the copy.
        if args.src[0].isMigrating { pageTable.withLock { $0[start] = nil } }
        if args.src[0].isMigrating, let src = kernel.page(args.src[0]) {
            // A system page from the kernel's allocator comes UNLOCKED:
            // RULE: lock it before migrateVMAPages.
            guard let folio = kernel.allocateFolio() else {
                kernel.migrateVMAFinalize(&args)  // puts the device page back
                return .oom
            }
            folio.lock()
            folio.page(0).copyBytes(from: src)
            args.dst[0] = MigratePFN(page: folio.page(0))
        }
        // src[0] without MIGRATE: someone else already migrated it; retrying
        // the access is all there is to do.
        kernel.migrateVMAPages(&args)
        kernel.migrateVMAFinalize(&args)
        return .done
    }
}

// MARK: - one scenario

/// Maps a buffer, migrates it to the device, reads it back from the CPU.
func scenario(_ kernel: Kernel) throws {
    let mm = try AddressSpace(kernel: kernel)  // a process (throws when the host refuses its page tables)
    let device = try TinyDevice(kernel: kernel, mm: mm, bytes: 8 << 20)

    let pages = 16
    let buffer = try mm.mmap(length: pages * PageGeometry.pageSize)
    try mm.fillPattern(buffer, length: pages * PageGeometry.pageSize, seed: 42)  // the CPU writes it
    print("buffer at 0x\(String(buffer, radix: 16)): \(mm.entry(at: buffer).entry)")

    let moved = try device.migrateToDevice(buffer, pages: pages)
    print("migrated \(moved) of \(pages) pages to the device: \(mm.entry(at: buffer).entry)"
          + ", \(device.pageTable.withLock { $0.count }) mapped in the device")

    // The CPU reads the buffer: each page faults into migrateToRAM and comes back.
    let bad = try mm.verifyPattern(buffer, length: pages * PageGeometry.pageSize, seed: 42)
    print("CPU read it back: \(bad == nil ? "bytes intact" : "BYTES DIFFER at 0x\(String(bad!, radix: 16))")"
          + ", migrateToRAM called \(device.migrateToRAMCalls.load(ordering: .relaxed)) times")
    print("now: \(mm.entry(at: buffer).entry), \(device.pageTable.withLock { $0.count }) mapped in the device")
    print(kernel.diagnostics.isEmpty ? "no rule broken" : "\(kernel.diagnostics.count) diagnostics")
    if bad != nil || !kernel.diagnostics.isEmpty { throw Errno.ioError }
}

var config = KernelConfiguration()
config.nodeSizes = [64 << 20]          // 64 MiB of system RAM
config.transparentHugepage = .never    // 4 KiB pages only
config.addressSpaceSize = 1 << 30
config.maxPhysicalBytes = 1 << 30
config.printDiagnostics = true         // show any rule we break, as it happens
// A global: the machine outlives every address space and device made on it.
// Booting throws HostMemoryRefusal when the host refuses the machine's memory.
let kernel: Kernel
do { kernel = try Kernel(booting: config) } catch { print("minimal-driver: \(error)"); exit(1) }
do { try scenario(kernel) } catch { print("minimal-driver failed: \(error)"); exit(1) }
