import Foundation
import Synchronization
import Testing
import SVMEmu
import GPUSVM
import XeDriver
import TestSupport

/// The flags of IGT's `test_exec()` this port models (tests/intel/xe_exec_system_allocator.c).
struct ExecFlags: OptionSet, Sendable {
    let rawValue: UInt32
    static let mmap = ExecFlags(rawValue: 1 << 0)          // MMAP: an mmap'd buffer, not malloc'd
    static let new = ExecFlags(rawValue: 1 << 1)           // NEW: a new buffer for each exec
    static let free = ExecFlags(rawValue: 1 << 3)          // FREE: freed after each exec
    static let race = ExecFlags(rawValue: 1 << 6)          // RACE: a CPU thread writes the buffer meanwhile
    static let skipMemset = ExecFlags(rawValue: 1 << 7)    // SKIP_MEMSET
    static let hugePage = ExecFlags(rawValue: 1 << 12)     // HUGE_PAGE: MADV_HUGEPAGE on a 2 MiB aligned buffer
    static let forkRead = ExecFlags(rawValue: 1 << 14)     // FORK_READ: a forked child reads the results
    static let forkReadAfter = ExecFlags(rawValue: 1 << 15) // FORK_READ_AFTER: and the parent again after it
    static let mremap = ExecFlags(rawValue: 1 << 16)       // MREMAP: the buffer moves between execs
    static let dontUnmap = ExecFlags(rawValue: 1 << 17)    // DONTUNMAP
    static let everyOtherCheck = ExecFlags(rawValue: 1 << 20) // EVERY_OTHER_CHECK
    static let prefetch = ExecFlags(rawValue: 1 << 22)     // PREFETCH: prefetched to VRAM before each exec
}

/// One IGT `test_exec()` instance: its name and its arguments.
struct ExecCase: Sendable, CustomTestStringConvertible {
    let name: String
    let execs: Int
    /// Bytes of the buffer (0: what the execs need).
    let size: Int
    /// Bytes between two execs' data (0: `sizeof(struct test_exec_data)`).
    let stride: Int
    let flags: ExecFlags
    var testDescription: String { name }
}

/// IGT's xe_exec_system_allocator scenarios against the Xe-like driver: the
/// CPU writes a batch into malloc'd or mmap'd memory, the GPU reads it
/// through GPU SVM (a GPU fault: find the range, migrate it to VRAM, get
/// its pages, bind) and stores a dword, the CPU checks it (a CPU fault:
/// drm_pagemap's migrate_to_ram). Every scenario runs on 4 KiB ranges and on
/// 2 MiB ranges, and ends comparing every byte of the buffer (and of the
/// heap around a malloc'd one) with a model, then auditing the machine.
@Suite("xe_exec_system_allocator (IGT) on the Xe-like driver", .serialized)
struct SystemAllocatorTests {

    static let sections: [(String, ExecFlags)] = [
        ("malloc", []), ("malloc-fork-read", [.forkRead]), ("malloc-fork-read-after", [.forkRead, .forkReadAfter]),
        ("malloc-race", [.race]), ("malloc-prefetch", [.prefetch]), ("malloc-prefetch-race", [.prefetch, .race]),
        ("mmap", [.mmap]), ("mmap-prefetch", [.mmap, .prefetch]), ("mmap-remap", [.mmap, .mremap]),
        ("mmap-remap-dontunmap", [.mmap, .mremap, .dontUnmap]), ("mmap-remap-eocheck", [.mmap, .mremap, .everyOtherCheck]),
        ("mmap-remap-dontunmap-eocheck", [.mmap, .mremap, .dontUnmap, .everyOtherCheck]),
        ("mmap-huge", [.mmap, .hugePage]), ("mmap-race", [.mmap, .race]),
        ("free", [.new, .free]), ("new", [.new]), ("new-prefetch", [.new, .prefetch]),
        ("mmap-free", [.mmap, .new, .free]), ("mmap-free-huge", [.mmap, .new, .free, .hugePage]),
        ("mmap-new", [.mmap, .new]), ("mmap-new-huge", [.mmap, .new, .hugePage]),
        ("malloc-nomemset", [.skipMemset]), ("mmap-nomemset", [.mmap, .skipMemset]),
        ("mmap-huge-nomemset", [.mmap, .hugePage, .skipMemset]), ("free-nomemset", [.new, .free, .skipMemset]),
        ("new-nomemset", [.new, .skipMemset]), ("mmap-new-nomemset", [.mmap, .new, .skipMemset]),
    ]

    /// The `once-`, `twice-`, `many-` ... families of each section ("many"
    /// runs ``IGTScale/manyExecs`` execs: 8 by default, IGT's 128 with
    /// `SVMEMU_IGT_FULL=1`).
    static let cases: [ExecCase] = sections.flatMap { (s, f) -> [ExecCase] in
        let many = IGTScale.manyExecs
        var c = [
            ExecCase(name: "once-\(s)", execs: 1, size: 0, stride: 0, flags: f),
            ExecCase(name: "once-large-\(s)", execs: 1, size: 2 * MiB, stride: 0, flags: f),
            ExecCase(name: "twice-\(s)", execs: 2, size: 0, stride: 0, flags: f),
            ExecCase(name: "many-\(s)", execs: many, size: 0, stride: 0, flags: f),
        ]
        if !f.contains(.new) {
            c.append(ExecCase(name: "many-stride-\(s)", execs: many, size: 0, stride: 256, flags: f))
            c.append(ExecCase(name: "many-large-\(s)", execs: many, size: 2 * MiB, stride: 0, flags: f))
            c.append(ExecCase(name: "many-64k-\(s)", execs: many, size: 64 << 10, stride: 0, flags: f))
        }
        return c
    }

    @Test("test_exec", arguments: Chunks.allCases, SystemAllocatorTests.cases)
    func testExec(chunks: Chunks, c: ExecCase) throws {
        let f = try XeFixture(chunks)
        defer { f.teardown() }
        try runExec(f, f.xe, c, seed: UInt64(c.name.hashValue & 0xFFFF))
    }

    /// IGT's `threads()`: several threads, each with its own buffer, each on
    /// its own VM (a second GPU SVM over the same process) or, shared-vm, on
    /// one; `shared-alloc`: one buffer, each thread its own elements.
    @Test("threads", arguments: Chunks.allCases, [
        ("threads-many-malloc", false, false, ExecFlags()), ("threads-many-mmap", false, false, ExecFlags.mmap),
        ("threads-many-large-malloc", false, false, ExecFlags()),
        ("threads-shared-vm-many-malloc", true, false, ExecFlags()), ("threads-shared-vm-many-mmap-new", true, false, ExecFlags([.mmap, .new])),
        ("threads-shared-vm-many-large-malloc", true, false, ExecFlags()),
        ("threads-shared-vm-shared-alloc-many-stride-malloc", true, true, ExecFlags()),
        ("threads-shared-alloc-many-stride-malloc", false, true, ExecFlags()),
        ("threads-shared-vm-many-malloc-race", true, false, ExecFlags.race),
    ])
    func threads(chunks: Chunks, scenario: (String, Bool, Bool, ExecFlags)) throws {
        let (name, sharedVM, sharedAlloc, flags) = scenario
        let f = try XeFixture(chunks)
        defer { f.teardown() }
        let n = 3
        let vms = try (0..<n).map { i in sharedVM || i == 0 ? f.xe! : try f.newVM() }
        let large = name.contains("large")
        let failures = Failures()
        if sharedAlloc {
            // One buffer, 256-byte stride, thread t owns the elements t, t + n, ...
            let execs = IGTScale.threadExecs * n, step = 256
            let buffer = try f.mm.mmap(length: execs * step)
            try f.mm.fill(buffer, length: execs * step, byte: 5)
            let ok = runThreads(n, timeout: 60, keepAlive: [f]) { t in
                var rng = SplitMix64(state: UInt64(t + 1))
                for k in stride(from: t, to: execs, by: n) {
                    let e = buffer + UInt64(k * step)
                    do {
                        try f.mm.writeBatch(at: e, value: writeValue(&rng, k))
                        try vms[t].exec(batch: e)
                        if try !f.mm.checkElement(e) { failures.record("\(name): element \(k) differs") }
                    } catch { failures.record("\(name): element \(k): \(error)") }
                }
            }
            #expect(ok, "\(name): threads did not finish")
        } else {
            let c = ExecCase(name: name, execs: IGTScale.threadExecs, size: large ? 2 * MiB : 0, stride: 0, flags: flags)
            let ok = runThreads(n, timeout: 60, keepAlive: [f]) { t in
                do { try runExec(f, vms[t], c, seed: UInt64(t + 1)) } catch { failures.record("\(name) thread \(t): \(error)") }
            }
            #expect(ok, "\(name): threads did not finish")
        }
        #expect(failures.list.isEmpty, "\(failures.list)")
    }

    /// IGT's `partial()`: a 2 MiB buffer the GPU wrote (and, with
    /// cpu-fault, the CPU read back), half of it unmapped (the front half,
    /// or the middle), maybe mapped again, then the GPU writes the part that
    /// stayed: the range it faulted first is partially unmapped and must go
    /// through the garbage collector.
    @Test("partial", arguments: Chunks.allCases, [
        ("partial-munmap-cpu-fault", true, false, false), ("partial-munmap-no-cpu-fault", false, false, false),
        ("partial-remap-cpu-fault", true, true, false), ("partial-remap-no-cpu-fault", false, true, false),
        ("partial-middle-munmap-cpu-fault", true, false, true), ("partial-middle-munmap-no-cpu-fault", false, false, true),
        ("partial-middle-remap-cpu-fault", true, true, true), ("partial-middle-remap-no-cpu-fault", false, true, true),
    ])
    func partial(chunks: Chunks, scenario: (String, Bool, Bool, Bool)) throws {
        let (name, cpuFault, remap, middle) = scenario
        let f = try XeFixture(chunks)
        defer { f.teardown() }
        let mm = f.mm!, size = 2 * MiB
        let unmapOffset = middle ? size / 4 : 0
        // __aligned_alloc: a 2 MiB aligned buffer inside a larger reservation.
        let reserve = try mm.mmap(length: 2 * size)
        let old = (reserve + UInt64(size) - 1) & ~UInt64(size - 1)
        try mm.munmap(reserve, length: 2 * size)
        try mm.mmap(address: old, length: size)
        try mm.fill(old, length: size, byte: 5)
        var model = [UInt8](repeating: 5, count: size)
        var rng = SplitMix64(state: 7)
        let elements = [old, old + UInt64(unmapOffset + size / 2)]
        for (i, e) in elements.enumerated() {
            let v = writeValue(&rng, i)
            try mm.writeBatch(at: e, value: v)
            try f.xe.exec(batch: e)
            ExecModel.write(&model, Int(e - old), v, address: e)
            if i == 1 || cpuFault { #expect(try mm.checkElement(e), "\(name): element \(i)") }
            if i == 0 {
                try mm.munmap(old + UInt64(unmapOffset), length: size / 2)
                if remap { try mm.mmap(address: old + UInt64(unmapOffset), length: size / 2) }
                model.fill(unmapOffset..<(unmapOffset + size / 2), with: 0)
            }
        }
        // Every byte still mapped, as the CPU reads it.
        var bytes = [UInt8](repeating: 0, count: size)
        for (s, e) in remap ? [(0, size)] : [(0, unmapOffset), (unmapOffset + size / 2, size)] where e > s {
            try bytes.withUnsafeMutableBytes { b in
                try mm.read(old + UInt64(s), into: UnsafeMutableRawBufferPointer(rebasing: b[s..<e]))
            }
        }
        if !remap { bytes.fill(unmapOffset..<(unmapOffset + size / 2), with: 0) }
        #expect(ExecModel.firstDifference(bytes, model) == nil, "\(name): \(ExecModel.firstDifference(bytes, model) ?? "")")
        // The first range (2 MiB, or the 4 KiB page at the front) lost pages
        // to the unmap: it went through the garbage collector.
        if chunks == .large || !middle {
            #expect(f.xe.rangesCollected > 0, "\(name): the unmapped range was not garbage-collected")
        }
    }

    /// IGT's `evict-malloc` (`many_allocs()` over more than VRAM):
    /// allocations of half of VRAM (4 MiB of 8 MiB; 8 MiB of 16 MiB with
    /// `SVMEMU_IGT_FULL=1`), one GPU store every 1 MiB, until 1.5 times VRAM
    /// is allocated, then the CPU checks every store. With 2 MiB ranges VRAM
    /// fills up and the oldest allocations are evicted.
    @Test("evict-malloc", arguments: Chunks.allCases)
    func evictMalloc(chunks: Chunks) throws {
        let vram = IGTScale.evictVRAM
        let f = try XeFixture(chunks, vram: UInt64(vram))
        defer { f.teardown() }
        try manyAllocs(f, total: vram + vram / 2, allocation: IGTScale.evictAllocation, stride: MiB)
        if chunks == .large { #expect(f.xe.pagesEvicted > 0, "VRAM was never full") }
    }

    /// IGT's `unaligned-alloc`: allocations of 1.5 MiB (2 of them; 8 with
    /// `SVMEMU_IGT_FULL=1`), a GPU store every 4 KiB.
    @Test("unaligned-alloc", arguments: Chunks.allCases)
    func unalignedAlloc(chunks: Chunks) throws {
        let f = try XeFixture(chunks)
        defer { f.teardown() }
        try manyAllocs(f, total: IGTScale.unalignedAllocations * (MiB + MiB / 2), allocation: MiB + MiB / 2, stride: pageSize)
    }

    /// IGT's `fault-threads-same-page-benchmark` and `fault-threads-benchmark`
    /// as functional tests: the GPU writes every 4 KiB page of a 1 MiB buffer
    /// (to VRAM), then four CPU threads read the results, all of them every
    /// page (same-page: racing CPU faults on one allocation), or a quarter each.
    @Test("fault-threads", arguments: Chunks.allCases, [("fault-threads-same-page-benchmark", true), ("fault-threads-benchmark", false)])
    func faultThreads(chunks: Chunks, scenario: (String, Bool)) throws {
        let (name, samePage) = scenario
        let f = try XeFixture(chunks)
        defer { f.teardown() }
        let size = MiB, n = size / pageSize, threads = 4
        let buffer = try f.mm.mmap(length: size)
        var rng = SplitMix64(state: 3)
        for i in 0..<n {
            let e = buffer + UInt64(i * pageSize)
            try f.mm.writeBatch(at: e, value: writeValue(&rng, i))
            try f.xe.exec(batch: e)
        }
        let failures = Failures()
        let ok = runThreads(threads, timeout: 60, keepAlive: [f]) { t in
            for i in stride(from: samePage ? 0 : t, to: n, by: samePage ? 1 : threads) {
                let e = buffer + UInt64(i * pageSize)
                do { if try !f.mm.checkElement(e) { failures.record("\(name): page \(i)") } } catch { failures.record("\(name): page \(i): \(error)") }
            }
        }
        #expect(ok)
        #expect(failures.list.isEmpty, "\(failures.list.prefix(4))")
    }

    /// IGT's `fault`: a batch that stores to an address no VMA holds fails
    /// (the exec queue is banned in Xe; here the access throws), and the VM
    /// keeps working.
    @Test("fault", arguments: Chunks.allCases)
    func fault(chunks: Chunks) throws {
        let f = try XeFixture(chunks)
        defer { f.teardown() }
        let buffer = try f.mm.mmap(length: 2 * MiB)
        let hole = try f.mm.mmap(length: pageSize)
        try f.mm.munmap(hole, length: pageSize)
        var v: UInt32 = 0xDEAD
        #expect(throws: Errno.self) { try withUnsafeBytes(of: &v) { (b) throws(Errno) in try f.xe.write(hole, from: b) } }
        try f.mm.writeBatch(at: buffer, value: 42)
        try f.xe.exec(batch: buffer)
        #expect(try f.mm.checkElement(buffer))
    }
}

/// The byte model of a buffer: what every byte must hold.
enum ExecModel {
    static func put32(_ m: inout [UInt8], _ at: Int, _ v: UInt32) {
        for k in 0..<4 where at + k < m.count { m[at + k] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(k))) }
    }
    /// The bytes a batch at `offset` and its execution leave: the batch, the
    /// stored dword, the expected dword.
    static func write(_ m: inout [UInt8], _ offset: Int, _ v: UInt32, address: UInt64? = nil) {
        put32(&m, offset + ExecData.data, v)
        put32(&m, offset + ExecData.expected, v)
        put32(&m, offset + 0, ExecData.storeDword)
        put32(&m, offset + 12, v)
        put32(&m, offset + 16, ExecData.batchEnd)
        if let address {
            let sdi = address + UInt64(ExecData.data)
            put32(&m, offset + 4, UInt32(truncatingIfNeeded: sdi))
            put32(&m, offset + 8, UInt32(truncatingIfNeeded: sdi >> 32))
        }
    }
    static func firstDifference(_ a: [UInt8], _ b: [UInt8]) -> String? {
        guard a.count == b.count else { return "sizes differ" }
        // memcmp first: a per-byte loop over megabytes dominates a debug build.
        if a.isEmpty { return nil }
        let same = a.withUnsafeBytes { pa in b.withUnsafeBytes { pb in memcmp(pa.baseAddress!, pb.baseAddress!, a.count) == 0 } }
        if same { return nil }
        guard let i = a.indices.first(where: { a[$0] != b[$0] }) else { return nil }
        let n = zip(a, b).filter { $0 != $1 }.count
        return "\(n) bytes differ, the first at offset \(i): 0x\(String(a[i], radix: 16)), expected 0x\(String(b[i], radix: 16))"
    }
}

extension Array where Element == UInt8 {
    /// Sets `range` to `byte` (memset: a per-byte loop is slow in a debug build).
    mutating func fill(_ range: Range<Int>, with byte: UInt8) {
        guard !range.isEmpty else { return }
        withUnsafeMutableBytes { p in _ = memset(p.baseAddress! + range.lowerBound, Int32(byte), range.count) }
    }
}

final class Failures: @unchecked Sendable {
    private let lock = NSLock()
    private var items: [String] = []
    func record(_ s: String) { lock.withLock { items.append(s) } }
    var list: [String] { lock.withLock { items } }
}

extension AddressSpace {
    func fill(_ address: UInt64, length: Int, byte: UInt8) throws(Errno) {
        let b = [UInt8](repeating: byte, count: length)
        let r: Result<Void, Errno> = b.withUnsafeBytes { p in Result { () throws(Errno) in try write(address, from: p) } }
        try r.get()
    }
    func bytes(_ address: UInt64, _ count: Int) throws(Errno) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: count)
        let r: Result<Void, Errno> = b.withUnsafeMutableBytes { p in Result { () throws(Errno) in try read(address, into: p) } }
        try r.get()
        return b
    }
}
