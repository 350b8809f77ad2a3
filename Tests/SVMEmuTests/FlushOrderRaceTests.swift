import Synchronization
import Testing
import TestSupport
@testable import SVMEmu

/// Races between a page-table change and its TLB flush, each run as
/// deterministic schedules over many seeds: the emulated threads switch only
/// at scheduling points (accesses, faults, lock acquisitions and releases),
/// so every seed is one interleaving, replayable. Each test asserts what the
/// kernel's order guarantees in every interleaving: no stale translation is
/// used (the stale-entry checker, on in debug builds) and no write is lost.
@Suite("Flush order under races (deterministic schedules)")
struct FlushOrderRaceTests {
    static let seeds: ClosedRange<UInt64> = 1...100

    /// One run under the scheduler with `threads`; the kernel's stale-entry
    /// reports of that run are returned (and taken off the kernel).
    static func run(seed: UInt64, _ kernel: Kernel, _ threads: (DeterministicScheduler) -> Void) -> (DeterministicScheduler.Outcome, [Diagnostic]) {
        var c = DeterministicScheduler.Configuration(seed: seed)
        // A thread stalled right after one of its unlocks (before the flush
        // that should have come first) while the others run on.
        c.releasePreemptionPercent = 25
        c.maxPreemptionNanos = 30_000
        c.hostTimeoutSeconds = 30
        let s = DeterministicScheduler(c)
        threads(s)
        let outcome = s.run()
        let stale = kernel.takeStaleTLBAccesses()
        return (outcome, stale)
    }

    /// A virtual delay in [0, 40 µs) that differs by seed and thread: the
    /// threads' operations start at different points of each other's.
    static func stagger(_ seed: UInt64, _ thread: UInt64) {
        var x = seed &* 0x9E37_79B9_7F4A_7C15 &+ thread &* 0xBF58_476D_1CE4_E5B9
        x ^= x >> 31
        HostClock.sleep(nanos: x % 40_000)
    }

    /// A CPU that reads `address` every 250 ns of virtual time for 100 µs,
    /// through its TLB while the translation stays cached; `each` sees
    /// every value read (a failed read, once the address is unmapped, is
    /// passed over).
    static func reader(_ mm: AddressSpace, _ address: UInt64, _ each: (UInt8) -> Void = { _ in }) {
        for _ in 0..<400 {
            if let v = try? mm.load(address) { each(v) }
            HostClock.sleep(nanos: 250)
        }
    }

    final class Box: @unchecked Sendable {
        var last = 0
        var pwriteDone = false
        var staleReads = 0
    }

    @Test("mremap against a reader on another CPU: the old range is flushed before the page-table locks drop, so a fork relative's move_pages never frees a frame a CPU still reaches")
    func mremapAgainstReader() throws {
        var failures: [String] = []
        for seed in Self.seeds {
            let kernel = try makeKernel(thp: .never)
            var parent: AddressSpace? = try AddressSpace(kernel: kernel)
            let a = try parent!.mmap(length: pageSize)
            let b = a + UInt64(64 << 20)
            try parent!.store(a, 0x5A)
            // The page is shared with the child: its move_pages walks the
            // parent's mapping too (MPOL_MF_MOVE_ALL), at whatever address
            // the parent maps it when the walk comes.
            var child: AddressSpace? = try parent!.fork()
            let p = parent!, c = child!
            let (outcome, stale) = Self.run(seed: seed, kernel) { s in
                s.spawn("reader 1") { Self.reader(p, a) }
                s.spawn("reader 2") { Self.reader(p, a) }
                s.spawn("mremap") {
                    Self.stagger(seed, 1)
                    _ = try? p.mremap(a, oldLength: pageSize, newLength: pageSize, flags: [.mayMove, .fixed], newAddress: b)
                }
                s.spawn("move_pages") {
                    var status: [PageStatus] = []
                    Self.stagger(seed, 2)
                    for i in 0..<16 { _ = try? c.movePages([a], nodes: [1 - i % 2], status: &status, flags: .moveAll) }
                }
            }
            if outcome != .completed { failures.append("seed \(seed): \(outcome)") }
            if !stale.isEmpty { failures.append("seed \(seed): \(stale[0])") }
            // The bytes moved with the mapping.
            let moved = try? p.load(b)
            if moved != 0x5A { failures.append("seed \(seed): read \(String(describing: moved)) at the new address") }
            child = nil
            parent = nil
            if !kernel.audit().isClean { failures.append("seed \(seed): audit \(kernel.audit())") }
        }
        #expect(failures.isEmpty, "\(failures.prefix(5))")
    }

    @Test("a write to the huge zero page splits its PMD while readers on other CPUs read through their 2 MiB translation: the PMD is cleared and flushed before the zero-page PTEs appear, so no CPU reads through a translation the page tables no longer hold")
    func hugeZeroSplitAgainstReaders() throws {
        var failures: [String] = []
        for seed in Self.seeds {
            let kernel = try makeKernel(thp: .always)
            var mm: AddressSpace? = try AddressSpace(kernel: kernel)
            let m = mm!
            let a = try m.mmap(length: hugeSize)
            let other = try m.mmap(length: pageSize)
            try m.store(other, 1)
            // A read fault maps the huge zero page with one PMD.
            _ = try m.load(a)
            guard m.entry(at: a).level == .pmd else {
                failures.append("seed \(seed): the read did not map the huge zero page")
                break
            }
            let box = Box()
            let (outcome, stale) = Self.run(seed: seed, kernel) { s in
                s.spawn("reader 1") { Self.reader(m, a + 0x1000) { if $0 != 0 { box.staleReads += 1 } } }
                s.spawn("reader 2") { Self.reader(m, a + 0x7_0000) { if $0 != 0 { box.staleReads += 1 } } }
                // Flushes of another page of the address space: the readers
                // catch up with them as their accesses begin.
                s.spawn("mprotect") {
                    for i in 0..<100 {
                        _ = try? m.mprotect(other, length: pageSize, protection: i % 2 == 0 ? .read : [.read, .write])
                        HostClock.sleep(nanos: 300)
                    }
                }
                s.spawn("writer") {
                    Self.stagger(seed, 1)
                    // A write fault on the huge zero page: split the PMD, then
                    // a new page for the written 4 KiB.
                    _ = try? m.store(a + 0x10_0000, 0x77)
                }
            }
            if outcome != .completed { failures.append("seed \(seed): \(outcome)") }
            if !stale.isEmpty { failures.append("seed \(seed): \(stale[0])") }
            if box.staleReads != 0 { failures.append("seed \(seed): \(box.staleReads) reads of the zero pages were not zero") }
            if (try? m.load(a + 0x10_0000)) != 0x77 { failures.append("seed \(seed): the write was lost") }
            if (try? m.load(a + 0x7_0000)) != 0 { failures.append("seed \(seed): a zero page reads non-zero") }
            mm = nil
            if !kernel.audit().isClean { failures.append("seed \(seed): audit \(kernel.audit())") }
        }
        #expect(failures.isEmpty, "\(failures.prefix(5))")
    }

    @Test("a deferred flush (migrc / LUF) is not taken for an entry whose mprotect flush is pending: a CPU still writing through its old writable translation never loses a write")
    func deferredFlushAgainstMprotect() throws {
        var failures: [String] = []
        for seed in Self.seeds {
            let kernel = try makeKernel(thp: .never)
            var mm: AddressSpace? = try AddressSpace(kernel: kernel)
            let m = mm!
            let a = try m.mmap(length: pageSize)
            try m.store(a, 0)
            let box = Box()
            let (outcome, stale) = Self.run(seed: seed, kernel) { s in
                s.spawn("writer") {
                    for i in 1...400 {
                        guard (try? m.store(a, UInt8(truncatingIfNeeded: i))) != nil else { return }
                        box.last = i & 0xFF
                        HostClock.sleep(nanos: 250)
                    }
                }
                s.spawn("mprotect") {
                    Self.stagger(seed, 1)
                    _ = try? m.mprotect(a, length: pageSize, protection: .read)
                }
                s.spawn("move_pages") {
                    Self.stagger(seed, 2)
                    var status: [PageStatus] = []
                    let policy = MigratePagesPolicy(deferredFlush: true)
                    for node in [1, 0, 1] { _ = try? m.movePages([a], nodes: [node], status: &status, policy: policy) }
                }
            }
            kernel.deferredTLB.flush()
            if outcome != .completed { failures.append("seed \(seed): \(outcome)") }
            if !stale.isEmpty { failures.append("seed \(seed): \(stale[0])") }
            let now = try m.load(a)
            if Int(now) != box.last { failures.append("seed \(seed): the page holds \(now), the last write that succeeded stored \(box.last)") }
            mm = nil
            if !kernel.audit().isClean { failures.append("seed \(seed): audit \(kernel.audit())") }
        }
        #expect(failures.isEmpty, "\(failures.prefix(5))")
    }

    @Test("pwrite gives up a pending deferred flush before it writes the cache folio: a CPU that read the old frame reads the new bytes once pwrite returned")
    func deferredFlushAgainstPwrite() throws {
        var failures: [String] = []
        for seed in Self.seeds {
            let kernel = try makeKernel(thp: .never)
            let file = File(kernel: kernel)
            let old = [UInt8](repeating: 0x11, count: pageSize)
            _ = try old.withUnsafeBytes { buf throws(Errno) in try file.pwrite(from: buf, offset: 0) }
            var mm: AddressSpace? = try AddressSpace(kernel: kernel)
            let m = mm!
            let a = try m.mmap(length: pageSize, protection: .read, shared: true, file: file)
            _ = try m.load(a)
            let box = Box()
            let (outcome, stale) = Self.run(seed: seed, kernel) { s in
                s.spawn("reader") {
                    for _ in 0..<400 {
                        let done = box.pwriteDone
                        if let v = try? m.load(a), done && v != 0x22 { box.staleReads += 1 }
                        HostClock.sleep(nanos: 250)
                    }
                }
                s.spawn("move_pages") {
                    Self.stagger(seed, 2)
                    var status: [PageStatus] = []
                    let policy = MigratePagesPolicy(deferredFlush: true)
                    for node in [1, 0] { _ = try? m.movePages([a], nodes: [node], status: &status, policy: policy) }
                }
                s.spawn("pwrite") {
                    Self.stagger(seed, 1)
                    let new = [UInt8](repeating: 0x22, count: pageSize)
                    _ = try? new.withUnsafeBytes { buf throws(Errno) in try file.pwrite(from: buf, offset: 0) }
                    box.pwriteDone = true
                }
            }
            kernel.deferredTLB.flush()
            if outcome != .completed { failures.append("seed \(seed): \(outcome)") }
            if !stale.isEmpty { failures.append("seed \(seed): \(stale[0])") }
            if box.staleReads > 0 { failures.append("seed \(seed): \(box.staleReads) reads of the old bytes after pwrite returned") }
            if (try? m.load(a)) != 0x22 { failures.append("seed \(seed): the mapping does not show pwrite's bytes") }
            mm = nil
            withExtendedLifetime(file) {}
            if !kernel.audit().isClean { failures.append("seed \(seed): audit \(kernel.audit())") }
        }
        #expect(failures.isEmpty, "\(failures.prefix(5))")
    }
}

/// The stale-entry checker reports each way a flush can be missing, with
/// flushes switched off on purpose (`skipsTLBFlushes`).
@Suite("The stale-entry checker")
struct StaleEntryCheckerTests {
    static func stale(_ kernel: Kernel) -> [Diagnostic] {
        kernel.takeStaleTLBAccesses()
    }

    @Test("a frame freed and allocated again while a CPU keeps its translation is reported, though the old address holds no entry")
    func freedAndReusedFrame() throws {
        let kernel = try makeKernel(thp: .never)
        var mm: AddressSpace? = try AddressSpace(kernel: kernel)
        let m = mm!
        let a = try m.mmap(length: pageSize)
        try m.store(a, 7)
        let pfn = m.entry(at: a).entry.pfn
        m.skipsTLBFlushes = true
        try m.madvise(a, length: pageSize, advice: .dontNeed)
        m.skipsTLBFlushes = false
        // Allocate until the freed frame is handed out again.
        var held: [Folio] = []
        while let f = kernel.allocateFolio(order: 0) {
            held.append(f)
            if f.pfn == pfn { break }
        }
        defer { for f in held { f.put() } }
        try #require(held.last?.pfn == pfn, "the allocator hands the freed frame out again")
        #expect(m.entry(at: a).entry.isNone)
        _ = try m.load(a)   // through the stale translation
        let reports = Self.stale(kernel)
        #expect(reports.count == 1)
        #expect(reports.first?.detail.contains("freed and allocated again") == true, "\(reports)")
        mm = nil
    }

    @Test("a write through a writable translation after a write-protect whose flush was skipped is reported; during a pending flush it is not")
    func staleWritableAfterWriteProtect() throws {
        let kernel = try makeKernel(thp: .never)
        var mm: AddressSpace? = try AddressSpace(kernel: kernel)
        let m = mm!
        let a = try m.mmap(length: pageSize)
        try m.store(a, 1)
        // While a flush is pending the window is legal.
        m.incTLBFlushPending()
        m.skipsTLBFlushes = true
        try m.mprotect(a, length: pageSize, protection: .read)
        try m.store(a, 2)
        #expect(Self.stale(kernel).isEmpty)
        m.decTLBFlushPending()
        // With no flush pending, the same write is a missed flush.
        try m.store(a, 3)
        m.skipsTLBFlushes = false
        let reports = Self.stale(kernel)
        #expect(reports.count == 1)
        #expect(reports.first?.detail.contains("write-protected") == true, "\(reports)")
        mm = nil
    }
}
