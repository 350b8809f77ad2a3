import Testing
import SVMEmu
import MirrorDriver
import TestSupport

/// Pages migrate_vma must leave where they are: one whose lock someone else
/// holds, one with a reference its mappings do not explain, another owner's
/// device pages; and entries the driver leaves without a destination.
@Suite("pages migrate_vma skips stay intact")
struct SkipTests {
    static let pages = 8

    @Test("a page locked elsewhere is skipped by collect and stays mapped, locked by its holder")
    func lockedElsewhere() throws {
        try withMachine { kernel, mm, device in
            let n = Self.pages
            let base = try mm.mmap(length: n * pageSize)
            try mm.fillPattern(base, length: n * pageSize, seed: 31)
            let victim = base + 3 * UInt64(pageSize)
            let entry = mm.entry(at: victim).entry
            let held = try #require(folio(kernel, mm, victim))
            #expect(onAnotherThread { held.tryLock() })  // held by another task
            let (args, collected) = try migrateByHand(kernel, mm, device, base, pages: n)
            // collect's trylock failed: no entry at all for that page.
            #expect(collected[3] == .empty)
            #expect(args.src[3] == .empty)
            #expect(kernel.vmstat[.migrateVMACollected] == UInt64(n - 1))
            #expect(collected.enumerated().allSatisfy { $0.offset == 3 || $0.element.isMigrating })
            #expect(mm.entry(at: victim).entry == entry)
            #expect(held.isLocked)
            #expect(held.refCount == 1 && held.mapCount == 1)
            #expect(device.devicePagesInUse == UInt64(n - 1))
            for i in 0..<n where i != 3 {
                #expect(mm.entry(at: base + UInt64(i * pageSize)).entry.kind == .devicePrivate)
            }
            held.unlock()
            #expect(try mm.verifyPattern(base, length: n * pageSize, seed: 31) == nil)
            #expect(device.devicePagesInUse == 0)
            noLeaks(kernel, mm, base, pages: n)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("through the driver, a locked page makes migrateToDevice report ENOENT and nothing leaks")
    func lockedElsewhereThroughDriver() throws {
        try withMachine { kernel, mm, device in
            let n = Self.pages
            let base = try mm.mmap(length: n * pageSize)
            try mm.fillPattern(base, length: n * pageSize, seed: 32)
            let held = try #require(folio(kernel, mm, base + 5 * PageGeometry.pageSize64))
            #expect(onAnotherThread { held.tryLock() })  // held by another task
            #expect(throws: Errno.noEntry) { try device.migrateToDevice(base, pages: n) }
            #expect(device.devicePagesInUse == UInt64(n - 1))
            #expect(mm.entry(at: base + 5 * PageGeometry.pageSize64).entry.kind == .present)
            held.unlock()
            #expect(try device.migrateToSystem(base, pages: n) == n - 1)
            #expect(try mm.verifyPattern(base, length: n * pageSize, seed: 32) == nil)
            #expect(device.devicePagesInUse == 0)
            noLeaks(kernel, mm, base, pages: n)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("a page with an extra reference fails the reference check in unmap and is restored")
    func extraReference() throws {
        try withMachine { kernel, mm, device in
            let n = Self.pages
            let base = try mm.mmap(length: n * pageSize)
            try mm.fillPattern(base, length: n * pageSize, seed: 33)
            let victim = base + 5 * UInt64(pageSize)
            let entry = mm.entry(at: victim).entry
            let pinned = try #require(folio(kernel, mm, victim))
            pinned.get()  // e.g. a get_user_pages() holder
            let restoredBefore = kernel.vmstat[.migrateVMARestored]
            let (args, collected) = try migrateByHand(kernel, mm, device, base, pages: n)
            // Collected, then dropped by unmap: setup's src has no entry for it.
            #expect(collected[5] == .empty)
            #expect(args.src[5] == .empty)
            #expect(kernel.vmstat[.migrateVMARestored] == restoredBefore + 1)
            #expect(mm.entry(at: victim).entry.pfn == entry.pfn)
            #expect(mm.entry(at: victim).entry.kind == .present)
            #expect(mm.entry(at: victim).entry.isWrite)
            #expect(!pinned.isLocked)
            #expect(pinned.refCount == 2 && pinned.mapCount == 1)
            #expect(device.devicePagesInUse == UInt64(n - 1))
            pinned.put()
            #expect(try mm.verifyPattern(base, length: n * pageSize, seed: 33) == nil)
            noLeaks(kernel, mm, base, pages: n)
            #expect(device.devicePagesInUse == 0)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("another owner's device pages are not selected")
    func otherOwner() throws {
        try withMachine { kernel, mm, a in
            var b: MirrorDevice? = try MirrorDevice(kernel: kernel, mm: mm, name: "mirror1", vramBytes: 64 << 20, chunkBytes: 32 << 20)
            defer { b = nil }
            let deviceB = try #require(b)
            #expect(deviceB.owner != a.owner)
            let n = Self.pages
            let base = try mm.mmap(length: n * pageSize)
            try mm.fillPattern(base, length: n * pageSize, seed: 34)
            try a.migrateToDevice(base, pages: n)
            let before = RangeSnapshot(kernel, mm, base, pages: n)

            // B's driver asks for its own pages back: none are.
            #expect(try deviceB.migrateToSystem(base, pages: n) == 0)
            #expect(RangeSnapshot(kernel, mm, base, pages: n) == before)

            // By hand, with B's owner (and with no owner at all): nothing collected.
            for owner in [deviceB.owner, nil] as [DeviceOwner?] {
                mm.mmapReadLock()
                var args = MigrateVMA(vma: mm.vma(containing: base), start: base, end: base + UInt64(n * pageSize),
                                      flags: [.devicePrivate, .system], pgmapOwner: owner)
                try kernel.migrateVMASetup(&args)
                #expect(args.cpages == 0)
                #expect(args.npages == n)
                #expect(args.src[0..<n].allSatisfy { $0 == .empty })
                kernel.migrateVMAFinalize(&args)
                mm.mmapReadUnlock()
                #expect(RangeSnapshot(kernel, mm, base, pages: n) == before)
            }
            // B migrating the range to its own VRAM does not take A's pages either.
            #expect(throws: Errno.noEntry) { try deviceB.migrateToDevice(base, pages: n) }
            #expect(deviceB.devicePagesInUse == 0)
            #expect(RangeSnapshot(kernel, mm, base, pages: n) == before)

            #expect(a.devicePagesInUse == UInt64(n))
            #expect(try a.migrateToSystem(base, pages: n) == n)
            #expect(try mm.verifyPattern(base, length: n * pageSize, seed: 34) == nil)
            #expect(a.devicePagesInUse == 0)
            noLeaks(kernel, mm, base, pages: n)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("dst left empty for some entries restores exactly those")
    func partialDestination() throws {
        try withMachine { kernel, mm, device in
            let n = 16
            let base = try mm.mmap(length: n * pageSize)
            try mm.fillPattern(base, length: n * pageSize, seed: 35)
            let before = RangeSnapshot(kernel, mm, base, pages: n)
            let freeBefore = kernel.freePages
            let given = { (i: Int) in i % 3 != 0 }
            let (args, _) = try migrateByHand(kernel, mm, device, base, pages: n, give: given)
            var moved = 0
            for i in 0..<n {
                let a = base + UInt64(i * pageSize)
                if given(i) {
                    #expect(args.src[i].isMigrating)
                    #expect(mm.entry(at: a).entry.kind == .devicePrivate)
                    moved += 1
                } else {
                    // MIGRATE cleared by pages, the source put back as it was.
                    #expect(!args.src[i].isMigrating)
                    #expect(mm.entry(at: a).entry.rawValue == before.pages[i].entry)
                    let f = try #require(folio(kernel, mm, a))
                    #expect(f.refCount == 1 && f.mapCount == 1 && !f.isLocked)
                }
            }
            #expect(device.devicePagesInUse == UInt64(moved))
            #expect(kernel.freePages == freeBefore + UInt64(moved))
            noLeaks(kernel, mm, base, pages: n)
            #expect(try mm.verifyPattern(base, length: n * pageSize, seed: 35) == nil)
            #expect(device.devicePagesInUse == 0)
            #expect(kernel.freePages == freeBefore)
            #expect(kernel.diagnostics.isEmpty)
        }
    }
}
