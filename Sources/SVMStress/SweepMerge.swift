// The merge of a sweep's shards: one report, the first failing seed, and
// the checks that the shards belong together (the same command, settings,
// seed range, shard count and binary; every shard once; every seed once).

import Foundation

/// One shard as the merge saw it.
public struct SweepShardSummary: Sendable, Codable, Equatable {
    /// The shard.
    public var shard: SweepShard
    /// Where its lines came from (a file name, or `-` for standard input) and where it ran.
    public var source: String
    /// The host it ran on.
    public var host: String
    /// Its seeds.
    public var seeds: SeedSet?
    /// Seeds it ran.
    public var seedsRun: Int
    /// Seeds that failed.
    public var failing: Int
    /// Host seconds of the shard (from its end line; nil when it has none).
    public var seconds: Double?
    /// Whether its end line was read: the shard ran to its end.
    public var ended: Bool
}

/// The merged report of a sweep's shards.
public struct SweepReport: Sendable, Codable, Equatable {
    /// The sweep's command, seed range and shard count (of the first shard read).
    public var command: String?
    /// The seeds of the sweep.
    public var seeds: SeedSet?
    /// Shards merged.
    public var shards: Int
    /// The settings every shard ran with (flags and values), and as arguments.
    public var settings: [String: String]
    /// The sweep's arguments.
    public var arguments: String
    /// The svmemu version of the shards.
    public var version: String?
    /// Their git revision.
    public var revision: String?
    /// Seeds with a result (each seed once).
    public var seedsRun: Int
    /// Seeds per outcome (`clean`, `livelock`, `corruption`, ...).
    public var outcomes: [String: Int]
    /// Each figure summed over the seeds; a rate (`...PerSecond`) is the
    /// mean over the seeds instead.
    public var figures: [String: Double]
    /// The failing seed with the lowest number (what an unsharded run meets
    /// first), with its replay command; nil when every seed was clean.
    public var firstFailing: SweepSeedResult?
    /// Every failing seed, by seed.
    public var failing: [SweepSeedResult]
    /// The shards, by index.
    public var shardSummaries: [SweepShardSummary]
    /// What makes the shards inconsistent: missing or duplicate shards or
    /// seeds, different settings, shards that did not finish. Empty when
    /// the shards make one whole sweep.
    public var problems: [String]
    /// Every seed's result, by seed (not encoded: a sweep may have millions).
    public var results: [SweepSeedResult] = []

    /// The shards make the whole sweep, each seed once, with one setting.
    public var consistent: Bool { problems.isEmpty }

    enum CodingKeys: String, CodingKey {
        case command, seeds, shards, settings, arguments, version, revision, seedsRun, outcomes, figures, firstFailing,
             failing, shardSummaries, problems
    }

    /// Encodes the report (`svmemu merge --json`), with `consistent`, without `results`.
    public func encode(to encoder: any Encoder) throws {
        try encoder.encodeProperties(of: self, except: ["results"], adding: ["consistent": consistent])
    }
}

extension Sweep {
    /// Problems listed one by one before the rest are counted.
    static let problemsListed = 12

    /// The first ``problemsListed`` of `items`, comma-separated, then
    /// " and N more" (`what` after "more": "ranges") for the rest.
    static func listed(_ items: [String], more what: String = "") -> String {
        items.prefix(problemsListed).joined(separator: ", ")
            + (items.count > problemsListed ? " and \(items.count - problemsListed) more" + (what.isEmpty ? "" : " " + what) : "")
    }

    /// Reads JSON Lines from several sources (empty lines skipped).
    ///
    /// - Parameter sources: each source's name and text.
    /// - Returns: every line with its source's name.
    /// - Throws: `SweepError.unreadable` naming the source and line number
    ///   of the first line that is not a sweep line.
    public static func read(_ sources: [(name: String, text: String)]) throws(SweepError) -> [(source: String, line: SweepLine)] {
        var out: [(source: String, line: SweepLine)] = []
        var seen: [String: Int] = [:]
        for (given, text) in sources {
            // One file given twice is two sources (its shards are duplicates).
            seen[given, default: 0] += 1
            let name = seen[given]! == 1 ? given : "\(given) (given \(seen[given]!) times)"
            var number = 0
            for raw in text.split(separator: "\n", omittingEmptySubsequences: false) {
                number += 1
                let line = raw.trimmingCharacters(in: .whitespaces)
                if line.isEmpty { continue }
                switch SweepLine.parse(Substring(line), where: "\(name):\(number)") {
                case .success(let l): out.append((name, l))
                case .failure(let e): throw e
                }
            }
        }
        return out
    }

    /// Merges shards' lines into one report.
    ///
    /// Lines may come in any order and interleaved (every seed line names
    /// its shard). A shard read twice (the same index from two sources) is
    /// counted once, from its first source, and reported; so is a shard
    /// missing, a seed twice or missing, a shard without its end line
    /// (killed, or still running), a seed outside its shard's range, and a
    /// shard whose command, seed range, shard count, settings or binary
    /// differ from the first shard's.
    public static func merge(_ lines: [(source: String, line: SweepLine)]) -> SweepReport {
        var problems: [String] = []
        // The first source of each shard; later sources of one shard are duplicates.
        var headers: [SweepShard: (source: String, header: SweepHeader)] = [:]
        var duplicateSources: [SweepShard: [String]] = [:]
        for (source, line) in lines {
            guard case .header(let h) = line else { continue }
            if let first = headers[h.shard] {
                if first.source != source { duplicateSources[h.shard, default: [first.source]].append(source) }
                else { problems.append("\(source): shard \(h.shard) has two header lines") }
            } else {
                headers[h.shard] = (source, h)
            }
        }
        let ordered = headers.values.sorted { ($0.header.shard.count, $0.header.shard.index) < ($1.header.shard.count, $1.header.shard.index) }
        guard let reference = ordered.first?.header else {
            let seedLines = lines.count { if case .seed = $0.line { true } else { false } }
            return SweepReport(command: nil, seeds: nil, shards: 0, settings: [:], arguments: "", version: nil, revision: nil,
                               seedsRun: 0, outcomes: [:], figures: [:], firstFailing: nil, failing: [], shardSummaries: [],
                               problems: [lines.isEmpty ? "no lines to merge: give the files the shards wrote (--shard I/N), or pipe them in"
                                          : "no shard header line among \(lines.count) lines (\(seedLines) seed lines): is this the output of --shard I/N?"])
        }
        let referenceName = "shard \(reference.shard) (\(headers[reference.shard]!.source))"
        for (source, h) in ordered.dropFirst() {
            let name = "shard \(h.shard) (\(source))"
            if h.command != reference.command {
                problems.append("\(name) ran `\(h.command)`, \(referenceName) `\(reference.command)`")
            }
            if h.seeds != reference.seeds {
                problems.append("\(name) splits seeds \(h.seeds), \(referenceName) seeds \(reference.seeds)")
            }
            if h.shard.count != reference.shard.count {
                problems.append("\(name) is one of \(h.shard.count) shards, \(referenceName) one of \(reference.shard.count)")
            }
            if h.settings != reference.settings {
                let keys = Set(h.settings.keys).union(reference.settings.keys).sorted()
                let differing = keys.filter { h.settings[$0] != reference.settings[$0] }.map { k in
                    "\(k) \(Self.shown(h.settings[k])) vs \(Self.shown(reference.settings[k]))"
                }
                problems.append("\(name) ran with other settings than \(referenceName): \(differing.joined(separator: ", "))")
            }
            if h.version != reference.version {
                problems.append("\(name) ran svmemu \(h.version), \(referenceName) svmemu \(reference.version)")
            } else if let a = h.revision, let b = reference.revision, a != b {
                problems.append("\(name) ran a build of \(a), \(referenceName) of \(b)")
            }
        }
        let n = reference.shard.count
        for (shard, sources) in duplicateSources.sorted(by: { $0.key.index < $1.key.index }) {
            problems.append("shard \(shard) appears \(sources.count) times (\(sources.joined(separator: ", "))); the first is merged")
        }
        let missingShards = (1...n).map { SweepShard(index: $0, count: n) }.filter { headers[$0] == nil }
        if !missingShards.isEmpty {
            problems.append("shard\(missingShards.count == 1 ? "" : "s") missing: " + listed(missingShards.map { s in
                "\(s) (seeds \(s.seeds(of: reference.seeds).map(\.description) ?? "none"))"
            }))
        }

        // The seeds, each from its shard's first source.
        var results: [SweepSeedResult] = []
        var ends: [SweepShard: SweepEnd] = [:]
        var seedLinesPerShard: [SweepShard: Int] = [:]
        var outside: [String] = []
        for (source, line) in lines {
            switch line {
            case .header: continue
            case .seed(let r):
                guard let h = headers[r.shard] else {
                    problems.append("\(source): seed \(r.seed) names shard \(r.shard), whose header line is not there")
                    continue
                }
                guard h.source == source else { continue }   // a duplicate shard's line
                if let own = h.header.shardSeeds, own.contains(r.seed) {
                    results.append(r)
                    seedLinesPerShard[r.shard, default: 0] += 1
                } else {
                    outside.append("seed \(r.seed) of shard \(r.shard) (\(source)) is not among its seeds \(h.header.shardSeeds.map(\.description) ?? "(none)")")
                }
            case .end(let e):
                guard let h = headers[e.shard], h.source == source else { continue }
                ends[e.shard] = e
            }
        }
        problems += outside.prefix(problemsListed)
        if outside.count > problemsListed { problems.append("\(outside.count - problemsListed) more seeds outside their shards") }
        results.sort { $0.seed < $1.seed }
        var unique: [SweepSeedResult] = []
        unique.reserveCapacity(results.count)
        var duplicates: [String] = []
        for r in results {
            if let last = unique.last, last.seed == r.seed {
                duplicates.append("\(r.seed)")
                continue
            }
            unique.append(r)
        }
        if !duplicates.isEmpty {
            problems.append("seed\(duplicates.count == 1 ? "" : "s") read twice (the first is merged): "
                            + listed(duplicates))
        }

        // Shards that did not finish, and seeds missing from the shards that are there.
        var summaries: [SweepShardSummary] = []
        for (source, h) in ordered where h.shard.count == n {
            let end = ends[h.shard]
            let read = seedLinesPerShard[h.shard] ?? 0
            let failing = unique.count { $0.shard == h.shard && $0.failed }
            summaries.append(SweepShardSummary(shard: h.shard, source: source, host: h.host, seeds: h.shardSeeds, seedsRun: read,
                                               failing: failing, seconds: end?.seconds, ended: end != nil))
            if end == nil {
                let expected = h.shardSeeds.map { Int(clamping: $0.count) } ?? 0
                problems.append("shard \(h.shard) (\(source)) has no end line: it stopped after \(read) of its \(expected) seeds (killed, failed, or still running)")
            } else if let end, end.seedsRun != read {
                problems.append("shard \(h.shard) (\(source)) ran \(end.seedsRun) seeds by its end line, but \(read) seed lines were read")
            }
        }
        let missing = Self.gaps(in: reference.seeds, present: unique.map(\.seed), excluding: missingShards.compactMap { $0.seeds(of: reference.seeds) })
        if !missing.isEmpty {
            let total = missing.reduce(UInt64(0)) { $0 + $1.count }
            problems.append("seed\(total == 1 ? "" : "s") missing from the shards read: "
                            + listed(missing.map(\.description), more: "ranges"))
        }

        var outcomes: [String: Int] = [:]
        var sums: [String: Double] = [:]
        var rateCounts: [String: Int] = [:]
        for r in unique {
            outcomes[r.outcome, default: 0] += 1
            for (k, v) in r.figures {
                sums[k, default: 0] += v
                if k.hasSuffix("PerSecond") { rateCounts[k, default: 0] += 1 }
            }
        }
        for (k, c) in rateCounts { sums[k]! /= Double(c) }
        let failing = unique.filter(\.failed)
        var report = SweepReport(command: reference.command, seeds: reference.seeds, shards: n, settings: reference.settings,
                                 arguments: reference.arguments, version: reference.version, revision: reference.revision,
                                 seedsRun: unique.count, outcomes: outcomes, figures: sums, firstFailing: failing.first,
                                 failing: failing, shardSummaries: summaries, problems: problems)
        report.results = unique
        return report
    }

    static func shown(_ value: String?) -> String {
        guard let value else { return "(not given)" }
        return value.isEmpty ? "(on)" : value
    }

    /// The ranges of `set` missing from `present` (sorted, unique),
    /// leaving out the `excluding` seeds (reported on their own).
    static func gaps(in set: SeedSet, present: [UInt64], excluding: [SeedSet]) -> [SeedRange] {
        let cut = excluding.flatMap(\.ranges)
        return set.ranges.flatMap { gaps(in: $0, present: present, excluding: cut) }
    }

    /// The ranges of `range` missing from `present` (sorted, unique),
    /// leaving out the `excluding` ranges (reported on their own).
    static func gaps(in range: SeedRange, present: [UInt64], excluding: [SeedRange]) -> [SeedRange] {
        var raw: [SeedRange] = []
        var next = range.first
        var done = false
        for s in present where s >= range.first && s <= range.last {
            if s > next { raw.append(SeedRange(first: next, last: s - 1)) }
            if s == range.last { done = true; break }
            next = s + 1
        }
        if !done && next <= range.last {
            raw.append(SeedRange(first: next, last: range.last))
        }
        // Cut the excluded ranges out of each gap.
        var out: [SeedRange] = []
        for g in raw {
            var pieces = [g]
            for x in excluding {
                pieces = pieces.flatMap { p -> [SeedRange] in
                    if x.last < p.first || x.first > p.last { return [p] }
                    var rest: [SeedRange] = []
                    if x.first > p.first { rest.append(SeedRange(first: p.first, last: x.first - 1)) }
                    if x.last < p.last { rest.append(SeedRange(first: x.last + 1, last: p.last)) }
                    return rest
                }
            }
            out += pieces
        }
        return out
    }
}
