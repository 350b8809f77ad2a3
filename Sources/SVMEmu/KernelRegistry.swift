import CSVMSupport
import Synchronization

/// The kernel's registries: live address spaces and files by id (for the
/// reverse map), the mm references kernel paths take, and anon families.
extension Kernel {
    // MARK: address spaces and files (for the reverse map)

    func reserveAddressSpaceID() -> UInt32 { addressSpaces.reserveID() }
    func register(_ mm: AddressSpace) { addressSpaces.insert(mm, id: mm.id) }
    func unregister(_ id: UInt32) { addressSpaces.remove(id) }
    func addressSpace(id: UInt32) -> AddressSpace? { addressSpaces.lookup(id) }

    // MARK: mm references taken by kernel paths (mmget_not_zero / mmput_async)

    /// `mmget_not_zero()` for a kernel path that reaches address space `id`
    /// by its id: a reference (owned by the caller, unmanaged so that its
    /// release is explicit), or nil when the address space is exiting or
    /// gone. The registry holds address spaces weakly, and a weak load
    /// fails atomically once the count has reached zero: there is no
    /// window in which an exiting address space is revived. Give the
    /// reference back with ``mmputAsync(_:)``.
    func mmgetNotZero(id: UInt32) -> Unmanaged<AddressSpace>? {
        addressSpaces.lookup(id).map { Unmanaged.passRetained($0) }
    }

    /// `mmput_async()`: gives back a reference taken by a kernel path that
    /// may hold kernel locks (a folio lock, an rmap lock), without ever
    /// running `exit_mmap()` on the caller's thread.
    ///
    /// Swift's strong count is `mm_users`, and whoever releases the last
    /// strong reference runs the teardown there and then; so the caller
    /// never releases. The reference is parked on the address space's own
    /// count of put-but-not-dropped references (`asyncPuts`, one atomic
    /// add: no check of the count, so no window in which the user's own
    /// release can make this one the last), and the first parked one
    /// queues the address space on the kernel's list (the work item of
    /// `mmput_async()`). ``drainAsyncMMPuts()`` drops them at a point that
    /// holds no lock; when the user has dropped theirs meanwhile, that is
    /// where `exit_mmap()` runs.
    func mmputAsync(_ mm: Unmanaged<AddressSpace>) {
        let first = mm._withUnsafeGuaranteedRef { $0.asyncPuts.wrappingAdd(1, ordering: .acquiringAndReleasing).oldValue == 0 }
        guard first else { return }
        asyncMMPuts.withLock { $0.append(mm) }
        asyncMMPutCount.add(1, ordering: .releasing)
    }

    /// Drops the references parked by ``mmputAsync(_:)``; the last one of an
    /// address space runs its `exit_mmap()` here (the work item of
    /// `mmput_async()`). Called where the calling thread holds no kernel
    /// lock: at the end of the system calls that walk rmaps (`move_pages`,
    /// `migrate_pages`, a truncation), at the entry of the address-space
    /// calls (`mmap`, `munmap`, `fork`, a new address space), and by the
    /// audit.
    ///
    /// An address space is on the list once while it has parked
    /// references: its `asyncPuts` goes from zero only through here, after
    /// it was taken off the list, so a put racing the drain either adds to
    /// the count the drain is about to take or queues it again.
    func drainAsyncMMPuts() {
        guard asyncMMPutCount.load(ordering: .acquiring) > 0 else { return }
        var parked: [Unmanaged<AddressSpace>] = []
        asyncMMPuts.withLock { list in
            swap(&parked, &list)
            asyncMMPutCount.store(0, ordering: .releasing)
        }
        for mm in parked {
            // The parked references keep it alive until the last release below.
            let n = mm._withUnsafeGuaranteedRef { $0.asyncPuts.exchange(0, ordering: .acquiringAndReleasing) }
            for _ in 0..<n { mm.release() }
        }
    }

    /// Records that address-space id `id` belongs to `family` (its `anon_vma`
    /// tree), for as long as the family lives: not only while the address
    /// space does. A folio's rmap names the address space that last mapped
    /// it, and keeps naming it while that address space exits (a weak
    /// reference to it reads nil as soon as its teardown starts) and after,
    /// while the rest of its family may still map the folio. Dead families'
    /// entries are dropped as new ones come.
    func registerAnonFamily(_ family: AnonFamily, id: UInt32) {
        anonFamilies.withLock { r in
            if r.count >= 64 && r.count.nonzeroBitCount == 1 { r = r.filter { $0.value.value != nil } }
            r[id] = WeakAnonFamily(value: family)
        }
    }
    /// The fork family of address-space id `id` (live, exiting or gone),
    /// while any member of it lives.
    func anonFamily(of id: UInt32) -> AnonFamily? { anonFamilies.withLock { $0[id]?.value } }

    /// A new file id (never 0: a page with mapping id 0 has no mapping).
    func reserveFileID() -> UInt32 { files.reserveID() }
    func register(_ file: File) { files.insert(file, id: file.id) }
    func unregisterFile(_ id: UInt32) { files.remove(id) }
    func file(id: UInt32) -> File? { files.lookup(id) }
}

/// Objects by id, held weakly: what a folio's rmap id names (an address
/// space, or a file) is found here while it lives. Ids start at 1 and are
/// never reused.
final class WeakRegistry<Object: AnyObject & Sendable>: @unchecked Sendable {
    private struct Entry { weak var object: Object? }
    private let state = LockedValue<(next: UInt32, live: [UInt32: Entry])>((1, [:]))

    func reserveID() -> UInt32 {
        state.withLock { s in
            let id = s.next
            s.next += 1
            return id
        }
    }
    func insert(_ object: Object, id: UInt32) { state.withLock { $0.live[id] = Entry(object: object) } }
    func remove(_ id: UInt32) { state.withLock { _ = $0.live.removeValue(forKey: id) } }
    func lookup(_ id: UInt32) -> Object? { state.withLock { $0.live[id]?.object } }
    /// The live objects, in id order.
    func all() -> [Object] { state.withLock { s in s.live.sorted { $0.key < $1.key }.compactMap { $0.value.object } } }
}

struct WeakAnonFamily {
    weak var value: AnonFamily?
}
