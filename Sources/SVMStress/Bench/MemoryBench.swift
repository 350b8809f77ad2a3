// `svmemu bench memory`'s harness: the cost of the emulated memory core.
import SVMEmu

/// What every emulated access and fault pays (`svmemu bench memory --json`),
/// each against the yardstick, a cache-hot 4 KiB memcpy
/// (``Yardsticks/Memcpy4K``, its rounds taken in turn with the TLB-hit
/// reads').
public struct MemoryBenchResult: Encodable, Sendable, Equatable {
    /// One `AddressSpace.load` of a mapped byte over 4 MiB of pages (which
    /// the emulated CPU's TLB holds), best round, nanoseconds.
    public var readNanos: Double
    /// The same over 64 pages: every read hits the TLB and takes no lock.
    public var tlbHitReadNanos: Double
    /// The same over 32 MiB, which the TLB cannot hold: every read walks
    /// the page tables and fills an entry.
    public var tlbMissReadNanos: Double
    /// One TLB flush of a page while a second CPU keeps reading the address
    /// space (the IPI, the wait for its instruction boundary, its flush).
    public var shootdownNanos: Double
    /// The first write to a page of a fresh anonymous mapping with THP off
    /// (fault, zeroed 4 KiB page, rmap, PTE), mmap excluded, best round, per page.
    public var demandZeroFaultNanos: Double
    /// The same in the first round (host memory cold).
    public var demandZeroFirstRoundNanos: Double
    /// The emulator's page metadata per 4 KiB page, bytes.
    public var metadataBytesPerPage: Int
    /// The yardstick: a cache-hot 4 KiB memcpy, nanoseconds.
    public var memcpy4KNanos: Double
}

/// The harness of `svmemu bench memory`.
public enum MemoryBench {
    /// Measures every figure of ``MemoryBenchResult`` on a fresh machine
    /// (one node, THP off): reads over 4 MiB, 64 pages and 32 MiB, a
    /// shootdown, demand-zero faults over a fresh `faultBytes` mapping per
    /// round; best of `rounds` rounds each (`rounds + 2` for the reads;
    /// the 64-page ones alternate with the yardstick's, at least
    /// ``hitRoundPairs`` pairs).
    ///
    /// - Parameter seed: the pattern the read sets hold.
    /// - Throws: ``HarnessFailure`` when a count or a byte is not what the
    ///   mechanism guarantees, or the kernel audit after the run finds
    ///   something; `HostMemoryRefusal` when the host refuses the machine.
    public static func run(faultBytes: Int, rounds: Int, seed: UInt64) throws -> MemoryBenchResult {
        var config = KernelConfiguration()
        // Room for the demand-zero mapping plus the read set, on one node.
        config.nodeSizes = [faultBytes + (128 << 20)]
        config.maxPhysicalBytes = UInt64(faultBytes) + (1 << 30)
        config.transparentHugepage = .never
        let machine = try Machine(booting: config)
        let mm = machine.mm
        // Reads: one byte per page, best round: 4 MiB (readNanos), 64
        // pages (all TLB hits), 32 MiB (all TLB misses).
        let readNanos = try measureReads(mm, pages: 1024, passes: 64, rounds: rounds, seed: seed)
        let (hitNanos, memcpyNanos) = try measureHitsAgainstMemcpy(mm, rounds: rounds, seed: seed)
        let missNanos = try measureReads(mm, pages: 8192, passes: 8, rounds: rounds, seed: seed)
        let shootdown = try measureShootdown(machine.kernel, mm, rounds: rounds)
        let (faultNanos, firstFaultNanos) = try measureDemandZero(machine.kernel, mm, bytes: faultBytes, rounds: rounds)
        try machine.finishAudited("svmemu bench memory")
        return MemoryBenchResult(readNanos: readNanos, tlbHitReadNanos: hitNanos, tlbMissReadNanos: missNanos,
                                 shootdownNanos: shootdown, demandZeroFaultNanos: faultNanos,
                                 demandZeroFirstRoundNanos: firstFaultNanos,
                                 metadataBytesPerPage: Kernel.metadataBytesPerPage, memcpy4KNanos: memcpyNanos)
    }

    /// The fewest memcpy-and-read round pairs of the TLB-hit figure.
    static let hitRoundPairs = 64

    /// One emulated byte read per page over `pages` written pages, `passes`
    /// times a round, best of `rounds + 2` rounds (``ReadSet``), in
    /// nanoseconds per read.
    static func measureReads(_ mm: AddressSpace, pages: Int, passes: Int, rounds: Int, seed: UInt64) throws -> Double {
        let set = try ReadSet(mm, pages: pages, seed: seed)
        defer { set.unmap() }
        var best = Double.infinity
        for _ in 0..<(rounds + 2) { best = min(best, try set.round(passes: passes)) }  // two extra rounds warm caches up
        return best
    }

    /// The TLB-hit read (64 pages) and its yardstick, the cache-hot 4 KiB
    /// memcpy, in alternate rounds of about the same length (4 ms of
    /// copies, about 3 ms of reads), best round of each: both see the same
    /// machine. A host whose speed comes and goes for tens of milliseconds
    /// at a time (a virtual CPU beside a busy sibling) slows a short run of
    /// dependent loads more than a copy: a 1 ms measurement taken apart
    /// from the yardstick's compared a slow spell with a fast one, and 7
    /// pairs (50 ms) could all fall in one spell. So the pairs are at least
    /// ``hitRoundPairs`` (about half a second), `rounds + 2` if more.
    static func measureHitsAgainstMemcpy(_ mm: AddressSpace, rounds: Int, seed: UInt64) throws -> (hit: Double, memcpy: Double) {
        let set = try ReadSet(mm, pages: 64, seed: seed)
        defer { set.unmap() }
        let copy = Yardsticks.Memcpy4K()
        var hit = Double.infinity, memcpy = Double.infinity
        for _ in 0..<max(rounds + 2, hitRoundPairs) {
            memcpy = min(memcpy, copy.round(copies: 100_000))
            hit = min(hit, try set.round(passes: 16_384))
        }
        return (hit, memcpy)
    }

    /// A set of written pages read one byte a page: byte `i` of the
    /// pattern of `seed` in page `i`, at cache line `i % 64` (reading the
    /// same offset of every page would put all the reads of the 64-page set
    /// in one set of the host's L1 cache, page-aligned frames alias there,
    /// and a host cache miss per read is no cost of the emulated TLB).
    final class ReadSet {
        let mm: AddressSpace
        let base: UInt64
        let pages: Int
        /// The addresses, worked out once: a timed loop is the reads.
        let addresses: [UInt64]
        /// The sum of the bytes one pass reads.
        let perPass: UInt64

        init(_ mm: AddressSpace, pages: Int, seed: UInt64) throws {
            func byte(_ i: Int) -> UInt8 { UInt8(truncatingIfNeeded: ((UInt64(i) &+ seed) &* 0x9E37_79B9_7F4A_7C15) >> 56) }
            self.mm = mm
            self.pages = pages
            base = try mm.mmap(length: pages * 4096)
            addresses = (0..<pages).map { [base] i in base + UInt64(i * 4096 + (i & 63) * 64) }
            for (i, a) in addresses.enumerated() { try mm.store(a, byte(i)) }
            perPass = (0..<pages).reduce(0) { $0 &+ UInt64(byte($1)) }
        }

        func unmap() { try? mm.munmap(base, length: pages * 4096) }

        /// `passes` passes over the set, in nanoseconds per read.
        /// - Throws: ``HarnessFailure`` when a read returned another byte
        ///   than the one written (which also keeps the loop from being
        ///   optimised away).
        func round(passes: Int) throws -> Double {
            let mm = self.mm
            let (nanos, sum) = try addresses.withUnsafeBufferPointer { (list) throws(Errno) in
                let t0 = HostClock.nanos()
                var sum: UInt64 = 0  // a local the loop keeps in a register
                for _ in 0..<passes {
                    for a in list { sum &+= UInt64(try mm.load(a)) }
                }
                return (HostClock.nanos() - t0, sum)
            }
            guard sum == perPass &* UInt64(passes) else {
                throw HarnessFailure("svmemu bench memory: emulated reads returned wrong bytes")
            }
            return Double(nanos) / Double(passes * pages)
        }
    }

    /// A one-page TLB flush while a second CPU reads the address space in a
    /// loop (``BusyCPUs``: the flusher sends it an IPI and waits for its
    /// instruction boundary), best round, in nanoseconds per flush.
    static func measureShootdown(_ kernel: Kernel, _ mm: AddressSpace, rounds: Int) throws -> Double {
        let a = try mm.mmap(length: 4096)
        defer { try? mm.munmap(a, length: 4096) }
        try mm.store(a, 1)
        let peer = try BusyCPUs(mm, count: 1, threads: HarnessThreads(HarnessSchedule()))
        defer { peer.stop() }
        peer.waitUntilRunning()
        let flushes = 2000
        var best = Double.infinity
        for _ in 0..<(rounds + 1) {
            let before = kernel.vmstat[.tlbIPIsSent]
            let t0 = HostClock.nanos()
            for _ in 0..<flushes { mm.flushTLBRange(a, a + 4096) }
            let t1 = HostClock.nanos()
            guard kernel.vmstat[.tlbIPIsSent] - before == UInt64(flushes) else {
                throw HarnessFailure("svmemu bench memory: \(flushes) shootdowns sent \(kernel.vmstat[.tlbIPIsSent] - before) IPIs to the second CPU (expected one each)")
            }
            best = min(best, Double(t1 - t0) / Double(flushes))
        }
        return best
    }

    /// First-touch writes over a fresh `bytes` mapping per round (mmap
    /// excluded): the best round and the first, in nanoseconds per page.
    static func measureDemandZero(_ kernel: Kernel, _ mm: AddressSpace, bytes: Int,
                                  rounds: Int) throws -> (best: Double, first: Double) {
        let pages = bytes / PageGeometry.pageSize
        var best = Double.infinity, first = 0.0
        for round in 0..<rounds {
            let a = try mm.mmap(length: bytes)
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
                throw HarnessFailure("svmemu bench memory: expected \(pages) demand-zero faults, counted \(faults)")
            }
            let perPage = Double(t1 - t0) / Double(pages)
            if round == 0 { first = perPage }
            best = min(best, perPage)
            try mm.munmap(a, length: bytes)
        }
        return (best, first)
    }
}
