import Foundation
import SVMEmu
import MirrorDriver

/// hmm_gup_test (the kernel runs it through the gup_test module) and what a
/// pin does to a migration.
/// The time limit only catches a hang: under ThreadSanitizer on a small host
/// these cases wait their turn behind the THP cases for over a minute.
struct HMMGUPCases {

    /// Test get user device pages through gup_test: four pages in device
    /// memory; get_user_pages, get_user_pages_fast, pin_user_pages_fast
    /// (FOLL_LONGTERM) and pin_user_pages (FOLL_LONGTERM) on one page each.
    /// Device-private pages all come back to system memory; device-coherent
    /// ones only for the long-term pins. Writable, bytes intact.
    func hmm_gup_test(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            let npages = 4
            let size = npages << pageShift
            let buffer = try countingBuffer(mm, npages: npages)

            expect(hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0, #"hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            expect(firstMismatch(buffer.mirrorInts) { Int32($0) } == nil, #"firstMismatch(buffer.mirrorInts) { Int32($0) } == nil"#)

            func page(_ i: Int) -> UInt64 { buffer.ptr + UInt64(i << pageShift) }
            // GUP_BASIC_TEST: get_user_pages() under the mmap lock.
            let basic = try mm.withMmapReadLock { () throws(Errno) in try mm.getUserPages(page(0), count: 1) }
            for p in basic { p.folio.put() }
            // GUP_FAST_BENCHMARK.
            for p in try mm.getUserPagesFast(page(1), count: 1) { p.folio.put() }
            // PIN_FAST_BENCHMARK with FOLL_LONGTERM.
            for p in try mm.pinUserPagesFast(page(2), count: 1, flags: .longterm) {
                expect(p.folio.isMaybeDMAPinned && !p.isZoneDevice, #"p.folio.isMaybeDMAPinned && !p.isZoneDevice"#)
                f.kernel.unpinUserPage(p)
            }
            // PIN_LONGTERM_BENCHMARK: pin_user_pages(FOLL_LONGTERM).
            let pinned = try mm.withMmapReadLock { () throws(Errno) in try mm.pinUserPages(page(3), count: 1, flags: .longterm) }
            for p in pinned { f.kernel.unpinUserPage(p) }

            expect(hmmCommand(f.dev0, .snapshot, buffer, npages) == 0, #"hmmCommand(f.dev0, .snapshot, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            // Coherent pages stay where get_user_pages found them; the long-term
            // pins moved theirs to system memory first.
            let first = variant.isCoherent ? DMirrorProt.deviceCoherentLocal | DMirrorProt.write : DMirrorProt.write
            expect(buffer.mirrorBytes[0] == first, #"buffer.mirrorBytes[0] == first"#)
            expect(buffer.mirrorBytes[1] == first, #"buffer.mirrorBytes[1] == first"#)
            expect(buffer.mirrorBytes[2] == DMirrorProt.write, #"buffer.mirrorBytes[2] == DMirrorProt.write"#)
            expect(buffer.mirrorBytes[3] == DMirrorProt.write, #"buffer.mirrorBytes[3] == DMirrorProt.write"#)
            expect(firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { Int32($0) } == nil, #"firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { Int32($0) } == nil"#)
            expect(f.kernel.diagnostics.isEmpty, #"f.kernel.diagnostics.isEmpty"#)
        }
    }

    /// A pinned page stays where it is: migrate_vma's collect cannot share
    /// it (folio_try_share_anon_rmap_pte fails), so MIGRATE_TO_DEV stops at
    /// it (-ENOENT after the pages before it); once unpinned it migrates.
    func pinned_page_is_not_migrated(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            let npages = 4
            let buffer = try countingBuffer(mm, npages: npages)
            let second = buffer.ptr + UInt64(1 << pageShift)
            let pins = try mm.pinUserPagesFast(second, count: 1, flags: [.write, .longterm])
            expect(pins.count == 1, #"pins.count == 1"#)
            let before = mm.entry(at: second).entry

            expect(hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == -ENOENT, #"hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == -ENOENT"#)
            let after = mm.entry(at: second).entry
            expect(after.kind == .present && after.pfn == before.pfn && after.pfn == pins[0].pfn, #"after.kind == .present && after.pfn == before.pfn && after.pfn == pins[0].pfn"#)
            // A device write through the pin reaches the mapped page.
            pins[0].withBytes { $0.storeBytes(of: Int32(-1), as: Int32.self) }
            expect(try loadInt(mm, buffer.ptr, 1024) == -1, #"try loadInt(mm, buffer.ptr, 1024) == -1"#)

            for p in pins { f.kernel.unpinUserPage(p) }
            expect(hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0, #"hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            expect(firstMismatch(buffer.mirrorInts) { $0 == 1024 ? -1 : Int32($0) } == nil, #"firstMismatch(buffer.mirrorInts) { $0 == 1024 ? -1 : Int32($0) } == nil"#)
            expect(f.kernel.diagnostics.isEmpty, #"f.kernel.diagnostics.isEmpty"#)
        }
    }

}
