import Synchronization
import Testing
import SVMEmu
import GPUSVM
import XeDriver
import TestSupport

/// A bare GPU SVM over one address space, with an invalidation callback
/// that does what every driver must (unmap the pages of every range the
/// invalidation overlaps, mark unmapped ranges) and counts its calls.
final class BareSVM: @unchecked Sendable {
    /// The machine (a ``TestMachine`` of one 32 MiB node, no device).
    let machine: TestMachine
    let kernel: Kernel
    var mm: AddressSpace!
    var svm: GPUSVM!
    final class Counter: Sendable { let n = Atomic<Int>(0) }
    let invalidationCount = Counter()
    var invalidations: Int { invalidationCount.n.load(ordering: .relaxed) }

    init(chunks: [UInt64] = XeDevice.defaultChunkSizes) throws {
        machine = try TestMachine(TestMachineOptions(nodeSizes: [32 << 20], maxPhysicalBytes: 512 << 30))
        kernel = machine.kernel
        mm = machine.mm
        let count = invalidationCount
        svm = try GPUSVM(name: "bare", mm: mm, devicePrivateOwner: nil, mmStart: mm.baseAddress,
                         mmRange: mm.endAddress - mm.baseAddress, notifierSize: 512 << 20, chunkSizes: chunks,
                         operations: GPUSVMOperations { svm, notifier, mmuRange in
                             count.n.add(1, ordering: .relaxed)
                             var ctx = GPUSVMContext()
                             ctx.inNotifier = true
                             for r in svm.ranges(in: notifier, max(notifier.start, mmuRange.start), min(notifier.end, mmuRange.end)) {
                                 svm.rangeUnmapPages(r, context: ctx)
                                 if mmuRange.event == .unmap { svm.rangeSetUnmapped(r, mmuRange) }
                             }
                         })
    }

    /// A VMA of `length` bytes at a `align`-aligned address (plus `offset`).
    func mapAligned(_ length: Int, align: Int = 2 << 20, offset: Int = 0) throws -> UInt64 {
        let reserve = try mm.mmap(length: length + align + offset)
        let start = (reserve + UInt64(align) - 1) & ~UInt64(align - 1) + UInt64(offset)
        try mm.munmap(reserve, length: length + align + offset)
        try mm.mmap(address: start, length: length)
        return start
    }

    func findOrInsert(_ address: UInt64, gpuvaEnd: UInt64? = nil) throws(Errno) -> GPUSVMRange {
        try svm.rangeFindOrInsert(faultAddress: address, gpuvaStart: mm.baseAddress, gpuvaEnd: gpuvaEnd ?? mm.endAddress,
                                  context: GPUSVMContext())
    }

    func teardown() {
        svm.fini()
        svm = nil
        mm = nil
        machine.tearDown()
        #expect(kernel.diagnostics.isEmpty, "\(kernel.diagnostics)")
    }
}

/// The layer itself (drm_gpusvm): range sizing, the notifier sequence, the
/// garbage collector of partially unmapped ranges, eviction.
@Suite("GPU SVM layer")
struct GPUSVMTests {

    @Test("a new range is the largest chunk that fits the VMA, the GPU VA window and no existing range")
    func rangeSizing() throws {
        let s = try BareSVM()
        defer { s.teardown() }
        // A 2 MiB aligned VMA of 2 MiB: one 2 MiB range.
        let a = try s.mapAligned(2 << 20)
        let r1 = try s.findOrInsert(a + 0x1234)
        #expect(r1.start == a && r1.size == 2 << 20)
        #expect(try s.findOrInsert(a + (1 << 20)) === r1, "find: the same range")
        // 1 MiB starting 64 KiB past a 2 MiB boundary: 2 MiB does not fit the VMA, 64 KiB does.
        let b = try s.mapAligned(1 << 20, offset: 64 << 10)
        let r2 = try s.findOrInsert(b + (200 << 10))
        #expect(r2.size == 64 << 10 && r2.start == b + (192 << 10))
        // The GPU VA window ends 8 KiB into a VMA: only 4 KiB chunks fit there.
        let c = try s.mapAligned(2 << 20)
        let r3 = try s.findOrInsert(c, gpuvaEnd: c + 8192)
        #expect(r3.size == 4096)
        // A 2 MiB block overlapping the 4 KiB range: the next fault in it gets 64 KiB, beside it.
        let r4 = try s.findOrInsert(c + (1 << 20))
        #expect(r4.size == 64 << 10 && r4.start == c + (1 << 20))
        // And the first 64 KiB block, which holds the 4 KiB range, gives 4 KiB.
        let r5 = try s.findOrInsert(c + 16384)
        #expect(r5.size == 4096 && r5.start == c + 16384)
        // No VMA: noEntry, nothing inserted.
        let hole = try s.mm.mmap(length: 4096)
        try s.mm.munmap(hole, length: 4096)
        #expect(throws: Errno.noEntry) { try s.findOrInsert(hole) }
    }

    @Test("get_pages retries from a new sequence when an invalidation races it: the pages it records are the ones after")
    func sequenceRetry() throws {
        let s = try BareSVM(chunks: [4096])
        defer { s.teardown() }
        // Another device holds the page in its VRAM: getting it for this
        // GPU SVM (no device-private owner) faults it back to RAM, which
        // invalidates this notifier while hmm_range_fault runs.
        let other = try XeDevice(kernel: s.kernel, mm: s.mm, name: "other", vramBytes: 4 << 20, chunkSizes: [4096])
        let a = try s.mm.mmap(length: 4096)
        try s.mm.fill(a, length: 4096, byte: 0x3C)
        #expect(try other.migrateToDevice(a, pages: 1) == 1)
        let r = try s.findOrInsert(a)
        let before = s.invalidations
        s.svm.withNotifierLock { #expect(!s.svm.rangePagesValid(r)) }
        try s.svm.rangeGetPages(r, context: GPUSVMContext())
        #expect(s.invalidations > before, "the migration back invalidated the notifier")
        // Recorded: one system page, with the sequence the notifier has now.
        #expect(r.addresses.count == 1 && r.addresses[0].device == false)
        #expect(!s.kernel.pfnToPage(r.addresses[0].pfn).folio.isZoneDevice)
        #expect(r.notifierSeq == r.notifier.interval.readBegin())
        s.svm.withNotifierLock { #expect(s.svm.rangePagesValid(r)) }
        #expect(try s.mm.bytes(a, 4096).allSatisfy { $0 == 0x3C })
        // An invalidation of another range of the same notifier leaves this one valid;
        // one of its own page makes it invalid until the next get_pages.
        let b = try s.mm.mmap(length: 4096)
        try s.mm.fill(b, length: 4096, byte: 1)
        let rb = try s.findOrInsert(b)
        try s.svm.rangeGetPages(rb, context: GPUSVMContext())
        try s.mm.madvise(b, length: 4096, advice: .dontNeed)
        s.svm.withNotifierLock {
            #expect(!s.svm.rangePagesValid(rb))
            #expect(s.svm.rangePagesValid(r))
        }
        try s.svm.rangeGetPages(rb, context: GPUSVMContext())
        s.svm.withNotifierLock { #expect(s.svm.rangePagesValid(rb)) }
        withExtendedLifetime(other) {}
    }

    @Test("a range the CPU partly unmapped is marked, collected at the next GPU fault, and replaced by a range that fits", arguments: Chunks.allCases)
    func partialUnmapCollected(chunks: Chunks) throws {
        let f = try XeFixture(chunks)
        defer { f.teardown() }
        let mm = f.mm!, xe = f.xe!
        let size = 2 * MiB
        let a = try f.mapAligned2M(filledWith: 7)
        var v: UInt32 = 0xA11CE
        try withUnsafeBytes(of: &v) { (b) throws(Errno) in try xe.write(a, from: b) }
        let first = try #require(xe.svmLock.withLock { xe.svm.ranges(a, a + 1).first })
        #expect(first.size == (chunks == .large ? UInt64(size) : 4096))
        // The CPU unmaps the front half (the first range's page included).
        try mm.munmap(a, length: size / 2)
        #expect(first.flags.contains(.unmapped))
        #expect(first.flags.contains(.partialUnmap) == (chunks == .large))
        #expect(xe.rangesCollected == 0, "collected at the next fault, not in the notifier")
        // The next GPU access collects it and faults a range inside what is left.
        var got: UInt32 = 0
        try withUnsafeMutableBytes(of: &got) { (b) throws(Errno) in try xe.read(a + UInt64(size / 2), into: b) }
        #expect(got == 0x0707_0707)
        #expect(xe.rangesCollected == 1)
        let ranges = xe.svmLock.withLock { xe.svm.ranges(a, a + UInt64(size)) }
        #expect(!ranges.contains { $0 === first })
        #expect(ranges.allSatisfy { $0.start >= a + UInt64(size / 2) && $0.size <= (chunks == .large ? 64 << 10 : 4096) })
    }

    @Test("eviction: a range's VRAM goes back to RAM with the GPU's bytes, its pages invalid, the next GPU access faults it in again", arguments: Chunks.allCases)
    func eviction(chunks: Chunks) throws {
        let f = try XeFixture(chunks)
        defer { f.teardown() }
        let mm = f.mm!, xe = f.xe!
        let a = try f.mapAligned2M(filledWith: 9)
        var v: UInt32 = 0xBEEF
        try withUnsafeBytes(of: &v) { (b) throws(Errno) in try xe.write(a + 64, from: b) }
        let range = try #require(xe.svmLock.withLock { xe.svm.ranges(a, a + 1).first })
        #expect(range.flags.contains(.hasDevmemPages))
        #expect(xe.vramPagesInUse == UInt64(range.pageCount))
        // drm_gpusvm_range_evict: every device page through the CPU fault path.
        try xe.svmLock.withLock { () throws(Errno) in try xe.svm.rangeEvict(range) }
        #expect(xe.vramPagesInUse == 0)
        xe.svm.withNotifierLock { #expect(!xe.svm.rangePagesValid(range)) }
        #expect(xe.gpuMapping(at: a) == nil, "the GPU mapping was zapped")
        #expect(try mm.load32(a + 64) == 0xBEEF)
        let faults = xe.faults
        var got: UInt32 = 0
        try withUnsafeMutableBytes(of: &got) { (b) throws(Errno) in try xe.read(a + 64, into: b) }
        #expect(got == 0xBEEF && xe.faults == faults + 1)
        // Eviction of the whole VRAM (drm_pagemap_evict_to_ram), as under pressure.
        #expect(xe.vramPagesInUse > 0, "the fault migrated it back")
        #expect(xe.evictAll() > 0 && xe.vramPagesInUse == 0)
        #expect(try mm.load32(a + 64) == 0xBEEF)
    }
}
