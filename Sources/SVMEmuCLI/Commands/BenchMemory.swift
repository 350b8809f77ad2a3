// `svmemu bench memory`: the cost of the emulated memory core.
import ArgumentParser
import Foundation
import SVMEmu
import Synchronization

/// Measures what every emulated access and fault pays:
/// - `readNanos`: one `AddressSpace.load` of a mapped byte over 4 MiB of
///   pages (which the emulated CPU's TLB holds), best round of many;
/// - `tlbHitReadNanos`: the same over 64 pages: every read hits the TLB and
///   takes no lock;
/// - `tlbMissReadNanos`: the same over 32 MiB, which the TLB cannot hold:
///   every read walks the page tables and fills an entry;
/// - `shootdownNanos`: one TLB flush of a page while a second CPU keeps
///   reading the address space (the IPI, the wait for its instruction
///   boundary, its flush), per flush;
/// - `demandZeroFaultNanos`: the first write to a page of a fresh anonymous
///   mapping with THP off (fault, zeroed 4 KiB page allocation, rmap, PTE),
///   per page, excluding `mmap` itself;
/// - `metadataBytesPerPage`: the emulator's `struct page` size;
/// - `memcpy4KNanos`: memcpy of 4 KiB, cache hot, as the yardstick.
struct BenchMemoryCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "memory",
        abstract: "Cost of an emulated CPU read (TLB hit and miss), a shootdown, a demand-zero fault, and metadata per page.",
        discussion: """
            Build with -c release. Reads one byte per page over a few MiB of touched pages \
            (several rounds, best round), first-touch writes over a fresh mapping with THP off \
            (best round, mmap excluded), and reports the page metadata size against the \
            kernel's 64-byte struct page. With --json prints one object (Docs/json.md) whose \
            results are readNanos, tlbHitReadNanos, tlbMissReadNanos, shootdownNanos, \
            demandZeroFaultNanos, demandZeroFirstRoundNanos, metadataBytesPerPage and memcpy4KNanos.

            \(ExitStatus.helpParagraph)
            """)

    @OptionGroup var output: JSONOutputOptions
    var json: Bool { output.json }

    @Option(name: .long, parsing: .unconditional, help: "Size of the demand-zero mapping, 1M to 1G, a multiple of 1M, with an optional K, M or G suffix (binary units).")
    var size = "64M"
    /// `--size` in MiB (the unit the run body uses).
    var faultMiB: Int { (ByteSize.parse(size) ?? 0) / ByteSize.mib }

    /// Sizes `--size` takes: whole MiB, up to 1 GiB.
    static let sizeRange = ByteSize.mib...ByteSize.gib

    @OptionGroup var timing: BenchRoundsOptions
    var rounds: Int { timing.rounds }

    @OptionGroup var pattern: PatternSeedOption

    @OptionGroup var report: ReportFileOptions

    /// `--fault-mib N`, the old spelling of `--size NM`.
    struct OldSpellings: DeprecatedSpellings {
        @Option(name: .customLong("fault-mib"), parsing: .unconditional, help: .private) var faultMiB: Int?
    }
    @OptionGroup var old: OldSpellings

    mutating func validate() throws {
        if let mib = old.faultMiB {
            try checkRange(mib, 1...1024, flag: "--fault-mib")
            try Deprecation.adopt("\(mib)M", into: &size, defaultValue: "64M", oldFlag: "--fault-mib \(mib)", newFlag: "--size \(mib)M")
        }
        _ = try ByteSize.check(size, flag: "--size", range: Self.sizeRange, multiple: ByteSize.mib)
    }

    struct Result: Encodable {
        var readNanos: Double
        var tlbHitReadNanos: Double
        var tlbMissReadNanos: Double
        var shootdownNanos: Double
        var demandZeroFaultNanos: Double
        var demandZeroFirstRoundNanos: Double
        var metadataBytesPerPage: Int
        var memcpy4KNanos: Double
    }

    func run() throws {
        #if DEBUG
        FileHandle.standardError.write(Data("svmemu bench memory: warning: this is a debug build; figures are not meaningful (use swift build -c release)\n".utf8))
        #endif
        let r = try measure()
        if json {
            print(try JSONReport.render(for: self, results: r))
        } else {
            print(Self.render(r, faultMiB: faultMiB, rounds: rounds), terminator: "")
        }
    }

    func measure() throws -> Result {
        let memcpyNanos = Self.measureMemcpy4K(rounds: rounds)

        var config = KernelConfiguration()
        let faultBytes = faultMiB << 20
        // Room for the demand-zero mapping plus the read set, on one node.
        config.nodeSizes = [faultBytes + (128 << 20)]
        config.maxPhysicalBytes = UInt64(faultBytes) + (1 << 30)
        config.transparentHugepage = .never
        let kernel = try Kernel(booting: config)
        // The address space refers to its kernel: it must go first, on every path.
        return try withExtendedLifetime(kernel) { () throws -> Result in
            let mm = AddressSpace(kernel: kernel)
            return try measure(kernel, mm, faultBytes: faultBytes, memcpyNanos: memcpyNanos)
        }
    }

    func measure(_ kernel: Kernel, _ mm: AddressSpace, faultBytes: Int, memcpyNanos: Double) throws -> Result {
        var readNanos = Double.infinity
        var faultNanos = Double.infinity
        var firstFaultNanos = 0.0
        var results = (hit: 0.0, miss: 0.0, shootdown: 0.0)
        do {

            // Reads: one byte per page, best round: 4 MiB (readNanos), 64
            // pages (all TLB hits), 32 MiB (all TLB misses).
            let seed = pattern.seed
            readNanos = try Self.measureReads(mm, pages: 1024, passes: 64, rounds: rounds, seed: seed)
            let hitNanos = try Self.measureReads(mm, pages: 64, passes: 1024, rounds: rounds, seed: seed)
            let missNanos = try Self.measureReads(mm, pages: 8192, passes: 8, rounds: rounds, seed: seed)
            let shootdown = try Self.measureShootdown(kernel, mm, rounds: rounds)
            results = (hitNanos, missNanos, shootdown)

            // Demand-zero faults: first-touch writes over a fresh mapping.
            let pages = faultBytes / PageGeometry.pageSize
            for round in 0..<rounds {
                let a = try mm.mmap(length: faultBytes)
                let before = kernel.vmstat[.demandZeroFaults]
                let t0 = HostClock.nanos()
                var p = a
                for _ in 0..<pages {
                    try mm.store(p, 1)
                    p &+= PageGeometry.pageSize64
                }
                let t1 = HostClock.nanos()
                let faults = kernel.vmstat[.demandZeroFaults] - before
                guard faults == UInt64(pages) else {
                    throw CLIError.runFailed("svmemu bench memory: expected \(pages) demand-zero faults, counted \(faults)")
                }
                let perPage = Double(t1 - t0) / Double(pages)
                if round == 0 { firstFaultNanos = perPage }
                faultNanos = min(faultNanos, perPage)
                try mm.munmap(a, length: faultBytes)
            }
        }
        return Result(readNanos: readNanos, tlbHitReadNanos: results.hit, tlbMissReadNanos: results.miss,
                      shootdownNanos: results.shootdown, demandZeroFaultNanos: faultNanos,
                      demandZeroFirstRoundNanos: firstFaultNanos,
                      metadataBytesPerPage: Kernel.metadataBytesPerPage, memcpy4KNanos: memcpyNanos)
    }

    /// One emulated byte read per page over `pages` written pages (byte `i`
    /// of the pattern of `seed` in page `i`), `passes` times a round, best
    /// round, in nanoseconds per read.
    static func measureReads(_ mm: AddressSpace, pages: Int, passes: Int, rounds: Int, seed: UInt64) throws -> Double {
        let base = try mm.mmap(length: pages * 4096)
        defer { try? mm.munmap(base, length: pages * 4096) }
        func byte(_ i: Int) -> UInt8 { UInt8(truncatingIfNeeded: ((UInt64(i) &+ seed) &* 0x9E37_79B9_7F4A_7C15) >> 56) }
        for i in 0..<pages { try mm.store(base + UInt64(i * 4096), byte(i)) }
        var best = Double.infinity
        var sink: UInt64 = 0
        for _ in 0..<(rounds + 2) {  // two extra rounds warm caches up; the best round wins
            let t0 = HostClock.nanos()
            for _ in 0..<passes {
                var a = base
                for _ in 0..<pages {
                    sink &+= UInt64(try mm.load(a))
                    a &+= 4096
                }
            }
            let t1 = HostClock.nanos()
            best = min(best, Double(t1 - t0) / Double(passes * pages))
        }
        // Every read must have returned the byte written (the loop is not optimised away).
        var perPass: UInt64 = 0
        for i in 0..<pages { perPass &+= UInt64(byte(i)) }
        guard sink == perPass &* UInt64(passes * (rounds + 2)) else {
            throw CLIError.runFailed("svmemu bench memory: emulated reads returned wrong bytes")
        }
        return best
    }

    /// A one-page TLB flush while a second CPU reads the address space in a
    /// loop (so the flusher sends it an IPI and waits for its instruction
    /// boundary), best round, in nanoseconds per flush.
    static func measureShootdown(_ kernel: Kernel, _ mm: AddressSpace, rounds: Int) throws -> Double {
        let a = try mm.mmap(length: 2 * 4096)
        defer { try? mm.munmap(a, length: 2 * 4096) }
        try mm.store(a, 1)
        try mm.store(a + 4096, 2)
        let state = ShootdownPeer()
        let peer = Thread {
            _ = try? mm.load(a + 4096)  // now it runs on its CPU with the mm loaded
            state.running.store(1, ordering: .releasing)
            while state.stop.load(ordering: .acquiring) == 0 { _ = try? mm.load(a + 4096) }
            state.running.store(2, ordering: .releasing)
        }
        peer.start()
        defer {
            state.stop.store(1, ordering: .releasing)
            while state.running.load(ordering: .acquiring) != 2 { sched_yield() }
        }
        while state.running.load(ordering: .acquiring) == 0 { sched_yield() }
        let flushes = 2000
        var best = Double.infinity
        for _ in 0..<(rounds + 1) {
            let before = kernel.vmstat[.tlbIPIsSent]
            let t0 = HostClock.nanos()
            for _ in 0..<flushes { mm.flushTLBRange(a, a + 4096) }
            let t1 = HostClock.nanos()
            guard kernel.vmstat[.tlbIPIsSent] - before == UInt64(flushes) else {
                throw CLIError.runFailed("svmemu bench memory: \(flushes) shootdowns sent \(kernel.vmstat[.tlbIPIsSent] - before) IPIs to the second CPU (expected one each)")
            }
            best = min(best, Double(t1 - t0) / Double(flushes))
        }
        return best
    }

    /// memcpy of 4 KiB between two cache-hot buffers, best round.
    static func measureMemcpy4K(rounds: Int) -> Double {
        let src = UnsafeMutableRawPointer.allocate(byteCount: PageGeometry.pageSize, alignment: PageGeometry.pageSize)
        let dst = UnsafeMutableRawPointer.allocate(byteCount: PageGeometry.pageSize, alignment: PageGeometry.pageSize)
        defer { src.deallocate(); dst.deallocate() }
        src.initializeMemory(as: UInt8.self, repeating: 0x5A, count: PageGeometry.pageSize)
        dst.initializeMemory(as: UInt8.self, repeating: 0, count: PageGeometry.pageSize)
        let iterations = 200_000
        var best = Double.infinity
        for _ in 0..<(rounds + 2) {
            let t0 = HostClock.nanos()
            for i in 0..<iterations {
                src.storeBytes(of: UInt8(truncatingIfNeeded: i), as: UInt8.self)
                HostMemory.copy(to: dst, from: src, bytes: PageGeometry.pageSize)
                HostMemory.escape(dst)
            }
            let t1 = HostClock.nanos()
            best = min(best, Double(t1 - t0) / Double(iterations))
        }
        return best
    }

    static func render(_ r: Result, faultMiB: Int, rounds: Int) -> String {
        func row(_ label: String, _ v: Double) -> String {
            let pad = String(repeating: " ", count: max(1, 46 - label.count))
            return "  " + label + pad + String(format: "%9.1f ns  %8.2fx", v, v / r.memcpy4KNanos) + "\n"
        }
        var out = "svmemu bench memory (best of \(rounds) rounds; THP off for faults)\n\n"
        out += "  WHAT" + String(repeating: " ", count: 42) + "     COST  vs memcpy 4K\n"
        out += row("emulated CPU read of a mapped byte (4 MiB)", r.readNanos)
        out += row("  TLB hit (64 pages)", r.tlbHitReadNanos)
        out += row("  TLB miss: page walk and fill (32 MiB)", r.tlbMissReadNanos)
        out += row("TLB shootdown of a page, one other CPU", r.shootdownNanos)
        out += row("demand-zero fault, per page (\(faultMiB) MiB)", r.demandZeroFaultNanos)
        out += row("  first round (host memory cold)", r.demandZeroFirstRoundNanos)
        out += row("memcpy 4 KiB, cache hot (reference)", r.memcpy4KNanos)
        let goal = r.metadataBytesPerPage <= 64 ? "meets the goal of <= 64 (struct page)" : "ABOVE the goal of 64 (struct page)"
        out += "\n  metadata per 4 KiB page: \(r.metadataBytesPerPage) bytes, \(goal)\n"
        return out
    }
}

/// The second CPU of the shootdown measurement: told to stop, says it runs.
private final class ShootdownPeer: @unchecked Sendable {
    let stop = Atomic<Int>(0)
    let running = Atomic<Int>(0)
}
