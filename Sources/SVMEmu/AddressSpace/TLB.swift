import CSVMSupport

/// TLB flush accounting, where the kernel would flush (`flush_tlb_mm_range()`).
///
/// The emulated CPU access path walks the page tables under the page-table
/// lock on every access, so no stale translation can be used; what the model
/// keeps exact is the *cost* the kernel would pay: local flushes (one page at
/// a time up to 33 pages, else a full flush, like x86's
/// `tlb_single_page_flush_ceiling`), one remote flush (IPI round) whenever
/// another CPU in the mm's cpumask must be shot down, and the number of CPUs
/// that received it.
extension AddressSpace {
    /// Range flushes above this many pages become a full flush.
    static let singlePageFlushCeiling: UInt64 = 33

    /// Accounts the flush of `[start, end)` on every CPU that used this mm.
    public func flushTLBRange(_ start: UInt64, _ end: UInt64) {
        guard end > start else { return }
        let pages = (end - start) >> PageGeometry.pageShift
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
    public init(mm: AddressSpace) { self.mm = mm }
    /// Adds a range to the batch.
    public mutating func add(_ s: UInt64, _ e: UInt64) {
        start = min(start, s)
        end = max(end, e)
    }
    public var isEmpty: Bool { end <= start }
    /// `try_to_unmap_flush()`: one flush for everything gathered.
    public mutating func flush() {
        if !isEmpty { mm.flushTLBRange(start, end) }
        start = .max
        end = 0
    }
}
