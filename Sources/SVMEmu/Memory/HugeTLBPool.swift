import CSVMSupport

/// The pool of 2 MiB hugetlb pages (`struct hstate` for the default huge
/// page size): folios taken from the RAM nodes when the pool grows, handed
/// to MAP_HUGETLB mappings at fault time, and returned to the pool (not to
/// the node) when their last reference goes.
///
/// The counters follow `/proc/meminfo`: ``pageCount`` (`HugePages_Total`)
/// counts every pool page, in use or free; ``freePages`` (`HugePages_Free`)
/// the free ones, *including* the reserved ones; ``reservedPages``
/// (`HugePages_Rsvd`) the free pages promised to mappings that have not
/// faulted them yet; ``surplusPages`` (`HugePages_Surp`) pages in use beyond
/// the requested size, which go back to their node when freed. A mapping
/// reserves its pages when it is made, so a fault on a reserved page cannot
/// fail: an `mmap` the free, unreserved pages cannot cover fails with
/// `-ENOMEM` instead.
///
/// Every method takes the pool lock (`hugetlb_lock`) itself; none may be
/// called with it held. Free pool pages have no reference, as in the kernel.
public final class HugeTLBPool: @unchecked Sendable {
    /// Bytes per hugetlb page: 2 MiB, the PMD size (x86-64's default
    /// `Hugepagesize`).
    ///
    /// The corresponding kernel function is `huge_page_size()`.
    public static var pageSize: Int { PageGeometry.pmdSize }

    /// The order of a hugetlb folio (9).
    ///
    /// The corresponding kernel function is `huge_page_order()`.
    public static var order: Int { PageGeometry.pmdOrder }

    struct State {
        /// Head pfns of free pool pages (`hugepage_freelists`), last freed first.
        var free: [UInt64] = []
        var total = 0
        var reserved = 0
        var surplus = 0
    }
    /// `hugetlb_lock` and what it protects.
    private let state = LockedValue(State())
    /// The kernel, unretained (the kernel owns its pool); set once at boot.
    var kernelRef: Unmanaged<Kernel>! = nil
    /// `hugetlb_fault_mutex_table`: faults on the same huge page of the same
    /// mm serialize on one of these lock words, so that two threads never
    /// allocate (and zero) a page for the same slot. Kernel lock words, so
    /// that the deterministic scheduler sees them.
    private let faultMutexes: UnsafeMutablePointer<UInt32>
    private static let faultMutexCount = 64

    init() {
        faultMutexes = .allocate(capacity: HugeTLBPool.faultMutexCount)
        faultMutexes.initialize(repeating: 0, count: HugeTLBPool.faultMutexCount)
    }
    deinit { faultMutexes.deallocate() }

    /// Pages in the pool, in use or free (`HugePages_Total`), a temporary
    /// migration destination included while it lives.
    ///
    /// The corresponding kernel field is `h->nr_huge_pages`.
    public var pageCount: Int { state.withLock { $0.total } }
    /// Free pool pages, reserved ones included (`HugePages_Free`).
    ///
    /// The corresponding kernel field is `h->free_huge_pages`.
    public var freePages: Int { state.withLock { $0.free.count } }
    /// Free pages promised to mappings that have not faulted them yet
    /// (`HugePages_Rsvd`).
    ///
    /// The corresponding kernel field is `h->resv_huge_pages`.
    public var reservedPages: Int { state.withLock { $0.reserved } }
    /// Pages in use beyond the size last asked for; each goes back to its
    /// node when freed (`HugePages_Surp`).
    ///
    /// The corresponding kernel field is `h->surplus_huge_pages`.
    public var surplusPages: Int { state.withLock { $0.surplus } }

    /// Resizes the pool, as a write to `/proc/sys/vm/nr_hugepages` does.
    ///
    /// Growing takes 2 MiB folios from the RAM nodes, interleaved across
    /// them, until the pool holds `count` pages or no node has a free 2 MiB
    /// block left (then the pool is smaller than asked, as in the kernel,
    /// which reports it only through the counters). Shrinking returns free,
    /// unreserved pages to their nodes; pages in use (and reserved pages)
    /// are not taken away: in-use pages beyond `count` become surplus pages
    /// and leave the pool when they are freed.
    ///
    /// Takes the pool lock and the nodes' zone locks; the caller holds
    /// neither.
    ///
    /// - Parameters:
    ///   - count: the pool size wanted, in 2 MiB pages; a negative count is
    ///     refused with a diagnostic and nothing changes.
    /// - Returns: ``pageCount`` afterwards, surplus pages excluded.
    ///
    /// The corresponding kernel function is `set_max_huge_pages()`.
    @discardableResult
    public func setPageCount(_ count: Int) -> Int {
        let kernel = kernelRef.takeUnretainedValue()
        guard count >= 0 else {
            kernel.warn("nr_hugepages: the pool size must not be negative", "\(count)")
            return state.withLock { $0.total - $0.surplus }
        }
        // Grow: surplus pages in use become pool pages again first, then new
        // pages come from the nodes (the pool lock not held while allocating).
        state.withLock { s in
            while s.surplus > 0, s.total - s.surplus < count { s.surplus -= 1 }
        }
        var node = 0
        while state.withLock({ $0.total - $0.surplus }) < count {
            let folio = kernel.allocateFolio(order: HugeTLBPool.order, node: node % max(1, kernel.nodeCount))
                ?? kernel.allocateFolio(order: HugeTLBPool.order)
            node += 1
            guard let folio else { break }
            folio.meta.setFlags(PageFlags.hugetlb.rawValue)
            folio.atomicRefcount.store(0, ordering: .releasing)
            state.withLock { s in
                s.free.append(folio.pfn)
                s.total += 1
            }
        }
        // Shrink: free, unreserved pages leave; in-use pages become surplus.
        var leaving: [UInt64] = []
        let result = state.withLock { s -> Int in
            while s.total - s.surplus > count, s.free.count > s.reserved {
                leaving.append(s.free.removeLast())
                s.total -= 1
            }
            let inUse = s.total - s.free.count
            while s.total - s.surplus > count, s.surplus < inUse { s.surplus += 1 }
            return s.total - s.surplus
        }
        for pfn in leaving { releaseToNode(Folio(pfn: pfn, kernel: kernel), kernel) }
        return result
    }

    /// Reserves `count` free pages for a new mapping: succeeds only when the
    /// free, unreserved pages cover it (no overcommit).
    ///
    /// The corresponding kernel function is `hugetlb_acct_memory()`.
    func reserve(_ count: Int) -> Bool {
        state.withLock { s in
            guard s.free.count - s.reserved >= count else { return false }
            s.reserved += count
            return true
        }
    }

    /// Returns `count` reservations a mapping did not use.
    ///
    /// The corresponding kernel function is `hugetlb_acct_memory()` (negative delta).
    func unreserve(_ count: Int) {
        guard count > 0 else { return }
        state.withLock { s in
            if s.reserved < count {
                kernelRef.takeUnretainedValue().warn("hugetlb: reservation count underflow", "\(s.reserved) - \(count)", kind: .referenceCount)
                s.reserved = 0
            } else {
                s.reserved -= count
            }
        }
    }

    /// Takes a page off the free list: one of the caller's reservations when
    /// `reserved`, else an unreserved free page. The folio has one reference,
    /// owned by the caller, no mappings and no flags but `hugetlb`; its bytes
    /// are not cleared. Nil when no page is available.
    ///
    /// The corresponding kernel function is `alloc_hugetlb_folio()`.
    func allocate(reserved: Bool) -> Folio? {
        let kernel = kernelRef.takeUnretainedValue()
        let pfn = state.withLock { s -> UInt64? in
            if reserved {
                guard s.reserved > 0, let pfn = s.free.popLast() else { return nil }
                s.reserved -= 1
                return pfn
            }
            guard s.free.count > s.reserved else { return nil }
            return s.free.popLast()
        }
        guard let pfn else { return nil }
        kernel.prepareNewFolio(pfn: pfn, order: HugeTLBPool.order, flags: PageFlags.hugetlb.rawValue)
        return Folio(pfn: pfn, kernel: kernel)
    }

    /// A destination for migrating a hugetlb folio to `node`: a free pool
    /// page on `node` (or, with `fallback`, on another node when `node` has
    /// none) as long as the free pages outnumber the reserved ones
    /// (`available_huge_pages()`: a migration never takes a page promised to
    /// a mapping); otherwise a fresh 2 MiB folio from `node`'s own memory,
    /// marked ``PageFlags/hugetlbTemporary``: it counts in ``pageCount``
    /// while it lives and leaves the pool when freed, not as a surplus page
    /// (`alloc_migrate_hugetlb_folio()`). When the migration succeeds the
    /// source takes over the temporary status (`move_hugetlb_state()`), so
    /// the pool keeps its size and its page moves to `node`.
    ///
    /// Takes the pool lock, then (for a fresh folio) the node's zone lock;
    /// the caller holds neither.
    ///
    /// - Parameters:
    ///   - node: the node the destination must be on (`__GFP_THISNODE`, as
    ///     move_pages and migrate_pages ask).
    ///   - fallback: allow a free pool page of another node when `node` has
    ///     none (callers without `__GFP_THISNODE`).
    /// - Returns: the folio with one reference owned by the caller, no
    ///   mappings, flags ``PageFlags/hugetlb`` (and temporary); nil when
    ///   neither the pool nor `node` has a page (-ENOMEM for the migration).
    ///
    /// The corresponding kernel function is `alloc_hugetlb_folio_nodemask()`.
    public func allocateMigrationTarget(node: Int, fallback: Bool = false) -> Folio? {
        let kernel = kernelRef.takeUnretainedValue()
        let pfn = state.withLock { s -> UInt64? in
            guard s.free.count > s.reserved else { return nil }
            // dequeue_hugetlb_folio_nodemask(): the preferred node first.
            let i = s.free.lastIndex { kernel.nodeID(of: Folio(pfn: $0, kernel: kernel)) == node }
                ?? (fallback ? s.free.indices.last : nil)
            return i.map { s.free.remove(at: $0) }
        }
        if let pfn {
            kernel.prepareNewFolio(pfn: pfn, order: HugeTLBPool.order, flags: PageFlags.hugetlb.rawValue)
            return Folio(pfn: pfn, kernel: kernel)
        }
        guard let folio = kernel.allocateFolio(order: HugeTLBPool.order, node: node) else { return nil }
        folio.set([.hugetlb, .hugetlbTemporary])
        state.withLock { $0.total += 1 }
        return folio
    }

    /// Takes an in-use hugetlb folio off the pool's active list for a
    /// migration list: only one marked migratable (mapped by a fault, not
    /// isolated already) with a reference still held; the list owns the new
    /// reference. Takes the pool lock.
    ///
    /// The corresponding kernel function is `folio_isolate_hugetlb()`.
    func isolate(_ folio: Folio) -> Bool {
        state.withLock { _ -> Bool in
            guard folio.isLarge, folio.test(.hugetlb), folio.test(.hugetlbMigratable), folio.tryGet() else { return false }
            folio.clear(.hugetlbMigratable)
            return true
        }
    }

    /// Puts an isolated hugetlb folio back on the active list (migratable
    /// again) and drops the migration list's reference; the last one frees
    /// it. Takes the pool lock; the caller holds no page-table lock.
    ///
    /// The corresponding kernel function is `folio_putback_hugetlb()`.
    func putback(_ folio: Folio) {
        state.withLock { _ in folio.set(.hugetlbMigratable) }
        folio.put()
    }

    /// After a successful migration: a temporary destination becomes a pool
    /// page and the source, now temporary, leaves the pool when freed.
    /// Caller holds both folio locks.
    ///
    /// The corresponding kernel function is `move_hugetlb_state()`.
    func moveState(_ old: Folio, _ new: Folio) {
        guard new.test(.hugetlbTemporary) else { return }
        old.set(.hugetlbTemporary)
        new.clear(.hugetlbTemporary)
    }

    /// Head pfns of the free pool pages: a snapshot (for the audit).
    var freeFolioPfns: [UInt64] { state.withLock { $0.free } }

    /// A hugetlb folio's last reference went (from `Kernel.freeFolio`): back
    /// on the free list, or to its node when it is a temporary or a surplus
    /// page.
    ///
    /// The corresponding kernel function is `free_huge_folio()`.
    func free(_ folio: Folio) {
        let kernel = kernelRef.takeUnretainedValue()
        let temporary = folio.test(.hugetlbTemporary)
        folio.atomicFlags.store(PageFlags.hugetlb.rawValue | PageFlags.head.rawValue, ordering: .releasing)
        folio.meta.mappingMM = 0
        let toNode = state.withLock { s -> Bool in
            if temporary {
                s.total -= 1
                return true
            }
            if s.surplus > 0 {
                s.surplus -= 1
                s.total -= 1
                return true
            }
            s.free.append(folio.pfn)
            return false
        }
        if toNode { releaseToNode(folio, kernel) }
    }

    /// Runs `body` holding the fault mutex of the huge page at `haddr` in
    /// the address space `mm` (`hugetlb_fault_mutex_hash()`).
    func withFaultMutex<R, E: Error>(_ mm: UInt32, _ haddr: UInt64, _ body: () throws(E) -> R) throws(E) -> R {
        let hash = Int((UInt64(mm) &* 0x9E37_79B9 ^ (haddr >> PageGeometry.pmdShift)) % UInt64(HugeTLBPool.faultMutexCount))
        return try SpinLockRef(faultMutexes + hash, .hugetlbFault).withLock(body)
    }

    /// Gives a pool page (no reference) back to the node it came from.
    private func releaseToNode(_ folio: Folio, _ kernel: Kernel) {
        guard let node = kernel.nodeByRegion[Int(folio.meta.region)] else {
            return kernel.warn("hugetlb: pool page outside system RAM", "\(folio)")
        }
        node._withUnsafeGuaranteedRef { $0.release(pfn: folio.pfn, order: HugeTLBPool.order) }
    }
}
