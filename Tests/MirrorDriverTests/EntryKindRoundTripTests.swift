import Testing
import SVMEmu
import MirrorDriver

/// The four kinds of entry a migration to the device meets (hole, zero page,
/// read-only page, read-write page): each one's bytes survive RAM -> VRAM ->
/// RAM, whichever way they come back.
@Suite("RAM to VRAM to RAM for every entry kind")
struct EntryKindRoundTripTests {

    enum Kind: String, CaseIterable, CustomTestStringConvertible, Sendable {
        case hole = "never touched (hole)"
        case zeroPage = "read-touched (zero page)"
        case readOnly = "written, then mprotect read-only"
        case readWrite = "written (read-write)"
        var testDescription: String { rawValue }
        var hasData: Bool { self == .readOnly || self == .readWrite }
        var writable: Bool { self != .readOnly }
    }

    enum Return: String, CaseIterable, CustomTestStringConvertible, Sendable {
        case cpuFault = "CPU touch (migrateToRAM)"
        case migrateToSystem = "driver migrateToSystem"
        case eviction = "eviction (migrate_device_range)"
        var testDescription: String { rawValue }
    }

    static let pages = 16

    /// Maps 16 pages and puts them in state `kind`.
    static func prepare(_ kind: Kind, _ mm: AddressSpace) throws -> UInt64 {
        let base = try mm.mmap(length: pages * pageSize)
        switch kind {
        case .hole: break
        case .zeroPage:
            for i in 0..<pages { _ = try mm.load(base + UInt64(i * pageSize)) }
        case .readOnly:
            try mm.fillPattern(base, length: pages * pageSize, seed: 21)
            try mm.mprotect(base, length: pages * pageSize, protection: .read)
        case .readWrite:
            try mm.fillPattern(base, length: pages * pageSize, seed: 21)
        }
        return base
    }

    static func bytesIntact(_ kind: Kind, _ mm: AddressSpace, _ base: UInt64) throws -> Bool {
        if kind.hasData { return try mm.verifyPattern(base, length: pages * pageSize, seed: 21) == nil }
        return try mm.read(base, count: pages * pageSize).allSatisfy { $0 == 0 }
    }

    @Test("migrate_vma_setup encodes each kind as the kernel does", arguments: Kind.allCases)
    func sourceEncoding(_ kind: Kind) throws {
        try withMachine { kernel, mm, device in
            let base = try Self.prepare(kind, mm)
            let entryBefore = mm.entry(at: base).entry
            mm.mmapReadLock()
            var args = MigrateVMA(vma: mm.vma(containing: base), start: base, end: base + UInt64(Self.pages * pageSize),
                                  flags: .system, pgmapOwner: device.owner)
            try kernel.migrateVMASetup(&args)
            #expect(args.npages == Self.pages)
            #expect(args.cpages == Self.pages)
            let s = args.src[0]
            switch kind {
            case .hole, .zeroPage:
                // MIGRATE without VALID: a hole the driver may fill.
                #expect(s == .hole)
            case .readOnly, .readWrite:
                #expect(s.isValid && s.isMigrating && s.pfn == entryBefore.pfn)
                #expect(s.isWrite == kind.writable)
                let f = try #require(kernel.page(s)).folio
                // Collected: locked, unmapped, one reference (the migration's).
                #expect(f.isLocked)
                #expect(f.mapCount == 0)
                #expect(mm.entry(at: base).entry.kind == .migration)
            }
            // Give nothing: finalize puts every source back.
            kernel.migrateVMAFinalize(&args)
            mm.mmapReadUnlock()
            #expect(mm.entry(at: base).entry == entryBefore)
            noLeaks(kernel, mm, base, pages: Self.pages)
            #expect(try Self.bytesIntact(kind, mm, base))
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("bytes survive the round trip through MirrorDevice",
          arguments: Kind.allCases, Return.allCases)
    func roundTrip(_ kind: Kind, _ back: Return) throws {
        try withMachine { kernel, mm, device in
            let base = try Self.prepare(kind, mm)
            let n = Self.pages
            let freeBefore = kernel.freePages
            #expect(try device.migrateToDevice(base, pages: n) == n)
            #expect(device.devicePagesInUse == UInt64(n))
            for i in 0..<n {
                let e = mm.entry(at: base + UInt64(i * pageSize)).entry
                #expect(e.kind == .devicePrivate)
                // Write permission: from the source PTE, or VM_WRITE for holes and the zero page.
                #expect(e.isWrite == kind.writable)
            }
            if kind.hasData {
                // Only the data pages were system pages; they went back to the allocator.
                #expect(kernel.freePages == freeBefore + UInt64(n))
            } else {
                #expect(kernel.freePages == freeBefore)
            }
            noLeaks(kernel, mm, base, pages: n)

            switch back {
            case .cpuFault:
                #expect(try Self.bytesIntact(kind, mm, base))
                #expect(device.migrateToRAMCalls == n)
            case .migrateToSystem:
                #expect(try device.migrateToSystem(base, pages: n) == n)
            case .eviction:
                #expect(device.evictAll() == n)
            }
            for i in 0..<n {
                let e = mm.entry(at: base + UInt64(i * pageSize)).entry
                #expect(e.kind == .present && !e.isSpecial)
                #expect(e.isWrite == kind.writable)
            }
            #expect(try Self.bytesIntact(kind, mm, base))
            #expect(device.devicePagesInUse == 0)
            noLeaks(kernel, mm, base, pages: n)
            #expect(kernel.freePages == freeBefore - (kind.hasData ? 0 : UInt64(n)))
            #expect(kernel.diagnostics.isEmpty)
            if kind.writable {
                // Still writable after the trip.
                try mm.store(base + 7, 0x5a)
                #expect(try mm.load(base + 7) == 0x5a)
            } else {
                #expect(throws: Errno.permissionDenied) { try mm.store(base + 7, 0x5a) }
            }
        }
    }

    @Test("the GPU reads the same bytes in VRAM the CPU wrote")
    func gpuSeesCPUBytes() throws {
        try withMachine { kernel, mm, device in
            let n = 8
            let base = try mm.mmap(length: n * pageSize)
            let expected = try expectedPattern(kernel, base, length: n * pageSize, seed: 3)
            try mm.fillPattern(base, length: n * pageSize, seed: 3)
            try device.migrateToDevice(base, pages: n)
            #expect(try device.read(base, count: n * pageSize) == expected)
            // GPU writes land in VRAM and come back with the page.
            try device.write(base + PageGeometry.pageSize64 + 10, bytes: [1, 2, 3])
            #expect(mm.entry(at: base + PageGeometry.pageSize64).entry.kind == .devicePrivate)
            #expect(try mm.read(base + PageGeometry.pageSize64 + 10, count: 3) == [1, 2, 3])
            #expect(try mm.verifyPattern(base, length: PageGeometry.pageSize, seed: 3) == nil)
            #expect(kernel.diagnostics.isEmpty)
        }
    }
}
