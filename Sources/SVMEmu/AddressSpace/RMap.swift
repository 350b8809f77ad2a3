import CSVMSupport
import Synchronization

/// One VMA as the anon rmap sees it (an `anon_vma_chain` in its anon_vma's
/// interval tree): address space `mmID` (`mm`, its kernel view, unretained) maps linear
/// page indices `[pageOffset, pageOffset + (end - start) / page size)` at
/// `[start, end)`. A snapshot of the VMA, refreshed under its mmap lock
/// held for writing whenever the VMA appears, changes bounds or goes.
///
/// `mm` is valid while the entry is linked and the family's lock is held:
/// the address space unlinks its entries, under that lock held for
/// writing, in its `exit_mmap()`, and its kernel view outlives that
/// (``MMStruct`` keeps it until `mmdrop()`).
struct AnonMappingEntry: Hashable {
    let mm: Unmanaged<AddressSpace>
    let mmID: UInt32
    let start: UInt64
    let end: UInt64
    let pageOffset: UInt64

    init(mm: AddressSpace, start: UInt64, end: UInt64, pageOffset: UInt64) {
        self.mm = mm.state.kernelViewRef
        mmID = mm.id
        self.start = start
        self.end = end
        self.pageOffset = pageOffset
    }

    // Ids are never reused: the id stands for the address space.
    static func == (l: AnonMappingEntry, r: AnonMappingEntry) -> Bool {
        l.mmID == r.mmID && l.start == r.start && l.end == r.end && l.pageOffset == r.pageOffset
    }
    func hash(into h: inout Hasher) {
        h.combine(mmID)
        h.combine(start)
        h.combine(end)
        h.combine(pageOffset)
    }

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
/// links the moved VMA after the old one.
///
/// The list changes only under `lock` held for writing (`anon_vma_lock_write()`),
/// which every change of a member's VMAs takes under that member's mmap
/// lock, its exit included. A walk holds `lock` for reading from the
/// lookup of the VMAs to the end of its visits (`anon_vma_lock_read()`):
/// the VMAs cannot change under it, and an address space it reaches
/// cannot be freed under it (its exit unlinks its VMAs first, and waits
/// for the walk). A walk pins no address space (`rmap_walk_anon()` takes
/// neither `mmget()` nor `mmgrab()`): it reaches each one's kernel view
/// unretained, so it never holds a user reference and never runs an exit;
/// the exit runs on the thread that dropped the last user reference.
/// The exit zaps its mappings while still linked: the walk and the zap
/// meet under the page-table locks, and the walk acts only on entries that
/// still name the folio.
///
/// A folio's rmap may keep naming an address space that is exiting or has
/// gone: the kernel keeps every member id's family for as long as the
/// family lives (`Kernel.anonFamily(of:)`), as an anon_vma outlives the mm
/// that made it.
final class AnonFamily: @unchecked Sendable {
    /// `anon_vma->root->rwsem`: a scheduling point under a
    /// ``DeterministicScheduler``; lock order: folio lock, then this, then
    /// page-table locks; mmap lock, then this.
    let lock = KernelRWSemaphore("anon_vma lock", prefersWriters: false, lockClass: .anonVMA)
    /// The list in link order, changed under `lock` held for writing.
    private let entries = LockedValue<[AnonMappingEntry]>([])
    /// The same list as walks read it under `lock` held for reading, with
    /// no reference counting: a count and a table (reallocated, under
    /// `lock` held for writing, when it outgrows its capacity).
    private let published: UnsafeMutablePointer<Published>
    struct Published {
        var count = 0
        var capacity = 0
        var table: UnsafeMutablePointer<AnonMappingEntry>? = nil
    }

    init() {
        published = .allocate(capacity: 1)
        published.initialize(to: Published())
    }
    deinit {
        published.pointee.table?.deallocate()
        published.deallocate()
    }

    /// Makes `wanted` the VMAs of address space `mmID` (`anon_vma_clone()`,
    /// `unlink_anon_vmas()`, `vma_adjust()`): entries that did not change
    /// keep their place, new ones go to the end in the order given, gone
    /// ones are dropped. Caller holds that address space's mmap lock for
    /// writing; takes `lock` for writing, so it waits for the walks in
    /// progress.
    func relink(mmID: UInt32, _ wanted: [AnonMappingEntry]) {
        let keep = Set(wanted)
        lock.downWrite()
        defer { lock.upWrite() }
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

    /// Copies `list` into `published`. Caller holds `lock` for writing.
    private func publish(_ list: [AnonMappingEntry]) {
        var p = published.pointee
        if list.count > p.capacity {
            p.table?.deallocate()
            p.capacity = max(8, list.count * 2)
            p.table = .allocate(capacity: p.capacity)
        }
        for (i, e) in list.enumerated() { (p.table! + i).initialize(to: e) }
        p.count = list.count
        published.pointee = p
    }

    /// Whether `entry` is linked: for the audit.
    func contains(_ entry: AnonMappingEntry) -> Bool { entries.withLock { $0.contains(entry) } }

    /// Calls `visit` with every linked VMA whose pages overlap linear pages
    /// `[first, last)`, in link order, holding `lock` for reading
    /// (`anon_vma_lock_read()` ... `anon_vma_unlock_read()`). `visit` may
    /// take page-table locks, call MMU notifiers and sleep; it must not
    /// take an mmap lock, nor change any member's VMAs.
    @inline(__always)
    func forEachOverlapping(_ first: UInt64, _ last: UInt64, file: StaticString = #fileID, line: UInt = #line,
                            _ visit: (AnonMappingEntry) -> Void) {
        lock.downRead(file: file, line: line)
        defer { lock.upRead() }
        let p = published.pointee
        guard let table = p.table else { return }
        for i in 0..<p.count {
            let e = table[i]
            if e.overlaps(first, last) { visit(e) }
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
        // PageAnonExclusive: of the head only for a PMD mapping (a split
        // hands it to every page, mapSplitFolio), of every page otherwise.
        if pmdMapped {
            head.setFlags(PageFlags.anonExclusive.rawValue)
        } else {
            for i in 0..<folio.pageCount { kernel.metaPtr(folio.pfn + UInt64(i)).setFlags(PageFlags.anonExclusive.rawValue) }
        }
        if pmdMapped {
            folio.atomicEntireMapcount.wrappingAdd(1, ordering: .acquiringAndReleasing)
            folio.largeMapcountAdd(1)
        } else {
            for i in 0..<folio.pageCount { folio.page(i).atomicMapcount.wrappingAdd(1, ordering: .acquiringAndReleasing) }
            folio.largeMapcountAdd(Int32(folio.pageCount))
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
        // The kernel sets the anon mapping only on a folio that is not anon
        // yet (`__folio_set_anon()`); an anon folio is left as it is.
        if !folio.isAnon { folio.set(.anon) }
        if exclusive { page.meta.setFlags(PageFlags.anonExclusive.rawValue) }
        page.atomicMapcount.wrappingAdd(1, ordering: .acquiringAndReleasing)
        folio.largeMapcountAdd(1)
    }

    /// `folio_add_anon_rmap_pmd()`; the folio keeps its index, as in
    /// ``addAnonRmap(page:address:exclusive:)``. Caller holds the PMD lock
    /// of `address`.
    func addEntireAnonRmap(_ folio: Folio, address: UInt64, exclusive: Bool) {
        assertPMDLockHeld(address, "folio_add_anon_rmap_pmd: PMD lock not held")
        folio.meta.mappingMM = id
        folio.set(.anon)
        // RMAP_LEVEL_PMD: the head page carries PageAnonExclusive for the whole mapping.
        if exclusive { folio.meta.setFlags(PageFlags.anonExclusive.rawValue) }
        folio.atomicEntireMapcount.wrappingAdd(1, ordering: .acquiringAndReleasing)
        folio.largeMapcountAdd(1)
    }

    /// `folio_remove_rmap_pte()`: the page keeps `folio->mapping` until freed.
    @inlinable func removeRmap(page: Page) {
        let n = page.atomicMapcount.wrappingAdd(-1, ordering: .acquiringAndReleasing).newValue
        if n < 0 {
            page.atomicMapcount.store(0, ordering: .releasing)
            kernel.warn("folio_remove_rmap_pte: mapcount underflow", "\(page)", kind: .referenceCount)
            return
        }
        page.folio.largeMapcountAdd(-1)
    }
    /// `folio_remove_rmap_pmd()`.
    func removeEntireRmap(_ folio: Folio) {
        let n = folio.atomicEntireMapcount.wrappingAdd(-1, ordering: .acquiringAndReleasing).newValue
        if n < 0 {
            folio.atomicEntireMapcount.store(0, ordering: .releasing)
            kernel.warn("folio_remove_rmap_pmd: entire mapcount underflow", "\(folio)", kind: .referenceCount)
            return
        }
        folio.largeMapcountAdd(-1)
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
            entries.append(AnonMappingEntry(mm: self, start: v.start, end: v.end, pageOffset: v.pageOffset))
        }
        anonFamily.relink(mmID: id, entries)
    }
}

extension Kernel {
    /// Calls `body(i, mm, address)` for every place page `i` of `pages` of
    /// the anonymous `folio` may be mapped (`rmap_walk_anon()`): each VMA of
    /// its fork family whose pages include the page's linear index, at the
    /// address that VMA maps it at (`vma_address()`), VMA by VMA in link
    /// order. `hint` is an address space the caller holds (when the
    /// folio's rmap names it, its family is found with no registry lookup).
    /// `body` checks the entry under its page-table lock and acts only on
    /// one that names the page.
    ///
    /// The walk holds the family's lock for reading throughout
    /// (`folio_lock_anon_vma_read()`) and pins no address space: each is
    /// reached through its kernel view, unretained, which the lock keeps
    /// valid (an exit unlinks the VMAs under it first): `mm` is valid only inside
    /// `body`, which must not keep it (record its id instead), must not
    /// take an mmap lock and must not change VMAs. An address space that is
    /// exiting may be visited (its zap and `body` meet under the page-table
    /// locks).
    ///
    /// The caller holds the folio lock (so the folio keeps its rmap) and
    /// no page-table lock. Nothing happens for a page-cache folio (its
    /// mappings are its file's) or one with no anonymous rmap.
    @inline(__always)
    func rmapWalkAnon(_ folio: Folio, pages: Range<Int>, hint: AddressSpace?,
                      file: StaticString = #fileID, line: UInt = #line,
                      _ body: (Int, AddressSpace, UInt64) -> Void) {
        let head = folio.meta
        let mmID = head.mappingMM
        guard mmID != 0, !pages.isEmpty, !head.test(PageFlags.pageCache.rawValue) else { return }
        let index = head.index
        // Unmanaged, and never bound strongly: an address space has a side
        // table (its registry entry is weak), so every retain of it is the
        // runtime's slow path, and this runs once per folio of a migration.
        let hintRef = hint.map { Unmanaged.passUnretained($0) }
        if let hintRef, hintRef._withUnsafeGuaranteedRef({ $0.id }) == mmID {
            rmapWalkAnon(hintRef._withUnsafeGuaranteedRef { $0.anonFamilyRef }, index, pages, file, line, body)
            return
        }
        // The family of the address space the rmap names, live, exiting or
        // gone (like an anon_vma, which outlives the mm that made it).
        guard let family = anonFamily(of: mmID) else { return }
        withExtendedLifetime(family) {
            rmapWalkAnon(Unmanaged.passUnretained(family), index, pages, file, line, body)
        }
    }

    /// The walk proper over `family`, with the family unretained. Each
    /// address space visited is reached through its entry's kernel view,
    /// unretained and unpinned: its exit waits for the family's lock
    /// before it unlinks the entry.
    @inline(__always)
    private func rmapWalkAnon(_ family: Unmanaged<AnonFamily>, _ index: UInt64, _ pages: Range<Int>,
                              _ file: StaticString, _ line: UInt,
                              _ body: (Int, AddressSpace, UInt64) -> Void) {
        let first = index &+ UInt64(pages.lowerBound), last = index &+ UInt64(pages.upperBound)
        family._withUnsafeGuaranteedRef { f in
            f.forEachOverlapping(first, last, file: file, line: line) { e in
                e.mm._withUnsafeGuaranteedRef { mm in
                    mmHooks.visiting(mm)
                    Kernel.rmapVisit(e, mm, index, pages, body)
                }
            }
        }
    }

    /// `rmap_one` of one VMA: every page of `pages` it maps.
    @inline(__always)
    static func rmapVisit(_ e: AnonMappingEntry, _ mm: AddressSpace, _ index: UInt64, _ pages: Range<Int>,
                                  _ body: (Int, AddressSpace, UInt64) -> Void) {
        for i in pages {
            let pageIndex = index &+ UInt64(i)
            if e.maps(pageIndex) { body(i, mm, e.address(of: pageIndex)) }
        }
    }

    /// Runs `act` at the first place the rmap walk of page `i` of `folio`
    /// visits where `accept` holds, inside the walk (the address space is
    /// valid only there), and returns what it returned; nil when no place
    /// was accepted. For callers that act on one mapping (a PMD to split,
    /// the page-table lock of a split); the caller holds the folio lock.
    func rmapFirst<R>(_ folio: Folio, page i: Int, hint: AddressSpace?,
                      where accept: (AddressSpace, UInt64) -> Bool,
                      _ act: (AddressSpace, UInt64) -> R) -> R? {
        var result: R? = nil
        rmapWalkAnon(folio, pages: i..<(i + 1), hint: hint) { _, mm, address in
            if result == nil && accept(mm, address) { result = act(mm, address) }
        }
        return result
    }

    /// Where an anonymous page is mapped, from its rmap: an address space
    /// of its fork family and the address whose page-table entry (PTE, or
    /// the PMD of a 2 MiB mapping; present, device-private,
    /// device-exclusive or migration) names it, or nil when none does, the
    /// address space is exiting, or the page has no anonymous rmap (a
    /// page-cache page's mappings are its file's). A snapshot taken
    /// without locks, for inspection; the address space is returned as a
    /// user reference taken after the walk, only if it is not exiting
    /// (`mmget_not_zero()`): dropping it is `mmput()`.
    public func rmapAddress(of page: Page) -> (AddressSpace, UInt64)? {
        let folio = page.folio
        let found = rmapFirst(folio, page: Int(page.pfn &- folio.pfn), hint: nil, where: { mm, address in
            let (level, e) = mm.entry(at: address)
            guard e.kind == .present || e.kind == .devicePrivate || e.kind == .deviceExclusive || e.kind == .migration else {
                return false
            }
            return level == .pmd ? e.pfn == folio.pfn : e.pfn == page.pfn
        }) { mm, address in (mm.id, address) }
        guard let (id, address) = found, let mm = addressSpace(id: id) else { return nil }
        return (mm, address)
    }
}
