import CSVMSupport
import Synchronization

/// The address spaces of one fork tree (the emulator's `anon_vma` tree): a
/// folio's rmap names one of them, and since a forked child maps a shared
/// folio at the same address as its parent, an rmap walk visits every member
/// at that address and keeps the entries that name the folio's page.
///
/// Members join in `AddressSpace.init` (a fork joins its parent's family
/// before any entry is copied, as `anon_vma_fork()` runs before
/// `copy_page_range()`) and leave when the address space goes. A folio's
/// rmap may keep naming an address space that is exiting or has gone: the
/// kernel keeps every member id's family for as long as the family lives
/// (`Kernel.anonFamily(of:)`), as an anon_vma outlives the mm that made it.
final class AnonFamily: @unchecked Sendable {
    private let members = LockedValue<[UInt32]>([])
    /// How many address spaces share it: 1 for one that never forked, which
    /// lets the rmap walks skip the lookup.
    private let memberCount = Atomic<Int>(0)

    func join(_ id: UInt32) {
        members.withLock { $0.append(id) }
        memberCount.add(1, ordering: .releasing)
    }
    func leave(_ id: UInt32) {
        members.withLock { m in m.removeAll { $0 == id } }
        memberCount.subtract(1, ordering: .releasing)
    }
    /// Whether more than one address space may map its folios.
    @inline(__always) var isShared: Bool { memberCount.load(ordering: .acquiring) > 1 }
    /// Whether any address space is still a member.
    var hasMembers: Bool { memberCount.load(ordering: .acquiring) > 0 }
    /// The members' ids, a snapshot.
    var ids: [UInt32] { members.withLock { $0 } }
}

/// The reverse map: for anonymous memory a folio records the address space and
/// the virtual page it is mapped at (like `folio->mapping` = anon_vma plus
/// `folio->index`). Folios shared by fork are found in every member of the
/// recorded address space's ``AnonFamily`` at the same address.
extension AddressSpace {
    /// A new anonymous folio gets its rmap (`folio_add_new_anon_rmap()`): exclusive,
    /// swap-backed, on the LRU, mapped once (by PTEs, or entirely by a PMD).
    func addNewAnonRmap(_ folio: Folio, address: UInt64, pmdMapped: Bool) {
        let head = folio.meta
        head.mappingMM = id
        head.index = address >> PageGeometry.pageShift
        var f: PageFlags = [.anon, .swapBacked, .lru, .uptodate]
        if folio.isZoneDevice { f.remove(.lru) }
        folio.set(f)
        for i in 0..<folio.pageCount { kernel.metaPtr(folio.pfn + UInt64(i)).setFlags(PageFlags.anonExclusive.rawValue) }
        if pmdMapped {
            folio.atomicEntireMapcount.wrappingAdd(1, ordering: .acquiringAndReleasing)
        } else {
            for i in 0..<folio.pageCount { folio.page(i).atomicMapcount.wrappingAdd(1, ordering: .acquiringAndReleasing) }
        }
    }

    /// Re-adds the mapping of one page that was unmapped by a migration entry
    /// (`folio_add_anon_rmap_pte()` in `remove_migration_pte()`).
    /// Caller holds the PTE lock of `address`.
    func addAnonRmap(page: Page, address: UInt64, exclusive: Bool) {
        assertPTLHeld(address, "folio_add_anon_rmap_pte: PTE lock not held")
        let folio = page.folio
        let head = folio.meta
        head.mappingMM = id
        head.index = (address >> PageGeometry.pageShift) - (page.pfn - folio.pfn)
        folio.set(.anon)
        if exclusive { page.meta.setFlags(PageFlags.anonExclusive.rawValue) }
        page.atomicMapcount.wrappingAdd(1, ordering: .acquiringAndReleasing)
    }

    /// `folio_add_anon_rmap_pmd()`. Caller holds the PMD lock of `address`.
    func addEntireAnonRmap(_ folio: Folio, address: UInt64, exclusive: Bool) {
        assertPMDLockHeld(address, "folio_add_anon_rmap_pmd: PMD lock not held")
        let head = folio.meta
        head.mappingMM = id
        head.index = address >> PageGeometry.pageShift
        folio.set(.anon)
        if exclusive {
            for i in 0..<folio.pageCount { kernel.metaPtr(folio.pfn + UInt64(i)).setFlags(PageFlags.anonExclusive.rawValue) }
        }
        folio.atomicEntireMapcount.wrappingAdd(1, ordering: .acquiringAndReleasing)
    }

    /// `folio_remove_rmap_pte()`: the page keeps `folio->mapping` until freed.
    @inlinable func removeRmap(page: Page) {
        let n = page.atomicMapcount.wrappingAdd(-1, ordering: .acquiringAndReleasing).newValue
        if n < 0 {
            page.atomicMapcount.store(0, ordering: .releasing)
            kernel.warn("folio_remove_rmap_pte: mapcount underflow", "\(page)")
        }
    }
    /// `folio_remove_rmap_pmd()`.
    func removeEntireRmap(_ folio: Folio) {
        let n = folio.atomicEntireMapcount.wrappingAdd(-1, ordering: .acquiringAndReleasing).newValue
        if n < 0 {
            folio.atomicEntireMapcount.store(0, ordering: .releasing)
            kernel.warn("folio_remove_rmap_pmd: entire mapcount underflow", "\(folio)")
        }
    }
}

extension Kernel {
    /// Calls `body` with every address space that may map `page` and the
    /// address it would map it at (`rmap_walk_anon()`): the one its rmap
    /// records and, when that one forked, the rest of its fork tree. `hint`
    /// is an address space the caller already holds (no registry lookup for
    /// it). The caller checks each entry under its page-table lock.
    @inline(__always)
    func rmapWalk(_ page: Page, hint: AddressSpace?, _ body: (AddressSpace, UInt64) -> Void) {
        let (mmID, address) = rmapLocation(of: page)
        guard mmID != 0 else { return }
        if hint?.id == mmID, let hintRef = hint.map({ Unmanaged.passUnretained($0) }) {
            // Borrowed: `let hint` would copy (retain) the mm per page.
            hintRef._withUnsafeGuaranteedRef { mm in
                if mm.covers(address) { body(mm, address) }
                if mm.anonFamily.isShared { rmapWalkFamily(mm.anonFamily, except: mmID, address, body) }
            }
            return
        }
        guard let mm = addressSpace(id: mmID) else {
            // The address space the rmap names is exiting or has gone, but
            // its fork family (like an anon_vma, which outlives the mm that
            // made it) may still map the page.
            if let family = anonFamily(of: mmID) { rmapWalkFamily(family, except: mmID, address, body) }
            return
        }
        if mm.covers(address) { body(mm, address) }
        if mm.anonFamily.isShared { rmapWalkFamily(mm.anonFamily, except: mmID, address, body) }
    }

    @inline(never)
    func rmapWalkFamily(_ family: AnonFamily, except mmID: UInt32, _ address: UInt64,
                                _ body: (AddressSpace, UInt64) -> Void) {
        for id in family.ids where id != mmID {
            if let mm = addressSpace(id: id), mm.covers(address) { body(mm, address) }
        }
    }

    /// Where an anonymous page is mapped, from its rmap: (address space, address),
    /// or nil when it has no anonymous mapping recorded (a page-cache page
    /// has none: its mappings are its file's).
    public func rmapAddress(of page: Page) -> (AddressSpace, UInt64)? {
        rmapAddress(of: page, hint: nil)
    }

    /// Where the rmap says `page` is mapped: the address-space id (0: none)
    /// and the address. The per-page rmap walks of try_to_migrate and
    /// remove_migration_ptes compare the id with the mm they already hold and
    /// only look the registry up when it differs, so that the common case
    /// costs neither a lookup nor reference counting.
    @inline(__always)
    func rmapLocation(of page: Page) -> (mmID: UInt32, address: UInt64) {
        let folio = page.folio
        let head = folio.meta
        // A page-cache folio's mapping is its file: walked by rmapWalkFile.
        if head.test(PageFlags.pageCache.rawValue) { return (0, 0) }
        return (head.mappingMM, (head.index &+ (page.pfn &- folio.pfn)) << PageGeometry.pageShift)
    }

    /// With `hint`, the address space a migration already holds (its VMA's mm):
    /// when the page belongs to it, no registry lookup is needed.
    func rmapAddress(of page: Page, hint: AddressSpace?) -> (AddressSpace, UInt64)? {
        let (mmID, address) = rmapLocation(of: page)
        guard mmID != 0 else { return nil }
        if let hint, hint.id == mmID { return (hint, address) }
        if let mm = addressSpace(id: mmID) { return (mm, address) }
        guard let family = anonFamily(of: mmID) else { return nil }
        for id in family.ids { if let mm = addressSpace(id: id), mm.covers(address) { return (mm, address) } }
        return nil
    }
}
