import Synchronization
import Testing
import TestSupport
@testable import SVMEmu

/// The rwsem's algorithm (kernel/locking/rwsem.c) under the deterministic
/// scheduler: who holds it next.
@Suite("kernel rwsem")
struct KernelRWSemaphoreTests {

    @Test("a reader arriving while a writer waits queues behind it")
    func readerQueuesBehindWaitingWriter() throws {
        let sem = KernelRWSemaphore("rwsem fifo")
        let log = FolioLockTests.Log()
        let s = FolioLockTests.scheduler(cpus: 4)
        s.spawn("reader") {
            sem.downRead()
            log.took("reader")
            HostClock.sleep(nanos: 1_000_000)
            sem.upRead()
        }
        s.spawn("writer") {
            HostClock.sleep(nanos: 100_000)
            sem.downWrite()
            log.took("writer")
            HostClock.sleep(nanos: 100_000)
            sem.upWrite()
        }
        s.spawn("newcomer") {
            HostClock.sleep(nanos: 200_000)
            sem.downRead()
            log.took("newcomer")
            sem.upRead()
        }
        #expect(s.run() == .completed)
        #expect(log.order == ["reader", "writer", "newcomer"])
        #expect(!sem.isLocked)
    }

    @Test("an unlock grants the lock to every queued reader, those behind a writer too; the writer waits for them")
    func readersWokenAsABatch() throws {
        let sem = KernelRWSemaphore("rwsem batch")
        let log = FolioLockTests.Log()
        let s = FolioLockTests.scheduler(cpus: 8)
        s.spawn("holder") {
            sem.downWrite()
            HostClock.sleep(nanos: 1_000_000)
            log.took("holder out")
            sem.upWrite()
        }
        for (i, name) in ["r1", "w1", "r2"].enumerated() {
            s.spawn(name) {
                HostClock.sleep(nanos: UInt64(i + 1) * 100_000)
                if name == "w1" {
                    sem.downWrite()
                    log.took("w1")
                    sem.upWrite()
                } else {
                    sem.downRead()
                    log.took(name)
                    HostClock.sleep(nanos: 200_000)
                    log.took(name + " out")
                    sem.upRead()
                }
            }
        }
        #expect(s.run() == .completed)
        let order = log.order
        let at = { (name: String) in order.firstIndex(of: name) ?? -1 }
        #expect(at("r1") > at("holder out") && at("r2") > at("holder out"))
        #expect(at("w1") > at("r1 out") && at("w1") > at("r2 out"), "\(order)")
        #expect(!sem.isLocked)
    }

    @Test("a writer that keeps losing to a spinning writer sets the handoff after RWSEM_WAIT_TIMEOUT and then gets the lock")
    func writerHandoffAfterTimeout() throws {
        let sem = KernelRWSemaphore("rwsem handoff")
        let stolen = Mutex<Int>(0)
        let waiterGot = Mutex<(round: Int, waited: UInt64)>((-1, 0))
        let round = Mutex<Int>(0)
        // A slow wake-up: the unlocker takes it again before the woken waiter runs.
        let s = FolioLockTests.scheduler(cpus: 4, wake: 20_000)
        s.spawn("stealer") {
            sem.downWrite()
            HostClock.spin(nanos: 1_000_000)
            for i in 1...20 {
                round.withLock { $0 = i }
                sem.upWrite()
                sem.downWrite()
                if waiterGot.withLock({ $0.round }) >= 0 { break }
                stolen.withLock { $0 += 1 }
                HostClock.spin(nanos: 1_000_000)
            }
            sem.upWrite()
        }
        s.spawn("waiter") {
            HostClock.sleep(nanos: 100_000)
            let start = HostClock.nanos()
            sem.downWrite()
            let waited = HostClock.nanos() - start
            waiterGot.withLock { $0 = (round.withLock { $0 }, waited) }
            sem.upWrite()
        }
        #expect(s.run() == .completed)
        let got = waiterGot.withLock { $0 }
        #expect(got.round > 0 && got.round < 10, "the waiter got the lock at round \(got.round)")
        #expect(got.waited >= KernelRWSemaphore.waitTimeoutNanos, "it waited \(got.waited) ns")
        #expect(stolen.withLock { $0 } >= 3)
        #expect(!sem.isLocked)
    }

    @Test("on real threads readers and writers: the count the writers guard is exact")
    func realThreads() throws {
        let sem = KernelRWSemaphore("rwsem real")
        final class Box: @unchecked Sendable { var n = 0 }
        let box = Box()
        let threads = 4, rounds = 5_000
        #expect(runThreads(threads, timeout: 120, keepAlive: [sem, box]) { t in
            for i in 0..<rounds {
                if (i + t) % 3 == 0 {
                    sem.withReadLock { _ = box.n }
                } else {
                    sem.withWriteLock { box.n += 1 }
                }
            }
        })
        let writes = (0..<threads).reduce(0) { sum, t in sum + (0..<rounds).filter { ($0 + t) % 3 != 0 }.count }
        #expect(box.n == writes)
        #expect(!sem.isLocked)
        #expect(sem.tryDownRead())
        sem.upRead()
    }
}
