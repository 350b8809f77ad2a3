import Synchronization
import CSVMSupport

/// A reader-writer semaphore for drivers (`struct rw_semaphore`): readers
/// share it, a writer has it alone. A real futex lock on real threads, a
/// scheduling point under a ``DeterministicScheduler``. Writers do not starve
/// readers out (no writer preference), which is simpler than the kernel's;
/// the mmap lock is one that prefers writers.
public final class KernelRWSemaphore: @unchecked Sendable {
    // The word: bit 31 a writer, bit 30 sleepers, bit 29 a writer waits
    // (only when writers are preferred), bits 0-28 the readers.
    @usableFromInline let word: UnsafeMutablePointer<UInt32>
    @usableFromInline static let writer: UInt32 = 1 << 31
    @usableFromInline static let sleepers: UInt32 = 1 << 30
    @usableFromInline static let writerWaiting: UInt32 = 1 << 29
    @usableFromInline static let readers: UInt32 = (1 << 29) - 1
    /// The semaphore's name in deadlock reports, and its lock-order class.
    public let name: String
    /// The ``LockOrder`` class of `name`.
    let lockClass: LockClass
    /// A waiting writer keeps new readers out (the mmap lock: a fault storm
    /// must not starve `munmap`); a reader must then not take it twice.
    let prefersWriters: Bool

    /// A free semaphore named `name`; every semaphore of one name is one
    /// ``LockOrder`` class.
    ///
    /// The corresponding kernel function is `init_rwsem()`.
    public convenience init(_ name: String = "rwsem") {
        self.init(name, prefersWriters: false, lockClass: LockOrder.lockClass(named: name))
    }

    /// A free semaphore of class `lockClass`; with `prefersWriters`,
    /// readers arriving while a writer waits wait behind it.
    init(_ name: String, prefersWriters: Bool, lockClass: LockClass) {
        self.name = name
        self.prefersWriters = prefersWriters
        self.lockClass = lockClass
        word = .allocate(capacity: 1)
        word.initialize(to: 0)
    }

    deinit { word.deallocate() }

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

    /// Takes the semaphore shared, sleeping while a writer holds it.
    ///
    /// - Parameters:
    ///   - file: the call site, for lock-order reports (``LockOrder``).
    ///   - line: the call site's line.
    ///
    /// The corresponding kernel function is `down_read()`.
    public func downRead(file: StaticString = #fileID, line: UInt = #line) {
        let blockers = prefersWriters ? Self.writer | Self.writerWaiting : Self.writer
        acquire(file, line, waiting: 0) { $0 & blockers == 0 ? $0 + 1 : nil }
    }

    /// Takes the semaphore alone, sleeping while anyone holds it.
    ///
    /// - Parameters:
    ///   - file: the call site, for lock-order reports (``LockOrder``).
    ///   - line: the call site's line.
    ///
    /// The corresponding kernel function is `down_write()`.
    public func downWrite(file: StaticString = #fileID, line: UInt = #line) {
        acquire(file, line, waiting: prefersWriters ? Self.writerWaiting : 0) {
            $0 & (Self.writer | Self.readers) == 0 ? ($0 | Self.writer) & ~Self.writerWaiting : nil
        }
    }

    /// Takes the semaphore shared if no writer holds it; never sleeps.
    ///
    /// - Returns: whether the caller now holds it.
    ///
    /// The corresponding kernel function is `down_read_trylock()`.
    public func tryDownRead() -> Bool {
        svm_det_lock_event(word, Int32(SVM_DET_BEFORE_ACQUIRE))
        let blockers = prefersWriters ? Self.writer | Self.writerWaiting : Self.writer
        var v = UnsafeAtomic(word).load(ordering: .acquiring)
        while v & blockers == 0 {
            if UnsafeAtomic(word).compareExchange(&v, v + 1, successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring) { acquired(nil, 0); return true }
        }
        return false
    }

    /// Releases a shared hold.
    ///
    /// The corresponding kernel function is `up_read()`.
    public func upRead() { release { $0 - 1 } }

    /// Whether anyone holds the semaphore, in either mode: a snapshot.
    ///
    /// The corresponding kernel function is `rwsem_is_locked()`.
    public var isLocked: Bool { UnsafeAtomic(word).load(ordering: .acquiring) & (Self.writer | Self.readers) != 0 }

    /// Releases the writer's hold.
    ///
    /// The corresponding kernel function is `up_write()`.
    public func upWrite() { release { $0 & ~Self.writer } }

    /// Sleeps until `next` gives the word's next value (the `sleepers` bit
    /// aside); `waiting` marks the word while the caller sleeps.
    private func acquire(_ file: StaticString, _ line: UInt, waiting: UInt32, _ next: (UInt32) -> UInt32?) {
        if _slowPath(svm_det_active()) { DeterministicScheduler.nameLock(word, name) }
        if svm_lockdep_enabled() { LockOrder.acquiring(lockClass, site: LockSite(file, line)) }
        svm_det_lock_event(word, Int32(SVM_DET_BEFORE_ACQUIRE))
        var v = UnsafeAtomic(word).load(ordering: .acquiring)
        while true {
            if let n = next(v & ~Self.sleepers) {
                if UnsafeAtomic(word).compareExchange(&v, n | (v & Self.sleepers), successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring) { break }
                continue
            }
            let marks = Self.sleepers | waiting
            if v & marks != marks && !UnsafeAtomic(word).compareExchange(&v, v | marks, successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring) { continue }
            _ = svm_futex_wait(word, v | marks, 0)
            v = UnsafeAtomic(word).load(ordering: .acquiring)
        }
        acquired(file, line)
    }

    /// After taking it: `file` is nil for a trylock.
    private func acquired(_ file: StaticString?, _ line: UInt) {
        svm_tsan_acquire(word)
        svm_det_lock_event(word, Int32(SVM_DET_ACQUIRED))
        if svm_lockdep_enabled() {
            LockOrder.acquired(word, lockClass, site: file.map { LockSite($0, line) } ?? LockSite(#fileID, #line, trylock: "down_read_trylock"))
        }
    }

    private func release(_ next: (UInt32) -> UInt32) {
        if svm_lockdep_enabled() { LockOrder.released(word) }
        svm_tsan_release(word)
        var v = UnsafeAtomic(word).load(ordering: .acquiring)
        while !UnsafeAtomic(word).compareExchange(&v, next(v) & ~Self.sleepers, successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring) {}
        if v & Self.sleepers != 0 { _ = svm_futex_wake(word, Int32.max) }
        svm_det_lock_event(word, Int32(SVM_DET_RELEASED))
    }
}
