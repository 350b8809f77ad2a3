import MirrorDriver
import SVMEmu

/// Mean, median, 99th percentile and maximum of a set of per-page figures.
public struct StormDistribution: Sendable, Codable, Equatable {
    /// Values.
    public var count: Int
    /// Their mean.
    public var mean: Double
    /// Their median.
    public var p50: Double
    /// Their 99th percentile.
    public var p99: Double
    /// The largest.
    public var max: Double

    /// No values.
    public static let empty = StormDistribution(count: 0, mean: 0, p50: 0, p99: 0, max: 0)
}

extension StormDistribution {
    /// Nearest-rank percentiles of `values`.
    public init<S: Sequence>(_ values: S) where S.Element: BinaryInteger {
        self.init(values.map { Double($0) })
    }

    /// The distribution of `values`.
    public init(_ values: [Double]) {
        guard !values.isEmpty else { self = .empty; return }
        let sorted = values.sorted()
        func rank(_ q: Double) -> Double {
            let r = Int((q * Double(sorted.count)).rounded(.up))
            return sorted[Swift.min(sorted.count, Swift.max(1, r)) - 1]
        }
        count = sorted.count
        mean = sorted.reduce(0, +) / Double(sorted.count)
        p50 = rank(0.50)
        p99 = rank(0.99)
        max = sorted[sorted.count - 1]
    }
}

/// What happened to one page of the storm.
public struct PageRecord: Sendable, Codable, Equatable {
    /// The page's index in the storm.
    public var page: Int
    /// `migrateToRAM` calls (every driver) between the page's barrier and its completion.
    public var migrateToRAMCalls: Int
    /// Device-private fault retries (`device_private_fault_retries`).
    public var faultRetries: Int
    /// Successful migrations to device memory during the page (ping-pong, two devices).
    public var deviceMigrations: Int
    /// From the barrier to the last thread's successful access.
    public var nanos: UInt64
    /// Whether the CPU page table mapped the page in RAM at completion.
    public var inRAMAtCompletion: Bool
}

/// `migrateToRAM` calls: the total and their distribution over completed pages.
public struct CallStats: Sendable, Codable, Equatable {
    /// Calls in the whole storm.
    public var total: Int
    /// Calls per page: mean.
    public var perPageMean: Double
    /// Median.
    public var perPageP50: Double
    /// 99th percentile.
    public var perPageP99: Double
    /// Most.
    public var perPageMax: Double
}

/// What the threads were doing when the watchdog declared a page livelocked.
public struct StallReport: Sendable, Codable, Equatable {
    /// The page (index in the storm) that made no progress.
    public var page: Int
    /// The page's address.
    public var address: UInt64
    /// Seconds without a page completing.
    public var secondsWithoutProgress: Double
    /// The CPU page-table entry of the page: `devicePrivate`, `present`, `migration`, `none`.
    public var entryKind: String
    /// The folio's reference count and mappings at the most telling sample
    /// (the one with the most references beyond its mappings).
    public var refCount: Int?
    /// The folio's map count (nil: no folio).
    public var mapCount: Int?
    /// `refCount - mapCount`: references held by threads in the fault path or
    /// in a migration, not by page tables.
    public var referencesBeyondMappings: Int?
    /// Whether the folio's lock was held (nil: no folio).
    public var folioLocked: Bool?
    /// Storm threads trying to access the page, and waiting at the barrier for them.
    public var threadsAccessing: Int
    /// Threads done with the page, waiting at the barrier.
    public var threadsAtBarrier: Int
    /// The driver lock at that sample (all drivers added up); nil if no probe.
    public var driverLockWaiting: Int?
    /// Threads holding the driver lock (nil: the driver cannot tell).
    public var driverLockHolding: Int?
    /// Work done on the page so far.
    public var migrateToRAMCallsOnPage: Int
    /// Fault retries on the page.
    public var faultRetriesOnPage: Int
    /// One sentence for people.
    public var summary: String
}

/// The outcome of one storm.
public struct StormResult: Sendable, Codable, Equatable {
    /// The storm that ran.
    public var settings: StormSettings
    /// Pages whose storm completed (every thread accessed the page; for the
    /// CPU storms that means the page came back to RAM).
    public var pagesMigrated: Int
    /// The watchdog saw no page complete for `settings.stallSeconds`.
    public var livelocked: Bool
    /// The page that stalled, if any.
    public var stalledPage: Int?
    /// What the watchdog saw on it.
    public var stall: StallReport?
    /// migrateToRAM calls, in all and per page.
    public var migrateToRAMCalls: CallStats
    /// Device-private fault retries in total, and per completed page.
    public var faultRetries: Int
    /// Fault retries per page.
    public var faultRetriesPerPage: StormDistribution
    /// Microseconds per completed page.
    public var pageMicros: StormDistribution
    /// Successful migrations to device memory during the storm (ping-pong, two devices).
    public var deviceMigrations: Int
    /// Wall time of the storm (setup and teardown excluded).
    public var seconds: Double
    /// After teardown: every thread left, no driver lock held, and every
    /// page's folio unlocked with exactly the references its mappings hold;
    /// no kernel diagnostic (WARN) was recorded.
    public var teardownClean: Bool
    /// What teardown found (empty when clean).
    public var teardownIssues: [String]
    /// The bytes of every page match the pattern written before the storm
    /// (checked after teardown, single-threaded).
    public var dataIntact: Bool
    /// The first error a storm thread's access returned (SIGBUS, OOM ...), if any.
    public var error: String?
    /// Per completed page, in order (may be emptied before printing).
    public var perPage: [PageRecord]
    /// Virtual seconds the deterministic storm took (nil for real threads);
    /// `seconds` stays the host's wall time.
    public var virtualSeconds: Double? = nil
    /// Scheduling points of the deterministic storm (nil for real threads).
    public var scheduleSteps: UInt64? = nil
    /// Context switches of the deterministic storm's CPUs (nil for real threads).
    public var contextSwitches: UInt64? = nil
    /// Scheduling points per host second of the deterministic storm (the
    /// engine's speed; nil for real threads). Like `seconds`, it depends on
    /// the host, not on the seed.
    public var stepsPerSecond: Double? = nil
    /// The deterministic scheduler found no thread able to run: the wait-for picture.
    public var deadlock: String? = nil
    /// The deterministic scheduler's step log (its `logSteps` last steps);
    /// not part of the JSON.
    public var scheduleLog: [DeterministicScheduler.Step] = []

    enum CodingKeys: String, CodingKey {
        case scenario, faultPolicy, driverLock, migrateToRAMWorkMicros, migrateToRAMLookupMicros, threads, pages, pageSize, seed, stallSeconds, joinTimeoutSeconds
        case pagesMigrated, livelocked, stalledPage, stall, migrateToRAMCalls, faultRetries, faultRetriesPerPage
        case pageMicros, deviceMigrations, seconds, teardownClean, teardownIssues, dataIntact, error, perPage
        case deterministic, cpus, virtualSeconds, scheduleSteps, stepsPerSecond, deadlock, release, machine
        case driverWork, driverWait, contextSwitches, driver
    }

    /// A flat object: the settings' keys beside the result's, absent values
    /// as `null`; `cpus` only in a deterministic storm, `machine` only with one.
    public func encode(to encoder: any Encoder) throws {
        let s = settings
        try encoder.encodeProperties(of: self, except: ["settings", "scheduleLog"], adding: [
            "scenario": s.scenario, "faultPolicy": s.faultPolicy, "driver": s.driver, "driverLock": s.driverLock,
            "migrateToRAMWorkMicros": s.migrateToRAMWorkMicros, "migrateToRAMLookupMicros": s.migrateToRAMLookupMicros,
            "driverWork": s.driverWork, "driverWait": s.driverWait, "threads": s.threads, "pages": s.pages,
            "pageSize": s.pageSize, "seed": s.seed, "stallSeconds": s.stallSeconds, "joinTimeoutSeconds": s.joinTimeoutSeconds,
            "release": s.release, "deterministic": s.deterministic, "cpus": s.deterministic ? s.cpus : nil as Int?])
        if s.deterministic, let machine = s.machine {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(machine.name, forKey: .machine)
        }
    }

}

extension StormResult {
    /// Decodes a result (the JSON of `svmemu livelock --json`).
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        var s = StormSettings()
        s.scenario = try c.decode(StormScenario.self, forKey: .scenario)
        s.faultPolicy = try c.decode(DeviceFaultPolicy.self, forKey: .faultPolicy)
        s.driverLock = try c.decode(DriverLockMode.self, forKey: .driverLock)
        s.migrateToRAMWorkMicros = try c.decode(Int.self, forKey: .migrateToRAMWorkMicros)
        s.migrateToRAMLookupMicros = try c.decode(Int.self, forKey: .migrateToRAMLookupMicros)
        s.driverWork = try c.decode(DriverWorkShape.self, forKey: .driverWork)
        s.driverWait = try c.decode(DriverWait.self, forKey: .driverWait)
        s.driver = try c.decode(HarnessDriver.self, forKey: .driver)
        s.threads = try c.decode(Int.self, forKey: .threads)
        s.pages = try c.decode(Int.self, forKey: .pages)
        s.pageSize = try c.decode(StormPageSize.self, forKey: .pageSize)
        s.seed = try c.decode(UInt64.self, forKey: .seed)
        s.stallSeconds = try c.decode(Double.self, forKey: .stallSeconds)
        s.joinTimeoutSeconds = try c.decode(Double.self, forKey: .joinTimeoutSeconds)
        s.deterministic = try c.decode(Bool.self, forKey: .deterministic)
        s.cpus = try c.decodeIfPresent(Int.self, forKey: .cpus) ?? s.cpus
        s.release = try c.decode(StormRelease.self, forKey: .release)
        // The report keeps the profile's name: a shipped one comes back whole.
        if let name = try c.decodeIfPresent(String.self, forKey: .machine) { s.machine = try? MachineProfile.shipped(name) }
        settings = s
        virtualSeconds = try c.decodeIfPresent(Double.self, forKey: .virtualSeconds)
        scheduleSteps = try c.decodeIfPresent(UInt64.self, forKey: .scheduleSteps)
        contextSwitches = try c.decodeIfPresent(UInt64.self, forKey: .contextSwitches)
        stepsPerSecond = try c.decodeIfPresent(Double.self, forKey: .stepsPerSecond)
        deadlock = try c.decodeIfPresent(String.self, forKey: .deadlock)
        pagesMigrated = try c.decode(Int.self, forKey: .pagesMigrated)
        livelocked = try c.decode(Bool.self, forKey: .livelocked)
        stalledPage = try c.decodeIfPresent(Int.self, forKey: .stalledPage)
        stall = try c.decodeIfPresent(StallReport.self, forKey: .stall)
        migrateToRAMCalls = try c.decode(CallStats.self, forKey: .migrateToRAMCalls)
        faultRetries = try c.decode(Int.self, forKey: .faultRetries)
        faultRetriesPerPage = try c.decode(StormDistribution.self, forKey: .faultRetriesPerPage)
        pageMicros = try c.decode(StormDistribution.self, forKey: .pageMicros)
        deviceMigrations = try c.decode(Int.self, forKey: .deviceMigrations)
        seconds = try c.decode(Double.self, forKey: .seconds)
        teardownClean = try c.decode(Bool.self, forKey: .teardownClean)
        teardownIssues = try c.decode([String].self, forKey: .teardownIssues)
        dataIntact = try c.decode(Bool.self, forKey: .dataIntact)
        error = try c.decodeIfPresent(String.self, forKey: .error)
        perPage = try c.decode([PageRecord].self, forKey: .perPage)
    }
}

/// What the storm reports while it runs (for a progress line).
public struct StormProgress: Sendable {
    /// Pages completed.
    public var pagesDone: Int
    /// Pages of the storm.
    public var pages: Int
    /// migrateToRAM calls so far.
    public var migrateToRAMCalls: Int
    /// Fault retries so far.
    public var faultRetries: Int
    /// Seconds since the storm started (virtual in a deterministic storm).
    public var seconds: Double
    /// Seconds since the last page completed.
    public var secondsSinceProgress: Double
}
