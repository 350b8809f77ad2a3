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
    /// Issues a copy of `bytes` bytes; the bytes are complete and visible only
    /// after ``wait()`` on the same thread.
    func copy(to destination: UnsafeMutableRawPointer, from source: UnsafeRawPointer, bytes: Int)
    /// Waits for the copies issued by this thread.
    func wait()
    /// ``copy(to:from:bytes:)`` when the caller knows the next copy's
    /// source (`next`, `nextBytes` bytes; nil when this is the last), as a
    /// DMA engine walking a scatter-gather list sees the next descriptor: an
    /// engine may start reading it early. The default ignores the hint.
    func copy(to destination: UnsafeMutableRawPointer, from source: UnsafeRawPointer, bytes: Int,
              then next: UnsafeRawPointer?, nextBytes: Int)
}

extension CopyEngine {
    /// Ignores the hint: ``copy(to:from:bytes:)``.
    public func copy(to destination: UnsafeMutableRawPointer, from source: UnsafeRawPointer, bytes: Int,
                     then next: UnsafeRawPointer?, nextBytes: Int) {
        copy(to: destination, from: source, bytes: bytes)
    }
}

/// The simplest engine: a copy on the calling thread, charging nothing beyond
/// what the copy costs on this machine. Copies of at least
/// `streamingThreshold` bytes use non-temporal stores and non-temporal
/// prefetches of the source, as a DMA engine reads and writes memory without
/// filling the CPU caches (glibc's memcpy streams its stores only for copies
/// larger than a few MiB). Streaming stores are weakly ordered: the
/// bytes are complete and visible to other threads after `wait()` (one store
/// fence for the whole batch, like one DMA completion), which is why a driver
/// must wait before `migrateVMAPages`.
public final class MemcpyCopyEngine: CopyEngine, @unchecked Sendable {
    /// `memcpy`.
    public let name = "memcpy"
    /// Copies this size and larger stream (4 KiB by default: every page copy; `Int.max` never).
    public let streamingThreshold: Int
    /// Streams every copy of a page or more.
    public init() { streamingThreshold = PageGeometry.pageSize }
    /// Streams copies of `streamingThreshold` bytes or more.
    public init(streamingThreshold: Int) { self.streamingThreshold = streamingThreshold }
    /// Copies on the calling thread (streaming for large copies). On an
    /// emulated thread the copy takes ``VirtualCosts/copyPerKiB`` of virtual time.
    @inlinable public func copy(to destination: UnsafeMutableRawPointer, from source: UnsafeRawPointer, bytes: Int) {
        if _slowPath(svm_det_active()) { DeterministicScheduler.copied(bytes: bytes) }
        if bytes >= streamingThreshold {
            svm_copy_stream_unfenced(destination, source, bytes)
        } else {
            svm_memcpy(destination, source, bytes)
        }
    }
    /// ``copy(to:from:bytes:)``, and a streaming copy's source prefetches
    /// run on into the first bytes of `next` over its last 2 KiB (the
    /// host's prefetchers stop at every 4 KiB frame boundary).
    @inlinable public func copy(to destination: UnsafeMutableRawPointer, from source: UnsafeRawPointer, bytes: Int,
                                then next: UnsafeRawPointer?, nextBytes: Int) {
        if _slowPath(svm_det_active()) { DeterministicScheduler.copied(bytes: bytes) }
        if bytes >= streamingThreshold {
            svm_copy_stream_unfenced_then(destination, source, bytes, next, next == nil ? 0 : nextBytes)
        } else {
            svm_memcpy(destination, source, bytes)
        }
    }
    /// One store fence: the streamed bytes become visible.
    @inlinable public func wait() { svm_store_fence() }
}
