import CSVMSupport
import Synchronization

/// The references kernel paths give back with `mmput_async()`.
final class AsyncMMPuts: @unchecked Sendable {
    /// Parked references, one per address space.
    let parked = LockedValue<[AddressSpace]>([])
    let parkedCount = Atomic<Int>(0)
    /// Test hook: runs on the giving thread, with the address space's id,
    /// after `mmput_async()` decided how to give a reference back and
    /// before it does (`hasHook` keeps its cost to one load).
    let hook = LockedValue<(@Sendable (UInt32) -> Void)?>(nil)
    let hasHook = Atomic<Bool>(false)

    func setHook(_ body: (@Sendable (UInt32) -> Void)?) {
        hook.withLock { $0 = body }
        hasHook.store(body != nil, ordering: .releasing)
    }

    @inline(__always)
    func runHook(_ id: UInt32) {
        guard _slowPath(hasHook.load(ordering: .acquiring)) else { return }
        if let h = hook.withLock({ $0 }) { h(id) }
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
    /// which must not run under those locks: then it is parked on a list
    /// until ``drainAsyncMMPuts()`` runs at a point that holds no lock.
    /// Otherwise it is dropped at once, so that an address space's exit is
    /// not delayed while its user still holds it. (A user that drops theirs
    /// between the check and the release makes this release the last: a
    /// window of a few instructions on real threads, none under the
    /// deterministic scheduler, where no scheduling point falls in it; the
    /// teardown then reports the locks held as a kernel warning.)
    func mmputAsync(_ mm: Unmanaged<AddressSpace>) {
        var strong: AddressSpace? = mm.takeRetainedValue()
        let id = strong!.id
        if !isKnownUniquelyReferenced(&strong) {
            asyncMMPuts.runHook(id)
            strong = nil
            return
        }
        asyncMMPuts.runHook(id)
        asyncMMPuts.parked.withLock { list in
            if !list.contains(where: { $0.id == id }) {
                list.append(strong!)
                asyncMMPuts.parkedCount.add(1, ordering: .releasing)
            }
        }
        // Parked (the list holds one: not the last), or already parked.
        strong = nil
    }

    /// Drops the references parked by ``mmputAsync(_:)``; the last one of an
    /// address space runs its `exit_mmap()` here (the work item of
    /// `mmput_async()`). Called where the calling thread holds no kernel
    /// lock: at the end of the system calls that walk rmaps (`move_pages`,
    /// `migrate_pages`, a truncation), when an address space is created,
    /// and by the audit.
    func drainAsyncMMPuts() {
        guard asyncMMPuts.parkedCount.load(ordering: .acquiring) > 0 else { return }
        var parked: [AddressSpace] = []
        asyncMMPuts.parked.withLock { list in
            swap(&parked, &list)
            asyncMMPuts.parkedCount.store(0, ordering: .releasing)
        }
        parked.removeAll()
    }
}
