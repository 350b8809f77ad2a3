// `svmemu bench thp`'s harness: hmm-tests' benchmark_thp_migration on the emulator.
import MirrorDriver
import SVMEmu

/// One side (with or without THP) of one size of `svmemu bench thp`: the
/// mean time per direction and its throughput, computed as the kernel test
/// does (bytes / 2^30 per second, labelled GB/s).
public struct THPBenchSide: Encodable, Sendable {
    /// Mean RAM -> VRAM migration time, milliseconds.
    public var sysToDevMs: Double
    /// Mean VRAM -> RAM migration time, milliseconds.
    public var devToSysMs: Double
    /// The buffer size.
    public var bytes: Int
    /// RAM -> VRAM throughput, 2^30 bytes per second.
    public var sysToDevGBps: Double { Double(bytes) / Double(1 << 30) / (sysToDevMs / 1000) }
    /// VRAM -> RAM throughput, 2^30 bytes per second.
    public var devToSysGBps: Double { Double(bytes) / Double(1 << 30) / (devToSysMs / 1000) }

    /// The times and the throughputs (not the size: the size's own object has it).
    public func encode(to encoder: any Encoder) throws {
        try encoder.encodeProperties(of: self, except: ["bytes"], adding: ["sysToDevGBps": sysToDevGBps, "devToSysGBps": devToSysGBps])
    }
}

/// The harness of `svmemu bench thp`: benchmark_thp_migration
/// (tools/testing/selftests/mm/hmm-tests.c).
public enum THPBench {
    /// The THP size, 2 MiB.
    public static let thpSize = PageGeometry.pmdSize
    /// The sizes of the kernel test, by its names: a quarter THP to 128 THPs.
    public static let sizes: [(name: String, bytes: Int)] = [
        ("Small Buffer", thpSize / 4),
        ("Half THP Size", thpSize / 2),
        ("Single THP Size", thpSize),
        ("Two THP Size", thpSize * 2),
        ("Four THP Size", thpSize * 4),
        ("Eight THP Size", thpSize * 8),
        ("One twenty eight THP Size", thpSize * 128),
    ]

    /// One run_migration_benchmark(): a fresh machine, 2 MiB-aligned
    /// mapping and device; the buffer filled, migrated RAM -> VRAM and back
    /// once as a warm-up, then `iterations` times timed each way. With
    /// `thp`: MADV_HUGEPAGE and 2 MiB migration granularity (whole folios,
    /// which it checks stay whole); without: MADV_NOHUGEPAGE and 4 KiB.
    ///
    /// - Throws: ``HarnessFailure`` when pages do not move, bytes differ,
    ///   the kernel reports a diagnostic or the audit a finding;
    ///   `HostMemoryRefusal` when the host refuses the machine.
    public static func measure(bytes: Int, thp: Bool, iterations: Int, seed: UInt64) throws -> THPBenchSide {
        let (machine, dev) = try Machine.migrationBench(bytes: bytes, thp: .madvise, granularity: thp ? .huge2M : .base4K,
                                                        deviceName: "hmm_dmirror0")
        let space = machine.mm
        let pages = bytes >> PageGeometry.pageShift
        // mmap of a 2 MiB multiple is 2 MiB aligned in the emulator; smaller
        // buffers are placed at a 2 MiB boundary explicitly.
        let base = try space.mmap(address: space.baseAddress + (64 << 20), length: bytes)
        try space.madvise(base, length: bytes, advice: thp ? .hugePage : .noHugePage)
        try space.fillPattern(base, length: bytes, seed: seed)

        /// One direction, timed, in milliseconds.
        func migrate(toDevice: Bool) throws -> Double {
            let t0 = HostClock.nanos()
            let n = toDevice ? try dev.migrateToDevice(base, pages: pages) : try dev.migrateToSystem(base, pages: pages)
            let t1 = HostClock.nanos()
            guard n == pages else {
                throw HarnessFailure(toDevice ? "bench thp: \(n) of \(pages) pages reached VRAM" : "bench thp: \(n) of \(pages) pages came back")
            }
            return Double(t1 - t0) / 1e6
        }
        _ = try migrate(toDevice: true)
        _ = try migrate(toDevice: false)
        var s2d = 0.0, d2s = 0.0
        for _ in 0..<iterations {
            s2d += try migrate(toDevice: true)
            d2s += try migrate(toDevice: false)
        }
        if let bad = try space.verifyPattern(base, length: bytes, seed: seed) {
            throw HarnessFailure("bench thp: BYTES DIFFER at 0x\(String(bad, radix: 16)) (\(bytes) bytes, thp \(thp))")
        }
        if thp && bytes >= thpSize {
            guard space.entry(at: base).level == .pmd else {
                throw HarnessFailure("bench thp: the THP run did not keep 2 MiB folios")
            }
        }
        try MigrateBench.checkDiagnostics(machine.kernel, "bench thp")
        try machine.finishAudited("bench thp")
        return THPBenchSide(sysToDevMs: s2d / Double(iterations), devToSysMs: d2s / Double(iterations), bytes: bytes)
    }
}
