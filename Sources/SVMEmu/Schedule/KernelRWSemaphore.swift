import Synchronization
import CSVMSupport

/// A reader-writer semaphore for drivers (`struct rw_semaphore`): readers
/// share it, a writer has it alone. It follows the kernel's algorithm
/// (kernel/locking/rwsem.c), on real threads and under a
/// ``DeterministicScheduler`` alike:
///
/// - The count word holds the readers (each adds a bias), a writer bit, a
///   waiters bit (the wait list is not empty: readers' fast path fails, so
///   a reader arriving behind a waiting writer queues) and a handoff bit.
/// - `down_read()` adds its bias; unless a writer holds it, waiters or a
///   handoff are marked, it holds the lock. Otherwise it may still take it
///   when no writer holds it and no handoff is set (then wakes the readers
///   at the head when it is the only reader), else it queues at the tail of
///   the FIFO wait list and sleeps until a waker grants it the lock.
/// - `down_write()` takes a free lock; otherwise it spins while the owner
///   (a writer) runs on a CPU, or while readers own it up to a threshold
///   (20 µs plus half a µs a reader), one spinner at a time; then it queues
///   and sleeps. The first waiter takes the lock when it is free; a writer
///   that waited longer than `RWSEM_WAIT_TIMEOUT` (4 ms) sets the handoff
///   bit, which keeps every newcomer (reader or spinner) out until it has
///   the lock.
/// - An unlock that leaves the lock free with waiters wakes the head of the
///   list: a writer at the head is woken to try; readers at the head get
///   the lock granted, together with every reader queued behind a writer
///   too (up to 256 a wake-up: `rwsem_mark_wake()`).
///
/// On real threads "the owner runs on a CPU" cannot be known; a writer
/// spins at most ``KernelMutex/realThreadSpinRounds`` rounds. Under the
/// deterministic scheduler it asks the scheduler.
///
/// Take it in the scoped forms, ``withReadLock(file:line:_:)`` and
/// ``withWriteLock(file:line:_:)``. A reader must not take it twice (a
/// writer queued between would wait for the first hold and the second
/// would wait for the writer).
public final class KernelRWSemaphore: @unchecked Sendable {
    /// Word 0: the count (`sem->count`). Word 1: the owner (`sem->owner`: a
    /// task token | reader-owned | non-spinnable). Word 2: `wait_lock` (32
    /// bits). Words 3-4: the wait list's first and last waiter (under
    /// `wait_lock`). Word 5: the OSQ (the one optimistic spinner's token).
    @usableFromInline let words: UnsafeMutablePointer<UInt64>
    /// The semaphore's name in deadlock reports, and its lock-order class.
    public let name: String
    /// The ``LockOrder`` class of `name`.
    let lockClass: LockClass

    static let writerLocked: UInt64 = 1 << 0
    static let waitersFlag: UInt64 = 1 << 1
    static let handoffFlag: UInt64 = 1 << 2
    static let readerBias: UInt64 = 1 << 8
    static let readerMask: UInt64 = ~(readerBias - 1)
    static let lockMask: UInt64 = writerLocked | readerMask
    static let readFailedMask: UInt64 = writerLocked | waitersFlag | handoffFlag
    static let readerOwned: UInt64 = 1 << 0
    static let nonSpinnable: UInt64 = 1 << 1
    static let ownerFlags: UInt64 = readerOwned | nonSpinnable
    /// `RWSEM_WAIT_TIMEOUT`: 4 ms (a jiffy at HZ=250).
    static let waitTimeoutNanos: UInt64 = 4_000_000
    /// `MAX_READERS_WAKEUP`.
    static let maxReadersWakeup = 256

    // The waiter record's words (`struct rwsem_waiter`), on the waiter's stack.
    static let next = 0, previous = 1, task = 2, type = 3, timeout = 4, handoffSet = 5, woken = 6, size = 7
    static let waitingForRead: UInt64 = 0, waitingForWrite: UInt64 = 1

    /// A free semaphore named `name`; every semaphore of one name is one
    /// ``LockOrder`` class.
    ///
    /// The corresponding kernel function is `init_rwsem()`.
    public convenience init(_ name: String = "rwsem") {
        self.init(name, prefersWriters: false, lockClass: LockOrder.lockClass(named: name))
    }

    /// A free semaphore of class `lockClass`. `prefersWriters` (the mmap
    /// lock) is what the kernel's algorithm does for every rwsem: a reader
    /// arriving while a writer waits queues behind it.
    init(_ name: String, prefersWriters: Bool, lockClass: LockClass) {
        self.name = name
        self.lockClass = lockClass
        words = .allocate(capacity: 6)
        words.initialize(repeating: 0, count: 6)
    }

    deinit { words.deallocate() }

    /// The count word, which names the lock in deadlock and lock-order reports.
    @usableFromInline var word: UnsafeMutableRawPointer { UnsafeMutableRawPointer(words) }
    var count: UnsafeAtomic<UInt64> { UnsafeAtomic(words) }
    var owner: UnsafeAtomic<UInt64> { UnsafeAtomic(words + 1) }
    var waitLock: UnsafeMutablePointer<UInt32> { UnsafeMutableRawPointer(words + 2).assumingMemoryBound(to: UInt32.self) }
    var osq: UnsafeAtomic<UInt64> { UnsafeAtomic(words + 5) }

    /// Runs `body` holding the semaphore shared.
    ///
    /// - Parameters:
    ///   - file: the call site, for lock-order reports (``LockOrder``).
    ///   - line: the call site's line.
    ///   - body: the read-side critical section.
    /// - Returns: what `body` returns.
    /// - Throws: what `body` throws.
    ///
    /// The corresponding kernel functions are `down_read()` and `up_read()`.
    public func withReadLock<R, E: Error>(file: StaticString = #fileID, line: UInt = #line,
                                          _ body: () throws(E) -> R) throws(E) -> R {
        downRead(file: file, line: line)
        defer { upRead() }
        return try body()
    }

    /// Runs `body` holding the semaphore alone.
    ///
    /// - Parameters:
    ///   - file: the call site, for lock-order reports (``LockOrder``).
    ///   - line: the call site's line.
    ///   - body: the write-side critical section.
    /// - Returns: what `body` returns.
    /// - Throws: what `body` throws.
    ///
    /// The corresponding kernel functions are `down_write()` and `up_write()`.
    public func withWriteLock<R, E: Error>(file: StaticString = #fileID, line: UInt = #line,
                                           _ body: () throws(E) -> R) throws(E) -> R {
        downWrite(file: file, line: line)
        defer { upWrite() }
        return try body()
    }

    /// Takes the semaphore shared, sleeping while a writer holds it or
    /// others wait for it.
    ///
    /// - Parameters:
    ///   - file: the call site, for lock-order reports (``LockOrder``).
    ///   - line: the call site's line.
    ///
    /// The corresponding kernel function is `down_read()`.
    public func downRead(file: StaticString = #fileID, line: UInt = #line) {
        before(file, line)
        let me = KernelMutex.currentTask()
        let c = count.wrappingAdd(Self.readerBias, ordering: .acquiringAndReleasing).newValue
        if c & Self.readFailedMask != 0 { readSlowPath(me, c) } else { setReaderOwned(me) }
        acquired(file, line, trylock: nil)
    }

    /// ``downRead(file:line:)`` the way a page fault takes the mmap lock
    /// (`get_mmap_lock_carefully()`): a trylock first, which is no point
    /// where the kernel may reschedule; only when it fails, the sleeping
    /// `down_read()` and its `might_sleep()`.
    func downReadTryingFirst(file: StaticString = #fileID, line: UInt = #line) {
        before(file, line, mightSleep: false)
        let me = KernelMutex.currentTask()
        var c = count.load(ordering: .acquiring)
        while c & Self.readFailedMask == 0 {
            if count.compareExchange(&c, c &+ Self.readerBias, successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring) {
                setReaderOwned(me)
                acquired(file, line, trylock: nil)
                return
            }
        }
        DeterministicScheduler.mightSleepPoint()
        let n = count.wrappingAdd(Self.readerBias, ordering: .acquiringAndReleasing).newValue
        if n & Self.readFailedMask != 0 { readSlowPath(me, n) } else { setReaderOwned(me) }
        acquired(file, line, trylock: nil)
    }

    /// Takes the semaphore alone, sleeping while anyone holds it.
    ///
    /// - Parameters:
    ///   - file: the call site, for lock-order reports (``LockOrder``).
    ///   - line: the call site's line.
    ///
    /// The corresponding kernel function is `down_write()`.
    public func downWrite(file: StaticString = #fileID, line: UInt = #line) {
        before(file, line)
        let me = KernelMutex.currentTask()
        var expected: UInt64 = 0
        if count.compareExchange(&expected, Self.writerLocked, successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring) {
            owner.store(UInt64(me), ordering: .releasing)
        } else {
            writeSlowPath(me)
        }
        acquired(file, line, trylock: nil)
    }

    /// Takes the semaphore shared if no writer holds it and nobody waits;
    /// never sleeps.
    ///
    /// - Returns: whether the caller now holds it.
    ///
    /// The corresponding kernel function is `down_read_trylock()`.
    public func tryDownRead() -> Bool {
        if _slowPath(svm_det_active()) {
            DeterministicScheduler.nameLock(word, name)
            DeterministicScheduler.sleepingLockEvent(word, Int32(SVM_DET_BEFORE_ACQUIRE))
        }
        var c = count.load(ordering: .acquiring)
        while c & Self.readFailedMask == 0 {
            if count.compareExchange(&c, c &+ Self.readerBias, successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring) {
                setReaderOwned(KernelMutex.currentTask())
                acquired(#fileID, #line, trylock: "down_read_trylock")
                return true
            }
        }
        return false
    }

    /// Releases a shared hold; the last reader out wakes the waiters.
    ///
    /// The corresponding kernel function is `up_read()`.
    public func upRead() {
        releasing()
        let c = count.wrappingAdd(0 &- Self.readerBias, ordering: .acquiringAndReleasing).newValue
        if c & (Self.lockMask | Self.waitersFlag) == Self.waitersFlag {
            clearNonSpinnable()
            wake()
        }
        released()
    }

    /// Releases the writer's hold and wakes the waiters.
    ///
    /// The corresponding kernel function is `up_write()`.
    public func upWrite() {
        releasing()
        owner.store(0, ordering: .releasing)
        let old = count.wrappingAdd(0 &- Self.writerLocked, ordering: .acquiringAndReleasing).oldValue
        if old & Self.writerLocked == 0 {
            contractViolation("up_write: \(name) is released by a writer that does not hold it")
        }
        if old & Self.waitersFlag != 0 { wake() }
        released()
    }

    /// Whether anyone holds the semaphore, in either mode: a snapshot.
    ///
    /// The corresponding kernel function is `rwsem_is_locked()`.
    public var isLocked: Bool { count.load(ordering: .acquiring) & Self.lockMask != 0 }

    // MARK: the scheduler, lock order and ThreadSanitizer

    private func before(_ file: StaticString, _ line: UInt, mightSleep: Bool = true) {
        if _slowPath(svm_det_active()) {
            if mightSleep { DeterministicScheduler.mightSleep() }
            DeterministicScheduler.nameLock(word, name)
            DeterministicScheduler.sleepingLockEvent(word, Int32(SVM_DET_BEFORE_ACQUIRE))
        }
        if _slowPath(svm_lockdep_enabled()) { LockOrder.acquiring(lockClass, site: LockSite(file, line)) }
    }

    /// After taking it: `trylock` names the trylock function, if one.
    private func acquired(_ file: StaticString, _ line: UInt, trylock: StaticString?) {
        svm_tsan_acquire(word)
        if _slowPath(svm_lockdep_enabled()) {
            LockOrder.acquired(word, lockClass, site: trylock.map { LockSite(file, line, trylock: $0) } ?? LockSite(file, line))
        }
        if _slowPath(svm_det_active()) { DeterministicScheduler.sleepingLockEvent(word, Int32(SVM_DET_ACQUIRED)) }
    }

    private func releasing() {
        if _slowPath(svm_lockdep_enabled()) { LockOrder.released(word) }
        svm_tsan_release(word)
    }

    private func released() {
        if _slowPath(svm_det_active()) { DeterministicScheduler.sleepingLockEvent(word, Int32(SVM_DET_RELEASED)) }
    }
}
