/// EEVDF on each CPU of the CPU model (``DeterministicScheduler/Configuration/cpus``),
/// as 6.12's kernel/sched/fair.c runs it for tasks of one weight (nice 0,
/// no groups): a virtual runtime that advances as the thread runs, a
/// virtual deadline one slice (`sysctl_sched_base_slice`) ahead, and a lag
/// (the queue's average vruntime minus the thread's) that a thread keeps
/// while it sleeps. A CPU runs the eligible thread (lag at least 0) with
/// the earliest deadline.
///
/// The features are 6.12's defaults (kernel/sched/features.h): PLACE_LAG,
/// PLACE_DEADLINE_INITIAL, PLACE_REL_DEADLINE, RUN_TO_PARITY, PREEMPT_SHORT
/// (no thread has a shorter slice here, so it only reschedules a thread
/// that lost its slice's protection and its eligibility), DELAY_DEQUEUE and
/// DELAY_ZERO, WAKEUP_PREEMPTION; NEXT_BUDDY off.
///
/// The run queue's entities are its running thread (`cfs_rq->curr`, kept
/// out of the queue as the kernel keeps it out of its tree) and `queue`
/// (the tree, in insertion order: among equal deadlines the earlier one
/// comes first, as in the kernel's tree). All weights are equal, so the
/// weighted sums of the kernel are plain sums here.
extension DeterministicScheduler {

    /// How many threads CPU `c`'s run queue has, its running one included
    /// (`cfs_rq->nr_running`: delayed ones count).
    @inline(__always)
    func nrRunning(_ c: Int) -> Int { cpus[c].queue.count &+ (cpus[c].running == nil ? 0 : 1) }

    /// The sum of the vruntimes on CPU `c`'s run queue and their count.
    @inline(__always)
    func vruntimeSum(_ c: Int) -> (sum: Int64, count: Int64) {
        var sum: Int64 = 0, n: Int64 = 0
        if let r = cpus[c].running { sum &+= threads[r].vruntime; n &+= 1 }
        for i in cpus[c].queue { sum &+= threads[i].vruntime; n &+= 1 }
        return (sum, n)
    }

    /// The average vruntime of CPU `c`'s run queue, rounded down (the
    /// kernel's `avg_vruntime()`); an empty queue keeps the last one.
    func averageVruntime(_ c: Int) -> Int64 {
        let (sum, n) = vruntimeSum(c)
        guard n > 0 else { return cpus[c].zeroVruntime }
        var v = sum / n
        if sum % n != 0 && sum < 0 { v -= 1 }
        cpus[c].zeroVruntime = v
        return v
    }

    /// Whether a thread with vruntime `v` is eligible on CPU `c`'s run
    /// queue: at most the queue's exact average (`vruntime_eligible()`).
    func eligible(_ c: Int, _ v: Int64) -> Bool {
        let (sum, n) = vruntimeSum(c)
        return n == 0 || sum >= n &* v
    }

    /// The lag of `t`, on CPU `c`'s run queue, bounded by two slices (at
    /// least a tick) either way (`entity_lag()`).
    func entityLag(_ c: Int, _ t: EmulatedThread) -> Int64 {
        let limit = Int64(max(2 &* slice, configuration.tickNanos))
        return min(max(averageVruntime(c) &- t.vruntime, -limit), limit)
    }

    /// Brings the running thread of CPU `c` up to its clock
    /// (`update_curr()`): its vruntime grows by the time it ran; at its
    /// deadline it gets a new one a slice further (`update_deadline()`),
    /// which ends its slice's protection. With another thread on the queue,
    /// a new deadline, or an unprotected running thread that is no longer
    /// eligible (`did_preempt_short()`), sets the need-resched flag.
    ///
    /// `now` is when it is asked (a wake-up from another CPU): a running
    /// thread whose clock is already past it is counted up to `now` only.
    func updateCurr(_ c: Int, at now: UInt64 = .max) {
        guard let r = cpus[c].running else { return }
        let t = threads[r]
        let upTo = min(t.clock, now)
        guard upTo > t.execStart else { return }
        t.vruntime &+= Int64(upTo - t.execStart)
        t.execStart = upTo
        var resched = false
        if t.vruntime >= t.vdeadline {
            t.vdeadline = t.vruntime &+ Int64(slice)
            t.sliceProtected = false
            resched = true
        }
        guard nrRunning(c) > 1 else { return }
        if resched || (!t.sliceProtected && !eligible(c, t.vruntime)) { cpus[c].needResched = true }
    }

    /// The tick of `me`'s CPU (`task_tick_fair()`, `entity_tick()`): the
    /// running thread brought up to date, which may set its need-resched flag.
    ///
    /// With a ``Configuration/tickInterrupt``, each tick of the grid that
    /// came due since the last one (in the CPU's busy time: the grid starts
    /// anew when a thread gets the CPU) takes its handler's time from `me`
    /// first, for the measured share of ticks. The kernel's tick is an
    /// interrupt (`hrtimer_interrupt()`, `tick_nohz_handler()`,
    /// `update_process_times()`, then the softirqs at `irq_exit()`) run on
    /// the interrupted task's time, and without `CONFIG_IRQ_TIME_ACCOUNTING`
    /// (the rig's config) the task's clock (`rq_clock_task()`) counts it:
    /// its vruntime grows by it too, as the update here does.
    func tick(_ me: EmulatedThread) {
        let c = me.cpu, tick = configuration.tickNanos
        if tick > 0, let irq = configuration.tickInterrupt {
            var due = cpus[c].nextTick
            // The handler's time can bring further ticks due.
            while due <= me.clock {
                if irq.share >= 1 || (irq.share > 0 && unit() < irq.share) {
                    me.clock &+= irq.nanos
                    cpus[c].tickInterrupts &+= 1
                    cpus[c].tickInterruptNanos &+= irq.nanos
                }
                due &+= tick
            }
        }
        cpus[c].nextTick = tick > 0 ? (me.clock / tick &+ 1) &* tick : 0
        updateCurr(c)
    }

    /// Places `t` on CPU `c`'s run queue before it joins it
    /// (`place_entity()`): at the queue's average vruntime minus its lag,
    /// the lag scaled up by the queue's load with it over without it
    /// (PLACE_LAG: so that the lag it had survives its own arrival); an
    /// empty queue takes no lag. Its deadline: the relative one it kept
    /// when it was moved (PLACE_REL_DEADLINE), else a slice ahead, half a
    /// slice for a new thread (PLACE_DEADLINE_INITIAL).
    func placeEntity(_ t: EmulatedThread, on c: Int, initial: Bool = false) {
        let v = averageVruntime(c)
        let n = Int64(nrRunning(c))
        let lag: Int64 = n > 0 ? t.vlag &* (n &+ 1) / n : 0
        t.vruntime = v &- lag
        if t.relativeDeadline {
            t.vdeadline &+= t.vruntime
            t.relativeDeadline = false
            return
        }
        t.vdeadline = t.vruntime &+ Int64(initial ? slice / 2 : slice)
    }

    /// The thread CPU `c` should run (`pick_eevdf()`), or nil with an
    /// empty queue: alone, the one there is; the running thread while it is
    /// eligible and its slice protected (RUN_TO_PARITY); else the eligible
    /// thread with the earliest deadline, the running one on a tie.
    func pickEEVDF(_ c: Int) -> Int? {
        let queue = cpus[c].queue
        var curr = cpus[c].running
        if queue.count &+ (curr == nil ? 0 : 1) <= 1 { return curr ?? queue.first }
        let (sum, n) = vruntimeSum(c)
        @inline(__always) func isEligible(_ i: Int) -> Bool { sum >= n &* threads[i].vruntime }
        if let r = curr, !isEligible(r) { curr = nil }
        if let r = curr, threads[r].sliceProtected { return r }
        var best = -1
        for i in queue where isEligible(i) && (best < 0 || threads[i].vdeadline < threads[best].vdeadline) { best = i }
        if let r = curr, best < 0 || threads[r].vdeadline < threads[best].vdeadline { return r }
        if best >= 0 { return best }
        // Rounding left nothing eligible: the earliest deadline.
        for i in queue where best < 0 || threads[i].vdeadline < threads[best].vdeadline { best = i }
        return best
    }

    /// A woken `t` joins busy CPU `c`'s run queue (`enqueue_entity()` with
    /// ENQUEUE_WAKEUP): the running thread brought up to date, `t` placed
    /// with its lag, then the wake-up's preemption check.
    func enqueueWoken(_ t: EmulatedThread, on c: Int) {
        updateCurr(c, at: t.clock)
        placeEntity(t, on: c)
        cpus[c].queue.append(t.index)
        wakeupPreempt(c, t)
    }

    /// The wake-up preemption check for `t` on CPU `c`
    /// (`check_preempt_wakeup_fair()`): unless the flag is set already, the
    /// running thread is brought up to date and, when `t` is now the pick,
    /// its need-resched flag is set. The running thread goes on until the
    /// preemption model takes the flag (``PreemptionModel``).
    func wakeupPreempt(_ c: Int, _ t: EmulatedThread) {
        guard let r = cpus[c].running, r != t.index, !cpus[c].needResched else { return }
        updateCurr(c, at: t.clock)
        if pickEEVDF(c) == t.index { cpus[c].needResched = true }
    }

    /// A delayed thread woken (`ttwu_runnable()`, `requeue_delayed_entity()`):
    /// it is still on its CPU's run queue and stays there, at its place
    /// unless its lag has become positive, which DELAY_ZERO drops (placed
    /// again with none); then the wake-up's preemption check.
    func requeueDelayed(_ t: EmulatedThread) {
        let c = t.lastCPU
        t.delayed = false
        if entityLag(c, t) > 0 {
            cpus[c].queue.remove(at: cpus[c].queue.firstIndex(of: t.index)!)
            t.vlag = 0
            placeEntity(t, on: c)
            cpus[c].queue.append(t.index)
        }
        wakeupPreempt(c, t)
    }

    /// A delayed thread the CPU picked leaves the run queue for good
    /// (`dequeue_entities()` with DEQUEUE_DELAYED): its lag then, none when
    /// positive (DELAY_ZERO).
    func finishDelayedDequeue(_ t: EmulatedThread, _ c: Int) {
        t.vlag = min(entityLag(c, t), 0)
        cpus[c].queue.remove(at: cpus[c].queue.firstIndex(of: t.index)!)
        t.delayed = false
    }

    /// A queued `t` moves from CPU `from`'s run queue to CPU `to`'s (a
    /// balance: `detach_task()`, `attach_task()`): it leaves with its lag and
    /// its deadline relative to its vruntime (not asleep: PLACE_REL_DEADLINE)
    /// and is placed on the new queue with them.
    func migrate(_ t: EmulatedThread, from: Int, to: Int) {
        t.vlag = entityLag(from, t)
        t.vdeadline &-= t.vruntime
        t.relativeDeadline = true
        cpus[from].queue.remove(at: cpus[from].queue.firstIndex(of: t.index)!)
        placeEntity(t, on: to)
        t.lastCPU = to
    }
}

