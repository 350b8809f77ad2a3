// `svmemu bench thp`: hmm-tests' benchmark_thp_migration on the emulator.
import ArgumentParser
import Foundation
import MirrorDriver
import SVMEmu

/// Reproduces benchmark_thp_migration (tools/testing/selftests/mm/hmm-tests.c):
/// for buffer sizes from a quarter THP (512 KiB) to 128 THPs (256 MiB), a
/// fresh 2 MiB-aligned anonymous mapping is filled, migrated RAM -> VRAM and
/// back once as a warm-up, then `iterations` times timed each way; the mean
/// time per direction and its throughput are reported, with THP (MADV_HUGEPAGE,
/// 2 MiB migration granularity: whole folios with SELECT_COMPOUND) and without
/// (MADV_NOHUGEPAGE, 4 KiB granularity). Bytes are verified after the last
/// round. Throughput is computed as the kernel test does: bytes / 2^30 per
/// second, labelled GB/s.
struct BenchTHPCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "thp",
        abstract: "hmm-tests' benchmark_thp_migration: 2 MiB vs 4 KiB migration, both directions.",
        discussion: """
            Build with -c release. Sizes 512K, 1M, 2M, 4M, 8M, 16M, 256M (quarter THP to 128 THPs), \
            each in a fresh machine and a fresh 2 MiB-aligned mapping, THP allowed in madvise mode. \
            "With THP": MADV_HUGEPAGE and MirrorDevice migration granularity 2m; "without": \
            MADV_NOHUGEPAGE and granularity 4k. One warm-up round trip, then --rounds timed \
            round trips; means are reported. Throughput as the kernel test computes it: \
            size / 2^30 / seconds ("GB/s"). With --json prints one object (Docs/json.md) whose results are \
            sizes: [{"name","bytes","iterations","thp":{...},"regular":{...}}] where each side has \
            sysToDevMs, devToSysMs, sysToDevGBps, devToSysGBps.

            \(ExitStatus.helpParagraph)
            """)

    /// `--rounds`: timed round trips per size and mode (the kernel test
    /// uses 5, the default); the mean is reported.
    @OptionGroup var timing: BenchRoundsOptions
    /// `--rounds` (the name the run body and the results use).
    var iterations: Int { timing.rounds }

    @Option(name: .long, parsing: .unconditional, help: "Largest size to run, 512K to 64G, with an optional K, M or G suffix (default: all, up to 256M).")
    var maxSize: String = "256M"

    @OptionGroup var pattern: PatternSeedOption

    @OptionGroup var output: JSONOutputOptions
    var json: Bool { output.json }

    @OptionGroup var report: ReportFileOptions

    /// `--iterations`, the old spelling of `--rounds`.
    struct OldSpellings: DeprecatedSpellings {
        @Option(name: .customLong("iterations"), parsing: .unconditional, help: .private) var iterations: Int?
    }
    @OptionGroup var old: OldSpellings

    mutating func validate() throws {
        try Deprecation.adopt(old.iterations, into: &timing.rounds, defaultValue: 5, range: 1...100, oldFlag: "--iterations", newFlag: "--rounds")
        _ = try ByteSize.check(maxSize, flag: "--max-size", range: Self.maxSizeRange)
    }

    static let thpSize = PageGeometry.pmdSize
    /// What `--max-size` takes: from the smallest size of the test (a quarter
    /// THP) up; above the largest (256 MiB) every size runs.
    static let maxSizeRange = thpSize / 4...64 * ByteSize.gib
    static let tests: [(String, Int)] = [
        ("Small Buffer", thpSize / 4),
        ("Half THP Size", thpSize / 2),
        ("Single THP Size", thpSize),
        ("Two THP Size", thpSize * 2),
        ("Four THP Size", thpSize * 4),
        ("Eight THP Size", thpSize * 8),
        ("One twenty eight THP Size", thpSize * 128),
    ]

    struct Side: Encodable {
        var sysToDevMs: Double
        var devToSysMs: Double
        var bytes: Int
        var sysToDevGBps: Double { Double(bytes) / Double(1 << 30) / (sysToDevMs / 1000) }
        var devToSysGBps: Double { Double(bytes) / Double(1 << 30) / (devToSysMs / 1000) }

        enum CodingKeys: String, CodingKey { case sysToDevMs, devToSysMs, sysToDevGBps, devToSysGBps }
        func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(sysToDevMs, forKey: .sysToDevMs)
            try c.encode(devToSysMs, forKey: .devToSysMs)
            try c.encode(sysToDevGBps, forKey: .sysToDevGBps)
            try c.encode(devToSysGBps, forKey: .devToSysGBps)
        }
    }

    /// One size of the benchmark, as the JSON's `sizes` holds it.
    struct SizeResult: Encodable {
        var name: String
        var bytes: Int
        var iterations: Int
        var thp: Side
        var regular: Side
    }

    /// The results of `--json`.
    struct Results: Encodable {
        var sizes: [SizeResult]
    }

    struct Failure: Error, CustomStringConvertible { let description: String }

    func run() throws {
        #if DEBUG
        FileHandle.standardError.write(Data("svmemu bench thp: warning: this is a debug build; figures are not meaningful (use swift build -c release)\n".utf8))
        #endif
        let limit = ByteSize.parse(maxSize)!
        var rows: [(String, Int, Side, Side)] = []
        let progress = ProgressLine(label: "svmemu bench thp")
        for (name, size) in Self.tests where size <= limit {
            progress.say("\(name): with THP")
            let thp = try Self.measure(bytes: size, thp: true, iterations: iterations, seed: pattern.seed)
            progress.say("\(name): without THP")
            let regular = try Self.measure(bytes: size, thp: false, iterations: iterations, seed: pattern.seed)
            progress.done()
            rows.append((name, size, thp, regular))
            if !json { print(Self.render(name, size, thp, regular)) }
        }
        if json {
            let sizes = rows.map { SizeResult(name: $0.0, bytes: $0.1, iterations: iterations, thp: $0.2, regular: $0.3) }
            print(try JSONReport.render(for: self, results: Results(sizes: sizes)))
        } else {
            print(Self.summary(rows))
        }
    }

    /// One run_migration_benchmark(): a fresh machine, mapping and device.
    static func measure(bytes: Int, thp: Bool, iterations: Int, seed: UInt64) throws -> Side {
        let machine = try BenchMachine(bytes: bytes, thp: .madvise, granularity: thp ? .huge2M : .base4K,
                                   deviceName: "hmm_dmirror0")
        let kernel = machine.kernel, space = machine.mm!, dev = machine.device!
        let pages = bytes >> PageGeometry.pageShift
        // mmap of a 2 MiB multiple is 2 MiB aligned in the emulator; smaller
        // buffers are placed at a 2 MiB boundary explicitly.
        let base = try space.mmap(address: space.baseAddress + (64 << 20), length: bytes)
        try space.madvise(base, length: bytes, advice: thp ? .hugePage : .noHugePage)
        try space.fillPattern(base, length: bytes, seed: seed)

        func there() throws -> Double {
            let t0 = HostClock.nanos()
            let n = try dev.migrateToDevice(base, pages: pages)
            let t1 = HostClock.nanos()
            guard n == pages else { throw Failure(description: "bench thp: \(n) of \(pages) pages reached VRAM") }
            return Double(t1 - t0) / 1e6
        }
        func back() throws -> Double {
            let t0 = HostClock.nanos()
            let n = try dev.migrateToSystem(base, pages: pages)
            let t1 = HostClock.nanos()
            guard n == pages else { throw Failure(description: "bench thp: \(n) of \(pages) pages came back") }
            return Double(t1 - t0) / 1e6
        }
        _ = try there()
        _ = try back()
        var s2d = 0.0, d2s = 0.0
        for _ in 0..<iterations {
            s2d += try there()
            d2s += try back()
        }
        if let bad = try space.verifyPattern(base, length: bytes, seed: seed) {
            throw Failure(description: "bench thp: BYTES DIFFER at 0x\(String(bad, radix: 16)) (\(bytes) bytes, thp \(thp))")
        }
        if thp && bytes >= thpSize {
            guard space.entry(at: base).level == .pmd else {
                throw Failure(description: "bench thp: the THP run did not keep 2 MiB folios")
            }
        }
        let diagnostics = kernel.diagnostics
        if !diagnostics.isEmpty {
            throw Failure(description: "bench thp: the kernel reported \(diagnostics.count) diagnostics, first: \(diagnostics[0])")
        }
        return Side(sysToDevMs: s2d / Double(iterations), devToSysMs: d2s / Double(iterations), bytes: bytes)
    }

    /// print_benchmark_results(): one table per size, improvements as the
    /// kernel computes them (time: (regular - thp) / regular; throughput:
    /// (thp - regular) / regular).
    static func render(_ name: String, _ bytes: Int, _ thp: Side, _ regular: Side) -> String {
        func f(_ v: Double, _ d: Int) -> String { String(format: "%.\(d)f", v) }
        func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s : s + String(repeating: " ", count: n - s.count) }
        func row(_ label: String, _ a: String, _ b: String, _ gain: Double) -> String {
            "\(pad(label, 21))| \(pad(a, 16))| \(pad(b, 16))| \(f(gain * 100, 1))%\n"
        }
        var s = "=== \(name) (\(f(Double(bytes) / Double(1 << 20), 1)) MB) ===\n"
        s += "                     | With THP        | Without THP     | Improvement\n"
        s += "---------------------------------------------------------------------\n"
        s += row("Sys->Dev Migration", f(thp.sysToDevMs, 3) + " ms", f(regular.sysToDevMs, 3) + " ms",
                 (regular.sysToDevMs - thp.sysToDevMs) / regular.sysToDevMs)
        s += row("Dev->Sys Migration", f(thp.devToSysMs, 3) + " ms", f(regular.devToSysMs, 3) + " ms",
                 (regular.devToSysMs - thp.devToSysMs) / regular.devToSysMs)
        s += row("S->D Throughput", f(thp.sysToDevGBps, 2) + " GB/s", f(regular.sysToDevGBps, 2) + " GB/s",
                 (thp.sysToDevGBps - regular.sysToDevGBps) / regular.sysToDevGBps)
        s += row("D->S Throughput", f(thp.devToSysGBps, 2) + " GB/s", f(regular.devToSysGBps, 2) + " GB/s",
                 (thp.devToSysGBps - regular.devToSysGBps) / regular.devToSysGBps)
        return s
    }

    static func summary(_ rows: [(String, Int, Side, Side)]) -> String {
        func f(_ v: Double, _ d: Int) -> String { String(format: "%.\(d)f", v) }
        func col(_ s: String, _ n: Int) -> String { s.count >= n ? s : String(repeating: " ", count: n - s.count) + s }
        var s = "Summary (mean of the timed round trips; GB/s = 2^30 bytes/s as in hmm-tests)\n"
        s += col("size", 9) + col("THP s->d ms", 13) + col("4K s->d ms", 12) + col("THP d->s ms", 13) + col("4K d->s ms", 12)
            + col("THP s->d GB/s", 15) + col("4K s->d GB/s", 14) + col("THP d->s GB/s", 15) + col("4K d->s GB/s", 14) + "\n"
        for (_, bytes, thp, reg) in rows {
            let size = bytes >= 1 << 20 ? "\(bytes >> 20)M" : "\(bytes >> 10)K"
            s += col(size, 9) + col(f(thp.sysToDevMs, 3), 13) + col(f(reg.sysToDevMs, 3), 12)
                + col(f(thp.devToSysMs, 3), 13) + col(f(reg.devToSysMs, 3), 12)
                + col(f(thp.sysToDevGBps, 2), 15) + col(f(reg.sysToDevGBps, 2), 14)
                + col(f(thp.devToSysGBps, 2), 15) + col(f(reg.devToSysGBps, 2), 14) + "\n"
        }
        return s
    }
}
