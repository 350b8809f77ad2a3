import CSVMSupport

/// A view of one kernel lock word (`spinlock_t`): the split PTE-table locks,
/// the PMD locks, the zone locks. The word lives in caller-owned memory (a
/// pfn- or table-indexed array, or a field beside the state it guards); the
/// view owns nothing and costs nothing to make.
///
/// The lock is the three-state futex mutex of CSVMSupport (`svm_mutex_*`):
/// it spins a little, then sleeps on the word; a failed ``tryLock()`` is one
/// CAS. It is not recursive, and only its holder releases it.
/// Take it in the scoped form, ``withLock(_:)``; ``lock()`` and ``unlock()``
/// are for the few primitives whose contract hands a held lock across a
/// function boundary (and say so with enter/exit sentences).
@usableFromInline
struct SpinLockRef {
    @usableFromInline let word: UnsafeMutablePointer<UInt32>
    /// The lock's ``LockOrder`` class (page-table lock, PMD lock, ...).
    @usableFromInline let lockClass: LockClass

    /// A view of the lock word at `word` (0: free), of class `lockClass`.
    @inlinable init(_ word: UnsafeMutablePointer<UInt32>, _ lockClass: LockClass) {
        self.word = word
        self.lockClass = lockClass
    }

    /// `spin_lock()`: takes the lock, sleeping while another thread holds it.
    @inlinable @inline(__always)
    func lock(file: StaticString = #fileID, line: UInt = #line) {
        if _slowPath(svm_lockdep_enabled()) { return lockValidated(LockSite(file, line)) }
        svm_mutex_lock(word)
    }

    /// `spin_lock()` with lock-order validation on.
    @usableFromInline @inline(never)
    func lockValidated(_ site: LockSite) {
        LockOrder.acquiring(lockClass, site: site)
        svm_mutex_lock(word)
        LockOrder.acquired(word, lockClass, site: site)
    }

    /// `spin_unlock()`: releases the lock and wakes one sleeper.
    @inlinable @inline(__always)
    func unlock() {
        if _slowPath(svm_lockdep_enabled()) { LockOrder.released(word) }
        svm_mutex_unlock(word)
    }

    /// `spin_trylock()`: takes the lock if it is free; never blocks.
    @inlinable @inline(__always)
    func tryLock(file: StaticString = #fileID, line: UInt = #line) -> Bool {
        let taken = svm_mutex_trylock(word)
        if taken && _slowPath(svm_lockdep_enabled()) {
            LockOrder.acquired(word, lockClass, site: LockSite(file, line, trylock: "spin_trylock"))
        }
        return taken
    }

    /// Whether some thread holds the lock (`spin_is_locked()`): a snapshot,
    /// and it cannot tell which thread.
    @inlinable var isLocked: Bool { svm_mutex_is_locked(word) }

    /// Runs `body` with the lock held and releases it on every way out,
    /// returns and throws alike.
    @inlinable @inline(__always)
    func withLock<R, E: Error>(file: StaticString = #fileID, line: UInt = #line,
                               _ body: () throws(E) -> R) throws(E) -> R {
        lock(file: file, line: line)
        defer { unlock() }
        return try body()
    }

    /// Runs `body` holding this lock and `other` (taken second, as
    /// `spin_lock_nested()`; once when both are the same word), releasing
    /// both on every way out. Callers keep one order (old before new).
    @inlinable @inline(__always)
    func withLock<R, E: Error>(nesting other: SpinLockRef, file: StaticString = #fileID, line: UInt = #line,
                               _ body: () throws(E) -> R) throws(E) -> R {
        lock(file: file, line: line)
        defer { unlock() }
        if other.word == word { return try body() }
        other.lock(file: file, line: line)
        defer { other.unlock() }
        return try body()
    }

    /// `lockdep_assert_held()`: records `rule` as a diagnostic of `kernel`
    /// (``Kernel/warn(_:_:kind:)``, kind ``DiagnosticKind/lockNotHeld``) when a
    /// function whose contract says this lock is held was called without it.
    ///
    /// Where lock validation (``LockOrder``) follows the calling thread (every
    /// test, every emulated thread of a ``DeterministicScheduler``, so the
    /// soak), the check is exact: the calling thread must hold this lock.
    /// Elsewhere, debug builds check that some thread holds it. Release builds
    /// without validation pay one load of the validation flag and a
    /// predictable branch, as every lock site does.
    @inlinable @inline(__always)
    func assertHeld(_ rule: @autoclosure () -> String, _ kernel: Kernel,
                    _ detail: @autoclosure () -> String = "") {
        if _slowPath(svm_lockdep_enabled()) {
            if LockOrder.holds(word) != false { return }
            return kernel.warn(rule(), detail(), kind: .lockNotHeld)
        }
#if DEBUG
        if !svm_mutex_is_locked(word) { kernel.warn(rule(), detail(), kind: .lockNotHeld) }
#endif
    }
}
