import CSVMSupport
#if canImport(Glibc)
import Glibc
#endif

/// The CPU model of a ``DeterministicScheduler`` (``DeterministicScheduler/Configuration/cpus``):
/// more threads than CPUs, run queues, slices and context switches.
///
/// A thread's clock only advances while it has a CPU (or while it sleeps
/// or waits); a queued thread's clock is the time it became ready, and it
/// starts when its CPU comes free, one context switch later. The scheduler
/// still runs the earliest event first: among the threads that have a CPU
/// and the blocked threads whose timeout comes, the lowest clock.
extension DeterministicScheduler {

    /// ``pick(from:)`` with the CPU model: only threads on a CPU run; a
    /// timed-out thread first needs a CPU (an idle one, or a queue).
    func pickOnCPUs(from me: EmulatedThread?) -> Unmanaged<EmulatedThread>? {
        while true {
            var bestTime: UInt64 = .max
            var waitingForever = 0, working = 0
            var bestIndex = -1, bestPriority = 0  // by index: no retain per thread looked at, as in pick(from:)
            threads.withUnsafeBufferPointer { buf in
                for i in buf.indices where buf[i] !== me {
                    let time: UInt64
                    switch buf[i].state {
                    case .runnable:
                        if !buf[i].observer { working += 1 }
                        guard buf[i].observer || buf[i].cpu >= 0 else { continue }   // queued: runs when its CPU frees
                        time = buf[i].clock
                    case .blocked:
                        guard let d = buf[i].deadline else {
                            if !buf[i].observer { waitingForever += 1; working += 1 }
                            continue
                        }
                        if !buf[i].observer { working += 1 }
                        time = max(buf[i].clock, d)
                    case .finished: continue
                    }
                    if bestIndex < 0 || time < bestTime || (time == bestTime && buf[i].priority > bestPriority) {
                        (bestIndex, bestTime, bestPriority) = (i, time, buf[i].priority)
                    }
                }
            }
            // Unretained: `threads` holds every thread for the run.
            var best: Unmanaged<EmulatedThread>? = bestIndex >= 0 ? threads.withUnsafeBufferPointer { .passUnretained($0[bestIndex]) } : nil
            // A runnable caller goes on only on a CPU (an observer needs none).
            if let me, weighCaller(me, canRun: me.observer || me.cpu >= 0, &best, &bestTime, bestPriority, &working, &waitingForever) {
                return .passUnretained(me)
            }
            if waitingForever > 0 && waitingForever == working { return nil }
            guard let chosen = best else { return nil }
            let ready = chosen._withUnsafeGuaranteedRef { b -> Bool in
                guard b.state == .blocked else { return true }
                // Its timeout (or its sleep's timer) comes first: it is ready now.
                b.state = .runnable
                b.timedOut = true
                b.clock = bestTime
                b.waitWord = nil
                b.deadline = nil
                b.waitsForLock = nil
                if b.observer { return true }
                placeTimerWoken(b)
                // Its wake-up latency put it later: another thread may come first.
                return b.cpu >= 0 && b.clock == bestTime
            }
            if ready { return chosen }
            // Queued behind a running thread: look again.
        }
    }

    /// A woken (or timed-out) thread, ready at its clock
    /// (`try_to_wake_up()`): a thread still on its run queue (delayed) is
    /// put back in place; else an idle CPU by ``Configuration/wakePlacement``
    /// (it runs there at once), else a run queue, where it may preempt the
    /// running thread (``enqueueWoken(_:on:)``).
    func place(_ t: EmulatedThread) {
        if t.delayed { requeueDelayed(t); return }
        let idle = idleCPU(for: t)
        if idle >= 0 {
            t.clock = max(t.clock, cpus[idle].idleSince)
            // Busy again: the stall clock goes on from where the CPU went idle.
            if cpus[idle].nextStall != .max { cpus[idle].nextStall = t.clock &+ cpus[idle].idleStallLeft }
            placeEntity(t, on: idle)
            run(t, on: idle)
            return
        }
        enqueueWoken(t, on: busyTarget(for: t))
    }

    /// A sleeper whose timer expired at its clock (an hrtimer: `usleep_range()`,
    /// a timed wait's timeout). The kernel arms it on the CPU the sleeper ran
    /// on (`hrtimer_start()` keeps a timer armed by a running task on its
    /// CPU), and the expiry's interrupt wakes the sleeper there
    /// (`hrtimer_wakeup()`, `try_to_wake_up()`): on that CPU when it is idle,
    /// after the machine's latency of a timer waking a halted CPU
    /// (``VirtualCosts/timerWakeNanos(idleFor:)``, measured for how long the
    /// CPU had idled; a CPU idle for less than a context switch has not
    /// halted yet and costs nothing); when another thread runs there, as any
    /// wake-up from that CPU (``placeWoken(_:at:)``: an idle CPU through an
    /// IPI, else a queue). A sleeper still on that CPU's queue (delayed) is
    /// put back in place.
    func placeTimerWoken(_ t: EmulatedThread) {
        if t.delayed { requeueDelayed(t); return }
        let c = t.lastCPU
        // A cost table without the measurement: the sleeper is placed as before it existed.
        guard !configuration.costs.timerWake.isEmpty else { place(t); return }
        guard cpus[c].running == nil else {
            placeWoken(t, at: t.clock)
            return
        }
        let since = cpus[c].idleSince
        let idleFor = t.clock >= since ? t.clock - since : 0
        if idleFor >= configuration.costs.contextSwitch {
            t.clock &+= configuration.costs.timerWakeNanos(idleFor: idleFor)
        }
        place(t)
    }

    /// A thread `me` woke (try_to_wake_up()): like ``place(_:)``, with the
    /// wake-up's latency. Onto an idle CPU that has halted, the machine's
    /// wake-up latency (``VirtualCosts/wake``, measured on a CPU idle for
    /// milliseconds); onto one that went idle less than a context switch ago
    /// (still switching to its idle task: the IPI finds it running), the
    /// IPI's receipt and the switch back; queued behind a running thread, none
    /// (it runs when its CPU picks it, one context switch later).
    func placeWoken(_ t: EmulatedThread, by me: EmulatedThread) {
        placeWoken(t, at: me.clock)
    }

    /// ``placeWoken(_:by:)`` for a wake-up at virtual time `now` on a CPU
    /// that is busy (or the waker's).
    func placeWoken(_ t: EmulatedThread, at now: UInt64) {
        t.clock = max(t.clock, now)
        if t.delayed { requeueDelayed(t); return }
        let idle = idleCPU(for: t)
        guard idle >= 0 else {
            place(t)
            return
        }
        let costs = configuration.costs
        let since = cpus[idle].idleSince
        let halted = now >= since && now - since >= costs.contextSwitch
        t.clock = max(t.clock, now &+ (halted ? costs.wake : costs.ipiReceipt &+ costs.contextSwitch))
        place(t)
    }

    /// `t` gets CPU `c` at its clock (`set_next_entity()`: its slice is
    /// protected until its deadline).
    func run(_ t: EmulatedThread, on c: Int) {
        if cpus[c].running == nil, configuration.wakePlacement == .sharedCache { noteUtilisation(c, at: t.clock, busy: true) }
        cpus[c].running = t.index
        t.cpu = c
        t.lastCPU = c
        t.execStart = t.clock
        t.sliceProtected = true
        let tick = configuration.tickNanos
        cpus[c].nextTick = tick > 0 ? (t.clock / tick &+ 1) &* tick : 0
    }

    /// The running thread `me` blocked or finished at its clock
    /// (`dequeue_entity()` with DEQUEUE_SLEEP): a blocked thread that is not
    /// eligible stays on the run queue, delayed (DELAY_DEQUEUE); else it
    /// leaves with its lag. Its CPU goes to the next pick.
    func vacate(_ me: EmulatedThread) {
        let c = me.cpu
        me.cpu = -1
        CPUSet.unbindCallingThreadForSwitch()
        updateCurr(c)
        if me.state == .blocked {
            if eligible(c, me.vruntime) {
                me.vlag = entityLag(c, me)
            } else {
                me.delayed = true
                cpus[c].queue.append(me.index)
            }
        }
        cpus[c].running = nil
        _ = dispatch(c, at: me.clock)
    }

    /// `me` reschedules at a preemption point (its need-resched flag set):
    /// its CPU picks again, and when it picks another thread `me` waits on
    /// the run queue.
    func requeue(_ me: EmulatedThread) {
        let c = me.cpu
        updateCurr(c)
        if dispatch(c, at: me.clock) {
            me.cpu = -1
            CPUSet.unbindCallingThreadForSwitch()
        }
    }

    /// CPU `c` picks its next thread at `time` (`pick_next_entity()`):
    /// its running thread (one that reschedules) goes on when it is the pick
    /// (no switch), else goes back to the queue; a delayed thread picked leaves
    /// the queue (its dequeue finishes) and the CPU picks again; the thread
    /// picked runs one context switch later. With nothing to run the CPU
    /// pulls the first thread of the longest other queue
    /// (`sched_balance_newidle()`), else goes idle. Returns whether the
    /// running thread changed.
    func dispatch(_ c: Int, at time: UInt64) -> Bool {
        cpus[c].needResched = false
        while let i = pickEEVDF(c) {
            let t = threads[i]
            if t.delayed {
                finishDelayedDequeue(t, c)
                continue
            }
            if i == cpus[c].running { return false }
            cpus[c].queue.remove(at: cpus[c].queue.firstIndex(of: i)!)
            if let prev = cpus[c].running { cpus[c].queue.append(prev) }
            t.clock = max(t.clock, time) &+ configuration.costs.contextSwitch
            cpus[c].switches &+= 1
            run(t, on: c)
            return true
        }
        // A delayed thread is asleep; one that ran within the migration cost
        // is cache hot, and a newly idle balance leaves it (can_migrate_task()).
        func movable(_ i: Int) -> Bool {
            let t = threads[i]
            return !t.delayed && time >= t.execStart && time - t.execStart >= Self.migrationCostNanos
        }
        var source = c, most = 0
        for o in cpus.indices where o != c {
            let n = cpus[o].queue.reduce(0) { $0 + (movable($1) ? 1 : 0) }
            if n > most { (source, most) = (o, n) }
        }
        guard most > 0, let i = cpus[source].queue.first(where: movable) else {
            if configuration.wakePlacement == .sharedCache { noteUtilisation(c, at: time, busy: false) }
            cpus[c].running = nil
            cpus[c].idleSince = time
            // An idle CPU does not stall: keep the busy time left until its next stall.
            if cpus[c].nextStall != .max {
                cpus[c].idleStallLeft = cpus[c].nextStall > time ? cpus[c].nextStall - time : 0
            }
            return true
        }
        let next = threads[i]
        migrate(next, from: source, to: c)
        next.clock = max(next.clock, time) &+ configuration.costs.contextSwitch
        cpus[c].switches &+= 1
        run(next, on: c)
        return true
    }

    /// `sysctl_sched_migration_cost`: a thread that ran this recently is
    /// cache hot (`task_hot()`), 6.12's default 0.5 ms.
    static let migrationCostNanos: UInt64 = 500_000

    /// Whether `me`'s CPU has its need-resched flag set (the kernel's
    /// need_resched()): by the tick (its slice used up, another thread
    /// waiting) or by a wake-up that preempts it.
    func needsResched(_ me: EmulatedThread) -> Bool {
        me.cpu >= 0 && cpus[me.cpu].needResched
    }

    /// Whether the preemption model acts on a need-resched flag at a
    /// scheduling point of `me`: every point with ``PreemptionModel/full``;
    /// else only outside a fault handler (user space, or the return to it;
    /// the kernel's own points where it may sleep take the flag in
    /// ``mightSleep()``).
    @inline(__always)
    func preemptionPoint(_ me: EmulatedThread) -> Bool {
        configuration.preemption == .full || me.inKernel == 0
    }

    /// Whether `me` may be preempted here: it holds no spinning lock
    /// (preempt_disable) and is not inside an emulated access.
    func preemptible(_ me: EmulatedThread) -> Bool {
        for l in me.held where !l.sleeping { return false }
        return !CPUSet.callingThreadInsideAccess()
    }

    /// Whether the thread of task token `task` runs on a CPU now (the
    /// kernel's owner_on_cpu()): without the CPU model, every runnable
    /// thread has one.
    func onCPU(task: UInt, asked me: EmulatedThread) -> Bool {
        for t in threads where UInt(bitPattern: Unmanaged.passUnretained(t).toOpaque()) == task {
            guard t.state == .runnable else { return false }
            return cpus.isEmpty ? t.asleepUntil <= me.clock : t.cpu >= 0
        }
        return false
    }

    /// Stalls of `me`'s CPU that came due by its clock: each stops the CPU
    /// (and `me` on it) for a drawn time, then the next is drawn.
    ///
    /// With ``Configuration/stallsOneBusy`` a CPU whose every other CPU is
    /// idle stalls by those figures, else by `stalls`: the stalls come at the
    /// higher of the two rates, and a due one is kept at the share of the
    /// rate of the CPUs' state at that time (thinning: a Poisson process
    /// whose rate follows the state), its length drawn from that state's
    /// figures.
    func stall(_ me: EmulatedThread, _ stalls: CPUStalls) {
        let c = me.cpu
        let alone = configuration.stallsOneBusy
        let top = stallDrawRate(stalls)
        while cpus[c].nextStall <= me.clock {
            var figures = stalls
            if let alone {
                if !cpus.indices.contains(where: { $0 != c && cpus[$0].running != nil }) { figures = alone }
                if unit() * top >= figures.ratePerSecond {
                    cpus[c].nextStall &+= stalls.interval(uniform: unit(), ratePerSecond: top)
                    continue
                }
            }
            let pause = figures.duration(uniform: unit())
            me.clock &+= pause
            cpus[c].stalls &+= 1
            cpus[c].stalledNanos &+= pause
            cpus[c].nextStall = me.clock &+ stalls.interval(uniform: unit(), ratePerSecond: top)
        }
    }

    /// The rate the CPUs' stalls are drawn at: the higher of the two states'
    /// (``stall(_:_:)``).
    func stallDrawRate(_ stalls: CPUStalls) -> Double {
        max(stalls.ratePerSecond, configuration.stallsOneBusy?.ratePerSecond ?? 0)
    }

    /// A seeded uniform value in [0, 1).
    func unit() -> Double { Double(rng.next() >> 11) / Double(UInt64(1) << 53) }

    /// Stalls of the CPUs so far, and their virtual time.
    public var cpuStalls: (count: UInt64, nanos: UInt64) {
        cpus.reduce((0, 0)) { ($0.0 + $1.stalls, $0.1 + $1.stalledNanos) }
    }

    /// Context switches the CPUs made so far.
    public var contextSwitches: UInt64 { cpus.reduce(0) { $0 + $1.switches } }

    /// Tick interrupts so far whose handler took a running thread's time
    /// (``Configuration/tickInterrupt``), and that time.
    public var tickInterrupts: (count: UInt64, nanos: UInt64) {
        cpus.reduce((0, 0)) { ($0.0 + $1.tickInterrupts, $0.1 + $1.tickInterruptNanos) }
    }
}

/// The hooks of the kernel's sleeping locks (``KernelMutex``) and of the
/// costs a machine profile adds.
extension DeterministicScheduler {
    /// A cost of the calling emulated thread (a scheduling point) when the
    /// run's cost table gives it one; nothing otherwise.
    @usableFromInline @inline(never)
    static func charge(_ cost: KeyPath<VirtualCosts, UInt64>, _ event: StaticString) {
        guard let t = current else { return }
        let nanos = t.scheduler.configuration.costs[keyPath: cost]
        guard nanos > 0 else { return }
        t.scheduler.point(t, cost: nanos, event)
    }

    /// The CPU the scheduler's CPU model runs the calling emulated thread
    /// on, or nil (no model, not an emulated thread, an observer).
    static func modelCPU() -> Int? {
        guard let t = current, t.cpu >= 0 else { return nil }
        return t.cpu
    }

    /// The calling emulated thread's task token, or nil on any other thread.
    @usableFromInline @inline(never)
    static func currentTask() -> UInt? {
        guard let raw = svm_det_current() else { return nil }
        return UInt(bitPattern: raw)
    }

    /// Whether the thread of `task` is on a CPU (owner_on_cpu()), asked by
    /// an emulated thread; true on other threads (their host decides).
    @usableFromInline @inline(never)
    static func taskOnCPU(_ task: UInt) -> Bool {
        guard let t = current else { return true }
        return t.scheduler.onCPU(task: task, asked: t)
    }

    /// need_resched() of the calling emulated thread: false on other threads.
    @usableFromInline @inline(never)
    static func needResched() -> Bool {
        guard let t = current, !t.scheduler.cpus.isEmpty else { return false }
        return t.scheduler.needsResched(t)
    }

    /// A sleeping lock's event on the calling emulated thread: like a
    /// spinning lock's, but holding it leaves the thread preemptible.
    @usableFromInline @inline(never)
    static func sleepingLockEvent(_ lock: UnsafeRawPointer, _ event: Int32) {
        guard let t = current else { return }
        t.scheduler.lockEvent(t, lock, event | Int32(SVM_DET_SLEEPING))
    }

    /// The next futex wait of the calling emulated thread waits for `lock`
    /// (for deadlock reports).
    @usableFromInline @inline(never)
    static func willWait(for lock: UnsafeRawPointer) {
        guard let t = current else { return }
        t.pendingLockWait = lock
    }

    /// One round of an optimistic spin by the calling emulated thread (a
    /// scheduling point costing ``VirtualCosts/spinRound``).
    @usableFromInline @inline(never)
    static func spinRound() {
        guard let t = current else { return }
        // Preemption is off while a mutex spins (it stops on need_resched() itself).
        t.scheduler.point(t, cost: t.scheduler.configuration.costs.spinRound, "spin", mayPreempt: false)
    }

    /// A `might_sleep()` call site: ``mightSleep()`` when a deterministic
    /// scheduler runs; otherwise one load and a predictable branch.
    @inlinable @inline(__always)
    static func mightSleepPoint() {
        if _slowPath(svm_det_active()) { mightSleep() }
    }

    /// `might_sleep()` of the calling emulated thread (`mutex_lock()`,
    /// `down_read()`, `folio_lock()`): with the CPU model and voluntary
    /// preemption, where a pending reschedule is taken
    /// (`might_resched()`); no scheduling point otherwise.
    @usableFromInline @inline(never)
    static func mightSleep() {
        withCurrent { t in
            let s = t.scheduler
            guard t.cpu >= 0, s.cpus[t.cpu].needResched, s.configuration.preemption != .none,
                  s.preemptible(t) else { return }
            s.step &+= 1
            s.requeue(t)
            s.reschedule(t, "might_sleep")
        }
    }

    /// The calling emulated thread returns from a fault handler to user
    /// space (the preemption model's return-to-user point comes with its
    /// next scheduling point).
    @usableFromInline @inline(never)
    static func faultReturned() {
        withCurrent { t in if t.inKernel > 0 { t.inKernel -= 1 } }
    }
}
