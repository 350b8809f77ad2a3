import CSVMSupport

/// Writeback and bounded waits on a folio: the busy states migration's
/// modes decide whether to wait for.
///
/// The emulator has no block layer; a test or a storm marks a folio as under
/// writeback and ends it from whichever thread completes the "I/O", as a
/// real writeback completes from an interrupt or a worker. Whatever that
/// thread needs to finish (a loop device needs the lock of a folio of its
/// backing file) is what can deadlock a migration that waits for it.
extension Folio {
    /// `folio_test_writeback()`.
    public var isWriteback: Bool { test(.writeback) }

    /// `folio_start_writeback()`: the caller holds the folio lock.
    /// Starting writeback twice is refused with a diagnostic.
    public func startWriteback() {
        guard isLocked else {
            return kernel.warn("folio_start_writeback: caller must hold the folio lock", "\(self)", kind: .lockNotHeld)
        }
        let old = atomicFlags.bitwiseOr(PageFlags.writeback.rawValue, ordering: .acquiringAndReleasing).oldValue
        if old & PageFlags.writeback.rawValue != 0 {
            kernel.warn("folio_start_writeback: folio is already under writeback", "\(self)")
        }
    }

    /// `folio_end_writeback()`: any thread may end it; sleepers on the folio wake.
    public func endWriteback() {
        let old = atomicFlags.bitwiseAnd(~PageFlags.writeback.rawValue, ordering: .acquiringAndReleasing).oldValue
        if old & PageFlags.writeback.rawValue == 0 {
            kernel.warn("folio_end_writeback: folio is not under writeback", "\(self)")
        }
        _ = svm_futex_wake(meta.flagsWord, Int32.max)
    }

    /// `folio_wait_writeback()` with a limit: sleeps until writeback ends or
    /// `timeoutNanos` pass (0: no limit). Returns whether it ended.
    @discardableResult
    public func waitWriteback(timeoutNanos: UInt64 = 0) -> Bool {
        let w = meta.flagsWord
        let deadline = timeoutNanos == 0 ? UInt64.max : HostClock.nanos() &+ timeoutNanos
        while true {
            let v = atomicFlags.load(ordering: .acquiring)
            if v & PageFlags.writeback.rawValue == 0 { return true }
            let now = HostClock.nanos()
            if now >= deadline { return false }
            // Woken by endWriteback (or any flags change); re-checked each time.
            _ = svm_futex_wait(w, v, min(deadline - now, 1_000_000))
        }
    }

    /// `folio_lock()` with a limit: takes the lock, sleeping at most
    /// `timeoutNanos` for it. Returns whether it was taken. Every wait in the
    /// emulator is bounded so that a deadlock shows as a diagnostic instead of
    /// a hung test; the kernel's own wait has no limit.
    public func lock(timeoutNanos: UInt64) -> Bool {
        if tryLock() { return true }
        let deadline = HostClock.nanos() &+ timeoutNanos
        while true {
            let now = HostClock.nanos()
            if now >= deadline { return false }
            if waitUnlocked(timeoutNanos: deadline - now), tryLock() { return true }
        }
    }
}
