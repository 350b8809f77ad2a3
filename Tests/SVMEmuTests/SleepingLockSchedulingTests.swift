import Foundation
import Synchronization
import Testing
import TestSupport
@testable import SVMEmu

/// How the deterministic scheduler treats the kernel's sleeping locks (the
/// folio lock, a mutex, an rwsem) beside its spinning ones: who may be
/// preempted while holding one, and who holds a lock that many share.
@Suite("sleeping locks in the scheduler")
struct SleepingLockSchedulingTests {

    /// One CPU, two threads: `holder` takes a lock and spins 5 ms with it,
    /// `other` only records when it first ran. Returns whether `other` ran
    /// before the holder let go.
    func otherRanWhileHeld(lock: @escaping @Sendable () -> Void, unlock: @escaping @Sendable () -> Void) -> Bool {
        let order = Mutex<[String]>([])
        let s = DeterministicScheduler(CPUModelTests.configuration(cpus: 1))
        s.spawn("holder") {
            lock()
            for _ in 0..<100 { HostClock.spin(nanos: 50_000) }
            order.withLock { $0.append("holder unlocked") }
            unlock()
        }
        s.spawn("other") {
            order.withLock { $0.append("other ran") }
        }
        #expect(s.run() == .completed)
        return order.withLock { $0 } == ["other ran", "holder unlocked"]
    }

    @Test("a folio lock holder whose slice ran out is preempted (a sleeping lock); a page-table lock holder is not (preemption off)")
    func folioLockHolderIsPreemptible() throws {
        let kernel = try makeKernel()
        let mm = try AddressSpace(kernel: kernel)
        let base = try mm.mmap(length: PageGeometry.pageSize)
        let folio = try #require(kernel.allocateFolio(order: 0))
        let folioLock = otherRanWhileHeld(lock: { folio.lock() }, unlock: { folio.unlock() })
        let pageTableLock = otherRanWhileHeld(lock: { mm.ptl(at: base).lock() }, unlock: { mm.ptl(at: base).unlock() })
        #expect(folioLock)
        #expect(!pageTableLock)
        folio.put()
    }

    @Test("when one of two readers releases an rwsem the other still holds it: the deadlock through it is found")
    func sharedReaderStillHolds() throws {
        let sem = KernelRWSemaphore("shared reader test rwsem")
        let m = KernelMutex("shared reader test mutex")
        var c = CPUModelTests.configuration(cpus: 4)
        c.hostTimeoutSeconds = 20
        let s = DeterministicScheduler(c)
        s.spawn("r1") {
            sem.downRead()
            HostClock.sleep(nanos: 100_000)
            sem.upRead()
        }
        s.spawn("r2") {
            HostClock.sleep(nanos: 10_000)
            sem.downRead()                    // the last reader in: the owner recorded
            HostClock.sleep(nanos: 300_000)   // r1 has released meanwhile
            m.lock()                          // held by w: waits forever
        }
        s.spawn("w") {
            HostClock.sleep(nanos: 50_000)
            m.lock()
            HostClock.sleep(nanos: 200_000)
            sem.downWrite()                   // r2 still reads: waits forever
        }
        guard case .deadlock(let report) = s.run() else {
            Issue.record("no deadlock")
            return
        }
        #expect(Set(report.cycle.map(\.thread)) == ["r2", "w"], "\(report)")
        let r2 = report.waits.first { $0.thread == "r2" }
        #expect(r2?.holds.contains("shared reader test rwsem") == true, "\(report)")
        #expect(report.waits.first { $0.thread == "w" }?.heldBy == "r2", "\(report)")
        // The two threads stay parked on their locks: keep what they use alive.
        _ = Unmanaged.passRetained(sem)
        _ = Unmanaged.passRetained(m)
    }

    @Test("a futex wait that finds its word changed forgets the lock it was for: the thread's next wait is reported as a wait for its own word")
    func changedWordForgetsTheLock() throws {
        nonisolated(unsafe) let words = UnsafeMutablePointer<UInt32>.allocate(capacity: 2)
        words.initialize(repeating: 0, count: 2)
        let s = DeterministicScheduler(CPUModelTests.configuration(cpus: 1))
        s.name(UnsafeRawPointer(words), "the word")
        s.name(UnsafeRawPointer(words + 1), "the lock")
        s.spawn("waiter") {
            // A mutex waiter names its lock, then finds its word changed
            // (EAGAIN): that wait is over, and so is what it was for.
            DeterministicScheduler.willWait(for: UnsafeRawPointer(words + 1))
            guard let me = DeterministicScheduler.current else { return }
            #expect(me.scheduler.futexWait(me, words, 1, 0) == EAGAIN)
            _ = me.scheduler.futexWait(me, words, 0, 0)   // nobody wakes it
        }
        guard case .deadlock(let report) = s.run() else {
            Issue.record("no deadlock")
            return
        }
        #expect(report.waits.map(\.waitsFor) == ["the word"], "\(report)")
        // `words` is never freed: the thread stays parked on it.
    }
}
