import Testing
@testable import SVMEmu

@Suite("MADV_COLLAPSE")
struct CollapseTests {
    @Test("512 written 4 KiB pages collapse into one THP with the same bytes; the old pages are freed")
    func collapseKeepsBytes() throws {
        try withMachine(thp: .madvise) { kernel, mm in
            let raw = try mm.mmap(length: 2 * hugeSize)
            let base = (raw + UInt64(hugeSize) - 1) & ~UInt64(hugeSize - 1)
            // Leave some pages untouched and some only read (zero page).
            try mm.fillPattern(base, length: hugeSize / 2, seed: 77)
            _ = try mm.load(base + UInt64(hugeSize) - PageGeometry.pageSize64)
            #expect(mm.entry(at: base).level == .pte)
            let free = kernel.freePages
            try mm.madvise(base, length: hugeSize, advice: .collapse)
            let (level, entry) = mm.entry(at: base)
            #expect(level == .pmd && entry.kind == .present && entry.isWrite)
            #expect(try mm.verifyPattern(base, length: hugeSize / 2, seed: 77) == nil)
            #expect(try mm.read(base + UInt64(hugeSize / 2), count: 64) == [UInt8](repeating: 0, count: 64))
            // 256 small pages went back, one 2 MiB folio was taken.
            #expect(kernel.freePages == free + 256 - PageGeometry.pmdPages64)
            let folio = try #require(kernel.page(pfn: entry.pfn)).folio
            #expect(folio.order == PageGeometry.pmdOrder && folio.refCount == 1 && folio.entireMapCount == 1)
            #expect(kernel.vmstat[.thpCollapseAlloc] == 1)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("a region with a migration-style entry or VM_NOHUGEPAGE is refused and left as it was")
    func collapseRefusals() throws {
        try withMachine(thp: .madvise) { kernel, mm in
            let raw = try mm.mmap(length: 2 * hugeSize)
            let base = (raw + UInt64(hugeSize) - 1) & ~UInt64(hugeSize - 1)
            try mm.fillPattern(base, length: hugeSize, seed: 5)
            try mm.madvise(base, length: hugeSize, advice: .noHugePage)
            #expect(throws: Errno.invalidArgument) { try mm.madvise(base, length: hugeSize, advice: .collapse) }
            #expect(mm.entry(at: base).level == .pte)
            #expect(try mm.verifyPattern(base, length: hugeSize, seed: 5) == nil)
            // A 1 MiB range holds no whole aligned region.
            #expect(throws: Errno.invalidArgument) { try mm.madvise(base, length: hugeSize / 2, advice: .collapse) }
            #expect(kernel.vmstat[.thpCollapseAlloc] == 0)
        }
    }
}
