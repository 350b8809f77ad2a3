import MirrorDriver
@testable import SVMEmu
import Testing
import TestSupport
import XeDriver

/// A host that refuses memory after the machine booted (`ulimit -v`, a
/// cgroup limit): every reservation answers with an error its caller can
/// report, never a stopped process. `HostMemory.refusesFromBytes` makes
/// the host refuse, in the test's own task only.
@Suite("the host refuses memory after boot")
struct HostRefusalTests {
    static let options = TestMachineOptions(nodeSizes: [32 << 20], maxPhysicalBytes: 1 << 30)

    /// The bytes of one device or CPU page table of the machine's address space (8 per page).
    static func pageTableBytes(_ mm: AddressSpace) -> Int {
        Int((mm.endAddress - mm.baseAddress) >> PageGeometry.pageShift) * 8
    }

    @Test("MirrorDevice: a refused device page table throws HostMemoryRefusal naming its size; the machine stays usable")
    func mirrorDevicePageTable() throws {
        try TestMachine.run(HostRefusalTests.options) { m in
            let bytes = HostRefusalTests.pageTableBytes(m.mm)
            #expect {
                try HostMemory.$refusesFromBytes.withValue(bytes) { try MirrorDevice(kernel: m.kernel, mm: m.mm) }
            } throws: { error in
                guard let r = error as? HostMemoryRefusal else { return false }
                return r.bytes == bytes && r.errno == .noMemory && r.purpose.contains("device page table")
                    && r.description.contains(ByteSize.describe(bytes))
            }
            // Not refused: the same device comes up.
            let device = try MirrorDevice(kernel: m.kernel, mm: m.mm, vramBytes: 32 << 20, chunkBytes: 32 << 20)
            let a = try m.mm.mmap(length: PageGeometry.pageSize)
            try m.mm.fillPattern(a, length: PageGeometry.pageSize, seed: 3)
            #expect(try device.migrateToDevice(a, pages: 1) == 1)
            #expect(try m.mm.verifyPattern(a, length: PageGeometry.pageSize, seed: 3) == nil)
        }
    }

    @Test("XeDevice: a refused GPU page table throws ENOMEM before any VRAM is registered")
    func xeGPUPageTable() throws {
        try TestMachine.run(HostRefusalTests.options) { m in
            let bytes = HostRefusalTests.pageTableBytes(m.mm)
            let maps = m.kernel.pageMapIndices.load(ordering: .relaxed)
            #expect(throws: Errno.noMemory) {
                try HostMemory.$refusesFromBytes.withValue(bytes) {
                    _ = try XeDevice(kernel: m.kernel, mm: m.mm, vramBytes: 32 << 20)
                }
            }
            #expect(m.kernel.pageMapIndices.load(ordering: .relaxed) == maps)
            _ = try XeDevice(kernel: m.kernel, mm: m.mm, vramBytes: 32 << 20)
        }
    }

    @Test("a new address space and fork: a refused page table throws (HostMemoryRefusal, ENOMEM from fork); the parent is intact")
    func addressSpaceAndFork() throws {
        try TestMachine.run(HostRefusalTests.options) { m in
            let bytes = HostRefusalTests.pageTableBytes(m.mm)
            #expect {
                try HostMemory.$refusesFromBytes.withValue(bytes) { _ = try AddressSpace(kernel: m.kernel) }
            } throws: { ($0 as? HostMemoryRefusal)?.purpose.contains("page tables") == true }
            let a = try m.mm.mmap(length: 4 * PageGeometry.pageSize)
            try m.mm.fillPattern(a, length: 4 * PageGeometry.pageSize, seed: 5)
            #expect(throws: Errno.noMemory) {
                try HostMemory.$refusesFromBytes.withValue(bytes) { _ = try m.mm.fork() }
            }
            #expect(try m.mm.verifyPattern(a, length: 4 * PageGeometry.pageSize, seed: 5) == nil)
            let child = try m.mm.fork()
            #expect(try child.verifyPattern(a, length: 4 * PageGeometry.pageSize, seed: 5) == nil)
        }
    }

    @Test("boot and a PhaseTimer of its own: a refusal throws HostMemoryRefusal")
    func bootAndPhaseTimer() throws {
        #expect(throws: HostMemoryRefusal.self) {
            try HostMemory.$refusesFromBytes.withValue(PageGeometry.pageSize) { _ = try PhaseTimer() }
        }
        #expect(throws: HostMemoryRefusal.self) {
            try HostMemory.$refusesFromBytes.withValue(PageGeometry.pageSize) {
                _ = try Kernel(booting: HostRefusalTests.options.configuration)
            }
        }
        _ = try PhaseTimer()
    }
}
