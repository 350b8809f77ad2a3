// `svmemu bench migrate`: a RAM -> VRAM -> RAM round trip through MirrorDriver
// against memcpy of the same bytes, in the same run.
import ArgumentParser
import Foundation
import MirrorDriver
import SVMEmu
import SVMStress

// MigrationGranularity is CaseInsensitiveArgument (Support/Vocabulary.swift).

/// Times `MirrorDevice.migrateToDevice` over a whole buffer followed by
/// `migrateToSystem` back (plain memcpy copy engine, one thread), and memcpy of
/// the same number of bytes between two host buffers backed like the emulated
/// frames (one copy each way, see `MemcpyBaseline`). Both move `2 * bytes`; GB/s are 10^9 bytes per second.
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
            Linux's move_pages at 4 KiB runs at about a quarter of memcpy.

            \(ExitStatus.helpParagraph)
            """)

    @Option(name: .long, help: "Migration granularity: 4k or 2m.")
    var granularity: MigrationGranularity = .base4K

    @Option(name: .long, parsing: .unconditional, help: "Buffer size, 4K to 64G, a multiple of 4K (with --granularity 2m: 2M to 64G, a multiple of 2M: whole 2 MiB folios), with an optional K, M or G suffix (binary units); needs about 4.2 times as much host memory.")
    var size: String = "256M"

    @OptionGroup var timing: BenchRoundsOptions

    @OptionGroup var pattern: PatternSeedOption
    var rounds: Int { timing.rounds }

    @OptionGroup var output: JSONOutputOptions
    var json: Bool { output.json }

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

    struct Result: Encodable {
        var granularity: MigrationGranularity
        var bytes: Int
        var migrateSeconds: Double
        var memcpySeconds: Double
        var streamCopySeconds: Double
        var toDeviceSeconds: Double
        var toSystemSeconds: Double
        var rounds: Int
        var migrateGBps: Double { Double(2 * bytes) / migrateSeconds / 1e9 }
        var memcpyGBps: Double { Double(2 * bytes) / memcpySeconds / 1e9 }
        var ratio: Double { migrateGBps / memcpyGBps }
        var streamCopyGBps: Double { Double(2 * bytes) / streamCopySeconds / 1e9 }
        /// Over the faster of memcpy and the streaming copy: the share of the
        /// achievable copy bandwidth the migration reaches (at most 1 in principle).
        var ratioToBestCopy: Double { migrateGBps / max(memcpyGBps, streamCopyGBps) }
        /// What the goal line says for this granularity.
        var goal: String { granularity == .huge2M ? "goal >= 0.8" : "goal >= 0.5; Linux move_pages at 4 KiB: ~0.25" }

        enum CodingKeys: String, CodingKey {
            case granularity, bytes, migrateGBps, memcpyGBps, ratio, streamCopyGBps, ratioToBestCopy,
                 migrateSeconds, toDeviceSeconds, toSystemSeconds, memcpySeconds, rounds
        }

        /// The measured times and the figures derived from them.
        func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(granularity.rawValue, forKey: .granularity)
            try c.encode(bytes, forKey: .bytes)
            try c.encode(migrateGBps, forKey: .migrateGBps)
            try c.encode(memcpyGBps, forKey: .memcpyGBps)
            try c.encode(ratio, forKey: .ratio)
            try c.encode(streamCopyGBps, forKey: .streamCopyGBps)
            try c.encode(ratioToBestCopy, forKey: .ratioToBestCopy)
            try c.encode(migrateSeconds, forKey: .migrateSeconds)
            try c.encode(toDeviceSeconds, forKey: .toDeviceSeconds)
            try c.encode(toSystemSeconds, forKey: .toSystemSeconds)
            try c.encode(memcpySeconds, forKey: .memcpySeconds)
            try c.encode(rounds, forKey: .rounds)
        }
    }

    struct Failure: Error, CustomStringConvertible {
        let description: String
    }

    func run() throws {
        try preflight()
        #if DEBUG
        FileHandle.standardError.write(Data("svmemu bench migrate: warning: this is a debug build; figures are not meaningful (use swift build -c release)\n".utf8))
        #endif
        let bytes = ByteSize.parse(size)!
        let r = try measure(bytes: bytes)
        if json {
            print(try JSONReport.render(for: self, results: r))
        } else {
            print(Self.render(r), terminator: "")
        }
    }

    func measure(bytes: Int) throws -> Result {
        let pages = bytes >> PageGeometry.pageShift
        let machine = try BenchMachine(bytes: bytes, thp: granularity == .huge2M ? .always : .never,
                                   granularity: granularity, deviceName: "bench0")
        let kernel = machine.kernel, space = machine.mm!, dev = machine.device!
        let seed = pattern.seed
        let base = try space.mmap(length: bytes)
        try space.fillPattern(base, length: bytes, seed: seed)

        func roundTrip() throws -> (Double, Double) {
            let t0 = HostClock.nanos()
            let moved: Int
            do { moved = try dev.migrateToDevice(base, pages: pages) } catch {
                throw Failure(description: "svmemu bench migrate: migrateToDevice failed: \(error)")
            }
            let t1 = HostClock.nanos()
            let back: Int
            do { back = try dev.migrateToSystem(base, pages: pages) } catch {
                throw Failure(description: "svmemu bench migrate: migrateToSystem failed: \(error)")
            }
            let t2 = HostClock.nanos()
            guard moved == pages, back == pages else {
                throw Failure(description: "svmemu bench migrate: moved \(moved) pages to VRAM and \(back) back, expected \(pages)")
            }
            if let bad = try space.verifyPattern(base, length: bytes, seed: seed) {
                throw Failure(description: "svmemu bench migrate: BYTES DIFFER after the round trip at 0x\(String(bad, radix: 16))")
            }
            let diagnostics = kernel.diagnostics
            if !diagnostics.isEmpty {
                throw Failure(description: "svmemu bench migrate: the kernel reported \(diagnostics.count) diagnostics, first: \(diagnostics[0])")
            }
            return (Double(t1 - t0) / 1e9, Double(t2 - t1) / 1e9)
        }

        let progress = ProgressLine(label: "svmemu bench migrate \(granularity.rawValue)")
        defer { progress.done() }
        progress.say("warm-up round trip (first touch of emulated RAM and VRAM)")
        _ = try roundTrip()  // warm-up: first touch of RAM and VRAM frames, chunk registration
        // memcpy of the same bytes, there and back, between two buffers backed
        // like the emulated frames (MemcpyBaseline keeps the optimiser from
        // eliding either copy). Its rounds alternate with the migration's so
        // that both see the same machine.
        let baseline = MemcpyBaseline(bytes: bytes)
        var best = (Double.infinity, 0.0, 0.0)
        for round in 0..<rounds {
            progress.say("round \(round + 1)/\(rounds): round trip, then memcpy")
            let (there, back) = try roundTrip()
            if there + back < best.0 { best = (there + back, there, back) }
            baseline.round()
        }
        guard baseline.verify() else {
            throw Failure(description: "svmemu bench migrate: the memcpy baseline's bytes differ")
        }
        let bestCopy = baseline.bestSeconds
        return Result(granularity: granularity, bytes: bytes, migrateSeconds: best.0, memcpySeconds: bestCopy,
                      streamCopySeconds: baseline.bestStreamSeconds, toDeviceSeconds: best.1, toSystemSeconds: best.2, rounds: rounds)
    }

    static func render(_ r: Result) -> String {
        func f(_ v: Double, _ d: Int = 2) -> String { String(format: "%.\(d)f", v) }
        let mib = Double(r.bytes) / Double(1 << 20)
        var s = "svmemu bench migrate (granularity \(r.granularity.rawValue), \(f(mib, 0)) MiB, best of \(r.rounds))\n"
        s += "  round trip RAM -> VRAM -> RAM  \(f(r.migrateSeconds * 1e3, 1)) ms  \(f(r.migrateGBps)) GB/s"
        s += "  (to VRAM \(f(r.toDeviceSeconds * 1e3, 1)) ms, back \(f(r.toSystemSeconds * 1e3, 1)) ms)\n"
        s += "  memcpy, same bytes            \(f(r.memcpySeconds * 1e3, 1)) ms  \(f(r.memcpyGBps)) GB/s\n"
        s += "  streaming copy, same bytes    \(f(r.streamCopySeconds * 1e3, 1)) ms  \(f(r.streamCopyGBps)) GB/s   (the copy engine's stores)\n"
        s += "  ratio (migrate / memcpy)      \(f(r.ratio, 3))   (\(r.goal))\n"
        s += "  ratio to the faster copy      \(f(r.ratioToBestCopy, 3))\n"
        return s
    }
}
