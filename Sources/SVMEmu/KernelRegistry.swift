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
            strong = nil
            return
        }
        asyncMMPuts.withLock { list in
            if !list.contains(where: { $0.id == id }) {
                list.append(strong!)
                asyncMMPutCount.add(1, ordering: .releasing)
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
        guard asyncMMPutCount.load(ordering: .acquiring) > 0 else { return }
        var parked: [AddressSpace] = []
        asyncMMPuts.withLock { list in
            swap(&parked, &list)
            asyncMMPutCount.store(0, ordering: .releasing)
        }
        parked.removeAll()
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
