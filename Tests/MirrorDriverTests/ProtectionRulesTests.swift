import Testing
import SVMEmu
import MirrorDriver
import TestSupport

/// Mappings that migration installs take the VMA's protection, and mprotect
/// over migration entries follows change_pte_range().
@Suite("VMA protection across migration")
struct ProtectionRulesTests {

    @Test("device pages evicted from a PROT_NONE guard region stay inaccessible; the bytes come back with PROT_READ")
    func evictionInProtNoneVMA() throws {
        try withMachine { kernel, mm, device in
            let pages = 8
            let base = try mm.mmap(length: pages * pageSize)
            try mm.fillPattern(base, length: pages * pageSize, seed: 7)
            let expected = try mm.read(base, count: pages * pageSize)
            #expect(try device.migrateToDevice(base, pages: pages) == pages)
            try mm.mprotect(base, length: pages * pageSize, protection: .none)
            #expect(device.evictAll() == pages)
            for i in 0..<pages {
                let e = mm.entry(at: base + UInt64(i * pageSize)).entry
                #expect(e.kind == .present && e.isProtNone && !e.isWrite, "page \(i): \(e)")
            }
            #expect(throws: Errno.permissionDenied) { _ = try mm.read(base, count: 1) }
            try mm.mprotect(base, length: pages * pageSize, protection: .read)
            #expect(try mm.read(base, count: pages * pageSize) == expected)
            #expect(kernel.diagnostics.isEmpty, "\(kernel.diagnostics)")
        }
    }

    @Test("mprotect over a writable migration entry of an anonymous folio makes it read-exclusive: the page comes back anon-exclusive")
    func mprotectMakesReadExclusive() throws {
        try withMachine { kernel, mm, device in
            let base = try mm.mmap(length: pageSize)
            try mm.fillPattern(base, length: pageSize, seed: 3)
            let expected = try mm.read(base, count: pageSize)
            #expect(try device.migrateToDevice(base, pages: 1) == 1)
            let deviceEntry = mm.entry(at: base).entry
            #expect(deviceEntry.kind == .devicePrivate && deviceEntry.isWrite)

            // Evict by hand, with an mprotect between unmap and remap.
            var src = [MigratePFN](repeating: .empty, count: 1)
            var dst = [MigratePFN](repeating: .empty, count: 1)
            try kernel.migrateDeviceRange(&src, startPfn: deviceEntry.pfn, count: 1)
            #expect(src[0].isMigrating)
            let migration = mm.entry(at: base).entry
            #expect(migration.kind == .migration && migration.isWrite)
            // Another task's mprotect: the eviction holds the folio lock, and
            // mprotect's mmap lock comes before folio locks (lock order).
            #expect(onAnotherThread { (try? mm.mprotect(base, length: pageSize, protection: .read)) != nil })
            let protected = mm.entry(at: base).entry
            #expect(protected.kind == .migration && !protected.isWrite && protected.isReadExclusive)

            let spage = try #require(kernel.page(src[0]))
            let dfolio = try #require(kernel.allocateFolio(order: 0))
            dfolio.lock()
            dfolio.page(0).copyBytes(from: spage)
            dst[0] = MigratePFN(page: dfolio.page(0))
            kernel.migrateDevicePages(&src, &dst, count: 1)
            kernel.migrateDeviceFinalize(src, &dst, count: 1)

            let back = mm.entry(at: base).entry
            #expect(back.kind == .present && !back.isWrite)
            let page = try #require(kernel.page(pfn: back.pfn))
            #expect(page.isAnonExclusive, "a read-exclusive migration entry restores PageAnonExclusive")
            #expect(try mm.read(base, count: pageSize) == expected)
            #expect(kernel.diagnostics.isEmpty, "\(kernel.diagnostics)")
        }
    }

    @Test("migrate_vma_setup with an unaligned start and arrays sized for the unmasked count: EINVAL, nothing changed")
    func unalignedStartShortArrays() throws {
        try withMachine { kernel, mm, device in
            let base = try mm.mmap(length: 4 * pageSize)
            try mm.fillPattern(base, length: 4 * pageSize, seed: 1)
            let before = RangeSnapshot(kernel, mm, base, pages: 4)
            mm.mmapReadLock()
            defer { mm.mmapReadUnlock() }
            // [base + 100, base + 2 pages) is two pages once masked, one unmasked.
            let start = base + 100, end = base + UInt64(2 * pageSize)
            var args = MigrateVMA(vma: mm.vma(containing: base), start: start, end: end,
                                  flags: .system, pgmapOwner: device.owner)
            let unmasked = Int((end - start) >> PageGeometry.pageShift)
            args.src = [MigratePFN](repeating: .empty, count: unmasked)
            args.dst = [MigratePFN](repeating: .empty, count: unmasked)
            #expect(throws: Errno.invalidArgument) { try kernel.migrateVMASetup(&args) }
            #expect(RangeSnapshot(kernel, mm, base, pages: 4) == before)
        }
    }
}
