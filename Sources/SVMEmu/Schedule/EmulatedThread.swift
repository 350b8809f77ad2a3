import CSVMSupport

/// One thread of a ``DeterministicScheduler``: a fiber (a stack of its own
/// and a saved register set) that runs on the scheduler's host thread while
/// the scheduler has switched to it. Only one of a run's threads runs at a
/// time, so its fields need no lock.
@usableFromInline
final class EmulatedThread: @unchecked Sendable {
    enum State { case runnable, blocked, finished }

    /// Unowned and unchecked: a scheduler outlives its threads' runs (its
    /// host thread holds it until the run ends), and the check cost a
    /// reference-count operation at every scheduling point.
    unowned(unsafe) let scheduler: DeterministicScheduler
    // The fields below are read and written only by the fiber that runs
    // (one at a time, on the scheduler's host thread) and by the scheduler
    // between two of them: no access can overlap another, so their dynamic
    // exclusivity checks (a third of the engine's bookkeeping at every
    // scheduling point, perf) are off.
    let index: Int
    let name: String
    let observer: Bool
    var body: (@Sendable () -> Void)?
    /// Virtual nanoseconds since the run started.
    @exclusivity(unchecked) var clock: UInt64 = 0
    @exclusivity(unchecked) var priority = 0
    @exclusivity(unchecked) var state = State.runnable
    /// The futex word a blocked thread waits on, and its virtual deadline.
    @exclusivity(unchecked) var waitWord: UnsafeMutablePointer<UInt32>? = nil
    @exclusivity(unchecked) var deadline: UInt64? = nil
    @exclusivity(unchecked) var timedOut = false
    @exclusivity(unchecked) var blockSequence: UInt64 = 0
    /// The locks this thread took and has not released, each with whether
    /// it is a sleeping lock (holding one leaves the thread preemptible).
    @exclusivity(unchecked) var held: [(lock: UnsafeRawPointer, sleeping: Bool)] = []
    /// Its lock-order record (what it holds, by class and site), for deadlock reports.
    var lockRecord: LockOrder.HeldLocks? = nil
    /// With the CPU model (``DeterministicScheduler/Configuration/cpus``):
    /// the CPU the thread runs on, or -1 while it has none (queued for one,
    /// blocked, finished).
    @exclusivity(unchecked) var cpu = -1
    /// The CPU it last ran on (where a wake-up looks first).
    @exclusivity(unchecked) var lastCPU = 0
    /// The CPU it last ran on before a wake-up looked for an idle one
    /// (`p->recent_used_cpu`), or -1.
    @exclusivity(unchecked) var recentUsedCPU = -1
    /// EEVDF (``DeterministicScheduler/Configuration/cpus``): the thread's
    /// virtual runtime on its run queue (nice 0: one nanosecond a nanosecond
    /// it runs), its virtual deadline, and the lag it keeps while off a run
    /// queue (`sched_entity`'s `vruntime`, `deadline`, `vlag`).
    @exclusivity(unchecked) var vruntime: Int64 = 0
    @exclusivity(unchecked) var vdeadline: Int64 = 0
    @exclusivity(unchecked) var vlag: Int64 = 0
    /// Its deadline is kept relative to its vruntime (moved between run
    /// queues by a balance, not asleep: `rel_deadline`).
    @exclusivity(unchecked) var relativeDeadline = false
    /// Blocked but still on its last CPU's run queue until it is eligible
    /// (`sched_delayed`, DELAY_DEQUEUE).
    @exclusivity(unchecked) var delayed = false
    /// The deadline it was picked with still stands: a wake-up does not
    /// preempt it while it is eligible (RUN_TO_PARITY's `protect_slice()`).
    @exclusivity(unchecked) var sliceProtected = false
    /// The clock up to which its run time is in its vruntime (`exec_start`).
    @exclusivity(unchecked) var execStart: UInt64 = 0
    /// Inside a fault handler (kernel mode): with voluntary preemption a
    /// reschedule waits for a point where the kernel would take it.
    @exclusivity(unchecked) var inKernel = 0
    /// The lock a blocked thread sleeps for, when its futex word is not the
    /// lock's own (a mutex waiter sleeps on its own word): for deadlock reports.
    @exclusivity(unchecked) var waitsForLock: UnsafeRawPointer? = nil
    /// The lock this thread's next futex wait is for (a kernel mutex's
    /// waiter sleeps on a word of its own): set just before the wait,
    /// cleared by the wait whether it blocks or finds the word changed.
    @exclusivity(unchecked) var pendingLockWait: UnsafeRawPointer? = nil
    /// Without the CPU model, a sleep is a jump of the clock: until this
    /// virtual time the thread sleeps, and is on no CPU.
    @exclusivity(unchecked) var asleepUntil: UInt64 = 0
    /// Its fiber, from the start of the run; freed after the run once the
    /// thread finished (a thread of a deadlock keeps it: its stack holds the
    /// frames of its wait, and what they point to may be shared).
    var fiber: OpaquePointer? = nil

    init(scheduler: DeterministicScheduler, index: Int, name: String, observer: Bool,
         body: @escaping @Sendable () -> Void) {
        self.scheduler = scheduler
        self.index = index
        self.name = name
        self.observer = observer
        self.body = body
    }

    /// The fiber's life: run the body, then hand control on for good (to the
    /// next thread, or back to the scheduler when the run ends here).
    func main() -> Never {
        lockRecord = LockOrder.held()   // on the fiber: its own lock-order stack
        body?()
        body = nil
        // Give the emulated CPU back while this thread still runs alone.
        svm_thread_exit_now()
        state = .finished
        let s = scheduler
        if cpu >= 0 { s.vacate(self) }
        guard let next = s.pick(from: self) else {
            s.deadlocked(self)
            s.endRun(from: self)
        }
        next._withUnsafeGuaranteedRef { next in
            s.record(next, "exit")
            s.switchTo(next, from: self)
        }
        contractViolation("DeterministicScheduler: a finished emulated thread (\(name)) ran again")
    }
}

/// The virtual cost of each kind of scheduling point, in nanoseconds. The
/// defaults are this project's measurements on its 2-core test machine
/// (Docs/cpus.md, Docs/overhead.md): what the step costs on real hardware,
/// not what emulating it costs.
public struct VirtualCosts: Sendable, Equatable {
    /// The start of a CPU access (a TLB hit: 2.8 ns measured; a miss walks
    /// for 14-16 ns, charged as the fault or lock points that follow).
    public var access: UInt64
    /// Entering the fault handler and leaving it (exception entry and exit,
    /// the walk to the entry): about a microsecond on x86.
    public var fault: UInt64
    /// Taking a lock (uncontended: 2-3 ns; a cache-line transfer between
    /// CPUs dominates when it moves).
    public var lock: UInt64
    /// Releasing a lock.
    public var unlock: UInt64
    /// A futex wait or wake system call.
    public var futex: UInt64
    /// From a wake-up to the woken thread running (the scheduler's latency).
    public var wake: UInt64
    /// One round of a spin-wait loop that yields.
    public var yield: UInt64
    /// A CPU copy of one KiB of a migration (the memcpy copy engine, the
    /// kernel's single-threaded folio copy): 12-14 GB/s measured
    /// (Docs/benchmarks.md), 80 ns a KiB. A link model's time comes on top
    /// when it is longer, as on real threads.
    public var copyPerKiB: UInt64
    /// A context switch on one CPU: the outgoing thread's state saved, the
    /// incoming one's restored (a pipe ping-pong between two threads pinned
    /// to one CPU, per switch). Charged when a CPU changes threads in a run
    /// with more threads than CPUs.
    public var contextSwitch: UInt64
    /// One round of an optimistic spin on a lock word another CPU owns (a
    /// cache-line transfer and a pause).
    public var spinRound: UInt64
    /// A page-table walk of the kernel's (walk_page_range() of one PMD in
    /// migrate_vma_setup(), the walk of a TLB miss): charged once per PMD a
    /// migration collects. 0 by default (the walk was charged as the points
    /// that follow it); a machine profile gives its measured walk.
    public var walk: UInt64 = 0
    /// A local TLB flush of a range (invlpg per page, or a full flush),
    /// charged to the flusher. 0 by default; a machine profile gives its own.
    public var localFlush: UInt64 = 0
    /// An IPI round of a TLB shootdown, send to the last acknowledgement,
    /// charged to the flusher once per round that sent an IPI. 0 by default;
    /// a machine profile gives its own.
    public var ipi: UInt64 = 0
    /// An IPI from its send to its receipt on a running CPU: with the CPU
    /// model, the wake-up latency of a thread woken onto a CPU that went idle
    /// less than ``contextSwitch`` ago (still switching to its idle task, not
    /// yet halted; ``wake`` is the latency of a halted one). 0 by default; a
    /// machine profile gives its own.
    public var ipiReceipt: UInt64 = 0
    /// The kernel's own code on a device-private fault from the handler's
    /// entry to the page reference before `migrate_to_ram` (6.12 runs that
    /// fault twice: under the per-VMA lock, `VM_FAULT_RETRY`, then under the
    /// mmap lock). Charged once per fault that finds a device-private PTE,
    /// before it takes the PTE lock (`handle_pte_fault()` reads the entry
    /// without it). 0 by default; a machine profile gives its measured span.
    public var deviceFaultToReference: UInt64 = 0
    /// The kernel's own code from that reference to the collect's PMD
    /// (`migrate_to_ram`, `migrate_vma_setup()`, the notifier, the walk):
    /// charged in `migrate_vma_setup()` of a fault (a `faultPage` given),
    /// before the collect. 0 by default; a machine profile gives its measured span.
    public var referenceToCollect: UInt64 = 0
    /// With the CPU model: from a sleeper's timer expiring on its idle CPU
    /// to the sleeper running there (the hrtimer interrupt bringing a halted
    /// CPU out of its idle loop, the wake-up, the switch), measured after
    /// the CPU had idled for each point's time, the shortest idle first.
    /// ``timerWakeNanos(idleFor:)`` reads it. Empty by default: a timed-out
    /// sleeper takes its CPU at its expiry, as before the measurement; a
    /// machine profile gives its own.
    public var timerWake: [TimerWakePoint] = []

    /// One measured point of ``timerWake``.
    public struct TimerWakePoint: Sendable, Equatable {
        /// How long the CPU had idled when the timer expired, ns.
        public var idleNanos: UInt64
        /// From the expiry to the sleeper running, ns.
        public var latencyNanos: UInt64

        public init(idleNanos: UInt64, latencyNanos: UInt64) {
            self.idleNanos = idleNanos
            self.latencyNanos = latencyNanos
        }
    }

    /// The timer wake-up latency of a CPU that idled for `idleFor` ns:
    /// linear between the measured points (by idle time), the nearest
    /// point's outside them; 0 without a measurement.
    public func timerWakeNanos(idleFor: UInt64) -> UInt64 {
        guard let first = timerWake.first, let last = timerWake.last else { return 0 }
        if idleFor <= first.idleNanos { return first.latencyNanos }
        if idleFor >= last.idleNanos { return last.latencyNanos }
        for i in 1..<timerWake.count where idleFor <= timerWake[i].idleNanos {
            let a = timerWake[i - 1], b = timerWake[i]
            let f = Double(idleFor - a.idleNanos) / Double(max(b.idleNanos - a.idleNanos, 1))
            return UInt64((Double(a.latencyNanos) + (Double(b.latencyNanos) - Double(a.latencyNanos)) * f).rounded())
        }
        return last.latencyNanos
    }

    /// The measured defaults.
    public static let measured = VirtualCosts(access: 3, fault: 1_000, lock: 20, unlock: 10, futex: 300,
                                              wake: 2_000, yield: 200, copyPerKiB: 80,
                                              contextSwitch: 1_500, spinRound: 60)

    /// A table with every cost given.
    public init(access: UInt64, fault: UInt64, lock: UInt64, unlock: UInt64, futex: UInt64, wake: UInt64,
                yield: UInt64, copyPerKiB: UInt64 = 80, contextSwitch: UInt64 = 1_500, spinRound: UInt64 = 60) {
        self.contextSwitch = contextSwitch
        self.spinRound = spinRound
        self.access = access
        self.fault = fault
        self.lock = lock
        self.unlock = unlock
        self.futex = futex
        self.wake = wake
        self.yield = yield
        self.copyPerKiB = copyPerKiB
    }
}
