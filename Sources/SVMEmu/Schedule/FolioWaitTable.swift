import Synchronization
import CSVMSupport

/// The folio lock's wait queues (mm/filemap.c): a table of hashed wait
/// queues, one kernel's, where a thread that sleeps on a folio's `PG_locked`
/// queues a record that lives on its own stack.
///
/// The kernel's rules, which decide who holds the folio lock next:
///
/// - A waiter queues at the tail of the folio's queue (`folio_wait_table`,
///   256 queues hashed by folio; a queue is shared by every folio that
///   hashes to it) after setting `PG_waiters` and trying once more, under
///   the queue's lock.
/// - `folio_unlock()` clears `PG_locked` and, only when `PG_waiters` was
///   set, walks the queue from its head (`folio_wake_bit()`): every waiter
///   for the bit without taking it (`folio_wait_locked()`) is woken; the
///   first waiter that takes the lock (`__folio_lock()`) is woken and ends
///   the walk. If the lock was taken again meanwhile, the walk stops at that
///   waiter without waking it.
/// - A woken locker takes the bit itself, and when it finds it taken (a
///   newcomer stole it) queues again at the tail. After it has queued
///   ``FolioWaitTable/pageLockUnfairness`` times (`sysctl_page_lock_unfairness`,
///   5) it asks for the handoff: the waker then sets `PG_locked` for it
///   before waking it (`wake_page_function()`), so it owns the lock when it
///   runs and no newcomer can take it in between.
/// - `PG_waiters` is cleared when the walk leaves the queue empty or found
///   no waiter of this folio in it.
///
/// The uncontended `folio_lock()` and `folio_unlock()` never come here (one
/// atomic each, in ``Folio``). Each waiter sleeps on a word of its own
/// record: a futex on real threads, the scheduler's wait under a
/// ``DeterministicScheduler`` (the sleeper gives its CPU away).
final class FolioWaitTable: @unchecked Sendable {
    /// `PAGE_WAIT_TABLE_BITS`.
    static let bits = 8
    /// Per queue: word 0 the queue's lock (`q->lock`, a spinning lock, 32
    /// bits), word 1 the first waiter, word 2 the last.
    static let wordsPerQueue = 4
    /// `sysctl_page_lock_unfairness`: how many times a waiter for the lock
    /// queues (and may lose the lock to a newcomer after its wake-up) before
    /// it asks for the handoff.
    static let pageLockUnfairness = 5

    // The waiter record's words (`struct wait_page_queue`).
    static let next = 0, previous = 1, key = 2, flags = 3, listed = 4, size = 5
    // Its flags (`wait->flags`).
    /// `WQ_FLAG_EXCLUSIVE`: the waiter takes the lock (woken one at a time).
    static let exclusive: UInt32 = 0x1
    /// `WQ_FLAG_WOKEN`: the waker is done with the waiter's bit.
    static let woken: UInt32 = 0x2
    /// `WQ_FLAG_CUSTOM`: the waiter asks for the handoff.
    static let custom: UInt32 = 0x4
    /// `WQ_FLAG_DONE`: the waiter holds the lock (the waker took it for it).
    static let done: UInt32 = 0x8

    let words: UnsafeMutablePointer<UInt64>

    init() {
        let count = (1 << Self.bits) * Self.wordsPerQueue
        words = .allocate(capacity: count)
        words.initialize(repeating: 0, count: count)
    }

    deinit { words.deallocate() }

    /// `folio_waitqueue()`: the folio's queue, by its pfn (a hash that is
    /// the same on every run, so a deterministic run's collisions are too).
    @inline(__always) func queue(_ pfn: UInt64) -> UnsafeMutablePointer<UInt64> {
        let index = Int((pfn &* 0x9E37_79B9_7F4A_7C15) >> UInt64(64 - Self.bits))
        return words + index * Self.wordsPerQueue
    }

    @inline(__always) static func lockWord(_ q: UnsafeMutablePointer<UInt64>) -> UnsafeMutablePointer<UInt32> {
        UnsafeMutableRawPointer(q).assumingMemoryBound(to: UInt32.self)
    }

    @inline(__always) static func flagsWord(_ waiter: UnsafeMutablePointer<UInt64>) -> UnsafeMutablePointer<UInt32> {
        UnsafeMutableRawPointer(waiter + flags).assumingMemoryBound(to: UInt32.self)
    }

    @inline(__always) static func record(_ address: UInt64) -> UnsafeMutablePointer<UInt64> {
        UnsafeMutablePointer<UInt64>(bitPattern: UInt(address))!
    }

    /// `folio_wait_bit_common()` on `PG_locked`: EXCLUSIVE (`__folio_lock()`:
    /// returns holding the lock) or SHARED (`folio_wait_locked()`: returns
    /// once an unlock woke it, or the bit was clear). `timeoutNanos` (0: no
    /// limit) bounds a SHARED wait, as a fatal signal would end the kernel's
    /// killable one; an EXCLUSIVE wait has none.
    ///
    /// `afterQueued` runs once, after the waiter is queued (or found the bit
    /// clear) and before it sleeps: `migration_entry_wait_on_locked()` drops
    /// the page-table lock there, so that the migration, which needs that
    /// lock to remove its entry, cannot end and free the folio before the
    /// waiter is on its queue.
    ///
    /// - Returns: whether the wait ended as the kernel's returns 0 (the lock
    ///   taken, or the waiter woken).
    func wait(word: UnsafeMutablePointer<UInt32>, pfn: UInt64, exclusive: Bool, timeoutNanos: UInt64 = 0,
              afterQueued: () -> Void = {}) -> Bool {
        var queuedOnce = false
        let q = queue(pfn)
        let deadline = timeoutNanos == 0 ? UInt64.max : HostClock.nanos() &+ timeoutNanos
        var unfairness = Self.pageLockUnfairness
        return withUnsafeTemporaryAllocation(of: UInt64.self, capacity: Self.size) { buffer in
            let waiter = buffer.baseAddress!
            waiter.initialize(repeating: 0, count: Self.size)
            waiter[Self.key] = UInt64(UInt(bitPattern: word))
            let flags = Self.flagsWord(waiter)
            var timedOut = false
            repeating: while true {
                var f: UInt32 = 0
                if exclusive {
                    f = Self.exclusive
                    unfairness -= 1
                    if unfairness < 0 { f |= Self.custom }
                }
                UnsafeAtomic(flags).store(f, ordering: .releasing)
                // The last check and the queueing, under the queue's lock.
                Self.lockQueue(q)
                _ = UnsafeAtomic(word).bitwiseOr(PageFlags.waiters.rawValue, ordering: .acquiringAndReleasing)
                if !Self.tryFlag(word, waiter, exclusive) { Self.addTail(q, waiter) }
                Self.unlockQueue(q)
                if !queuedOnce { queuedOnce = true; afterQueued() }
                while true {
                    let seen = UnsafeAtomic(flags).load(ordering: .acquiring)
                    if seen & Self.woken == 0 {
                        if timedOut { break }
                        let now = HostClock.nanos()
                        if now >= deadline { timedOut = true; continue }
                        Self.sleep(flags, seen, lock: word, nanos: deadline == .max ? 0 : deadline - now)
                        continue
                    }
                    if !exclusive || seen & Self.done != 0 { break }
                    // Woken without the handoff: take the bit, or queue again.
                    let old = UnsafeAtomic(word).bitwiseOr(PageFlags.locked.rawValue, ordering: .acquiringAndReleasing).oldValue
                    if old & PageFlags.locked.rawValue != 0 { continue repeating }
                    UnsafeAtomic(flags).store(seen | Self.done, ordering: .releasing)
                    break
                }
                break
            }
            // finish_wait(): the waker unlists a woken waiter as its last step.
            if UnsafeAtomic(waiter + Self.listed).load(ordering: .acquiring) != 0 {
                Self.lockQueue(q)
                if waiter[Self.listed] != 0 { Self.remove(q, waiter) }
                Self.unlockQueue(q)
            }
            let f = UnsafeAtomic(flags).load(ordering: .acquiring)
            guard exclusive else { return f & Self.woken != 0 }
            if f & Self.done != 0 { return true }
            return f & Self.woken != 0
                && UnsafeAtomic(word).bitwiseOr(PageFlags.locked.rawValue, ordering: .acquiringAndReleasing).oldValue & PageFlags.locked.rawValue == 0
        }
    }

    /// `schedule()` until a waker sets `WQ_FLAG_WOKEN` (or `nanos` pass, 0:
    /// no limit).
    static func sleep(_ flags: UnsafeMutablePointer<UInt32>, _ seen: UInt32, lock: UnsafeMutablePointer<UInt32>, nanos: UInt64) {
        if _slowPath(svm_det_active()) {
            DeterministicScheduler.willWait(for: UnsafeRawPointer(lock))
            _ = svm_futex_wait(flags, seen, nanos)
        } else {
            // Bounded, so that a lost wake-up would cost time, never a hang.
            _ = svm_futex_wait(flags, seen, nanos == 0 ? 10_000_000 : min(nanos, 10_000_000))
        }
    }

    /// `folio_trylock_flag()` (under the queue's lock): an EXCLUSIVE waiter
    /// takes the bit, a SHARED one sees it clear; then it is done.
    static func tryFlag(_ word: UnsafeMutablePointer<UInt32>, _ waiter: UnsafeMutablePointer<UInt64>, _ exclusive: Bool) -> Bool {
        if exclusive {
            if UnsafeAtomic(word).bitwiseOr(PageFlags.locked.rawValue, ordering: .acquiringAndReleasing).oldValue & PageFlags.locked.rawValue != 0 { return false }
        } else if UnsafeAtomic(word).load(ordering: .acquiring) & PageFlags.locked.rawValue != 0 {
            return false
        }
        let flags = flagsWord(waiter)
        UnsafeAtomic(flags).store(UnsafeAtomic(flags).load(ordering: .relaxed) | woken | done, ordering: .releasing)
        return true
    }

    /// `folio_wake_bit()` on `PG_locked`, after the unlock cleared it and saw
    /// `PG_waiters`: the walk of `__wake_up_locked_key()` with
    /// `wake_page_function()`, one exclusive waiter at most. Reports the
    /// unlock's release to a deterministic scheduler.
    func wake(word: UnsafeMutablePointer<UInt32>, pfn: UInt64) {
        let q = queue(pfn)
        let key = UInt64(UInt(bitPattern: word))
        Self.lockQueue(q)
        var pageMatch = false
        var at = q[1]
        while at != 0 {
            let waiter = Self.record(at)
            at = waiter[Self.next]
            // wake_page_match()
            guard waiter[Self.key] == key else { continue }
            pageMatch = true
            let flags = Self.flagsWord(waiter)
            var f = UnsafeAtomic(flags).load(ordering: .acquiring)
            if f & Self.exclusive != 0 {
                // Taken again already: stop, and wake nobody.
                if UnsafeAtomic(word).load(ordering: .acquiring) & PageFlags.locked.rawValue != 0 { break }
                if f & Self.custom != 0 {
                    // The handoff: the bit is taken on the waiter's behalf.
                    if UnsafeAtomic(word).bitwiseOr(PageFlags.locked.rawValue, ordering: .acquiringAndReleasing).oldValue
                        & PageFlags.locked.rawValue != 0 { break }
                    f |= Self.done
                }
            }
            Self.unlink(q, waiter)
            UnsafeAtomic(flags).store(f | Self.woken, ordering: .releasing)
            _ = svm_futex_wake(flags, 1)
            // The last touch of the record: its owner may return once it sees this.
            UnsafeAtomic(waiter + Self.listed).store(0, ordering: .releasing)
            if f & Self.exclusive != 0 { break }
        }
        if q[1] == 0 || !pageMatch {
            _ = UnsafeAtomic(word).bitwiseAnd(~PageFlags.waiters.rawValue, ordering: .acquiringAndReleasing)
        }
        Self.unlockQueue(q)
        // The unlock's release, for a deterministic scheduler: after the
        // wake-ups, as the futex lock reported it (the queue's lock is no
        // scheduling point for an emulated thread, so no woken waiter runs
        // before this).
        svm_det_lock_event(UnsafeRawPointer(word), Int32(SVM_DET_RELEASED) | Int32(SVM_DET_SLEEPING))
    }

    /// `spin_lock(&q->lock)`. An emulated thread takes it without a
    /// scheduling point: it is held across no scheduling point, so under a
    /// deterministic scheduler no other emulated thread ever finds it held,
    /// and taking it costs no virtual time (as the futex lock's wake-up
    /// cost none).
    static func lockQueue(_ q: UnsafeMutablePointer<UInt64>) {
        let m = lockWord(q)
        guard svm_det_current() != nil else { return svm_mutex_lock(m) }
        while true {
            var free: UInt32 = 0
            if UnsafeAtomic(m).compareExchange(&free, 1, successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring) { break }
            svm_cpu_relax()
        }
        svm_tsan_acquire(m)
    }

    /// `spin_unlock(&q->lock)`.
    static func unlockQueue(_ q: UnsafeMutablePointer<UInt64>) {
        let m = lockWord(q)
        guard svm_det_current() != nil else { return svm_mutex_unlock(m) }
        svm_tsan_release(m)
        // A host thread may sleep on it (state 2): wake it on the host.
        var held = UnsafeAtomic(m).load(ordering: .relaxed)
        while !UnsafeAtomic(m).compareExchange(&held, 0, successOrdering: .acquiringAndReleasing, failureOrdering: .relaxed) {}
        if held == 2 { _ = svm_futex_wake_raw(m, 1) }
    }

    /// `__add_wait_queue_entry_tail()` (under the queue's lock).
    static func addTail(_ q: UnsafeMutablePointer<UInt64>, _ waiter: UnsafeMutablePointer<UInt64>) {
        let address = UInt64(UInt(bitPattern: waiter))
        waiter[next] = 0
        waiter[previous] = q[2]
        if q[2] == 0 { q[1] = address } else { record(q[2])[next] = address }
        q[2] = address
        UnsafeAtomic(waiter + listed).store(1, ordering: .releasing)
    }

    /// `list_del()` (under the queue's lock), without the listed mark.
    static func unlink(_ q: UnsafeMutablePointer<UInt64>, _ waiter: UnsafeMutablePointer<UInt64>) {
        let n = waiter[next], p = waiter[previous]
        if p == 0 { q[1] = n } else { record(p)[next] = n }
        if n == 0 { q[2] = p } else { record(n)[previous] = p }
    }

    /// `finish_wait()`'s removal (under the queue's lock).
    static func remove(_ q: UnsafeMutablePointer<UInt64>, _ waiter: UnsafeMutablePointer<UInt64>) {
        unlink(q, waiter)
        UnsafeAtomic(waiter + listed).store(0, ordering: .releasing)
    }

    /// The waiters queued for `word` in its queue, first to last, as
    /// (takes the lock, asks for the handoff): for tests.
    func waiters(word: UnsafeMutablePointer<UInt32>, pfn: UInt64) -> [(exclusive: Bool, handoff: Bool)] {
        let q = queue(pfn)
        let key = UInt64(UInt(bitPattern: word))
        var list: [(exclusive: Bool, handoff: Bool)] = []
        Self.lockQueue(q)
        var at = q[1]
        while at != 0 {
            let waiter = Self.record(at)
            if waiter[Self.key] == key {
                let f = UnsafeAtomic(Self.flagsWord(waiter)).load(ordering: .acquiring)
                list.append((f & Self.exclusive != 0, f & Self.custom != 0))
            }
            at = waiter[Self.next]
        }
        Self.unlockQueue(q)
        return list
    }
}
