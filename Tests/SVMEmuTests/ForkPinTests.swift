import Testing
@testable import SVMEmu

// fork() and pins (copy_present_ptes(), folio_try_dup_anon_rmap_pte(),
// copy_present_page()): in an address space that has pinned, an exclusive
// anonymous page that may be pinned is copied for the child at fork, so
// the pin and the parent keep sharing the page.

@Suite("fork of pinned pages")
struct ForkPinTests {

    @Test("fork of a pinned page: the child gets its own copy at fork, the parent keeps the pinned page writable and exclusive, and its writes reach the pin")
    func pinnedPageCopiedForChild() throws {
        try withMachine(thp: .never) { kernel, mm in
            let ps = UInt64(pageSize)
            let a = try mm.mmap(length: 4 * pageSize)
            try mm.fillPattern(a, length: 4 * pageSize, seed: 3)
            let pinned = try mm.pinUserPagesFast(a + ps, count: 1, flags: .write)
            let page = pinned[0]
            let free0 = kernel.freePages
            var child: AddressSpace? = try mm.fork()
            #expect(kernel.freePages == free0 - 1, "one page copied for the child")

            let parentEntry = mm.entry(at: a + ps).entry
            #expect(parentEntry.kind == .present && parentEntry.isWrite && parentEntry.pfn == page.pfn)
            #expect(page.isAnonExclusive)
            let childEntry = child!.entry(at: a + ps).entry
            #expect(childEntry.kind == .present && childEntry.isWrite && childEntry.isDirty && childEntry.pfn != page.pfn)
            #expect(kernel.page(pfn: childEntry.pfn)?.isAnonExclusive == true)
            // The pages nobody pinned are shared copy-on-write, read-only in both.
            #expect(!mm.entry(at: a).entry.isWrite && child!.entry(at: a).entry.pfn == mm.entry(at: a).entry.pfn)
            #expect(try child!.verifyPattern(a, length: 4 * pageSize, seed: 3) == nil)
            #expect(kernel.audit(heldReferences: [page.pfn: Folio.pinCountingBias]).isClean,
                    "\(kernel.audit(heldReferences: [page.pfn: Folio.pinCountingBias]))")

            // The parent writes in place (no copy-on-write fault): the pin sees it.
            let wp = kernel.vmstat[.wpFaults]
            try mm.store64(a + ps + 8, 0x5EED_F00D)
            #expect(kernel.vmstat[.wpFaults] == wp)
            #expect(mm.entry(at: a + ps).entry.pfn == page.pfn)
            #expect(page.withBytes { $0.load(fromByteOffset: 8, as: UInt64.self) } == 0x5EED_F00D)
            // The child's copy keeps what was there at fork, and is its own.
            #expect(try child!.load64(a + ps + 8) == AddressSpace.patternWord(a + ps + 8, 3))
            try child!.store64(a + ps + 16, 7)
            #expect(page.withBytes { $0.load(fromByteOffset: 16, as: UInt64.self) } == AddressSpace.patternWord(a + ps + 16, 3))
            #expect(kernel.vmstat[.wpFaults] == wp)

            child = nil
            kernel.unpinUserPage(page)
            #expect(kernel.audit().isClean, "\(kernel.audit())")
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("fork of a PMD-mapped THP with a pinned page: the PMD is split and each of its 512 pages copied for the child; the parent keeps the folio, writable")
    func pinnedTHPCopiedForChild() throws {
        try withMachine(thp: .madvise) { kernel, mm in
            let ps = UInt64(pageSize)
            let a = try mm.mmap(length: hugeSize)
            try mm.madvise(a, length: hugeSize, advice: .hugePage)
            try mm.fillPattern(a, length: hugeSize, seed: 5)
            #expect(mm.entry(at: a).level == .pmd)
            let folio = try #require(mappedPage(kernel, mm, a)).folio
            #expect(folio.isLarge)
            let pinned = try mm.pinUserPagesFast(a + 5 * ps, count: 1, flags: .write)
            let page = pinned[0]
            var child: AddressSpace? = try mm.fork()

            let pages = (0..<PageGeometry.pmdPages).map { a + UInt64($0) * ps }
            let parentKeeps = pages.filter { addr in
                let p = mm.entry(at: addr).entry
                return p.kind == .present && p.isWrite && p.pfn == folio.pfn + (addr - a) / ps
            }
            let childCopies = pages.filter { addr in
                let c = child!.entry(at: addr).entry
                return c.kind == .present && c.isWrite && (c.pfn < folio.pfn || c.pfn >= folio.pfn + UInt64(folio.pageCount))
            }
            #expect(parentKeeps.count == PageGeometry.pmdPages, "parent entries still writable, on the folio")
            #expect(childCopies.count == PageGeometry.pmdPages, "child entries writable, on pages of their own")
            #expect(try child!.verifyPattern(a, length: hugeSize, seed: 5) == nil)
            #expect(kernel.audit(heldReferences: [folio.pfn: Folio.pinCountingBias]).isClean,
                    "\(kernel.audit(heldReferences: [folio.pfn: Folio.pinCountingBias]))")

            try mm.store64(a + 5 * ps, 0xABCD)
            #expect(page.withBytes { $0.load(as: UInt64.self) } == 0xABCD)
            #expect(try child!.load64(a + 5 * ps) == AddressSpace.patternWord(a + 5 * ps, 5))

            child = nil
            kernel.unpinUserPage(page)
            #expect(kernel.audit().isClean, "\(kernel.audit())")
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("an address space that never pinned shares at fork even a page whose references look like a pin (MMF_HAS_PINNED)")
    func noPinNoCopy() throws {
        try withMachine(thp: .never) { kernel, mm in
            let a = try mm.mmap(length: pageSize)
            try mm.store64(a, 1)
            var refs: [Page] = []
            for _ in 0..<Folio.pinCountingBias { refs += try mm.getUserPagesFast(a, count: 1) }
            let folio = refs[0].folio
            #expect(folio.isMaybeDMAPinned)
            var child: AddressSpace? = try mm.fork()
            #expect(child!.entry(at: a).entry.pfn == folio.pfn)
            #expect(!mm.entry(at: a).entry.isWrite && !refs[0].isAnonExclusive)
            child = nil
            for p in refs { p.folio.put() }
            #expect(kernel.audit().isClean, "\(kernel.audit())")
        }
    }
}
