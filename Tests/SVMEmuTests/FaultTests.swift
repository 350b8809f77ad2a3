import Foundation
import Testing
import TestSupport
@testable import SVMEmu

@Suite("The page-fault path")
struct FaultTests {

    @Test("reading untouched anonymous memory maps the shared zero page and reads 0")
    func readMapsZeroPage() throws {
        try withMachine(thp: .never) { kernel, mm in
            let free0 = kernel.freePages
            let a = try mm.mmap(length: 4 * pageSize)
            #expect(try mm.load(a + 17) == 0)
            #expect(try allZero(mm, a, length: 4 * pageSize))
            let (level, pte) = mm.entry(at: a)
            #expect(level == .pte)
            #expect(pte.kind == .present)
            #expect(pte.pfn == kernel.zeroPage.pfn)
            #expect(pte.isSpecial)
            #expect(!pte.isWrite)
            #expect(kernel.freePages == free0, "a read fault allocates nothing")
            #expect(kernel.vmstat[.zeroPageMaps] == 4)
            #expect(kernel.vmstat[.demandZeroFaults] == 0)
            #expect(kernel.zeroPage.page(0).mapCount == 0, "the zero page is not counted as mapped")
        }
    }

    @Test("a write after a read replaces the zero page with a new page (write-protect fault)")
    func writeAfterReadReplacesZeroPage() throws {
        try withMachine(thp: .never) { kernel, mm in
            let free0 = kernel.freePages
            let a = try mm.mmap(length: 2 * pageSize)
            #expect(try mm.load(a + 100) == 0)
            #expect(try mm.load(a + UInt64(pageSize)) == 0)
            try mm.store(a + 100, 0x5A)
            let (_, pte) = mm.entry(at: a)
            #expect(pte.kind == .present)
            #expect(pte.pfn != kernel.zeroPage.pfn)
            #expect(!pte.isSpecial)
            #expect(pte.isWrite)
            #expect(kernel.vmstat[.wpFaults] == 1)
            #expect(kernel.vmstat[.demandZeroFaults] == 1)
            #expect(kernel.freePages == free0 - 1)
            let page = try #require(mappedPage(kernel, mm, a))
            #expect(page.mapCount == 1)
            #expect(page.folio.refCount == 1)
            // The new page is zero but for the byte written; the zero page stays zero
            // and the neighbouring page still maps it.
            var expected = [UInt8](repeating: 0, count: pageSize)
            expected[100] = 0x5A
            #expect(try mm.read(a, count: pageSize) == expected)
            #expect(kernel.zeroPage.withBytes { $0.allSatisfy { $0 == 0 } })
            #expect(mm.entry(at: a + UInt64(pageSize)).entry.pfn == kernel.zeroPage.pfn)
        }
    }

    @Test("a first write maps a zeroed page directly (demand-zero fault), writable and dirty")
    func firstWriteIsDemandZero() throws {
        try withMachine(thp: .never) { kernel, mm in
            let a = try mm.mmap(length: pageSize)
            try mm.store64(a + 8, 0x0123_4567_89AB_CDEF)
            let pte = mm.entry(at: a).entry
            #expect(pte.isWrite && pte.isDirty && !pte.isSpecial)
            #expect(kernel.vmstat[.demandZeroFaults] == 1)
            #expect(kernel.vmstat[.wpFaults] == 0)
            #expect(try mm.load64(a + 8) == 0x0123_4567_89AB_CDEF)
            #expect(try mm.load64(a) == 0)
            let page = try #require(mappedPage(kernel, mm, a))
            #expect(page.isAnonExclusive)
            #expect(kernel.rmapAddress(of: page)?.1 == a)
        }
    }

    @Test("a write fault with THP allowed maps one PMD entry and one order-9 folio of 512 pages")
    func hugePageFault() throws {
        try withMachine(thp: .madvise) { kernel, mm in
            let free0 = kernel.freePages
            let a = try mm.mmap(length: hugeSize)
            try mm.madvise(a, length: hugeSize, advice: .hugePage)
            try mm.store(a + 12345, 0x77)
            let (level, pmd) = mm.entry(at: a + 12345)
            #expect(level == .pmd)
            #expect(pmd.kind == .present && pmd.isWrite && !pmd.isSpecial)
            #expect(mm.entry(at: a + UInt64(hugeSize) - 1).entry == pmd, "one entry covers all 2 MiB")
            let folio = try #require(kernel.page(pfn: pmd.pfn)).folio
            #expect(folio.order == PageGeometry.pmdOrder)
            #expect(folio.pageCount == PageGeometry.pmdPages)
            #expect(folio.refCount == 1)
            #expect(folio.entireMapCount == 1)
            #expect(folio.mapCount == 1)
            #expect((0..<PageGeometry.pmdPages).allSatisfy { folio.page($0).mapCount == 0 }, "no per-page PTE mappings")
            #expect(kernel.freePages == free0 - PageGeometry.pmdPages64)
            #expect(kernel.vmstat[.thpFaultAlloc] == 1)
            #expect(kernel.vmstat[.pgfault] == 1, "one fault for the whole 2 MiB")
            // Every page of the range is now backed without further faults.
            try stampPages(mm, a, pages: PageGeometry.pmdPages)
            #expect(kernel.vmstat[.pgfault] == 1)
            #expect(try stampsIntact(mm, a, pages: PageGeometry.pmdPages))
            #expect(try mm.load(a + 12345) == 0x77)
            #expect(mappedPage(kernel, mm, a + PageGeometry.pageSize64 * 300)?.pfn == folio.pfn + 300)
            #expect(kernel.rmapAddress(of: folio.page(300))?.1 == a + PageGeometry.pageSize64 * 300)
        }
    }

    @Test("a read fault on a THP-allowed region maps the huge zero page; a write then splits it")
    func readFaultMapsHugeZeroPage() throws {
        try withMachine(thp: .always) { kernel, mm in
            let free0 = kernel.freePages
            let a = try mm.mmap(length: hugeSize)
            #expect(try mm.load(a + 999) == 0)
            let (level, pmd) = mm.entry(at: a)
            #expect(level == .pmd)
            #expect(pmd.pfn == kernel.hugeZeroPage.pfn)
            #expect(pmd.isSpecial && !pmd.isWrite)
            #expect(kernel.vmstat[.thpZeroPageMap] == 1)
            #expect(kernel.freePages == free0)
            #expect(try allZero(mm, a, length: hugeSize))

            try mm.store(a + UInt64(3 * pageSize), 0x42)
            #expect(mm.entry(at: a).level == .pte, "the huge zero PMD is split for a write")
            #expect(mm.entry(at: a).entry.pfn == kernel.zeroPage.pfn)
            let written = mm.entry(at: a + UInt64(3 * pageSize)).entry
            #expect(written.isWrite && written.pfn != kernel.zeroPage.pfn)
            #expect(kernel.freePages == free0 - 1)
            #expect(try mm.load(a + UInt64(3 * pageSize)) == 0x42)
            #expect(try allZero(mm, a, length: 3 * pageSize))
            #expect(kernel.hugeZeroPage.withBytes { $0.allSatisfy { $0 == 0 } })
            #expect(kernel.hugeZeroPage.refCount >= 1)
        }
    }

    @Test("THP never: a 2 MiB region faults 4 KiB pages")
    func thpNeverFaultsSmallPages() throws {
        try withMachine(thp: .never) { kernel, mm in
            let a = try mm.mmap(length: hugeSize)
            try mm.madvise(a, length: hugeSize, advice: .hugePage)
            try mm.store(a, 1)
            #expect(mm.entry(at: a).level == .pte)
            #expect(kernel.vmstat[.thpFaultAlloc] == 0)
            #expect(mappedPage(kernel, mm, a)?.folio.order == 0)
        }
    }

    @Test("eight threads fault the same and neighbouring pages at once: every page mapped once, counts 1, bytes as written")
    func eightThreadsFaultConcurrently() throws {
        try withMachine(thp: .never) { kernel, mm in
            let pages = 256
            let threads = 8
            let a = try mm.mmap(length: pages * pageSize)
            let free0 = kernel.freePages
            let before = kernel.vmstat.snapshot()
            let issues = ThreadIssues()
            // Each thread walks every page from its own starting point; even
            // threads read before they write, so zero-page mappings race with
            // demand-zero and write-protect faults on the same PTEs.
            let finished = runThreads(threads, timeout: 60, keepAlive: [kernel, mm]) { t in
                for k in 0..<pages {
                    let p = (k + t * 3) % pages
                    let addr = a + UInt64(p * pageSize) + UInt64(t * 8)
                    do {
                        if t % 2 == 0, try mm.load(addr) != 0 { issues.record("thread \(t) saw a non-zero byte at page \(p)") }
                        try mm.store64(addr, UInt64(t) << 32 | UInt64(p))
                    } catch {
                        issues.record("thread \(t) page \(p): \(error)")
                    }
                }
            }
            try #require(finished, "fault threads did not finish in time")
            #expect(issues.all.isEmpty, "\(issues.all.prefix(5))")
            var pfns = Set<UInt64>()
            for p in 0..<pages {
                let address = a + UInt64(p * pageSize)
                let (level, pte) = mm.entry(at: address)
                guard level == .pte, pte.kind == .present, !pte.isSpecial, pte.isWrite else {
                    Issue.record("page \(p) entry \(level) \(pte)"); continue
                }
                let page = try #require(kernel.page(pfn: pte.pfn))
                if page.folio.order != 0 || page.mapCount != 1 || page.folio.refCount != 1 {
                    Issue.record("page \(p): \(page.folio) mapcount \(page.mapCount)")
                }
                pfns.insert(pte.pfn)
                for t in 0..<threads {
                    let v = try mm.load64(address + UInt64(t * 8))
                    if v != UInt64(t) << 32 | UInt64(p) { Issue.record("page \(p) thread \(t) word \(v)") }
                }
                if try !allZero(mm, address + UInt64(threads * 8), length: pageSize - threads * 8) {
                    Issue.record("page \(p) has stray bytes")
                }
            }
            #expect(pfns.count == pages, "two virtual pages share a frame")
            #expect(kernel.freePages == free0 - UInt64(pages), "a lost race leaked or double-freed a page")
            #expect(kernel.vmstat[.demandZeroFaults] == UInt64(pages))
            #expect(delta(before, kernel, .pgalloc) - delta(before, kernel, .pgfree) == Int64(pages))
            #expect(kernel.diagnostics.isEmpty)
            try mm.munmap(a, length: pages * pageSize)
            #expect(kernel.freePages == free0)
        }
    }

    @Test("eight threads fault one THP-allowed 2 MiB range at once: one folio, one PMD mapping")
    func eightThreadsFaultOneHugePage() throws {
        try withMachine(thp: .always) { kernel, mm in
            let a = try mm.mmap(length: 2 * hugeSize)
            let free0 = kernel.freePages
            let issues = ThreadIssues()
            let finished = runThreads(8, timeout: 60, keepAlive: [kernel, mm]) { t in
                for k in 0..<64 {
                    let addr = a + UInt64(((k * 37 + t * 11) % 1024) * pageSize) + UInt64(t * 8)
                    do { try mm.store64(addr, UInt64(t + 1)) } catch { issues.record("\(error)") }
                }
            }
            try #require(finished, "fault threads did not finish in time")
            #expect(issues.all.isEmpty)
            for base in [a, a + UInt64(hugeSize)] {
                let (level, pmd) = mm.entry(at: base)
                #expect(level == .pmd)
                let folio = try #require(kernel.page(pfn: pmd.pfn)).folio
                #expect(folio.order == PageGeometry.pmdOrder && folio.refCount == 1 && folio.entireMapCount == 1 && folio.mapCount == 1)
            }
            #expect(kernel.freePages == free0 - 1024)
            #expect(kernel.vmstat[.thpFaultAlloc] == 2)
            for t in 0..<8 {
                for k in 0..<64 {
                    let addr = a + UInt64(((k * 37 + t * 11) % 1024) * pageSize) + UInt64(t * 8)
                    if try mm.load64(addr) != UInt64(t + 1) { Issue.record("thread \(t) write \(k) lost") }
                }
            }
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("a fault that meets a migration entry sleeps with the mmap lock held for reading (do_swap_page's migration_entry_wait returns no VM_FAULT_RETRY), and reads the page once the migration ends")
    func migrationWaitKeepsMmapLock() throws {
        try withMachine(thp: .never) { kernel, mm in
            let a = try mm.mmap(length: pageSize)
            try mm.store64(a, 0xC0FFEE)
            // A migration holds the page under its migration entry (the
            // folio locked), the mmap lock held for reading as migrate_vma
            // requires.
            mm.mmapReadLock()
            var args = MigrateVMA(vma: mm.vma(containing: a), start: a, end: a + UInt64(pageSize), flags: .system)
            try kernel.migrateVMASetup(&args)
            #expect(args.cpages == 1 && mm.entry(at: a).entry.kind == .migration)
            let folio = Page(pfn: args.src[0].pfn, kernel: kernel).folio
            let read = SharedCounter()
            let reader = WorkerThread()
            reader.start { if (try? mm.load64(a)) == 0xC0FFEE { read.add() } }
            // The reader is queued on the folio (PG_waiters) ...
            #expect(eventually { folio.meta.flags & PageFlags.waiters.rawValue != 0 })
            // ... and holds the mmap lock for reading while it sleeps there:
            // two holders, the migration and the reader. (The sleep is
            // bounded at 100 ms, after which the fault retries and takes
            // the lock again: allow a few samples in that window.)
            var both = 0
            for _ in 0..<20 {
                usleep(1_000)
                if mm.state.mmapLockHolders.load(ordering: .relaxed) == 2 { both += 1 }
            }
            #expect(both >= 15, "the reader held the mmap lock in \(both) of 20 samples")
            kernel.migrateVMAPages(&args)
            kernel.migrateVMAFinalize(&args)
            mm.mmapReadUnlock()
            #expect(reader.wait(timeout: 10))
            #expect(read.current == 1)
            #expect(kernel.vmstat[.migrationEntryWaits] >= 1)
            #expect(reader.stop())
        }
    }
}
