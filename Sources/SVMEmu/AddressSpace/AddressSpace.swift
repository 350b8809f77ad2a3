import CSVMSupport
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

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
    /// First and one-past-last address the page tables cover.
    public let baseAddress: UInt64
    public let endAddress: UInt64

    let mmapLockStorage: UnsafeMutablePointer<pthread_rwlock_t>
    let mmapLockHolders = Atomic<Int>(0)
    /// Sorted, non-overlapping. Changed only with the mmap lock held for writing.
    var vmas: [VMA] = []

    @usableFromInline let pmds: UnsafeMutablePointer<UInt64>
    @usableFromInline let ptes: UnsafeMutablePointer<UInt64>
    @usableFromInline let ptls: UnsafeMutablePointer<UInt32>
    @usableFromInline let pmdLocks: UnsafeMutablePointer<UInt32>
    let pmdCount: Int
    /// CPUs that have used this address space (`mm_cpumask()`), one bit per CPU id mod 64.
    @usableFromInline let cpumask = Atomic<UInt64>(0)
    /// Registered MMU notifiers and interval notifiers.
    let notifiers = LockedValue<NotifierList>(NotifierList())
    let notifierCount = Atomic<Int>(0)
    /// Invalidations in progress (a futex word), and the sequence they advance.
    let activeInvalidations: UnsafeMutablePointer<UInt32>
    let invalidateSeq = Atomic<UInt64>(0)

    /// Creates an empty address space (what `execve()` or `fork()` would set up).
    public init(kernel: Kernel) {
        self.kernel = kernel
        baseAddress = 1 << 32
        let size = (kernel.configuration.addressSpaceSize + (1 << 30) - 1) & ~((1 << 30) - 1)
        endAddress = baseAddress + size
        pmdCount = Int(size >> 21)
        pmds = Kernel.reserve(bytes: pmdCount * 8).assumingMemoryBound(to: UInt64.self)
        ptes = Kernel.reserve(bytes: pmdCount * 512 * 8).assumingMemoryBound(to: UInt64.self)
        ptls = Kernel.reserve(bytes: pmdCount * 4).assumingMemoryBound(to: UInt32.self)
        pmdLocks = Kernel.reserve(bytes: max(4096, (pmdCount / 512 + 1) * 4)).assumingMemoryBound(to: UInt32.self)
        mmapLockStorage = .allocate(capacity: 1)
        activeInvalidations = .allocate(capacity: 1)
        activeInvalidations.initialize(to: 0)
        var attr = pthread_rwlockattr_t()
        pthread_rwlockattr_init(&attr)
        // Writers must not starve behind a storm of faulting readers.
        pthread_rwlockattr_setkind_np(&attr, Int32(PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP))
        pthread_rwlock_init(mmapLockStorage, &attr)
        pthread_rwlockattr_destroy(&attr)
        id = kernel.reserveAddressSpaceID()
        kernel.register(self)
    }

    deinit {
        // exit_mmap(): unmap everything so references and map counts return.
        mmapWriteLock()
        for vma in vmas { zapRange(vma: vma, start: vma.start, end: vma.end, freeTables: true) }
        vmas.removeAll()
        mmapWriteUnlock()
        kernel.unregister(id)
        Glibc.munmap(pmds, pmdCount * 8)
        Glibc.munmap(ptes, pmdCount * 512 * 8)
        Glibc.munmap(ptls, pmdCount * 4)
        Glibc.munmap(pmdLocks, max(4096, (pmdCount / 512 + 1) * 4))
        pthread_rwlock_destroy(mmapLockStorage)
        mmapLockStorage.deallocate()
        activeInvalidations.deallocate()
    }

    // MARK: the mmap lock

    /// `mmap_read_lock()`.
    public func mmapReadLock() {
        pthread_rwlock_rdlock(mmapLockStorage)
        mmapLockHolders.add(1, ordering: .relaxed)
    }
    /// `mmap_read_unlock()`.
    public func mmapReadUnlock() {
        mmapLockHolders.subtract(1, ordering: .relaxed)
        pthread_rwlock_unlock(mmapLockStorage)
    }
    /// `mmap_write_lock()`.
    public func mmapWriteLock() {
        pthread_rwlock_wrlock(mmapLockStorage)
        mmapLockHolders.add(1, ordering: .relaxed)
    }
    /// `mmap_write_unlock()`.
    public func mmapWriteUnlock() {
        mmapLockHolders.subtract(1, ordering: .relaxed)
        pthread_rwlock_unlock(mmapLockStorage)
    }
    /// Whether some thread holds the mmap lock (`mmap_assert_locked()` can only
    /// tell that much without per-thread tracking).
    public var isMmapLocked: Bool { mmapLockHolders.load(ordering: .relaxed) > 0 }
    /// Runs `body` with the mmap lock held for reading.
    public func withMmapReadLock<R, E: Error>(_ body: () throws(E) -> R) throws(E) -> R {
        mmapReadLock(); defer { mmapReadUnlock() }
        return try body()
    }

    // MARK: VMAs

    /// `find_vma()`-like but exact: the VMA containing `address`, or nil.
    /// Caller holds the mmap lock.
    public func vma(containing address: UInt64) -> VMA? {
        var lo = 0, hi = vmas.count
        while lo < hi {
            let mid = (lo + hi) / 2
            let v = vmas[mid]
            if address < v.start { hi = mid } else if address >= v.end { lo = mid + 1 } else { return v }
        }
        return nil
    }
    /// `find_vma()`: the first VMA ending above `address`. Caller holds the mmap lock.
    public func findVMA(_ address: UInt64) -> VMA? { vmas.first { $0.end > address } }
    /// The VMAs, for inspection (takes the mmap lock).
    public var mappings: [VMA] { withMmapReadLock { vmas } }

    // MARK: page-table slots

    @inlinable func covers(_ address: UInt64) -> Bool { address >= baseAddress && address < endAddress }
    @inlinable func pmdIndex(_ address: UInt64) -> Int { Int((address - baseAddress) >> 21) }
    @inlinable func pmdSlot(_ address: UInt64) -> UnsafeMutablePointer<UInt64> { pmds + pmdIndex(address) }
    @inlinable func pteSlot(_ address: UInt64) -> UnsafeMutablePointer<UInt64> { ptes + Int((address - baseAddress) >> 12) }
    /// The raw word of the PTE table lock covering `address`, for the access
    /// path (Fault/Access.swift) until its rewrite; everything else takes
    /// ``withPTL(_:_:)`` or ``ptl(at:)``.
    @inlinable func ptl(_ address: UInt64) -> UnsafeMutablePointer<UInt32> { ptls + pmdIndex(address) }
    /// The raw word of the PMD lock covering `address` (see ``ptl(_:)``).
    @inlinable func pmdLock(_ address: UInt64) -> UnsafeMutablePointer<UInt32> { pmdLocks + pmdIndex(address) >> 9 }

    // MARK: page-table locks

    /// The PTE table lock of the table covering `address` (`pte_lockptr()`).
    @inlinable func ptl(at address: UInt64) -> SpinLockRef { SpinLockRef(ptls + pmdIndex(address)) }
    /// The PMD lock covering `address` (`pmd_lockptr()`): one per 1 GiB.
    @inlinable func pmdLock(at address: UInt64) -> SpinLockRef { SpinLockRef(pmdLocks + pmdIndex(address) >> 9) }

    /// Runs `body` holding the PTE table lock of the table covering `address`
    /// (`pte_offset_map_lock()` ... `pte_unmap_unlock()`).
    @inlinable @inline(__always)
    func withPTL<R, E: Error>(_ address: UInt64, _ body: () throws(E) -> R) throws(E) -> R {
        try ptl(at: address).withLock(body)
    }
    /// Runs `body` holding the PMD lock covering `address` (`pmd_lock()` ... `spin_unlock()`).
    @inlinable @inline(__always)
    func withPMDLock<R, E: Error>(_ address: UInt64, _ body: () throws(E) -> R) throws(E) -> R {
        try pmdLock(at: address).withLock(body)
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

    @inlinable func loadPMD(_ address: UInt64) -> PageTableEntry { PageTableEntry(rawValue: svm_load64(pmdSlot(address))) }
    @inlinable func storePMD(_ address: UInt64, _ e: PageTableEntry) { svm_store64(pmdSlot(address), e.rawValue) }
    @inlinable func loadPTE(_ address: UInt64) -> PageTableEntry { PageTableEntry(rawValue: svm_load64(pteSlot(address))) }
    @inlinable func storePTE(_ address: UInt64, _ e: PageTableEntry) { svm_store64(pteSlot(address), e.rawValue) }

    /// The entry mapping `address`, for inspection: the PMD entry when it maps
    /// 2 MiB itself, else the PTE. No locks; a snapshot.
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

    /// Notes that the current CPU uses this address space (for TLB flush accounting).
    @inlinable func markCPU() {
        let bit: UInt64 = 1 << UInt64(svm_cpu_id() & 63)
        if cpumask.load(ordering: .relaxed) & bit == 0 { cpumask.bitwiseOr(bit, ordering: .relaxed) }
    }
}

public enum PageTableLevel: String, Sendable { case pmd, pte }
