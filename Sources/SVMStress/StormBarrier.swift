import Synchronization
import SVMEmu
#if canImport(Glibc)
import Glibc
#endif

/// A reusable barrier for a fixed number of threads that the watchdog can
/// abort (`pthread_barrier_t` cannot be woken early), in one of two release
/// styles (``StormRelease``).
///
/// `.all`: waiters spin for a while before they sleep, as CPUs in a barrier
/// do, so that a round releases every running waiter at once; a
/// condition-variable wake-up alone hands the threads out one by one, tens
/// of microseconds apart, and the storm would measure the scheduler instead
/// of the fault path. With more threads than cores the spinners are
/// time-sliced by the host scheduler, which also preempts threads inside the
/// fault path: the interleavings of many CPUs, approximated on few.
///
/// `.oneByOne`: a futex wake chain. Waiters sleep on a futex word at
/// once; the last to arrive wakes one and leaves, and each woken waiter
/// wakes the next before it leaves, so the threads go one wake-up latency
/// apart.
///
/// `.wakeAll`: glibc's `pthread_barrier_wait()` (2.25 and later). Waiters
/// sleep on a futex word; the last to arrive wakes them all with one
/// FUTEX_WAKE and goes on at once: the woken threads follow one wake-up
/// latency later, and queue for a CPU when they outnumber the idle ones.
///
/// Deterministic storms: the barrier's lock is a ``KernelMutex`` and the
/// waiters sleep on a futex word (scheduling points). `.all` releases them
/// together at the virtual time of the last arrival; `.oneByOne` is the wake
/// chain, each link a wake-up (``VirtualCosts/wake``) and a futex call.
///
/// The last thread to arrive runs the round's action while it holds the
/// barrier's lock, before anyone is released: the storm uses that to close
/// one page's measurement and open the next one's with no thread in between.
final class StormBarrier: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let cond: UnsafeMutablePointer<pthread_cond_t>
    private let parties: Int
    private var arrived = 0                      // under mutex (futex barrier: under futexLock)
    private let generation = Atomic<Int>(0)      // written under the lock, read anywhere
    private let aborted = Atomic<Bool>(false)    // written under the lock, read anywhere
    private let spinNanos: UInt64
    private let action: (_ round: Int) -> Void
    /// Sleeps and wakes on futex words (deterministic storms, one-by-one release).
    private let futexBarrier: Bool
    private let release: StormRelease
    private let futexLock = KernelMutex("storm barrier")
    /// One futex word per generation parity: the waiters of round g sleep on
    /// `words[g & 1]`, so that a wake meant for them never reaches a thread
    /// already waiting for the next round. Bumped at each release (and abort).
    private let words: UnsafeMutablePointer<UInt32>

    init(parties: Int, spinNanos: UInt64 = 2_000_000, deterministic: Bool = false, release: StormRelease = .all,
         action: @escaping (_ round: Int) -> Void) {
        if parties <= 0 { contractViolation("StormBarrier: at least one party (got \(parties))") }
        self.release = release
        futexBarrier = deterministic || release != .all
        words = .allocate(capacity: 2)
        words.initialize(repeating: 0, count: 2)
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
        words.deallocate()
    }

    private func arriveAndWaitFutex() -> Bool {
        futexLock.lock()
        if aborted.load(ordering: .acquiring) {
            futexLock.unlock()
            return false
        }
        let gen = generation.load(ordering: .relaxed)
        let word = FutexWord(words + (gen & 1))
        let seen = word.load(ordering: .acquiring)
        arrived += 1
        if arrived == parties {
            action(gen)
            arrived = 0
            generation.store(gen + 1, ordering: .releasing)
            word.store(seen &+ 1, ordering: .releasing)
            futexLock.unlock()
            if release == .oneByOne {
                word.wake(1)
            } else if release == .wakeAll {
                word.wake(FutexWord.everyone)
            } else {
                word.wake(FutexWord.everyone)
                // Spinning waiters leave when the releaser does: it waits out the
                // wake-up latency the others were charged, so all go together.
                HostClock.spin(nanos: DeterministicScheduler.wakeLatency)
            }
            return true
        }
        futexLock.unlock()
        while generation.load(ordering: .acquiring) == gen && !aborted.load(ordering: .acquiring) {
            word.wait(expected: seen)
        }
        // The chain: pass the wake-up on to the next waiter of this round.
        if release == .oneByOne { word.wake(1) }
        return generation.load(ordering: .acquiring) != gen
    }

    /// Waits for every party. Returns false when the barrier was aborted
    /// (then the caller must stop).
    func arriveAndWait() -> Bool {
        if futexBarrier { return arriveAndWaitFutex() }
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
        if futexBarrier {
            futexLock.withLock {
                aborted.store(true, ordering: .releasing)
                // A waiter about to sleep sees the word changed and looks again.
                for i in 0..<2 {
                    let word = FutexWord(words + i)
                    word.store(word.load(ordering: .acquiring) &+ 1, ordering: .releasing)
                }
            }
            for i in 0..<2 { FutexWord(words + i).wake(FutexWord.everyone) }
            return
        }
        pthread_mutex_lock(mutex)
        aborted.store(true, ordering: .relaxed)
        pthread_cond_broadcast(cond)
        pthread_mutex_unlock(mutex)
    }
}
