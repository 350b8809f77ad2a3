import Testing
import SVMEmu
import MirrorDriver

/// A driver that breaks a rule of the migrate_vma API gets a diagnostic naming
/// the rule; the kernel refuses the step and the source data stays intact.
@Suite("driver misuse is diagnosed, not corrupting")
struct MisuseTests {

    /// Migrates `pages` pages to the device, then runs the to-RAM direction by
    /// hand with `fill` choosing each entry's destination.
    static func migrateBackByHand(_ kernel: Kernel, _ mm: AddressSpace, _ device: MirrorDevice, _ base: UInt64, pages: Int,
                                  fill: (inout MigrateVMA, Int) -> Void) throws -> MigrateVMA {
        mm.mmapReadLock()
        defer { mm.mmapReadUnlock() }
        var args = MigrateVMA(vma: mm.vma(containing: base), start: base, end: base + UInt64(pages * pageSize),
                              flags: .devicePrivate, pgmapOwner: device.owner)
        try kernel.migrateVMASetup(&args)
        #expect(args.cpages == pages)
        for i in 0..<args.npages { fill(&args, i) }
        kernel.migrateVMAPages(&args)
        kernel.migrateVMAFinalize(&args)
        return args
    }

    @Test("a destination page that is not locked")
    func unlockedDestination() throws {
        try withMachine { kernel, mm, device in
            let base = try mm.mmap(length: 2 * pageSize)
            try mm.fillPattern(base, length: 2 * pageSize, seed: 61)
            try device.migrateToDevice(base, pages: 2)
            let unlocked = try #require(kernel.allocateFolio())
            let before = RangeSnapshot(kernel, mm, base, pages: 2)
            let freeWithIt = kernel.freePages
            _ = try Self.migrateBackByHand(kernel, mm, device, base, pages: 2) { args, i in
                if i == 0 {
                    unlocked.page(0).copyBytes(from: kernel.page(args.src[i])!)
                    args.dst[i] = MigratePFN(page: unlocked.page(0))  // never locked: the bug
                }
            }
            let d = kernel.takeDiagnostics(of: .apiMisuse)
            #expect(d.contains { $0.rule.contains("destination page must be locked") }, "\(d)")
            // Refused: the device page is mapped as before, the driver still owns its folio.
            #expect(RangeSnapshot(kernel, mm, base, pages: 2) == before)
            #expect(unlocked.refCount == 1 && unlocked.mapCount == 0 && !unlocked.isLocked)
            #expect(kernel.freePages == freeWithIt)
            unlocked.put()
            #expect(try mm.verifyPattern(base, length: 2 * pageSize, seed: 61) == nil)
            #expect(device.devicePagesInUse == 0)
            noLeaks(kernel, mm, base, pages: 2)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("a destination pfn outside every node and pool")
    func destinationOutsideEveryPool() throws {
        try withMachine { kernel, mm, device in
            let base = try mm.mmap(length: 2 * pageSize)
            try mm.fillPattern(base, length: 2 * pageSize, seed: 62)
            // RAM -> VRAM direction this time, by hand.
            let before = RangeSnapshot(kernel, mm, base, pages: 2)
            mm.mmapReadLock()
            var args = MigrateVMA(vma: mm.vma(containing: base), start: base, end: base + UInt64(2 * pageSize),
                                  flags: .system, pgmapOwner: device.owner)
            try kernel.migrateVMASetup(&args)
            args.dst[0] = MigratePFN(pfn: 0x1)
            kernel.migrateVMAPages(&args)
            #expect(!args.src[0].isMigrating)
            kernel.migrateVMAFinalize(&args)
            mm.mmapReadUnlock()
            let d = kernel.takeDiagnostics(of: .apiMisuse)
            #expect(d.contains { $0.rule.contains("not a page of this machine") }, "\(d)")
            #expect(RangeSnapshot(kernel, mm, base, pages: 2) == before)
            #expect(try mm.verifyPattern(base, length: 2 * pageSize, seed: 62) == nil)
            noLeaks(kernel, mm, base, pages: 2)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("a free device page (never zone_device_page_init'ed) as destination")
    func freeDevicePageDestination() throws {
        try withMachine { kernel, mm, device in
            let base = try mm.mmap(length: pageSize)
            try mm.fillPattern(base, length: pageSize, seed: 63)
            // Make the pool exist, then hand its page back so it is free.
            let probe = try #require(device.allocateDeviceFolio())
            probe.unlock()
            probe.put()
            let before = RangeSnapshot(kernel, mm, base, pages: 1)
            mm.mmapReadLock()
            var args = MigrateVMA(vma: mm.vma(containing: base), start: base, end: base + PageGeometry.pageSize64,
                                  flags: .system, pgmapOwner: device.owner)
            try kernel.migrateVMASetup(&args)
            args.dst[0] = MigratePFN(page: probe.page(0))
            kernel.migrateVMAPages(&args)
            kernel.migrateVMAFinalize(&args)
            mm.mmapReadUnlock()
            let d = kernel.takeDiagnostics(of: .apiMisuse)
            #expect(d.contains { $0.rule.contains("destination page is free") }, "\(d)")
            #expect(probe.refCount == 0)
            #expect(RangeSnapshot(kernel, mm, base, pages: 1) == before)
            #expect(try mm.verifyPattern(base, length: pageSize, seed: 63) == nil)
            #expect(device.devicePagesInUse == 0)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("finalize twice")
    func finalizeTwice() throws {
        try withMachine { kernel, mm, device in
            let n = 4
            let base = try mm.mmap(length: n * pageSize)
            try mm.fillPattern(base, length: n * pageSize, seed: 64)
            var (args, _) = try migrateByHand(kernel, mm, device, base, pages: n)
            let after = RangeSnapshot(kernel, mm, base, pages: n)
            mm.mmapReadLock()
            kernel.migrateVMAFinalize(&args)
            mm.mmapReadUnlock()
            let d = kernel.takeDiagnostics(of: .apiMisuse)
            #expect(d.contains { $0.rule.contains("migrate_vma_finalize: called twice") }, "\(d)")
            #expect(RangeSnapshot(kernel, mm, base, pages: n) == after)
            #expect(device.devicePagesInUse == UInt64(n))
            noLeaks(kernel, mm, base, pages: n)
            #expect(try mm.verifyPattern(base, length: n * pageSize, seed: 64) == nil)
            #expect(device.devicePagesInUse == 0)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("pages and finalize before setup")
    func beforeSetup() throws {
        try withMachine { kernel, mm, device in
            let base = try mm.mmap(length: pageSize)
            try mm.fillPattern(base, length: pageSize, seed: 65)
            let before = RangeSnapshot(kernel, mm, base, pages: 1)
            mm.mmapReadLock()
            var args = MigrateVMA(vma: mm.vma(containing: base), start: base, end: base + PageGeometry.pageSize64,
                                  flags: .system, pgmapOwner: device.owner)
            args.src[0] = MigratePFN(pfn: mm.entry(at: base).entry.pfn).with(MigratePFN.migrateBit)
            let d0 = try #require(device.allocateDeviceFolio())
            args.dst[0] = MigratePFN(page: d0.page(0))
            kernel.migrateVMAPages(&args)
            kernel.migrateVMAFinalize(&args)
            mm.mmapReadUnlock()
            let d = kernel.takeDiagnostics(of: .apiMisuse)
            #expect(d.contains { $0.rule.contains("migrate_vma_pages: called before migrate_vma_setup") }, "\(d)")
            #expect(d.contains { $0.rule.contains("migrate_vma_finalize: called before migrate_vma_setup") }, "\(d)")
            #expect(RangeSnapshot(kernel, mm, base, pages: 1) == before)
            // The destination is still the driver's: locked, one reference.
            #expect(d0.isLocked && d0.refCount == 1)
            d0.unlock()
            d0.put()
            #expect(try mm.verifyPattern(base, length: pageSize, seed: 65) == nil)
            #expect(device.devicePagesInUse == 0)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("setup again before finalize is refused; finalize then restores")
    func setupTwice() throws {
        try withMachine { kernel, mm, device in
            let base = try mm.mmap(length: 2 * pageSize)
            try mm.fillPattern(base, length: 2 * pageSize, seed: 66)
            let before = RangeSnapshot(kernel, mm, base, pages: 2)
            mm.mmapReadLock()
            var args = MigrateVMA(vma: mm.vma(containing: base), start: base, end: base + UInt64(2 * pageSize),
                                  flags: .system, pgmapOwner: device.owner)
            try kernel.migrateVMASetup(&args)
            let collected = args.src
            #expect(throws: Errno.invalidArgument) { try kernel.migrateVMASetup(&args) }
            #expect(args.src == collected)
            kernel.migrateVMAFinalize(&args)
            mm.mmapReadUnlock()
            let d = kernel.takeDiagnostics(of: .apiMisuse)
            #expect(d.contains { $0.rule.contains("not finalized") }, "\(d)")
            #expect(RangeSnapshot(kernel, mm, base, pages: 2) == before)
            #expect(try mm.verifyPattern(base, length: 2 * pageSize, seed: 66) == nil)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("migrate_vma_setup without the mmap lock is diagnosed")
    func setupWithoutMmapLock() throws {
        try withMachine { kernel, mm, device in
            let base = try mm.mmap(length: pageSize)
            try mm.fillPattern(base, length: pageSize, seed: 67)
            let vma = mm.withMmapReadLock { mm.vma(containing: base) }
            var args = MigrateVMA(vma: vma, start: base, end: base + PageGeometry.pageSize64, flags: .system, pgmapOwner: device.owner)
            try kernel.migrateVMASetup(&args)
            kernel.migrateVMAFinalize(&args)
            let d = kernel.takeDiagnostics(of: .lockNotHeld)
            #expect(!d.isEmpty, "\(kernel.diagnostics)")
            #expect(try mm.verifyPattern(base, length: pageSize, seed: 67) == nil)
            noLeaks(kernel, mm, base, pages: 1)
        }
    }
}
