import Foundation
import Synchronization
import Testing
import SVMEmu
import GPUSVM
import XeDriver
import TestSupport

/// A buffer of a test_exec run and the model of every byte of its VMA.
struct ExecBuffer {
    var vmaStart: UInt64
    var vmaLength: Int
    /// Element 0 (the buffer IGT allocates) inside the VMA.
    var offset: Int
    var model: [UInt8]
    var base: UInt64 { vmaStart + UInt64(offset) }
}

/// Allocates a buffer as `test_exec()` does: malloc (inside a heap whose
/// other bytes hold a pattern), mmap, or a 2 MiB aligned mmap with
/// MADV_HUGEPAGE; memset to 5 unless SKIP_MEMSET.
func allocateBuffer(_ mm: AddressSpace, size: Int, flags: ExecFlags) throws -> ExecBuffer {
    var b: ExecBuffer
    if flags.contains(.hugePage) {
        let len = (size + PageGeometry.pmdSize - 1) & ~(PageGeometry.pmdSize - 1)
        let reserve = try mm.mmap(length: 2 * len)
        let start = (reserve + PageGeometry.pmdSize64 - 1) & PageGeometry.pmdMask
        try mm.munmap(reserve, length: 2 * len)
        try mm.mmap(address: start, length: len)
        try mm.madvise(start, length: len, advice: .hugePage)
        b = ExecBuffer(vmaStart: start, vmaLength: len, offset: 0, model: [UInt8](repeating: 0, count: len))
    } else if flags.contains(.mmap) {
        let len = (size + pageSize - 1) & ~(pageSize - 1)
        b = ExecBuffer(vmaStart: try mm.mmap(length: len), vmaLength: len, offset: 0, model: [UInt8](repeating: 0, count: len))
    } else {
        // The heap around a malloc'd buffer: other data the GPU must not touch.
        let len = ((size + pageSize - 1) & ~(pageSize - 1)) + 8 * pageSize
        let heap = try mm.mmap(length: len)
        try mm.fill(heap, length: len, byte: 0xA5)
        b = ExecBuffer(vmaStart: heap, vmaLength: len, offset: 3 * pageSize, model: [UInt8](repeating: 0xA5, count: len))
    }
    if !flags.contains(.skipMemset) {
        try mm.fill(b.base, length: size, byte: 5)
        b.model.fill(b.offset..<(b.offset + size), with: 5)
    } else if !flags.contains(.mmap) && !flags.contains(.hugePage) {
        // A heap buffer without memset holds what the heap held.
    }
    return b
}

/// IGT's `test_exec()` for one VM: `execs` times, the CPU writes a batch
/// into the buffer, the GPU executes it (a store of a fresh value), the CPU
/// checks the value; with the flags' variations. At the end every byte of
/// every live buffer is compared with its model.
func runExec(_ f: XeFixture, _ xe: XeDevice, _ c: ExecCase, seed: UInt64) throws {
    let mm = f.mm!
    let flags = c.flags
    let perBuffer = flags.contains(.new) ? 1 : c.execs
    var stride = max(c.stride, ExecData.size)
    let size = max(c.size, (perBuffer * stride + pageSize - 1) & ~(pageSize - 1))
    if c.size > perBuffer * stride && perBuffer > 1 {
        // A large buffer: the execs spread over all of it.
        stride = ((size - ExecData.size) / (perBuffer - 1)) & ~15
    }
    var rng = SplitMix64(state: seed | 1)
    var live: [ExecBuffer] = []
    var current = try allocateBuffer(mm, size: size, flags: flags)

    // RACE: a CPU thread stores into every element's sync word meanwhile.
    let racing = flags.contains(.race) && !flags.contains(.new) && !flags.contains(.mremap)
    let stop = Atomic<Bool>(false)
    let raceThread = racing ? WorkerThread() : nil
    let raceBase = current.base, raceStride = stride
    let raceValues = RaceValues(count: perBuffer)
    raceThread?.start {
        var r = SplitMix64(state: seed ^ 0xABCD)
        var n: UInt64 = 1
        while !stop.load(ordering: .relaxed) {
            let j = Int(r.next() % UInt64(perBuffer))
            if (try? mm.store64(raceBase + UInt64(j * raceStride + ExecData.sync), n)) != nil { raceValues.set(j, n) }
            n += 1
        }
    }
    var raceJoined = false
    defer {
        if let raceThread {
            stop.store(true, ordering: .relaxed)
            if !raceJoined { #expect(raceThread.wait(timeout: 30)) }
            #expect(raceThread.stop())
        }
    }

    for i in 0..<c.execs {
        if flags.contains(.new) && i > 0 { current = try allocateBuffer(mm, size: size, flags: flags) }
        let index = flags.contains(.new) ? 0 : i
        let element = current.base + UInt64(index * stride)
        let v = writeValue(&rng, i)
        try mm.writeBatch(at: element, value: v)
        ExecModel.write(&current.model, current.offset + index * stride, v, address: element)
        if flags.contains(.prefetch) {
            _ = try? xe.migrateToDevice(current.base & PageGeometry.pageMask, pages: (size + pageSize - 1) / pageSize)
        }
        try xe.exec(batch: element)
        if !(flags.contains(.everyOtherCheck) && i % 2 == 1) {
            let got = try mm.load32(element + UInt64(ExecData.data))
            #expect(got == v, "\(c.name): exec \(i) wrote \(String(got, radix: 16)), expected \(String(v, radix: 16))")
        }
        if flags.contains(.free) {
            try mm.munmap(current.vmaStart, length: current.vmaLength)
        } else if flags.contains(.new) {
            live.append(current)
        }
        if flags.contains(.mremap) && i + 1 < c.execs {
            // Move the buffer elsewhere: the GPU must follow the CPU's view.
            let target = try mm.mmap(length: current.vmaLength)
            try mm.munmap(target, length: current.vmaLength)
            var mflags: MRemapFlags = [.mayMove, .fixed]
            if flags.contains(.dontUnmap) { mflags.insert(.dontUnmap) }
            let moved = try mm.mremap(current.vmaStart, oldLength: current.vmaLength, newLength: current.vmaLength,
                                      flags: mflags, newAddress: target)
            // The batches name their store addresses: rewrite them for the new place.
            let delta = Int64(bitPattern: moved &- current.vmaStart)
            current.vmaStart = moved
            for k in 0...index {
                let e = current.base + UInt64(k * stride)
                let sdi = e + UInt64(ExecData.data)
                try mm.store32(e + 4, UInt32(truncatingIfNeeded: sdi))
                try mm.store32(e + 8, UInt32(truncatingIfNeeded: sdi >> 32))
                ExecModel.put32(&current.model, current.offset + k * stride + 4, UInt32(truncatingIfNeeded: sdi))
                ExecModel.put32(&current.model, current.offset + k * stride + 8, UInt32(truncatingIfNeeded: sdi >> 32))
            }
            _ = delta
        }
    }
    if !flags.contains(.new) { live.append(current) }
    if let raceThread {
        stop.store(true, ordering: .relaxed)
        #expect(raceThread.wait(timeout: 30))
        raceJoined = true
        for j in 0..<perBuffer where raceValues.get(j) != 0 {
            let at = current.offset + j * stride + ExecData.sync
            ExecModel.put32(&live[live.count - 1].model, at, UInt32(truncatingIfNeeded: raceValues.get(j)))
            ExecModel.put32(&live[live.count - 1].model, at + 4, UInt32(truncatingIfNeeded: raceValues.get(j) >> 32))
        }
    }
    if flags.contains(.forkRead) {
        // A child reads the results (device pages are shared with it until written).
        var child: AddressSpace? = try mm.fork()
        for b in live {
            let got = try child!.bytes(b.vmaStart, b.vmaLength)
            #expect(ExecModel.firstDifference(got, b.model) == nil, "\(c.name): child: \(ExecModel.firstDifference(got, b.model) ?? "")")
        }
        child = nil
        if !flags.contains(.forkReadAfter) { return }
    }
    for b in live {
        let got = try mm.bytes(b.vmaStart, b.vmaLength)
        #expect(ExecModel.firstDifference(got, b.model) == nil, "\(c.name): \(ExecModel.firstDifference(got, b.model) ?? "")")
    }
}

/// The race thread's last value per element.
final class RaceValues: @unchecked Sendable {
    private let lock = NSLock()
    private var v: [UInt64]
    init(count: Int) { v = [UInt64](repeating: 0, count: count) }
    func set(_ i: Int, _ x: UInt64) { lock.withLock { v[i] = x } }
    func get(_ i: Int) -> UInt64 { lock.withLock { v[i] } }
}

/// IGT's `many_allocs()`: allocations of `allocation` bytes until `total`,
/// a GPU store every `stride` bytes of each, then the CPU checks every store
/// and every byte.
func manyAllocs(_ f: XeFixture, total: Int, allocation: Int, stride: Int) throws {
    let mm = f.mm!
    var rng = SplitMix64(state: 11)
    var buffers: [(UInt64, [UInt8])] = []
    for _ in 0..<(total / allocation) {
        let b = try mm.mmap(length: allocation)
        var model = [UInt8](repeating: 0, count: allocation)
        var off = 0
        while off + ExecData.size <= allocation {
            let v = writeValue(&rng, off / stride)
            try mm.writeBatch(at: b + UInt64(off), value: v)
            ExecModel.write(&model, off, v, address: b + UInt64(off))
            try f.xe.exec(batch: b + UInt64(off))
            off += stride
        }
        buffers.append((b, model))
    }
    for (b, model) in buffers {
        let got = try mm.bytes(b, model.count)
        #expect(ExecModel.firstDifference(got, model) == nil, "\(ExecModel.firstDifference(got, model) ?? "")")
    }
}
