import CSVMSupport
import Synchronization

/// Why a range is being invalidated (`enum mmu_notifier_event`).
public enum MMUNotifyEvent: String, Sendable {
    /// `MMU_NOTIFY_UNMAP`: the range is being unmapped (munmap, mremap).
    case unmap
    /// `MMU_NOTIFY_CLEAR`: entries are cleared (MADV_DONTNEED, try_to_migrate, collapse).
    case clear
    /// `MMU_NOTIFY_PROTECTION_VMA`: mprotect.
    case protectionVMA
    /// `MMU_NOTIFY_PROTECTION_PAGE`.
    case protectionPage
    /// `MMU_NOTIFY_SOFT_DIRTY`.
    case softDirty
    /// `MMU_NOTIFY_RELEASE`: the address space is going away.
    case release
    /// `MMU_NOTIFY_MIGRATE`: migrate_vma is unmapping pages; `owner` says which driver.
    case migrate
    /// `MMU_NOTIFY_EXCLUSIVE`.
    case exclusive
}

/// An invalidation (`struct mmu_notifier_range`).
public struct MMUNotifierRange: Sendable {
    /// First address of the range.
    public let start: UInt64
    /// One past the last address.
    public let end: UInt64
    /// Why the range is invalidated.
    public let event: MMUNotifyEvent
    /// For `.migrate`: the `pgmap_owner` of the migration, so the driver doing
    /// it can skip invalidating its own device mappings.
    public let owner: DeviceOwner?
}

/// An MMU notifier (`struct mmu_notifier_ops`): told before and after page
/// table entries of the mm change.
///
/// The callbacks run on the thread changing the entries, which may hold the
/// mmap lock (either mode) and folio locks but no page-table lock: they may
/// take the driver's own locks and sleep, but must not take the mmap lock.
public protocol MMUNotifier: AnyObject, Sendable {
    /// Called before the entries of `range` change: the driver stops using
    /// its device mappings of the range (`invalidate_range_start`).
    func invalidateRangeStart(_ range: MMUNotifierRange)
    /// Called after the entries changed (`invalidate_range_end`).
    func invalidateRangeEnd(_ range: MMUNotifierRange)
}

/// An interval notifier (`struct mmu_interval_notifier`) over `[start, end)`.
///
/// The driver pattern: `let seq = readBegin()`, snapshot or map under its own
/// lock, and if `readRetry(seq)` says so, start again. The `invalidate`
/// closure runs on every overlapping invalidation; it must take the driver
/// lock, call `setSeq(_:)` with the given sequence and drop its device
/// mappings (the kernel's `mmu_interval_set_seq()` contract).
public final class MMUIntervalNotifier: @unchecked Sendable {
    /// First address watched.
    public let start: UInt64
    /// One past the last address watched.
    public let end: UInt64
    unowned let mm: AddressSpace
    let invalidateSeq = Atomic<UInt64>(0)
    let handler: @Sendable (MMUIntervalNotifier, MMUNotifierRange, UInt64) -> Bool

    init(mm: AddressSpace, start: UInt64, end: UInt64,
         handler: @escaping @Sendable (MMUIntervalNotifier, MMUNotifierRange, UInt64) -> Bool) {
        self.mm = mm
        self.start = start
        self.end = end
        self.handler = handler
    }

    /// Waits until no invalidation of the mm is in progress and returns the
    /// sequence to check later with ``readRetry(_:)``.
    ///
    /// Caller holds neither the driver lock that the invalidate callback
    /// takes nor any page-table lock (it may sleep); holding the mmap lock for
    /// reading is allowed.
    ///
    /// The corresponding kernel function is `mmu_interval_read_begin()`.
    public func readBegin() -> UInt64 {
        while true {
            // Read our sequence first: an invalidation that sets it later is
            // caught by readRetry; one that set it earlier is still counted active.
            let seq = invalidateSeq.load(ordering: .acquiring)
            let active = UnsafeAtomic(mm.activeInvalidations).load(ordering: .acquiring)
            if active == 0 { return seq }
            _ = svm_futex_wait(mm.activeInvalidations, active, 10_000_000)
        }
    }
    /// Whether an invalidation ran since `seq`: if so, what was read since
    /// ``readBegin()`` is stale and the caller starts over.
    ///
    /// Call it under the driver lock that the invalidate callback takes, just
    /// before making the device mapping visible.
    ///
    /// The corresponding kernel function is `mmu_interval_read_retry()`.
    public func readRetry(_ seq: UInt64) -> Bool { invalidateSeq.load(ordering: .acquiring) != seq }
    /// Whether an invalidation ran since `seq`, as a lock-free hint to give up
    /// early; only ``readRetry(_:)`` under the driver lock is authoritative.
    ///
    /// The corresponding kernel function is `mmu_interval_check_retry()`.
    public func checkRetry(_ seq: UInt64) -> Bool { readRetry(seq) }
    /// Records the sequence of the invalidation in progress, so that
    /// ``readRetry(_:)`` of earlier sequences answers true.
    ///
    /// Called from the invalidate callback, with the driver lock held, before
    /// it drops its device mappings.
    ///
    /// The corresponding kernel function is `mmu_interval_set_seq()`.
    public func setSeq(_ seq: UInt64) { invalidateSeq.store(seq, ordering: .releasing) }
}

struct NotifierList {
    var notifiers: [any MMUNotifier] = []
    var intervals: [MMUIntervalNotifier] = []
}

extension AddressSpace {
    /// Registers `n` to hear of every invalidation of this address space from
    /// now on.
    ///
    /// The corresponding kernel function is `mmu_notifier_register()`.
    public func registerNotifier(_ n: any MMUNotifier) {
        notifiers.withLock { $0.notifiers.append(n) }
        state.notifierCount.add(1, ordering: .relaxed)
    }
    /// Stops `n` from hearing of invalidations. An invalidation already
    /// running may still call it once more.
    ///
    /// The corresponding kernel function is `mmu_notifier_unregister()`.
    public func unregisterNotifier(_ n: any MMUNotifier) {
        let removed = notifiers.withLock { l -> Int in
            let before = l.notifiers.count
            l.notifiers.removeAll { $0 === n }
            return before - l.notifiers.count
        }
        state.notifierCount.subtract(removed, ordering: .relaxed)
    }
    /// Watches `[start, end)`: `invalidate(notifier, range, seq)` runs on every
    /// overlapping invalidation and must call `notifier.setSeq(seq)`.
    ///
    /// The callback runs with the locks an ``MMUNotifier`` callback may see
    /// (possibly the mmap lock, no page-table lock); it takes the driver lock,
    /// calls ``MMUIntervalNotifier/setSeq(_:)`` and drops the device mappings
    /// of the range. Its result is ignored (the emulator never invalidates
    /// in a non-blocking context).
    ///
    /// - Parameters:
    ///   - start: first address watched.
    ///   - end: one past the last address watched.
    ///   - invalidate: the callback.
    /// - Returns: the notifier; remove it with ``removeIntervalNotifier(_:)``.
    ///
    /// The corresponding kernel function is `mmu_interval_notifier_insert()`.
    public func insertIntervalNotifier(start: UInt64, end: UInt64,
                                       invalidate: @escaping @Sendable (MMUIntervalNotifier, MMUNotifierRange, UInt64) -> Bool) -> MMUIntervalNotifier {
        let n = MMUIntervalNotifier(mm: kernelView, start: start, end: end, handler: invalidate)
        n.invalidateSeq.store(state.invalidateSeq.load(ordering: .acquiring), ordering: .releasing)
        notifiers.withLock { $0.intervals.append(n) }
        state.notifierCount.add(1, ordering: .relaxed)
        return n
    }
    /// Stops watching the notifier's range.
    ///
    /// The corresponding kernel function is `mmu_interval_notifier_remove()`.
    public func removeIntervalNotifier(_ n: MMUIntervalNotifier) {
        let removed = notifiers.withLock { l -> Int in
            let before = l.intervals.count
            l.intervals.removeAll { $0 === n }
            return before - l.intervals.count
        }
        state.notifierCount.subtract(removed, ordering: .relaxed)
    }

    /// `mmu_notifier_invalidate_range_start()`. Interval notifiers overlapping
    /// the range get a new sequence; plain notifiers are told.
    /// Caller holds no page-table lock (the callbacks may sleep); every start
    /// is paired with an `invalidateRangeEnd` of the same range.
    ///
    /// Starts with a `might_sleep()` (the kernel's inline wrapper has one
    /// before it looks for notifiers): under the CPU model with voluntary
    /// preemption, a pending reschedule is taken here.
    func invalidateRangeStart(_ range: MMUNotifierRange) {
        DeterministicScheduler.mightSleepPoint()
        kernel.vmstat.count(.mmuNotifierInvalidations)
        UnsafeAtomic<UInt32>(at: activeInvalidations).wrappingAdd(1, ordering: .acquiringAndReleasing)
        let seq = state.invalidateSeq.add(1, ordering: .acquiringAndReleasing).newValue
        guard state.notifierCount.load(ordering: .relaxed) > 0 else { return }
        let list = notifiers.withLock { $0 }
        for i in list.intervals where i.start < range.end && range.start < i.end {
            _ = i.handler(i, range, seq)
        }
        for n in list.notifiers { n.invalidateRangeStart(range) }
    }

    /// `mmu_notifier_invalidate_range_end()`. A `might_sleep()` first when
    /// the range is blockable: the start marks it so
    /// (`MMU_NOTIFIER_RANGE_BLOCKABLE`) when the mm has notifiers, which is
    /// read again here.
    func invalidateRangeEnd(_ range: MMUNotifierRange) {
        if state.notifierCount.load(ordering: .relaxed) > 0 {
            DeterministicScheduler.mightSleepPoint()
            let list = notifiers.withLock { $0.notifiers }
            for n in list { n.invalidateRangeEnd(range) }
        }
        let left = UnsafeAtomic<UInt32>(at: activeInvalidations).wrappingSubtract(1, ordering: .acquiringAndReleasing).newValue
        if left == 0 { _ = svm_futex_wake(activeInvalidations, Int32.max) }
    }

    /// Runs `body` between invalidate start and end of `[start, end)`.
    func withInvalidation<R>(_ start: UInt64, _ end: UInt64, _ event: MMUNotifyEvent,
                             owner: DeviceOwner? = nil, _ body: () -> R) -> R {
        let range = MMUNotifierRange(start: start, end: end, event: event, owner: owner)
        invalidateRangeStart(range)
        defer { invalidateRangeEnd(range) }
        return body()
    }
}
