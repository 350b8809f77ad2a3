import Foundation
import Synchronization
import Testing
import SVMEmu
import GPUSVM
import XeDriver
import TestSupport

let pageSize = PageGeometry.pageSize
let MiB = 1 << 20

/// The two range geometries every IGT scenario runs on.
enum Chunks: String, CaseIterable, CustomTestStringConvertible, Sendable {
    /// 4 KiB ranges only: every GPU fault migrates and binds one page.
    case small = "4K"
    /// 2 MiB ranges where the VMA allows (then 64 KiB, then 4 KiB), moved as 2 MiB folios.
    case large = "2M"
    var sizes: [UInt64] {
        switch self {
        case .small: [PageGeometry.pageSize64]
        case .large: XeDevice.defaultChunkSizes
        }
    }
    var testDescription: String { rawValue }
}

/// How big the IGT scenarios run. By default the heavy variants run
/// scaled down so that the whole suite takes seconds in a debug build
/// (every scenario still runs on both chunk geometries, with the bytes
/// checked); `SVMEMU_IGT_FULL=1` runs IGT's own counts and sizes.
enum IGTScale {
    /// `SVMEMU_IGT_FULL=1` in the environment.
    static let full = ProcessInfo.processInfo.environment["SVMEMU_IGT_FULL"] == "1"
    /// The execs of a `many-` scenario (IGT: 128).
    static let manyExecs = full ? 128 : 8
    /// The execs of each thread of a `threads-` scenario.
    static let threadExecs = full ? 32 : 6
    /// The bytes of each emulated RAM node: `many-mmap-new-huge` keeps one
    /// 2 MiB folio per exec alive.
    static let nodeBytes = full ? 384 << 20 : 48 << 20
    /// The VRAM of a test's device.
    static let vramBytes: UInt64 = full ? 32 << 20 : 16 << 20
    /// `evict-malloc`: VRAM, allocation size (1.5 x VRAM allocated in all).
    static let evictVRAM = full ? 16 * MiB : 8 * MiB
    static let evictAllocation = full ? 8 * MiB : 4 * MiB
    /// `unaligned-alloc`: how many 1.5 MiB allocations.
    static let unalignedAllocations = full ? 8 : 2
}

/// One process with one Xe VM: the machine (two RAM nodes of
/// ``IGTScale/nodeBytes``, THP on madvise), its address space and the device.
final class XeFixture: @unchecked Sendable {
    /// The machine (a ``TestMachine`` without a mirror device).
    let machine: TestMachine
    let kernel: Kernel
    var mm: AddressSpace!
    var xe: XeDevice!
    var extra: [XeDevice] = []
    let chunks: Chunks

    init(_ chunks: Chunks, vram: UInt64 = IGTScale.vramBytes, policy: DeviceFaultPolicy = .trylockWait) throws {
        self.chunks = chunks
        machine = try TestMachine(TestMachineOptions(nodeSizes: [IGTScale.nodeBytes, IGTScale.nodeBytes], thp: .madvise,
                                                 policy: policy))
        kernel = machine.kernel
        mm = machine.mm
        xe = try XeDevice(kernel: kernel, mm: mm, vramBytes: vram, chunkSizes: chunks.sizes)
    }

    /// Another VM on the same process (IGT's per-thread VMs).
    func newVM(vram: UInt64 = 16 << 20) throws -> XeDevice {
        let d = try XeDevice(kernel: kernel, mm: mm, name: "xe\(extra.count + 1)", vramBytes: vram, chunkSizes: chunks.sizes)
        extra.append(d)
        return d
    }

    /// A 2 MiB anonymous mapping on a 2 MiB boundary, every byte `byte`
    /// (the address range a 2 MiB GPU SVM range can cover whole): reserves
    /// twice the size, gives it back, maps the aligned half.
    func mapAligned2M(filledWith byte: UInt8) throws -> UInt64 {
        let size = PageGeometry.pmdSize
        let reserve = try mm.mmap(length: 2 * size)
        let a = (reserve + UInt64(size) - 1) & ~UInt64(size - 1)
        try mm.munmap(reserve, length: 2 * size)
        try mm.mmap(address: a, length: size)
        try mm.fill(a, length: size, byte: byte)
        return a
    }

    /// Quiescent checks, then the teardown in order: devices, process, machine.
    func teardown() {
        let audit = kernel.audit()
        #expect(audit.isClean, "\(audit)")
        xe = nil
        extra = []
        mm = nil
        machine.tearDown()
        let warnings = kernel.diagnostics
        #expect(warnings.isEmpty, "\(warnings)")
    }
}

/// IGT's `struct test_exec_data`: a batch buffer, padding, the dword the
/// GPU writes and the value the CPU expects there, 160 bytes.
enum ExecData {
    static let size = 160
    static let batch = 0
    static let sync = 144
    static let data = 152
    static let expected = 156
    static let storeDword: UInt32 = 0x1040_0002   // MI_STORE_DWORD_IMM_GEN4
    static let batchEnd: UInt32 = 0x0500_0000     // MI_BATCH_BUFFER_END
}

extension XeDevice {
    /// One exec (`xe_exec` of a batch, waited for): the GPU reads the batch
    /// at `batch` through its page table and runs it; a batch is one
    /// MI_STORE_DWORD_IMM and MI_BATCH_BUFFER_END.
    func exec(batch: UInt64) throws(Errno) {
        var words = [UInt32](repeating: 0, count: 5)
        let r: Result<Void, Errno> = words.withUnsafeMutableBytes { b in Result { () throws(Errno) in try read(batch, into: b) } }
        try r.get()
        guard words[0] == ExecData.storeDword, words[4] == ExecData.batchEnd else { throw .invalidArgument }
        var value = words[3]
        let address = UInt64(words[1]) | UInt64(words[2]) << 32
        try withUnsafeBytes(of: &value) { (b) throws(Errno) in try write(address, from: b) }
    }
}

extension AddressSpace {
    func store32(_ address: UInt64, _ v: UInt32) throws(Errno) {
        var x = v
        try withUnsafeBytes(of: &x) { (b) throws(Errno) in try write(address, from: b) }
    }
    func load32(_ address: UInt64) throws(Errno) -> UInt32 {
        var x: UInt32 = 0
        try withUnsafeMutableBytes(of: &x) { (b) throws(Errno) in try read(address, into: b) }
        return x
    }

    /// The CPU writes the batch of element `at` (`write_dword()`): a store
    /// of `value` to the element's data dword, and the value it expects.
    func writeBatch(at element: UInt64, value: UInt32) throws(Errno) {
        let sdi = element + UInt64(ExecData.data)
        try store32(element + 0, ExecData.storeDword)
        try store32(element + 4, UInt32(truncatingIfNeeded: sdi))
        try store32(element + 8, UInt32(truncatingIfNeeded: sdi >> 32))
        try store32(element + 12, value)
        try store32(element + 16, ExecData.batchEnd)
        try store32(element + UInt64(ExecData.expected), value)
    }

    /// `igt_assert_eq(data->data, READ_VALUE(data))` through the CPU.
    func checkElement(_ element: UInt64) throws(Errno) -> Bool {
        try load32(element + UInt64(ExecData.data)) == load32(element + UInt64(ExecData.expected))
    }
}

/// The value IGT's `WRITE_VALUE` makes: random high bits, the index low.
func writeValue(_ rng: inout SplitMix64, _ i: Int) -> UInt32 {
    UInt32(truncatingIfNeeded: rng.next() << 12) | UInt32(i & 0xFFF)
}

