import Testing
import TestSupport
@testable import SVMEmu

/// A test driver with a lock-order bug: its fault path takes the folio lock
/// and then its own lock; its invalidation path takes its lock and then the
/// folio lock (an ABBA).
final class ABBADriver: @unchecked Sendable {
    let lock = KernelMutex("abba driver lock")
    let folio: Folio
    var faults = 0, invalidations = 0   // under lock

    init(folio: Folio) { self.folio = folio }

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
    func mutexRunCompletes() {
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
    func sameSeedSameSteps() {
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
        let kernel = makeKernel()
        let folio = try #require(kernel.allocateFolio(order: 0))
        let found = DeterministicScheduler.explore(schedules: 1000, Self.abba(kernel, folio))
        let f = try #require(found, "1000 schedules must find the ABBA")
        #expect(f.deadlock.cycle.count == 2)
        let names = Set(f.deadlock.cycle.map { $0.waitsFor })
        #expect(names == ["folio lock", "driver lock"])
        for w in f.deadlock.cycle { #expect(w.heldBy != nil && w.heldBy != w.thread) }

        // Replay: the seed alone reproduces the same deadlock, step for step.
        let kernel2 = makeKernel()
        let folio2 = try #require(kernel2.allocateFolio(order: 0))
        var c = DeterministicScheduler.Configuration(seed: f.seed)
        c.logSteps = 1000
        let replay = DeterministicScheduler(c)
        Self.abba(kernel2, folio2)(replay)
        #expect(replay.run() == .deadlock(f.deadlock))
        #expect(!replay.stepLog.isEmpty)
    }
}
