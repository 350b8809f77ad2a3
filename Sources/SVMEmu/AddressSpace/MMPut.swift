import CSVMSupport
import Synchronization

/// The references kernel paths give back with `mmput_async()`, and the
/// work item that drops them (the kernel's `mm->async_put_work` on
/// `system_wq`).
///
/// Swift's reference count is `mm_users`, and it has no "decrement and
/// test": whoever releases last runs `exit_mmap()` (``AddressSpace``'s
/// `deinit`), wherever that is. A kernel path that holds a folio lock
/// therefore never releases a reference itself. On real threads it hands
/// the reference, unreleased, to a worker thread of this machine that
/// holds no lock and releases it at once: when the user has dropped theirs
/// meanwhile, the exit runs there, as `mmput_async()` runs `__mmput()` from
/// a work item. An address space is kept alive only until the worker gets
/// to it, or until the walker's system call ends (``Kernel/drainAsyncMMPuts()``
/// takes what the worker has not), whichever comes first. On an emulated
/// thread of a ``DeterministicScheduler`` nothing runs between a
/// uniqueness check and a release, so a reference that is not the last is
/// released at once and the last is parked for the next drain point.
final class AsyncMMPuts: @unchecked Sendable {
    /// Parked by emulated threads, one per address space.
    let parked = LockedValue<[AddressSpace]>([])
    let parkedCount = Atomic<Int>(0)
    /// Queued for the worker on real threads: retained references, never
    /// materialized as strong ones by the queuing thread (whose release
    /// could then be the last).
    private let queued = LockedValue<[Unmanaged<AddressSpace>]>([])
    /// References queued and not yet released (in the queue, or taken by
    /// the worker or a drain and still being released).
    let pending = Atomic<Int>(0)
    /// The worker's futex word: 1 when work was queued since it last looked.
    private let word: UnsafeMutablePointer<UInt32>
    /// 0: no worker yet, 1: running, 2: the host refused a thread (the
    /// queue is then emptied at the drain points only).
    private let workerState = Atomic<Int>(0)
    private let stopping = Atomic<Bool>(false)
    /// Test hook: runs on the giving thread, with the address space's id,
    /// after `mmput_async()` decided how to give a reference back and
    /// before it does (`hasHook` keeps its cost to one load).
    private let hook = LockedValue<(@Sendable (UInt32) -> Void)?>(nil)
    private let hasHook = Atomic<Bool>(false)

    init() {
        word = .allocate(capacity: 1)
        word.initialize(to: 0)
    }
    deinit { word.deallocate() }

    func setHook(_ body: (@Sendable (UInt32) -> Void)?) {
        hook.withLock { $0 = body }
        hasHook.store(body != nil, ordering: .releasing)
    }

    @inline(__always)
    func runHook(_ id: UInt32) {
        guard _slowPath(hasHook.load(ordering: .acquiring)) else { return }
        if let h = hook.withLock({ $0 }) { h(id) }
    }

    /// Queues retained reference `mm` for the worker (`schedule_work()`),
    /// starting the worker on first use. The caller's reference passes to
    /// the queue: the caller must not release it.
    func queue(_ mm: Unmanaged<AddressSpace>) {
        pending.add(1, ordering: .relaxed)
        queued.withLock { $0.append(mm) }
        if workerState.load(ordering: .acquiring) == 0 { startWorker() }
        if UnsafeAtomic<UInt32>(word).compareExchange(expected: 0, desired: 1, successOrdering: .acquiringAndReleasing,
                                                      failureOrdering: .acquiring).exchanged {
            _ = svm_futex_wake(word, 1)
        }
    }

    /// Releases every queued reference on the calling thread, which holds
    /// no kernel lock; the last reference of an address space runs its
    /// exit here. Returns how many it released.
    @discardableResult
    func releaseQueued() -> Int {
        var batch: [Unmanaged<AddressSpace>] = []
        queued.withLock { swap(&batch, &$0) }
        for m in batch {
            m.release()
            pending.subtract(1, ordering: .releasing)
        }
        return batch.count
    }

    /// Tells the worker to end once the queue is empty (the machine is
    /// going away: nothing can be queued any more).
    func stop() {
        stopping.store(true, ordering: .releasing)
        UnsafeAtomic<UInt32>(word).store(1, ordering: .releasing)
        _ = svm_futex_wake(word, 1)
    }

    private func startWorker() {
        guard workerState.compareExchange(expected: 0, desired: 1, ordering: .acquiringAndReleasing).exchanged else { return }
        guard let thread = HostThreadHandle.spawn({ [self] in run() }) else {
            workerState.store(2, ordering: .releasing)
            return
        }
        thread.detach()
    }

    /// The worker: sleeps on `word` until work is queued, releases it, and
    /// gives back the emulated CPU an exit's TLB flush bound it to (a
    /// kworker going idle), so that it never keeps one of the machine's
    /// CPUs.
    private func run() {
        while true {
            if releaseQueued() > 0 {
                AsyncMMPuts.leaveCPU()
                continue
            }
            if UnsafeAtomic<UInt32>(word).compareExchange(expected: 1, desired: 0, successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring).exchanged {
                continue
            }
            if stopping.load(ordering: .acquiring) { return }
            _ = svm_futex_wait(word, 0, 0)
        }
    }

    /// Unbinds the calling thread from the emulated CPU it took, if any.
    private static func leaveCPU() {
        guard let owner = svm_bound_cpu_owner() else { return }
        let index = Int(svm_bound_cpu(owner))
        svm_clear_cpu_binding()
        Unmanaged<CPUSet>.fromOpaque(owner).takeRetainedValue().giveBack(index)
    }
}

/// mm references taken by kernel paths (`mmget_not_zero()` /
/// `mmput_async()`).
extension Kernel {
    /// `mmget_not_zero()` for a kernel path that reaches address space `id`
    /// by its id: a reference (owned by the caller, unmanaged so that its
    /// release is explicit), or nil when the address space is exiting or
    /// gone. Give the reference back with ``mmputAsync(_:)`` when the
    /// caller may hold kernel locks.
    func mmgetNotZero(id: UInt32) -> Unmanaged<AddressSpace>? {
        addressSpaces.lookup(id).map { Unmanaged.passRetained($0) }
    }

    /// `mmput_async()`: gives back a reference taken by a kernel path that
    /// may hold kernel locks (a folio lock). It may be the last (its user
    /// dropped theirs meanwhile), and the last one runs `exit_mmap()`,
    /// which must not run under those locks, so the caller never releases
    /// it (see ``AsyncMMPuts``): on real threads the reference goes to
    /// this machine's worker, which releases it at once where no lock is
    /// held (the kernel's work item); on an emulated thread it is released
    /// at once unless it is the last, which is parked until
    /// ``drainAsyncMMPuts()``.
    func mmputAsync(_ mm: Unmanaged<AddressSpace>) {
        guard _slowPath(svm_det_active()) && svm_det_current() != nil else {
            asyncMMPuts.runHook(mm._withUnsafeGuaranteedRef { $0.id })
            asyncMMPuts.queue(mm)
            return
        }
        // An emulated thread: no other runs until its next scheduling
        // point, so the check and the release are one step.
        var strong: AddressSpace? = mm.takeRetainedValue()
        let id = strong!.id
        asyncMMPuts.runHook(id)
        if !isKnownUniquelyReferenced(&strong) {
            strong = nil
            return
        }
        asyncMMPuts.parked.withLock { list in
            if !list.contains(where: { $0.id == id }) {
                list.append(strong!)
                asyncMMPuts.parkedCount.add(1, ordering: .releasing)
            }
        }
        // Parked (the list holds one: not the last), or already parked.
        strong = nil
    }

    /// Releases what ``mmputAsync(_:)`` parked or queued and the worker has
    /// not yet released; the last reference of an address space runs its
    /// `exit_mmap()` here (the work item of `mmput_async()`). Called where
    /// the calling thread holds no kernel lock: at the end of the system
    /// calls that walk rmaps (`move_pages`, `migrate_pages`, a
    /// truncation), when an address space is created, and by the audit.
    func drainAsyncMMPuts() {
        if asyncMMPuts.pending.load(ordering: .acquiring) > 0 { asyncMMPuts.releaseQueued() }
        guard asyncMMPuts.parkedCount.load(ordering: .acquiring) > 0 else { return }
        var parked: [AddressSpace] = []
        asyncMMPuts.parked.withLock { list in
            swap(&parked, &list)
            asyncMMPuts.parkedCount.store(0, ordering: .releasing)
        }
        parked.removeAll()
    }

    /// ``drainAsyncMMPuts()``, then waits (at most `seconds`) for the
    /// releases the worker has in hand, so that every exit queued before
    /// the call has run: for the audit. Returns false when one is still
    /// running (an exit waiting for an mmap lock someone holds).
    @discardableResult
    func drainAsyncMMPutsAndWait(seconds: UInt64 = 10) -> Bool {
        drainAsyncMMPuts()
        let deadline = HostClock.hostNanos() &+ seconds &* 1_000_000_000
        while asyncMMPuts.pending.load(ordering: .acquiring) > 0 {
            if HostClock.hostNanos() > deadline { return false }
            HostClock.sleep(nanos: 100_000)
        }
        return true
    }
}
