import Foundation
import SVMEmu
import MirrorDriver

// The hmm-tests fixtures (tools/testing/selftests/mm/hmm-tests.c) on the
// emulator: FIXTURE(hmm) opens /dev/hmm_dmirror0, FIXTURE(hmm2) opens
// devices 0 and 1. Here a fixture is one emulated machine (kernel, one
// process address space) and two MirrorDevices with distinct owners, like
// dmirror's two device-private devices. THP is in `madvise` mode, the usual
// distribution default, so MADV_HUGEPAGE decides as in the kernel test runs.

public let pageSize = PageGeometry.pageSize
public let pageShift = UInt64(PageGeometry.pageShift)
/// read_pmd_pagesize(): 2 MiB on x86-64.
public let pmdSize = PageGeometry.pmdSize
/// HMM_BUFFER_SIZE (1024 << 12): 4 MiB, the kernel's own size (small enough).
public let hmmBufferSize = 1024 << PageGeometry.pageShift
/// NTIMES.
public let ntimes = 10

/// FIXTURE_VARIANT(hmm) / (hmm2): which kind of device memory the devices
/// register (hmm_device_private / hmm_device_coherent).
public enum HMMVariant: String, CaseIterable, Sendable, CustomStringConvertible {
    case devicePrivate = "hmm_device_private"
    case deviceCoherent = "hmm_device_coherent"
    public var memoryType: DevicePageMapType { self == .devicePrivate ? .private : .coherent }
    /// hmm_is_coherent_type().
    public var isCoherent: Bool { self == .deviceCoherent }
    public var description: String { rawValue }
}

public final class HMMFixture: @unchecked Sendable {
    /// 2 MiB pages in the machine's hugetlb pool (8 MiB of its 128 MiB).
    public static let hugetlbPages = 4
    public let variant: HMMVariant
    public let kernel: Kernel
    /// The test process's address space (current->mm).
    public private(set) var mm: AddressSpace!
    /// /dev/hmm_dmirror0 and /dev/hmm_dmirror1: device-private, distinct owners.
    public private(set) var dev0: MirrorDevice!
    public private(set) var dev1: MirrorDevice!

    public init(_ variant: HMMVariant = .devicePrivate) throws {
        self.variant = variant
        var config = KernelConfiguration()
        config.nodeSizes = [64 << 20, 64 << 20]
        config.transparentHugepage = .madvise
        config.addressSpaceSize = 4 << 30
        config.maxPhysicalBytes = 2 << 30
        // nr_hugepages: the hugetlb cases SKIP in the kernel without a pool.
        config.hugetlbPages = HMMFixture.hugetlbPages
        kernel = try Kernel(booting: config)
        mm = try AddressSpace(kernel: kernel)
        dev0 = try MirrorDevice(kernel: kernel, mm: mm, name: "hmm_dmirror0", vramBytes: 64 << 20, chunkBytes: 32 << 20,
                            memoryType: variant.memoryType)
        dev1 = try MirrorDevice(kernel: kernel, mm: mm, name: "hmm_dmirror1", vramBytes: 64 << 20, chunkBytes: 32 << 20,
                            memoryType: variant.memoryType)
    }

    /// FIXTURE_TEARDOWN: close the devices (they evict their memory), then the
    /// process exits (its address space goes), then the machine.
    public func teardown() {
        dev0 = nil
        dev1 = nil
        mm = nil
        // The kernel's own paths never leave a stale translation behind.
        expect(!kernel.diagnostics.contains { $0.rule.hasPrefix("stale TLB entry") }, #"!kernel.diagnostics.contains { $0.rule.hasPrefix("stale TLB entry") }"#)
        // Every hugetlb page is back in the pool, no reservation left behind.
        expect(kernel.hugetlb.freePages == kernel.hugetlb.pageCount, #"kernel.hugetlb.freePages == kernel.hugetlb.pageCount"#)
        expect(kernel.hugetlb.reservedPages == 0, #"kernel.hugetlb.reservedPages == 0"#)
        withExtendedLifetime(kernel) {}
    }
}

/// Runs `body` with a fresh fixture and tears it down in the safe order.
public func withHMM(_ variant: HMMVariant = .devicePrivate, _ body: (HMMFixture) throws -> Void) throws {
    let f = try HMMFixture(variant)
    defer { f.teardown() }
    try body(f)
}

/// `struct hmm_buffer`: the mapping (`ptr`, `size`), the device-side mirror
/// buffer, and the outputs of the last command.
public final class HMMBuffer: @unchecked Sendable {
    public var ptr: UInt64 = 0
    public var size: Int
    public let mirror: UnsafeMutableRawBufferPointer
    public var cpages = 0
    public var faults = 0

    public init(size: Int, mirrorBytes: Int? = nil) {
        self.size = size
        mirror = .allocate(byteCount: mirrorBytes ?? size, alignment: PageGeometry.pageSize)
        mirror.initializeMemory(as: UInt8.self, repeating: 0)
    }
    deinit { mirror.deallocate() }

    /// The mirror as 32-bit ints (`int *ptr = buffer->mirror`).
    public var mirrorInts: UnsafeMutableBufferPointer<Int32> { mirror.bindMemory(to: Int32.self) }
    public var mirrorBytes: UnsafeMutableBufferPointer<UInt8> { mirror.bindMemory(to: UInt8.self) }
}

/// The dmirror ioctls as hmm_dmirror_cmd() issues them: 0 or -errno, with
/// `cpages` and `faults` copied back into the buffer on success.
public enum Request: Sendable { case read, write, migrateToDevice, migrateToSystem, snapshot, release, exclusive, checkExclusive }

@discardableResult
public func hmmCommand(_ device: MirrorDevice, _ request: Request, _ buffer: HMMBuffer, _ npages: Int) -> Int32 {
    var cmd = DMirrorCommand(address: buffer.ptr, npages: npages)
    do {
        switch request {
        case .read: try device.commandRead(&cmd, into: buffer.mirror)
        case .write: try device.commandWrite(&cmd, from: UnsafeRawBufferPointer(buffer.mirror))
        case .migrateToDevice: try device.commandMigrateToDevice(&cmd, into: buffer.mirror)
        case .migrateToSystem: try device.commandMigrateToSystem(&cmd)
        case .snapshot: try device.commandSnapshot(&cmd, into: buffer.mirror)
        case .release: device.commandRelease()
        case .exclusive: try device.commandExclusive(&cmd, into: buffer.mirror)
        case .checkExclusive: try device.commandCheckExclusive(&cmd)
        }
    } catch {
        return -error.rawValue
    }
    buffer.cpages = cmd.cpages
    buffer.faults = cmd.faults
    return 0
}

/// HMM_DMIRROR_FLAGS.
public func hmmSetFlags(_ device: MirrorDevice, _ flags: DMirrorFlags) -> Int32 {
    device.setCommandFlags(flags)
    return 0
}

/// 0 or -errno of an emulated system call.
public func sys(_ body: () throws -> Void) -> Int32 {
    do { try body(); return 0 } catch let e as Errno { return -e.rawValue } catch { return -EIO }
}

// MARK: the CPU side (`int *ptr = buffer->ptr`)

/// Stores `value(i)` into int `i` of `[address, address + count * 4)`: one
/// pass of CPU stores, as the C loops do.
public func storeInts(_ mm: AddressSpace, _ address: UInt64, from first: Int = 0, count: Int,
               _ value: (Int) -> Int32) throws {
    guard count > first else { return }
    var ints = [Int32](repeating: 0, count: count - first)
    for i in first..<count { ints[i - first] = value(i) }
    try ints.withUnsafeBytes { try mm.write(address + UInt64(first * 4), from: $0) }
}

/// Loads `count` ints from `address` (CPU loads: device pages fault back).
public func loadInts(_ mm: AddressSpace, _ address: UInt64, count: Int) throws -> [Int32] {
    var ints = [Int32](repeating: 0, count: count)
    try ints.withUnsafeMutableBytes { try mm.read(address, into: $0) }
    return ints
}

/// Loads int `index` of the mapping at `address`.
public func loadInt(_ mm: AddressSpace, _ address: UInt64, _ index: Int) throws -> Int32 {
    let b = try mm.read(address + UInt64(index * 4), count: 4)
    return b.withUnsafeBytes { $0.load(as: Int32.self) }
}

/// The first index where `ints` differs from `expected(i)`, or nil.
public func firstMismatch<C: Collection>(_ ints: C, _ expected: (Int) -> Int32) -> Int? where C.Element == Int32 {
    for (i, v) in ints.enumerated() where v != expected(i) { return i }
    return nil
}

/// The preamble most cases share: `npages` of private (or shared) anonymous
/// read-write memory, each int `i` holding `i` (the C loops `ptr[i] = i`).
public func countingBuffer(_ mm: AddressSpace, npages: Int, shared: Bool = false) throws -> HMMBuffer {
    let size = npages << pageShift
    let buffer = HMMBuffer(size: size)
    buffer.ptr = try mm.mmap(length: size, protection: .readWrite, shared: shared)
    try storeInts(mm, buffer.ptr, count: size / 4) { Int32($0) }
    return buffer
}
