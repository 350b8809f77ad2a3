import Synchronization
import SVMEmu
import CSVMSupport
#if canImport(Glibc)
import Glibc
#endif

/// A reusable barrier for a fixed number of threads that the watchdog can
/// abort (`pthread_barrier_t` cannot be woken early).
///
/// Waiters spin for a while before they sleep, as CPUs in a barrier do, so
/// that a round releases every running waiter at once; a condition-variable
/// wake-up alone hands the threads out one by one, tens of microseconds
/// apart, and the storm would measure the scheduler instead of the fault
/// path. With more threads than cores the spinners are time-sliced by the
/// host scheduler, which also preempts threads inside the fault path: the
/// interleavings of many CPUs, approximated on few.
///
/// The last thread to arrive runs the round's action while it holds the
/// barrier's mutex, before anyone is released: the storm uses that to close
/// one page's measurement and open the next one's with no thread in between.
final class StormBarrier: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let cond: UnsafeMutablePointer<pthread_cond_t>
    private let parties: Int
    private var arrived = 0                      // under mutex
    private let generation = Atomic<Int>(0)      // written under mutex, read anywhere
    private let aborted = Atomic<Bool>(false)    // written under mutex, read anywhere
    private let spinNanos: UInt64
    private let action: (_ round: Int) -> Void
    /// Deterministic storms: the barrier's lock is a ``KernelMutex`` and the
    /// waiters sleep on a futex word (scheduling points), released together
    /// at the virtual time of the last arrival.
    private let deterministic: Bool
    private let detLock = KernelMutex("storm barrier")
    private let detGeneration: UnsafeMutablePointer<UInt32>

    init(parties: Int, spinNanos: UInt64 = 2_000_000, deterministic: Bool = false,
         action: @escaping (_ round: Int) -> Void) {
        if parties <= 0 { contractViolation("StormBarrier: at least one party (got \(parties))") }
        self.deterministic = deterministic
        detGeneration = .allocate(capacity: 1)
        detGeneration.initialize(to: 0)
        self.parties = parties
        self.spinNanos = spinNanos
        self.action = action
        mutex = .allocate(capacity: 1)
        cond = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(cond, nil)
    }

    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        cond.deallocate()
        detGeneration.deallocate()
    }

    private func arriveAndWaitDeterministic() -> Bool {
        detLock.lock()
        if aborted.load(ordering: .relaxed) {
            detLock.unlock()
            return false
        }
        let gen = svm_load32(detGeneration)
        arrived += 1
        if arrived == parties {
            action(Int(gen))
            arrived = 0
            svm_store32(detGeneration, gen &+ 1)
            _ = svm_futex_wake(detGeneration, Int32.max)
            detLock.unlock()
            // Spinning waiters leave when the releaser does: it waits out the
            // wake-up latency the others were charged, so all go together.
            HostClock.sleep(nanos: DeterministicScheduler.wakeLatency)
            return true
        }
        detLock.unlock()
        while svm_load32(detGeneration) == gen && !aborted.load(ordering: .relaxed) {
            _ = svm_futex_wait(detGeneration, gen, 0)
        }
        return svm_load32(detGeneration) != gen
    }

    /// Waits for every party. Returns false when the barrier was aborted
    /// (then the caller must stop).
    func arriveAndWait() -> Bool {
        if deterministic { return arriveAndWaitDeterministic() }
        pthread_mutex_lock(mutex)
        if aborted.load(ordering: .relaxed) {
            pthread_mutex_unlock(mutex)
            return false
        }
        let gen = generation.load(ordering: .relaxed)
        arrived += 1
        if arrived == parties {
            action(gen)
            arrived = 0
            generation.store(gen + 1, ordering: .releasing)
            pthread_cond_broadcast(cond)
            pthread_mutex_unlock(mutex)
            return true
        }
        pthread_mutex_unlock(mutex)
        // Spin first: a release seen by every running waiter at once.
        let deadline = HostClock.nanos() + spinNanos
        var spins = 0
        while true {
            if generation.load(ordering: .acquiring) != gen { return true }
            if aborted.load(ordering: .relaxed) { return false }
            spins += 1
            if spins & 255 == 0 && HostClock.nanos() >= deadline { break }
        }
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        while generation.load(ordering: .relaxed) == gen && !aborted.load(ordering: .relaxed) {
            pthread_cond_wait(cond, mutex)
        }
        return generation.load(ordering: .relaxed) != gen
    }

    /// Releases every waiter with `false`, now and for later arrivals.
    func abort() {
        if deterministic {
            detLock.withLock { aborted.store(true, ordering: .relaxed) }
            _ = svm_futex_wake(detGeneration, Int32.max)
            return
        }
        pthread_mutex_lock(mutex)
        aborted.store(true, ordering: .relaxed)
        pthread_cond_broadcast(cond)
        pthread_mutex_unlock(mutex)
    }
}
