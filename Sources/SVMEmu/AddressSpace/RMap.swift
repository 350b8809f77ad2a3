import CSVMSupport
import Synchronization

/// One VMA as the anon rmap sees it (an `anon_vma_chain` in its anon_vma's
/// interval tree): address space `mmID` maps linear page indices
/// `[pageOffset, pageOffset + (end - start) / page size)` at `[start, end)`.
/// A snapshot of the VMA, refreshed under its mmap lock held for writing
/// whenever the VMA appears, changes bounds or goes.
struct AnonMappingEntry: Hashable {
    let mmID: UInt32
    let start: UInt64
    let end: UInt64
    let pageOffset: UInt64

    /// Whether linear page `index` lies in the VMA (`index - pageOffset`
    /// wraps for an index below it).
    @inline(__always) func maps(_ index: UInt64) -> Bool {
        index &- pageOffset < (end &- start) >> PageGeometry.pageShift
    }
    /// Whether any of the linear pages `[first, last)` lies in the VMA.
    @inline(__always) func overlaps(_ first: UInt64, _ last: UInt64) -> Bool {
        pageOffset < last && first < pageOffset &+ ((end &- start) >> PageGeometry.pageShift)
    }
    /// The address at which the VMA maps linear page `index` (which it maps).
    ///
    /// The corresponding kernel function is `vma_address()`.
    @inline(__always) func address(of index: UInt64) -> UInt64 {
        start &+ ((index &- pageOffset) << PageGeometry.pageShift)
    }
}

/// The anonymous memory of one fork tree (the emulator's `anon_vma`, one
/// for the whole tree): the VMAs of every member address space that may
/// map its folios, in the order they were linked.
///
/// A folio's rmap names one member (`folio->mapping`) and records its
/// linear page index (`folio->index`); a walk visits every VMA whose pages
/// include that index, at the address that VMA maps it at
/// (`rmap_walk_anon()`), and keeps the entries that name the folio's page.
/// Every member but the first joined by `fork()` (`anon_vma_fork()`), its
/// VMAs linked before any entry is copied and after the parent's; `mremap()`
/// links the moved VMA after the old one. A walk therefore meets an entry
/// that fork or mremap copies or moves at its source before its
/// destination, and finds it at one of the two (the ordering the kernel
/// relies on when it moves page tables without `take_rmap_locks()`).
///
/// The list changes under its own lock and each change advances a
/// generation: a walk takes a snapshot of the VMAs it needs under the lock,
/// visits them without it (the visits take page-table locks, call MMU
/// notifiers and may block), and starts again when the generation moved
/// meanwhile, so that a VMA linked during its visits (a child's, a moved
/// one) is not missed. Visits are idempotent (they act only on entries that
/// still name the page), so a second pass only finds what the first missed.
///
/// A folio's rmap may keep naming an address space that is exiting or has
/// gone: the kernel keeps every member id's family for as long as the
/// family lives (`Kernel.anonFamily(of:)`), as an anon_vma outlives the mm
/// that made it.
final class AnonFamily: @unchecked Sendable {
    private struct State {
        var entries: [AnonMappingEntry] = []
        var generation: UInt64 = 0
    }
    private let state = LockedValue<State>(State())
    /// `State.generation`, readable without the lock.
    private let published = Atomic<UInt64>(0)

    /// Makes `wanted` the VMAs of address space `mmID` (`anon_vma_clone()`,
    /// `unlink_anon_vmas()`, `vma_adjust()`): entries that did not change
    /// keep their place, new ones go to the end in the order given, gone
    /// ones are dropped. Caller holds that address space's mmap lock for
    /// writing.
    func relink(mmID: UInt32, _ wanted: [AnonMappingEntry]) {
        let keep = Set(wanted)
        state.withLock { s in
            var had = Set<AnonMappingEntry>()
            let before = s.entries.count
            s.entries.removeAll { e in
                guard e.mmID == mmID else { return false }
                if keep.contains(e) { had.insert(e); return false }
                return true
            }
            var changed = s.entries.count != before
            for e in wanted where !had.contains(e) {
                s.entries.append(e)
                changed = true
            }
            if changed {
                s.generation &+= 1
                published.store(s.generation, ordering: .releasing)
            }
        }
    }

    /// The generation of the list (advanced by every change).
    @inline(__always) var generation: UInt64 { published.load(ordering: .acquiring) }

    /// Whether `entry` is linked: for the audit.
    func contains(_ entry: AnonMappingEntry) -> Bool { state.withLock { $0.entries.contains(entry) } }

    /// Calls `body` with every VMA whose pages overlap linear pages
    /// `[first, last)`, in link order, from a snapshot taken under the lock;
    /// `body` runs without it. Returns the generation of that snapshot.
    /// Allocates nothing when at most eight VMAs match.
    @inline(__always)
    func forEach(overlapping first: UInt64, _ last: UInt64, _ body: (AnonMappingEntry) -> Void) -> UInt64 {
        withUnsafeTemporaryAllocation(of: AnonMappingEntry.self, capacity: 8) { buffer -> UInt64 in
            var n = 0
            var more: [AnonMappingEntry] = []
            let generation = state.withLock { s -> UInt64 in
                for e in s.entries where e.overlaps(first, last) {
                    if n < buffer.count { buffer.initializeElement(at: n, to: e); n += 1 } else { more.append(e) }
                }
                return s.generation
            }
            for i in 0..<n { body(buffer[i]) }
            for e in more { body(e) }
            return generation
        }
    }
}

/// The reverse map: for anonymous memory a folio records the address space
/// that maps it and its linear page index (like `folio->mapping` = anon_vma
/// plus `folio->index`); each VMA of that address space's ``AnonFamily``
/// that covers the index maps it at its own address (`vma_address()`).
extension AddressSpace {
    /// A new anonymous folio gets its rmap (`folio_add_new_anon_rmap()`,
    /// with `__folio_set_anon()`): this address space, the linear index
    /// `vma` gives `address`, exclusive, swap-backed, on the LRU, mapped
    /// once (by PTEs, or entirely by a PMD). `address` is the folio's
    /// first page's.
    func addNewAnonRmap(_ folio: Folio, _ vma: VMA, address: UInt64, pmdMapped: Bool) {
        let head = folio.meta
        head.mappingMM = id
        head.index = vma.linearPageIndex(address)
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
    /// (`folio_add_anon_rmap_pte()` in `remove_migration_pte()`). The folio
    /// keeps its index (a migration's destination took the source's, in
    /// `folio_migrate_mapping()`); its rmap now names this address space,
    /// a member of the same family. Caller holds the PTE lock of `address`.
    func addAnonRmap(page: Page, address: UInt64, exclusive: Bool) {
        assertPTLHeld(address, "folio_add_anon_rmap_pte: PTE lock not held")
        let folio = page.folio
        folio.meta.mappingMM = id
        folio.set(.anon)
        if exclusive { page.meta.setFlags(PageFlags.anonExclusive.rawValue) }
        page.atomicMapcount.wrappingAdd(1, ordering: .acquiringAndReleasing)
    }

    /// `folio_add_anon_rmap_pmd()`; the folio keeps its index, as in
    /// ``addAnonRmap(page:address:exclusive:)``. Caller holds the PMD lock
    /// of `address`.
    func addEntireAnonRmap(_ folio: Folio, address: UInt64, exclusive: Bool) {
        assertPMDLockHeld(address, "folio_add_anon_rmap_pmd: PMD lock not held")
        folio.meta.mappingMM = id
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

    /// Makes this address space's entries in its family's anon rmap those
    /// of its current VMAs (`anon_vma_clone()`, `unlink_anon_vmas()`, and
    /// the interval-tree updates of `vma_adjust()`); new ones are linked
    /// after every existing one. Caller holds the mmap lock for writing and
    /// calls it after every change of its VMAs' bounds: a map, an unmap, a
    /// split, a move, a growth, a fork's copy (before its entries are
    /// copied), the exit.
    func relinkAnonMappings() {
        var entries: [AnonMappingEntry] = []
        entries.reserveCapacity(vmas.count)
        for v in vmas where v.isInAnonRmap {
            entries.append(AnonMappingEntry(mmID: id, start: v.start, end: v.end, pageOffset: v.pageOffset))
        }
        anonFamily.relink(mmID: id, entries)
    }
}

extension Kernel {
    /// Calls `body(i, mm, address)` for every place page `i` of `pages` of
    /// the anonymous `folio` may be mapped (`rmap_walk_anon()`): each VMA of
    /// its fork family whose pages include the page's linear index, at the
    /// address that VMA maps it at (`vma_address()`), VMA by VMA in link
    /// order. `hint` is an address space the caller already holds (its
    /// VMAs are visited with no registry lookup); members that are exiting
    /// or gone are skipped. `body` checks the entry under its page-table
    /// lock and acts only on one that names the page, so it may be called
    /// again for the same place: a walk that overlapped a change of the
    /// family's VMAs (a fork, an mremap) runs again.
    ///
    /// The caller holds the folio lock (so the folio keeps its rmap) and
    /// no page-table lock. Nothing happens for a page-cache folio (its
    /// mappings are its file's) or one with no anonymous rmap.
    @inline(__always)
    func rmapWalkAnon(_ folio: Folio, pages: Range<Int>, hint: AddressSpace?,
                      _ body: (Int, AddressSpace, UInt64) -> Void) {
        let head = folio.meta
        let mmID = head.mappingMM
        guard mmID != 0, !pages.isEmpty, !head.test(PageFlags.pageCache.rawValue) else { return }
        let hintID = hint?.id ?? 0
        // Borrowed: `let hint` would copy (retain) the mm per folio.
        if mmID == hintID, let hintRef = hint.map({ Unmanaged.passUnretained($0) }) {
            hintRef._withUnsafeGuaranteedRef { mm in
                rmapWalkAnon(mm.anonFamily, head.index, pages, hintRef, body)
            }
            return
        }
        // The address space the rmap names may be exiting or gone; its
        // family (like an anon_vma, which outlives the mm that made it)
        // may still map the folio.
        guard let family = anonFamily(of: mmID) else { return }
        rmapWalkAnon(family, head.index, pages, hint.map { Unmanaged.passUnretained($0) }, body)
    }

    @inline(__always)
    private func rmapWalkAnon(_ family: AnonFamily, _ index: UInt64, _ pages: Range<Int>, _ hint: Unmanaged<AddressSpace>?,
                              _ body: (Int, AddressSpace, UInt64) -> Void) {
        let first = index &+ UInt64(pages.lowerBound), last = index &+ UInt64(pages.upperBound)
        let hintID = hint.map { $0._withUnsafeGuaranteedRef { $0.id } } ?? 0
        while true {
            let seen = family.forEach(overlapping: first, last) { e in
                if e.mmID == hintID, let hint {
                    hint._withUnsafeGuaranteedRef { mm in rmapVisit(e, mm, index, pages, body) }
                } else if let mm = addressSpace(id: e.mmID) {
                    rmapVisit(e, mm, index, pages, body)
                }
            }
            if family.generation == seen { return }
        }
    }

    /// `rmap_one` of one VMA: every page of `pages` it maps.
    @inline(__always)
    private func rmapVisit(_ e: AnonMappingEntry, _ mm: AddressSpace, _ index: UInt64, _ pages: Range<Int>,
                           _ body: (Int, AddressSpace, UInt64) -> Void) {
        for i in pages {
            let pageIndex = index &+ UInt64(i)
            if e.maps(pageIndex) { body(i, mm, e.address(of: pageIndex)) }
        }
    }

    /// The first place the rmap walk of page `i` of `folio` visits where
    /// `accept` holds (each place once, in walk order), or nil. For
    /// callers that act on one mapping (a PMD to split, the page-table
    /// lock of a split); the caller holds the folio lock.
    func rmapFind(_ folio: Folio, page i: Int, hint: AddressSpace?,
                  where accept: (AddressSpace, UInt64) -> Bool) -> (AddressSpace, UInt64)? {
        var found: (AddressSpace, UInt64)? = nil
        rmapWalkAnon(folio, pages: i..<(i + 1), hint: hint) { _, mm, address in
            if found == nil && accept(mm, address) { found = (mm, address) }
        }
        return found
    }

    /// Where an anonymous page is mapped, from its rmap: an address space
    /// of its fork family and the address whose page-table entry (PTE, or
    /// the PMD of a 2 MiB mapping; present, device-private,
    /// device-exclusive or migration) names it, or nil when none does or
    /// the page has no anonymous rmap (a page-cache page's mappings are
    /// its file's). A snapshot taken without locks, for inspection.
    public func rmapAddress(of page: Page) -> (AddressSpace, UInt64)? {
        let folio = page.folio
        return rmapFind(folio, page: Int(page.pfn &- folio.pfn), hint: nil) { mm, address in
            let (level, e) = mm.entry(at: address)
            guard e.kind == .present || e.kind == .devicePrivate || e.kind == .deviceExclusive || e.kind == .migration else {
                return false
            }
            return level == .pmd ? e.pfn == folio.pfn : e.pfn == page.pfn
        }
    }
}
