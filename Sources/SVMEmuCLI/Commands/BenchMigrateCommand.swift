// `svmemu bench migrate`: a RAM -> VRAM -> RAM round trip through MirrorDriver
// against memcpy of the same bytes, in the same run.
import ArgumentParser
import Foundation
import MirrorDriver
import SVMEmu
import SVMStress

// MigrationGranularity is CaseInsensitiveArgument (Support/Vocabulary.swift).

/// Times a round trip RAM -> VRAM -> RAM against memcpy of the same bytes
/// (`MigrateBench`) and prints the figures.
struct BenchMigrateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migrate",
        abstract: "Round trip RAM -> VRAM -> RAM against memcpy.",
        discussion: """
            Build with -c release. Fills a buffer of --size bytes, warms up with one round trip \
            (first touch of emulated RAM and VRAM, chunk registration), then times --rounds round \
            trips RAM -> VRAM -> RAM through MirrorDriver (single thread, memcpy copy engine) and \
            memcpy of the same bytes between two host buffers backed like emulated RAM and VRAM \
            (host huge pages where allowed), there and back, with a compiler barrier between \
            the copies so neither is optimised away. Migration and memcpy rounds alternate, \
            so both see the same machine. The best \
            round of each is reported; bytes are verified after every round trip. \
            The same bytes are also copied with streaming stores (what the copy engine does per \
            page); glibc's memcpy streams only above a size it picks, so at some sizes it is the \
            slower copy. \
            With --json prints one object (Docs/json.md) whose results are granularity, bytes, \
            migrateGBps, memcpyGBps, ratio, streamCopyGBps, ratioToBestCopy, migrateSeconds, \
            toDeviceSeconds, toSystemSeconds, memcpySeconds and rounds, where bytes is the buffer size, ratio \
            is migrate over memcpy and ratioToBestCopy is migrate over the faster of the two copies. \
            The goals are on ratioToBestCopy: at least 0.8 at 4k and 0.95 at 2m. \
            Linux's move_pages at 4 KiB runs at about a quarter of memcpy.

            \(ExitStatus.helpParagraph)
            """)

    @Option(name: .long, help: "Migration granularity: 4k or 2m.")
    var granularity: MigrationGranularity = .base4K

    @Option(name: .long, parsing: .unconditional, help: "Buffer size, 4K to 64G, a multiple of 4K (with --granularity 2m: 2M to 64G, a multiple of 2M: whole 2 MiB folios), with an optional K, M or G suffix (binary units); needs about 4.2 times as much host memory.")
    var size: String = "256M"

    @OptionGroup var timing: BenchRoundsOptions

    @OptionGroup var pattern: PatternSeedOption

    @OptionGroup var output: JSONOutputOptions

    @OptionGroup var report: ReportFileOptions

    func validate() throws {
        if granularity == .huge2M {
            _ = try ByteSize.check(size, flag: "--size with --granularity 2m", range: Self.hugeSizeRange, multiple: Self.hugeSizeMultiple)
        } else {
            _ = try ByteSize.check(size, flag: "--size", range: Self.sizeRange, multiple: Self.sizeMultiple)
        }
    }

    /// Sizes `--size` takes: whole 4 KiB pages, up to 64 GiB.
    static let sizeRange = 4 * ByteSize.kib...64 * ByteSize.gib
    static let sizeMultiple = 4 * ByteSize.kib
    /// Sizes `--size` takes at `--granularity 2m`: whole 2 MiB folios (a
    /// smaller or ragged buffer has no 2 MiB folio to migrate, or a tail
    /// that would move at 4 KiB).
    static let hugeSizeRange = 2 * ByteSize.mib...64 * ByteSize.gib
    static let hugeSizeMultiple = 2 * ByteSize.mib

    /// Host memory a run over `bytes` touches: the buffer's RAM and VRAM
    /// frames and the two memcpy baseline buffers (4.05 bytes per byte),
    /// measured as peak RSS of 256 MiB and 512 MiB runs; with a margin.
    static func memoryNeeded(bytes: Int) -> Int { bytes / 5 * 21 + 128 * ByteSize.mib }

    /// Refuses a size the host cannot hold (`available`: bytes available).
    /// Throws `CLIError.notEnoughMemory` (exit status 1).
    func preflight(available: Int? = HostResources.availableBytes()) throws(CLIError) {
        try HostResources.checkMemory(needed: Self.memoryNeeded(bytes: ByteSize.parse(size)!), available: available,
                                      for: "svmemu bench migrate --size \(size)")
    }

    /// The figures (`MigrateBench`'s).
    typealias Result = MigrateBenchResult

    func run() throws {
        try preflight()
        warnIfDebugBuild("svmemu bench migrate")
        let bytes = ByteSize.parse(size)!
        let r = try measure(bytes: bytes)
        try printReport(r, json: output.json, text: Self.render(r))
    }

    /// The harness with this command's arguments, with a progress line.
    func measure(bytes: Int) throws -> Result {
        let progress = ProgressLine(label: "svmemu bench migrate \(granularity.rawValue)")
        defer { progress.done() }
        return try MigrateBench.run(bytes: bytes, granularity: granularity, rounds: timing.rounds, seed: pattern.seed,
                                    progress: progress.say)
    }

    static func render(_ r: Result) -> String {
        func f(_ v: Double, _ d: Int = 2) -> String { Cell.fixed(v, d) }
        var t = Table(["", "ms", "GB/s", ""], align: [.left, .right, .right, .left], indent: "  ")
        t.add(["round trip RAM -> VRAM -> RAM", f(r.migrateSeconds * 1e3, 1), f(r.migrateGBps),
               "(to VRAM \(f(r.toDeviceSeconds * 1e3, 1)) ms, back \(f(r.toSystemSeconds * 1e3, 1)) ms)"])
        t.add(["memcpy, same bytes", f(r.memcpySeconds * 1e3, 1), f(r.memcpyGBps), ""])
        t.add(["streaming copy, same bytes", f(r.streamCopySeconds * 1e3, 1), f(r.streamCopyGBps), "(the copy engine's stores)"])
        return "svmemu bench migrate (granularity \(r.granularity.rawValue), \(f(Double(r.bytes) / Double(1 << 20), 0)) MiB, best of \(r.rounds))\n"
            + t.text + Table.columns([["ratio (migrate / memcpy)", f(r.ratio, 3), "(\(r.linuxComparison))"],
                                      ["ratio to the faster copy", f(r.ratioToBestCopy, 3), "(\(r.goal))"]]).split(separator: "\n").map { "  \($0)\n" }.joined()
    }
}
