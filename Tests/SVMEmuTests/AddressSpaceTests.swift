import Foundation
import Testing
@testable import SVMEmu

@Suite("Address space: mmap, munmap, mprotect, madvise")
struct AddressSpaceTests {

    @Test("mmap gives a page-aligned VMA; bytes written read back and survive a second mapping")
    func mmapAndBytes() throws {
        try withMachine { kernel, mm in
            let a = try mm.mmap(length: 10 * pageSize)
            #expect(a % UInt64(pageSize) == 0)
            let big = try mm.mmap(length: 4 << 20)
            #expect(big % UInt64(hugeSize) == 0, "a mapping of 2 MiB or more is 2 MiB aligned")
            #expect(a + UInt64(10 * pageSize) <= big || big + UInt64(4 << 20) <= a, "mappings overlap")
            let vmas = mm.mappings
            #expect(vmas.count == 2)
            #expect(vmas.contains { $0.start == a && $0.end == a + UInt64(10 * pageSize) && $0.flags.contains([.read, .write]) })

            try mm.fillPattern(a, length: 10 * pageSize, seed: 7)
            #expect(try mm.verifyPattern(a, length: 10 * pageSize, seed: 7) == nil)
            try mm.write(a + 4090, bytes: Array(1...12))  // crosses a page boundary
            #expect(try mm.read(a + 4090, count: 12) == Array(1...12))
            try mm.fillPattern(big, length: 4 << 20, seed: 9)
            try mm.munmap(big, length: 4 << 20)
            #expect(try mm.verifyPattern(a + 8192, length: 8 * pageSize, seed: 7) == nil)
            #expect(try mm.read(a + 4090, count: 12) == Array(1...12))
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("munmap returns every reference, map count and free page to its baseline")
    func munmapRestoresCounts() throws {
        try withMachine { kernel, mm in
            let free0 = kernel.freePages
            let pages = 300
            let a = try mm.mmap(length: pages * pageSize)
            try stampPages(mm, a, pages: pages)
            #expect(kernel.freePages == free0 - UInt64(pages))
            var folios: [Folio] = []
            for i in 0..<pages {
                let page = try #require(mappedPage(kernel, mm, a + UInt64(i * pageSize)))
                #expect(page.folio.order == 0)
                if page.folio.refCount != 1 || page.mapCount != 1 {
                    Issue.record("page \(i): ref \(page.folio.refCount), map \(page.mapCount)")
                }
                #expect(page.folio.isAnon)
                folios.append(page.folio)
            }
            #expect(Set(folios).count == pages, "two addresses share a page")
            #expect(try stampsIntact(mm, a, pages: pages))

            try mm.munmap(a, length: pages * pageSize)
            #expect(kernel.freePages == free0)
            #expect(mm.mappings.isEmpty)
            for f in folios where f.refCount != 0 || f.mapCount != 0 || !f.flags.contains(.buddy) {
                Issue.record("\(f) not freed after munmap")
            }
            #expect(mm.entry(at: a).entry.isNone)
            #expect(throws: Errno.badAddress) { _ = try mm.load(a) }
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("munmap of the middle of a VMA leaves two VMAs with their bytes")
    func munmapMiddleSplitsVMA() throws {
        try withMachine { kernel, mm in
            let free0 = kernel.freePages
            let a = try mm.mmap(length: 16 * pageSize)
            try stampPages(mm, a, pages: 16)
            try mm.munmap(a + UInt64(4 * pageSize), length: 8 * pageSize)
            let vmas = mm.mappings
            #expect(vmas.map(\.start) == [a, a + UInt64(12 * pageSize)])
            #expect(vmas.map(\.end) == [a + UInt64(4 * pageSize), a + UInt64(16 * pageSize)])
            #expect(try stampsIntact(mm, a, pages: 4))
            #expect(try stampsIntact(mm, a + UInt64(12 * pageSize), pages: 4))
            #expect(kernel.freePages == free0 - 8)
            for i in 4..<12 {
                #expect(throws: Errno.badAddress) { _ = try mm.load(a + UInt64(i * pageSize)) }
            }
        }
    }

    @Test("unmapping half of a PMD-mapped THP splits the PMD into PTEs and keeps the other half's bytes")
    func partialMunmapOfTHPSplitsPMD() throws {
        try withMachine(thp: .always) { kernel, mm in
            let free0 = kernel.freePages
            let a = try mm.mmap(length: hugeSize)
            try mm.fillPattern(a, length: hugeSize, seed: 42)
            let (level, pmd) = mm.entry(at: a)
            #expect(level == .pmd)
            let folio = try #require(kernel.page(pfn: pmd.pfn)).folio
            #expect(folio.order == PageGeometry.pmdOrder)
            #expect(kernel.freePages == free0 - PageGeometry.pmdPages64)

            let half = hugeSize / 2
            try mm.munmap(a + UInt64(half), length: half)
            #expect(kernel.vmstat[.thpSplitPmd] == 1)
            // The first half is now mapped by 256 PTEs into the same folio.
            for i in 0..<256 {
                let (lvl, pte) = mm.entry(at: a + UInt64(i * pageSize))
                if lvl != .pte || pte.kind != .present || pte.pfn != folio.pfn + UInt64(i) || !pte.isWrite {
                    Issue.record("page \(i): \(lvl) \(pte)"); break
                }
                if folio.page(i).mapCount != 1 { Issue.record("page \(i) mapcount \(folio.page(i).mapCount)"); break }
            }
            for i in PageGeometry.pmdPages / 2..<PageGeometry.pmdPages {
                if !mm.entry(at: a + UInt64(i * pageSize)).entry.isNone || folio.page(i).mapCount != 0 {
                    Issue.record("page \(i) still mapped after munmap"); break
                }
            }
            #expect(folio.entireMapCount == 0)
            #expect(folio.mapCount == 256)
            #expect(folio.refCount == 256, "one reference per remaining PTE mapping")
            #expect(folio.order == PageGeometry.pmdOrder, "the folio itself is not split")
            #expect(try mm.verifyPattern(a, length: half, seed: 42) == nil)
            #expect(throws: Errno.badAddress) { _ = try mm.load(a + UInt64(half)) }

            // Writing the remaining half still works in place.
            try mm.store(a + 5, 0xEE)
            #expect(mappedPage(kernel, mm, a)?.pfn == folio.pfn)

            try mm.munmap(a, length: half)
            #expect(folio.refCount == 0)
            #expect(folio.mapCount == 0)
            #expect(kernel.freePages == free0)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("mprotect read-only: a write fails with EACCES and changes nothing; read-write again allows it")
    func mprotectReadOnly() throws {
        try withMachine { kernel, mm in
            let a = try mm.mmap(length: 8 * pageSize)
            try mm.fillPattern(a, length: 8 * pageSize, seed: 3)
            let pfns = (0..<8).map { mappedPage(kernel, mm, a + UInt64($0 * pageSize))?.pfn }
            try mm.mprotect(a, length: 8 * pageSize, protection: .read)
            #expect(mm.mappings.first?.flags.contains(.write) == false)
            for i in 0..<8 { #expect(!mm.entry(at: a + UInt64(i * pageSize)).entry.isWrite) }

            let free0 = kernel.freePages
            #expect(throws: Errno.permissionDenied) { try mm.store(a + 100, 0xAB) }
            #expect(throws: Errno.permissionDenied) { try mm.write(a + 5000, bytes: [1, 2, 3]) }
            #expect(try mm.verifyPattern(a, length: 8 * pageSize, seed: 3) == nil)
            #expect(kernel.freePages == free0)
            #expect((0..<8).map { mappedPage(kernel, mm, a + UInt64($0 * pageSize))?.pfn } == pfns)

            try mm.mprotect(a, length: 8 * pageSize, protection: .readWrite)
            try mm.store(a + 100, 0xAB)
            #expect(try mm.load(a + 100) == 0xAB)
            #expect(mappedPage(kernel, mm, a)?.pfn == pfns[0], "the write reuses the exclusive page")
            #expect(kernel.freePages == free0)
        }
    }

    @Test("mprotect of the middle of a VMA splits it into three")
    func mprotectSplitsVMA() throws {
        try withMachine { _, mm in
            let a = try mm.mmap(length: 6 * pageSize)
            try stampPages(mm, a, pages: 6)
            try mm.mprotect(a + UInt64(2 * pageSize), length: 2 * pageSize, protection: .read)
            let vmas = mm.mappings
            #expect(vmas.count == 3)
            #expect(vmas.map { $0.flags.contains(.write) } == [true, false, true])
            try mm.store(a, 9)
            try mm.store(a + UInt64(5 * pageSize), 9)
            #expect(throws: Errno.permissionDenied) { try mm.store(a + UInt64(3 * pageSize), 9) }
            #expect(try stampsIntact(mm, a + UInt64(pageSize), pages: 4))
        }
    }

    @Test("PROT_NONE: reads and writes fail with EACCES, and the bytes come back with PROT_READ")
    func protNone() throws {
        try withMachine { kernel, mm in
            let a = try mm.mmap(length: 4 * pageSize)
            try stampPages(mm, a, pages: 4)
            try mm.mprotect(a, length: 4 * pageSize, protection: .none)
            #expect(mm.entry(at: a).entry.isProtNone)
            #expect(throws: Errno.permissionDenied) { _ = try mm.load(a + 123) }
            #expect(throws: Errno.permissionDenied) { try mm.store(a + 123, 0) }
            // Untouched PROT_NONE memory fails the same way.
            let b = try mm.mmap(length: pageSize, protection: .none)
            #expect(throws: Errno.permissionDenied) { _ = try mm.load(b) }
            #expect(mm.entry(at: b).entry.isNone)

            try mm.mprotect(a, length: 4 * pageSize, protection: .read)
            #expect(try stampsIntact(mm, a, pages: 4))
            #expect(throws: Errno.permissionDenied) { try mm.store(a, 0) }
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("MADV_DONTNEED drops the pages: they are freed and the next read sees zeroes")
    func madviseDontNeed() throws {
        try withMachine { kernel, mm in
            let free0 = kernel.freePages
            let a = try mm.mmap(length: 8 * pageSize)
            try mm.fillPattern(a, length: 8 * pageSize, seed: 11)
            let dropped = try #require(mappedPage(kernel, mm, a + UInt64(2 * pageSize))).folio
            try mm.madvise(a + UInt64(2 * pageSize), length: 4 * pageSize, advice: .dontNeed)
            #expect(kernel.freePages == free0 - 4)
            #expect(dropped.refCount == 0)
            #expect(mm.mappings.count == 1, "the VMA stays")
            #expect(try mm.verifyPattern(a, length: 2 * pageSize, seed: 11) == nil)
            #expect(try mm.verifyPattern(a + UInt64(6 * pageSize), length: 2 * pageSize, seed: 11) == nil)
            #expect(try allZero(mm, a + UInt64(2 * pageSize), length: 4 * pageSize))
            #expect(mm.entry(at: a + UInt64(2 * pageSize)).entry.isSpecial, "a read after DONTNEED maps the zero page")
            #expect(kernel.freePages == free0 - 4)
        }
    }

    @Test("MADV_FREE keeps the contents (no reclaim) but makes the pages clean and lazily freeable")
    func madviseFree() throws {
        try withMachine { kernel, mm in
            let a = try mm.mmap(length: 4 * pageSize)
            try mm.fillPattern(a, length: 4 * pageSize, seed: 5)
            let folio = try #require(mappedPage(kernel, mm, a)).folio
            #expect(folio.flags.contains(.swapBacked))
            #expect(mm.entry(at: a).entry.isDirty)
            let free0 = kernel.freePages
            try mm.madvise(a, length: 4 * pageSize, advice: .free)
            #expect(!mm.entry(at: a).entry.isDirty)
            #expect(!folio.flags.contains(.swapBacked))
            #expect(!folio.isDirty)
            #expect(kernel.freePages == free0)
            #expect(try mm.verifyPattern(a, length: 4 * pageSize, seed: 5) == nil)
            try mm.store(a, 1)
            #expect(mm.entry(at: a).entry.isDirty, "a write after MADV_FREE dirties the PTE again")
            #expect(try mm.load(a) == 1)
        }
    }

    @Test("MADV_HUGEPAGE allows a 2 MiB folio in madvise mode; MADV_NOHUGEPAGE forbids it in always mode")
    func madviseHugePage() throws {
        try withMachine(thp: .madvise) { kernel, mm in
            let plain = try mm.mmap(length: hugeSize)
            try mm.store(plain, 1)
            #expect(mm.entry(at: plain).level == .pte)

            let huge = try mm.mmap(length: hugeSize)
            try mm.madvise(huge, length: hugeSize, advice: .hugePage)
            #expect(mm.mappings.first { $0.start == huge }?.flags.contains(.hugepage) == true)
            try mm.store(huge + PageGeometry.pageSize64 * 7, 2)
            #expect(mm.entry(at: huge).level == .pmd)
            #expect(try mm.load(huge + PageGeometry.pageSize64 * 7) == 2)
            #expect(kernel.vmstat[.thpFaultAlloc] == 1)
        }
        try withMachine(thp: .always) { kernel, mm in
            let a = try mm.mmap(length: 2 * hugeSize)
            try mm.madvise(a + UInt64(hugeSize), length: hugeSize, advice: .noHugePage)
            #expect(mm.mappings.count == 2, "MADV_NOHUGEPAGE on half a VMA splits it")
            try mm.store(a, 1)
            try mm.store(a + UInt64(hugeSize), 2)
            #expect(mm.entry(at: a).level == .pmd)
            #expect(mm.entry(at: a + UInt64(hugeSize)).level == .pte)
            #expect(kernel.vmstat[.thpFaultAlloc] == 1)
            #expect(try mm.load(a) == 1)
            #expect(try mm.load(a + UInt64(hugeSize)) == 2)
        }
    }

    @Test("MADV_DONTNEED of a whole PMD-mapped THP frees all 512 pages")
    func dontNeedWholeTHP() throws {
        try withMachine(thp: .always) { kernel, mm in
            let free0 = kernel.freePages
            let a = try mm.mmap(length: hugeSize)
            try mm.fillPattern(a, length: hugeSize, seed: 1)
            #expect(kernel.freePages == free0 - PageGeometry.pmdPages64)
            try mm.madvise(a, length: hugeSize, advice: .dontNeed)
            #expect(kernel.freePages == free0)
            #expect(try allZero(mm, a, length: hugeSize))
            #expect(kernel.freePages == free0, "reading after DONTNEED allocates nothing")
        }
    }

    @Test("dropping the address space (exit_mmap) returns every page")
    func exitMmapFreesEverything() throws {
        let kernel = try makeKernel(thp: .always)
        let free0 = kernel.freePages
        do {
            let mm = try AddressSpace(kernel: kernel)
            let a = try mm.mmap(length: 3 * hugeSize)
            try mm.fillPattern(a, length: 3 * hugeSize, seed: 2)
            try mm.munmap(a + UInt64(hugeSize) + PageGeometry.pageSize64, length: PageGeometry.pageSize)
            #expect(kernel.freePages < free0)
        }
        #expect(kernel.freePages == free0)
        #expect(kernel.diagnostics.isEmpty)
    }
}
