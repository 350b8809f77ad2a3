import Foundation
import SVMEmu
import Synchronization

/// Whether a harness (the overhead breakdown, the migrate_pages benchmark and
/// its storm) runs its threads as real host threads or as the emulated
/// threads of a ``DeterministicScheduler``.
public struct HarnessSchedule: Sendable, Equatable, Codable {
    /// Run the harness's threads under a ``DeterministicScheduler`` seeded
    /// with `seed`: one at a time, in virtual time, the same run for the same
    /// seed on any host. Every time the harness reports is then virtual.
    public var deterministic = false
    /// The emulated CPUs of the machine (`KernelConfiguration.cpus`) in a
    /// deterministic run; real-thread runs keep the kernel's default.
    public var cpus = 8
    /// Seeds the schedule (priorities, preemption points, cost jitter).
    public var seed: UInt64 = 1
    /// Seeded preemption points of a deterministic run (PCT's depth).
    public var preemptions = 3
    /// The machine whose measured costs a deterministic run charges
    /// (``MachineProfile/virtualCosts``); nil: ``VirtualCosts/measured``.
    public var machine: MachineProfile? = nil

    /// Real threads.
    public init() {}

    /// A deterministic schedule on `cpus` emulated CPUs, seeded with `seed`.
    public static func deterministic(cpus: Int = 8, seed: UInt64 = 1, preemptions: Int = 3) -> HarnessSchedule {
        var s = HarnessSchedule()
        s.deterministic = true
        s.cpus = cpus
        s.seed = seed
        s.preemptions = preemptions
        return s
    }

    /// Checks the CPUs (1...64; the run's `threads` may be more: they
    /// share the CPUs, see ``DeterministicScheduler/Configuration/cpus``)
    /// and the preemption points (0...1000); `nil` when fine, else the reason.
    public func problem(threads: Int) -> String? {
        guard deterministic else { return nil }
        guard (1...CPUSet.maxCPUs).contains(cpus) else { return "cpus must be 1...\(CPUSet.maxCPUs) (got \(cpus))" }
        guard (0...1000).contains(preemptions) else { return "preemptions must be 0...1000 (got \(preemptions))" }
        return nil
    }
}

/// Why a deterministic harness run did not complete.
public struct HarnessScheduleError: Error, CustomStringConvertible, Equatable {
    /// What went wrong, for the user.
    public let description: String
}

/// The threads of one harness run: helpers (readers, busy CPUs, lock
/// holders) beside a main thread that measures. On real threads each helper
/// starts at ``spawn(_:_:)`` and the main body runs on the caller; with a
/// deterministic ``HarnessSchedule`` the helpers are emulated threads,
/// registered at ``spawn(_:_:)``, and ``run(leaving:_:)`` runs them with
/// the main body (the emulated thread "main") under the scheduler.
///
/// The helpers share one contract in both modes: they return once the main
/// body tells them to (a flag of the harness's own), and the main body waits
/// for them with ``waitForHelpers(timeoutNanos:)`` before it returns.
final class HarnessThreads: @unchecked Sendable {
    let schedule: HarnessSchedule
    private let scheduler: DeterministicScheduler?
    private let finished = Atomic<Int>(0)
    private var spawned = 0
    /// Scheduling points of the deterministic run (after ``run(leaving:_:)``; nil on real threads).
    private(set) var steps: UInt64? = nil
    /// Scheduling points per host second of that run (nil on real threads).
    private(set) var stepsPerSecond: Double? = nil

    init(_ schedule: HarnessSchedule) {
        self.schedule = schedule
        if schedule.deterministic {
            var c = DeterministicScheduler.Configuration(seed: schedule.seed)
            c.cpus = schedule.cpus
            c.preemptions = schedule.preemptions
            schedule.machine?.apply(to: &c)
            scheduler = DeterministicScheduler(c)
        } else {
            scheduler = nil
        }
    }

    /// Starts (real threads) or registers (deterministic) a helper running `body`.
    func spawn(_ name: String, _ body: @escaping @Sendable () -> Void) {
        spawned += 1
        let run: @Sendable () -> Void = { [self] in
            body()
            finished.add(1, ordering: .releasing)
        }
        if let scheduler {
            scheduler.spawn(name, run)
        } else {
            let t = Thread(block: run)
            t.name = name
            t.stackSize = 1 << 20
            t.start()
        }
    }

    /// Waits until every helper has returned, at most `timeoutNanos` (virtual
    /// time in a deterministic run); false when some did not.
    func waitForHelpers(timeoutNanos: UInt64 = 10_000_000_000) -> Bool {
        let deadline = HostClock.nanos() &+ timeoutNanos
        while finished.load(ordering: .acquiring) < spawned {
            if HostClock.nanos() >= deadline { return false }
            HostClock.sleep(nanos: 100_000)
        }
        return true
    }

    /// Runs `main`: on the calling thread, or as the emulated thread "main"
    /// with every helper under the scheduler, after the calling thread gave
    /// its CPU of `cpus` back (the setup's accesses took one).
    ///
    /// - Throws: what `main` throws; `HarnessScheduleError` when the
    ///   deterministic run deadlocked or took longer than the scheduler's host
    ///   timeout.
    func run<R>(leaving cpus: CPUSet, _ main: @escaping () throws -> R) throws -> R {
        guard let scheduler else { return try main() }
        cpus.leave()
        // Written by "main", read once the scheduler has joined every thread.
        let box = UncheckedBox<R>(main)
        scheduler.spawn("main") { box.run() }
        switch scheduler.run() {
        case .completed: break
        case .deadlock(let report):
            throw HarnessScheduleError(description: "the deterministic run deadlocked: \(report)")
        case .hostTimeout:
            throw HarnessScheduleError(description: "the deterministic run took too long on the host")
        }
        steps = scheduler.steps
        stepsPerSecond = scheduler.stepsPerSecond
        guard let r = box.result else {
            throw HarnessScheduleError(description: "the deterministic run's main thread did not finish")
        }
        return try r.get()
    }
}

/// The main body of a deterministic run and its result: the emulated thread
/// "main" writes it, the caller reads it after the scheduler joined them all.
private final class UncheckedBox<R>: @unchecked Sendable {
    let body: () throws -> R
    var result: Result<R, any Error>? = nil
    init(_ body: @escaping () throws -> R) { self.body = body }
    func run() { result = Result { try body() } }
}
