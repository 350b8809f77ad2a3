import SVMEmu
@testable import SVMStress
import Testing

@Suite("seed sweeps: shards and their merge")
struct SweepTests {
    @Test("--shard counts from 1: 0/N, I above N, N of 0 and other text are refused with what it takes")
    func shardParsing() throws {
        #expect(try SweepShard.parse("2/4").get() == SweepShard(index: 2, count: 4))
        #expect(try SweepShard.parse("1/1").get() == .whole)
        for bad in ["0/4", "5/4", "1/0", "a/b", "1", "1/2/3", "-1/4", ""] {
            guard case .failure(let e) = SweepShard.parse(bad) else {
                Issue.record("\(bad) was accepted")
                continue
            }
            #expect(e.description.contains(bad.isEmpty ? "got )" : "got \(bad)"), "\(e)")
        }
        guard case .failure(let zero) = SweepShard.parse("0/4") else { return }
        #expect(zero.description.contains("from 1") && zero.description.contains("index+1"))
    }

    @Test("the N shards of a seed range are contiguous, disjoint, cover it and differ in size by at most one seed",
          arguments: [(1, 1), (1, 4), (3, 4), (16, 4), (17, 5), (1000, 7), (5, 8)])
    func shardsPartitionTheRange(_ seeds: Int, _ n: Int) {
        let range = SeedRange(first: 100, count: UInt64(seeds))
        var next = range.first
        var sizes: [UInt64] = []
        for i in 1...n {
            guard let own = SweepShard(index: i, count: n).seeds(of: range) else { sizes.append(0); continue }
            #expect(own.first == next)
            next = own.last + 1
            sizes.append(own.count)
        }
        #expect(next == range.last + 1)
        #expect(sizes.reduce(0, +) == UInt64(seeds))
        #expect(sizes.max()! - sizes.min()! <= 1)
        // The whole 64-bit range splits without overflow.
        let all = SeedRange(first: 0, last: .max)
        #expect(SweepShard(index: 1, count: 2).seeds(of: all) == SeedRange(first: 0, last: UInt64.max / 2))
        #expect(SweepShard(index: 2, count: 2).seeds(of: all)?.last == .max)
    }

    /// A soak small enough for a test: a few hundred operations.
    static func soakSettings() -> SoakSettings {
        var s = SoakSettings()
        s.operations = 1_500
        s.pages = 8
        s.hugeRegions = 1
        s.auditEvery = 500
        return s
    }

    /// Runs `shard` of `range` as `svmemu soak --seeds --shard` does, through
    /// its JSON Lines text.
    static func soakShard(_ shard: SweepShard, of range: SeedRange) throws -> String {
        let header = SweepHeader(command: "soak", shard: shard, seeds: SeedSet(range), settings: ["--operations": "1500", "--pages": "8"],
                                 version: "test", revision: nil, host: "test")
        var text = ""
        try Sweep.run(header, emit: { text += $0.json + "\n" }) { (seed: UInt64) throws(StormError) -> SweepSeedResult in
            var s = soakSettings()
            s.seed = seed
            let r = try Soak.run(s)
            return SweepSeedResult(shard: shard, seed: seed, outcome: r.sweepOutcome, figures: r.sweepFigures,
                                   replay: r.clean ? nil : "svmemu soak --seed \(seed)", detail: r.sweepDetail)
        }
        return text
    }

    /// A result without what depends on the host or the shard.
    static func seedOnly(_ r: SweepSeedResult) -> SweepSeedResult {
        var r = r
        r.shard = .whole
        r.figures = r.figures.filter { !SweepSeedResult.isHostTime($0.key) }
        return r
    }

    @Test("the union of three soak shards, merged from their JSON Lines, equals the unsharded sweep seed for seed")
    func unionOfShardsIsTheSweep() throws {
        let range = SeedRange(first: 1, last: 4)
        let whole = Sweep.merge(try Sweep.read([("whole", try Self.soakShard(.whole, of: range))]))
        var sources: [(name: String, text: String)] = []
        for i in [3, 1, 2] {   // any order
            sources.append(("shard-\(i)", try Self.soakShard(SweepShard(index: i, count: 3), of: range)))
        }
        let merged = Sweep.merge(try Sweep.read(sources))
        #expect(whole.consistent && merged.consistent, "\(whole.problems) \(merged.problems)")
        #expect(merged.seedsRun == 4 && merged.shards == 3 && merged.shardSummaries.map(\.seedsRun) == [1, 1, 2])
        #expect(merged.results.map(Self.seedOnly) == whole.results.map(Self.seedOnly))
        #expect(merged.results.map(\.seed) == [1, 2, 3, 4])
        #expect(merged.outcomes == whole.outcomes)
        #expect(merged.figures["operations"] == 6_000 && merged.figures["scheduleSteps"] == whole.figures["scheduleSteps"])
    }

    @Test("a sweep over a list of seeds: shards by position, the merge names the seeds a missing shard had")
    func listSweep() throws {
        let set = try #require(SeedSet(parsing: "1-3,10,20"))
        var lines: [(source: String, line: SweepLine)] = []
        let shard = SweepShard(index: 1, count: 2)
        let header = SweepHeader(command: "soak", shard: shard, seeds: set, settings: [:], version: "t", revision: nil, host: "h")
        #expect(header.shardSeeds?.description == "1-2")
        let ran = Sweep.run(header, emit: { lines.append(("a", $0)) }) { (seed: UInt64) -> SweepSeedResult in
            SweepSeedResult(shard: shard, seed: seed, outcome: "clean", figures: [:])
        }
        #expect(ran.map(\.seed) == [1, 2])
        let report = Sweep.merge(try Sweep.read([("a", lines.map { $0.line.json }.joined(separator: "\n"))]))
        #expect(report.seeds?.description == "1-3,10,20")
        #expect(report.problems.contains { $0.contains("2/2 (seeds 3,10,20)") }, "\(report.problems)")
    }

    // Synthetic shards for the merge's checks.
    static func header(_ i: Int, of n: Int, seeds: SeedRange = SeedRange(first: 1, last: 8),
                       settings: [String: String] = ["--operations": "100"]) -> SweepLine {
        .header(SweepHeader(command: "soak", shard: SweepShard(index: i, count: n), seeds: SeedSet(seeds), settings: settings,
                            version: "test", revision: "abc", host: "node\(i)"))
    }

    static func shard(_ i: Int, of n: Int, failing: Set<UInt64> = [], end: Bool = true,
                      settings: [String: String] = ["--operations": "100"]) -> [SweepLine] {
        let s = SweepShard(index: i, count: n)
        var lines = [header(i, of: n, settings: settings)]
        let own = s.seeds(of: SeedRange(first: 1, last: 8))!
        for seed in own.first...own.last {
            let bad = failing.contains(seed)
            lines.append(.seed(SweepSeedResult(shard: s, seed: seed, outcome: bad ? "corruption" : "clean",
                                               figures: ["operations": 100, "seconds": 1, "operationsPerSecond": 100],
                                               replay: bad ? "svmemu soak --seed \(seed) --operations 100" : nil)))
        }
        if end { lines.append(.end(SweepEnd(shard: s, seedsRun: lines.count - 1, failing: failing.count, seconds: 1))) }
        return lines
    }

    static func merge(_ shards: [(String, [SweepLine])]) throws -> SweepReport {
        Sweep.merge(try Sweep.read(shards.map { ($0.0, $0.1.map(\.json).joined(separator: "\n")) }))
    }

    @Test("the merge reports the lowest failing seed of any shard with its replay command, sums figures and averages rates")
    func firstFailingSeed() throws {
        let r = try Self.merge([("b", Self.shard(2, of: 2, failing: [7])), ("a", Self.shard(1, of: 2, failing: [3, 4]))])
        #expect(r.consistent, "\(r.problems)")
        #expect(r.firstFailing?.seed == 3 && r.firstFailing?.replay == "svmemu soak --seed 3 --operations 100")
        #expect(r.failing.map(\.seed) == [3, 4, 7])
        #expect(r.outcomes == ["clean": 5, "corruption": 3])
        #expect(r.figures["operations"] == 800 && r.figures["operationsPerSecond"] == 100)
    }

    @Test("the merge names a missing shard, a shard given twice, a shard without its end line and other settings")
    func inconsistentShards() throws {
        let missing = try Self.merge([("a", Self.shard(1, of: 4)), ("c", Self.shard(3, of: 4)), ("d", Self.shard(4, of: 4))])
        #expect(missing.problems == ["shard missing: 2/4 (seeds 3-4)"])

        let twice = try Self.merge([("a", Self.shard(1, of: 2)), ("b", Self.shard(2, of: 2)), ("b2", Self.shard(2, of: 2))])
        #expect(twice.problems == ["shard 2/2 appears 2 times (b, b2); the first is merged"])
        #expect(twice.seedsRun == 8)

        let cut = try Self.merge([("a", Self.shard(1, of: 2)), ("b", Array(Self.shard(2, of: 2, end: false).prefix(3)))])
        #expect(cut.problems.count == 2, "\(cut.problems)")
        #expect(cut.problems.contains { $0.contains("shard 2/2 (b) has no end line: it stopped after 2 of its 4 seeds") })
        #expect(cut.problems.contains { $0 == "seeds missing from the shards read: 7-8" })

        let other = try Self.merge([("a", Self.shard(1, of: 2)), ("b", Self.shard(2, of: 2, settings: ["--operations": "200"]))])
        #expect(other.problems == ["shard 2/2 (b) ran with other settings than shard 1/2 (a): --operations 200 vs 100"])

        let mixed = try Self.merge([("a", Self.shard(1, of: 2)), ("b", Self.shard(2, of: 3))])
        #expect(mixed.problems.contains { $0.contains("one of 3 shards") })

        #expect(Sweep.merge([]).problems.first?.hasPrefix("no lines to merge") == true)
        #expect(throws: SweepError.self) { try Sweep.read([("x", "{\"line\":\"seed\"}")]) }
        #expect(throws: SweepError.self) { try Sweep.read([("x", "not json")]) }
    }
}
