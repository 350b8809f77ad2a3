import Testing
import TestSupport
@testable import SVMEmu

/// A test driver with a lock-order bug: its fault path takes the folio lock
/// and then its own lock; its invalidation path takes its lock and then the
/// folio lock (an ABBA).
final class ABBADriver: @unchecked Sendable {
    let lock: KernelMutex
    let folio: Folio
    var faults = 0, invalidations = 0   // under lock

    init(folio: Folio, lockName: String = "abba driver lock") {
        self.folio = folio
        lock = KernelMutex(lockName)
    }

    func fault() {
        folio.lock()
        lock.withLock { faults += 1 }
        folio.unlock()
    }

    func invalidate() {
        lock.withLock {
            folio.lock()
            invalidations += 1
            folio.unlock()
        }
    }
}

@Suite("Deterministic scheduler")
struct DeterministicSchedulerTests {

    /// Two threads on the ABBA driver, each going at it `rounds` times.
    static func abba(_ kernel: Kernel, _ folio: Folio, rounds: Int = 4) -> (DeterministicScheduler) -> Void {
        { s in
            let driver = ABBADriver(folio: folio)
            s.name(folio, "folio lock")
            s.name(driver.lock, "driver lock")
            s.spawn("faulter") { for _ in 0..<rounds { driver.fault() } }
            s.spawn("invalidator") { for _ in 0..<rounds { driver.invalidate() } }
        }
    }

    @Test("threads take turns under a KernelMutex and finish; virtual sleeps take no host time")
    func mutexRunCompletes() throws {
        let counter = KernelMutex("counter")
        final class Box: @unchecked Sendable { var n = 0 }
        let box = Box()
        let s = DeterministicScheduler(.init(seed: 3))
        for i in 0..<4 {
            s.spawn("t\(i)") {
                for _ in 0..<100 {
                    counter.withLock {
                        let v = box.n
                        HostClock.sleep(nanos: 1_000_000)   // 1 ms virtual inside the lock
                        box.n = v + 1
                    }
                }
            }
        }
        let start = HostClock.hostNanos()
        #expect(s.run() == .completed)
        #expect(box.n == 400)
        #expect(HostClock.hostNanos() - start < 5_000_000_000, "400 ms of virtual sleeps must not be slept")
    }

    @Test("the same seed gives the same step log")
    func sameSeedSameSteps() throws {
        func steps(_ seed: UInt64) -> [DeterministicScheduler.Step] {
            let lock = KernelMutex("l")
            var c = DeterministicScheduler.Configuration(seed: seed)
            c.logSteps = 10_000
            let s = DeterministicScheduler(c)
            for i in 0..<3 {
                s.spawn("t\(i)") { for _ in 0..<20 { lock.withLock { HostClock.sleep(nanos: 100) } } }
            }
            #expect(s.run() == .completed)
            return s.stepLog
        }
        let a = steps(42)
        #expect(!a.isEmpty)
        #expect(a == steps(42))
    }

    @Test("explore finds the ABBA between a driver lock and the folio lock, and its seed replays it")
    func exploreFindsABBA() throws {
        let kernel = try makeKernel()
        let folio = try #require(kernel.allocateFolio(order: 0))
        let found = DeterministicScheduler.explore(schedules: 1000, Self.abba(kernel, folio))
        let f = try #require(found, "1000 schedules must find the ABBA")
        #expect(f.deadlock.cycle.count == 2)
        let names = Set(f.deadlock.cycle.map { $0.waitsFor })
        #expect(names == ["folio lock", "driver lock"])
        for w in f.deadlock.cycle { #expect(w.heldBy != nil && w.heldBy != w.thread) }

        // Replay: the seed alone reproduces the same deadlock, step for step.
        let kernel2 = try makeKernel()
        let folio2 = try #require(kernel2.allocateFolio(order: 0))
        var c = DeterministicScheduler.Configuration(seed: f.seed)
        c.logSteps = 1000
        let replay = DeterministicScheduler(c)
        Self.abba(kernel2, folio2)(replay)
        #expect(replay.run() == .deadlock(f.deadlock))
        #expect(!replay.stepLog.isEmpty)

        // Lock-order validation is on under the scheduler: it saw both orders.
        let v = try #require(LockOrder.violations(involving: "abba driver lock").first)
        #expect(Set([v.closing.held, v.closing.taken]) == ["abba driver lock", "folio lock"])
    }

    @Test("lockdep catches the ABBA on real threads without a deadlock, naming both acquisition sites")
    func lockdepCatchesABBAWithoutDeadlock() throws {
        let kernel = try makeKernel()
        let folio = try #require(kernel.allocateFolio(order: 0))
        let driver = ABBADriver(folio: folio, lockName: "abba driver lock (real threads)")
        LockOrder.enable()
        defer { LockOrder.disable() }
        // One thread, one path after the other: nothing can deadlock.
        driver.fault()
        driver.invalidate()
        #expect(driver.faults == 1 && driver.invalidations == 1)
        let v = try #require(LockOrder.violations(involving: "abba driver lock (real threads)").first)
        #expect(v.cycle.count == 1)
        #expect(v.cycle[0].held == "folio lock" && v.cycle[0].taken == "abba driver lock (real threads)")
        #expect(v.closing.held == "abba driver lock (real threads)" && v.closing.taken == "folio lock")
        // Both sites are in this file: fault()'s driver lock, invalidate()'s folio lock.
        #expect(v.cycle[0].takenSite.hasPrefix("DeterministicSchedulerTests.swift:"))
        #expect(v.closing.takenSite.hasPrefix("DeterministicSchedulerTests.swift:"))
        #expect(v.description.contains("lock order violation"))
        folio.put()
    }

    @Test("the mmap lock is a scheduling point: a fault waits in the scheduler while another emulated thread holds it for writing")
    func mmapLockIsASchedulingPoint() throws {
        let kernel = try makeKernel()
        let mm = try AddressSpace(kernel: kernel)
        // Never touched: the reader's load faults (demand zero), under the mmap read lock.
        let base = try mm.mmap(length: PageGeometry.pageSize)
        final class Clocks: @unchecked Sendable { var unlocked: UInt64 = 0, read: UInt64 = 0, value: UInt8 = 1 }
        let clocks = Clocks()
        var c = DeterministicScheduler.Configuration(seed: 5)
        c.preemptions = 0
        c.hostTimeoutSeconds = 20   // a host rwlock here would deadlock the scheduler's host thread: the run would time out
        let s = DeterministicScheduler(c)
        s.spawn("writer") {
            mm.mmapWriteLock()
            HostClock.sleep(nanos: 50_000)   // the reader runs meanwhile, and must wait
            clocks.unlocked = HostClock.nanos()
            mm.mmapWriteUnlock()
        }
        s.spawn("reader") {
            HostClock.sleep(nanos: 1_000)
            clocks.value = (try? mm.load(base)) ?? 1
            clocks.read = HostClock.nanos()
        }
        #expect(s.run() == .completed)
        #expect(clocks.value == 0)
        #expect(clocks.read > clocks.unlocked, "the fault's read lock waited for the writer")
        withExtendedLifetime(mm) {}
    }

    @Test("the test machine validates lock order on every thread: a plain thread's ABBA is caught without enable()")
    func lockdepOnForEveryTest() throws {
        #expect(LockOrder.isEnabledEverywhere, "Tests/CTestSupport turns lockdep on before any test runs")
        let kernel = try makeKernel()
        let folio = try #require(kernel.allocateFolio(order: 0))
        let driver = ABBADriver(folio: folio, lockName: "abba driver lock (test machine)")
        let ok = runThreads(1, keepAlive: [kernel]) { _ in
            #expect(LockOrder.isEnabled)
            driver.fault()
            driver.invalidate()
        }
        #expect(ok)
        #expect(!LockOrder.violations(involving: "abba driver lock (test machine)").isEmpty)
        folio.put()
    }

    @Test("a consistent order is no violation, and a trylock records no dependency")
    func lockdepQuietOnConsistentOrder() throws {
        let kernel = try makeKernel()
        let folio = try #require(kernel.allocateFolio(order: 0))
        let outer = KernelMutex("lockdep outer"), inner = KernelMutex("lockdep inner")
        LockOrder.enable()
        defer { LockOrder.disable() }
        for _ in 0..<3 { outer.withLock { inner.withLock {} } }
        // inner then outer, but by trylock: it cannot wait, so it is no dependency.
        inner.withLock { if outer.tryLock() { outer.unlock() } }
        #expect(LockOrder.violations(involving: "lockdep outer").isEmpty)
        folio.put()
    }
    @Test("the kernel's spinlocks are lock classes: a page-table lock and a driver mutex taken in both orders are a cycle")
    func spinlocksAreClasses() throws {
        let kernel = try makeKernel()
        let mm = try AddressSpace(kernel: kernel)
        let base = try mm.mmap(length: 2 * PageGeometry.pmdSize)
        let m = KernelMutex("lockdep spinlock test mutex")
        LockOrder.enable()
        defer { LockOrder.disable() }
        m.withLock { mm.ptl(at: base).withLock {} }
        // Two page-table locks nest without a report (fork and mremap hold two).
        mm.ptl(at: base).withLock(nesting: mm.ptl(at: base + PageGeometry.pmdSize64)) {}
        #expect(LockOrder.violations(involving: "lockdep spinlock test mutex").isEmpty)
        mm.ptl(at: base).withLock { m.withLock {} }
        let v = try #require(LockOrder.violations(involving: "lockdep spinlock test mutex").first)
        #expect(v.closing.held == "page-table lock" && v.closing.taken == "lockdep spinlock test mutex")
        #expect(v.cycle.map(\.taken) == ["page-table lock"])
        #expect(v.closing.heldSite.hasPrefix("DeterministicSchedulerTests.swift:"))
        withExtendedLifetime(mm) {}
    }

    @Test("each reader of a semaphore releases its own hold; a folio lock released by another thread is no longer held")
    func holdsAreReleasedWhereTheyWereTaken() throws {
        let kernel = try makeKernel()
        let folio = try #require(kernel.allocateFolio(order: 0))
        let sem = KernelRWSemaphore("lockdep shared readers")
        let after = KernelMutex("lockdep after the readers")
        let holding = SharedCounter(), released = SharedCounter()
        let ok = runThreads(2, keepAlive: [kernel]) { i in
            sem.downRead()
            holding.add()
            _ = eventually(within: 5) { holding.current == 2 }   // both readers hold it at once
            if i == 1 { _ = eventually(within: 5) { released.current == 1 } }
            sem.upRead()
            released.add()
            _ = eventually(within: 5) { released.current == 2 }
            after.withLock {}   // a reader hold left behind would make "readers, then after"
        }
        #expect(ok)
        // Taken here, released on another thread, then this thread takes a lock.
        #expect(folio.tryLock())
        #expect(onAnotherThread { folio.unlock(); return true })
        after.withLock {}
        let deps = LockOrder.dependencies.filter { $0.taken == "lockdep after the readers" }
        #expect(deps.isEmpty, "\(deps)")
        folio.put()
    }
    @Test("a deadlock report names a kernel spinlock by its lock class and where its holder took it")
    func deadlockNamesSpinlocks() throws {
        let kernel = try makeKernel()
        let mm = try AddressSpace(kernel: kernel)
        let base = try mm.mmap(length: PageGeometry.pageSize)
        let m = KernelMutex("deadlock report test mutex")
        var c = DeterministicScheduler.Configuration(seed: 2)
        c.hostTimeoutSeconds = 20
        let s = DeterministicScheduler(c)
        // Each takes one lock, sleeps (virtual time) and wants the other's: an ABBA that always deadlocks.
        s.spawn("ptl first") {
            let ptl = mm.ptl(at: base)
            ptl.lock()
            HostClock.sleep(nanos: 10_000)
            m.withLock {}
            ptl.unlock()
        }
        s.spawn("mutex first") {
            m.withLock {
                HostClock.sleep(nanos: 10_000)
                mm.ptl(at: base).withLock {}
            }
        }
        guard case .deadlock(let report) = s.run() else {
            Issue.record("no deadlock")
            return
        }
        let waits = report.cycle.map(\.waitsFor)
        #expect(waits.contains { $0.hasPrefix("page-table lock (taken at DeterministicSchedulerTests.swift:") }, "\(report)")
        #expect(waits.contains("deadlock report test mutex"), "\(report)")
        // The two threads stay parked on their locks: keep what they use alive.
        _ = Unmanaged.passRetained(mm)
        _ = Unmanaged.passRetained(kernel)
    }
}
