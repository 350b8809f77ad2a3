import CSVMSupport

/// A device's copy engine (its DMA): moves real bytes between page frames.
///
/// `copy` may return before the bytes have moved (an asynchronous engine);
/// `wait()` returns when every copy issued so far by the calling thread is
/// complete, like waiting on a DMA fence. A driver must `wait()` before
/// `migrateVMAPages`: the kernel requires the copy to be complete and visible.
public protocol CopyEngine: AnyObject, Sendable {
    /// Human-readable name (`memcpy`, `pcie4`, ...).
    var name: String { get }
    /// Issues a copy of `bytes` bytes.
    func copy(to destination: UnsafeMutableRawPointer, from source: UnsafeRawPointer, bytes: Int)
    /// Waits for the copies issued by this thread.
    func wait()
}

/// The simplest engine: a synchronous memcpy on the calling thread, charging
/// nothing beyond what the copy costs on this machine.
public final class MemcpyCopyEngine: CopyEngine, @unchecked Sendable {
    public let name = "memcpy"
    public init() {}
    @inlinable public func copy(to destination: UnsafeMutableRawPointer, from source: UnsafeRawPointer, bytes: Int) {
        svm_memcpy(destination, source, bytes)
    }
    @inlinable public func wait() {}
}
