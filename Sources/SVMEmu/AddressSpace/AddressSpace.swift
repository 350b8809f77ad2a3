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
public final class AddressSpace: @unchecked Sendable {
    /// Strong on purpose: an address space keeps its kernel alive. With
    /// `unowned`, optimized callers that create a kernel and an address space
    /// as locals could see the kernel released first (Swift may end a local's
    /// lifetime after its last use), and `deinit` (exit_mmap) then trapped on
    /// the dead kernel. The kernel refers to address spaces only weakly, so
    /// this makes no cycle.
    public let kernel: Kernel
    /// Identity for the reverse map (anonymous pages record it).
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
    let mmapLock = KernelRWSemaphore("mmap lock", prefersWriters: true, lockClass: .mmap)
    let mmapLockHolders = Atomic<Int>(0)
    /// Sorted, non-overlapping. Changed only with the mmap lock held for writing.
    var vmas: [VMA] = []

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
    /// `mm->tlb_flush_pending`: how many page-table changes are between
    /// their first entry changed and the TLB flush that covers them
    /// (``incTLBFlushPending()`` / ``decTLBFlushPending()``).
    let flushPendingCount = Atomic<Int>(0)
    /// `MMF_HAS_PINNED`: a `FOLL_PIN` lookup ran in this address space
    /// (set by ``pinUserPages(_:count:flags:)``, never cleared, not inherited
    /// by a fork's child). fork copies an anonymous page that may be pinned
    /// only in an address space that has pinned.
    let hasPinned = Atomic<Bool>(false)
    /// Registered MMU notifiers and interval notifiers.
    let notifiers = LockedValue<NotifierList>(NotifierList())
    let notifierCount = Atomic<Int>(0)
    /// Invalidations in progress (a futex word), and the sequence they advance.
    let activeInvalidations: UnsafeMutablePointer<UInt32>
    let invalidateSeq = Atomic<UInt64>(0)
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
    /// ``baseAddress``, has no VMAs, and keeps `kernel` alive. When the last
    /// reference goes, every mapping is torn down (`exit_mmap()`), so the
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
        kernel.drainAsyncMMPuts()
        try self.init(kernel: kernel, family: nil)
    }

    /// An empty address space; with `family`, it joins the fork tree of its
    /// parent (`anon_vma_fork()`): once its VMAs are linked there, rmap
    /// walks of shared folios see it.
    ///
    /// - Throws: ``HostMemoryRefusal`` when the host refuses its page tables.
    init(kernel: Kernel, family: AnonFamily?) throws(HostMemoryRefusal) {
        let tables = try PageTableReservation(addressSpaceSize: kernel.configuration.addressSpaceSize)
        self.kernel = kernel
        baseAddress = 1 << 32
        let size = (kernel.configuration.addressSpaceSize + (1 << 30) - 1) & ~((1 << 30) - 1)
        endAddress = baseAddress + size
        pmdCount = Int(size >> PageGeometry.pmdShift)
        pmds = tables.pmds
        ptes = tables.ptes
        ptls = tables.ptls
        pmdLocks = tables.pmdLocks
        activeInvalidations = .allocate(capacity: 1)
        activeInvalidations.initialize(to: 0)
        id = kernel.reserveAddressSpaceID()
        tlbContext = TLBContext(id: id)
        tlbGen = tlbContext.gen
        cpuAccess = CPUAccess(kernel.cpus)
        anonFamily = family ?? AnonFamily()
        anonFamilyRef = Unmanaged.passUnretained(anonFamily)
        kernel.registerAnonFamily(anonFamily, id: id)
        kernel.register(self)
    }

    /// `exit_mmap()`, when the last reference goes.
    ///
    /// Swift's reference count is `mm_users`: users, and kernel paths that
    /// pin an address space (`mmget()`), hold strong references. The rmap
    /// walks reach an address space through its family's and its files'
    /// mapping lists, under those lists' locks held for reading; this
    /// teardown unlinks it from them under the same locks held for writing
    /// before the structure is freed (the role of `mm_count`), so an
    /// exiting address space stays valid for the walks still visiting it.
    /// A walk pins a live one and gives the pin back with `mmput_async()`,
    /// which never releases it on the walker's thread (a worker releases
    /// it, see `AsyncMMPuts`), so the teardown never runs on a walker's
    /// thread with a folio lock held. What stays of the address space after it is its `TLBContext`
    /// (retained by CPUs, TLB batches and the deferred flush).
    deinit {
        // mmput() may sleep and exit_mmap() takes the mmap lock: a thread
        // that drops the last reference must hold no kernel lock (lockdep
        // would report e.g. "folio lock, then mmap lock"; kernel paths that
        // may drop the last one defer it, as mmput_async() does).
        if let held = LockOrder.heldLocksDescription() {
            kernel.warn("exit_mmap: the last reference to an address space was dropped with kernel locks held",
                        "mm \(id): \(held)", kind: .lockHeld)
        }
        // exit_mmap(): unmap everything so references and map counts return.
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
        kernel.unregister(id)
        PageTableReservation(pmdCount: pmdCount, pmds: pmds, ptes: ptes, ptls: ptls, pmdLocks: pmdLocks).release()
        activeInvalidations.deallocate()
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
        mmapLockHolders.add(1, ordering: .relaxed)
    }
    /// Releases the mmap lock taken with ``mmapReadLock(file:line:)``.
    ///
    /// The corresponding kernel function is `mmap_read_unlock()`.
    public func mmapReadUnlock() {
        mmapLockHolders.subtract(1, ordering: .relaxed)
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
        mmapLockHolders.add(1, ordering: .relaxed)
    }
    /// Releases the mmap lock taken with ``mmapWriteLock(file:line:)``.
    ///
    /// The corresponding kernel function is `mmap_write_unlock()`.
    public func mmapWriteUnlock() {
        mmapLockHolders.subtract(1, ordering: .relaxed)
        mmapLock.upWrite()
    }
    /// Whether some thread holds the mmap lock, in either mode.
    ///
    /// Without per-thread tracking this cannot tell whether the *calling*
    /// thread holds it; the emulated kernel uses it to report callers that
    /// certainly do not.
    ///
    /// The corresponding kernel function is `mmap_assert_locked()`.
    public var isMmapLocked: Bool { mmapLockHolders.load(ordering: .relaxed) > 0 }
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
