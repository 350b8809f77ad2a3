import Testing
import SVMEmu
import MirrorDriver

/// 2 MiB folios end to end: whole-folio migration both ways, PMD entries,
/// splits, allocation fallbacks, partial unmaps. Bytes checked every time.
@Suite("2 MiB folios")
struct CompoundTests {
    static let huge = PageGeometry.pmdSize

    func machine(failLargeDevice: Bool = false, failLargeSystem: Bool = false) throws -> (Kernel, AddressSpace, MirrorDevice) {
        let (kernel, mm, device) = try bootMachine(thp: .always)
        var s = device.settings
        s.migrationGranularity = .huge2M
        s.failLargeDeviceAllocation = failLargeDevice
        s.failLargeSystemAllocation = failLargeSystem
        device.settings = s
        return (kernel, mm, device)
    }

    @Test("a written THP moves to VRAM as one device folio and faults back whole")
    func wholeTHPRoundTrip() throws {
        let (kernel, mm, device) = try machine()
        let base = try mm.mmap(length: Self.huge)
        try mm.fillPattern(base, length: Self.huge, seed: 11)
        #expect(mm.entry(at: base).level == .pmd)
        let freeBefore = kernel.freePages
        #expect(try device.migrateToDevice(base, pages: PageGeometry.pmdPages) == PageGeometry.pmdPages)
        let (level, entry) = mm.entry(at: base)
        #expect(level == .pmd && entry.kind == .devicePrivate)
        #expect(kernel.vmstat[.thpMigrationSuccess] == 1)
        #expect(kernel.vmstat[.thpMigrationSplit] == 0)
        #expect(kernel.freePages == freeBefore + PageGeometry.pmdPages64)
        // One CPU touch brings all 2 MiB back through one PMD-level fault.
        #expect(try mm.verifyPattern(base + PageGeometry.pageSize64 * 7, length: 8, seed: 11) == nil)
        let back = mm.entry(at: base)
        #expect(back.level == .pmd && back.entry.kind == .present)
        #expect(device.migrateToRAMCalls == 1)
        #expect(try mm.verifyPattern(base, length: Self.huge, seed: 11) == nil)
        #expect(device.devicePagesInUse == 0)
        #expect(kernel.vmstat[.thpMigrationSuccess] == 2)
        #expect(kernel.diagnostics.isEmpty)
    }

    @Test("an empty 2 MiB region is filled with one device folio; reads give zeroes")
    func emptyRegion() throws {
        let (kernel, mm, device) = try machine()
        let base = try mm.mmap(length: Self.huge)
        #expect(try device.migrateToDevice(base, pages: PageGeometry.pmdPages) == PageGeometry.pmdPages)
        #expect(mm.entry(at: base).level == .pmd)
        #expect(mm.entry(at: base).entry.kind == .devicePrivate)
        #expect(try device.read(base + 12345, count: 64) == [UInt8](repeating: 0, count: 64))
        #expect(try mm.read(base + 99, count: 16) == [UInt8](repeating: 0, count: 16))
        #expect(mm.entry(at: base).entry.kind == .present)
        #expect(kernel.diagnostics.isEmpty)
    }

    @Test("the huge zero page is replaced by a device folio")
    func hugeZeroPage() throws {
        let (kernel, mm, device) = try machine()
        let base = try mm.mmap(length: Self.huge)
        #expect(try mm.load(base) == 0)
        #expect(mm.entry(at: base).entry.isSpecial)
        #expect(try device.migrateToDevice(base, pages: PageGeometry.pmdPages) == PageGeometry.pmdPages)
        #expect(mm.entry(at: base).entry.kind == .devicePrivate)
        try mm.store(base + 5, 42)
        #expect(try mm.load(base + 5) == 42)
        #expect(try mm.load(base + PageGeometry.pageSize64 * 300) == 0)
        #expect(kernel.diagnostics.isEmpty)
    }

    @Test("collect meets the huge zero PMD: skipped unsplit without SELECT_SYSTEM, 512 holes unsplit with it")
    func hugeZeroCollectedAsHole() throws {
        let (kernel, mm, device) = try machine()
        let base = try mm.mmap(length: Self.huge)
        #expect(try mm.load(base) == 0)
        let zero = mm.entry(at: base)
        #expect(zero.level == .pmd && zero.entry.isSpecial)
        mm.mmapReadLock()
        defer { mm.mmapReadUnlock() }
        for flags: MigrateSelect in [.devicePrivate, .system] {
            var args = MigrateVMA(vma: mm.vma(containing: base), start: base, end: base + UInt64(Self.huge),
                                  flags: flags, pgmapOwner: device.owner)
            try kernel.migrateVMASetup(&args)
            #expect(mm.entry(at: base).level == .pmd && mm.entry(at: base).entry == zero.entry,
                    "\(flags): collect must not split the huge zero PMD")
            if flags == .system {
                #expect(args.cpages == PageGeometry.pmdPages)
                #expect(args.src[0..<PageGeometry.pmdPages].allSatisfy { $0 == .hole }, "a hole per page, no page behind it")
            } else {
                #expect(args.cpages == 0)
                #expect(args.src[0..<PageGeometry.pmdPages].allSatisfy { $0 == .empty })
            }
            kernel.migrateVMAPages(&args)
            kernel.migrateVMAFinalize(&args)
            #expect(mm.entry(at: base).entry == zero.entry)
        }
        #expect(kernel.diagnostics.isEmpty)
    }

    @Test("forced 2 MiB device allocation failure falls back to 512 small pages")
    func deviceAllocationFallback() throws {
        let (kernel, mm, device) = try machine(failLargeDevice: true)
        let base = try mm.mmap(length: Self.huge)
        try mm.fillPattern(base, length: Self.huge, seed: 5)
        #expect(try device.migrateToDevice(base, pages: PageGeometry.pmdPages) == PageGeometry.pmdPages)
        #expect(kernel.vmstat[.thpMigrationSplit] == 1)
        #expect(mm.entry(at: base).level == .pte)
        #expect(mm.entry(at: base + PageGeometry.pageSize64).entry.kind == .devicePrivate)
        #expect(try mm.verifyPattern(base, length: Self.huge, seed: 5) == nil)
        #expect(device.devicePagesInUse == 0)
        #expect(kernel.diagnostics.isEmpty)
    }

    @Test("forced 2 MiB system allocation failure brings a device folio back as 512 pages")
    func systemAllocationFallback() throws {
        let (kernel, mm, device) = try machine(failLargeSystem: true)
        let base = try mm.mmap(length: Self.huge)
        try mm.fillPattern(base, length: Self.huge, seed: 6)
        #expect(try device.migrateToDevice(base, pages: PageGeometry.pmdPages) == PageGeometry.pmdPages)
        #expect(mm.entry(at: base).level == .pmd)
        #expect(try mm.verifyPattern(base, length: Self.huge, seed: 6) == nil)
        #expect(mm.entry(at: base).level == .pte)
        #expect(kernel.vmstat[.thpMigrationSplit] == 1)
        // The device folio was split: folioSplit for each of the 511 new
        // folios, then once with no tail to mark the end.
        #expect(device.folioSplitCalls.tails == PageGeometry.pmdPages - 1)
        #expect(device.folioSplitCalls.ends == 1)
        #expect(device.devicePagesInUse == 0)
        #expect(kernel.diagnostics.isEmpty)
    }

    @Test("1 MiB unmapped from a device folio at offset", arguments: [0, 512 << 10, 1 << 20])
    func partialUnmap(offset: Int) throws {
        let (kernel, mm, device) = try machine()
        let base = try mm.mmap(length: Self.huge)
        try mm.fillPattern(base, length: Self.huge, seed: 9)
        try device.migrateToDevice(base, pages: PageGeometry.pmdPages)
        try mm.munmap(base + UInt64(offset), length: 1 << 20)
        #expect(mm.entry(at: base + UInt64(offset)).entry.kind == .none)
        // The rest faults back with its bytes.
        var a = base
        while a < base + UInt64(Self.huge) {
            if a < base + UInt64(offset) || a >= base + UInt64(offset + (1 << 20)) {
                #expect(try mm.verifyPattern(a, length: PageGeometry.pageSize, seed: 9) == nil)
            }
            a += PageGeometry.pageSize64
        }
        try mm.munmap(base, length: Self.huge)
        #expect(device.devicePagesInUse == 0)
        #expect(kernel.diagnostics.isEmpty)
    }

    @Test("eviction brings a device folio back whole, never split")
    func evictionKeepsFolioWhole() throws {
        let (kernel, mm, device) = try machine()
        let base = try mm.mmap(length: Self.huge * 2)
        try mm.fillPattern(base, length: Self.huge * 2, seed: 13)
        try device.migrateToDevice(base, pages: 1024)
        let splitsBefore = kernel.vmstat[.thpMigrationSplit]
        #expect(device.evictAll() == 1024)
        #expect(kernel.vmstat[.thpMigrationSplit] == splitsBefore)
        #expect(mm.entry(at: base).level == .pmd && mm.entry(at: base).entry.kind == .present)
        #expect(mm.entry(at: base + UInt64(Self.huge)).level == .pmd)
        #expect(try mm.verifyPattern(base, length: Self.huge * 2, seed: 13) == nil)
        #expect(device.devicePagesInUse == 0)
        #expect(kernel.diagnostics.isEmpty)
    }

    @Test("without SELECT_COMPOUND a THP is split and moves as 512 pages")
    func nonCompoundSplits() throws {
        let (kernel, mm, device) = try bootMachine(thp: .always)
        let base = try mm.mmap(length: Self.huge)
        try mm.fillPattern(base, length: Self.huge, seed: 21)
        #expect(mm.entry(at: base).level == .pmd)
        #expect(try device.migrateToDevice(base, pages: PageGeometry.pmdPages) == PageGeometry.pmdPages)
        #expect(mm.entry(at: base).level == .pte)
        #expect(kernel.vmstat[.thpSplitPage] == 1)
        #expect(try mm.verifyPattern(base, length: Self.huge, seed: 21) == nil)
        #expect(kernel.diagnostics.isEmpty)
    }

    @Test("MADV_FREE on a THP that came back from the device keeps it intact until reclaim")
    func madvFreeAfterMigration() throws {
        let (kernel, mm, device) = try machine()
        let base = try mm.mmap(length: Self.huge)
        try mm.fillPattern(base, length: Self.huge, seed: 3)
        try device.migrateToDevice(base, pages: PageGeometry.pmdPages)
        #expect(try mm.verifyPattern(base, length: 8, seed: 3) == nil)
        try mm.madvise(base, length: Self.huge, advice: .free)
        #expect(try mm.verifyPattern(base, length: Self.huge, seed: 3) == nil)
        #expect(try device.migrateToDevice(base, pages: PageGeometry.pmdPages) == PageGeometry.pmdPages)
        #expect(try mm.verifyPattern(base, length: Self.huge, seed: 3) == nil)
        #expect(kernel.diagnostics.isEmpty)
    }

    @Test("under the legacy policy a PMD-level device fault still brings the folio back (that path always trylocks)")
    func legacyPMDFault() throws {
        let (kernel, mm, device) = try bootMachine(policy: .legacy, thp: .always)
        var s = device.settings
        s.migrationGranularity = .huge2M
        device.settings = s
        let base = try mm.mmap(length: Self.huge)
        try mm.fillPattern(base, length: Self.huge, seed: 17)
        try device.migrateToDevice(base, pages: PageGeometry.pmdPages)
        #expect(mm.entry(at: base).entry.kind == .devicePrivate)
        // A bounded access: a regression would loop in migrateToRAM forever.
        let value = try mm.withPageBytes(at: base, write: false, faultLimit: 8) { $0.load(as: UInt8.self) }
        #expect(value != nil)
        #expect(device.migrateToRAMCalls == 1)
        #expect(try mm.verifyPattern(base, length: Self.huge, seed: 17) == nil)
        #expect(kernel.diagnostics.isEmpty)
    }
}
