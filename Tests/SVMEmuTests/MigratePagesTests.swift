import Foundation
import Synchronization
import Testing
import TestSupport
@testable import SVMEmu

// migrate_pages / move_pages for system memory: every migration's bytes are
// checked, and each rule is shown by the locks and references themselves.

/// Maps `pages` 4 KiB pages, fills them with a pattern (so they live on node 0).
private func filled(_ mm: AddressSpace, pages: Int, seed: UInt64 = 7) throws -> UInt64 {
    let a = try mm.mmap(length: pages * pageSize)
    try mm.fillPattern(a, length: pages * pageSize, seed: seed)
    return a
}

private func addresses(_ a: UInt64, pages: Int) -> [UInt64] { (0..<pages).map { a + UInt64($0 * pageSize) } }

private func node(of mm: AddressSpace, _ a: UInt64) -> PageStatus {
    var st: [PageStatus] = []
    _ = try? mm.movePages([a], nodes: nil, status: &st)
    return st.first ?? .error(.invalidArgument)
}

/// The folio mapped at `a`, isolated for a kernel-internal migration.
private func isolated(_ kernel: Kernel, _ mm: AddressSpace, _ a: UInt64) -> Folio? {
    mm.withMmapReadLock {
        guard let page = mm.followPage(a) else { return nil }
        let f = page.folio
        defer { f.put() }
        return kernel.isolateFolioLRU(f) ? f : nil
    }
}

/// A second CPU running in `mm` (a thread that touched it and stays, between
/// accesses), so flushes send it IPIs. Stop it when done.
private func remoteCPU(_ mm: AddressSpace, _ a: UInt64) -> WorkerThread? {
    let cpu = WorkerThread()
    guard cpu.run({ _ = try? mm.load(a) }) else { return nil }
    return cpu
}

@Suite("migrate_pages and move_pages (system memory)")
struct MigratePagesTests {

    @Test("move_pages moves 64 pages to node 1 with their bytes, under every algorithm", arguments: MigrationAlgorithm.allCases)
    func moveSmallPages(_ algorithm: MigrationAlgorithm) throws {
        try withMachine(thp: .never) { kernel, mm in
            let a = try filled(mm, pages: 64)
            let before = kernel.vmstat[.pgmigrateSuccess]
            var status: [PageStatus] = []
            let left = try mm.movePages(addresses(a, pages: 64), nodes: Array(repeating: 1, count: 64), status: &status,
                                        policy: MigratePagesPolicy(algorithm: algorithm))
            #expect(left == 0)
            #expect(status == Array(repeating: .node(1), count: 64))
            #expect(try mm.verifyPattern(a, length: 64 * pageSize, seed: 7) == nil)
            #expect(kernel.vmstat[.pgmigrateSuccess] - before == 64)
            #expect(node(of: mm, a + UInt64(63 * pageSize)) == .node(1))
            // And back, still intact.
            _ = try mm.movePages(addresses(a, pages: 64), nodes: Array(repeating: 0, count: 64), status: &status,
                                 policy: MigratePagesPolicy(algorithm: algorithm))
            #expect(status == Array(repeating: .node(0), count: 64))
            #expect(try mm.verifyPattern(a, length: 64 * pageSize, seed: 7) == nil)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("a 2 MiB THP moves whole: one thp_migration_success, bytes intact, still PMD-mapped", arguments: MigrationAlgorithm.allCases)
    func moveTHP(_ algorithm: MigrationAlgorithm) throws {
        try withMachine(thp: .always) { kernel, mm in
            let a = try mm.mmap(length: hugeSize)
            try mm.fillPattern(a, length: hugeSize, seed: 3)
            #expect(mm.entry(at: a).level == .pmd)
            let before = kernel.vmstat[.thpMigrationSuccess]
            var status: [PageStatus] = []
            _ = try mm.movePages([a], nodes: [1], status: &status, policy: MigratePagesPolicy(algorithm: algorithm))
            #expect(status == [.node(1)])
            #expect(kernel.vmstat[.thpMigrationSuccess] - before == 1)
            #expect(mm.entry(at: a).level == .pmd)
            #expect(try mm.verifyPattern(a, length: hugeSize, seed: 3) == nil)
        }
    }

    @Test("a THP with no 2 MiB destination is split and its 512 pieces migrate")
    func thpSplitAndRetry() throws {
        try withMachine(thp: .always) { kernel, mm in
            let a = try mm.mmap(length: hugeSize)
            try mm.fillPattern(a, length: hugeSize, seed: 5)
            var list = [try #require(isolated(kernel, mm, a))]
            let r = kernel.migratePages(&list, mode: .sync, reason: .syscall) { src in
                src.order == 0 ? kernel.allocateFolio(order: 0, node: 1) : nil
            }
            kernel.putbackMovableFolios(&list)
            #expect(r.error == nil)
            #expect(r.stats.thpSplit == 1)
            #expect(r.stats.succeeded == 512)
            #expect(r.notMigrated == 0)
            #expect(node(of: mm, a + UInt64(100 * pageSize)) == .node(1))
            #expect(try mm.verifyPattern(a, length: hugeSize, seed: 5) == nil)
        }
    }

    @Test("move_pages statuses: -EFAULT without a VMA and for the zero page and the huge zero page (moving and querying), -ENOENT for none, the node when already there, -EBUSY for a THP's second page")
    func statuses() throws {
        try withMachine(thp: .madvise) { kernel, mm in
            let a = try filled(mm, pages: 2)
            let b = try mm.mmap(length: 2 * pageSize)
            _ = try mm.load(b)  // the zero page
            let h = try mm.mmap(length: hugeSize)
            try mm.madvise(h, length: hugeSize, advice: .hugePage)
            try mm.store(h, 1)
            let z = try mm.mmap(length: hugeSize)
            try mm.madvise(z, length: hugeSize, advice: .hugePage)
            _ = try mm.load(z)  // the huge zero page
            #expect(mm.entry(at: z).level == .pmd && mm.entry(at: z).entry.isSpecial)
            let outside = mm.baseAddress + (1 << 30) * 3
            var st: [PageStatus] = []
            _ = try mm.movePages([outside, b + UInt64(pageSize), b, a, h, h + UInt64(pageSize), z + UInt64(pageSize)],
                                 nodes: [1, 1, 1, 0, 1, 1, 1], status: &st)
            #expect(st == [.error(.badAddress), .error(.noEntry), .error(.badAddress), .node(0), .node(1), .error(.busy),
                           .error(.badAddress)])
            _ = try mm.movePages([outside, b + UInt64(pageSize), b, a, z], nodes: nil, status: &st)
            #expect(st == [.error(.badAddress), .error(.noEntry), .error(.badAddress), .node(0), .error(.badAddress)])
            #expect(st.map(\.rawValue) == [-EFAULT, -ENOENT, -EFAULT, 0, -EFAULT])
            #expect(throws: Errno.noDevice) { try mm.movePages([a], nodes: [9], status: &st) }
            #expect(throws: Errno.invalidArgument) { try mm.movePages([a], nodes: [1, 1], status: &st) }
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("move_pages that stops at a node that does not exist moves the run before it and leaves the statuses after it as they were")
    func statusesAfterAnError() throws {
        try withMachine(thp: .never) { kernel, mm in
            let a = try filled(mm, pages: 3, seed: 12)
            let pages = (0..<3).map { a + UInt64($0 * pageSize) }
            var st: [PageStatus] = [.error(.busy), .error(.busy), .error(.busy)]
            #expect(throws: Errno.noDevice) { try mm.movePages(pages, nodes: [1, 9, 1], status: &st) }
            #expect(st == [.node(1), .error(.busy), .error(.busy)])
            #expect(node(of: mm, pages[0]) == .node(1) && node(of: mm, pages[2]) == .node(0))
            #expect(try mm.verifyPattern(a, length: 3 * pageSize, seed: 12) == nil)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("migrate_pages(2) moves the whole address space from node 0 to node 1")
    func migratePagesSyscall() throws {
        try withMachine(thp: .never) { kernel, mm in
            let a = try filled(mm, pages: 40, seed: 11)
            #expect(try mm.migratePages(from: [0], to: [1]) == 0)
            for i in 0..<40 { #expect(node(of: mm, a + UInt64(i * pageSize)) == .node(1)) }
            #expect(try mm.verifyPattern(a, length: 40 * pageSize, seed: 11) == nil)
            #expect(throws: Errno.noDevice) { try mm.migratePages(from: [0], to: [7]) }
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("one batched flush for 64 pages where the unbatched kernel sends one IPI round per page")
    func batchedFlushCounts() throws {
        try withMachine(thp: .never) { kernel, mm in
            let a = try filled(mm, pages: 64)
            let remote = try #require(remoteCPU(mm, a))
            defer { _ = remote.stop() }
            var st: [PageStatus] = []
            var before = kernel.vmstat[.tlbRemoteFlush]
            _ = try mm.movePages(addresses(a, pages: 64), nodes: Array(repeating: 1, count: 64), status: &st,
                                 policy: MigratePagesPolicy(algorithm: .unbatched))
            #expect(kernel.vmstat[.tlbRemoteFlush] - before == 64)
            before = kernel.vmstat[.tlbRemoteFlush]
            _ = try mm.movePages(addresses(a, pages: 64), nodes: Array(repeating: 0, count: 64), status: &st,
                                 policy: MigratePagesPolicy(algorithm: .batched))
            #expect(kernel.vmstat[.tlbRemoteFlush] - before == 1)
            #expect(try mm.verifyPattern(a, length: 64 * pageSize, seed: 7) == nil)
        }
    }

    @Test("ASYNC and never-block give up on a locked folio; SYNC sleeps until the holder sees a waiter and lets go")
    func lockedFolioModes() throws {
        try withMachine(thp: .never) { kernel, mm in
            let a = try filled(mm, pages: 1)
            let folio = try #require(isolated(kernel, mm, a))
            #expect(folio.tryLock())
            for (mode, algorithm) in [(MigrateMode.async, MigrationAlgorithm.batched), (.sync, .neverBlock), (.syncLight, .neverBlock)] {
                var list = [folio]
                let r = kernel.migratePages(&list, mode: mode, reason: .syscall, policy: MigratePagesPolicy(algorithm: algorithm)) {
                    kernel.allocateFolio(order: $0.order, node: 1)
                }
                #expect(r.notMigrated == 1 && list == [folio], "\(mode) \(algorithm)")
                #expect(r.stats.lockWaits.count == 0)
            }
            // SYNC waits: the holder unlocks once the migrator sleeps on the lock (PG_waiters).
            let released = SharedCounter()
            Thread {
                _ = eventually(within: 5) { folio.flags.contains(.waiters) }
                folio.unlock()
                released.add()
            }.start()
            var list = [folio]
            let r = kernel.migratePages(&list, mode: .sync, reason: .syscall) { kernel.allocateFolio(order: $0.order, node: 1) }
            #expect(eventually(within: 10) { released.current == 1 })
            #expect(r.notMigrated == 0 && list.isEmpty)
            #expect(r.stats.lockWaits.count == 1)
            #expect(try mm.verifyPattern(a, length: pageSize, seed: 7) == nil)
        }
    }

    @Test("SYNC_LIGHT does not wait for the lock of a folio that is not uptodate; no mode but SYNC waits for writeback")
    func syncLightAndWriteback() throws {
        try withMachine(thp: .never) { kernel, mm in
            let a = try filled(mm, pages: 2)
            let f = try #require(isolated(kernel, mm, a))
            #expect(f.tryLock())
            f.clear(.uptodate)
            var list = [f]
            var r = kernel.migratePages(&list, mode: .syncLight, reason: .syscall) { kernel.allocateFolio(order: $0.order, node: 1) }
            #expect(r.notMigrated == 1 && r.stats.lockWaits.count == 0)
            f.set(.uptodate)
            f.unlock()
            kernel.putbackMovableFolios(&list)

            let g = try #require(isolated(kernel, mm, a + UInt64(pageSize)))
            #expect(g.tryLock())
            g.startWriteback()
            g.unlock()
            for mode in [MigrateMode.async, .syncLight] {
                list = [g]
                r = kernel.migratePages(&list, mode: mode, reason: .syscall) { kernel.allocateFolio(order: $0.order, node: 1) }
                #expect(r.notMigrated == 1 && r.stats.failedPages == 1, "\(mode)")
            }
            let ended = SharedCounter()
            Thread { usleep(20_000); g.endWriteback(); ended.add() }.start()
            list = [g]
            r = kernel.migratePages(&list, mode: .sync, reason: .syscall) { kernel.allocateFolio(order: $0.order, node: 1) }
            #expect(eventually(within: 10) { ended.current == 1 })
            #expect(r.notMigrated == 0)
            #expect(try mm.verifyPattern(a, length: 2 * pageSize, seed: 7) == nil)
        }
    }

    @Test("batched-v6.3-rc backs off with -EDEADLOCK instead of sleeping on B while holding A (ABBA with another thread)")
    func deadlockBackoff() throws {
        try withMachine(thp: .never) { kernel, mm in
            let a = try filled(mm, pages: 2)
            let A = try #require(isolated(kernel, mm, a))
            let B = try #require(isolated(kernel, mm, a + UInt64(pageSize)))
            #expect(B.tryLock())
            A.get()  // the other thread's reference: A's frame stays A's while it waits for it
            // The other thread holds B and needs A before it lets B go.
            let other = SharedCounter(), go = SharedCounter()
            let thread = Thread {
                defer { A.put() }
                // Once the migrator holds A (it asks for B's destination), wait for A.
                if eventually(within: 5, { go.current > 0 }), eventually(within: 5, { A.tryLock() }) {
                    other.add()
                    A.unlock()
                }
                B.unlock()
                other.add(10)
            }
            thread.start()
            var list = [A, B]
            let r = kernel.migratePages(&list, mode: .sync, reason: .syscall, policy: MigratePagesPolicy(algorithm: .batchedV63rc)) { src in
                if src == B { go.add() }
                return kernel.allocateFolio(order: src.order, node: 1)
            }
            #expect(eventually(within: 10) { other.current >= 10 })
            #expect(other.current == 11)
            #expect(r.stats.deadlockBackoffs >= 1)
            #expect(r.stats.stalls == 0)
            #expect(!list.contains(B))
            kernel.putbackMovableFolios(&list)
            #expect(node(of: mm, a + UInt64(pageSize)) == .node(1))
            #expect(try mm.verifyPattern(a, length: 2 * pageSize, seed: 7) == nil)
        }
    }

    /// A storm that needs A's lock to end B's writeback (a loop device's
    /// backing folio): the v6.3-rc batch waits for B's writeback holding A.
    private func writebackNeedsA(_ algorithm: MigrationAlgorithm, limitNanos: UInt64) throws -> (MigratePagesResult, [Diagnostic], Bool) {
        try withMachine(thp: .never) { kernel, mm in
            let a = try filled(mm, pages: 2)
            let A = try #require(isolated(kernel, mm, a))
            let B = try #require(isolated(kernel, mm, a + UInt64(pageSize)))
            A.get()  // the I/O path's reference, so A's frame stays A's
            #expect(B.tryLock())
            B.startWriteback()
            B.unlock()
            let go = SharedCounter(), done = SharedCounter()
            let io = Thread {
                _ = eventually(within: 10) { go.current > 0 }
                if eventually(within: 8, { A.tryLock() }) {
                    B.endWriteback()
                    A.unlock()
                } else {
                    B.endWriteback()
                }
                A.put()
                done.add()
            }
            io.start()
            var list = [A, B]
            var policy = MigratePagesPolicy(algorithm: algorithm)
            policy.waitLimitNanos = limitNanos
            let r = kernel.migratePages(&list, mode: .sync, reason: .syscall, policy: policy) { src in
                if src == B { go.add() }  // A is locked by now
                return kernel.allocateFolio(order: src.order, node: 1)
            }
            kernel.putbackMovableFolios(&list)
            let finished = eventually(within: 10) { done.current > 0 }
            #expect(try mm.verifyPattern(a, length: 2 * pageSize, seed: 7) == nil)
            return (r, kernel.takeDiagnostics(), finished)
        }
    }

    @Test("the v6.3-rc batch stalls waiting for writeback while holding a lock the writeback needs; mainline does not")
    func writebackDeadlock() throws {
        let (rc, rcDiagnostics, rcFinished) = try writebackNeedsA(.batchedV63rc, limitNanos: 50_000_000)
        #expect(rcFinished)
        #expect(rc.stats.stalls >= 1)
        #expect(rcDiagnostics.contains { $0.kind == .hungTask })
        let (main, mainDiagnostics, mainFinished) = try writebackNeedsA(.batched, limitNanos: 4_000_000_000)
        #expect(mainFinished)
        #expect(main.stats.stalls == 0)
        #expect(mainDiagnostics.isEmpty)
    }

    @Test("read-only folios defer their flush and hold their old frames until a write makes a mapping writable")
    func deferredFlush() throws {
        try withMachine(thp: .never) { kernel, mm in
            let a = try filled(mm, pages: 32)
            try mm.mprotect(a, length: 32 * pageSize, protection: .read)
            let remote = try #require(remoteCPU(mm, a))
            defer { _ = remote.stop() }
            let free0 = kernel.nodes[0].freePages
            var st: [PageStatus] = []
            let flushes = kernel.vmstat[.tlbRemoteFlush]
            _ = try mm.movePages(addresses(a, pages: 32), nodes: Array(repeating: 1, count: 32), status: &st,
                                 policy: MigratePagesPolicy(deferredFlush: true))
            #expect(st == Array(repeating: .node(1), count: 32))
            #expect(kernel.vmstat[.tlbRemoteFlush] == flushes)  // nothing flushed yet
            #expect(kernel.deferredTLB.heldFrames == 32)
            #expect(kernel.nodes[0].freePages == free0)  // old frames kept out of the allocator
            #expect(try mm.verifyPattern(a, length: 32 * pageSize, seed: 7) == nil)
            // Making the range writable gives up: one flush, frames back.
            try mm.mprotect(a, length: 32 * pageSize, protection: .readWrite)
            #expect(kernel.deferredTLB.heldFrames == 0)
            #expect(kernel.deferredTLB.giveUpFlushes == 1)
            #expect(kernel.vmstat[.tlbRemoteFlush] == flushes + 1 + 1)  // the deferred flush, then mprotect's own
            #expect(kernel.nodes[0].freePages == free0 + 32)
            try mm.store(a, 9)
        }
    }

    @Test("with the give-up-on-write rule off, a write fault does not flush the deferred translations")
    func giveUpSwitch() throws {
        try withMachine(thp: .never) { kernel, mm in
            let a = try filled(mm, pages: 4)
            try mm.mprotect(a, length: 4 * pageSize, protection: .read)
            var st: [PageStatus] = []
            _ = try mm.movePages(addresses(a, pages: 4), nodes: Array(repeating: 1, count: 4), status: &st,
                                 policy: MigratePagesPolicy(deferredFlush: true))
            #expect(kernel.deferredTLB.heldFrames == 4)
            kernel.deferredTLB.giveUpOnWrite = false
            try mm.mprotect(a, length: 4 * pageSize, protection: .readWrite)
            try mm.store(a, 1)
            #expect(kernel.deferredTLB.heldFrames == 4)
            #expect(kernel.deferredTLB.giveUpFlushes == 0)
            kernel.deferredTLB.giveUpOnWrite = true
            #expect(kernel.deferredTLB.flush() == 4)
        }
    }

    @Test("deferred flush: a stale reader of a read-only page is silent; a write fault gives up and flushes first, and without that rule the stale reader misses the write and the checker says so",
          arguments: [true, false])
    func staleEntryChecker(giveUpOnWrite: Bool) throws {
        try withMachine(thp: .never) { kernel, mm in
            let a = try filled(mm, pages: 8)
            // Read-only PTEs in a writable VMA: the next write is a write
            // fault. Pages a child shared until it exited are no longer
            // exclusive, so they stay read-only (mprotect would make
            // exclusive ones writable at once).
            _ = try mm.fork()  // the child exits at once
            #expect(!mm.entry(at: a).entry.isWrite)
            let reader = WorkerThread()
            defer { _ = reader.stop() }
            let seen = SharedCounter()
            let readPage0 = { @Sendable in seen.value.store(Int((try? mm.load(a + 100)) ?? 0), ordering: .releasing) }
            #expect(reader.run(readPage0))
            let original = seen.current
            kernel.deferredTLB.giveUpOnWrite = giveUpOnWrite
            var st: [PageStatus] = []
            _ = try mm.movePages(addresses(a, pages: 8), nodes: Array(repeating: 1, count: 8), status: &st,
                                 policy: MigratePagesPolicy(deferredFlush: true))
            #expect(st == Array(repeating: .node(1), count: 8))
            #expect(kernel.deferredTLB.heldFrames == 8)
            // The reader still reads the old frame: same bytes, no report.
            #expect(reader.run(readPage0))
            #expect(seen.current == original)
            #expect(kernel.vmstat[.tlbStaleAccesses] == 0)

            let newValue = UInt8(truncatingIfNeeded: original &+ 1)
            try mm.store(a + 100, newValue)
            #expect(reader.run(readPage0))
            if giveUpOnWrite {
                #expect(kernel.deferredTLB.giveUpFlushes == 1)
                #expect(seen.current == Int(newValue))
                #expect(kernel.vmstat[.tlbStaleAccesses] == 0)
                #expect(kernel.diagnostics.isEmpty)
            } else {
                // The write went to the new frame; the reader's stale entry still reads the old one.
                #expect(seen.current == original)
                let stale = kernel.takeStaleTLBAccesses()
                #expect(stale.count == 1)
                #expect(stale.first?.detail.contains("read at 0x\(String(a + 100, radix: 16))") == true)
                kernel.deferredTLB.flush()
            }
        }
    }

    @Test("the multi-threaded and offload copiers move the same bytes, 4 KiB and 2 MiB")
    func copiers() throws {
        let mt = MultiThreadCopier(threads: 2, thresholdPages: 1)
        defer { mt.shutdown() }
        let dma = OffloadCopier(model: .pcie5, channels: 4)
        for copier in [mt as any FolioCopier, dma] {
            try withMachine(thp: .always) { kernel, mm in
                let a = try mm.mmap(length: hugeSize)
                try mm.fillPattern(a, length: hugeSize, seed: 1)
                let b = try mm.mmap(length: 64 * pageSize)
                try mm.madvise(b, length: 64 * pageSize, advice: .noHugePage)
                try mm.fillPattern(b, length: 64 * pageSize, seed: 2)
                var st: [PageStatus] = []
                _ = try mm.movePages([a] + addresses(b, pages: 64), nodes: Array(repeating: 1, count: 65), status: &st,
                                     policy: MigratePagesPolicy(copier: copier))
                #expect(st == Array(repeating: .node(1), count: 65), "\(copier.name)")
                #expect(try mm.verifyPattern(a, length: hugeSize, seed: 1) == nil)
                #expect(try mm.verifyPattern(b, length: 64 * pageSize, seed: 2) == nil)
            }
        }
        #expect(dma.offloaded > 0)
    }

    @Test("a DMA channel that is still busy refuses the next transaction and the CPU copies it")
    func offloadFallback() throws {
        let slow = LinkModel(name: "slow", peakGBps: 0.02)
        let dma = OffloadCopier(model: slow, channels: 1, foliosPerTransaction: 1)
        let src = UnsafeMutableRawPointer.allocate(byteCount: 2 * pageSize, alignment: pageSize)
        let dst = UnsafeMutableRawPointer.allocate(byteCount: 2 * pageSize, alignment: pageSize)
        defer { src.deallocate(); dst.deallocate() }
        for i in 0..<(2 * pageSize) { src.storeBytes(of: UInt8(truncatingIfNeeded: i * 7), toByteOffset: i, as: UInt8.self) }
        let jobs = [FolioCopyJob(destination: dst, source: src, bytes: pageSize),
                    FolioCopyJob(destination: dst + pageSize, source: src + pageSize, bytes: pageSize)]
        jobs.withUnsafeBufferPointer { dma.copy($0) }
        #expect(dma.offloaded == 1)
        #expect(dma.cpuFallbacks == 1)
        #expect(memcmp(src, dst, 2 * pageSize) == 0)
    }

    @Test("readers never see a wrong byte while pages migrate back and forth, under every algorithm", arguments: MigrationAlgorithm.allCases)
    func readersDuringMigration(_ algorithm: MigrationAlgorithm) throws {
        try withMachine(thp: .never) { kernel, mm in
            let pages = 128
            let a = try filled(mm, pages: pages, seed: 21)
            let stop = SharedCounter(), bad = SharedCounter(), reads = SharedCounter()
            let readers = runThreads(3, timeout: 20, keepAlive: [kernel, mm]) { t in
                if t == 0 {
                    var st: [PageStatus] = []
                    for round in 0..<6 {
                        _ = try? mm.movePages(addresses(a, pages: pages), nodes: Array(repeating: (round + 1) & 1, count: pages),
                                              status: &st, policy: MigratePagesPolicy(algorithm: algorithm))
                    }
                    stop.add()
                    return
                }
                var i = 0
                while stop.current == 0 {
                    let addr = a + UInt64((i * 7 % pages) * pageSize + 8 * (i % 512))
                    if (try? mm.load64(addr)) != AddressSpace.patternWord(addr, 21) { bad.add() }
                    reads.add()
                    i += 1
                }
            }
            #expect(readers)
            #expect(bad.current == 0)
            #expect(reads.current > 0)
            #expect(try mm.verifyPattern(a, length: pages * pageSize, seed: 21) == nil)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("the multi-threaded copier copies every byte of batches of every shape, the first one posted before its worker ran included")
    func multiThreadCopierShapes() throws {
        // Sizes of one batch each: one folio split across threads, two, a run
        // of small folios dealt out, a mix, and one 2 MiB folio.
        let shapes: [[Int]] = [[hugeSize], [pageSize, pageSize], Array(repeating: pageSize, count: 300),
                               [hugeSize, pageSize, pageSize, 16 * pageSize], Array(repeating: 4 * pageSize, count: 40)]
        let total = shapes.map { $0.reduce(0, +) }.max()!
        let src = UnsafeMutableRawPointer.allocate(byteCount: total, alignment: pageSize)
        let dst = UnsafeMutableRawPointer.allocate(byteCount: total, alignment: pageSize)
        defer { src.deallocate(); dst.deallocate() }
        for i in stride(from: 0, to: total, by: 8) { src.storeBytes(of: UInt64(i) &* 0x9E37_79B9, toByteOffset: i, as: UInt64.self) }
        let copier = MultiThreadCopier(threads: 3, thresholdPages: 1)
        defer { copier.shutdown() }
        let done = SharedCounter()
        let caller = WorkerThread()
        let (srcBits, dstBits) = (UInt(bitPattern: src), UInt(bitPattern: dst))
        // The first copy follows the creation at once: its workers may not have run yet.
        caller.start {
            let src = UnsafeMutableRawPointer(bitPattern: srcBits)!, dst = UnsafeMutableRawPointer(bitPattern: dstBits)!
            for sizes in shapes {
                memset(dst, 0, total)
                var jobs: [FolioCopyJob] = []
                var offset = 0
                for size in sizes {
                    jobs.append(FolioCopyJob(destination: dst + offset, source: src + offset, bytes: size))
                    offset += size
                }
                jobs.withUnsafeBufferPointer { copier.copy($0) }
                if memcmp(src, dst, offset) == 0 { done.add() }
            }
        }
        #expect(eventually(within: 20) { done.current == shapes.count })
        #expect(caller.stop())
        #expect(copier.singleThreadedBatches == 0)
    }

    @Test("with the phase timers on, a batched migration records its unmap, flush, copy and remap phases, and the shootdown wait inside the flush")
    func migrationPhases() throws {
        try withMachine(thp: .never) { kernel, mm in
            let a = try filled(mm, pages: 64)
            guard let cpu = remoteCPU(mm, a) else { Issue.record("no second CPU"); return }
            defer { _ = cpu.stop() }
            kernel.phases.isEnabled = true
            var st: [PageStatus] = []
            _ = try mm.movePages(addresses(a, pages: 64), nodes: Array(repeating: 1, count: 64), status: &st)
            kernel.phases.isEnabled = false
            let t = kernel.phases.totals()
            for phase in [MigrationPhase.unmap, .flush, .copy, .remap] {
                #expect((t[phase]?.count ?? 0) >= 1, "\(phase.name)")
            }
            // The remote CPU has the mm loaded, so the one flush sent it an IPI and timed the round.
            #expect((t[.tlbFlush]?.count ?? 0) >= 1)
            #expect(MigrationPhase.tlbFlush.isNested && !MigrationPhase.flush.isNested)
            #expect(try mm.verifyPattern(a, length: 64 * pageSize, seed: 7) == nil)
        }
    }

    @Test("get_user_pages_fast_only: a referenced page where one is present; nil where nothing is mapped, for the zero page and outside every VMA")
    func getUserPage() throws {
        try withMachine(thp: .never) { kernel, mm in
            let a = try filled(mm, pages: 1)
            let page = try #require(mm.getUserPage(a))
            let before = page.folio.refCount
            #expect(before >= 2, "the mapping's reference and ours")
            page.folio.put()
            #expect(page.folio.refCount == before - 1)
            let hole = try mm.mmap(length: 2 * pageSize)
            #expect(mm.getUserPage(hole) == nil, "nothing mapped yet")
            _ = try mm.load(hole + UInt64(pageSize))  // a read fault maps the zero page
            #expect(mm.getUserPage(hole + UInt64(pageSize)) == nil)
            #expect(mm.getUserPage(0x10) == nil, "no VMA")
        }
    }

    @Test("move_pages after fork and mremap: the rmap finds each side at its own address with more VMAs than its lock-free copy holds")
    func movePagesAfterForkAndMremap() throws {
        try withMachine(thp: .never) { kernel, mm in
            let pages = 16
            let a = try filled(mm, pages: pages)
            // Every other page read-only: 16 VMAs in each process, 32 in the
            // family, more than the walks' lock-free copy (8): they take the lock.
            for p in stride(from: 0, to: pages, by: 2) {
                try mm.mprotect(a + UInt64(p * pageSize), length: pageSize, protection: .read)
            }
            #expect(mm.mappings.count >= pages)
            let child = try mm.fork()
            let target = try mm.mmap(length: pageSize)
            let moved = a + UInt64(5 * pageSize)
            #expect(try mm.mremap(moved, oldLength: pageSize, newLength: pageSize, flags: [.mayMove, .fixed], newAddress: target) == target)
            let parentAt = (0..<pages).map { $0 == 5 ? target : a + UInt64($0 * pageSize) }
            var status: [PageStatus] = []
            _ = try mm.movePages(parentAt, nodes: Array(repeating: 1, count: pages), status: &status, flags: .moveAll)
            #expect(status == Array(repeating: .node(1), count: pages))
            for p in 0..<pages {
                let c = child.entry(at: a + UInt64(p * pageSize)).entry, q = mm.entry(at: parentAt[p]).entry
                #expect(c.kind == .present && c.pfn == q.pfn, "page \(p): child \(c), parent \(q)")
                #expect(node(of: child, a + UInt64(p * pageSize)) == .node(1), "page \(p)")
            }
            #expect(try child.verifyPattern(a, length: pages * pageSize, seed: 7) == nil)
            #expect(try mm.load64(target) == child.load64(moved))
            let audit = kernel.audit()
            #expect(audit.isClean, "\(audit)")
            #expect(kernel.diagnostics.isEmpty, "\(kernel.diagnostics)")
        }
    }
}

@Suite("the multi-threaded copier's choice")
struct CopierChoiceTests {
    @Test("every batch above the threshold is split, copied alone by choice, or copied alone on a busy host, and every byte arrives")
    func everyBatchIsAccounted() throws {
        let bytes = 2 << 20
        let src = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 4096)
        let dst = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 4096)
        defer { src.deallocate(); dst.deallocate() }
        for i in stride(from: 0, to: bytes, by: 8) { src.storeBytes(of: UInt64(i) &* 0x9E37_79B9, toByteOffset: i, as: UInt64.self) }
        let copier = MultiThreadCopier(threads: 2, thresholdPages: 1)
        defer { copier.shutdown() }
        copier.begin()
        var intact = 0
        for _ in 0..<40 {
            memset(dst, 0, bytes)
            let job = [FolioCopyJob(destination: dst, source: src, bytes: bytes)]
            job.withUnsafeBufferPointer { copier.copy($0) }
            if memcmp(src, dst, bytes) == 0 { intact += 1 }
        }
        copier.end()
        #expect(intact == 40)
        #expect(copier.singleThreadedBatches == 0)
        #expect(copier.splitBatches + copier.adaptiveSingleBatches + copier.busyHostBatches == 40)
    }
}
