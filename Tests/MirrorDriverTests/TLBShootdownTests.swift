import Foundation
import Synchronization
import Testing
import TestSupport
@testable import SVMEmu
import MirrorDriver

/// Emulated CPUs with TLBs: what a shootdown waits for, what a stale
/// translation does, and that the kernel's own order never leaves one behind.
@Suite("TLB shootdowns and stale translations")
struct TLBShootdownTests {

    @Test("a CPU that wrote a page keeps writing its old frame when the kernel skips the flush: the checker names it, the write is lost")
    func forgottenFlushLosesAWrite() throws {
        try withMachine { kernel, mm, device in
            let a = try mm.mmap(length: pageSize)
            let cpuB = WorkerThread()
            defer { _ = cpuB.stop() }
            // CPU B writes the page: its TLB now holds a writable, dirty entry.
            let first = Atomic<Int>(0)
            #expect(cpuB.run { first.store((try? mm.store(a, 1)) == nil ? 0 : 1, ordering: .releasing) })
            #expect(first.load(ordering: .acquiring) == 1)
            let old = try #require(mappedFrame(mm, a))

            // A kernel that forgets to flush: the page moves to VRAM, the old
            // frame is freed, CPU B's entry survives.
            mm.skipsTLBFlushes = true
            #expect(try device.migrateToDevice(a, pages: 1) == 1)
            mm.skipsTLBFlushes = false
            #expect(mm.entry(at: a).entry.kind == .devicePrivate)

            // CPU B writes again: a TLB hit on the freed frame.
            #expect(cpuB.run { _ = try? mm.store(a, 0x55) })
            let stale = kernel.takeStaleTLBAccesses()
            try #require(stale.count == 1)
            #expect(stale[0].detail.contains("write at 0x\(String(a, radix: 16))"))
            #expect(stale[0].detail.contains("old frame pfn 0x\(String(old, radix: 16))"))
            #expect(kernel.vmstat[.tlbStaleAccesses] == 1)
            // The write went to the freed frame: the page (back from VRAM) never saw it.
            #expect(try mm.load(a) == 1)
        }
    }

    @Test("with the flush, the same CPU catches up from the flush generation: its write faults the page back and lands")
    func flushedCPUFaultsInstead() throws {
        try withMachine { kernel, mm, device in
            let a = try mm.mmap(length: pageSize)
            let cpuB = WorkerThread()
            defer { _ = cpuB.stop() }
            #expect(cpuB.run { _ = try? mm.store(a, 1) })
            let before = kernel.vmstat.snapshot()
            #expect(try device.migrateToDevice(a, pages: 1) == 1)
            // CPU B was between accesses: it got the IPI but nobody waited for it.
            #expect(kernel.vmstat[.tlbIPIsSent] > before["tlb_ipis_sent", default: 0])
            let landed = Atomic<Int>(0)
            #expect(cpuB.run { landed.store((try? mm.store(a, 0x55)) == nil ? 0 : 1, ordering: .releasing) })
            #expect(landed.load(ordering: .acquiring) == 1)
            #expect(try mm.load(a) == 0x55)
            #expect(kernel.vmstat[.tlbStaleAccesses] == 0)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("after each migration returns, a CPU that had the page in its TLB reads the latest value (4 KiB and 2 MiB)",
          arguments: [false, true])
    func readersAfterFinalize(huge: Bool) throws {
        try TestMachine.run(TestMachineOptions(thp: huge ? .always : .never, vram: 16 << 20, chunkBytes: 8 << 20)) { m in
            let kernel = m.kernel, mm = m.mm!, device = m.device!
            let pages = huge ? PageGeometry.pmdPages : 1
            let region = try mm.mmap(length: 2 * PageGeometry.pmdSize)
            let a = (region + PageGeometry.pmdSize64 - 1) & PageGeometry.pmdMask
            let reader = WorkerThread()
            defer { _ = reader.stop() }
            let seen = SharedCounter()
            let target = a + 3 * UInt64(pageSize) + 5
            for v in 1...10 {
                try mm.store(target, UInt8(v))
                #expect(reader.run { seen.value.store(Int((try? mm.load(target)) ?? 0), ordering: .releasing) })
                #expect(seen.current == v)
                #expect(try device.migrateToDevice(a, pages: pages) == pages)
                // The reader's entry went with the flush: it faults the page back.
                #expect(reader.run { seen.value.store(Int((try? mm.load(target)) ?? 0), ordering: .releasing) })
                #expect(seen.current == v)
                _ = try device.migrateToDevice(a, pages: pages)
                _ = try device.migrateToSystem(a, pages: pages)
                #expect(reader.run { seen.value.store(Int((try? mm.load(target)) ?? 0), ordering: .releasing) })
                #expect(seen.current == v)
            }
            #expect(kernel.vmstat[.tlbStaleAccesses] == 0)
        }
    }

    @Test("a shootdown waits for a CPU inside an access, which flushes at the end of it")
    func shootdownWaitsForAnAccess() throws {
        try withMachine { kernel, mm, _ in
            let a = try mm.mmap(length: 4 * pageSize)
            try mm.store(a, 7)
            let cpuB = WorkerThread(), flusher = WorkerThread()
            defer { _ = cpuB.stop(); _ = flusher.stop() }
            let inside = Atomic<Int>(0), release = Atomic<Int>(0), flushed = Atomic<Int>(0)
            cpuB.start {
                _ = try? mm.withPageBytes(at: a, write: false) { p -> UInt8 in
                    inside.store(1, ordering: .releasing)
                    let start = DispatchTime.now().uptimeNanoseconds
                    while release.load(ordering: .acquiring) == 0 && DispatchTime.now().uptimeNanoseconds - start < 10_000_000_000 {
                        sched_yield()
                    }
                    return p.load(as: UInt8.self)
                }
            }
            #expect(eventually { inside.load(ordering: .acquiring) == 1 })
            let before = kernel.vmstat.snapshot()
            flusher.start {
                try? mm.mprotect(a, length: pageSize, protection: .read)
                flushed.store(1, ordering: .releasing)
            }
            // The IPI is in CPU B's inbox; the flusher cannot return before B's access ends.
            #expect(eventually { kernel.cpus.pendingIPIs > 0 })
            #expect(flushed.load(ordering: .acquiring) == 0)
            release.store(1, ordering: .releasing)
            #expect(cpuB.wait())
            #expect(flusher.wait())
            #expect(flushed.load(ordering: .acquiring) == 1)
            // Two CPUs run the mm besides the flusher's: B (inside an access,
            // waited for) and this test's (between accesses, not waited for).
            #expect(delta(before, kernel, .tlbRemoteFlush) == 1)
            #expect(delta(before, kernel, .tlbIPIsSent) == 2)
            #expect(delta(before, kernel, .tlbRemoteFlushReceived) == 1)
            #expect(kernel.cpus.pendingIPIs == 1)
            // This CPU takes its IPI at its next access.
            #expect(try mm.load(a) == 7)
            #expect(delta(before, kernel, .tlbRemoteFlushReceived) == 2)
            #expect(kernel.cpus.pendingIPIs == 0)
        }
    }

    @Test("a CPU whose thread exited gets no IPI (lazy TLB) and catches up when a thread runs on it again")
    func idleCPUIsLazy() throws {
        try withMachine { kernel, mm, _ in
            let a = try mm.mmap(length: 2 * pageSize)
            try mm.store(a, 3)
            let ok = onAnotherThread(keepAlive: [kernel, mm]) { _ = try? mm.load(a) }
            #expect(ok)
            // The other thread's CPU still has the mm loaded, but no thread.
            #expect(eventually { kernel.cpus.boundCount == 1 })
            let before = kernel.vmstat.snapshot()
            try mm.munmap(a, length: pageSize)
            #expect(delta(before, kernel, .tlbRemoteFlush) == 0)
            #expect(delta(before, kernel, .tlbIPIsSent) == 0)
            #expect(delta(before, kernel, .tlbLocalFlushOne) == 1)
            let again = onAnotherThread(keepAlive: [kernel, mm]) { _ = try? mm.load(a + UInt64(pageSize)) }
            #expect(again)
            #expect(throws: Errno.badAddress) { try mm.load(a) }
            #expect(kernel.vmstat[.tlbStaleAccesses] == 0)
        }
    }

    @Test("migrate_vma flushes once per PMD the collect walk unmapped, as migrate_vma_collect_pmd does",
          arguments: [1, 16, 600])
    func flushPerCollectWalk(pages: Int) throws {
        try withMachine { kernel, mm, _ in
            // Start 8 pages before a PMD boundary so that 16 and 600 pages cross it.
            let region = try mm.mmap(length: 8 << 20)
            let a = ((region + (2 << 20)) & ~UInt64((2 << 20) - 1)) - 8 * UInt64(pageSize)
            try mm.fillPattern(a, length: pages * pageSize, seed: 9)
            let device = try MirrorDevice(kernel: kernel, mm: mm, vramBytes: 8 << 20, chunkBytes: 8 << 20)
            let before = kernel.vmstat.snapshot()
            #expect(try device.migrateToDevice(a, pages: pages) == pages)
            let pmds = Int((a + UInt64(pages * pageSize) - 1) >> 21 - a >> 21 + 1)
            let perPMD = (0..<pmds).map { i -> Int in
                let lo = max(a, (a >> 21 + UInt64(i)) << 21), hi = min(a + UInt64(pages * pageSize), (a >> 21 + UInt64(i) + 1) << 21)
                return Int((hi - lo) >> 12)
            }
            let one = perPMD.filter { $0 <= 33 }.reduce(0, +)
            let all = perPMD.filter { $0 > 33 }.count
            #expect(delta(before, kernel, .tlbPagesFlushed) == Int64(pages))
            #expect(delta(before, kernel, .tlbLocalFlushOne) == Int64(one))
            #expect(delta(before, kernel, .tlbLocalFlushAll) == Int64(all))
            #expect(try mm.verifyPattern(a, length: pages * pageSize, seed: 9) == nil)
        }
    }

    @Test("writers hammering pages while they migrate to VRAM and back never lose a write, and no CPU uses a stale entry",
          arguments: [DeviceFaultPolicy.legacy, .trylock, .trylockWait], [false, true])
    func writersDuringMigration(policy: DeviceFaultPolicy, huge: Bool) throws {
        let options = TestMachineOptions(thp: huge ? .always : .never, policy: policy, vram: 32 << 20, chunkBytes: 16 << 20)
        try TestMachine.run(options) { m in
            let kernel = m.kernel, mm = m.mm!, device = m.device!
            let pages = huge ? 512 : 8
            let length = pages * pageSize
            let region = try mm.mmap(length: length + (2 << 20))
            let a = (region + UInt64((2 << 20) - 1)) & ~UInt64((2 << 20) - 1)
            try mm.fillPattern(a, length: length, seed: 1)
            if huge { #expect(mm.entry(at: a).level == .pmd) }

            // Each writer owns one 8-byte slot per page and writes 1, 2, 3, ...
            // into it; the last value it wrote must be what every slot holds.
            let writers = 2, rounds = 40
            let stop = Atomic<Int>(0)
            let lastWritten = (0..<writers).map { _ in SharedCounter() }
            let migrations = Atomic<Int>(0)
            let ok = runThreads(writers + 1, timeout: 60, keepAlive: [kernel, mm, device]) { t in
                if t == writers {
                    for _ in 0..<rounds {
                        _ = try? device.migrateToDevice(a, pages: pages)
                        _ = try? device.migrateToSystem(a, pages: pages)
                        migrations.add(1, ordering: .relaxed)
                    }
                    stop.store(1, ordering: .releasing)
                    return
                }
                var v = 0
                while stop.load(ordering: .acquiring) == 0 {
                    v += 1
                    for p in stride(from: 0, to: pages, by: huge ? 64 : 1) {
                        guard (try? mm.store64(a + UInt64(p * pageSize + 8 * t), UInt64(v))) != nil else { return }
                    }
                    lastWritten[t].value.store(v, ordering: .releasing)
                }
            }
            try #require(ok)
            #expect(migrations.load(ordering: .acquiring) == rounds)
            for t in 0..<writers {
                let v = UInt64(lastWritten[t].current)
                for p in stride(from: 0, to: pages, by: huge ? 64 : 1) {
                    #expect(try mm.load64(a + UInt64(p * pageSize + 8 * t)) == v, "writer \(t) page \(p)")
                }
            }
            // Everything but the writers' slots still holds the pattern.
            for p in 0..<pages {
                let base = a + UInt64(p * pageSize)
                #expect(try mm.verifyPattern(base + UInt64(8 * writers), length: pageSize - 8 * writers, seed: 1) == nil)
            }
            #expect(kernel.vmstat[.tlbStaleAccesses] == 0)
            #expect(kernel.diagnostics(of: .staleTLB).isEmpty)
        }
    }
}

/// The frame (pfn) the page tables map at `address`, if present.
private func mappedFrame(_ mm: AddressSpace, _ address: UInt64) -> UInt64? {
    let (level, e) = mm.entry(at: address)
    guard e.kind == .present else { return nil }
    return level == .pmd ? e.pfn + (address >> 12) & 511 : e.pfn
}

private func delta(_ before: [String: UInt64], _ kernel: Kernel, _ item: VMStatItem) -> Int64 {
    Int64(kernel.vmstat[item]) - Int64(before[item.name, default: 0])
}
