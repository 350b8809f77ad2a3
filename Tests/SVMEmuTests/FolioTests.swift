import Foundation
import Testing
import TestSupport
@testable import SVMEmu

@Suite("Folios and the folio lock")
struct FolioTests {

    @Test("tryLock fails while the lock is held and succeeds once it is released")
    func tryLockFailsWhileHeld() throws {
        try withMachine { kernel, _ in
            let folio = try #require(kernel.allocateFolio(order: 0, zeroed: true))
            #expect(!folio.isLocked)
            #expect(folio.tryLock())
            #expect(folio.isLocked)
            #expect(!folio.tryLock())
            #expect(!folio.tryLock())
            #expect(folio.isLocked)
            folio.unlock()
            #expect(!folio.isLocked)
            #expect(folio.tryLock())
            folio.unlock()
            // Locking never touched the bytes or the reference count.
            #expect(folio.refCount == 1)
            #expect(folio.withBytes { $0.allSatisfy { $0 == 0 } })
            folio.put()
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("waitUnlocked gives up after its timeout while the lock is held")
    func waitUnlockedTimesOut() throws {
        try withMachine { kernel, _ in
            let folio = try #require(kernel.allocateFolio(order: 0))
            folio.lock()
            let start = Date()
            #expect(!folio.waitUnlocked(timeoutNanos: 20_000_000))
            #expect(Date().timeIntervalSince(start) >= 0.015)
            folio.unlock()
            #expect(folio.waitUnlocked(timeoutNanos: 20_000_000))
            folio.put()
        }
    }

    @Test("a thread sleeping in lock() is woken by an unlock from a third thread")
    func unlockFromAnotherThreadWakesSleeper() throws {
        try withMachine { kernel, _ in
            let folio = try #require(kernel.allocateFolio(order: 0, zeroed: true))
            folio.lock()
            let acquired = SharedCounter()
            let sleeperDone = DispatchSemaphore(value: 0)
            let sleeper = Thread {
                folio.lock()
                acquired.add()
                sleeperDone.signal()
            }
            sleeper.start()
            // The sleeper announces itself with PG_waiters before it sleeps.
            let waiting = eventually { folio.flags.contains(.waiters) }
            if !waiting { _ = Unmanaged.passRetained(kernel) }
            try #require(waiting, "the second locker never set PG_waiters")
            usleep(20_000)
            #expect(acquired.current == 0, "lock() returned while the folio was locked")
            #expect(kernel.vmstat[.folioLockWaits] == 1)

            // Release from a thread that is neither the holder nor the sleeper.
            let released = onAnotherThread(keepAlive: [kernel]) { folio.unlock() }
            try #require(released)
            let woke = sleeperDone.wait(timeout: .now() + 5) == .success
            if !woke { _ = Unmanaged.passRetained(kernel) }
            try #require(woke, "the sleeper was not woken by unlock()")
            #expect(acquired.current == 1)
            #expect(folio.isLocked, "the woken sleeper holds the lock")
            #expect(!folio.flags.contains(.waiters))
            folio.unlock()
            #expect(!folio.isLocked)
            folio.put()
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("eight threads lock and unlock one folio 5,000 times each: no lost wake-up, exact total")
    func eightThreadsNoLostWakeup() throws {
        let kernel = try makeKernel()
        let folio = try #require(kernel.allocateFolio(order: 0, zeroed: true))
        // 40,000 lock rounds take ~3 s alone under ThreadSanitizer and several
        // times that beside the rest of the suite on 2 cores; a lost wake-up
        // never ends, so the bound only has to be far above a slow run.
        let iterations = 5_000
        let threads = 8
        // The counter lives in the folio's bytes, protected only by the folio lock.
        let finished = runThreads(threads, timeout: 240, keepAlive: [kernel]) { _ in
            let word = folio.unsafeBytes.assumingMemoryBound(to: Int.self)  // the folio outlives the threads
            for i in 0..<iterations {
                if i % 4 == 0, folio.tryLock() {
                    word.pointee += 1
                    folio.unlock()
                    continue
                }
                folio.lock()
                // A plain read-modify-write with a yield inside: a second holder would lose updates.
                let v = word.pointee
                if i % 64 == 0 { sched_yield() }
                word.pointee = v + 1
                folio.unlock()
            }
        }
        try #require(finished, "a thread stayed asleep on the folio lock (lost wake-up) or ran out of time")
        #expect(folio.withBytes { $0.load(as: Int.self) } == threads * iterations)
        #expect(!folio.isLocked)
        #expect(!folio.flags.contains(.waiters))
        #expect(folio.refCount == 1)
        folio.put()
        #expect(kernel.diagnostics.isEmpty)
    }

    @Test("get and put count references; the last put frees the folio and the node's free pages return")
    func getPutFreesAtZero() throws {
        try withMachine { kernel, _ in
            let node = kernel.nodes[1]
            let free0 = node.freePages
            let pgfree0 = kernel.vmstat[.pgfree]
            let folio = try #require(kernel.allocateFolio(order: 0, node: 1))
            #expect(node.freePages == free0 - 1)
            #expect(folio.refCount == 1)
            #expect(!folio.flags.contains(.buddy))
            folio.get()
            #expect(folio.refCount == 2)
            #expect(folio.tryGet())
            #expect(folio.refCount == 3)
            folio.put()
            folio.put()
            #expect(folio.refCount == 1)
            #expect(node.freePages == free0 - 1, "freed while still referenced")
            #expect(kernel.vmstat[.pgfree] == pgfree0)
            folio.put()
            #expect(folio.refCount == 0)
            #expect(folio.flags.contains(.buddy))
            #expect(node.freePages == free0)
            #expect(kernel.vmstat[.pgfree] == pgfree0 + 1)
            #expect(!folio.tryGet(), "tryGet must fail on a freed folio")

            // The same for a 2 MiB folio: 512 pages leave and come back.
            let huge = try #require(kernel.allocateFolio(order: PageGeometry.pmdOrder, node: 1))
            #expect(node.freePages == free0 - PageGeometry.pmdPages64)
            huge.get()
            huge.put()
            #expect(node.freePages == free0 - PageGeometry.pmdPages64)
            huge.put()
            #expect(node.freePages == free0)
            #expect(kernel.vmstat[.pgfree] == pgfree0 + 513)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("an order-9 folio is a head and 511 tails that all resolve to it, over contiguous bytes")
    func orderNineHeadAndTails() throws {
        try withMachine { kernel, _ in
            let folio = try #require(kernel.allocateFolio(order: PageGeometry.pmdOrder, zeroed: true))
            #expect(folio.order == PageGeometry.pmdOrder)
            #expect(folio.pageCount == PageGeometry.pmdPages)
            #expect(folio.size == PageGeometry.pmdSize)
            #expect(folio.isLarge)
            #expect(folio.pfn % PageGeometry.pmdPages64 == 0, "a 2 MiB folio is 2 MiB aligned in pfn space")
            #expect(folio.flags.contains(.head))
            for i in 0..<PageGeometry.pmdPages {
                let page = try #require(kernel.page(pfn: folio.pfn + UInt64(i)))
                #expect(page == folio.page(i))
                if page.folio != folio { Issue.record("page \(i) resolves to \(page.folio), not the head"); break }
                page.withBytes { $0.storeBytes(of: UInt16(i), as: UInt16.self) }
            }
            #expect(folio.page(1).folio.flags.contains(.head))
            // The folio's bytes are the pages' bytes, in order.
            for i in 0..<PageGeometry.pmdPages {
                if folio.withBytes({ $0.load(fromByteOffset: i * PageGeometry.pageSize, as: UInt16.self) }) != UInt16(i) {
                    Issue.record("page \(i)'s bytes are not at offset \(i * PageGeometry.pageSize) of the folio"); break
                }
            }
            #expect(folio.refCount == 1)
            #expect(folio.mapCount == 0)
            folio.put()
            // Freed: each page is its own head again.
            #expect(folio.page(5).folio.pfn == folio.pfn + 5)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("a folio_put underflow is reported, not corrupting the count")
    func putUnderflowIsReported() throws {
        let kernel = try makeKernel()
        let free0 = kernel.freePages
        let folio = try #require(kernel.allocateFolio(order: 0))
        folio.put()
        #expect(kernel.freePages == free0)
        folio.put()
        #expect(folio.refCount == 0)
        #expect(!kernel.diagnostics(of: .referenceCount).isEmpty)
        #expect(kernel.freePages == free0, "a second put must not free the page twice")
    }

    @Test("freed base pages come back first in, first out: a range freed in order is handed out in order")
    func freedPagesComeBackInOrder() throws {
        try withMachine { kernel, _ in
            var folios: [Folio] = []
            for _ in 0..<64 { folios.append(try #require(kernel.allocateFolio(order: 0, node: 0))) }
            let pfns = folios.map(\.pfn)
            for f in folios { f.put() }
            // Frames freed earlier are handed out first; then ours, in the order freed.
            var held: [Folio] = []
            var first: Folio? = nil
            while first == nil, held.count < 1 << 15, let f = kernel.allocateFolio(order: 0, node: 0) {
                if f.pfn == pfns[0] { first = f } else { held.append(f) }
            }
            let head = try #require(first, "the first frame freed never came back")
            var again = [head.pfn]
            for _ in 1..<64 { again.append(try #require(kernel.allocateFolio(order: 0, node: 0)).pfn) }
            #expect(again == pfns, "the order the frames were freed in")
            for pfn in again { Page(pfn: pfn, kernel: kernel).folio.put() }
            for f in held { f.put() }
            #expect(kernel.diagnostics.isEmpty)
        }
    }
}
