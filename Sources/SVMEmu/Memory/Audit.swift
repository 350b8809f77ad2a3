import Synchronization
import CSVMSupport

/// What ``Kernel/audit(heldReferences:)`` found: the machine's reference,
/// lock and frame invariants at a quiescent point. Zero everywhere but
/// `folios` and `frames` is a clean machine.
public struct KernelAudit: Sendable, Equatable, Codable, CustomStringConvertible {
    /// Folios in use (system and device) whose references were checked.
    public var folios = 0
    /// Frames (base pages of RAM and device memory) classified.
    public var frames = 0
    /// Folios whose reference count is not mappings + held references
    /// (a leaked or a lost reference).
    public var referenceMismatches = 0
    /// Pages whose map count (or folios whose entire map count) is not the
    /// number of page-table entries mapping them.
    public var mapCountMismatches = 0
    /// Folios whose lock is held.
    public var foliosLocked = 0
    /// Kernel locks held: split PTE locks, PMD locks, zone locks, mmap locks.
    public var locksHeld = 0
    /// Folios with references that nothing reaches: no mapping, no deferred
    /// flush, no reference the caller says it holds (a leaked folio).
    public var unreachableFolios = 0
    /// Frames neither on the allocator's free lists nor part of a folio
    /// with references (a frame lost to both sides).
    public var lostFrames = 0
    /// Page-table entries that name a free frame (a use after free).
    public var entriesToFreeFrames = 0
    /// Migration entries left in a page table: every migration restores or
    /// replaces its entries before it returns.
    public var migrationEntries = 0
    /// The allocator's free-page count differs from its free lists.
    public var freeCountMismatches = 0
    /// Anonymous pages mapped where their rmap would not find them: the
    /// page's linear index (`folio->index` plus its place in the folio) is
    /// not the one the mapping VMA gives that address (`linear_page_index()`,
    /// as `__page_check_anon_rmap()` checks), the folio's rmap names an
    /// address space of another fork family, or the VMA is missing from
    /// its family's rmap.
    public var rmapMismatches = 0
    /// The first findings, described (at most 20).
    public var findings: [String] = []

    /// No finding.
    public var isClean: Bool {
        referenceMismatches == 0 && mapCountMismatches == 0 && foliosLocked == 0 && locksHeld == 0
            && unreachableFolios == 0 && lostFrames == 0 && entriesToFreeFrames == 0 && migrationEntries == 0
            && freeCountMismatches == 0 && rmapMismatches == 0
    }

    public var description: String {
        "\(folios) folios, \(frames) frames: \(referenceMismatches) reference mismatches, "
            + "\(mapCountMismatches) map-count mismatches, \(foliosLocked) folios locked, \(locksHeld) locks held, "
            + "\(unreachableFolios) unreachable folios, \(lostFrames) lost frames, "
            + "\(entriesToFreeFrames) entries to free frames, \(migrationEntries) migration entries, "
            + "\(freeCountMismatches) free-count mismatches, \(rmapMismatches) rmap mismatches"
            + (findings.isEmpty ? "" : "; " + findings.joined(separator: "; "))
    }

    mutating func note(_ finding: @autoclosure () -> String) {
        if findings.count < 20 { findings.append(finding()) }
    }
}

extension Kernel {

    /// Checks the machine's invariants: every folio's references are its
    /// mappings plus what is known to be held, no folio lock or kernel lock
    /// is held, every frame is either free (on its allocator's lists)
    /// or reachable (mapped by some address space's page tables, held by
    /// the deferred TLB flush or a file's page cache, the zero pages, or
    /// held by the caller; free hugetlb pool pages count as free frames),
    /// and the rmap of every mapped anonymous page leads to each of its
    /// mappings (its index is the one the mapping VMA's `vm_pgoff` gives
    /// the address, in a VMA its fork family links).
    ///
    /// Call it only at quiescence: no thread may be inside the kernel or
    /// a driver (no fault, migration, access or mmap call in progress), as
    /// at the end of a test or at a soak's barrier. It takes no lock but,
    /// briefly, each file's cache lock and the hugetlb pool lock, and
    /// reads every page table of every live address space, every RAM frame
    /// and every device frame; it changes nothing.
    ///
    /// Device memory: a device frame with no reference belongs to its
    /// driver's free lists (`folio_free` returned it); one with references
    /// must be mapped (device-private entries) or held.
    ///
    /// - Parameters:
    ///   - heldReferences: references the caller holds by the API's rules
    ///     (its own `folio_get`s, ``Folio/pinCountingBias`` per GUP pin),
    ///     by folio head pfn.
    /// - Returns: the counts of each kind of finding and the first few described.
    ///
    /// There is no single corresponding kernel function: it is what
    /// `CONFIG_DEBUG_VM`'s `bad_page()` checks, `page_owner` and
    /// lockdep's `debug_check_no_locks_held()` check piecemeal.
    public func audit(heldReferences: [UInt64: Int] = [:]) -> KernelAudit {
        var a = KernelAudit()
        // 1. Every mapping of every live address space.
        var refs: [UInt64: Int] = [:]          // folio head -> mappings (each holds a reference)
        var pteMaps: [UInt64: Int32] = [:]     // page -> PTE mappings
        var entireMaps: [UInt64: Int32] = [:]  // folio head -> PMD mappings
        var mapped: [UInt64] = []              // every page named by an entry
        // The address spaces it walks, each pinned (mmget_not_zero(), as
        // /proc's readers do): none starts its exit under the walk (a
        // user reference dropped on another thread meanwhile is not the
        // last). Then the exits already running (users at zero, not
        // pinned) are waited for, at most 10 s, so that no frame is half
        // freed while the frames are counted.
        let spaces = addressSpaces.all().compactMap { addressSpace(id: $0.id) }
        var waited: UInt64 = 0
        while exitsRunning.load(ordering: .acquiring) > 0 && waited < 10_000_000_000 {
            HostClock.sleep(nanos: 100_000)
            waited += 100_000
        }
        for mm in spaces {
            if mm.mmapLock.isLocked { a.locksHeld += 1; a.note("mm \(mm.id): mmap lock held") }
            a.locksHeld += mm.auditLocks(&a)
            var linked: VMA? = nil
            mm.forEachEntry { vma, address, level, e in
                switch e.kind {
                case .migration:
                    a.migrationEntries += 1
                    a.note("mm \(mm.id) 0x\(String(address, radix: 16)): migration entry \(e) at quiescence")
                case .present, .devicePrivate, .deviceExclusive:
                    if e.kind == .present && e.isSpecial { return }
                    guard isValid(pfn: e.pfn) else { return }
                    let head = metaPtr(e.pfn).head
                    if metaPtr(head).test(PageFlags.reserved.rawValue) { return }
                    refs[head, default: 0] += 1
                    if level == .pmd { entireMaps[head, default: 0] += 1 } else { pteMaps[e.pfn, default: 0] += 1 }
                    mapped.append(e.pfn)
                    auditAnonRmap(mm, vma, address, e.pfn, head, checkLink: linked !== vma, &a)
                    linked = vma
                default: return
                }
            }
        }
        var held = heldReferences
        for f in deferredTLB.heldFolios { held[f.pfn, default: 0] += 1 }
        // The page cache holds one reference per page of each of its folios.
        for file in files.all() {
            file.cache.withLock { c in
                for pfn in c.folios.values { held[pfn, default: 0] += 1 << Int(metaPtr(pfn).order) }
            }
        }
        // Free hugetlb pool pages are the pool's: no reference, off the node's lists.
        let poolFree = hugetlb.freeFolioPfns

        // 2. Every frame of every RAM node and device page map.
        var freeSets: [(start: UInt64, free: [Bool])] = []
        for node in nodes {
            var free = [Bool](repeating: false, count: Int(node.pageCount))
            if node.markFreeFrames(&free) { a.locksHeld += 1; a.note("node \(node.id): zone lock held") }
            let counted = free.reduce(0) { $0 + ($1 ? 1 : 0) }
            if UInt64(counted) != node.freePagesUnlocked {
                a.freeCountMismatches += 1
                a.note("node \(node.id): \(node.freePagesUnlocked) free pages counted, \(counted) on the free lists")
            }
            for pfn in poolFree where pfn >= node.startPfn && pfn < node.startPfn + node.pageCount {
                for i in 0..<PageGeometry.pmdPages { free[Int(pfn - node.startPfn) + i] = true }
            }
            auditFrames(start: node.startPfn, count: node.pageCount, free: free, device: false,
                        refs: refs, pteMaps: pteMaps, entireMaps: entireMaps, held: held, &a)
            freeSets.append((node.startPfn, free))
        }
        for pgmap in pageMaps.withLock({ $0 }) {
            auditFrames(start: pgmap.startPfn, count: pgmap.pageCount, free: nil, device: true,
                        refs: refs, pteMaps: pteMaps, entireMaps: entireMaps, held: held, &a)
        }
        // 3. No entry names a free RAM frame.
        for pfn in mapped {
            for (start, free) in freeSets where pfn >= start && pfn < start + UInt64(free.count) && free[Int(pfn - start)] {
                a.entriesToFreeFrames += 1
                a.note("pfn 0x\(String(pfn, radix: 16)) is mapped but free")
            }
        }
        return a
    }

    /// One mapping of an anonymous page (anonymous or shared-anonymous
    /// memory: not the page cache, not a driver's page) at `address` in
    /// `vma`: its rmap must lead there (`__page_check_anon_rmap()`). With
    /// `checkLink`, also that `vma` is linked in its family's rmap.
    private func auditAnonRmap(_ mm: AddressSpace, _ vma: VMA, _ address: UInt64, _ pfn: UInt64, _ head: UInt64,
                               checkLink: Bool, _ a: inout KernelAudit) {
        let m = metaPtr(head)
        guard m.mappingMM != 0, !m.test(PageFlags.pageCache.rawValue),
              m.test(PageFlags.anon.rawValue | PageFlags.shmem.rawValue) else { return }
        let where_ = "mm \(mm.id) 0x\(String(address, radix: 16)) pfn 0x\(String(pfn, radix: 16))"
        let index = m.index &+ (pfn &- head)
        if index != vma.linearPageIndex(address) {
            a.rmapMismatches += 1
            a.note("\(where_): index 0x\(String(index, radix: 16)), but \(vma) (pgoff 0x\(String(vma.pageOffset, radix: 16))) maps 0x\(String(vma.linearPageIndex(address), radix: 16)) there")
        }
        if anonFamily(of: m.mappingMM) !== mm.anonFamily {
            a.rmapMismatches += 1
            a.note("\(where_): the rmap names mm \(m.mappingMM), of another fork family")
        }
        if checkLink && !mm.anonFamily.contains(AnonMappingEntry(mm: mm, start: vma.start, end: vma.end, pageOffset: vma.pageOffset)) {
            a.rmapMismatches += 1
            a.note("\(where_): \(vma) is not linked in its family's rmap")
        }
    }

    /// Frames `[start, start + count)`: RAM when `free` is given (the
    /// allocator's view), device memory otherwise (free = no reference).
    private func auditFrames(start: UInt64, count: UInt64, free: [Bool]?, device: Bool,
                             refs: [UInt64: Int], pteMaps: [UInt64: Int32], entireMaps: [UInt64: Int32],
                             held: [UInt64: Int], _ a: inout KernelAudit) {
        var pfn = start
        let end = start + count
        while pfn < end {
            a.frames += 1
            let m = metaPtr(pfn)
            if let free, free[Int(pfn - start)] {
                if m.refcount != 0 || m.test(PageFlags.locked.rawValue) {
                    a.lostFrames += 1
                    a.note("free pfn 0x\(String(pfn, radix: 16)) has \(m.refcount) references, flags \(PageFlags(rawValue: m.flags))")
                }
                pfn += 1
                continue
            }
            if m.head != pfn {
                // A tail: its head was (or will be) checked as a folio. A
                // tail whose head lies elsewhere and is free is lost.
                if free != nil && !(m.head >= start && m.head < pfn) {
                    a.lostFrames += 1
                    a.note("pfn 0x\(String(pfn, radix: 16)): a tail of 0x\(String(m.head, radix: 16)), not free, no folio")
                }
                pfn += 1
                continue
            }
            let pages = UInt64(1) << UInt64(m.order)
            if m.test(PageFlags.reserved.rawValue) { pfn += pages; continue }  // the zero pages
            let refcount = Int(m.refcount)
            if refcount == 0 {
                // Device memory: on its driver's free lists. RAM: lost.
                if !device {
                    a.lostFrames += Int(pages)
                    a.note("pfn 0x\(String(pfn, radix: 16)): no reference, not on the free lists")
                }
                if device && m.test(PageFlags.locked.rawValue) {
                    a.foliosLocked += 1
                    a.note("free device folio 0x\(String(pfn, radix: 16)) is locked")
                }
                pfn += device ? 1 : pages
                continue
            }
            a.folios += 1
            let folio = Folio(pfn: pfn, kernel: self)
            let mappings = refs[pfn] ?? 0
            let expected = mappings + (held[pfn] ?? 0)
            if m.test(PageFlags.locked.rawValue) {
                a.foliosLocked += 1
                a.note("\(folio) is locked")
            }
            if expected == 0 {
                a.unreachableFolios += 1
                a.note("\(folio) has references but nothing maps or holds it")
            } else if refcount != expected {
                a.referenceMismatches += 1
                a.note("\(folio): \(refcount) references, expected \(mappings) mappings + \(held[pfn] ?? 0) held")
            }
            if Int32(m.entireMapcount) != (entireMaps[pfn] ?? 0) {
                a.mapCountMismatches += 1
                a.note("\(folio): entire map count \(m.entireMapcount), \(entireMaps[pfn] ?? 0) PMD entries")
            }
            var pteMapped: Int32 = 0
            for i in 0..<pages {
                let found = pteMaps[pfn + i] ?? 0
                pteMapped += found
                if metaPtr(pfn + i).mapcount != found {
                    a.mapCountMismatches += 1
                    a.note("pfn 0x\(String(pfn + i, radix: 16)): map count \(metaPtr(pfn + i).mapcount), \(found) PTEs")
                }
            }
            if pages > 1 {
                let large = folio.atomicLargeMapcount.load(ordering: .acquiring)
                if large != pteMapped + (entireMaps[pfn] ?? 0) {
                    a.mapCountMismatches += 1
                    a.note("\(folio): large map count \(large), \(pteMapped) PTEs + \(entireMaps[pfn] ?? 0) PMD entries")
                }
            }
            pfn += pages
        }
    }
}

extension AddressSpace {
    /// Calls `body` with every entry of every VMA that is not none, and its
    /// VMA: a PMD entry that maps 2 MiB itself once, else each PTE. No
    /// locks: for the audit at quiescence.
    func forEachEntry(_ body: (VMA, UInt64, PageTableLevel, PageTableEntry) -> Void) {
        var lastPMD: UInt64 = .max
        for v in vmas {
            var a = v.start
            while a < v.end {
                let pmdStart = a & PageGeometry.pmdMask
                let pmdEnd = pmdStart + PageGeometry.pmdSize64
                let pmd = loadPMD(a)
                if pmd.kind == .table {
                    while a < min(v.end, pmdEnd) {
                        let e = loadPTE(a)
                        if !e.isNone { body(v, a, .pte, e) }
                        a += PageGeometry.pageSize64
                    }
                    continue
                }
                if !pmd.isNone && pmdStart != lastPMD {
                    lastPMD = pmdStart
                    body(v, pmdStart, .pmd, pmd)
                }
                a = min(v.end, pmdEnd)
            }
        }
    }

    /// Split PTE locks and PMD locks held, each noted in `a`.
    func auditLocks(_ a: inout KernelAudit) -> Int {
        var n = 0
        for i in 0..<pmdCount where UnsafeAtomic(ptls + i).load(ordering: .acquiring) != 0 {
            n += 1
            a.note("mm \(id): the PTE lock of PMD slot \(i) is held")
        }
        for i in 0..<(pmdCount / 512 + 1) where UnsafeAtomic(pmdLocks + i).load(ordering: .acquiring) != 0 {
            n += 1
            a.note("mm \(id): PMD lock \(i) is held")
        }
        return n
    }
}
