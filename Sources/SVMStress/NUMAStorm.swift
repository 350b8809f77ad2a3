// The folio-lock storm of the never-block and v6.3-rc threads: "I/O" threads
// keep locking folios of a buffer (and put some under writeback whose
// completion needs a neighbour's lock) while a migrator moves the buffer
// between nodes with each algorithm. What it shows comes from the locks
// themselves: how long the migrator waited (the distribution Douglas
// Anderson added printk timing for), which waits reached the hung-task
// bound (the v6.3-rc deadlock Hugh Dickins hit), and which pages a
// trylock-only migrator never moved (never-block's starvation).

import Foundation
import SVMEmu
import Synchronization

/// The storm's settings.
public struct NUMAStormSettings: Sendable {
    /// 4 KiB pages of the buffer.
    public var pages = 1024
    /// Lock-holding "I/O" threads.
    public var holders = 2
    /// Folios each holder cycles through, locking one at a time.
    public var hotPagesPerHolder = 2
    /// How long a holder keeps a folio locked (I/O that takes its time under
    /// pressure, as in the kcompactd reports), and the pause before its next.
    public var holdMicros: UInt64 = 20_000
    /// Microseconds a holder waits between two lock-and-hold cycles.
    public var gapMicros: UInt64 = 1_000
    /// Every this many locks, a holder instead starts writeback on its folio
    /// and ends it only after taking the previous page's lock (a loop
    /// device whose completion needs its backing folio): 0 for never.
    public var writebackEvery = 3
    /// Moves of the whole buffer (0 -> 1, 1 -> 0, ...) per algorithm.
    public var rounds = 4
    /// The emulator's hung-task bound on one migrator wait (the kernel's is
    /// 120 s and its waits are unbounded): a wait that reaches it is a stall.
    public var waitLimitNanos: UInt64 = 100_000_000
    /// The migration algorithms the storm runs, one machine each.
    public var algorithms: [MigrationAlgorithm] = MigrationAlgorithm.allCases
    /// Seed of the buffer's byte pattern.
    public var seed: UInt64 = 0x570e
    /// Real threads (the default), or the holders and the migrator as
    /// emulated threads of a deterministic scheduler (every time virtual).
    public var schedule = HarnessSchedule()
    /// The defaults.
    public init() {}
}

/// One bucket of a wait distribution: waits shorter than `upToNanos` (and
/// at least the previous bucket's bound).
public struct NUMAWaitBucket: Sendable, Codable, Equatable {
    /// The bucket's upper bound, nanoseconds.
    public var upToNanos: UInt64
    /// Waits that fell in the bucket.
    public var count: UInt64
}

/// What the storm measured for one algorithm (`svmemu numa --storm --json`'s `storm`).
public struct NUMAStormResult: Sendable, Codable {
    /// The migration algorithm (`MigrationAlgorithm`'s raw value).
    public var algorithm: String
    /// The migrate mode (always sync).
    public var mode: String
    /// 4 KiB pages moved each round.
    public var pages: Int
    /// Lock-holding threads.
    public var holders: Int
    /// Moves of the buffer.
    public var rounds: Int
    /// Pages migrated (pgmigrate_success) over every round.
    public var pagesMigrated: Int
    /// Pages not on the round's target node after the round's move_pages,
    /// over all rounds.
    public var pagesNotMigrated: Int
    /// Pages already on the round's target node (left behind by the round
    /// before), over all rounds: move_pages reports them with the node as
    /// status and moves nothing. `pagesMigrated + pagesNotMigrated +
    /// pagesAlreadyOnTarget` is `pages * rounds`.
    public var pagesAlreadyOnTarget: Int
    /// Migrator waits that reached the hung-task bound.
    public var stalls: Int
    /// "hung task" diagnostics the kernel recorded.
    public var hungTaskDiagnostics: Int
    /// -EDEADLOCK back-offs (batched-v6.3-rc).
    public var deadlockBackoffs: Int
    /// The migrator's folio-lock and writeback waits.
    public var lockWaits: UInt64
    /// The migrator's lock waits: median, nanoseconds.
    public var lockWaitP50Nanos: UInt64
    /// The 99th percentile, nanoseconds.
    public var lockWaitP99Nanos: UInt64
    /// The longest, nanoseconds.
    public var lockWaitMaxNanos: UInt64
    /// The migrator's waits by length (power-of-two buckets, empty ones left out).
    public var lockWaitHistogram: [NUMAWaitBucket]
    /// The holders' own lock waits (the I/O side stuck behind the migrator).
    public var holderWaitP99Nanos: UInt64
    /// The holders' longest lock wait, nanoseconds.
    public var holderWaitMaxNanos: UInt64
    /// Holder waits that reached four times the bound (they gave up).
    public var holderTimeouts: Int
    /// Wall (or virtual) time of the rounds, the page queries excluded.
    public var seconds: Double
    /// Every byte matched the pattern after the storm.
    public var dataIntact: Bool
    /// Scheduling points of a deterministic run (nil, and absent from the
    /// JSON, on real threads).
    public var scheduleSteps: UInt64? = nil
    /// The machine profile a deterministic run charged (`--machine`); nil,
    /// and absent from the JSON, without one.
    public var machine: String? = nil
    /// Scheduling points per host second (the engine's speed; the one field
    /// of a deterministic run that depends on the host).
    public var stepsPerSecond: Double? = nil
}

extension NUMABench {
    /// Runs the storm once per algorithm, each on a fresh machine;
    /// `progress` hears each algorithm as it starts.
    public static func storm(_ s: NUMAStormSettings, progress: (String) -> Void = { _ in }) throws -> [NUMAStormResult] {
        try s.algorithms.map {
            progress($0.rawValue)
            return try storm($0, settings: s)
        }
    }

    /// Runs the storm for one algorithm on a fresh machine.
    public static func storm(_ algorithm: MigrationAlgorithm, settings s: NUMAStormSettings) throws -> NUMAStormResult {
        let bytes = s.pages * PageGeometry.pageSize
        let (machine, base) = try boot(bytes: bytes, slack: 16 << 20, schedule: s.schedule, threads: s.holders + 1,
                                       seed: s.seed) { config in
            config.addressSpaceSize = 4 << 30
            config.transparentHugepage = .never
        }
        let kernel = machine.kernel, mm = machine.mm
        let seed = s.seed
        let addresses = (0..<s.pages).map { base + UInt64($0 * PageGeometry.pageSize) }

        let stop = Atomic<Bool>(false)
        let timeouts = Atomic<Int>(0)
        let histograms = ReaderHistograms(count: s.holders)
        let threads = HarnessThreads(s.schedule)
        for h in 0..<s.holders {
            threads.spawn("holder\(h)") {
                var x = UInt64(h + 1) &* 0x9E37_79B9_7F4A_7C15
                // Hot pages spread over the buffer, none the first (it has no previous page).
                var hot: [UInt64] = []
                for _ in 0..<max(1, s.hotPagesPerHolder) {
                    x ^= x << 13; x ^= x >> 7; x ^= x << 17
                    hot.append(base + (1 + x % UInt64(max(1, s.pages - 1))) * UInt64(PageGeometry.pageSize))
                }
                var waits = WaitHistogram()
                var n = 0
                let holderLimit = s.waitLimitNanos * 4
                while !stop.load(ordering: .relaxed) {
                    let addr = hot[n % hot.count]
                    n += 1
                    // Pages being migrated have no page to take: the next one.
                    guard let page = mm.getUserPage(addr) else { HostClock.sleep(nanos: s.gapMicros * 1000); continue }
                    let folio = page.folio
                    if s.writebackEvery > 0 && n % s.writebackEvery == 0,
                       let previous = mm.getUserPage(addr - UInt64(PageGeometry.pageSize)) {
                        // Writeback on this folio whose completion needs the previous page's lock.
                        let needed = previous.folio
                        if folio.lock(timeoutNanos: holderLimit) {
                            folio.startWriteback()
                            folio.unlock()
                            HostClock.sleep(nanos: s.holdMicros * 1000)
                            let t0 = HostClock.nanos()
                            let taken = needed.lock(timeoutNanos: holderLimit)
                            waits.record(HostClock.nanos() - t0)
                            if taken { needed.unlock() } else { timeouts.add(1, ordering: .relaxed) }
                            folio.endWriteback()
                        } else {
                            timeouts.add(1, ordering: .relaxed)
                        }
                        needed.put()
                    } else {
                        let t0 = HostClock.nanos()
                        if folio.lock(timeoutNanos: holderLimit) {
                            waits.record(HostClock.nanos() - t0)
                            HostClock.sleep(nanos: s.holdMicros * 1000)
                            folio.unlock()
                        } else {
                            waits.record(HostClock.nanos() - t0)
                            timeouts.add(1, ordering: .relaxed)
                        }
                    }
                    folio.put()
                    HostClock.sleep(nanos: s.gapMicros * 1000)
                }
                histograms.store(h, waits)
            }
        }

        var policy = MigratePagesPolicy(algorithm: algorithm)
        policy.waitLimitNanos = s.waitLimitNanos
        let pages0 = kernel.vmstat[.pgmigrateSuccess]
        // The migrator: the calling thread, or the emulated thread "main".
        let (stats, (notMigrated, alreadyThere), seconds) = try threads.run(leaving: kernel.cpus) {
            HostClock.sleep(nanos: 2_000_000)
            var stats = MigrateStats()
            var status: [PageStatus] = []
            var notMigrated = 0, alreadyThere = 0, queryNanos: UInt64 = 0
            // Pages on `node`, by a move_pages query (outside the timed moves).
            func pages(on node: Int) throws -> Int {
                let q0 = HostClock.nanos()
                defer { queryNanos += HostClock.nanos() - q0 }
                var where_: [PageStatus] = []
                try mm.movePages(addresses, nodes: nil, status: &where_)
                return where_.reduce(0) { $0 + ($1 == .node(node) ? 1 : 0) }
            }
            defer {
                stop.store(true, ordering: .relaxed)
                // A holder may sleep out its bounded waits (4 x the bound) before it sees the flag.
                _ = threads.waitForHelpers(timeoutNanos: 60_000_000_000)
            }
            let t0 = HostClock.nanos()
            for round in 0..<s.rounds {
                let target = (round + 1) & 1
                // A page left behind by the round before is already on this
                // round's target: move_pages moves nothing and reports the
                // node. Counting by where the pages are before and after the
                // round makes migrated + not migrated + already there the
                // round's pages (move_pages' own return value also counts,
                // as the kernel's does, pages after a failed run that it
                // never tried, some of them already on the target).
                let before = try pages(on: target)
                try mm.movePages(addresses, nodes: Array(repeating: target, count: addresses.count), status: &status,
                                 policy: policy, stats: &stats)
                alreadyThere += before
                notMigrated += addresses.count - (try pages(on: target))
            }
            return (stats, (notMigrated, alreadyThere), Double(HostClock.nanos() - t0 - queryNanos) / 1e9)
        }
        var holders = WaitHistogram()
        for h in histograms.all { holders.merge(h) }
        var intact = false
        do { intact = try mm.verifyPattern(base, length: bytes, seed: seed) == nil } catch {}
        let hung = kernel.diagnostics.filter { $0.rule.contains("hung task") }.count
        let w = stats.lockWaits
        var buckets: [NUMAWaitBucket] = []
        for (i, c) in w.buckets.enumerated() where c > 0 { buckets.append(NUMAWaitBucket(upToNanos: UInt64(1) << UInt64(i + 1), count: c)) }
        try machine.finishAudited("numa --storm \(algorithm.rawValue)")
        return NUMAStormResult(
            algorithm: algorithm.rawValue, mode: MigrateMode.sync.rawValue, pages: s.pages, holders: s.holders, rounds: s.rounds,
            pagesMigrated: Int(kernel.vmstat[.pgmigrateSuccess] - pages0), pagesNotMigrated: notMigrated,
            pagesAlreadyOnTarget: alreadyThere,
            stalls: stats.stalls, hungTaskDiagnostics: hung, deadlockBackoffs: stats.deadlockBackoffs,
            lockWaits: w.count, lockWaitP50Nanos: w.quantile(0.5), lockWaitP99Nanos: w.quantile(0.99), lockWaitMaxNanos: w.maxNanos,
            lockWaitHistogram: buckets, holderWaitP99Nanos: holders.quantile(0.99), holderWaitMaxNanos: holders.maxNanos,
            holderTimeouts: timeouts.load(ordering: .relaxed), seconds: seconds, dataIntact: intact,
            scheduleSteps: threads.steps, machine: s.schedule.deterministic ? s.schedule.machine?.name : nil,
            stepsPerSecond: threads.stepsPerSecond)
    }
}
