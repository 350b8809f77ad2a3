// `--shard I/N` of the seed sweeps (`explore`, `soak --seeds`), and the JSON
// Lines they print (Docs/sharding.md).
import ArgumentParser
import Foundation
import SVMStress
#if canImport(Glibc)
import Glibc
#endif

/// `--shard I/N`: run the I-th of N contiguous blocks of the seed range and
/// print JSON Lines (a header line, one line per seed as it finishes, an
/// end line) for `svmemu merge`.
struct ShardOption: ParsableArguments {
    @Option(name: .long, help: "Run shard I of N of the seeds (1/N to N/N: the seeds cut in N contiguous blocks) and print JSON Lines, one line per seed, for `svmemu merge` (Docs/sharding.md).")
    var shard: String?

    /// The shard asked for, nil without `--shard`.
    /// - Throws: `ValidationError` naming `--shard` and what it accepts.
    func parsed() throws(ValidationError) -> SweepShard? {
        guard let shard else { return nil }
        switch SweepShard.parse(shard) {
        case .success(let s): return s
        case .failure(let e): throw ValidationError("--shard \(e)")
        }
    }

    /// Refuses `--json` with `--shard`: a shard prints JSON Lines.
    func check(json: Bool) throws(ValidationError) {
        if shard != nil && json {
            throw ValidationError("--shard prints JSON Lines (one object a line) for `svmemu merge`; --json does not apply (merge --json makes the report)")
        }
    }

    /// Prints `line` and flushes it, so that a shard killed half-way has
    /// written every seed it finished.
    static func emit(_ line: SweepLine) {
        print(line.json)
        fflush(StandardOutput.standardOutput())
    }

    /// The header of a shard of `command` over `seeds`.
    static func header(command: String, shard: SweepShard, seeds: SeedSet, settings: [String: String]) -> SweepHeader {
        SweepHeader(command: command, shard: shard, seeds: seeds, settings: settings, version: SVMEmuVersion.package,
                    revision: SVMEmuVersion.revision, host: hostName)
    }

    /// This host's name (`gethostname`), or `?`.
    static var hostName: String {
        var buffer = [CChar](repeating: 0, count: 256)
        guard gethostname(&buffer, buffer.count - 1) == 0 else { return "?" }
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
