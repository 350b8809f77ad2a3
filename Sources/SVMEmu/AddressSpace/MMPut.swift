import CSVMSupport
import Synchronization

/// One address space itself (`struct mm_struct`): everything its views
/// (``AddressSpace`` objects) share and change, and its two counts.
///
/// - `users` is `mm_users`: one per user view (what ``AddressSpace/init(kernel:)``,
///   ``AddressSpace/fork()`` and `mmget_not_zero()` hand out). When it
///   drops to zero, `mmput()` runs `exit_mmap()` on that thread, at once.
/// - `count` is `mm_count`: one for all the users together, plus one per
///   `mmgrab()`. When it drops to zero (`mmdrop()`), the structure lets go
///   of its kernel view; the memory goes when the last view does (Swift's
///   reference count on the views and on this object only keeps memory,
///   never mappings).
///
/// The rmap walks pin neither count: an rmap entry names the kernel view
/// unretained, and is valid while the walk holds the rmap's lock, because
/// `exit_mmap()` unlinks the entries under that lock held for writing
/// before `mmput()` returns, and the kernel view outlives that (this
/// object keeps it until `mmdrop()`). A walker's own retain of the kernel
/// view (the compiler's) can therefore at worst free memory, never run an
/// exit.
final class MMStruct: @unchecked Sendable {
    let kernel: Kernel
    let id: UInt32
    let baseAddress: UInt64
    let endAddress: UInt64
    /// The page tables (`pgd_alloc()`), given back when the structure goes
    /// (`mm_free_pgd()` in `__mmdrop()`); `exit_mmap()` empties them.
    let tables: PageTableReservation
    let mmapLock = KernelRWSemaphore("mmap lock", prefersWriters: true, lockClass: .mmap)
    let mmapLockHolders = Atomic<Int>(0)
    /// Sorted, non-overlapping. Changed only with the mmap lock held for writing.
    var vmas: [VMA] = []
    let tlbContext: TLBContext
    let cpuAccess: CPUAccess
    /// `mm->tlb_flush_pending`: how many page-table changes are between
    /// their first entry changed and the TLB flush that covers them
    /// (``AddressSpace/incTLBFlushPending()`` / ``AddressSpace/decTLBFlushPending()``).
    let flushPendingCount = Atomic<Int>(0)
    /// `MMF_HAS_PINNED`: a `FOLL_PIN` lookup ran in this address space
    /// (set by ``AddressSpace/pinUserPages(_:count:flags:)``, never cleared,
    /// not inherited by a fork's child). fork copies an anonymous page that
    /// may be pinned only in an address space that has pinned.
    let hasPinned = Atomic<Bool>(false)
    let notifiers = LockedValue<NotifierList>(NotifierList())
    let notifierCount = Atomic<Int>(0)
    let activeInvalidations: UnsafeMutablePointer<UInt32>
    let invalidateSeq = Atomic<UInt64>(0)
    let anonFamily: AnonFamily
    /// `mm_users`.
    let users = Atomic<Int>(1)
    /// `mm_count`.
    let count = Atomic<Int>(1)
    /// The kernel's view, unretained: valid while any view of this
    /// structure is (a view keeps this object, and this object keeps the
    /// kernel view until `mmdrop()`, after which only views keep it).
    private(set) var kernelViewRef: Unmanaged<AddressSpace>! = nil
    /// The kernel view, strongly, until `mm_count` drops to zero.
    private var kernelViewHold: AddressSpace? = nil

    /// `mm_alloc()` (and `mm_init()`): a structure with one user and its
    /// kernel view, registered with the kernel and its fork family.
    init(kernel: Kernel, family: AnonFamily?) throws(HostMemoryRefusal) {
        tables = try PageTableReservation(addressSpaceSize: kernel.configuration.addressSpaceSize)
        self.kernel = kernel
        baseAddress = 1 << 32
        let size = (kernel.configuration.addressSpaceSize + (1 << 30) - 1) & ~((1 << 30) - 1)
        endAddress = baseAddress + size
        activeInvalidations = .allocate(capacity: 1)
        activeInvalidations.initialize(to: 0)
        id = kernel.reserveAddressSpaceID()
        tlbContext = TLBContext(id: id)
        cpuAccess = CPUAccess(kernel.cpus)
        anonFamily = family ?? AnonFamily()
        let view = AddressSpace(view: self, user: false)
        kernelViewHold = view
        kernelViewRef = Unmanaged.passUnretained(view)
        kernel.registerAnonFamily(anonFamily, id: id)
        kernel.register(view)
    }

    /// `__mmdrop()`: the structure's memory (page tables included).
    deinit {
        tables.release()
        activeInvalidations.deallocate()
    }

    /// `mmget_not_zero()`: one more user reference, unless the address
    /// space is exiting (its users already zero). The caller owns it and
    /// gives it back with ``mmput()`` (or wraps it in a user view).
    func mmgetNotZero() -> Bool {
        var n = users.load(ordering: .relaxed)
        while n > 0 {
            let (done, seen) = users.compareExchange(expected: n, desired: n + 1, ordering: .acquiringAndReleasing)
            if done { return true }
            n = seen
        }
        return false
    }

    /// `mmput()`: gives one user reference back; the last runs
    /// `__mmput()` here: `exit_mmap()`, then the users' `mmdrop()`.
    ///
    /// It may sleep (the mmap lock, the rmap locks while walks visit this
    /// address space), so the caller must hold no kernel lock: a last
    /// reference dropped under one is reported (lockdep's "folio lock,
    /// then mmap lock" is what the kernel would see).
    func mmput() {
        guard users.subtract(1, ordering: .acquiringAndReleasing).newValue == 0 else { return }
        if let held = LockOrder.heldLocksDescription() {
            kernel.warn("exit_mmap: the last reference to an address space was dropped with kernel locks held",
                        "mm \(id): \(held)", kind: .lockHeld)
        }
        kernel.exitsRunning.add(1, ordering: .relaxed)
        kernel.mmHooks.exiting(id)
        kernelViewRef._withUnsafeGuaranteedRef { $0.exitMmap() }
        kernel.unregister(id)
        mmdrop()
        kernel.exitsRunning.subtract(1, ordering: .releasing)
    }

    /// `mmgrab()`: keeps the structure (not the mappings) until ``mmdrop()``.
    func mmgrab() { count.add(1, ordering: .relaxed) }

    /// `mmdrop()`: the last lets the kernel view go; the memory follows
    /// when the last view does.
    func mmdrop() {
        guard count.subtract(1, ordering: .acquiringAndReleasing).newValue == 0 else { return }
        kernelViewHold = nil
    }
}

/// Test hooks on the address-space lifetime: who runs an exit, and what
/// the rmap walks see. Off, each costs one relaxed load.
final class MMLifetimeHooks: @unchecked Sendable {
    private let enabled = Atomic<Bool>(false)
    private let onExit = LockedValue<(@Sendable (UInt32) -> Void)?>(nil)
    private let onVisit = LockedValue<(@Sendable (AddressSpace) -> Void)?>(nil)

    /// `exit`: runs on the thread that runs an address space's
    /// `exit_mmap()`, before it, with the address space's id. `visit`: runs
    /// on an rmap walker for every address space it visits, with the rmap
    /// lock held.
    func set(exit: (@Sendable (UInt32) -> Void)?, visit: (@Sendable (AddressSpace) -> Void)?) {
        onExit.withLock { $0 = exit }
        onVisit.withLock { $0 = visit }
        enabled.store(exit != nil || visit != nil, ordering: .releasing)
    }

    @inline(__always) func exiting(_ id: UInt32) {
        guard _slowPath(enabled.load(ordering: .relaxed)) else { return }
        onExit.withLock { $0 }?(id)
    }

    @inline(__always) func visiting(_ mm: AddressSpace) {
        guard _slowPath(enabled.load(ordering: .relaxed)) else { return }
        onVisit.withLock { $0 }?(mm)
    }
}

extension Kernel {
    /// `mmget_not_zero()` on the address space of id `id`: a new user
    /// reference to it (an ``AddressSpace`` whose release is `mmput()`),
    /// or nil when it is exiting or gone.
    func addressSpace(id: UInt32) -> AddressSpace? {
        guard let view = addressSpaces.lookup(id), view.state.mmgetNotZero() else { return nil }
        return AddressSpace(view: view.state, user: true)
    }
}
