import Foundation
import Synchronization
import Testing
import SVMEmu
import MirrorDriver
import TestSupport

/// A small machine for one test: two 64 MiB nodes, one address space, one
/// device; the caller owns it (no teardown audit: use ``withMachine`` for that).
func bootMachine(policy: DeviceFaultPolicy = .trylock, thp: TransparentHugepageMode = .never,
                 vram: UInt64 = 64 << 20) throws -> (Kernel, AddressSpace, MirrorDevice) {
    let options = TestMachineOptions(thp: thp, policy: policy, vram: vram)
    let kernel = try Kernel(booting: options.configuration)
    let mm = try AddressSpace(kernel: kernel)
    let device = try MirrorDevice(kernel: kernel, mm: mm, vramBytes: vram, chunkBytes: options.chunkBytes)
    return (kernel, mm, device)
}

// MARK: - helpers of the migrate_vma suites

let pageSize = PageGeometry.pageSize

/// Boots a ``TestMachine`` like `bootMachine` and runs `body`; teardown
/// releases the device, then the address space, and audits the kernel.
func withMachine<R>(policy: DeviceFaultPolicy = .trylock, vram: UInt64 = 64 << 20, audits: Bool = true,
                    sourceLocation: SourceLocation = #_sourceLocation,
                    _ body: (Kernel, AddressSpace, MirrorDevice) throws -> R) throws -> R {
    let options = TestMachineOptions(thp: .never, policy: policy, vram: vram, audits: audits)
    return try TestMachine.run(options, sourceLocation: sourceLocation) { m in try body(m.kernel, m.mm, m.device) }
}

/// The folio mapped by the PTE at `address` (present or device-private), or nil.
func folio(_ kernel: Kernel, _ mm: AddressSpace, _ address: UInt64) -> Folio? {
    let e = mm.entry(at: address).entry
    guard e.kind == .present || e.kind == .devicePrivate || e.kind == .migration else { return nil }
    return kernel.page(pfn: e.pfn)?.folio
}

/// What a refused or partial migration must leave alone, page by page: the
/// page-table entry and its folio's reference count, map count and lock bit.
struct RangeSnapshot: Equatable, CustomStringConvertible {
    struct PageState: Equatable {
        var entry: UInt64
        var ref: Int
        var map: Int
        var locked: Bool
    }
    var pages: [PageState]
    var freePages: UInt64

    init(_ kernel: Kernel, _ mm: AddressSpace, _ start: UInt64, pages count: Int) {
        pages = (0..<count).map { i in
            let a = start + UInt64(i * pageSize)
            let e = mm.entry(at: a).entry
            let f = (e.kind == .present && !e.isSpecial) || e.kind == .devicePrivate ? kernel.page(pfn: e.pfn)?.folio : nil
            return PageState(entry: e.rawValue, ref: f?.refCount ?? -1, map: f?.mapCount ?? -1, locked: f?.isLocked ?? false)
        }
        freePages = kernel.freePages
    }
    var description: String { "\(pages.count) pages, free \(freePages)" }
}

/// Every mapped folio of the range is unlocked and holds exactly one
/// reference per mapping (no reference or lock leaked by a migration).
func noLeaks(_ kernel: Kernel, _ mm: AddressSpace, _ start: UInt64, pages count: Int,
             sourceLocation: SourceLocation = #_sourceLocation) {
    for i in 0..<count {
        let a = start + UInt64(i * pageSize)
        let e = mm.entry(at: a).entry
        guard (e.kind == .present && !e.isSpecial) || e.kind == .devicePrivate, let f = kernel.page(pfn: e.pfn)?.folio else { continue }
        #expect(!f.isLocked, "page \(i) (\(e)) is still locked", sourceLocation: sourceLocation)
        #expect(f.refCount == f.mapCount, "page \(i): \(f) holds a reference its mappings do not explain", sourceLocation: sourceLocation)
    }
}

/// Bytes a CPU would read from `fillPattern(address, 4096, seed)`, computed
/// in a scratch address space of the same kernel.
func expectedPattern(_ kernel: Kernel, _ address: UInt64, length: Int, seed: UInt64) throws -> [UInt8] {
    let scratch = try AddressSpace(kernel: kernel)
    let a = try scratch.mmap(address: address & PageGeometry.pageMask, length: PageGeometry.pageAlign(length + PageGeometry.pageSize))
    _ = a
    try scratch.fillPattern(address, length: length, seed: seed)
    return try scratch.read(address, count: length)
}

/// A migration to `device`'s VRAM done by hand with the kernel API, the way a
/// driver does it: setup (mmap lock held), a locked device page and a copy for
/// each collected entry for which `give(i)` is true, pages, finalize.
/// Returns the arguments after finalize (src tells what migrated) and the
/// MIGRATE bits as setup left them.
@discardableResult
func migrateByHand(_ kernel: Kernel, _ mm: AddressSpace, _ device: MirrorDevice, _ start: UInt64, pages: Int,
                   give: (Int) -> Bool = { _ in true }) throws -> (args: MigrateVMA, collected: [MigratePFN]) {
    mm.mmapReadLock()
    defer { mm.mmapReadUnlock() }
    var args = MigrateVMA(vma: mm.vma(containing: start), start: start, end: start + UInt64(pages * pageSize),
                          flags: .system, pgmapOwner: device.owner)
    try kernel.migrateVMASetup(&args)
    let collected = Array(args.src[0..<args.npages])
    for i in 0..<args.npages where args.src[i].isMigrating && give(i) {
        let d = try #require(device.allocateDeviceFolio())
        if let s = kernel.page(args.src[i]) {
            d.page(0).copyBytes(from: s)
        } else {
            d.zeroBytes()
        }
        args.dst[i] = MigratePFN(page: d.page(0))
    }
    kernel.migrateVMAPages(&args)
    kernel.migrateVMAFinalize(&args)
    return (args, collected)
}
