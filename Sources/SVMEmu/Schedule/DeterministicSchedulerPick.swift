import Synchronization
import CSVMSupport

// The deterministic scheduler's scheduling: a scheduling point, preemption,
// the switch between emulated threads and the pick of the next one. The
// run and its set-up are DeterministicScheduler.swift.
extension DeterministicScheduler {
    /// A scheduling point of the running thread `me`, costing `cost` ns.
    func point(_ me: EmulatedThread, cost: UInt64, _ event: StaticString, release: Bool = false,
               mayPreempt: Bool = true) {
        me.clock &+= jittered(cost)
        step &+= 1
        if let next = preemptSteps.first, step >= next {
            preemptSteps.removeFirst()
            preempt(me)
        } else if release, configuration.releasePreemptionPercent > 0,
                  rng.next() % 100 < configuration.releasePreemptionPercent {
            preempt(me)
        }
        if me.cpu >= 0 {
            if let stalls = configuration.stalls { stall(me, stalls) }
            if me.clock >= cpus[me.cpu].nextTick { tick(me) }
            if mayPreempt, cpus[me.cpu].needResched, preemptionPoint(me), preemptible(me) {
                requeue(me)
            }
        }
        reschedule(me, event)
    }

    /// PCT's preemption: `me` is delayed and drops below every other thread.
    func preempt(_ me: EmulatedThread) {
        me.clock &+= rng.next() % (configuration.maxPreemptionNanos + 1)
        lowestPriority -= 1
        me.priority = lowestPriority
    }

    func jittered(_ cost: UInt64) -> UInt64 {
        let j = configuration.jitterPercent
        guard j > 0, cost > 0 else { return cost }
        let span = cost * j / 100
        guard span > 0 else { return cost }
        return cost - span + rng.next() % (2 * span + 1)
    }

    /// Passes control to the thread that should run next; returns when `me`
    /// runs again (at once when that is `me`).
    func reschedule(_ me: EmulatedThread, _ event: StaticString) {
        if me.cpu >= 0, me.state != .runnable { vacate(me) }
        guard let next = pick(from: me) else {
            deadlocked(me)
            endRun(from: me)
        }
        next._withUnsafeGuaranteedRef { record($0, event); switchTo($0, from: me) }
    }

    /// Passes control from the running thread `me` to `next` (nothing when
    /// `next` is `me`); returns when a thread switches back to `me`. The only
    /// place where control moves between emulated threads (besides the end
    /// of the run, ``endRun(from:)``).
    @inline(__always)
    func switchTo(_ next: EmulatedThread, from me: EmulatedThread) {
        // A run its caller abandoned (host timeout) stops at its next point.
        if _slowPath(UnsafeAtomic(doneWord).load(ordering: .relaxed) == 2) { endRun(from: me) }
        if next === me { return }
        svm_fiber_switch(me.fiber, next.fiber)
    }

    /// Ends the run on the running thread `me` (which never runs again):
    /// back to the scheduler's host thread.
    func endRun(from me: EmulatedThread) -> Never {
        svm_fiber_switch(me.fiber, hostFiber)
        contractViolation("DeterministicScheduler: a thread of an ended run (\(me.name)) ran again")
    }

    @inline(__always)
    func record(_ next: EmulatedThread, _ event: StaticString) {
        if _slowPath(configuration.logSteps > 0) { appendStep(next, event) }
    }

    @inline(never)
    func appendStep(_ next: EmulatedThread, _ event: StaticString) {
        // Trimmed in halves of its length (amortized O(1) a step), keeping at least logSteps.
        if log.count >= 2 * configuration.logSteps { log.removeFirst(log.count - configuration.logSteps) }
        log.append(Step(step: step, thread: next.name, clock: next.clock, event: "\(event)"))
    }

    /// The thread to run next (`me` when it should go on), with a timed-out
    /// waiter made runnable; nil when none can run (a deadlock, or the end).
    func pick(from me: EmulatedThread?) -> Unmanaged<EmulatedThread>? {
        if !cpus.isEmpty { return pickOnCPUs(from: me) }
        var bestTime: UInt64 = .max
        var waitingForever = 0, working = 0
        var bestIndex = -1, bestPriority = 0  // by index: no retain per thread looked at
        threads.withUnsafeBufferPointer { buf in
            for i in buf.indices where buf[i] !== me {
                let time: UInt64
                switch buf[i].state {
                case .runnable: time = buf[i].clock
                case .blocked:
                    if let d = buf[i].deadline { time = max(buf[i].clock, d) } else {
                        if !buf[i].observer { waitingForever += 1; working += 1 }
                        continue
                    }
                case .finished: continue
                }
                if !buf[i].observer { working += 1 }
                if bestIndex < 0 || time < bestTime || (time == bestTime && buf[i].priority > bestPriority) {
                    (bestIndex, bestTime, bestPriority) = (i, time, buf[i].priority)
                }
            }
        }
        var best: Unmanaged<EmulatedThread>? = bestIndex >= 0 ? threads.withUnsafeBufferPointer { .passUnretained($0[bestIndex]) } : nil  // `threads` holds it
        if let me, weighCaller(me, canRun: true, &best, &bestTime, bestPriority, &working, &waitingForever) {
            return .passUnretained(me)
        }
        // Only observers (or nobody) could go on while the others wait for ever.
        if waitingForever > 0 && waitingForever == working { return nil }
        best?._withUnsafeGuaranteedRef { b in
            guard b.state == .blocked else { return }
            b.state = .runnable
            b.timedOut = true
            b.clock = bestTime
            b.waitWord = nil
            b.deadline = nil
        }
        return best
    }

    /// The calling thread `me` weighed against the best other candidate
    /// (`best` at `bestTime`), for ``pick(from:)`` and the CPU model's pick:
    /// true when `me` goes on (runnable, allowed to run now, `canRun`, and
    /// not later than the best by more than a quantum); a blocked `me` with
    /// a timeout competes by that time and may become `best`. Counts `me` in
    /// `working` and `waitingForever` as the loop over the others counts them.
    @inline(__always)
    func weighCaller(_ me: EmulatedThread, canRun: Bool, _ best: inout Unmanaged<EmulatedThread>?, _ bestTime: inout UInt64,
                     _ bestPriority: Int, _ working: inout Int, _ waitingForever: inout Int) -> Bool {
        switch me.state {
        case .runnable:
            if !me.observer { working += 1 }
            return canRun && (best == nil || me.clock <= bestTime &+ configuration.quantumNanos)
        case .blocked:
            if let d = me.deadline {
                if !me.observer { working += 1 }
                let time = max(me.clock, d)
                if best == nil || time < bestTime || (time == bestTime && me.priority >= bestPriority) {
                    best = .passUnretained(me)
                    bestTime = time
                }
            } else if !me.observer {
                waitingForever += 1
                working += 1
            }
            return false
        case .finished:
            return false
        }
    }
}
