// `svmemu bench memory`: the cost of the emulated memory core.
import ArgumentParser
import Foundation
import SVMEmu
import SVMStress

/// Measures what every emulated access and fault pays (`MemoryBench`, whose
/// result documents each figure) and prints it beside a 4 KiB memcpy.
struct BenchMemoryCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "memory",
        abstract: "Cost of an emulated CPU read (TLB hit and miss), a shootdown, a demand-zero fault, and metadata per page.",
        discussion: """
            Build with -c release. Reads one byte per page over a few MiB of touched pages \
            (several rounds, best round; the TLB-hit rounds alternate with the 4 KiB memcpy's, so \
            both see the same machine), first-touch writes over a fresh mapping with THP off \
            (best round, mmap excluded), and reports the page metadata size against the \
            kernel's 64-byte struct page. With --json prints one object (Docs/json.md) whose \
            results are readNanos, tlbHitReadNanos, tlbMissReadNanos, shootdownNanos, \
            demandZeroFaultNanos, demandZeroFirstRoundNanos, metadataBytesPerPage and memcpy4KNanos.

            \(ExitStatus.helpParagraph)
            """)

    @OptionGroup var output: JSONOutputOptions

    @Option(name: .long, parsing: .unconditional, help: "Size of the demand-zero mapping, 1M to 1G, a multiple of 1M, with an optional K, M or G suffix (binary units).")
    var size = "64M"
    /// `--size` in MiB (the unit the run body uses).
    var faultMiB: Int { (ByteSize.parse(size) ?? 0) / ByteSize.mib }

    /// Sizes `--size` takes: whole MiB, up to 1 GiB.
    static let sizeRange = ByteSize.mib...ByteSize.gib

    @OptionGroup var timing: BenchRoundsOptions

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

    /// The figures (`MemoryBench`'s).
    typealias Result = MemoryBenchResult

    func run() throws {
        warnIfDebugBuild("svmemu bench memory")
        let r = try measure()
        try printReport(r, json: output.json, text: Self.render(r, faultMiB: faultMiB, rounds: timing.rounds))
    }

    /// The harness with this command's arguments.
    func measure() throws -> Result {
        try MemoryBench.run(faultBytes: faultMiB << 20, rounds: timing.rounds, seed: pattern.seed)
    }

    static func render(_ r: Result, faultMiB: Int, rounds: Int) -> String {
        var t = Table(["WHAT", "COST", "vs memcpy 4K"], indent: "  ")
        func row(_ label: String, _ v: Double) { t.add([label, Cell.fixed(v, 1) + " ns", Cell.fixed(v / r.memcpy4KNanos, 2) + "x"]) }
        var out = "svmemu bench memory (best of \(rounds) rounds; THP off for faults)\n\n"
        row("emulated CPU read of a mapped byte (4 MiB)", r.readNanos)
        row("  TLB hit (64 pages)", r.tlbHitReadNanos)
        row("  TLB miss: page walk and fill (32 MiB)", r.tlbMissReadNanos)
        row("TLB shootdown of a page, one other CPU", r.shootdownNanos)
        row("demand-zero fault, per page (\(faultMiB) MiB)", r.demandZeroFaultNanos)
        row("  first round (host memory cold)", r.demandZeroFirstRoundNanos)
        row("memcpy 4 KiB, cache hot (reference)", r.memcpy4KNanos)
        out += t.text
        let goal = r.metadataBytesPerPage <= 64 ? "meets the goal of <= 64 (struct page)" : "ABOVE the goal of 64 (struct page)"
        out += "\n  metadata per 4 KiB page: \(r.metadataBytesPerPage) bytes, \(goal)\n"
        return out
    }
}
