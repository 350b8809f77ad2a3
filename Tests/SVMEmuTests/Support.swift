import Foundation
import Synchronization
import Testing
@testable import SVMEmu
import TestSupport

// Shared helpers of the memory-core tests: a small machine per test, bounded
// thread runs (TestSupport), and snapshots of the state a failed call must leave alone.

let pageSize = PageGeometry.pageSize
let hugeSize = PageGeometry.pmdSize

/// The options of the memory-core tests' machine: two 64 MiB nodes, the
/// given THP mode, no device.
func machineOptions(thp: TransparentHugepageMode = .madvise) -> TestMachineOptions {
    TestMachineOptions(thp: thp, maxPhysicalBytes: 1 << 30)
}

/// A kernel for one test that manages its own address spaces (no teardown audit).
func makeKernel(thp: TransparentHugepageMode = .madvise) throws -> Kernel {
    try Kernel(booting: machineOptions(thp: thp).configuration)
}

/// Boots a ``TestMachine`` (a kernel with one address space) and runs
/// `body`; teardown releases the address space and audits the kernel.
func withMachine<R>(thp: TransparentHugepageMode = .madvise, audits: Bool = true,
                    sourceLocation: SourceLocation = #_sourceLocation,
                    _ body: (Kernel, AddressSpace) throws -> R) throws -> R {
    var options = machineOptions(thp: thp)
    options.audits = audits
    return try TestMachine.run(options, sourceLocation: sourceLocation) { m in try body(m.kernel, m.mm) }
}

/// The kernel's own paths never leave a stale translation behind.
func expectNoStaleTLBAccess(_ kernel: Kernel, sourceLocation: SourceLocation = #_sourceLocation) {
    kernel.expectNoStaleTLBAccess(sourceLocation: sourceLocation)
}

/// What a failed call must not change: the VMAs and every counter.
struct StateSnapshot: Equatable {
    var vmas: [String]
    var vmstat: [String: UInt64]
    var freePages: UInt64

    init(_ kernel: Kernel, _ mm: AddressSpace) {
        vmas = mm.mappings.map(\.description)
        vmstat = kernel.vmstat.snapshot()
        freePages = kernel.freePages
    }
}

/// A byte unique to (address, seed), for pattern checks of single bytes.
func patternByte(_ address: UInt64, _ seed: UInt8) -> UInt8 {
    UInt8(truncatingIfNeeded: (address >> PageGeometry.pageShift) &* 31 &+ (address & ~PageGeometry.pageMask) &* 7) &+ seed
}

/// Writes one distinct byte at offset `offset` of every page of the range.
func stampPages(_ mm: AddressSpace, _ start: UInt64, pages: Int, offset: UInt64 = 123, seed: UInt8 = 1) throws {
    for i in 0..<pages {
        let a = start + UInt64(i * pageSize) + offset
        try mm.store(a, patternByte(a, seed))
    }
}

/// Whether every page of the range still holds the byte `stampPages` wrote.
func stampsIntact(_ mm: AddressSpace, _ start: UInt64, pages: Int, offset: UInt64 = 123, seed: UInt8 = 1) throws -> Bool {
    for i in 0..<pages {
        let a = start + UInt64(i * pageSize) + offset
        if try mm.load(a) != patternByte(a, seed) { return false }
    }
    return true
}

/// The page mapped at `address` (PTE or inside a PMD mapping), or nil.
func mappedPage(_ kernel: Kernel, _ mm: AddressSpace, _ address: UInt64) -> Page? {
    let (level, e) = mm.entry(at: address)
    guard e.kind == .present else { return nil }
    let pfn = level == .pmd ? e.pfn + ((address & ~PageGeometry.pmdMask) >> PageGeometry.pageShift) : e.pfn
    return kernel.page(pfn: pfn)
}

/// Whether every byte of the range reads as zero.
func allZero(_ mm: AddressSpace, _ start: UInt64, length: Int) throws -> Bool {
    let bytes = try mm.read(start, count: length)
    return bytes.allSatisfy { $0 == 0 }
}

func delta(_ before: [String: UInt64], _ kernel: Kernel, _ item: VMStatItem) -> Int64 {
    Int64(kernel.vmstat[item]) - Int64(before[item.name] ?? 0)
}
