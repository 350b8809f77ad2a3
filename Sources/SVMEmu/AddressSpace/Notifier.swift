import CSVMSupport
import Synchronization

/// Why a range is being invalidated (`enum mmu_notifier_event`).
public enum MMUNotifyEvent: String, Sendable {
    case unmap, clear, protectionVMA, protectionPage, softDirty, release
    /// `MMU_NOTIFY_MIGRATE`: migrate_vma is unmapping pages; `owner` says which driver.
    case migrate
    case exclusive
}

/// An invalidation (`struct mmu_notifier_range`).
public struct MMUNotifierRange: Sendable {
    public let start: UInt64
    public let end: UInt64
    public let event: MMUNotifyEvent
    /// For `.migrate`: the `pgmap_owner` of the migration, so the driver doing
    /// it can skip invalidating its own device mappings.
    public let owner: DeviceOwner?
}

/// An MMU notifier (`struct mmu_notifier_ops`): told before and after page
/// table entries of the mm change.
public protocol MMUNotifier: AnyObject, Sendable {
    /// `invalidate_range_start`.
    func invalidateRangeStart(_ range: MMUNotifierRange)
    /// `invalidate_range_end`.
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
    public let start: UInt64
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

    /// `mmu_interval_read_begin()`: waits until no invalidation of the mm is in
    /// progress and returns the sequence to check later with `readRetry(_:)`.
    public func readBegin() -> UInt64 {
        while true {
            // Read our sequence first: an invalidation that sets it later is
            // caught by readRetry; one that set it earlier is still counted active.
            let seq = invalidateSeq.load(ordering: .acquiring)
            let active = svm_load32(mm.activeInvalidations)
            if active == 0 { return seq }
            _ = svm_futex_wait(mm.activeInvalidations, active, 10_000_000)
        }
    }
    /// `mmu_interval_read_retry()`: whether an invalidation ran since `seq`.
    public func readRetry(_ seq: UInt64) -> Bool { invalidateSeq.load(ordering: .acquiring) != seq }
    /// `mmu_interval_check_retry()`: same, lock-free hint.
    public func checkRetry(_ seq: UInt64) -> Bool { readRetry(seq) }
    /// `mmu_interval_set_seq()`: called from the invalidate callback under the driver lock.
    public func setSeq(_ seq: UInt64) { invalidateSeq.store(seq, ordering: .releasing) }
}

struct NotifierList {
    var notifiers: [any MMUNotifier] = []
    var intervals: [MMUIntervalNotifier] = []
}

extension AddressSpace {
    /// `mmu_notifier_register()`.
    public func registerNotifier(_ n: any MMUNotifier) {
        notifiers.withLock { $0.notifiers.append(n) }
        notifierCount.add(1, ordering: .relaxed)
    }
    /// `mmu_notifier_unregister()`.
    public func unregisterNotifier(_ n: any MMUNotifier) {
        let removed = notifiers.withLock { l -> Int in
            let before = l.notifiers.count
            l.notifiers.removeAll { $0 === n }
            return before - l.notifiers.count
        }
        notifierCount.subtract(removed, ordering: .relaxed)
    }
    /// `mmu_interval_notifier_insert()`: `invalidate(notifier, range, seq)` runs on every
    /// overlapping invalidation and must call `notifier.setSeq(seq)`.
    public func insertIntervalNotifier(start: UInt64, end: UInt64,
                                       invalidate: @escaping @Sendable (MMUIntervalNotifier, MMUNotifierRange, UInt64) -> Bool) -> MMUIntervalNotifier {
        let n = MMUIntervalNotifier(mm: self, start: start, end: end, handler: invalidate)
        n.invalidateSeq.store(invalidateSeq.load(ordering: .acquiring), ordering: .releasing)
        notifiers.withLock { $0.intervals.append(n) }
        notifierCount.add(1, ordering: .relaxed)
        return n
    }
    /// `mmu_interval_notifier_remove()`.
    public func removeIntervalNotifier(_ n: MMUIntervalNotifier) {
        let removed = notifiers.withLock { l -> Int in
            let before = l.intervals.count
            l.intervals.removeAll { $0 === n }
            return before - l.intervals.count
        }
        notifierCount.subtract(removed, ordering: .relaxed)
    }

    /// `mmu_notifier_invalidate_range_start()`. Interval notifiers overlapping
    /// the range get a new sequence; plain notifiers are told.
    func invalidateRangeStart(_ range: MMUNotifierRange) {
        kernel.vmstat.count(.mmuNotifierInvalidations)
        UnsafeAtomic<UInt32>(at: activeInvalidations).wrappingAdd(1, ordering: .acquiringAndReleasing)
        let seq = invalidateSeq.add(1, ordering: .acquiringAndReleasing).newValue
        guard notifierCount.load(ordering: .relaxed) > 0 else { return }
        let list = notifiers.withLock { $0 }
        for i in list.intervals where i.start < range.end && range.start < i.end {
            _ = i.handler(i, range, seq)
        }
        for n in list.notifiers { n.invalidateRangeStart(range) }
    }

    /// `mmu_notifier_invalidate_range_end()`.
    func invalidateRangeEnd(_ range: MMUNotifierRange) {
        if notifierCount.load(ordering: .relaxed) > 0 {
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
