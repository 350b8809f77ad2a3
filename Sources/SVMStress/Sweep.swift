// Seed sweeps that leave one machine: a seed range split into shards, each
// shard's results as JSON Lines, and the merge that makes one report of them
// and checks that the shards belong together (Docs/sharding.md).

import Foundation
import SVMEmu

/// A value of a sweep written in JSON as its text (`"1-4,9"`, `"2/4"`) and
/// read back with `init?(parsing:)`.
public protocol CodableAsText: Codable, CustomStringConvertible {
    /// The value `text` names; nil when it names none.
    init?(parsing text: String)
}

extension CodableAsText {
    /// Decodes the text ``init(parsing:)`` reads.
    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        guard let value = Self(parsing: text) else {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "not a \(Self.self): \(text)"))
        }
        self = value
    }

    /// Encodes as ``description``.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(description)
    }
}

/// A range of seeds, `first` to `last` inclusive (`1-16`).
public struct SeedRange: Sendable, CodableAsText, Equatable {
    /// The first seed.
    public var first: UInt64
    /// The last seed (inclusive).
    public var last: UInt64

    /// The most seeds one sweep takes.
    public static let maxCount: UInt64 = 1_000_000_000

    /// Seeds `first...last`.
    public init(first: UInt64, last: UInt64) {
        self.first = first
        self.last = last
    }

    /// `count` seeds from `first`.
    public init(first: UInt64, count: UInt64) {
        self.init(first: first, last: first &+ (count - 1))
    }

    /// Parses `A-B` (A <= B) or a single seed `A`; nil for anything else.
    public init?(parsing text: String) {
        let parts = text.split(separator: "-", omittingEmptySubsequences: false)
        guard (1...2).contains(parts.count), let a = UInt64(parts[0]), let b = UInt64(parts[parts.count - 1]), a <= b else {
            return nil
        }
        self.init(first: a, last: b)
    }

    /// Seeds in the range (at most 2^64, which no sweep reaches: `maxCount`).
    public var count: UInt64 { last &- first &+ 1 }

    /// "first-last", or the one seed.
    public var description: String { first == last ? "\(first)" : "\(first)-\(last)" }

}

/// The seeds of a sweep, as `--seeds` takes them: single seeds and ranges,
/// comma-separated (`1-100`, `3,7,12`, `1-4,9`). Kept ascending, with
/// overlapping and adjacent ranges merged; a sweep runs its seeds in that
/// order, and a shard takes a contiguous block of them by position.
public struct SeedSet: Sendable, CodableAsText, Equatable {
    /// The ranges: ascending, disjoint, not adjacent, never empty.
    public private(set) var ranges: [SeedRange]

    /// The seeds of `ranges` (in any order, overlapping or not); at least one.
    public init(_ ranges: [SeedRange]) {
        var out: [SeedRange] = []
        for r in ranges.sorted(by: { $0.first < $1.first }) {
            if let l = out.last, l.last == .max || r.first <= l.last + 1 {
                out[out.count - 1].last = max(l.last, r.last)
            } else {
                out.append(r)
            }
        }
        self.ranges = out
    }

    /// The seeds of one range.
    public init(_ range: SeedRange) { ranges = [range] }

    /// Parses a comma-separated list of seeds `A` and ranges `A-B` (A <= B);
    /// nil for anything else (an empty item too).
    public init?(parsing text: String) {
        var ranges: [SeedRange] = []
        for item in text.split(separator: ",", omittingEmptySubsequences: false) {
            guard let r = SeedRange(parsing: item.trimmingCharacters(in: .whitespaces)) else { return nil }
            ranges.append(r)
        }
        self.init(ranges)
    }

    /// Seeds in the set (0 for all 2^64, which no sweep reaches).
    public var count: UInt64 { ranges.reduce(0) { $0 &+ $1.count } }

    /// Every seed, ascending.
    public var seeds: some Sequence<UInt64> { ranges.lazy.flatMap { $0.first...$0.last } }

    /// Whether `seed` is in the set.
    public func contains(_ seed: UInt64) -> Bool { ranges.contains { seed >= $0.first && seed <= $0.last } }

    /// The `count` seeds from position `start` on (positions from 0, ascending).
    func slice(from start: UInt64, count: UInt64) -> SeedSet {
        var skip = start, left = count
        var out: [SeedRange] = []
        for r in ranges where left > 0 {
            let n = r.count
            if n != 0 && skip >= n { skip -= n; continue }
            let first = r.first &+ skip
            let take = n == 0 ? left : min(left, n - skip)
            out.append(SeedRange(first: first, count: take))
            left -= take
            skip = 0
        }
        return SeedSet(out)
    }

    /// The ranges, comma-separated ("1-4,9").
    public var description: String { ranges.map(\.description).joined(separator: ",") }

}

/// One of `count` shards of a seed range, numbered from 1: `--shard 2/4`
/// is the second quarter. Shard `index` takes the `index`-th of `count`
/// contiguous blocks of the range, as equal as they can be (their sizes
/// differ by at most one seed); a shard of a range shorter than `count`
/// may be empty.
public struct SweepShard: Sendable, CodableAsText, Hashable {
    /// 1...count.
    public var index: Int
    /// Shards in all.
    public var count: Int

    /// The most shards a range is split into.
    public static let maxCount = 100_000

    /// Shard `index` of `count`.
    public init(index: Int, count: Int) {
        self.index = index
        self.count = count
    }

    /// The whole range as one shard.
    public static let whole = SweepShard(index: 1, count: 1)

    /// Parses `I/N` with 1 <= I <= N <= `maxCount`; the error says what is
    /// wrong (a 0-based index is named as such).
    public static func parse(_ text: String) -> Result<SweepShard, SweepError> {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, let i = Int(parts[0]), let n = Int(parts[1]) else {
            return .failure(.invalid("must be I/N, the shard I of N (got \(text))"))
        }
        guard (1...maxCount).contains(n) else {
            return .failure(.invalid("must be I/N with N in 1...\(maxCount) (got \(text))"))
        }
        if i == 0 {
            return .failure(.invalid("counts shards from 1: 1/\(n) to \(n)/\(n) (got \(text)); for a 0-based index, as Kubernetes' JOB_COMPLETION_INDEX, give index+1"))
        }
        guard (1...n).contains(i) else {
            return .failure(.invalid("must be I/N with I in 1...\(n) (got \(text))"))
        }
        return .success(SweepShard(index: i, count: n))
    }

    /// This shard's seeds of `range`, nil when it has none.
    public func seeds(of range: SeedRange) -> SeedRange? {
        let lo = offset(index - 1, of: range)
        guard index < count else { return SeedRange(first: range.first &+ lo, last: range.last) }
        let hi = offset(index, of: range)
        guard hi > lo else { return nil }
        return SeedRange(first: range.first &+ lo, last: range.first &+ (hi - 1))
    }

    /// This shard's seeds of `set` (a contiguous block of its seeds in
    /// ascending order), nil when it has none.
    public func seeds(of set: SeedSet) -> SeedSet? {
        if set.ranges.count == 1 { return seeds(of: set.ranges[0]).map(SeedSet.init) }
        let total = set.count
        let lo = offset(index - 1, of: total)
        let hi = index < count ? offset(index, of: total) : total
        guard hi > lo else { return nil }
        return set.slice(from: lo, count: hi - lo)
    }

    /// Where block `k` (0..<count) of `range` starts.
    func offset(_ k: Int, of range: SeedRange) -> UInt64 { offset(k, of: range.count) }

    /// Where block `k` (0..<count) of `total` seeds starts: floor(total * k / count),
    /// without overflow, for the full 2^64 seeds too (`total` 0).
    func offset(_ k: Int, of total: UInt64) -> UInt64 {
        let product = total == 0 ? (high: UInt64(k), low: UInt64(0)) : total.multipliedFullWidth(by: UInt64(k))
        return UInt64(count).dividingFullWidth(product).quotient
    }

    /// "index/count".
    public var description: String { "\(index)/\(count)" }

    /// Shard `I/N` as ``parse(_:)`` reads it; nil for anything it refuses.
    public init?(parsing text: String) {
        guard case .success(let s) = Self.parse(text) else { return nil }
        self = s
    }
}

/// What went wrong with a shard argument or a sweep's lines.
public enum SweepError: Error, Equatable, CustomStringConvertible {
    /// A `--shard` or `--seeds` value that cannot be; the text completes "--shard ...".
    case invalid(String)
    /// A line that is not a sweep line: where it is and why.
    case unreadable(String)

    /// The error, for the user.
    public var description: String {
        switch self {
        case .invalid(let m), .unreadable(let m): m
        }
    }
}

/// The first line a shard prints: what it runs, so that the merge can check
/// that its shards belong together.
public struct SweepHeader: Sendable, Codable, Equatable {
    /// The command (`soak`, `explore`).
    public var command: String
    /// The shard that ran.
    public var shard: SweepShard
    /// The whole sweep's seeds.
    public var seeds: SeedSet
    /// The seeds of the whole sweep this shard ran (nil when it has none).
    public var shardSeeds: SeedSet?
    /// Every setting besides the seed, as the flags that give it
    /// (`--operations` -> `300000`; a flag without a value -> ``).
    public var settings: [String: String]
    /// The svmemu version.
    public var version: String
    /// The git revision the binary was built from, when known.
    public var revision: String?
    /// Where the shard ran (the host name).
    public var host: String

    /// A header as written.
    public init(command: String, shard: SweepShard, seeds: SeedSet, settings: [String: String], version: String,
                revision: String?, host: String) {
        self.command = command
        self.shard = shard
        self.seeds = seeds
        shardSeeds = shard.seeds(of: seeds)
        self.settings = settings
        self.version = version
        self.revision = revision
        self.host = host
    }

    /// The settings as arguments, in flag order: `--cpus 4 --operations 300000`.
    public var arguments: String { SweepHeader.arguments(settings) }

    /// `settings` as arguments, in flag order (a flag without a value alone).
    public static func arguments(_ settings: [String: String]) -> String {
        settings.keys.sorted().map { k in settings[k]!.isEmpty ? k : "\(k) \(settings[k]!)" }.joined(separator: " ")
    }
}

/// One seed's result in a shard's output.
public struct SweepSeedResult: Sendable, Codable, Equatable {
    /// The shard that ran the seed.
    public var shard: SweepShard
    /// The seed.
    public var seed: UInt64
    /// `clean`, or what failed first (`livelock`, `deadlock`, `corruption`, ...).
    public var outcome: String
    /// The run's figures by name (operations, scheduleSteps, seconds, ...);
    /// only the host-time ones (`seconds`, rates per second) differ between
    /// two runs of one seed.
    public var figures: [String: Double]
    /// For a failing seed: the command that replays it, and the first thing found.
    public var replay: String?
    /// What failed, in a sentence (nil when clean).
    public var detail: String?

    /// A seed's result as measured.
    public init(shard: SweepShard, seed: UInt64, outcome: String, figures: [String: Double], replay: String? = nil,
                detail: String? = nil) {
        self.shard = shard
        self.seed = seed
        self.outcome = outcome
        self.figures = figures
        self.replay = replay
        self.detail = detail
    }

    /// Whether the seed failed.
    public var failed: Bool { outcome != SweepSeedResult.clean }
    /// The outcome of a clean seed.
    public static let clean = "clean"

    /// The figures that depend on the host, not on the seed.
    public static func isHostTime(_ figure: String) -> Bool {
        figure == "seconds" || figure.hasSuffix("PerSecond")
    }
}

/// The last line of a shard: it ran to its end.
public struct SweepEnd: Sendable, Codable, Equatable {
    /// The shard that ran.
    public var shard: SweepShard
    /// Seeds run and seeds that failed.
    public var seedsRun: Int
    /// Seeds that failed.
    public var failing: Int
    /// Wall time of the shard.
    public var seconds: Double
}

/// One line of a shard's JSON Lines output: `{"line":"shard",...}`, then one
/// `{"line":"seed",...}` per seed, then `{"line":"end",...}`.
public enum SweepLine: Sendable, Equatable {
    case header(SweepHeader)
    case seed(SweepSeedResult)
    case end(SweepEnd)

    enum Kind: String, Codable { case shard, seed, end }
    enum KindKey: String, CodingKey { case line }

    /// The line as one compact JSON object, keys sorted (no newline).
    public var json: String {
        let encoder = ReportJSON.encoder(pretty: false)
        let data: Data
        do {
            switch self {
            case .header(let h): data = try encoder.encode(Tagged(line: .shard, value: h))
            case .seed(let s): data = try encoder.encode(Tagged(line: .seed, value: s))
            case .end(let e): data = try encoder.encode(Tagged(line: .end, value: e))
            }
        } catch {
            // Only a non-finite figure could fail, and the strategy above takes those.
            return "{\"line\":\"error\",\"error\":\"\(error)\"}"
        }
        return String(decoding: data, as: UTF8.self)
    }

    /// Reads one line; `where` names it in the error ("shard-2.jsonl:7").
    public static func parse(_ text: Substring, where place: String) -> Result<SweepLine, SweepError> {
        let decoder = ReportJSON.decoder()
        let data = Data(text.utf8)
        do {
            let kind = try decoder.decode(KindOnly.self, from: data).line
            switch kind {
            case .shard: return .success(.header(try decoder.decode(SweepHeader.self, from: data)))
            case .seed: return .success(.seed(try decoder.decode(SweepSeedResult.self, from: data)))
            case .end: return .success(.end(try decoder.decode(SweepEnd.self, from: data)))
            }
        } catch {
            let snippet = text.count > 60 ? text.prefix(60) + "..." : text
            return .failure(.unreadable("\(place): not a line of a sweep shard (--shard output): \(snippet)"))
        }
    }

    struct KindOnly: Decodable { var line: Kind }

    /// A value with `"line": kind` beside its own keys.
    struct Tagged<Value: Encodable>: Encodable {
        var line: Kind
        var value: Value
        func encode(to encoder: any Encoder) throws {
            try value.encode(to: encoder)
            var c = encoder.container(keyedBy: KindKey.self)
            try c.encode(line, forKey: .line)
        }
    }
}

/// Runs a shard of a seed sweep.
public enum Sweep {
    /// Runs every seed of `header.shardSeeds` in order with `run`, handing
    /// each line to `emit` as it is made: the header first, one line per
    /// seed, the end line last.
    ///
    /// - Parameters:
    ///   - header: the shard (its seeds, settings and provenance).
    ///   - emit: prints (or keeps) a line; called on the calling thread.
    ///   - run: runs one seed and says how it went.
    /// - Returns: the seeds' results.
    /// - Throws: what `run` throws (the shard stops there, without its end
    ///   line: the merge reports the seeds it lacks).
    @discardableResult
    public static func run<E: Error>(_ header: SweepHeader, emit: (SweepLine) -> Void,
                                     seed run: (UInt64) throws(E) -> SweepSeedResult) throws(E) -> [SweepSeedResult] {
        emit(.header(header))
        let start = HostClock.hostNanos()
        var results: [SweepSeedResult] = []
        for s in header.shardSeeds?.ranges ?? [] {
            for seed in s.first...s.last {
                var r = try run(seed)
                r.shard = header.shard
                r.seed = seed
                results.append(r)
                emit(.seed(r))
            }
        }
        let seconds = Double(HostClock.hostNanos() - start) / 1e9
        emit(.end(SweepEnd(shard: header.shard, seedsRun: results.count, failing: results.count(where: \.failed),
                           seconds: seconds)))
        return results
    }
}

extension SoakResult {
    /// What failed first, as a sweep's outcome: `clean`, `deadlock`,
    /// `timeout`, `corruption`, `accessError`, `staleDeviceMapping`, `leak` (references or
    /// frames), `lockHeld`, `audit` (another failed audit), `warning` or
    /// `lockOrder`.
    public var sweepOutcome: String {
        if deadlock != nil { return "deadlock" }
        if timedOut { return "timeout" }
        if bytesCorrupted > 0 { return "corruption" }
        if accessErrors > 0 { return "accessError" }
        if staleDeviceMappings > 0 { return "staleDeviceMapping" }
        if leakedReferences > 0 || leakedFrames > 0 { return "leak" }
        if locksHeld > 0 { return "lockHeld" }
        if failedAtOperation != nil { return "audit" }
        if !warnings.isEmpty { return "warning" }
        if !lockOrderViolations.isEmpty { return "lockOrder" }
        return SweepSeedResult.clean
    }

    /// The soak's figures for a sweep line: counts of what ran and what
    /// was found, virtual and host time, operations per host second.
    public var sweepFigures: [String: Double] {
        [
            "operations": Double(operations), "reads": Double(reads), "writes": Double(writes),
            "gpuFaults": Double(gpuFaults), "migrationsToDevice": Double(migrationsToDevice),
            "migrationsToSystem": Double(migrationsToSystem), "forks": Double(forks), "pagesMoved": Double(pagesMoved),
            "audits": Double(audits), "bytesCorrupted": Double(bytesCorrupted), "accessErrors": Double(accessErrors),
            "staleDeviceMappings": Double(staleDeviceMappings),
            "leakedReferences": Double(leakedReferences), "locksHeld": Double(locksHeld), "leakedFrames": Double(leakedFrames),
            "warnings": Double(warnings.count), "lockOrderViolations": Double(lockOrderViolations.count),
            "scheduleSteps": Double(scheduleSteps), "virtualSeconds": virtualSeconds, "seconds": seconds,
            "operationsPerSecond": seconds > 0 ? Double(operations) / seconds : 0,
        ]
    }

    /// The first problem, in words (nil when clean).
    public var sweepDetail: String? {
        if let deadlock { return deadlock.split(separator: "\n").first.map(String.init) }
        if timedOut { return "the run exceeded its host-time limit" }
        if let f = findings.first { return f }
        if let at = failedAtOperation, let audit { return "the audit after operation \(at) failed: \(audit)" }
        if let w = warnings.first { return w }
        return lockOrderViolations.first?.split(separator: "\n").first.map(String.init)
    }
}
