import CSVMSupport
import Synchronization

/// An address space (`struct mm_struct`): VMAs under a reader/writer mmap
/// lock, and two-level page tables (PMD entries, each pointing to a PTE table
/// of 512 entries or mapping 2 MiB) with one lock per PTE table (split PTL)
/// and one PMD lock per 1 GiB (a PMD table's worth).
///
/// Page-table storage is flat: the PTE table of PMD slot `i` always lives at
/// entries `i * 512 ..< (i + 1) * 512` of one lazily touched mapping, so a walk
/// is two loads and a table is never freed under a lockless walker.
///
/// An `AddressSpace` object is a *view* of one address space: every view
/// of it shares its VMAs, page tables and locks. The one you get from
/// ``init(kernel:)`` or ``fork()`` is a user reference (`mm_users`, what a
/// task's `task->mm` holds): when the last user reference goes, the
/// address space is torn down there and then, on the thread that dropped
/// it (`mmput()` runs `exit_mmap()`). The view a ``VMA`` or an
/// ``MMUIntervalNotifier`` names (``VMA/mm``) is the kernel's own: it keeps
/// the structure (`mm_count`), not the mappings, so holding it past the
/// exit keeps nothing mapped. Compare address spaces by ``id``, not by
/// object identity.
public final class AddressSpace: @unchecked Sendable {
    /// The shared state (`struct mm_struct` itself): what every view of
    /// this address space reads and changes.
    let state: MMStruct
    /// Whether this view is a user reference (`mm_users`): its `deinit` is
    /// `mmput()`. The kernel's view (one per address space, kept by
    /// `state`) is not.
    let isUserReference: Bool

    /// Strong on purpose: an address space keeps its kernel alive. With
    /// `unowned`, optimized callers that create a kernel and an address space
    /// as locals could see the kernel released first (Swift may end a local's
    /// lifetime after its last use), and `deinit` (exit_mmap) then trapped on
    /// the dead kernel. The kernel refers to address spaces only weakly, so
    /// this makes no cycle.
    public let kernel: Kernel
    /// Identity for the reverse map (anonymous pages record it), and of the
    /// address space: views of one address space have the same id.
    public let id: UInt32
    /// First address the page tables cover.
    public let baseAddress: UInt64
    /// One past the last address the page tables cover.
    public let endAddress: UInt64

    /// The mmap lock: a futex reader/writer semaphore that prefers writers
    /// (a fault storm must not starve `munmap`), and a scheduling point under
    /// a ``DeterministicScheduler``, so that `munmap` and friends can run
    /// among emulated threads. Every address space's mmap lock is one
    /// ``LockOrder`` class, "mmap lock".
    let mmapLock: KernelRWSemaphore
    /// Sorted, non-overlapping. Changed only with the mmap lock held for writing.
    var vmas: [VMA] {
        _read { yield state.vmas }
        _modify { yield &state.vmas }
    }

    @usableFromInline let pmds: UnsafeMutablePointer<UInt64>
    @usableFromInline let ptes: UnsafeMutablePointer<UInt64>
    @usableFromInline let ptls: UnsafeMutablePointer<UInt32>
    @usableFromInline let pmdLocks: UnsafeMutablePointer<UInt32>
    let pmdCount: Int
    /// The flush generation and `mm_cpumask()` that CPUs read.
    @usableFromInline let tlbContext: TLBContext
    /// `tlbContext`'s generation word and the machine's CPUs, as plain values
    /// for the access path.
    @usableFromInline let tlbGen: UnsafeMutablePointer<UInt64>
    @usableFromInline let cpuAccess: CPUAccess
    /// Fault injection for tests: a kernel that forgets its TLB flushes
    /// (`flushTLBRange` does nothing), so that stale translations survive.
    var skipsTLBFlushes: Bool {
        get { tlbContext.skipsFlushes.load(ordering: .relaxed) }
        set { tlbContext.skipsFlushes.store(newValue, ordering: .relaxed) }
    }
    /// Registered MMU notifiers and interval notifiers.
    let notifiers: LockedValue<NotifierList>
    /// Invalidations in progress (a futex word); the sequence they advance
    /// is `state.invalidateSeq`.
    let activeInvalidations: UnsafeMutablePointer<UInt32>
    /// The anonymous memory this address space shares with its fork tree
    /// (the emulator's `anon_vma`): the VMAs of every member that the anon
    /// rmap walks visit.
    let anonFamily: AnonFamily
    /// `anonFamily`, unretained, for the per-folio rmap walks: the registry
    /// holds families weakly, so each retain of one takes the slow
    /// side-table path.
    let anonFamilyRef: Unmanaged<AnonFamily>

    /// Creates an empty address space (what `execve()` or `fork()` would set up).
    ///
    /// It covers ``KernelConfiguration/addressSpaceSize`` bytes from
    /// ``baseAddress``, has no VMAs, and keeps `kernel` alive. The object
    /// returned is a user reference (`mm_users`): when the last one goes,
    /// every mapping is torn down (`exit_mmap()`) on that thread, so the
    /// pages' references and map counts return.
    ///
    /// - Parameters:
    ///   - kernel: the machine this address space belongs to.
    /// - Throws: ``HostMemoryRefusal`` when the host refuses the address
    ///   space for its page tables (`ulimit -v`); the kernel's `mm_alloc()`
    ///   fails with `-ENOMEM` there. Nothing is left reserved.
    ///
    /// The corresponding kernel function is `mm_alloc()`.
    public convenience init(kernel: Kernel) throws(HostMemoryRefusal) {
        try self.init(kernel: kernel, family: nil)
    }

    /// An empty address space, as its first user reference; with `family`,
    /// it joins the fork tree of its parent (`anon_vma_fork()`): once its
    /// VMAs are linked there, rmap walks of shared folios see it.
    ///
    /// - Throws: ``HostMemoryRefusal`` when the host refuses its page tables.
    convenience init(kernel: Kernel, family: AnonFamily?) throws(HostMemoryRefusal) {
        let state = try MMStruct(kernel: kernel, family: family)
        self.init(view: state, user: true)
    }

    /// A view of `state`. A user view stands for one `mm_users` reference
    /// the caller already counted (the first one, or `mmget_not_zero()`).
    init(view state: MMStruct, user: Bool) {
        self.state = state
        isUserReference = user
        kernel = state.kernel
        id = state.id
        baseAddress = state.baseAddress
        endAddress = state.endAddress
        mmapLock = state.mmapLock
        pmds = state.tables.pmds
        ptes = state.tables.ptes
        ptls = state.tables.ptls
        pmdLocks = state.tables.pmdLocks
        pmdCount = state.tables.pmdCount
        tlbContext = state.tlbContext
        tlbGen = state.tlbContext.gen
        cpuAccess = state.cpuAccess
        notifiers = state.notifiers
        activeInvalidations = state.activeInvalidations
        anonFamily = state.anonFamily
        anonFamilyRef = Unmanaged.passUnretained(state.anonFamily)
    }

    /// A user view's end is `mmput()`: the last user reference runs
    /// `exit_mmap()` here, on this thread. The kernel's view ends with
    /// nothing to do.
    deinit {
        if isUserReference { state.mmput() }
    }

    /// The kernel's view of this address space: what VMAs, rmap entries,
    /// interval notifiers and the registry store. Valid while any view is.
    var kernelView: AddressSpace { state.kernelViewRef.takeUnretainedValue() }

    /// `exit_mmap()`: unmaps everything so that references and map counts
    /// return, and unlinks every VMA from the rmaps (under their locks held
    /// for writing, so it waits for the walks visiting it). Called by
    /// `__mmput()` once, on the thread that dropped the last user reference.
    func exitMmap() {
        mmapWriteLock()
        for vma in vmas {
            zapRange(vma: vma, start: vma.start, end: vma.end, freeTables: true)
            hugetlbClose(vma)
        }
        let files = vmas.compactMap(\.file)
        vmas.removeAll()
        relinkFileMappings(files)
        relinkAnonMappings()
        mmapWriteUnlock()
    }

    // MARK: the mmap lock

    /// Takes the mmap lock for reading, sleeping while a writer holds it or
    /// waits for it (writers are preferred, so a fault storm cannot starve
    /// `munmap`).
    ///
    /// Faults, ``Kernel/migrateVMASetup(_:)`` and ``hmmRangeFault(_:)`` run
    /// under it. Not recursive with a waiting writer: a thread must not take
    /// it twice. Release with ``mmapReadUnlock()``.
    ///
    /// One writer-preferring ``KernelRWSemaphore`` for every thread: a
    /// scheduling point for the emulated threads of a
    /// ``DeterministicScheduler``.
    ///
    /// The corresponding kernel function is `mmap_read_lock()`.
    ///
    /// - Parameters:
    ///   - file: the call site, for lock-order reports (``LockOrder``).
    ///   - line: the call site's line.
    public func mmapReadLock(file: StaticString = #fileID, line: UInt = #line) {
        mmapLock.downRead(file: file, line: line)
        state.mmapLockHolders.add(1, ordering: .relaxed)
    }
    /// Releases the mmap lock taken with ``mmapReadLock(file:line:)``.
    ///
    /// The corresponding kernel function is `mmap_read_unlock()`.
    public func mmapReadUnlock() {
        state.mmapLockHolders.subtract(1, ordering: .relaxed)
        mmapLock.upRead()
    }
    /// Takes the mmap lock for writing, sleeping until no reader or writer
    /// holds it.
    ///
    /// ``mmap(address:length:protection:shared:special:)`` (and its file and
    /// driver forms), ``munmap(_:length:)``,
    /// ``mprotect(_:length:protection:)`` and ``mremap(_:oldLength:newLength:flags:newAddress:)``
    /// take it themselves: a caller holding it must not call them. Release
    /// with ``mmapWriteUnlock()``.
    ///
    /// The corresponding kernel function is `mmap_write_lock()`.
    ///
    /// - Parameters:
    ///   - file: the call site, for lock-order reports (``LockOrder``).
    ///   - line: the call site's line.
    public func mmapWriteLock(file: StaticString = #fileID, line: UInt = #line) {
        mmapLock.downWrite(file: file, line: line)
        state.mmapLockHolders.add(1, ordering: .relaxed)
    }
    /// Releases the mmap lock taken with ``mmapWriteLock(file:line:)``.
    ///
    /// The corresponding kernel function is `mmap_write_unlock()`.
    public func mmapWriteUnlock() {
        state.mmapLockHolders.subtract(1, ordering: .relaxed)
        mmapLock.upWrite()
    }
    /// Whether some thread holds the mmap lock, in either mode.
    ///
    /// Without per-thread tracking this cannot tell whether the *calling*
    /// thread holds it; the emulated kernel uses it to report callers that
    /// certainly do not.
    ///
    /// The corresponding kernel function is `mmap_assert_locked()`.
    public var isMmapLocked: Bool { state.mmapLockHolders.load(ordering: .relaxed) > 0 }
    /// Runs `body` with the mmap lock held for reading, and releases it when
    /// `body` returns or throws.
    ///
    /// - Parameters:
    ///   - body: runs with the lock held; must not take the mmap lock again.
    /// - Returns: what `body` returns.
    /// - Throws: what `body` throws.
    public func withMmapReadLock<R, E: Error>(_ body: () throws(E) -> R) throws(E) -> R {
        mmapReadLock(); defer { mmapReadUnlock() }
        return try body()
    }

    // MARK: VMAs

    /// The VMA containing `address`, or nil.
    ///
    /// Caller holds the mmap lock (either mode), and the VMA's bounds are
    /// stable only while it does.
    ///
    /// The corresponding kernel function is `vma_lookup()`.
    public func vma(containing address: UInt64) -> VMA? {
        var lo = 0, hi = vmas.count
        while lo < hi {
            let mid = (lo + hi) / 2
            let v = vmas[mid]
            if address < v.start { hi = mid } else if address >= v.end { lo = mid + 1 } else { return v }
        }
        return nil
    }
    /// The first VMA that ends above `address` (it may start above it too), or
    /// nil.
    ///
    /// Caller holds the mmap lock (either mode).
    ///
    /// The corresponding kernel function is `find_vma()`.
    public func findVMA(_ address: UInt64) -> VMA? { vmas.first { $0.end > address } }
    /// The VMAs in address order, for inspection.
    ///
    /// Takes the mmap lock for reading: a caller holding it for writing must
    /// not read this.
    public var mappings: [VMA] { withMmapReadLock { vmas } }

    // MARK: page-table slots

    @inlinable func covers(_ address: UInt64) -> Bool { address >= baseAddress && address < endAddress }
    @inlinable func pmdIndex(_ address: UInt64) -> Int { Int((address - baseAddress) >> PageGeometry.pmdShift) }
    @inlinable func pmdSlot(_ address: UInt64) -> UnsafeMutablePointer<UInt64> { pmds + pmdIndex(address) }
    @inlinable func pteSlot(_ address: UInt64) -> UnsafeMutablePointer<UInt64> { ptes + Int((address - baseAddress) >> PageGeometry.pageShift) }

    // MARK: page-table locks

    /// The PTE table lock of the table covering `address` (`pte_lockptr()`).
    @inlinable func ptl(at address: UInt64) -> SpinLockRef { SpinLockRef(ptls + pmdIndex(address), .pageTable) }
    /// The PMD lock covering `address` (`pmd_lockptr()`): one per 1 GiB.
    @inlinable func pmdLock(at address: UInt64) -> SpinLockRef { SpinLockRef(pmdLocks + pmdIndex(address) >> 9, .pmd) }

    /// Runs `body` holding the PTE table lock of the table covering `address`
    /// (`pte_offset_map_lock()` ... `pte_unmap_unlock()`).
    @inlinable @inline(__always)
    func withPTL<R, E: Error>(_ address: UInt64, file: StaticString = #fileID, line: UInt = #line,
                              _ body: () throws(E) -> R) throws(E) -> R {
        try ptl(at: address).withLock(file: file, line: line, body)
    }
    /// Runs `body` holding the PMD lock covering `address` (`pmd_lock()` ... `spin_unlock()`).
    @inlinable @inline(__always)
    func withPMDLock<R, E: Error>(_ address: UInt64, file: StaticString = #fileID, line: UInt = #line,
                                  _ body: () throws(E) -> R) throws(E) -> R {
        try pmdLock(at: address).withLock(file: file, line: line, body)
    }

    /// Debug builds: a diagnostic naming `rule` when the PTE table lock of
    /// `address` is free. For functions whose contract says "PTE lock held".
    @inlinable @inline(__always)
    func assertPTLHeld(_ address: UInt64, _ rule: @autoclosure () -> String) {
        ptl(at: address).assertHeld(rule(), kernel, "address 0x\(String(address, radix: 16))")
    }
    /// Debug builds: a diagnostic naming `rule` when the PMD lock of `address`
    /// is free. For functions whose contract says "PMD lock held".
    @inlinable @inline(__always)
    func assertPMDLockHeld(_ address: UInt64, _ rule: @autoclosure () -> String) {
        pmdLock(at: address).assertHeld(rule(), kernel, "address 0x\(String(address, radix: 16))")
    }

    /// The PMD entry covering `address` (`pmdp_get()`): an acquiring load, so a
    /// lockless walker that sees a table or a mapping sees what was stored
    /// before it was published.
    @inlinable func loadPMD(_ address: UInt64) -> PageTableEntry {
        PageTableEntry(rawValue: UnsafeAtomic(pmdSlot(address)).load(ordering: .acquiring))
    }
    /// Stores the PMD entry covering `address` (`set_pmd_at()`), releasing
    /// what the caller wrote before (the folio's bytes, its rmap) to lockless
    /// walkers.
    ///
    /// Caller holds the PMD lock of `address` (``pmdLock(at:)``). A store
    /// without it is reported as the diagnostic "set_pmd_at: caller must hold
    /// the PMD lock (pmd_lockptr)" (``DiagnosticKind/lockNotHeld``) in debug
    /// builds and wherever locks are validated (tests, the soak).
    @inlinable func storePMD(_ address: UInt64, _ e: PageTableEntry) {
        assertPMDLockHeld(address, "set_pmd_at: caller must hold the PMD lock (pmd_lockptr)")
        UnsafeAtomic(pmdSlot(address)).store(e.rawValue, ordering: .releasing)
    }
    /// The PTE of `address` (`ptep_get()`): an acquiring load.
    @inlinable func loadPTE(_ address: UInt64) -> PageTableEntry {
        PageTableEntry(rawValue: UnsafeAtomic(pteSlot(address)).load(ordering: .acquiring))
    }
    /// Stores the PTE of `address` (`set_pte_at()`), releasing what the
    /// caller wrote before to lockless walkers.
    ///
    /// Caller holds the PTE table lock of `address` (``ptl(at:)``). A store
    /// without it is reported as the diagnostic "set_pte_at: caller must hold
    /// the PTE table lock (pte_lockptr)" (``DiagnosticKind/lockNotHeld``) in
    /// debug builds and wherever locks are validated (tests, the soak).
    @inlinable func storePTE(_ address: UInt64, _ e: PageTableEntry) {
        assertPTLHeld(address, "set_pte_at: caller must hold the PTE table lock (pte_lockptr)")
        UnsafeAtomic(pteSlot(address)).store(e.rawValue, ordering: .releasing)
    }
    /// Replaces the PTE of `address` with `e` in one atomic exchange and
    /// returns what it was, with every accessed or dirty bit a lockless walk
    /// set up to that instant (`ptep_get_and_clear()`, and the first half of
    /// `ptep_modify_prot_start()`). A load followed by a store would drop a
    /// bit set between the two. Caller holds the page-table lock.
    @inlinable func exchangePTE(_ address: UInt64, _ e: PageTableEntry) -> PageTableEntry {
        PageTableEntry(rawValue: UnsafeAtomic(pteSlot(address)).exchange(e.rawValue, ordering: .acquiringAndReleasing))
    }
    /// The PMD form of ``exchangePTE(_:_:)`` (`pmdp_huge_get_and_clear()`,
    /// `pmdp_invalidate()`). Caller holds the PMD lock.
    @inlinable func exchangePMD(_ address: UInt64, _ e: PageTableEntry) -> PageTableEntry {
        PageTableEntry(rawValue: UnsafeAtomic(pmdSlot(address)).exchange(e.rawValue, ordering: .acquiringAndReleasing))
    }
    /// Clears `bits` of the PTE of `address` in one atomic step, keeping any
    /// bit a lockless walk sets meanwhile (`ptep_set_wrprotect()`). Caller
    /// holds the PTE table lock.
    @inlinable func clearPTEBits(_ address: UInt64, _ bits: UInt64) {
        UnsafeAtomic(pteSlot(address)).bitwiseAnd(~bits, ordering: .acquiringAndReleasing)
    }
    /// The PMD form of ``clearPTEBits(_:_:)`` (`pmdp_set_wrprotect()`).
    /// Caller holds the PMD lock.
    @inlinable func clearPMDBits(_ address: UInt64, _ bits: UInt64) {
        UnsafeAtomic(pmdSlot(address)).bitwiseAnd(~bits, ordering: .acquiringAndReleasing)
    }

    /// The entry mapping `address`, for inspection: the PMD entry when it maps
    /// 2 MiB itself, else the PTE. No locks; a snapshot.
    ///
    /// - Parameters:
    ///   - address: any address; outside the address space the entry is none.
    /// - Returns: the level of the entry and the entry.
    public func entry(at address: UInt64) -> (level: PageTableLevel, entry: PageTableEntry) {
        guard covers(address) else { return (.pte, .none) }
        let pmd = loadPMD(address)
        if pmd.kind == .table { return (.pte, loadPTE(address)) }
        return (.pmd, pmd)
    }

    /// Makes sure the PMD slot of `address` points to a PTE table, unless it
    /// already maps 2 MiB itself. Returns the PMD entry seen.
    func ensurePTETable(_ address: UInt64) -> PageTableEntry {
        let pmd = loadPMD(address)
        if !pmd.isNone { return pmd }
        return withPMDLock(address) {
        let again = loadPMD(address)
        if again.isNone {
            // A fresh table: every entry none (tables are cleared when freed).
            storePMD(address, .table)
            return .table
        }
            return again
        }
    }
}

/// The level of a page-table entry.
public enum PageTableLevel: String, Sendable {
    /// A PMD entry that maps 2 MiB itself.
    case pmd
    /// A PTE, mapping 4 KiB.
    case pte
}
