import Synchronization
import Testing
import TestSupport
@testable import SVMEmu

/// The folio lock's wait queue (mm/filemap.c: `folio_wait_bit_common()`,
/// `folio_wake_bit()`, `wake_page_function()`), under the deterministic
/// scheduler: who holds the lock next.
@Suite("folio lock wait queue")
struct FolioLockTests {

    final class Log: @unchecked Sendable {
        let lock = Mutex<[String]>([])
        func took(_ name: String) { lock.withLock { $0.append(name) } }
        var order: [String] { lock.withLock { $0 } }
    }

    static func scheduler(cpus: Int = 4, wake: UInt64? = nil) -> DeterministicScheduler {
        var c = CPUModelTests.configuration(cpus: cpus)
        if let wake { c.costs.wake = wake }
        return DeterministicScheduler(c)
    }

    @Test("an unlock wakes one locker; the rest stay queued, first come, first served, with PG_waiters set")
    func oneLockerAtATime() throws {
        let kernel = try makeKernel()
        let folio = try #require(kernel.allocateFolio(order: 0))
        let log = Log()
        let queuedAfterUnlock = Mutex<(waiters: Bool, queued: Int)>((false, -1))
        let s = Self.scheduler(cpus: 8)
        s.spawn("holder") {
            folio.lock()
            HostClock.sleep(nanos: 1_000_000)   // three lockers queue meanwhile
            folio.unlock()
            let queued = kernel.folioWaitTable.waiters(word: folio.meta.flagsWord, pfn: folio.pfn).count
            queuedAfterUnlock.withLock { $0 = (folio.flags.contains(.waiters), queued) }
        }
        for i in 1...3 {
            s.spawn("w\(i)") {
                HostClock.sleep(nanos: UInt64(i) * 50_000)   // arrive in order 1...3
                folio.lock()
                log.took("w\(i)")
                HostClock.sleep(nanos: 100_000)
                folio.unlock()
            }
        }
        #expect(s.run() == .completed)
        #expect(log.order == ["w1", "w2", "w3"])
        let after = queuedAfterUnlock.withLock { $0 }
        #expect(after.queued == 2, "one locker woken, two still queued")
        #expect(after.waiters, "PG_waiters stays set while the queue holds waiters")
        #expect(!folio.isLocked && !folio.flags.contains(.waiters))
        #expect(kernel.vmstat[.folioLockWaits] == 3)
        folio.put()
        #expect(kernel.diagnostics.isEmpty)
    }

    @Test("a newcomer steals the lock from a woken locker five times (sysctl_page_lock_unfairness); the sixth unlock hands it over")
    func unfairnessThenHandoff() throws {
        let kernel = try makeKernel()
        let folio = try #require(kernel.allocateFolio(order: 0))
        let log = Log()
        let steals = Mutex<Int>(0)
        let lockedAtHandoff = Mutex<Bool>(false)
        // A slow wake-up: the unlocker comes back before the woken waiter runs.
        let s = Self.scheduler(cpus: 4, wake: 20_000)
        s.spawn("stealer") {
            folio.lock()
            HostClock.sleep(nanos: 100_000)   // the waiter queues meanwhile
            for _ in 0..<10 {
                folio.unlock()
                // Straight back, while the woken waiter is still waking up.
                guard folio.tryLock() else {
                    lockedAtHandoff.withLock { $0 = folio.isLocked }
                    break
                }
                steals.withLock { $0 += 1 }
                log.took("stealer")
                HostClock.sleep(nanos: 100_000)   // the waiter wakes, loses, queues again
            }
            folio.lock()
            log.took("stealer last")
            folio.unlock()
        }
        s.spawn("waiter") {
            HostClock.sleep(nanos: 10_000)
            folio.lock()
            log.took("waiter")
            HostClock.sleep(nanos: 10_000)
            folio.unlock()
        }
        #expect(s.run() == .completed)
        #expect(steals.withLock { $0 } == FolioWaitTable.pageLockUnfairness)
        #expect(lockedAtHandoff.withLock { $0 }, "the unlock took PG_locked for the woken waiter before it ran")
        #expect(log.order.suffix(2) == ["waiter", "stealer last"])
        #expect(!folio.isLocked && !folio.flags.contains(.waiters))
        folio.put()
        #expect(kernel.diagnostics.isEmpty)
    }

    @Test("folio_wait_locked sleepers ahead of the first locker wake with it; those behind wait for its unlock")
    func sharedWaitersUpToTheFirstLocker() throws {
        let kernel = try makeKernel()
        let folio = try #require(kernel.allocateFolio(order: 0))
        let log = Log()
        let s = Self.scheduler(cpus: 8)
        s.spawn("holder") {
            folio.lock()
            HostClock.sleep(nanos: 1_000_000)
            log.took("holder unlocks")
            folio.unlock()
        }
        // Queue order: s1, s2, locker, s3.
        for (i, name) in ["s1", "s2", "locker", "s3"].enumerated() {
            s.spawn(name) {
                HostClock.sleep(nanos: UInt64(i + 1) * 50_000)
                if name == "locker" {
                    folio.lock()
                    log.took("locker")
                    HostClock.sleep(nanos: 200_000)
                    log.took("locker unlocks")
                    folio.unlock()
                } else {
                    #expect(folio.waitUnlocked())
                    log.took(name)
                }
            }
        }
        #expect(s.run() == .completed)
        let order = log.order
        let at = { (name: String) in order.firstIndex(of: name) ?? -1 }
        #expect(at("s1") > at("holder unlocks") && at("s2") > at("holder unlocks"))
        #expect(at("s1") < at("locker unlocks") && at("s2") < at("locker unlocks"), "\(order)")
        #expect(at("s3") > at("locker unlocks"), "s3 queued behind the locker: \(order)")
        #expect(!folio.isLocked && !folio.flags.contains(.waiters))
        folio.put()
    }

    @Test("a folio_wait_locked sleeper that times out leaves the queue; a later unlock clears PG_waiters")
    func sharedWaiterTimesOut() throws {
        let kernel = try makeKernel()
        let folio = try #require(kernel.allocateFolio(order: 0))
        let result = Mutex<Bool?>(nil)
        let s = Self.scheduler(cpus: 2)
        s.spawn("holder") {
            folio.lock()
            HostClock.sleep(nanos: 1_000_000)
            folio.unlock()
        }
        s.spawn("waiter") {
            HostClock.sleep(nanos: 10_000)
            let r = folio.waitUnlocked(timeoutNanos: 100_000)
            result.withLock { $0 = r }
        }
        #expect(s.run() == .completed)
        #expect(result.withLock { $0 } == false)
        #expect(kernel.folioWaitTable.waiters(word: folio.meta.flagsWord, pfn: folio.pfn).isEmpty)
        #expect(!folio.isLocked && !folio.flags.contains(.waiters))
        folio.put()
    }

    @Test("on real threads lockers and folio_wait_locked sleepers all finish; the count the lock guards is exact")
    func realThreadsMixed() throws {
        let kernel = try makeKernel()
        let folio = try #require(kernel.allocateFolio(order: 0, zeroed: true))
        let threads = 4, rounds = 2_000
        let finished = runThreads(threads, timeout: 120, keepAlive: [kernel]) { t in
            let word = folio.unsafeBytes.assumingMemoryBound(to: Int.self)
            for i in 0..<rounds {
                if t == 0 && i % 8 == 0 { folio.waitUnlocked(timeoutNanos: 1_000_000) }
                folio.lock()
                word.pointee += 1
                folio.unlock()
            }
        }
        try #require(finished, "a thread stayed asleep on the folio lock")
        #expect(folio.withBytes { $0.load(as: Int.self) } == threads * rounds)
        #expect(!folio.isLocked && !folio.flags.contains(.waiters))
        folio.put()
        #expect(kernel.diagnostics.isEmpty)
    }
}
