import Testing
import SVMEmu
import MirrorDriver

/// migrate_vma_setup()'s argument checks: each fails with -EINVAL
/// (`Errno.invalidArgument`) and leaves page tables, references, locks and
/// free memory exactly as they were.
@Suite("migrate_vma_setup argument checks")
struct SetupChecksTests {

    /// One way of breaking the arguments of a migration of an 8-page buffer.
    enum BadArgument: String, CaseIterable, CustomTestStringConvertible, Sendable {
        case noVMA = "no vma"
        case unmappedVMA = "a VMA that munmap removed"
        case emptyRange = "start == end"
        case negativeRange = "end < start"
        case startBeforeVMA = "start below the VMA"
        case startPastVMA = "start at the VMA's end"
        case endPastVMA = "end beyond the VMA"
        case srcTooShort = "src shorter than the range"
        case dstTooShort = "dst shorter than the range"
        case faultPageNotDevicePrivate = "fault page in system RAM"
        case faultPageNotLocked = "fault page not locked (trylock policy)"
        var testDescription: String { rawValue }
    }

    @Test("each bad argument gives EINVAL and changes nothing", arguments: BadArgument.allCases)
    func badArgument(_ bad: BadArgument) throws {
        try withMachine { kernel, mm, device in
            let pages = 8
            // A guard mapping below the buffer, so "start below the VMA" lies in another VMA.
            let below = try mm.mmap(length: pages * pageSize)
            let base = try mm.mmap(address: below + UInt64(pages * pageSize), length: pages * pageSize)
            try mm.fillPattern(base, length: pages * pageSize, seed: 11)
            let dead = try mm.mmap(length: pageSize)
            let deadVMA = mm.withMmapReadLock { mm.vma(containing: dead) }
            try mm.munmap(dead, length: pageSize)
            // A device page for the fault-page cases (locked, one reference).
            let devFolio = try #require(device.allocateDeviceFolio())
            let systemPage = try #require(folio(kernel, mm, base)).page(0)

            let before = RangeSnapshot(kernel, mm, base, pages: pages)
            let vmstatBefore = kernel.vmstat.snapshot()

            mm.mmapReadLock()
            let vma = try #require(mm.vma(containing: base))
            var args = MigrateVMA(vma: vma, start: base, end: base + UInt64(pages * pageSize),
                                  flags: .system, pgmapOwner: device.owner)
            switch bad {
            case .noVMA: args.vma = nil
            case .unmappedVMA: args.vma = deadVMA
            case .emptyRange: args.end = args.start
            case .negativeRange: args.end = args.start - UInt64(pageSize)
            case .startBeforeVMA: args.start = base - UInt64(pageSize)
            case .startPastVMA: args.start = vma.end; args.end = vma.end + UInt64(pageSize)
            case .endPastVMA: args.end = vma.end + UInt64(pageSize)
            case .srcTooShort: args.src.removeLast()
            case .dstTooShort: args.dst.removeLast()
            case .faultPageNotDevicePrivate: args.faultPage = systemPage
            case .faultPageNotLocked:
                devFolio.unlock()
                args.faultPage = devFolio.page(0)
            }
            let sentinel = MigratePFN(rawValue: 0xdead_0000)
            for i in 0..<args.src.count { args.src[i] = sentinel }
            #expect(throws: Errno.invalidArgument) { try kernel.migrateVMASetup(&args) }
            mm.mmapReadUnlock()

            // Nothing collected, src untouched (the checks run before src is zeroed).
            #expect(args.cpages == 0)
            #expect(args.npages == 0)
            #expect(args.src.allSatisfy { $0 == sentinel })
            #expect(RangeSnapshot(kernel, mm, base, pages: pages) == before)
            #expect(kernel.vmstat.snapshot() == vmstatBefore)
            #expect(try mm.verifyPattern(base, length: pages * pageSize, seed: 11) == nil)
            #expect(kernel.diagnostics.isEmpty)
            // A failed setup needs no finalize; calling it is the "before setup" misuse.
            if devFolio.isLocked { devFolio.unlock() }
            devFolio.put()
            #expect(device.devicePagesInUse == 0)
        }
    }

    @Test("the legacy kernels did not require the fault page to be locked")
    func legacyAcceptsUnlockedFaultPage() throws {
        try withMachine(policy: .legacy) { kernel, mm, device in
            let base = try mm.mmap(length: pageSize)
            try mm.fillPattern(base, length: pageSize, seed: 5)
            try device.migrateToDevice(base, pages: 1)
            let devFolio = try #require(folio(kernel, mm, base))
            #expect(devFolio.isDevicePrivate && !devFolio.isLocked)
            mm.mmapReadLock()
            var args = MigrateVMA(vma: mm.vma(containing: base), start: base, end: base + PageGeometry.pageSize64,
                                  flags: .devicePrivate, pgmapOwner: device.owner, faultPage: devFolio.page(0))
            try kernel.migrateVMASetup(&args)
            // Legacy collect trylocks the fault page like any other.
            #expect(args.cpages == 1)
            #expect(devFolio.isLocked)
            // Nothing copied: finalize with an empty dst restores the device page.
            kernel.migrateVMAFinalize(&args)
            mm.mmapReadUnlock()
            #expect(mm.entry(at: base).entry.kind == .devicePrivate)
            #expect(!devFolio.isLocked)
            noLeaks(kernel, mm, base, pages: 1)
            #expect(try mm.verifyPattern(base, length: pageSize, seed: 5) == nil)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("an unaligned start and end are masked down, not refused")
    func unalignedRangeIsMasked() throws {
        try withMachine { kernel, mm, device in
            let base = try mm.mmap(length: 4 * pageSize)
            try mm.fillPattern(base, length: 4 * pageSize, seed: 9)
            mm.mmapReadLock()
            var args = MigrateVMA(vma: mm.vma(containing: base), start: base + 100, end: base + 2 * PageGeometry.pageSize64 + 100,
                                  flags: .system, pgmapOwner: device.owner)
            try kernel.migrateVMASetup(&args)
            #expect(args.start == base)
            #expect(args.npages == 2)
            kernel.migrateVMAFinalize(&args)
            mm.mmapReadUnlock()
            noLeaks(kernel, mm, base, pages: 4)
            #expect(try mm.verifyPattern(base, length: 4 * pageSize, seed: 9) == nil)
            #expect(kernel.diagnostics.isEmpty)
        }
    }
}
