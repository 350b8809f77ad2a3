import CSVMSupport

// TLB flush accounting, where the kernel would flush (`flush_tlb_mm_range()`).
//
// The emulated CPU access path walks the page tables under the page-table
// lock on every access, so no stale translation can be used; what the model
// keeps exact is the *cost* the kernel would pay (see `flushTLBRange`).
extension AddressSpace {
    /// Range flushes above this many pages become a full flush.
    static let singlePageFlushCeiling: UInt64 = 33

    /// Accounts the flush of `[start, end)` on every CPU that used this mm.
    ///
    /// The emulated CPU access path walks the page tables under the
    /// page-table lock on every access, so no stale translation can be used;
    /// what this keeps exact is the *cost* the kernel would pay, in
    /// ``Kernel/vmstat``: local flushes (one page at a time up to 33 pages,
    /// else a full flush, like x86's `tlb_single_page_flush_ceiling`), one
    /// remote flush (IPI round) whenever another CPU in the mm's cpumask must
    /// be shot down, and the number of CPUs that received it.
    ///
    /// Call it after the entries of the range changed, with or without the
    /// page-table lock held (the emulated kernel drops it first); it takes no
    /// lock.
    ///
    /// - Parameters:
    ///   - start: first address flushed.
    ///   - end: one past the last address; an empty range does nothing.
    ///
    /// The corresponding kernel function is `flush_tlb_mm_range()`.
    public func flushTLBRange(_ start: UInt64, _ end: UInt64) {
        guard end > start else { return }
        let pages = (end - start) >> 12
        let me: UInt64 = 1 << UInt64(svm_cpu_id() & 63)
        let mask = cpumask.load(ordering: .relaxed)
        let vm = kernel.vmstat
        if pages > AddressSpace.singlePageFlushCeiling {
            vm.count(.tlbLocalFlushAll)
        } else {
            vm.count(.tlbLocalFlushOne, pages)
        }
        let others = (mask & ~me).nonzeroBitCount
        if others > 0 {
            vm.count(.tlbRemoteFlush)
            vm.count(.tlbRemoteFlushReceived, UInt64(others))
        }
        vm.count(.tlbPagesFlushed, pages)
    }
}

/// A deferred, batched flush (`struct tlbflush_unmap_batch`): ranges are
/// gathered while unmapping many pages, then flushed once.
public struct TLBFlushBatch {
    unowned let mm: AddressSpace
    var start: UInt64 = .max
    var end: UInt64 = 0
    /// An empty batch for `mm` (which it does not keep alive).
    public init(mm: AddressSpace) { self.mm = mm }
    /// Adds a range to the batch: the batch grows to cover it.
    public mutating func add(_ s: UInt64, _ e: UInt64) {
        start = min(start, s)
        end = max(end, e)
    }
    /// Whether nothing was added since the last flush.
    public var isEmpty: Bool { end <= start }
    /// Flushes everything gathered with one ``AddressSpace/flushTLBRange(_:_:)``
    /// of the covering range, and empties the batch.
    ///
    /// The corresponding kernel function is `try_to_unmap_flush()`.
    public mutating func flush() {
        if !isEmpty { mm.flushTLBRange(start, end) }
        start = .max
        end = 0
    }
}
