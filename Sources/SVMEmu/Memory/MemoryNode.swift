import CSVMSupport

/// A NUMA node of system RAM: a contiguous pfn range with real bytes and a
/// simple allocator of order-0 and order-9 folios.
///
/// Order-0 frames come from a free list, then from never-used frames, then by
/// breaking a free 2 MiB block. Order-9 folios come from a free list of 2 MiB
/// blocks, then from never-used frames. Freed order-0 frames are not merged back
/// into 2 MiB blocks (there is no buddy coalescing).
///
/// The order-0 list is first in, first out: a range freed in address order is
/// handed out again in address order, as the buddy allocator does once freed
/// pages have merged. (Last in, first out would hand out descending frames,
/// which a copy reads against the host's prefetchers at half the bandwidth.)
public final class MemoryNode: @unchecked Sendable {
    /// The NUMA node id (0, 1, ...).
    public let id: Int
    /// The node's first pfn.
    public let startPfn: UInt64
    /// Base pages on the node.
    public let pageCount: UInt64
    let region: UInt16
    let bytes: UnsafeMutableRawPointer
    /// The kernel, unretained (the kernel owns its nodes); set once when added.
    var kernelRef: Unmanaged<Kernel>! = nil

    // Protected by `zoneLock` (the zone lock): the allocator state below.
    private let zoneLock: SpinLockRef
    private var bump: UInt64
    private var free0: UInt64 = 0      // head: next frame handed out
    private var free0Tail: UInt64 = 0  // last frame freed
    private var free9: UInt64 = 0
    private var freePagesCount: UInt64

    init(id: Int, region: UInt16, startPfn: UInt64, pageCount: UInt64, bytes: UnsafeMutableRawPointer) {
        self.id = id
        self.region = region
        self.startPfn = startPfn
        self.pageCount = pageCount
        self.bytes = bytes
        self.bump = startPfn
        self.freePagesCount = pageCount
        let word = UnsafeMutablePointer<UInt32>.allocate(capacity: 1)
        word.initialize(to: 0)
        zoneLock = SpinLockRef(word, .zone)
    }
    deinit { zoneLock.word.deallocate() }

    /// Free base pages on this node (`NR_FREE_PAGES`). Takes the zone lock.
    public var freePages: UInt64 {
        zoneLock.withLock { freePagesCount }
    }

    /// Allocates a folio of `order` 0 or 9 with one reference, unlocked, not
    /// mapped, bytes not cleared (`folio_alloc()` without `__GFP_ZERO`).
    /// Returns nil when the node is out of memory of that order.
    /// An order other than 0 or 9 is refused: nil and a diagnostic.
    ///
    /// Takes the zone lock; the caller may hold any lock but this node's. The
    /// caller owns the returned folio's one reference.
    ///
    /// The corresponding kernel function is `folio_alloc()` (`__folio_alloc_node()`).
    public func allocate(order: Int) -> Folio? {
        kernelRef._withUnsafeGuaranteedRef { kernel in
            guard order == 0 || order == PageGeometry.pmdOrder else {
                kernel.warn("folio_alloc: order must be 0 or 9 (4 KiB or 2 MiB)", "order \(order)")
                return nil
            }
            return allocate(order: order, kernel: kernel)
        }
    }

    private func allocate(order: Int, kernel: Kernel) -> Folio? {
        let pfn = zoneLock.withLock { takeFrames(order: order, kernel: kernel) }
        guard pfn != 0 else {
            kernel.vmstat.count(order == 0 ? .allocFail : .thpAllocFail)
            return nil
        }
        kernel.prepareNewFolio(pfn: pfn, order: order, flags: 0)
        kernel.vmstat.count(.pgalloc, UInt64(1) << UInt64(order))
        return Folio(pfn: pfn, kernel: kernel)
    }

    /// Takes the first frame of a free block of `order` off the free lists,
    /// or 0 when there is none. Caller holds the zone lock.
    private func takeFrames(order: Int, kernel: Kernel) -> UInt64 {
        var pfn: UInt64 = 0
        if order == 0 {
            if free0 != 0 {
                pfn = free0
                free0 = kernel.metaPtr(pfn).next
                if free0 == 0 { free0Tail = 0 }
            } else if bump < startPfn + pageCount {
                pfn = bump
                bump += 1
            } else if free9 != 0 {
                // Break a 2 MiB block: keep its first frame, list the rest in order.
                pfn = free9
                free9 = kernel.metaPtr(pfn).next
                for i in 1..<PageGeometry.pmdPages64 { appendFree0(pfn + i, kernel) }
            }
        } else {
            if free9 != 0 {
                pfn = free9
                free9 = kernel.metaPtr(pfn).next
            } else {
                let aligned = (bump + PageGeometry.pmdPages64 - 1) & ~(PageGeometry.pmdPages64 - 1)
                if aligned + PageGeometry.pmdPages64 <= startPfn + pageCount {
                    while bump < aligned {
                        appendFree0(bump, kernel)
                        bump += 1
                    }
                    pfn = aligned
                    bump = aligned + PageGeometry.pmdPages64
                }
            }
        }
        if pfn != 0 { freePagesCount -= UInt64(1) << UInt64(order) }
        return pfn
    }

    /// Appends a frame to the order-0 free list. Caller holds the zone lock.
    @inline(__always)
    private func appendFree0(_ pfn: UInt64, _ kernel: Kernel) {
        kernel.metaPtr(pfn).next = 0
        if free0Tail == 0 { free0 = pfn } else { kernel.metaPtr(free0Tail).next = pfn }
        free0Tail = pfn
    }

    /// Returns a folio whose last reference was dropped to the free lists.
    func release(pfn: UInt64, order: Int) {
        kernelRef._withUnsafeGuaranteedRef { release(pfn: pfn, order: order, kernel: $0) }
    }

    private func release(pfn: UInt64, order: Int, kernel: Kernel) {
        for i in 0..<(UInt64(1) << UInt64(order)) {
            let m = kernel.metaPtr(pfn + i)
            m.atomicFlags.store(PageFlags.buddy.rawValue, ordering: .releasing)
            m.order = 0
            m.head = pfn + i
            m.mappingMM = 0
        }
        zoneLock.withLock {
            if order == PageGeometry.pmdOrder {
            kernel.metaPtr(pfn).next = free9
            free9 = pfn
        } else {
            appendFree0(pfn, kernel)
        }
        freePagesCount += UInt64(1) << UInt64(order)
        }
        kernel.vmstat.count(.pgfree, UInt64(1) << UInt64(order))
    }
}

extension Kernel {
    /// Sets up the metadata of a newly allocated folio: one reference, no
    /// mappings, head/tail links (`prep_compound_page()` for order 9).
    /// `pgmap` (a device page map's index + 1) is stored in every page when
    /// not 0, in the same pass (`zone_device_page_init()` sets each page's
    /// pgmap in its one loop over the pages).
    func prepareNewFolio(pfn: UInt64, order: Int, flags: UInt32, pgmap: UInt32 = 0) {
        let head = metaPtr(pfn)
        if pgmap != 0 { head.pgmap = pgmap }
        head.atomicFlags.store(flags | (order > 0 ? PageFlags.head.rawValue : 0), ordering: .releasing)
        head.atomicRefcount.store(1, ordering: .releasing)
        head.atomicMapcount.store(0, ordering: .releasing)
        head.atomicEntireMapcount.store(0, ordering: .releasing)
        head.order = UInt8(order)
        head.head = pfn
        head.mappingMM = 0
        head.index = 0
        head.allocGen = head.allocGen &+ 1
        if order > 0 {
            for i in 1..<(UInt64(1) << UInt64(order)) {
                let t = metaPtr(pfn + i)
                t.atomicFlags.store(PageFlags.tail.rawValue | (flags & PageFlags.zoneDevice.rawValue), ordering: .releasing)
                t.atomicRefcount.store(0, ordering: .releasing)
                t.atomicMapcount.store(0, ordering: .releasing)
                t.atomicEntireMapcount.store(0, ordering: .releasing)  // page[1]'s: _large_mapcount
                t.order = 0
                t.head = pfn
                t.mappingMM = 0
                t.allocGen = t.allocGen &+ 1
                if pgmap != 0 { t.pgmap = pgmap }
            }
        }
    }

    /// Called when a folio's reference count reaches zero (`__folio_put()`):
    /// device folios go back to their page map's `folioFree`, system folios to
    /// their node. Freeing a mapped or locked folio is a bug, reported.
    @usableFromInline
    func freeFolio(_ folio: Folio) {
        let m = folio.meta
        if m.test(PageFlags.reserved.rawValue) {
            warn("folio_put: last reference of a reserved page dropped (zero page)", "\(folio)")
            folio.refAdd(1)
            return
        }
        if folio.isMapped {
            warn("free_folio: folio is still mapped (bad page state)", "\(folio)", kind: .badPageState)
        }
        if m.test(PageFlags.locked.rawValue) {
            warn("free_folio: folio is locked (bad page state)", "\(folio)", kind: .badPageState)
            if svm_lockdep_enabled() { LockOrder.releasedFolio(m.flagsWord) }
            folio.clear(.locked)
        }
        if folio.withPageMap({ $0.freeFolio(folio) }) != nil { return }
        // hugetlb folios are 2 MiB: a 4 KiB free skips the flag test.
        if m.order != 0 && m.test(PageFlags.hugetlb.rawValue) { return hugetlb.free(folio) }
        // The node by region, unretained: no reference counting on this per-page path.
        guard let node = nodeByRegion[Int(m.region)] else {
            return warn("free_folio: pfn outside system RAM and every device page map", "\(folio)")
        }
        node._withUnsafeGuaranteedRef { $0.release(pfn: folio.pfn, order: folio.order) }
    }

    /// Allocates a folio on `node` (or any node if nil): `folio_alloc()` /
    /// `alloc_pages_node()`. `zeroed` clears the bytes (`__GFP_ZERO`).
    ///
    /// The folio has one reference, owned by the caller, and is unlocked and
    /// not mapped. Nodes are tried in id order when `node` is nil.
    ///
    /// - Parameters:
    ///   - order: 0 (4 KiB) or 9 (2 MiB); others give nil and a diagnostic.
    ///   - node: the NUMA node, or nil for the first with memory free.
    ///   - zeroed: clear the bytes.
    ///   - blocking: the caller's GFP allows direct reclaim
    ///     (`__GFP_DIRECT_RECLAIM`: `GFP_KERNEL`, `GFP_HIGHUSER_MOVABLE`), so
    ///     the allocation may sleep: `prepare_alloc_pages()`'s `might_alloc()`
    ///     is a `might_sleep()`, where a voluntarily preempted kernel takes a
    ///     pending reschedule (under the deterministic scheduler's CPU model,
    ///     ``DeterministicScheduler/Configuration/preemption``). The emulator's
    ///     allocator itself never sleeps or reclaims; false (the default) is
    ///     an atomic or `GFP_NOWAIT` allocation, no such point.
    /// - Returns: the folio, or nil when no node has memory of that order
    ///   (or `node` is not a node of this machine).
    ///
    /// The corresponding kernel function is `folio_alloc()`.
    public func allocateFolio(order: Int = 0, node: Int? = nil, zeroed: Bool = false, blocking: Bool = false) -> Folio? {
        if blocking { DeterministicScheduler.mightSleepPoint() }
        var folio: Folio? = nil
        if let node {
            guard node >= 0 && node < nodeCount else { return nil }
            folio = nodeByID[node]?._withUnsafeGuaranteedRef { $0.allocate(order: order) }
        } else {
            var i = 0
            while i < nodeCount && folio == nil {
                folio = nodeByID[i]?._withUnsafeGuaranteedRef { $0.allocate(order: order) }
                i += 1
            }
        }
        if folio == nil && deferredTLB.heldFrames > 0 && deferredTLB.flush() > 0 {
            // Old frames held for a deferred migration flush come back first.
            return allocateFolio(order: order, node: node, zeroed: zeroed)
        }
        if zeroed, let f = folio { f.zeroBytes() }
        return folio
    }

    /// Free base pages across all nodes. Takes each node's zone lock in turn.
    public var freePages: UInt64 { nodes.reduce(0) { $0 + $1.freePages } }
}

extension MemoryNode {
    /// Marks in `free` (one flag per base page of the node, from `startPfn`)
    /// every frame the allocator can hand out: the order-0 and 2 MiB free
    /// lists and the never-used frames. Returns whether the zone lock was
    /// held. Reads without the zone lock: for ``Kernel/audit(heldReferences:)``
    /// at quiescence only.
    func markFreeFrames(_ free: inout [Bool]) -> Bool {
        var pfn = free0
        while pfn != 0 {
            free[Int(pfn - startPfn)] = true
            pfn = kernelRef._withUnsafeGuaranteedRef { $0.metaPtr(pfn).next }
        }
        pfn = free9
        while pfn != 0 {
            for i in 0..<PageGeometry.pmdPages { free[Int(pfn - startPfn) + i] = true }
            pfn = kernelRef._withUnsafeGuaranteedRef { $0.metaPtr(pfn).next }
        }
        for p in bump..<(startPfn + pageCount) { free[Int(p - startPfn)] = true }
        return zoneLock.isLocked
    }

    /// Free base pages as the allocator counts them, without the zone lock
    /// (for the audit at quiescence).
    var freePagesUnlocked: UInt64 { freePagesCount }
}
