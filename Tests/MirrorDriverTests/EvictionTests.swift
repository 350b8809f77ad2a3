import Testing
import SVMEmu
import MirrorDriver
import TestSupport

/// Eviction (migrate_device_range / pages / finalize): device memory goes
/// back to system RAM without a VMA, found through the reverse map.
@Suite("eviction brings everything back")
struct EvictionTests {

    @Test("evictAll returns every device page with its bytes, holes and data alike")
    func evictEverything() throws {
        try withMachine { kernel, mm, device in
            let n = 64
            let data = try mm.mmap(length: n * pageSize)
            try mm.fillPattern(data, length: n * pageSize, seed: 41)
            let holes = try mm.mmap(length: 8 * pageSize)
            try device.migrateToDevice(data, pages: n)
            try device.migrateToDevice(holes, pages: 8)
            #expect(device.devicePagesInUse == UInt64(n + 8))
            let freeMid = kernel.freePages
            #expect(device.evictAll() == n + 8)
            #expect(device.devicePagesInUse == 0)
            #expect(kernel.freePages == freeMid - UInt64(n + 8))
            for i in 0..<n {
                let e = mm.entry(at: data + UInt64(i * pageSize)).entry
                #expect(e.kind == .present && e.isWrite)
            }
            noLeaks(kernel, mm, data, pages: n)
            noLeaks(kernel, mm, holes, pages: 8)
            #expect(device.migrateToRAMCalls == 0)
            #expect(try mm.verifyPattern(data, length: n * pageSize, seed: 41) == nil)
            #expect(try mm.read(holes, count: 8 * pageSize).allSatisfy { $0 == 0 })
            // Nothing left to evict.
            #expect(device.evictAll() == 0)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("eviction skips a device page locked elsewhere and takes the rest")
    func evictionSkipsLockedPage() throws {
        try withMachine { kernel, mm, device in
            let n = 8
            let base = try mm.mmap(length: n * pageSize)
            try mm.fillPattern(base, length: n * pageSize, seed: 42)
            try device.migrateToDevice(base, pages: n)
            let held = try #require(folio(kernel, mm, base + 2 * PageGeometry.pageSize64))
            #expect(held.isDevicePrivate)
            #expect(onAnotherThread { held.tryLock() })  // held by another task
            #expect(device.evictAll() == n - 1)
            #expect(mm.entry(at: base + 2 * PageGeometry.pageSize64).entry.kind == .devicePrivate)
            #expect(held.refCount == 1 && held.mapCount == 1)
            held.unlock()
            #expect(device.devicePagesInUse == 1)
            #expect(try mm.verifyPattern(base, length: n * pageSize, seed: 42) == nil)
            #expect(device.devicePagesInUse == 0)
            noLeaks(kernel, mm, base, pages: n)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("migrate_device_range by hand: free pages give empty entries, finalize without dst restores")
    func deviceRangeByHand() throws {
        try withMachine { kernel, mm, device in
            let n = 4
            let base = try mm.mmap(length: n * pageSize)
            try mm.fillPattern(base, length: n * pageSize, seed: 43)
            try device.migrateToDevice(base, pages: n)
            let pfns = (0..<n).map { mm.entry(at: base + UInt64($0 * pageSize)).entry.pfn }
            let before = RangeSnapshot(kernel, mm, base, pages: n)
            // A free pfn of the same pool next to them.
            let chunk = try #require(device.registeredPageMaps.first)
            var free: UInt64 = chunk.startPfn
            while pfns.contains(free) { free += 1 }
            var src = (pfns + [free]).map { MigratePFN(pfn: $0) }
            var dst = [MigratePFN](repeating: .empty, count: n + 1)
            try kernel.migrateDevicePfns(&src, count: n + 1)
            #expect(src[n] == .empty)
            #expect(src[0..<n].allSatisfy { $0.isMigrating && $0.isValid })
            #expect(mm.entry(at: base).entry.kind == .migration)
            // The driver gives no destination: everything goes back where it was.
            kernel.migrateDevicePages(&src, &dst, count: n + 1)
            kernel.migrateDeviceFinalize(src, &dst, count: n + 1)
            #expect(RangeSnapshot(kernel, mm, base, pages: n) == before)
            #expect(try mm.verifyPattern(base, length: n * pageSize, seed: 43) == nil)
            noLeaks(kernel, mm, base, pages: n)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("a device dropped with pages still in VRAM evicts them first (device removal)")
    func droppingTheDeviceEvicts() throws {
        try withMachine { kernel, mm, device in
            var second: MirrorDevice? = try MirrorDevice(kernel: kernel, mm: mm, name: "mirror1", vramBytes: 64 << 20, chunkBytes: 32 << 20)
            let n = 16
            let base = try mm.mmap(length: n * pageSize)
            try mm.fillPattern(base, length: n * pageSize, seed: 44)
            try #require(second).migrateToDevice(base, pages: n)
            #expect(mm.entry(at: base).entry.kind == .devicePrivate)
            second = nil
            for i in 0..<n { #expect(mm.entry(at: base + UInt64(i * pageSize)).entry.kind == .present) }
            #expect(try mm.verifyPattern(base, length: n * pageSize, seed: 44) == nil)
            noLeaks(kernel, mm, base, pages: n)
            #expect(kernel.diagnostics.isEmpty)
            _ = device
        }
    }
}
