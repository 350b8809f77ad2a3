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
/// generation: a walk takes a snapshot of the VMAs it needs, visits them
/// without any lock of the family (the visits take page-table locks, call
/// MMU notifiers and may block), and starts again when the generation moved
/// meanwhile, so that a VMA linked during its visits (a child's, a moved
/// one) is not missed. Visits are idempotent (they act only on entries that
/// still name the page), so a second pass only finds what the first missed.
/// The snapshot comes from a copy of up to eight entries that readers take
/// without the lock (a seqlock: the generation is odd while the copy
/// changes, and a reader that sees it move takes the lock instead), so the
/// per-folio walks of a migration write no shared word.
///
/// A folio's rmap may keep naming an address space that is exiting or has
/// gone: the kernel keeps every member id's family for as long as the
/// family lives (`Kernel.anonFamily(of:)`), as an anon_vma outlives the mm
/// that made it.
final class AnonFamily: @unchecked Sendable {
    private let entries = LockedValue<[AnonMappingEntry]>([])
    /// The seqlock: word 0 the generation (advanced by 2 per change of the
    /// list, odd while the copy changes), word 1 the entries copied (or
    /// `UInt64.max` when the list holds more than `copied`), then each
    /// entry as 4 words. Written under the list's lock; read with atomic
    /// loads, never a store.
    private let mirror: UnsafeMutablePointer<UInt64>
    private static let copied = 8
    private static let mirrorWords = 2 + 4 * copied

    init() {
        mirror = .allocate(capacity: AnonFamily.mirrorWords)
        mirror.initialize(repeating: 0, count: AnonFamily.mirrorWords)
    }
    deinit { mirror.deallocate() }

    /// Makes `wanted` the VMAs of address space `mmID` (`anon_vma_clone()`,
    /// `unlink_anon_vmas()`, `vma_adjust()`): entries that did not change
    /// keep their place, new ones go to the end in the order given, gone
    /// ones are dropped. Caller holds that address space's mmap lock for
    /// writing.
    func relink(mmID: UInt32, _ wanted: [AnonMappingEntry]) {
        let keep = Set(wanted)
        entries.withLock { list in
            var had = Set<AnonMappingEntry>()
            let before = list.count
            list.removeAll { e in
                guard e.mmID == mmID else { return false }
                if keep.contains(e) { had.insert(e); return false }
                return true
            }
            var changed = list.count != before
            for e in wanted where !had.contains(e) {
                list.append(e)
                changed = true
            }
            if changed { publish(list) }
        }
    }

    /// Copies `list` into the seqlock. Caller holds the list's lock.
    private func publish(_ list: [AnonMappingEntry]) {
        let generation = svm_load64_relaxed(mirror)
        svm_store64(mirror, generation &+ 1)
        let n = list.count <= AnonFamily.copied ? list.count : 0
        svm_store64(mirror + 1, list.count <= AnonFamily.copied ? UInt64(n) : .max)
        for i in 0..<n {
            let w = mirror + 2 + 4 * i, e = list[i]
            svm_store64(w, UInt64(e.mmID))
            svm_store64(w + 1, e.start)
            svm_store64(w + 2, e.end)
            svm_store64(w + 3, e.pageOffset)
        }
        svm_store64(mirror, generation &+ 2)
    }

    /// The generation of the list (advanced by every change; odd while the
    /// lock-free copy changes).
    @inline(__always) var generation: UInt64 { svm_load64(mirror) }

    /// Whether `entry` is linked: for the audit.
    func contains(_ entry: AnonMappingEntry) -> Bool { entries.withLock { $0.contains(entry) } }

    /// Adds to `hits` every VMA whose pages overlap linear pages
    /// `[first, last)`, in link order; returns the generation of the list
    /// it read. Without the lock from the copy when it is stable and
    /// complete, else under the lock. The caller visits them without either.
    @inline(__always)
    func collect(overlapping first: UInt64, _ last: UInt64, into hits: inout AnonRmapHits) -> UInt64 {
        let seen = svm_load64(mirror)
        if seen & 1 == 0 {
            let n = svm_load64(mirror + 1)
            if n <= UInt64(AnonFamily.copied) {
                for i in 0..<Int(n) {
                    let w = mirror + 2 + 4 * i
                    let e = AnonMappingEntry(mmID: UInt32(truncatingIfNeeded: svm_load64(w)), start: svm_load64(w + 1),
                                             end: svm_load64(w + 2), pageOffset: svm_load64(w + 3))
                    if e.overlaps(first, last) { hits.append(e) }
                }
                // Acquire loads: the entries were read before this check.
                if svm_load64(mirror) == seen { return seen }
                hits = AnonRmapHits()
            }
        }
        return entries.withLock { list -> UInt64 in
            for e in list where e.overlaps(first, last) { hits.append(e) }
            return svm_load64(mirror)
        }
    }
}

/// The VMAs one pass of an rmap walk visits: four inline (no allocation for
/// a folio mapped by up to four VMAs of its family), the rest in an array.
struct AnonRmapHits {
    private(set) var count = 0
    private var e0 = AnonRmapHits.unused, e1 = AnonRmapHits.unused, e2 = AnonRmapHits.unused, e3 = AnonRmapHits.unused
    private var more: [AnonMappingEntry] = []
    private static let unused = AnonMappingEntry(mmID: 0, start: 0, end: 0, pageOffset: 0)

    @inline(__always) mutating func append(_ e: AnonMappingEntry) {
        switch count {
        case 0: e0 = e
        case 1: e1 = e
        case 2: e2 = e
        case 3: e3 = e
        default: more.append(e)
        }
        count += 1
    }
    @inline(__always) subscript(i: Int) -> AnonMappingEntry {
        switch i {
        case 0: e0
        case 1: e1
        case 2: e2
        case 3: e3
        default: more[i - 4]
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
        let index = head.index
        // Borrowed throughout: address spaces and families are held weakly
        // by the registries, so each retain would take the slow side-table
        // path (per folio, on every migration).
        let kernel = Unmanaged.passUnretained(self)
        let hintRef = hint.map { Unmanaged.passUnretained($0) }
        if let hintRef, hintRef._withUnsafeGuaranteedRef({ $0.id }) == mmID {
            Kernel.rmapWalkAnon(kernel, hintRef._withUnsafeGuaranteedRef { $0.anonFamilyRef }, index, pages, hintRef, nil, body)
            return
        }
        if let named = addressSpace(id: mmID) {
            withExtendedLifetime(named) {
                Kernel.rmapWalkAnon(kernel, named.anonFamilyRef, index, pages, hintRef, Unmanaged.passUnretained(named), body)
            }
            return
        }
        // The address space the rmap names is exiting or gone; its family
        // (like an anon_vma, which outlives the mm that made it) may still
        // map the folio.
        guard let family = anonFamily(of: mmID) else { return }
        withExtendedLifetime(family) {
            Kernel.rmapWalkAnon(kernel, Unmanaged.passUnretained(family), index, pages, hintRef, nil, body)
        }
    }

    /// The walk proper over `family`; `hint` and `named` are address spaces
    /// the caller keeps alive, visited without a registry lookup. Static,
    /// with the kernel unretained: nothing is reference counted per folio.
    @inline(__always)
    private static func rmapWalkAnon(_ kernel: Unmanaged<Kernel>, _ family: Unmanaged<AnonFamily>, _ index: UInt64,
                                     _ pages: Range<Int>, _ hint: Unmanaged<AddressSpace>?,
                                     _ named: Unmanaged<AddressSpace>?, _ body: (Int, AddressSpace, UInt64) -> Void) {
        let first = index &+ UInt64(pages.lowerBound), last = index &+ UInt64(pages.upperBound)
        let hintID = hint.map { $0._withUnsafeGuaranteedRef { $0.id } } ?? 0
        let namedID = named.map { $0._withUnsafeGuaranteedRef { $0.id } } ?? 0
        while true {
            var hits = AnonRmapHits()
            let seen = family._withUnsafeGuaranteedRef { $0.collect(overlapping: first, last, into: &hits) }
            for h in 0..<hits.count {
                let e = hits[h]
                if e.mmID == hintID, let hint {
                    hint._withUnsafeGuaranteedRef { mm in rmapVisit(e, mm, index, pages, body) }
                } else if e.mmID == namedID, let named {
                    named._withUnsafeGuaranteedRef { mm in rmapVisit(e, mm, index, pages, body) }
                } else if let mm = kernel._withUnsafeGuaranteedRef({ $0.addressSpace(id: e.mmID) }) {
                    rmapVisit(e, mm, index, pages, body)
                }
            }
            if family._withUnsafeGuaranteedRef({ $0.generation }) == seen { return }
        }
    }

    /// `rmap_one` of one VMA: every page of `pages` it maps.
    @inline(__always)
    private static func rmapVisit(_ e: AnonMappingEntry, _ mm: AddressSpace, _ index: UInt64, _ pages: Range<Int>,
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
