// `svmemu bench thp`: hmm-tests' benchmark_thp_migration on the emulator.
import ArgumentParser
import Foundation
import SVMEmu
import SVMStress

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

    @Option(name: .long, parsing: .unconditional, help: "Largest size to run, 512K to 64G, with an optional K, M or G suffix (default: all, up to 256M).")
    var maxSize: String = "256M"

    @OptionGroup var pattern: PatternSeedOption

    @OptionGroup var output: JSONOutputOptions

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

    static let thpSize = THPBench.thpSize
    /// What `--max-size` takes: from the smallest size of the test (a quarter
    /// THP) up; above the largest (256 MiB) every size runs.
    static let maxSizeRange = thpSize / 4...64 * ByteSize.gib

    /// One side of a size (`THPBench`'s).
    typealias Side = THPBenchSide

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

    func run() throws {
        warnIfDebugBuild("svmemu bench thp")
        let limit = ByteSize.parse(maxSize)!
        var rows: [SizeResult] = []
        let progress = ProgressLine(label: "svmemu bench thp")
        for (name, size) in THPBench.sizes where size <= limit {
            progress.say("\(name): with THP")
            let thp = try THPBench.measure(bytes: size, thp: true, iterations: timing.rounds, seed: pattern.seed)
            progress.say("\(name): without THP")
            let regular = try THPBench.measure(bytes: size, thp: false, iterations: timing.rounds, seed: pattern.seed)
            progress.done()
            rows.append(SizeResult(name: name, bytes: size, iterations: timing.rounds, thp: thp, regular: regular))
            if !output.json { print(Self.render(rows.last!)) }
        }
        try printReport(Results(sizes: rows), json: output.json, text: Self.summary(rows) + "\n")
    }

    /// print_benchmark_results(): one table per size, improvements as the
    /// kernel computes them (time: (regular - thp) / regular; throughput:
    /// (thp - regular) / regular).
    static func render(_ size: SizeResult) -> String {
        let (thp, regular) = (size.thp, size.regular)
        func f(_ v: Double, _ d: Int) -> String { Cell.fixed(v, d) }
        var t = Table(["", "With THP", "Without THP", "Improvement"], align: [.left], separator: " | ", rule: true)
        func row(_ label: String, _ a: String, _ b: String, _ gain: Double) { t.add([label, a, b, f(gain * 100, 1) + "%"]) }
        row("Sys->Dev Migration", f(thp.sysToDevMs, 3) + " ms", f(regular.sysToDevMs, 3) + " ms",
            (regular.sysToDevMs - thp.sysToDevMs) / regular.sysToDevMs)
        row("Dev->Sys Migration", f(thp.devToSysMs, 3) + " ms", f(regular.devToSysMs, 3) + " ms",
            (regular.devToSysMs - thp.devToSysMs) / regular.devToSysMs)
        row("S->D Throughput", f(thp.sysToDevGBps, 2) + " GB/s", f(regular.sysToDevGBps, 2) + " GB/s",
            (thp.sysToDevGBps - regular.sysToDevGBps) / regular.sysToDevGBps)
        row("D->S Throughput", f(thp.devToSysGBps, 2) + " GB/s", f(regular.devToSysGBps, 2) + " GB/s",
            (thp.devToSysGBps - regular.devToSysGBps) / regular.devToSysGBps)
        return "=== \(size.name) (\(f(Double(size.bytes) / Double(1 << 20), 1)) MB) ===\n" + t.text
    }

    /// One row per size: the mean round trips and throughputs, THP and 4K side by side.
    static func summary(_ rows: [SizeResult]) -> String {
        func f(_ v: Double, _ d: Int) -> String { Cell.fixed(v, d) }
        var t = Table(["size", "THP s->d ms", "4K s->d ms", "THP d->s ms", "4K d->s ms",
                       "THP s->d GB/s", "4K s->d GB/s", "THP d->s GB/s", "4K d->s GB/s"], align: [.right])
        for r in rows {
            let (bytes, thp, reg) = (r.bytes, r.thp, r.regular)
            t.add([bytes >= 1 << 20 ? "\(bytes >> 20)M" : "\(bytes >> 10)K",
                   f(thp.sysToDevMs, 3), f(reg.sysToDevMs, 3), f(thp.devToSysMs, 3), f(reg.devToSysMs, 3),
                   f(thp.sysToDevGBps, 2), f(reg.sysToDevGBps, 2), f(thp.devToSysGBps, 2), f(reg.devToSysGBps, 2)])
        }
        return "Summary (mean of the timed round trips; GB/s = 2^30 bytes/s as in hmm-tests)\n" + t.text
    }
}
