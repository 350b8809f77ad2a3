import Synchronization
import CSVMSupport

/// A sleeping lock for drivers (`struct mutex`), with the kernel's algorithm
/// (kernel/locking/mutex.c), on real threads and under a
/// ``DeterministicScheduler`` alike:
///
/// - The owner word holds the owner's task token and three flags: waiters
///   (the unlock must wake one), handoff (the first waiter asks for the lock
///   to be handed to it) and pickup (handed over, not yet taken).
/// - `mutex_lock()` tries the owner word; then it spins optimistically while
///   the owner runs on a CPU and it need not reschedule, one spinner at a
///   time (the OSQ); then it queues at the tail of the wait list (FIFO) and
///   sleeps.
/// - `mutex_unlock()` clears the owner (or, with handoff set, hands the lock
///   to the first waiter) and wakes the first waiter.
/// - A woken waiter that finds the lock taken again (a spinner or a newcomer
///   stole it) and is first in line sets handoff, spins while the new owner
///   runs, and sleeps again: the next unlock hands the lock to it.
///
/// Who takes the lock next decides, in a fault storm, whether the holder's
/// migration finds the page's references as it expects: the waiters keep
/// theirs while they sleep.
///
/// On real threads "the owner runs on a CPU" cannot be known; a spinner
/// spins at most ``realThreadSpinRounds`` rounds. Under the deterministic
/// scheduler it asks the scheduler (owner_on_cpu(), need_resched()).
///
/// Not recursive; only the holder releases it. Take it in the scoped form,
/// ``withLock(file:line:_:)``; keep it beside what it guards
/// ("struct mutex devmem_lock; /* protects the above */").
public final class KernelMutex: @unchecked Sendable {
    /// Word 0: the owner (`lock->owner`: task token | flags). Word 1: the
    /// OSQ (the task token of the one optimistic spinner, or 0). Word 2:
    /// `wait_lock` (a spinning lock, 32 bits). Words 3-4: the wait list's
    /// first and last waiter (under `wait_lock`).
    @usableFromInline let words: UnsafeMutablePointer<UInt64>
    /// The lock's name in deadlock reports, and its lock-order class.
    public let name: String
    /// The ``LockOrder`` class of `name`.
    @usableFromInline let lockClass: LockClass

    @usableFromInline static let waitersFlag: UInt64 = 0x1
    @usableFromInline static let handoffFlag: UInt64 = 0x2
    @usableFromInline static let pickupFlag: UInt64 = 0x4
    @usableFromInline static let flags: UInt64 = 0x7

    /// On real threads, the most rounds an optimistic spin lasts (the host
    /// does not say whether the owner runs).
    public static let realThreadSpinRounds = 200

    /// One round of an optimistic spin (the mutex's and the rwsem's): a
    /// scheduling point under the scheduler; false when the spinner should
    /// stop (a reschedule is due, or on real threads the bound is reached).
    static func spinRound(_ rounds: inout Int, _ det: Bool) -> Bool {
        if det {
            if DeterministicScheduler.needResched() { return false }
            DeterministicScheduler.spinRound()
        } else {
            rounds += 1
            if rounds > realThreadSpinRounds { return false }
            svm_cpu_relax()
        }
        return true
    }

    /// A free mutex named `name`; every mutex of one name is one
    /// ``LockOrder`` class.
    ///
    /// The corresponding kernel function is `mutex_init()`.
    public init(_ name: String = "mutex") {
        self.name = name
        lockClass = LockOrder.lockClass(named: name)
        words = .allocate(capacity: 5)
        words.initialize(repeating: 0, count: 5)
    }

    deinit { words.deallocate() }

    /// The owner word, which names the lock in deadlock and lock-order reports.
    @usableFromInline var word: UnsafeMutableRawPointer { UnsafeMutableRawPointer(words) }
    var osq: UnsafeMutablePointer<UInt64> { words + 1 }
    var waitLock: UnsafeMutablePointer<UInt32> { UnsafeMutableRawPointer(words + 2).assumingMemoryBound(to: UInt32.self) }

    /// Runs `body` holding the mutex, sleeping until it is free, and releases
    /// it on every way out.
    ///
    /// - Parameters:
    ///   - file: the call site, for lock-order reports (``LockOrder``).
    ///   - line: the call site's line.
    ///   - body: the critical section.
    /// - Returns: what `body` returns.
    /// - Throws: what `body` throws.
    ///
    /// The corresponding kernel functions are `mutex_lock()` and `mutex_unlock()`.
    @inlinable
    public func withLock<R, E: Error>(file: StaticString = #fileID, line: UInt = #line,
                                      _ body: () throws(E) -> R) throws(E) -> R {
        lock(file: file, line: line)
        defer { unlock() }
        return try body()
    }

    /// Takes the mutex, sleeping while another thread holds it. Pair it with
    /// ``unlock()`` on every path; prefer ``withLock(file:line:_:)``.
    ///
    /// - Parameters:
    ///   - file: the call site, for lock-order reports (``LockOrder``).
    ///   - line: the call site's line.
    ///
    /// The corresponding kernel function is `mutex_lock()`.
    @inlinable public func lock(file: StaticString = #fileID, line: UInt = #line) {
        let det = svm_det_active()
        if _slowPath(det) {
            DeterministicScheduler.mightSleep()
            DeterministicScheduler.nameLock(word, name)
            DeterministicScheduler.sleepingLockEvent(word, Int32(SVM_DET_BEFORE_ACQUIRE))
        }
        let lockdep = svm_lockdep_enabled()
        if _slowPath(lockdep) { LockOrder.acquiring(lockClass, site: LockSite(file, line)) }
        let me = KernelMutex.currentTask()
        var expected: UInt64 = 0
        if !UnsafeAtomic(words).compareExchange(&expected, UInt64(me), successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring) { lockSlowPath(me) }
        svm_tsan_acquire(word)
        if _slowPath(lockdep) { LockOrder.acquired(word, lockClass, site: LockSite(file, line)) }
        if _slowPath(det) { DeterministicScheduler.sleepingLockEvent(word, Int32(SVM_DET_ACQUIRED)) }
    }

    /// Releases the mutex: hands it to the first waiter when that one asked
    /// for it, and wakes the first waiter.
    ///
    /// The corresponding kernel function is `mutex_unlock()`.
    @inlinable public func unlock() {
        if _slowPath(svm_lockdep_enabled()) { LockOrder.released(word) }
        svm_tsan_release(word)
        let me = KernelMutex.currentTask()
        var expected = UInt64(me)
        if !UnsafeAtomic(words).compareExchange(&expected, 0, successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring) { unlockSlowPath(me) }
        if _slowPath(svm_det_active()) { DeterministicScheduler.sleepingLockEvent(word, Int32(SVM_DET_RELEASED)) }
    }

    /// Takes the mutex if it is free; never sleeps.
    ///
    /// - Parameters:
    ///   - file: the call site, for lock-order reports (``LockOrder``).
    ///   - line: the call site's line.
    /// - Returns: whether the caller now holds it.
    ///
    /// The corresponding kernel function is `mutex_trylock()`.
    @inlinable public func tryLock(file: StaticString = #fileID, line: UInt = #line) -> Bool {
        let det = svm_det_active()
        if _slowPath(det) {
            DeterministicScheduler.nameLock(word, name)
            DeterministicScheduler.sleepingLockEvent(word, Int32(SVM_DET_BEFORE_ACQUIRE))
        }
        guard tryLockCommon(KernelMutex.currentTask(), handoff: false) == 0 else { return false }
        svm_tsan_acquire(word)
        if _slowPath(svm_lockdep_enabled()) {
            LockOrder.acquired(word, lockClass, site: LockSite(file, line, trylock: "mutex_trylock"))
        }
        if _slowPath(det) { DeterministicScheduler.sleepingLockEvent(word, Int32(SVM_DET_ACQUIRED)) }
        return true
    }

    /// Whether some thread holds the mutex: a snapshot.
    ///
    /// The corresponding kernel function is `mutex_is_locked()`.
    public var isLocked: Bool { UnsafeAtomic(words).load(ordering: .acquiring) & ~KernelMutex.flags != 0 }

    /// The calling thread's task token (`current`): its emulated thread
    /// under a deterministic scheduler, else the host thread's.
    @usableFromInline static func currentTask() -> UInt {
        if _slowPath(svm_det_active()), let t = DeterministicScheduler.currentTask() { return t }
        return svm_current_task()
    }

    // MARK: the slow paths (kernel/locking/mutex.c)

    /// `__mutex_trylock_common()`: takes the lock for `me` if it is free or
    /// handed to `me` (returns 0); otherwise returns the owner's token, and
    /// with `handoff` first sets the handoff flag (once).
    @usableFromInline func tryLockCommon(_ me: UInt, handoff: Bool) -> UInt {
        var owner = UnsafeAtomic(words).load(ordering: .acquiring)
        while true {
            var flags = owner & KernelMutex.flags
            var task = owner & ~KernelMutex.flags
            if task != 0 {
                if flags & KernelMutex.pickupFlag != 0 {
                    if task != UInt64(me) { break }
                    flags &= ~KernelMutex.pickupFlag
                } else if handoff {
                    if flags & KernelMutex.handoffFlag != 0 { break }
                    flags |= KernelMutex.handoffFlag
                } else {
                    break
                }
            } else {
                task = UInt64(me)
            }
            if UnsafeAtomic(words).compareExchange(&owner, task | flags, successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring) {
                if task == UInt64(me) { return 0 }
                break
            }
        }
        return UInt(owner & ~KernelMutex.flags)
    }

    @usableFromInline @inline(never)
    func lockSlowPath(_ me: UInt) {
        if tryLockCommon(me, handoff: false) == 0 || optimisticSpin(me, waiter: nil) { return }
        // One waiter record on this stack: [next, task, woken].
        withUnsafeTemporaryAllocation(of: UInt64.self, capacity: 3) { buffer in
            let waiter = buffer.baseAddress!
            waiter.initialize(repeating: 0, count: 3)
            waiter[1] = UInt64(me)
            svm_mutex_lock(waitLock)
            if tryLockCommon(me, handoff: false) == 0 {
                svm_mutex_unlock(waitLock)
                return
            }
            addWaiter(waiter)
            let wokenWord = UnsafeMutableRawPointer(waiter + 2).assumingMemoryBound(to: UInt32.self)
            var holdsWaitLock = true
            while true {
                // Under wait_lock: an unlock that handed the lock over is seen here.
                if tryLockCommon(me, handoff: false) == 0 { break }
                svm_mutex_unlock(waitLock)
                holdsWaitLock = false
                sleep(on: wokenWord)
                let first = isFirst(waiter)
                if tryLockCommon(me, handoff: first) == 0 { break }
                if first && optimisticSpin(me, waiter: waiter) { break }
                svm_mutex_lock(waitLock)
                holdsWaitLock = true
            }
            if !holdsWaitLock { svm_mutex_lock(waitLock) }
            removeWaiter(waiter)
            svm_mutex_unlock(waitLock)
        }
    }

    /// `schedule()` until an unlock wakes this waiter (its word set to 1).
    func sleep(on woken: UnsafeMutablePointer<UInt32>) {
        while UnsafeAtomic(woken).load(ordering: .acquiring) == 0 {
            if _slowPath(svm_det_active()) {
                DeterministicScheduler.willWait(for: UnsafeRawPointer(word))
                _ = svm_futex_wait(woken, 0, 0)
            } else {
                // Bounded, so that a lost wake-up would cost time, never a hang.
                _ = svm_futex_wait(woken, 0, 10_000_000)
            }
        }
        UnsafeAtomic(woken).store(0, ordering: .releasing)
    }

    /// `mutex_optimistic_spin()`: spins while the owner runs on a CPU and
    /// the caller need not reschedule; true when it took the lock. A
    /// newcomer (`waiter` nil) first becomes the one spinner (the OSQ); the
    /// first waiter spins beside it.
    func optimisticSpin(_ me: UInt, waiter: UnsafeMutablePointer<UInt64>?) -> Bool {
        let det = svm_det_active()
        if waiter == nil {
            // mutex_can_spin_on_owner()
            if det && DeterministicScheduler.needResched() { return false }
            let owner = UInt(UnsafeAtomic(words).load(ordering: .acquiring) & ~KernelMutex.flags)
            if owner != 0 && !ownerOnCPU(owner, det) { return false }
            var free: UInt64 = 0
            if !UnsafeAtomic(osq).compareExchange(&free, UInt64(me), successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring) {
                // Another spinner has the OSQ: spin for it (osq_lock()) while
                // nothing asks this CPU to reschedule.
                var rounds = 0
                while true {
                    if !Self.spinRound(&rounds, det) { return false }
                    free = 0
                    if UnsafeAtomic(osq).compareExchange(&free, UInt64(me), successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring) { break }
                }
            }
        }
        defer { if waiter == nil { UnsafeAtomic(osq).store(0, ordering: .releasing) } }
        var rounds = 0
        while true {
            let owner = tryLockCommon(me, handoff: false)
            if owner == 0 { return true }
            // mutex_spin_on_owner(): while this owner keeps the lock.
            while UInt(UnsafeAtomic(words).load(ordering: .acquiring) & ~KernelMutex.flags) == owner {
                if !ownerOnCPU(owner, det) { return false }
                if !Self.spinRound(&rounds, det) { return false }
            }
            // A waiter stops when it is no longer first in line.
            if let waiter, !isFirst(waiter) { return false }
            if det { DeterministicScheduler.spinRound() } else { svm_cpu_relax() }
        }
    }

    /// owner_on_cpu(): the scheduler knows under a deterministic run; on
    /// real threads the spin is bounded instead.
    func ownerOnCPU(_ owner: UInt, _ det: Bool) -> Bool {
        det ? DeterministicScheduler.taskOnCPU(owner) : true
    }

    @usableFromInline @inline(never)
    func unlockSlowPath(_ me: UInt) {
        var owner = UnsafeAtomic(words).load(ordering: .acquiring)
        while true {
            if UInt(owner & ~KernelMutex.flags) != me {
                contractViolation("mutex_unlock: \(name) is released by a thread that does not hold it")
            }
            if owner & KernelMutex.handoffFlag != 0 { break }
            if UnsafeAtomic(words).compareExchange(&owner, owner & KernelMutex.flags, successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring) {
                if owner & KernelMutex.waitersFlag != 0 { break }
                return
            }
        }
        svm_mutex_lock(waitLock)
        let first = words[3]
        if owner & KernelMutex.handoffFlag != 0 {
            // __mutex_handoff(): the first waiter owns it now, to pick up.
            let next = first != 0 ? UnsafeMutablePointer<UInt64>(bitPattern: UInt(first))![1] : 0
            var current = UnsafeAtomic(words).load(ordering: .acquiring)
            while true {
                var new = current & KernelMutex.waitersFlag
                new |= next
                if next != 0 { new |= KernelMutex.pickupFlag }
                if UnsafeAtomic(words).compareExchange(&current, new, successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring) { break }
            }
        }
        if first != 0 {
            // wake_q: the first waiter runs again (its record lives while it is listed).
            let waiter = UnsafeMutablePointer<UInt64>(bitPattern: UInt(first))!
            let woken = UnsafeMutableRawPointer(waiter + 2).assumingMemoryBound(to: UInt32.self)
            UnsafeAtomic(woken).store(1, ordering: .releasing)
            _ = svm_futex_wake(woken, 1)
        }
        svm_mutex_unlock(waitLock)
    }

    /// `__mutex_add_waiter()` (under wait_lock): at the tail; the first sets the waiters flag.
    func addWaiter(_ waiter: UnsafeMutablePointer<UInt64>) {
        let address = UInt64(UInt(bitPattern: waiter))
        if words[4] == 0 {
            UnsafeAtomic(words + 3).store(address, ordering: .releasing)
            _ = UnsafeAtomic(words).bitwiseOr(KernelMutex.waitersFlag, ordering: .acquiringAndReleasing).oldValue
        } else {
            UnsafeMutablePointer<UInt64>(bitPattern: UInt(words[4]))![0] = address
        }
        words[4] = address
    }

    /// `__mutex_remove_waiter()` (under wait_lock): the last one out clears every flag.
    func removeWaiter(_ waiter: UnsafeMutablePointer<UInt64>) {
        let address = UInt64(UInt(bitPattern: waiter))
        var previous: UnsafeMutablePointer<UInt64>? = nil
        var at = words[3]
        while at != 0 && at != address {
            previous = UnsafeMutablePointer<UInt64>(bitPattern: UInt(at))!
            at = previous![0]
        }
        guard at == address else { return }
        if let previous { previous[0] = waiter[0] } else { UnsafeAtomic(words + 3).store(waiter[0], ordering: .releasing) }
        if words[4] == address { words[4] = previous.map { UInt64(UInt(bitPattern: $0)) } ?? 0 }
        if words[3] == 0 { _ = UnsafeAtomic(words).bitwiseAnd(~KernelMutex.flags, ordering: .acquiringAndReleasing).oldValue }
    }

    /// `__mutex_waiter_is_first()`.
    func isFirst(_ waiter: UnsafeMutablePointer<UInt64>) -> Bool {
        UnsafeAtomic(words + 3).load(ordering: .acquiring) == UInt64(UInt(bitPattern: waiter))
    }
}
