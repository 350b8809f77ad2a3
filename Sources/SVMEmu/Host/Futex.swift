import CSVMSupport
import Synchronization

/// A futex word in caller-owned memory (`futex(2)`, `FUTEX_WAIT_PRIVATE` /
/// `FUTEX_WAKE_PRIVATE`): a 32-bit word threads sleep on while it holds a
/// value, and wake one another on. The layer outside the emulated kernel
/// (harnesses, barriers) reaches the host's futex only through it.
///
/// On an emulated thread of a running ``DeterministicScheduler`` a wait and
/// a wake are the scheduler's (scheduling points, virtual time), as the
/// kernel's own futex words are.
///
/// The view owns nothing: the word must stay allocated while it is used, and
/// be read and written only through this view while other threads may race.
public struct FutexWord: @unchecked Sendable {
    /// The word.
    public let address: UnsafeMutablePointer<UInt32>

    /// A view of the word at `address`.
    @inlinable public init(_ address: UnsafeMutablePointer<UInt32>) { self.address = address }

    /// Wakes every sleeper (the `count` of ``wake(_:)``).
    public static let everyone = Int32.max

    /// The word's value (an atomic load with the given ordering).
    @_semantics("atomics.requires_constant_orderings") @_transparent
    public func load(ordering: AtomicLoadOrdering) -> UInt32 {
        UnsafeAtomic<UInt32>(address).load(ordering: ordering)
    }

    /// Stores `value` (an atomic store with the given ordering).
    @_semantics("atomics.requires_constant_orderings") @_transparent
    public func store(_ value: UInt32, ordering: AtomicStoreOrdering) {
        UnsafeAtomic<UInt32>(address).store(value, ordering: ordering)
    }

    /// Sleeps while the word holds `expected`, at most `timeoutNanos`
    /// nanoseconds (0: no limit). Returns on a wake, spuriously, or at once
    /// when the word already differs; callers look at the word again.
    ///
    /// - Returns: 0 when woken (or spuriously), `ETIMEDOUT` when the time
    ///   ran out, `EAGAIN` when the word had already changed.
    ///
    /// The corresponding C function is `futex` (`FUTEX_WAIT_PRIVATE`).
    @discardableResult
    public func wait(expected: UInt32, timeoutNanos: UInt64 = 0) -> Int32 {
        Int32(svm_futex_wait(address, expected, timeoutNanos))
    }

    /// Wakes at most `count` threads sleeping on the word.
    ///
    /// - Returns: how many were woken.
    ///
    /// The corresponding C function is `futex` (`FUTEX_WAKE_PRIVATE`).
    @discardableResult
    public func wake(_ count: Int32) -> Int32 {
        Int32(svm_futex_wake(address, count))
    }
}
