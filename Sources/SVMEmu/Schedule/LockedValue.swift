import CSVMSupport
import Synchronization

/// A value and the lock that guards it: the value is reachable only inside
/// ``withLock(_:)``, so the lock cannot be forgotten (swift-nio's
/// `NIOLockedValueBox` idea). Use it for the state of drivers and harnesses,
/// as the kernel keeps a `struct mutex` beside what it protects.
///
/// Backed by `Synchronization.Mutex`. On Linux that mutex sleeps on a futex,
/// which ThreadSanitizer does not model as a lock; under the sanitizer the box
/// tells it what the lock orders (an acquire after taking it, a release before
/// dropping it), so that what it reports are real races. Without the
/// sanitizer the annotations compile to nothing.
public final class LockedValue<Value: ~Copyable>: Sendable {
    @usableFromInline let mutex: Mutex<Value>

    /// A box holding `initial`.
    public init(_ initial: consuming sending Value) {
        mutex = Mutex(initial)
    }

    /// Runs `body` with the lock held and the value lent to it for change.
    /// Blocks while another thread holds the lock; the lock is not recursive.
    @inlinable
    public func withLock<Result: ~Copyable, E: Error>(
        _ body: (inout sending Value) throws(E) -> sending Result
    ) throws(E) -> sending Result {
        let token = Unmanaged.passUnretained(self).toOpaque()
        return try mutex.withLock { (value: inout sending Value) throws(E) -> sending Result in
            svm_tsan_acquire(token)
            defer { svm_tsan_release(token) }
            return try body(&value)
        }
    }
}
