import SVMEmu
import Synchronization

/// The context of one GPU SVM call (`struct drm_gpusvm_ctx`): what the
/// caller asks of `rangeFindOrInsert`, `rangeGetPages` and `rangeUnmapPages`.
public struct GPUSVMContext: Sendable {
    /// Pages below this many bytes are checked for CPU backing before a
    /// range larger than 4 KiB is created on them (`check_pages_threshold`):
    /// a chunk whose pages the CPU has not faulted in is skipped for a smaller one.
    public var checkPagesThreshold: UInt64 = 0
    /// Faults in without write permission (`read_only`): `rangeGetPages`
    /// does not request write access, and `rangeFindOrInsert` accepts a
    /// read-only VMA.
    public var readOnly = false
    /// The range may be migrated to device memory (`devmem_possible`).
    public var devmemPossible = true
    /// Every page must be device memory (`devmem_only`): a system page makes
    /// `rangeGetPages` fail with `.badAddress`.
    public var devmemOnly = false
    /// The caller is the invalidation callback and holds the notifier lock
    /// for writing (`in_notifier`).
    public var inNotifier = false
    /// A range may mix system and device pages (`allow_mixed`); without it a
    /// mix makes `rangeGetPages` fail with `.notSupported`.
    public var allowMixed = false
    public init() {}
}

/// The driver's side of GPU SVM (`struct drm_gpusvm_ops`).
public struct GPUSVMOperations: Sendable {
    /// The invalidation (`invalidate`): called with the notifier lock held
    /// for writing, after the notifier's sequence was set, for every MMU
    /// notifier invalidation overlapping `notifier`. The driver zaps its GPU
    /// mappings of the ranges it overlaps, flushes the GPU TLB, calls
    /// ``GPUSVM/rangeUnmapPages(_:context:)`` (with `inNotifier`) on each and,
    /// for `.unmap`, ``GPUSVM/rangeSetUnmapped(_:_:)`` and queues the range for
    /// its garbage collector. It must not take the driver's SVM lock or the
    /// mmap lock.
    public var invalidate: @Sendable (_ svm: GPUSVM, _ notifier: GPUSVMNotifier, _ range: MMUNotifierRange) -> Void
    public init(invalidate: @escaping @Sendable (_ svm: GPUSVM, _ notifier: GPUSVMNotifier, _ range: MMUNotifierRange) -> Void) {
        self.invalidate = invalidate
    }
}

/// GPU shared virtual memory over one address space (`struct drm_gpusvm` of
/// drivers/gpu/drm/drm_gpusvm.c): the layer Intel Xe builds its SVM on.
///
/// It keeps **notifiers** (interval notifiers of `notifierSize` bytes,
/// inserted on the first GPU fault in their interval and removed with their
/// last range) and, in each, **ranges**: the unit the driver faults, migrates
/// and binds, sized on a GPU fault as the largest of `chunkSizes` that is
/// aligned around the fault, fits in the VMA, the notifier and the GPU VA
/// window, and overlaps no existing range.
///
/// Locking (the layer's "DOC: Locking"):
/// - The **driver SVM lock** (the driver's own, `driver_svm_lock`) serialises
///   every call that changes ranges: ``rangeFindOrInsert(faultAddress:gpuvaStart:gpuvaEnd:context:)``,
///   ``rangeRemove(_:)``, ``rangeGetPages(_:context:)``, ``rangeEvict(_:)``. GPU SVM does not take it.
/// - The **notifier lock** (``notifierLock``, a reader-writer semaphore,
///   the `driver->update` lock of Documentation/mm/hmm.rst) guards the range
///   lists and each range's pages, flags and sequence. The invalidation
///   callback runs with it held for writing; ``rangeGetPages(_:context:)``
///   maps pages under it for reading, after `mmu_interval_read_retry()`; the
///   driver checks ``rangePagesValid(_:)`` under it, for reading, as the
///   last step before it commits a GPU binding.
/// - GPU SVM takes the mmap lock itself, for reading, where it needs it; the
///   caller holds no mmap lock.
///
/// Uses only the public SVMEmu API, as a driver would.
public final class GPUSVM: @unchecked Sendable {
    public let name: String
    public let mm: AddressSpace
    public var kernel: Kernel { mm.kernel }
    /// `device_private_page_owner`: device-private pages of this owner are
    /// reported by `hmm_range_fault()`, not faulted back.
    public let devicePrivateOwner: DeviceOwner?
    /// The mirrored window of the address space (`mm_start`, `mm_range`).
    public let mmStart: UInt64
    public let mmRange: UInt64
    /// Bytes each notifier watches (`notifier_size`), a power of two.
    public let notifierSize: UInt64
    /// Range sizes to choose from, powers of two in descending order, the
    /// last one 4 KiB (`chunk_sizes`).
    public let chunkSizes: [UInt64]
    public let operations: GPUSVMOperations

    /// The notifier lock (`notifier_lock`). See the type's locking rules.
    public let notifierLock = KernelRWSemaphore("gpusvm notifier lock")
    /// Whether a writer holds ``notifierLock`` (the invalidation), for the
    /// checks lockdep makes in the kernel.
    let notifierWriteHeld = Atomic<Bool>(false)

    /// The notifiers by start address. Changed under the driver SVM lock
    /// only (the kernel's interval tree), read under it.
    var notifiers: [GPUSVMNotifier] = []

    /// Sets up GPU SVM over `[mmStart, mmStart + mmRange)` of `mm`.
    ///
    /// - Parameters:
    ///   - name: a name for diagnostics.
    ///   - mm: the address space.
    ///   - devicePrivateOwner: the driver's `pgmap_owner`.
    ///   - mmStart: first mirrored address.
    ///   - mmRange: bytes mirrored.
    ///   - notifierSize: bytes per notifier (512 MiB is the layer's recommendation).
    ///   - chunkSizes: range sizes, descending powers of two ending in 4 KiB.
    ///   - operations: the driver's callbacks.
    /// - Throws: ``Errno/invalidArgument`` when `chunkSizes` is empty, not
    ///   descending powers of two of at least 4 KiB, or `notifierSize` is not
    ///   a power of two at least as large as the largest chunk.
    ///
    /// The corresponding kernel function is `drm_gpusvm_init()`.
    public init(name: String, mm: AddressSpace, devicePrivateOwner: DeviceOwner?,
                mmStart: UInt64, mmRange: UInt64, notifierSize: UInt64 = 512 << 20,
                chunkSizes: [UInt64], operations: GPUSVMOperations) throws(Errno) {
        guard let largest = chunkSizes.first, chunkSizes.last == PageGeometry.pageSize64 else { throw .invalidArgument }
        for (i, c) in chunkSizes.enumerated() {
            guard c >= PageGeometry.pageSize64, c & (c - 1) == 0, i == 0 || chunkSizes[i - 1] > c else { throw .invalidArgument }
        }
        guard notifierSize & (notifierSize - 1) == 0, notifierSize >= largest else { throw .invalidArgument }
        self.name = name
        self.mm = mm
        self.devicePrivateOwner = devicePrivateOwner
        self.mmStart = mmStart
        self.mmRange = mmRange
        self.notifierSize = notifierSize
        self.chunkSizes = chunkSizes
        self.operations = operations
    }

    /// Removes every notifier and range (the caller holds the driver SVM
    /// lock and no GPU work uses the ranges any more).
    ///
    /// The corresponding kernel function is `drm_gpusvm_fini()`.
    public func fini() {
        for n in notifiers {
            // Remove the interval notifier first, so that no invalidation races.
            if !n.removed { mm.removeIntervalNotifier(n.interval) }
            n.removed = true
            for r in n.ranges { rangeRemove(r) }
        }
        notifiers.removeAll()
    }

    // MARK: the notifier lock

    /// Takes the notifier lock for reading (`drm_gpusvm_notifier_lock()`).
    public func withNotifierLock<R, E: Error>(_ body: () throws(E) -> R) throws(E) -> R {
        try notifierLock.withReadLock(body)
    }

    /// The MMU interval notifier callback (`drm_gpusvm_notifier_invalidate()`):
    /// the notifier lock for writing, the new sequence, the driver's invalidate.
    func notifierInvalidate(_ n: GPUSVMNotifier, _ mni: MMUIntervalNotifier, _ range: MMUNotifierRange, _ seq: UInt64) -> Bool {
        notifierLock.withWriteLock {
            notifierWriteHeld.store(true, ordering: .relaxed)
            defer { notifierWriteHeld.store(false, ordering: .relaxed) }
            mni.setSeq(seq)
            operations.invalidate(self, n, range)
        }
        return true
    }

    // MARK: lookups

    /// The notifier overlapping `[start, end)`, if any. Caller holds the
    /// driver SVM lock.
    ///
    /// The corresponding kernel function is `drm_gpusvm_notifier_find()`.
    public func notifierFind(_ start: UInt64, _ end: UInt64) -> GPUSVMNotifier? {
        notifiers.first { $0.start < end && start < $0.end }
    }

    /// The first range of `notifier` overlapping `[start, end)`, if any.
    /// Caller holds the driver SVM lock or the notifier lock.
    ///
    /// The corresponding kernel function is `drm_gpusvm_range_find()`.
    public func rangeFind(_ notifier: GPUSVMNotifier, _ start: UInt64, _ end: UInt64) -> GPUSVMRange? {
        notifier.firstIndex(overlapping: start, end).map { notifier.ranges[$0] }
    }

    /// The ranges of `notifier` overlapping `[start, end)`, in address order
    /// (`drm_gpusvm_for_each_range()`). Caller holds the driver SVM lock or
    /// the notifier lock.
    public func ranges(in notifier: GPUSVMNotifier, _ start: UInt64, _ end: UInt64) -> ArraySlice<GPUSVMRange> {
        guard let i = notifier.firstIndex(overlapping: start, end) else { return [] }
        var j = i
        while j < notifier.ranges.count && notifier.ranges[j].start < end { j += 1 }
        return notifier.ranges[i..<j]
    }

    /// Every range overlapping `[start, end)`, in address order. Caller holds
    /// the driver SVM lock.
    public func ranges(_ start: UInt64, _ end: UInt64) -> [GPUSVMRange] {
        var out: [GPUSVMRange] = []
        for n in notifiers where n.start < end && start < n.end { out.append(contentsOf: ranges(in: n, start, end)) }
        return out
    }

    /// Whether any range overlaps `[start, end)`. Caller holds the driver SVM lock.
    ///
    /// The corresponding kernel function is `drm_gpusvm_has_mapping()`.
    public func hasMapping(_ start: UInt64, _ end: UInt64) -> Bool {
        notifiers.contains { $0.start < end && start < $0.end && firstRange(in: $0, start, end) }
    }

    private func firstRange(in n: GPUSVMNotifier, _ start: UInt64, _ end: UInt64) -> Bool {
        n.firstIndex(overlapping: start, end) != nil
    }

    /// Notifiers currently inserted (for tests and reports).
    public var notifierCount: Int { notifiers.count }
}
