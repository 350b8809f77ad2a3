import Testing
import SVMEmu
import MirrorDriver

/// A driver that maps a page into its device after a migration or after
/// `make_device_exclusive` must take the interval notifier's sequence before
/// it starts and check it under its page-table lock before it maps: a
/// MADV_DONTNEED that runs in between zaps the CPU entry and frees the page
/// once the driver lets go of it, and its invalidation has already cleared
/// the device page table, so a mapping made afterwards outlives the page.
/// Each race runs as a deterministic schedule, over 128 seeds; the racer
/// starts at a seeded offset spread over the migration.
@Suite("Driver mappings against the notifier sequence")
struct NotifierSequenceTests {
    static let seeds: ClosedRange<UInt64> = 1...128
    static let pages = 4

    /// Every device page-table entry of the range names a frame in use that
    /// the CPU still maps at that address (present, device-private or
    /// device-exclusive with the same pfn). At a quiescent point only.
    static func deviceMappingsAreLive(_ kernel: Kernel, _ mm: AddressSpace, _ device: MirrorDevice,
                                      _ base: UInt64, seed: UInt64) -> Int {
        var stale = 0
        for i in 0..<pages {
            let a = base + UInt64(i * pageSize)
            guard let m = device.deviceMapping(at: a) else { continue }
            let inUse = (kernel.page(pfn: m.pfn)?.folio.refCount ?? 0) > 0
            if !inUse || !mm.deviceEntryAgrees(at: a, pfn: m.pfn, writable: m.writable) {
                stale += 1
                Issue.record("seed \(seed), page \(i): the device maps \(m) (\(inUse ? "in use" : "FREED")), the CPU has \(mm.entry(at: a).entry)")
            }
        }
        return stale
    }

    /// A schedule of two threads; the second starts `offset` virtual nanoseconds late.
    static func race(seed: UInt64, _ first: (String, @Sendable () -> Void), _ second: (String, @Sendable () -> Void),
                     offset: UInt64) -> DeterministicScheduler.Outcome {
        var c = DeterministicScheduler.Configuration(seed: seed)
        c.hostTimeoutSeconds = 30
        let s = DeterministicScheduler(c)
        s.spawn(first.0, first.1)
        let body = second.1
        s.spawn(second.0) {
            HostClock.sleep(nanos: offset)
            body()
        }
        return s.run()
    }

    /// One thread of a race: its name and its body.
    typealias Racer = (String, @Sendable () -> Void)

    /// The loop every race here runs, once per seed of ``seeds``: maps
    /// ``pages`` pages and fills them with the seed's pattern; `prepare`s
    /// them (its value goes to the racers and the checks); runs the two
    /// `racers` as the seed's schedule, the second `(seed % 32) * offsetStep`
    /// virtual nanoseconds late, and expects it to complete; checks the
    /// device mappings (``deviceMappingsAreLive(_:_:_:_:seed:)``); runs the
    /// race's own `check`; audits the kernel and unmaps (the audit after the
    /// unmap with `auditsAfterUnmap`). At the end no seed may have left a
    /// stale device mapping and the kernel no diagnostic.
    static func raceEverySeed<Context>(
        _ kernel: Kernel, _ mm: AddressSpace, _ device: MirrorDevice, offsetStep: UInt64, auditsAfterUnmap: Bool = false,
        prepare: (_ base: UInt64, _ seed: UInt64) throws -> Context,
        racers: (_ base: UInt64, _ context: Context) -> (Racer, Racer),
        check: (_ base: UInt64, _ seed: UInt64, _ context: Context) throws -> Void
    ) throws {
        let length = pages * pageSize
        var staleSeeds = 0
        for seed in seeds {
            let base = try mm.mmap(length: length)
            try mm.fillPattern(base, length: length, seed: seed)
            let context = try prepare(base, seed)
            let (first, second) = racers(base, context)
            let outcome = race(seed: seed, first, second, offset: (seed % 32) * offsetStep)
            #expect(outcome == .completed, "seed \(seed): \(outcome)")
            if deviceMappingsAreLive(kernel, mm, device, base, seed: seed) > 0 { staleSeeds += 1 }
            try check(base, seed, context)
            if auditsAfterUnmap { try mm.munmap(base, length: length) }
            let audit = kernel.audit()
            #expect(audit.isClean, "seed \(seed): \(audit)")
            if !auditsAfterUnmap { try mm.munmap(base, length: length) }
        }
        #expect(staleSeeds == 0, "\(staleSeeds) of \(seeds.count) schedules left a stale device mapping")
        #expect(kernel.diagnostics.isEmpty, "\(kernel.diagnostics)")
    }

    @Test("migrate to device racing MADV_DONTNEED: the device never maps a freed page, and reads what the CPU reads")
    func migrateToDeviceAgainstDontNeed() throws {
        try withMachine { kernel, mm, device in
            let length = Self.pages * pageSize
            // The first half is dropped; the second half must end up in
            // the device and mapped there, whichever side wins.
            let dropped = length / 2
            try Self.raceEverySeed(kernel, mm, device, offsetStep: 1_000, prepare: { base, seed in
                try expectedPattern(kernel, base, length: length, seed: seed)
            }, racers: { base, _ in
                (("migrate", { _ = try? device.migrateToDevice(base, pages: Self.pages) }),
                 ("madvise", { _ = try? mm.madvise(base, length: dropped, advice: .dontNeed) }))
            }, check: { base, seed, expected in
                for i in (Self.pages / 2)..<Self.pages {
                    let m = device.deviceMapping(at: base + UInt64(i * pageSize))
                    #expect(m?.devicePage == true, "seed \(seed), page \(i): migrated but \(m.map { "\($0)" } ?? "not mapped") in the device")
                }
                // MADV_DONTNEED ran to its end: the CPU reads zeroes there and
                // the pattern elsewhere, and so must the device (a stale entry
                // reads the freed copy of the pattern).
                var want = expected
                for i in 0..<dropped { want[i] = 0 }
                var gpu = [UInt8](repeating: 0xA5, count: length)
                try gpu.withUnsafeMutableBytes { try device.read(base, into: $0) }
                #expect(gpu == want, "seed \(seed): the device reads \(zip(gpu, want).filter { $0 != $1 }.count) bytes the CPU does not")
                #expect(try mm.read(base, count: length) == want, "seed \(seed)")
                noLeaks(kernel, mm, base, pages: Self.pages)
            })
        }
    }

    @Test("make-exclusive racing MADV_DONTNEED: no atomic mapping of a freed page, and every device atomic lands in the CPU's page")
    func mapExclusiveAgainstDontNeed() throws {
        try withMachine { kernel, mm, device in
            let length = Self.pages * pageSize
            try Self.raceEverySeed(kernel, mm, device, offsetStep: 500, prepare: { _, _ in }, racers: { base, _ in
                let end = base + UInt64(length)
                return (("exclusive", { try? device.mapExclusive(base, end) }),
                        ("madvise", { _ = try? mm.madvise(base, length: length, advice: .dontNeed) }))
            }, check: { base, seed, _ in
                // Every page is zero now (zapped, or faulted in anew after the
                // zap). An atomic the device reports done is in the CPU's page.
                for i in 0..<Self.pages {
                    let a = base + UInt64(i * pageSize)
                    let value = 0x100 + UInt64(i)
                    let done = device.atomicAdd(a, value)
                    let seen = try mm.load64(a)
                    #expect(seen == (done ? value : 0), "seed \(seed), page \(i): atomicAdd \(done ? "wrote" : "refused"), the CPU reads \(seen)")
                }
                noLeaks(kernel, mm, base, pages: Self.pages)
            })
        }
    }

    @Test("a device fault racing a CPU fault's migrate_to_ram of the same device page: the device never maps the freed device page")
    func deviceFaultAgainstMigrateToRAM() throws {
        try withMachine { kernel, mm, device in
            let length = Self.pages * pageSize
            try Self.raceEverySeed(kernel, mm, device, offsetStep: 500, auditsAfterUnmap: true, prepare: { base, seed in
                let expected = try mm.read(base, count: length)
                #expect(try device.migrateToDevice(base, pages: Self.pages) == Self.pages, "seed \(seed)")
                // mprotect drops the device's entries (MMU_NOTIFY_PROTECTION_VMA)
                // and leaves the CPU's device-private entries: the device's
                // next access faults, and so does the CPU's.
                try mm.mprotect(base, length: length, protection: .read)
                #expect(device.deviceMapping(at: base) == nil, "seed \(seed)")
                return expected
            }, racers: { base, _ in
                (("device read", {
                    var b = [UInt8](repeating: 0, count: length)
                    _ = try? b.withUnsafeMutableBytes { try device.read(base, into: $0) }
                 }),
                 ("CPU read", { _ = try? mm.read(base, count: length) }))
            }, check: { base, seed, expected in
                // Whatever won, both sides read the pattern.
                var gpu = [UInt8](repeating: 0xA5, count: length)
                try gpu.withUnsafeMutableBytes { try device.read(base, into: $0) }
                #expect(gpu == expected, "seed \(seed): the device reads \(zip(gpu, expected).filter { $0 != $1 }.count) bytes the CPU does not")
                #expect(try mm.read(base, count: length) == expected, "seed \(seed)")
            })
        }
    }
}
