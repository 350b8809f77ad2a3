import CSVMSupport
import Synchronization

/// The kernel's registries: live address spaces and files by id (for the
/// reverse map), the mm references kernel paths take, and anon families.
extension Kernel {
    // MARK: address spaces and files (for the reverse map)

    func reserveAddressSpaceID() -> UInt32 { addressSpaces.reserveID() }
    func register(_ mm: AddressSpace) { addressSpaces.insert(mm, id: mm.id) }
    func unregister(_ id: UInt32) { addressSpaces.remove(id) }

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
