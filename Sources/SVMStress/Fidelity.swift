import Foundation
import MirrorDriver
import SVMEmu
import SVMProfiles

/// A real kernel's livelock results (Data/kernel/livelock.json, written by
/// `make kernel-check` from Tools/kernel-rig): T threads reading each of N
/// device-private pages after a barrier, under Linux 6.12 with test_hmm's
/// knob patch (legacy fault path) and with the trylock backport.
public struct KernelLivelockReference: Codable, Sendable {
    /// One boot's result of one case.
    public struct Run: Codable, Sendable {
        /// "completes" or "livelock".
        public var outcome: String
        /// migrate_to_ram calls per page (nil for a livelock).
        public var callsPerPage: Double?
        /// Seconds the case took (the watchdog's limit for a livelock).
        public var seconds: Double?
        /// The host's load during the boot (`idle`, `loaded`), when the
        /// rig's run recorded it: under TCG the guest's timing follows it.
        public var hostLoad: String?
    }
    /// One case under one fault path, over every boot.
    public struct Case: Codable, Sendable {
        /// "threads:mutex:micros".
        public var `case`: String
        /// Storm threads.
        public var threads: Int
        /// Whether the driver takes its mutex around the migration.
        public var mutex: Bool
        /// The fsleep() inside migrate_to_ram, in microseconds.
        public var sleepMicros: Int
        /// Pages of the storm.
        public var pages: Int
        /// "legacy" or "trylock".
        public var policy: String
        /// One result per boot.
        public var runs: [Run]
    }
    /// The kernel the reference ran on.
    public var kernel: String
    /// Its Debian package.
    public var package: String?
    /// When it was measured.
    public var date: String
    /// The QEMU it ran under.
    public var qemu: String
    /// The host QEMU ran on.
    public var host: String?
    /// Boots per case.
    public var boots: Int?
    /// The cases.
    public var cases: [Case]

    /// The reference that ships with the package (the kernel rig's last results).
    public static func shipped() throws -> KernelLivelockReference {
        guard let url = ShippedProfiles.dataFile("kernel/livelock.json") else {
            throw FidelityError.missingReference("the package's resources (kernel/livelock.json) are not next to the binary")
        }
        return try load(url)
    }

    /// The reference in the file at `url`.
    public static func load(_ url: URL) throws(FidelityError) -> KernelLivelockReference {
        do { return try JSONFile.decode(KernelLivelockReference.self, from: JSONFile.read(url.path)) } catch {
            throw .missingReference("\(url.path): \(error.reason)")
        }
    }
}

/// Why a fidelity run could not start.
public enum FidelityError: Error, CustomStringConvertible {
    case missingReference(String)
    /// The reference in a line.
    public var description: String {
        switch self { case .missingReference(let why): "cannot use the kernel reference: \(why)" }
    }
}

/// One side of a comparison: how a case ended, over its runs.
public struct FidelitySide: Codable, Sendable, Equatable {
    /// "completes", "livelock", or "mixed" (runs disagree; the majority is
    /// in `majority`).
    public var outcome: String
    /// The outcome most runs had.
    public var majority: String
    /// Runs with each outcome.
    public var completed: Int
    /// Runs that livelocked.
    public var livelocked: Int
    /// Calls per page of the completing runs: lowest, highest (nil: none completed).
    public var callsPerPage: [Double]?

    init(outcomes: [(livelock: Bool, callsPerPage: Double?)]) {
        livelocked = outcomes.filter(\.livelock).count
        completed = outcomes.count - livelocked
        majority = livelocked > completed ? "livelock" : "completes"
        outcome = livelocked == 0 ? "completes" : completed == 0 ? "livelock" : "mixed"
        let calls = outcomes.compactMap { $0.livelock ? nil : $0.callsPerPage }
        callsPerPage = calls.isEmpty ? nil : [calls.min()!, calls.max()!]
    }
}

/// One row of `svmemu fidelity`: a case under one fault path, kernel and emulator side by side.
public struct FidelityRow: Codable, Sendable {
    /// "threads:mutex:micros".
    public var `case`: String
    /// "legacy" or "trylock".
    public var policy: String
    /// What the kernel did.
    public var kernel: FidelitySide
    /// What the emulator did.
    public var emulator: FidelitySide
    /// Seeds whose outcome the kernel also had (on any boot).
    public var seedsAgreeing: Int
    /// At least 4 in 5 seeds had an outcome the kernel had: its only
    /// outcome, or either of them when its boots differed.
    public var outcomeAgrees: Bool
    /// Every completing emulator run is within 2x of the kernel's calls per
    /// page (its range over boots); nil when either side never completed.
    public var callsWithin2x: Bool?
    /// The host load of the kernel's boots the row compares with: the
    /// machine profile's (``MachineProfile/hostLoad``) when the case has
    /// boots of it; nil, every boot.
    public var kernelHostLoad: String?
    /// Host seconds the emulator's runs of this row took.
    public var seconds: Double
}

/// Runs the kernel rig's livelock cases on the emulator with a machine's
/// costs and the rig's driver shape, seed by seed, and sets them beside the
/// kernel's results.
public enum FidelityHarness {
    /// The rig's watchdog (`rig-livelock -w`, default 30): a run whose
    /// pages make no progress for this long is a livelock to the kernel.
    public static let rigWatchdogSeconds = 30.0

    /// How the emulator runs each case.
    public struct Settings: Sendable {
        /// The machine whose settings the runs take (``MachineProfile/apply(to:)``:
        /// its costs without jitter, slice, tick, stalls, tick interrupt,
        /// preemption and wake placement); nil: the scheduler's defaults.
        public var machine: MachineProfile? = nil
        /// The emulated CPUs (the rig's vCPUs).
        public var cpus = 2
        /// Seeds per case.
        public var seeds: [UInt64] = [1, 2, 3, 4, 5]
        /// Pages per storm (the rig's 512).
        public var pages = 512
        /// Virtual seconds a page may take before the run counts as a
        /// livelock: by default the rig's watchdog (``rigWatchdogSeconds``),
        /// whose completing boots have pages of 1-30 s (4:1:50, 4:1:100,
        /// 4:1:200, 6:1:20) that a shorter window would count as livelocks
        /// (Docs/fidelity.md, "The tick's interrupt").
        public var stallSeconds = FidelityHarness.rigWatchdogSeconds
        /// The driver's shape: every call sleeps, with fsleep (the rig's).
        public var driverWork: DriverWorkShape = .everyCall
        /// How the driver waits.
        public var driverWait: DriverWait = .fsleep
        /// Which of the kernel's boots each case compares with.
        public var kernelBoots: KernelBoots = .sameHostLoad
        /// Runs at a time, each on a host thread of its own (default: the
        /// host's cores). The rows do not depend on it.
        public var jobs = max(1, ProcessInfo.processInfo.activeProcessorCount)
        /// The defaults.
        public init() {}
    }

    /// Which of the kernel's boots a row compares with.
    public enum KernelBoots: String, Sendable, CaseIterable {
        /// The boots whose host load is the machine profile's
        /// (``MachineProfile/hostLoad``), when the case has any; else every boot.
        case sameHostLoad = "same-load"
        /// Every boot, whatever its host's load.
        case all
    }

    /// The storm settings of `c` under `settings` and `seed`.
    public static func stormSettings(_ c: KernelLivelockReference.Case, _ settings: Settings, seed: UInt64) -> StormSettings {
        var s = StormSettings(faultPolicy: c.policy == "trylock" ? .trylock : .legacy,
                              driverLock: c.mutex ? .exclusive : .none,
                              migrateToRAMWorkMicros: c.sleepMicros, threads: c.threads, pages: settings.pages,
                              seed: seed, stallSeconds: settings.stallSeconds)
        s.deterministic = true
        s.cpus = settings.cpus
        s.preemptions = 0
        s.driverWork = settings.driverWork
        s.driverWait = settings.driverWait
        s.release = .wakeAll
        s.barrierAfterAccess = true
        return s
    }

    /// Runs every case of `reference` with every seed, ``Settings/jobs``
    /// runs at a time on host threads of their own, and returns one row per
    /// case in the reference's order; `progress` gets each row, on the
    /// calling thread, once its seeds are done and the rows before it are.
    /// Each run is deterministic on its own, so the rows are the same for
    /// any number of jobs (but for their host ``FidelityRow/seconds``).
    public static func run(_ reference: KernelLivelockReference, _ settings: Settings,
                           progress: ((FidelityRow, Int, Int) -> Void)? = nil) throws(StormError) -> [FidelityRow] {
        let cases = reference.cases, seeds = settings.seeds
        guard !cases.isEmpty, !seeds.isEmpty else { return [] }
        let board = FidelityBoard(cases: cases.count, seeds: seeds.count)
        let workers = max(1, min(settings.jobs, cases.count * seeds.count))
        for w in 0..<workers {
            let t = Thread {
                while let (c, i) = board.take() {
                    let start = Date()
                    do throws(StormError) {
                        let outcome = try runOne(cases[c], settings, seed: seeds[i])
                        board.finish(c, i, outcome, seconds: Date().timeIntervalSince(start))
                    } catch {
                        board.fail(error)
                    }
                }
                board.exit()
            }
            t.name = "svmemu fidelity \(w)"
            t.stackSize = 16 << 20
            t.start()
        }
        var rows: [FidelityRow] = []
        while rows.count < cases.count {
            board.waitForNews()
            while rows.count < cases.count, let (outcomes, seconds) = board.outcomes(ofCase: rows.count) {
                let row = Self.row(cases[rows.count], outcomes, seconds: seconds, settings)
                rows.append(row)
                progress?(row, rows.count, cases.count)
            }
            if let error = board.failure {
                board.waitForExits(workers)
                throw error
            }
        }
        board.waitForExits(workers)
        return rows
    }

    /// One seed of case `c`: whether it livelocked, and its calls per page when it completed.
    static func runOne(_ c: KernelLivelockReference.Case, _ settings: Settings,
                       seed: UInt64) throws(StormError) -> FidelityBoard.Outcome {
        let s = stormSettings(c, settings, seed: seed)
        var schedule = DeterministicScheduler.Configuration(seed: seed)
        schedule.preemptions = 0
        schedule.cpus = settings.cpus
        settings.machine?.apply(to: &schedule)
        let r = try StormHarness.run(s, schedule: schedule)
        let complete = !r.livelocked && r.pagesMigrated == s.pages && r.error == nil
        return (!complete, complete ? Double(r.migrateToRAMCalls.total) / Double(s.pages) : nil)
    }

    /// The boots of `c` a row compares with under `settings`, and their
    /// host load (nil: every boot).
    static func kernelRuns(_ c: KernelLivelockReference.Case,
                           _ settings: Settings) -> ([KernelLivelockReference.Run], String?) {
        guard settings.kernelBoots == .sameHostLoad, let load = settings.machine?.hostLoad else { return (c.runs, nil) }
        let same = c.runs.filter { $0.hostLoad == load }
        return same.isEmpty ? (c.runs, nil) : (same, load)
    }

    /// Case `c`'s row from its seeds' outcomes (in the seeds' order).
    static func row(_ c: KernelLivelockReference.Case, _ outcomes: [FidelityBoard.Outcome], seconds: Double,
                    _ settings: Settings) -> FidelityRow {
        let (runs, load) = kernelRuns(c, settings)
        let kernel = FidelitySide(outcomes: runs.map { ($0.outcome != "completes", $0.callsPerPage) })
        let emulator = FidelitySide(outcomes: outcomes)
        var within: Bool? = nil
        if let k = kernel.callsPerPage, let e = emulator.callsPerPage {
            within = e[0] >= k[0] / 2 && e[1] <= k[1] * 2
        }
        let kernelOutcomes = Set(runs.map { $0.outcome != "completes" })
        let agreeing = outcomes.filter { kernelOutcomes.contains($0.livelock) }.count
        return FidelityRow(case: c.case, policy: c.policy, kernel: kernel, emulator: emulator,
                           seedsAgreeing: agreeing, outcomeAgrees: agreeing * 5 >= outcomes.count * 4,
                           callsWithin2x: within, kernelHostLoad: load, seconds: seconds)
    }
}

/// The shared state of a fidelity run's host threads: the next (case,
/// seed) to run, each run's outcome, the first error; a semaphore tells the
/// calling thread of each run that ended and of each thread that exited.
final class FidelityBoard: @unchecked Sendable {
    typealias Outcome = (livelock: Bool, callsPerPage: Double?)
    private struct State {
        var next = 0
        var outcomes: [[Outcome?]]
        var seconds: [Double]
        var failure: StormError? = nil
    }
    /// The project's locked box, not a bare `Mutex`: ThreadSanitizer sees
    /// what its lock orders (a futex-based `Mutex` it does not).
    private let state: LockedValue<State>
    private let seeds: Int, total: Int
    private let news = DispatchSemaphore(value: 0), exits = DispatchSemaphore(value: 0)

    init(cases: Int, seeds: Int) {
        self.seeds = seeds
        total = cases * seeds
        state = LockedValue(State(outcomes: Array(repeating: Array(repeating: nil, count: seeds), count: cases),
                            seconds: Array(repeating: 0, count: cases)))
    }

    /// The next run to do, nil when all are taken or one failed.
    func take() -> (Int, Int)? {
        state.withLock { s in
            guard s.failure == nil, s.next < total else { return nil }
            defer { s.next += 1 }
            return s.next.quotientAndRemainder(dividingBy: seeds)
        }
    }

    func finish(_ c: Int, _ i: Int, _ outcome: Outcome, seconds: Double) {
        state.withLock { s in
            s.outcomes[c][i] = outcome
            s.seconds[c] += seconds
        }
        news.signal()
    }

    func fail(_ error: StormError) {
        state.withLock { s in if s.failure == nil { s.failure = error } }
        news.signal()
    }

    func exit() { exits.signal() }

    /// Waits until a run ends (the calling thread, between rows).
    func waitForNews() { news.wait() }

    /// Waits for `n` threads to exit.
    func waitForExits(_ n: Int) { for _ in 0..<n { exits.wait() } }

    var failure: StormError? { state.withLock { $0.failure } }

    /// Case `c`'s outcomes and host seconds once every seed of it is done.
    func outcomes(ofCase c: Int) -> ([Outcome], Double)? {
        state.withLock { s in
            let o = s.outcomes[c].compactMap { $0 }
            return o.count == seeds ? (o, s.seconds[c]) : nil
        }
    }
}
