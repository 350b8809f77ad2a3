import Synchronization
import CSVMSupport

// The rwsem's slow paths (kernel/locking/rwsem.c): the wait list, the
// read and write slow paths, the wake-ups and the handoff. The fast paths
// are KernelRWSemaphore.swift; the optimistic spinning is KernelRWSemaphoreSpin.swift.
extension KernelRWSemaphore {
    /// `rwsem_set_reader_owned()`: keeps the non-spinnable bit.
    func setReaderOwned(_ me: UInt) {
        let old = owner.load(ordering: .relaxed)
        owner.store(UInt64(me) | Self.readerOwned | (old & Self.nonSpinnable), ordering: .releasing)
    }

    /// `clear_nonspinnable()`.
    func clearNonSpinnable() {
        if owner.load(ordering: .relaxed) & Self.nonSpinnable != 0 {
            _ = owner.bitwiseAnd(~Self.nonSpinnable, ordering: .acquiringAndReleasing)
        }
    }

    /// `rwsem_set_nonspinnable()`: only while readers own it.
    func setNonSpinnable() {
        var o = owner.load(ordering: .acquiring)
        while o & Self.readerOwned != 0 && o & Self.nonSpinnable == 0 {
            if owner.compareExchange(&o, o | Self.nonSpinnable, successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring) { return }
        }
    }

    static func record(_ address: UInt64) -> UnsafeMutablePointer<UInt64> {
        UnsafeMutablePointer<UInt64>(bitPattern: UInt(address))!
    }

    static func wokenWord(_ waiter: UnsafeMutablePointer<UInt64>) -> UnsafeMutablePointer<UInt32> {
        UnsafeMutableRawPointer(waiter + woken).assumingMemoryBound(to: UInt32.self)
    }

    /// A waiter record for `me` of `type` (on the caller's stack), for `body`.
    func withWaiter<R>(_ me: UInt, _ type: UInt64, _ body: (UnsafeMutablePointer<UInt64>) -> R) -> R {
        withUnsafeTemporaryAllocation(of: UInt64.self, capacity: Self.size) { buffer in
            let waiter = buffer.baseAddress!
            waiter.initialize(repeating: 0, count: Self.size)
            UnsafeAtomic(waiter + Self.task).store(UInt64(me), ordering: .relaxed)
            waiter[Self.type] = type
            waiter[Self.timeout] = HostClock.nanos() &+ Self.waitTimeoutNanos
            return body(waiter)
        }
    }

    /// `rwsem_down_read_slowpath()`: `c` is the count after the fast path
    /// added this reader's bias.
    func readSlowPath(_ me: UInt, _ c: UInt64) {
        var adjustment = 0 &- Self.readerBias
        let readers = c >> 8
        if !(owner.load(ordering: .acquiring) & Self.readerOwned != 0 && readers > 1 && c & Self.writerLocked == 0),
           c & (Self.writerLocked | Self.handoffFlag) == 0 {
            // Reader lock stealing: no writer, no handoff.
            setReaderOwned(me)
            if readers == 1 && c & Self.waitersFlag != 0 {
                svm_mutex_lock(waitLock)
                if words[3] != 0 { markWake(.readOwned) }
                svm_mutex_unlock(waitLock)
            }
            return
        }
        withWaiter(me, Self.waitingForRead) { waiter in
            svm_mutex_lock(waitLock)
            if words[3] == 0 {
                if count.load(ordering: .acquiring) & Self.writerLocked == 0 {
                    svm_mutex_unlock(waitLock)
                    setReaderOwned(me)
                    return
                }
                adjustment &+= Self.waitersFlag
            }
            addWaiter(waiter)
            let now = count.wrappingAdd(adjustment, ordering: .acquiringAndReleasing).newValue
            condWake(now)
            svm_mutex_unlock(waitLock)
            // Granted when a waker clears the task word (the last it touches).
            let woken = Self.wokenWord(waiter)
            while UnsafeAtomic(waiter + Self.task).load(ordering: .acquiring) != 0 {
                if UnsafeAtomic(woken).load(ordering: .acquiring) == 0 { sleep(on: woken) } else { svm_cpu_relax() }
            }
        }
    }

    /// `rwsem_down_write_slowpath()`.
    func writeSlowPath(_ me: UInt) {
        if canSpinOnOwner() && optimisticSpin(me) { return }
        withWaiter(me, Self.waitingForWrite) { waiter in
            svm_mutex_lock(waitLock)
            addWaiter(waiter)
            if words[3] != UInt64(UInt(bitPattern: waiter)) {
                condWake(count.load(ordering: .acquiring))
            } else {
                _ = count.bitwiseOr(Self.waitersFlag, ordering: .acquiringAndReleasing)
            }
            let woken = Self.wokenWord(waiter)
            while !tryWriteLock(me, waiter) {
                svm_mutex_unlock(waitLock)
                var spun = false
                if UnsafeAtomic(waiter + Self.handoffSet).load(ordering: .relaxed) != 0 {
                    // The first waiter with the handoff spins while the owner runs.
                    spun = spinOnOwner() == .null
                }
                if !spun {
                    sleep(on: woken)
                    UnsafeAtomic(woken).store(0, ordering: .releasing)
                }
                svm_mutex_lock(waitLock)
            }
            svm_mutex_unlock(waitLock)
        }
        owner.store(UInt64(me), ordering: .releasing)
    }

    /// `schedule()` until a waker sets the word.
    func sleep(on woken: UnsafeMutablePointer<UInt32>) {
        if UnsafeAtomic(woken).load(ordering: .acquiring) != 0 { return }
        if _slowPath(svm_det_active()) {
            DeterministicScheduler.willWait(for: UnsafeRawPointer(word))
            _ = svm_futex_wait(woken, 0, 0)
        } else {
            // Bounded, so that a lost wake-up would cost time, never a hang.
            _ = svm_futex_wait(woken, 0, 10_000_000)
        }
    }

    /// `rwsem_try_write_lock()` (under wait_lock): takes the lock for the
    /// waiter `waiter` and unlists it, or sets the handoff bit for the first
    /// waiter that waited too long.
    func tryWriteLock(_ me: UInt, _ waiter: UnsafeMutablePointer<UInt64>) -> Bool {
        let first = Self.record(words[3])
        var c = count.load(ordering: .acquiring)
        var new: UInt64
        repeat {
            let hasHandoff = c & Self.handoffFlag != 0
            if hasHandoff && UnsafeAtomic(first + Self.handoffSet).load(ordering: .relaxed) != 0 && waiter != first { return false }
            new = c
            if c & Self.lockMask != 0 {
                if hasHandoff || HostClock.nanos() <= waiter[Self.timeout] { return false }
                new |= Self.handoffFlag
            } else {
                new |= Self.writerLocked
                new &= ~Self.handoffFlag
                if words[3] == words[4] { new &= ~Self.waitersFlag }
            }
        } while !count.compareExchange(&c, new, successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring)
        if new & Self.handoffFlag != 0 {
            UnsafeAtomic(first + Self.handoffSet).store(1, ordering: .relaxed)
            return false
        }
        unlink(waiter)
        return true
    }

    /// `rwsem_cond_wake_waiter()` (under wait_lock).
    func condWake(_ c: UInt64) {
        if c & Self.writerLocked != 0 { return }
        if c & Self.readerMask != 0 {
            markWake(.readers)
        } else {
            clearNonSpinnable()
            markWake(.any)
        }
    }

    /// `rwsem_wake()`.
    func wake() {
        svm_mutex_lock(waitLock)
        if words[3] != 0 { markWake(.any) }
        svm_mutex_unlock(waitLock)
    }

    enum WakeType { case any, readers, readOwned }

    /// `rwsem_mark_wake()` (under wait_lock): a writer at the head is woken
    /// (for `.any`); readers at the head are granted the lock together with
    /// every queued reader, writers skipped, up to `MAX_READERS_WAKEUP`.
    func markWake(_ type: WakeType) {
        let first = Self.record(words[3])
        if first[Self.type] == Self.waitingForWrite {
            if type == .any { Self.wakeUp(first) }
            return
        }
        var adjustment: UInt64 = 0
        if type != .readOwned {
            adjustment = Self.readerBias
            let old = count.wrappingAdd(adjustment, ordering: .acquiringAndReleasing).oldValue
            if old & Self.writerLocked != 0 {
                // A writer stole it: a reader that waited too long asks for the handoff.
                if HostClock.nanos() > first[Self.timeout] {
                    if old & Self.handoffFlag == 0 { adjustment &-= Self.handoffFlag }
                    UnsafeAtomic(first + Self.handoffSet).store(1, ordering: .relaxed)
                }
                _ = count.wrappingAdd(0 &- adjustment, ordering: .acquiringAndReleasing)
                return
            }
            setReaderOwned(UInt(UnsafeAtomic(first + Self.task).load(ordering: .relaxed)))
        }
        // Move every reader (writers stay), first to last, to a list of
        // their own, linked through their records.
        var woken = 0
        var grantedFirst: UInt64 = 0, grantedLast: UnsafeMutablePointer<UInt64>? = nil
        var at = words[3]
        while at != 0 {
            let waiter = Self.record(at)
            let address = at
            at = waiter[Self.next]
            if waiter[Self.type] == Self.waitingForWrite { continue }
            unlink(waiter)
            waiter[Self.next] = 0
            if let last = grantedLast { last[Self.next] = address } else { grantedFirst = address }
            grantedLast = waiter
            woken += 1
            if woken >= Self.maxReadersWakeup { break }
        }
        adjustment = UInt64(woken) &* Self.readerBias &- adjustment
        let old = count.load(ordering: .acquiring)
        if words[3] == 0 {
            adjustment &-= Self.waitersFlag
            if old & Self.handoffFlag != 0 { adjustment &-= Self.handoffFlag }
        } else if woken > 0, old & Self.handoffFlag != 0 {
            adjustment &-= Self.handoffFlag
        }
        if adjustment != 0 { _ = count.wrappingAdd(adjustment, ordering: .acquiringAndReleasing) }
        at = grantedFirst
        while at != 0 {
            let waiter = Self.record(at)
            at = waiter[Self.next]
            Self.wakeUp(waiter)
            // The last touch: the reader may return once it sees this.
            UnsafeAtomic(waiter + Self.task).store(0, ordering: .releasing)
        }
    }

    /// wake_q: the waiter runs again.
    static func wakeUp(_ waiter: UnsafeMutablePointer<UInt64>) {
        let woken = wokenWord(waiter)
        UnsafeAtomic(woken).store(1, ordering: .releasing)
        _ = svm_futex_wake(woken, 1)
    }

    /// `rwsem_add_waiter()` (under wait_lock): at the tail.
    func addWaiter(_ waiter: UnsafeMutablePointer<UInt64>) {
        let address = UInt64(UInt(bitPattern: waiter))
        waiter[Self.next] = 0
        waiter[Self.previous] = words[4]
        if words[4] == 0 { words[3] = address } else { Self.record(words[4])[Self.next] = address }
        words[4] = address
    }

    /// `list_del()` (under wait_lock).
    func unlink(_ waiter: UnsafeMutablePointer<UInt64>) {
        let n = waiter[Self.next], p = waiter[Self.previous]
        if p == 0 { words[3] = n } else { Self.record(p)[Self.next] = n }
        if n == 0 { words[4] = p } else { Self.record(n)[Self.previous] = p }
    }
}
