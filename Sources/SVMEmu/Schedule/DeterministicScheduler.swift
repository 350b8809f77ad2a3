import Synchronization
import CSVMSupport

/// A deterministic scheduler: emulated threads (fibers, each with a stack of
/// its own, all on one host thread of the scheduler's, so only one of them
/// runs at a time) that switch only at the scheduling points the emulated
/// kernel defines, in virtual time, chosen by a seeded generator.
///
/// Scheduling points: acquire and release of every futex-mutex kernel lock
/// (page-table, PMD, zone locks, ``KernelMutex``, ``KernelRWSemaphore``), the
/// folio lock (trylock, lock, unlock), every futex wait and wake (the folio
/// lock's and writeback's sleeps, the CPU-slot wait, notifier waits), the start
/// of each CPU access, the entry of each fault, ``HostThread/yield()`` and
/// ``HostClock/sleep(nanos:)``. A blocking wait makes the thread not runnable
/// until a wake on its word (or its virtual timeout); a sleep advances its
/// clock instead of sleeping.
///
/// Virtual time: each thread has a clock, advanced at every scheduling point by
/// the cost table (``VirtualCosts``) and by modelled delays. The scheduler runs
/// the runnable thread whose clock is lowest (a thread keeps running while it
/// is less than `quantumNanos` ahead of the next one), so N threads run "in
/// parallel" in virtual time on any number of host cores. Ties go to the
/// thread with the higher priority; priorities are drawn from the seed, and at
/// up to `preemptions` seeded steps the running thread is preempted (its clock
/// set back by a seeded delay, its priority made the lowest), as PCT bounds its
/// priority-change points. Costs carry a seeded jitter. Same seed, same
/// program: the same schedule, step by step.
///
/// While a scheduler runs, ``HostClock/nanos()`` on an emulated thread reads
/// that thread's virtual clock. Every thread that touches the machine the
/// emulated threads use must be one of them: a host thread outside the
/// scheduler that takes one of their locks, or wakes one of them, is not seen.
///
/// Lock-order validation (``LockOrder``) is on while a scheduler runs.
///
/// When no thread can run and some wait indefinitely (observer threads, such
/// as a watchdog, do not count), the run ends with ``Outcome/deadlock(_:)`` and
/// the wait-for cycle; the deadlocked threads are never resumed, and their
/// stacks stay allocated for the life of the process (their frames hold the
/// locks of the deadlock and may be pointed to).
public final class DeterministicScheduler: @unchecked Sendable {

    /// How a run schedules its threads.
    public struct Configuration: Sendable {
        /// The seed: priorities, preemption steps, delays and cost jitter.
        public var seed: UInt64
        /// How many seeded preemption points a run has at most (PCT's depth).
        public var preemptions: Int = 3
        /// The preemption points fall within the first this many steps.
        public var preemptionHorizon: UInt64 = 100_000
        /// The longest virtual delay of a preemption, in nanoseconds.
        public var maxPreemptionNanos: UInt64 = 20_000
        /// Besides the seeded steps, each lock release preempts its thread
        /// with this probability, in percent (0: never). A release is where
        /// other threads first see what the holder changed; a thread stalled
        /// right after it (an unlock, then the flush that should have come
        /// first) is how races between a change and its follow-up show up.
        /// Runs with 0 schedule exactly as before the option existed.
        public var releasePreemptionPercent: UInt64 = 0
        /// A thread keeps running while its clock is at most this far ahead of
        /// the next runnable thread's (fewer host switches; 0: strict order).
        public var quantumNanos: UInt64 = 0
        /// Each cost varies by up to this percentage either way, from the
        /// seed. A setting, not a measurement: a machine profile's runs set
        /// it to 0 (their noise is the profile's measured stalls).
        public var jitterPercent: UInt64 = 10
        /// The cost of each kind of scheduling point.
        public var costs: VirtualCosts = .measured
        /// Steps kept for ``stepLog`` (the last ones; 0: none).
        public var logSteps: Int = 0
        /// The host wall time a run may take before it is abandoned
        /// (``Outcome/hostTimeout``), in seconds.
        public var hostTimeoutSeconds: Double = 600
        /// The CPUs the threads share (the CPU model), or nil: every thread
        /// has a CPU of its own, as when the model did not exist.
        ///
        /// With CPUs, a thread runs only while it has one. Each CPU has a
        /// run queue scheduled by EEVDF as 6.12's kernel/sched/fair.c does
        /// (Docs/deterministic.md, "The CPU model"): every thread has a
        /// vruntime, a virtual deadline (a slice ahead) and a lag; a CPU
        /// runs the eligible thread with the earliest deadline; a woken
        /// thread is placed with the lag it slept with and may set the
        /// running thread's need-resched flag (``preemption`` says where
        /// that flag is acted on); a thread that used its slice is
        /// rescheduled at the next tick when another waits. A thread that
        /// blocks gives its CPU to the next pick, or an idle CPU pulls one
        /// from the longest queue (newidle balancing); each such change costs
        /// ``VirtualCosts/contextSwitch``. A woken thread takes a CPU by
        /// ``wakePlacement``. A sleeper whose timer expires on its own idle,
        /// halted CPU runs there ``VirtualCosts/timerWakeNanos(idleFor:)``
        /// after the expiry. A thread holding a spinning lock is never
        /// preempted (preemption is off then). Spinning
        /// (``HostClock/spin(nanos:)``, a mutex's optimistic spin) keeps the CPU.
        public var cpus: Int? = nil
        /// EEVDF's slice (a thread's virtual deadline is this far ahead of
        /// its vruntime), in nanoseconds; nil: the kernel's default for the
        /// CPU count, 0.75 ms
        /// times 1 + log2(min(cpus, 8)) (sysctl_sched_base_slice,
        /// SCHED_TUNABLESCALING_LOG).
        public var timesliceNanos: UInt64? = nil
        /// The scheduler tick (CONFIG_HZ=1000: 1 ms): a slice that ran out is
        /// noticed at the next tick.
        public var tickNanos: UInt64 = 1_000_000
        /// Where a reschedule (a wake-up's preemption, the tick's) is acted on.
        public var preemption: PreemptionModel = .full
        /// Which CPU a woken thread takes.
        public var wakePlacement: WakePlacement = .idleSibling
        /// With the CPU model: how often a busy CPU stops running its thread
        /// for reasons outside the emulated kernel (a virtual machine's vCPU
        /// descheduled by its host), and for how long; nil: never. The thread
        /// stays on its CPU meanwhile (the guest sees it running), so a
        /// lock holder's stall keeps its spinners spinning.
        public var stalls: CPUStalls? = nil
        /// With ``stalls``: a busy CPU's stalls while every other CPU idles
        /// (a machine profile's `stalls.oneBusy`, the probe run on one vCPU
        /// alone); nil: `stalls` whatever the others do. Under a hypervisor
        /// a stall is the host taking a vCPU thread's core, which it needs
        /// less while the other vCPUs idle and leave it theirs.
        public var stallsOneBusy: CPUStalls? = nil
        /// With the CPU model: the time the tick's interrupt takes from the
        /// thread it interrupts on a busy CPU (``TickInterrupt``, a machine
        /// profile's measured tick gaps); nil: a tick is a scheduling check
        /// only and costs nothing.
        public var tickInterrupt: TickInterrupt? = nil

        /// A configuration with `seed` and the defaults.
        public init(seed: UInt64) { self.seed = seed }
    }

    /// The kernel's preemption model (CONFIG_PREEMPT_*): where the CPU
    /// model acts on a thread's need-resched flag. Whatever the model, a
    /// thread holding a spinning lock, or inside an emulated access, is not
    /// preempted, and a thread that blocks gives its CPU at once.
    public enum PreemptionModel: String, Sendable, Equatable {
        /// `CONFIG_PREEMPT_NONE`: only at the return to user space (outside
        /// a fault handler, every scheduling point is user space).
        case none
        /// `CONFIG_PREEMPT_VOLUNTARY`: at the return to user space, and in
        /// the kernel where it may sleep (`might_resched()` in
        /// `might_sleep()`: `mutex_lock()`, `down_read()`, `folio_lock()`).
        case voluntary
        /// `CONFIG_PREEMPT`: at any scheduling point (a preemptible kernel).
        case full
    }

    /// How a woken thread picks its CPU (`select_task_rq_fair()`).
    public enum WakePlacement: String, Sendable, Equatable {
        /// The CPUs share a last-level cache (an `sd_llc` domain):
        /// `select_idle_sibling()` takes the CPU it last ran on when idle,
        /// else any idle CPU of the cache, else queues (on the CPU with the
        /// shortest queue).
        case idleSibling
        /// No LLC domain: `select_idle_sibling()` returns its target, the
        /// CPU the thread last ran on, idle or not (`wake_affine()`'s load
        /// comparison, which can pick the waker's CPU, is not modelled).
        case previousCPU
        /// One last-level cache over every CPU, as 6.12's
        /// `select_idle_sibling()` treats it: the CPU the thread last ran
        /// on when idle; else the CPU it ran on before that
        /// (`p->recent_used_cpu`) when idle; else, when SIS_UTIL's scan
        /// allows (the cache's utilisation under about 85% of its
        /// capacity, fewer CPUs scanned as it grows: `nr_idle_scan`), the
        /// first idle CPU after the last one; else the last CPU's queue.
        /// Utilisation is PELT's (`util_avg`: busy time, a stall included,
        /// with a 32 ms half-life), taken at the wake-up (the kernel
        /// refreshes `nr_idle_scan` at its periodic balance). `wake_affine()`
        /// is not modelled: the target is always the last CPU.
        case sharedCache
    }

    /// How a run ended.
    public enum Outcome: Sendable, Equatable {
        /// Every thread returned.
        case completed
        /// No thread could run and some waited for ever: the wait-for picture.
        case deadlock(DeadlockReport)
        /// The run took longer than `hostTimeoutSeconds` of host time.
        case hostTimeout
    }

    /// One scheduling decision of the step log.
    public struct Step: Sendable, Equatable, CustomStringConvertible {
        /// The step number (scheduling points since the run started).
        public let step: UInt64
        /// The thread that runs after this point.
        public let thread: String
        /// That thread's virtual clock, in nanoseconds.
        public let clock: UInt64
        /// What the previous thread did at this point.
        public let event: String
        public var description: String { "step \(step): \(event) -> \(thread) at \(clock) ns" }
    }

    let configuration: Configuration
    @exclusivity(unchecked) var threads: [EmulatedThread] = []
    @exclusivity(unchecked) var rng: SplitMix64
    @exclusivity(unchecked) var step: UInt64 = 0
    @exclusivity(unchecked) var preemptSteps: [UInt64] = []
    @exclusivity(unchecked) var lowestPriority: Int = 0
    @exclusivity(unchecked) var blockSequence: UInt64 = 0
    /// Lock word -> index of the thread that took it (for wait-for cycles).
    let owners = PointerTable()
    /// Lock word -> index in `lockNames` (``name(_:_:)``, and each kernel lock's own name).
    let lockNameIndex = PointerTable()
    var lockNames: [String] = []
    @exclusivity(unchecked) var log: [Step] = []
    /// The lock-order violations this run's threads closed; guarded by
    /// ``LockOrder``'s graph lock.
    var violationsFound: [LockOrder.Violation] = []
    var outcome: Outcome = .completed
    /// How the run ended, as its threads saw it (``run()`` makes it the outcome).
    @exclusivity(unchecked) var ending: Outcome = .completed
    /// 0 while the run goes on, 1 when it ended, 2 when its caller abandoned it.
    let doneWord: UnsafeMutablePointer<UInt32>
    /// The scheduler's host thread's own context, while the run goes on.
    var hostFiber: OpaquePointer? = nil
    var started = false
    /// The CPU model's CPUs (empty without it).
    @exclusivity(unchecked) var cpus: [ModelCPU] = []
    /// The slice of the CPU model.
    let slice: UInt64

    /// One CPU of the model: who runs, who waits.
    struct ModelCPU {
        /// The thread running (its index), or nil when idle.
        var running: Int? = nil
        /// Threads that wait for this CPU, first in line first.
        var queue: [Int] = []
        /// When it went idle.
        var idleSince: UInt64 = 0
        /// Context switches so far.
        var switches: UInt64 = 0
        /// When (in the virtual time of the thread on it) the CPU stalls next.
        /// Stalls come in busy time (the profile's rate is per second of a
        /// busy CPU): while the CPU idles this stands still (``idleStallLeft``).
        var nextStall: UInt64 = .max
        /// The busy time left until the next stall when the CPU went idle.
        var idleStallLeft: UInt64 = 0
        /// Stalls so far, and their time.
        var stalls: UInt64 = 0
        var stalledNanos: UInt64 = 0
        /// The running thread must reschedule (TIF_NEED_RESCHED).
        var needResched = false
        /// The run queue's average vruntime when it last had a thread
        /// (`zero_vruntime`): where a thread placed on it empty starts.
        var zeroVruntime: Int64 = 0
        /// The next tick of this CPU (virtual time).
        var nextTick: UInt64 = 0
        /// Tick interrupts whose handler the running thread lost, and their time.
        var tickInterrupts: UInt64 = 0
        var tickInterruptNanos: UInt64 = 0
        /// PELT's utilisation (`util_avg`, 0-1024) as of ``utilStamp``, and
        /// whether the CPU has been busy since then (``utilisation(_:at:)``).
        var util: Double = 0
        var utilStamp: UInt64 = 0
        var utilBusy = false
    }

    /// A scheduler for one run.
    public init(_ configuration: Configuration) {
        self.configuration = configuration
        rng = SplitMix64(state: configuration.seed ^ 0x9E37_79B9_7F4A_7C15)
        doneWord = .allocate(capacity: 1)
        doneWord.initialize(to: 0)
        if let n = configuration.cpus {
            if n < 1 || n > 64 { contractViolation("DeterministicScheduler: cpus must be 1-64, not \(n)") }
            if let irq = configuration.tickInterrupt, configuration.tickNanos > 0,
               !(0...1).contains(irq.share) || irq.nanos >= configuration.tickNanos {
                contractViolation("DeterministicScheduler: a tick interrupt's share must be 0-1 and its time under a tick")
            }
            cpus = Array(repeating: ModelCPU(), count: n)
            let log2 = UInt64(63 - UInt64(min(n, 8)).leadingZeroBitCount)
            slice = configuration.timesliceNanos ?? 750_000 * (1 + log2)
        } else {
            slice = 0
        }
        DeterministicScheduler.installHooks
    }

    deinit { doneWord.deallocate() }

    /// Adds an emulated thread that runs `body` once ``run()`` starts.
    ///
    /// - Parameters:
    ///   - name: the thread's name in the step log and in deadlock reports.
    ///   - observer: a thread that only watches (a watchdog): it does not keep
    ///     the others from being reported as deadlocked.
    ///   - body: what the thread does.
    public func spawn(_ name: String, observer: Bool = false, _ body: @escaping @Sendable () -> Void) {
        if started { contractViolation("DeterministicScheduler.spawn: the run has started") }
        let t = EmulatedThread(scheduler: self, index: threads.count, name: name, observer: observer, body: body)
        t.priority = Int(rng.next() % 1_000_000) + 1
        threads.append(t)
    }

    /// Names a lock for deadlock reports (by default a lock is named by its address).
    public func name(_ lock: UnsafeRawPointer, _ name: String) {
        if let i = lockNameIndex[lock] {
            lockNames[i] = name
        } else {
            lockNameIndex.set(lock, lockNames.count)
            lockNames.append(name)
        }
    }

    /// Runs every spawned thread to its end under the scheduler and returns
    /// how the run ended. Blocks the caller (which is not an emulated thread)
    /// until then, at most `hostTimeoutSeconds`.
    ///
    /// The threads run as fibers on one host thread of the scheduler's own
    /// (`switchTo(_:from:)`); the caller waits for it, so that a run that
    /// never reaches its end (a thread that loops without a scheduling point)
    /// still returns at the host timeout.
    public func run() -> Outcome {
        if started { contractViolation("DeterministicScheduler.run: a scheduler runs once") }
        started = true
        guard !threads.isEmpty else { return .completed }
        for _ in 0..<configuration.preemptions where configuration.preemptionHorizon > 0 {
            preemptSteps.append(rng.next() % configuration.preemptionHorizon)
        }
        preemptSteps.sort()
        if !cpus.isEmpty {
            if let stalls = configuration.stalls {
                for c in cpus.indices {
                    cpus[c].nextStall = stalls.interval(uniform: unit(), ratePerSecond: stallDrawRate(stalls))
                    cpus[c].idleStallLeft = cpus[c].nextStall
                }
            }
            // The first threads get the CPUs in order; the others queue round
            // robin, each placed as a new task (half a slice to its deadline).
            var next = 0
            for t in threads where !t.observer {
                let c = next % cpus.count
                placeEntity(t, on: c, initial: true)
                if cpus[c].running == nil {
                    run(t, on: c)
                } else {
                    cpus[c].queue.append(t.index)
                }
                t.lastCPU = c
                next += 1
            }
        }
        let hostStart = HostClock.hostNanos()
        // The hooks stay on until the runner ends (an abandoned run's runner
        // ends after run() returned, at its next scheduling point).
        svm_det_activate(1)
        LockOrder.enable()
        defer {
            LockOrder.disable()
            hostSeconds = Double(HostClock.hostNanos() &- hostStart) / 1e9
        }
        for t in threads {
            let raw = Unmanaged.passUnretained(t).toOpaque()
            guard let f = svm_fiber_create(Self.fiberStackBytes, { raw in
                Unmanaged<EmulatedThread>.fromOpaque(raw!).takeUnretainedValue().main()
            }, raw, raw) else {
                contractViolation("DeterministicScheduler: the host refused the memory of a thread's stack "
                                  + "(\(Self.fiberStackBytes >> 20) MiB)")
            }
            t.fiber = f
        }
        guard let runner = HostThreadHandle.spawn({ self.runFibers() }) else {
            contractViolation("DeterministicScheduler: the host refused a thread")
        }
        let deadline = HostClock.hostNanos() &+ UInt64(configuration.hostTimeoutSeconds * 1e9)
        while UnsafeAtomic(doneWord).load(ordering: .acquiring) == 0 {
            let now = HostClock.hostNanos()
            if now >= deadline {
                // Abandoned: the running thread stops at its next scheduling point and
                // the runner ends; nothing of the run is touched from here.
                var running: UInt32 = 0
                if UnsafeAtomic(doneWord).compareExchange(&running, 2, successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring) {
                    runner.detach()
                    outcome = .hostTimeout
                    return outcome
                }
                break
            }
            _ = svm_futex_wait_raw(doneWord, 0, min(deadline - now, 100_000_000))
        }
        runner.join()
        svm_det_activate(-1)
        outcome = ending
        for t in threads where t.state == .finished {
            svm_fiber_destroy(t.fiber)
            t.fiber = nil
        }
        return outcome
    }

    /// The stack of each emulated thread: as large as a host thread's default
    /// (the emulated kernel's paths are deep Swift code); reserved, not
    /// committed, with a guard page below it.
    static let fiberStackBytes = 8 << 20

    /// The scheduler's host thread: switches to the first thread and comes
    /// back here when the run ends (every thread finished, a deadlock) or is
    /// abandoned; then lets the caller of ``run()`` go on.
    func runFibers() {
        let host = svm_fiber_adopt_thread()
        hostFiber = host
        if let first = pick(from: nil) { svm_fiber_switch(host, first._withUnsafeGuaranteedRef { $0.fiber }) }
        svm_fiber_destroy(host)
        var running: UInt32 = 0
        if UnsafeAtomic(doneWord).compareExchange(&running, 1, successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring) {
            _ = svm_futex_wake_raw(doneWord, 1)
        } else {
            svm_det_activate(-1)   // abandoned: run() returned without it
        }
    }

    /// The lock-order violations (``LockOrder``) the run's threads closed,
    /// oldest first. A dependency the process recorded before the run is
    /// not checked again, so a cycle an earlier run closed is not repeated.
    public var lockOrderViolations: [LockOrder.Violation] { LockOrder.withGraph { _ in violationsFound } }

    /// The last steps of the run (``Configuration/logSteps`` of them).
    public var stepLog: [Step] { Array(log.suffix(configuration.logSteps)) }

    /// Scheduling points taken so far.
    public var steps: UInt64 { step }

    /// The host wall time ``run()`` took, in seconds (0 before it returns).
    public private(set) var hostSeconds: Double = 0

    /// Scheduling points per second of host time: how fast the engine went
    /// (``steps`` over ``hostSeconds``; 0 before ``run()`` returns). The one
    /// figure of a run that depends on the host, not on the seed.
    public var stepsPerSecond: Double { hostSeconds > 0 ? Double(step) / hostSeconds : 0 }

    /// The emulated thread the caller runs on, or nil.
    @usableFromInline static var current: EmulatedThread? {
        guard let raw = svm_det_current() else { return nil }
        return Unmanaged<EmulatedThread>.fromOpaque(raw).takeUnretainedValue()
    }
}
