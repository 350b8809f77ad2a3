import SVMEmu
import Synchronization
import Testing
import TestSupport

/// The deterministic scheduler's CPU model: more threads than CPUs share
/// them (run queues, slices, context switches), sleepers give their CPU
/// away, spinners keep it.
@Suite("CPU model")
struct CPUModelTests {

    final class Clocks: @unchecked Sendable {
        let lock = KernelMutex("clocks")
        var ends: [String: UInt64] = [:]
        var order: [String] = []
        func end(_ name: String) { lock.withLock { ends[name] = HostClock.nanos() } }
        func took(_ name: String) { order.append(name) }
    }

    static func configuration(cpus: Int, seed: UInt64 = 1) -> DeterministicScheduler.Configuration {
        var c = DeterministicScheduler.Configuration(seed: seed)
        c.cpus = cpus
        c.preemptions = 0
        c.jitterPercent = 0
        return c
    }

    @Test("four spinners on one CPU take four times as long as on four CPUs; slices preempt at ticks")
    func spinnersShareACPU() throws {
        func run(cpus: Int) -> (end: UInt64, switches: UInt64) {
            let clocks = Clocks()
            let s = DeterministicScheduler(Self.configuration(cpus: cpus))
            for i in 0..<4 {
                s.spawn("t\(i)") {
                    for _ in 0..<100 { HostClock.spin(nanos: 50_000) }   // 5 ms of spinning
                    clocks.end("t\(i)")
                }
            }
            #expect(s.run() == .completed)
            return (clocks.ends.values.max()! - 1_000_000_000, s.contextSwitches)
        }
        let one = run(cpus: 1), four = run(cpus: 4)
        #expect(four.end >= 5_000_000 && four.end < 5_200_000, "each thread on its own CPU: 5 ms")
        #expect(four.switches == 0)
        #expect(one.end >= 20_000_000 && one.end < 21_000_000, "one CPU: 20 ms of work in turn, plus switches")
        // One CPU: the slice is 0.75 ms, noticed at the next 1 ms tick: about 20 switches.
        #expect(one.switches >= 15 && one.switches <= 25, "\(one.switches) context switches")
    }

    @Test("a sleeper gives its CPU away; a spinner keeps it")
    func sleepersYieldTheirCPU() throws {
        for sleeps in [true, false] {
            let clocks = Clocks()
            let s = DeterministicScheduler(Self.configuration(cpus: 1))
            s.spawn("waiter") {
                if sleeps { HostClock.sleep(nanos: 1_000_000) } else { HostClock.spin(nanos: 1_000_000) }
                clocks.end("waiter")
            }
            s.spawn("worker") {
                HostClock.spin(nanos: 100_000)
                clocks.end("worker")
            }
            #expect(s.run() == .completed)
            let worker = clocks.ends["worker"]! - 1_000_000_000
            if sleeps {
                #expect(worker < 200_000, "the worker ran while the waiter slept: \(worker) ns")
            } else {
                #expect(worker >= 1_000_000, "the spinner kept the only CPU: \(worker) ns")
            }
        }
    }

    @Test("usleep_range(min, max) ends at the first tick at or after min, else at max; a range beyond a tick at max")
    func rangeSleepEndsAtATick() throws {
        // The virtual clock starts at 1 s, on the 1 ms tick grid. Each case:
        // spin to a phase of the tick, sleep the range, and read how long it took.
        func slept(phase: UInt64, min: UInt64, max: UInt64) -> UInt64 {
            let took = Mutex<UInt64>(0)
            let s = DeterministicScheduler(Self.configuration(cpus: 1))
            s.spawn("sleeper") {
                HostClock.spin(nanos: phase)
                let start = HostClock.nanos()
                HostClock.sleepRange(minNanos: min, maxNanos: max)
                let end = HostClock.nanos()
                took.withLock { $0 = end - start }
            }
            #expect(s.run() == .completed)
            return took.withLock { $0 }
        }
        let near = 20_000 as UInt64   // the points' own small costs
        // From 0.85 ms: the window 0.95-1.05 ms holds the tick at 1 ms.
        let atTick = slept(phase: 850_000, min: 100_000, max: 200_000)
        #expect(atTick >= 150_000 && atTick < 150_000 + near, "woke at the tick: \(atTick) ns")
        // From 0.1 ms: no tick in 0.2-0.3 ms, so the hard expiry.
        let atMax = slept(phase: 100_000, min: 100_000, max: 200_000)
        #expect(atMax >= 200_000 && atMax < 200_000 + near, "woke at max: \(atMax) ns")
        // A range longer than a tick ends at its maximum.
        let long = slept(phase: 100_000, min: 600_000, max: 1_200_000)
        #expect(long >= 1_200_000 && long < 1_200_000 + near, "woke at max: \(long) ns")
    }

    @Test("threads beyond the CPUs touch memory on the CPU the scheduler gives them")
    func memoryOnSharedCPUs() throws {
        var config = KernelConfiguration()
        config.cpus = 2
        config.nodeSizes = [64 << 20]
        let kernel = try Kernel(booting: config)
        let mm = try AddressSpace(kernel: kernel)
        let base = try mm.mmap(length: 8 * 4096)
        kernel.cpus.leave()
        let s = DeterministicScheduler(Self.configuration(cpus: 2))
        let bad = Atomic<Int>(0)
        for i in 0..<8 {
            s.spawn("t\(i)") {
                for round in 0..<20 {
                    let a = base + UInt64(i) * 4096
                    do {
                        try mm.store64(a, UInt64(i * 1000 + round))
                        if try mm.load64(a) != UInt64(i * 1000 + round) { bad.add(1, ordering: .relaxed) }
                    } catch { bad.add(1, ordering: .relaxed) }
                    HostClock.sleep(nanos: 10_000)
                }
            }
        }
        #expect(s.run() == .completed)
        #expect(bad.load(ordering: .relaxed) == 0)
        #expect(kernel.cpus.boundCount == 0, "every CPU given back")
        #expect(kernel.diagnostics.isEmpty, "\(kernel.diagnostics)")
    }
}

/// The kernel mutex's algorithm (kernel/locking/mutex.c).
@Suite("kernel mutex")
struct KernelMutexAlgorithmTests {

    @Test("a woken waiter that loses the lock to a newcomer gets it handed over at the next unlock")
    func handoff() throws {
        let mutex = KernelMutex("handoff")
        let clocks = CPUModelTests.Clocks()
        var c = CPUModelTests.configuration(cpus: 4)
        c.costs.wake = 20_000   // a slow wake-up: the unlocker comes back first
        let s = DeterministicScheduler(c)
        s.spawn("holder") {
            mutex.lock()
            clocks.took("holder")
            HostClock.sleep(nanos: 100_000)   // the waiter queues and sleeps meanwhile
            mutex.unlock()
            // Straight back: the waiter is still waking up, so this steals the lock.
            mutex.lock()
            clocks.took("holder again")
            HostClock.sleep(nanos: 100_000)   // the waiter wakes, loses, asks for the handoff, sleeps
            mutex.unlock()
            // The lock was handed to the waiter: this one waits now.
            mutex.lock()
            clocks.took("holder last")
            mutex.unlock()
        }
        s.spawn("waiter") {
            HostClock.sleep(nanos: 10_000)
            mutex.lock()
            clocks.took("waiter")
            HostClock.sleep(nanos: 10_000)
            mutex.unlock()
        }
        #expect(s.run() == .completed)
        #expect(clocks.order == ["holder", "holder again", "waiter", "holder last"])
        #expect(!mutex.isLocked)
    }

    @Test("waiters queue first come, first served")
    func fifo() throws {
        let mutex = KernelMutex("fifo")
        let clocks = CPUModelTests.Clocks()
        let s = DeterministicScheduler(CPUModelTests.configuration(cpus: 8))
        s.spawn("holder") {
            mutex.lock()
            HostClock.sleep(nanos: 1_000_000)
            mutex.unlock()
        }
        for i in 1...5 {
            s.spawn("w\(i)") {
                HostClock.sleep(nanos: UInt64(i) * 50_000)   // arrive in order 1...5
                mutex.lock()
                clocks.took("w\(i)")
                HostClock.sleep(nanos: 100_000)
                mutex.unlock()
            }
        }
        #expect(s.run() == .completed)
        #expect(clocks.order == ["w1", "w2", "w3", "w4", "w5"])
    }

    @Test("a newcomer spins while the owner runs and takes the lock without sleeping")
    func optimisticSpin() throws {
        let mutex = KernelMutex("spin")
        let clocks = CPUModelTests.Clocks()
        let s = DeterministicScheduler(CPUModelTests.configuration(cpus: 2))
        s.spawn("owner") {
            mutex.lock()
            HostClock.spin(nanos: 5_000)   // udelay: the owner stays on its CPU
            mutex.unlock()
            clocks.end("owner")
        }
        s.spawn("spinner") {
            HostClock.spin(nanos: 1_000)
            mutex.lock()
            clocks.end("spinner")
            mutex.unlock()
        }
        #expect(s.run() == .completed)
        let owner = clocks.ends["owner"]!, spinner = clocks.ends["spinner"]!
        // A sleeper would have paid a wake-up (2 µs); the spinner takes it within a spin round or two.
        #expect(spinner >= owner - 200 && spinner < owner + 1_000, "owner \(owner), spinner \(spinner)")
    }

    @Test("on real threads the counter it guards is exact")
    func realThreads() throws {
        let mutex = KernelMutex("real")
        final class Box: @unchecked Sendable { var n = 0 }
        let box = Box()
        let threads = 4, rounds = 20_000
        #expect(runThreads(threads, keepAlive: [mutex, box]) { _ in
            for _ in 0..<rounds { mutex.withLock { box.n += 1 } }
        })
        #expect(box.n == threads * rounds)
        #expect(!mutex.isLocked)
        #expect(mutex.tryLock())
        #expect(!mutex.tryLock())
        mutex.unlock()
    }

    @Test("a thread woken onto a halted CPU waits the wake-up latency; onto one that just went idle, an IPI and a switch")
    func wakeLatencyDependsOnHalt() {
        func latency(idleFirst: UInt64) -> UInt64 {
            var c = CPUModelTests.configuration(cpus: 2)
            c.costs.wake = 50_000
            c.costs.contextSwitch = 5_000
            c.costs.ipiReceipt = 1_000
            let word = UnsafeMutablePointer<UInt32>.allocate(capacity: 1)
            word.initialize(to: 0)
            defer { word.deallocate() }
            let futex = FutexWord(word)
            let s = DeterministicScheduler(c)
            let woke = Mutex<UInt64>(0), woken = Mutex<UInt64>(0)
            s.spawn("sleeper") {
                while futex.load(ordering: .acquiring) == 0 { _ = futex.wait(expected: 0) }
                woken.withLock { $0 = HostClock.nanos() }
            }
            s.spawn("waker") {
                HostClock.spin(nanos: idleFirst)   // the sleeper's CPU idles meanwhile
                futex.store(1, ordering: .releasing)
                woke.withLock { $0 = HostClock.nanos() }
                _ = futex.wake(FutexWord.everyone)
            }
            #expect(s.run() == .completed)
            return woken.withLock { $0 } - woke.withLock { $0 }
        }
        let recent = latency(idleFirst: 1_000), halted = latency(idleFirst: 1_000_000)
        #expect(recent >= 6_000 && recent < 10_000, "idle 1 µs: an IPI and a switch back, \(recent) ns")
        #expect(halted >= 50_000 && halted < 55_000, "idle 1 ms: the wake-up latency, \(halted) ns")
    }

    @Test("a sleeper whose timer expires on its halted CPU runs after the measured timer wake-up latency; without the measurement at its expiry")
    func timerWakeOnAHaltedCPU() {
        func resumed(after sleep: UInt64, points: [VirtualCosts.TimerWakePoint], busyNeighbour: Bool = false) -> UInt64 {
            var c = CPUModelTests.configuration(cpus: 2)
            c.costs.wake = 50_000
            c.costs.contextSwitch = 5_000
            c.costs.timerWake = points
            let s = DeterministicScheduler(c)
            let back = Mutex<UInt64>(0)
            s.spawn("sleeper") {
                let start = HostClock.nanos()
                HostClock.sleep(nanos: sleep)
                back.withLock { $0 = HostClock.nanos() - start }
            }
            if busyNeighbour { s.spawn("spinner") { HostClock.spin(nanos: 2_000_000) } }
            #expect(s.run() == .completed)
            return back.withLock { $0 }
        }
        let points = [VirtualCosts.TimerWakePoint(idleNanos: 40_000, latencyNanos: 60_000),
                      VirtualCosts.TimerWakePoint(idleNanos: 400_000, latencyNanos: 90_000)]
        #expect(resumed(after: 40_000, points: []) == 40_000, "no measurement: at the expiry")
        #expect(resumed(after: 40_000, points: points) == 100_000, "idle 40 µs: the first point")
        #expect(resumed(after: 220_000, points: points) == 295_000, "idle 220 µs: between the points")
        #expect(resumed(after: 2_000_000, points: points) == 2_090_000, "idle beyond the last point: the last point")
        #expect(resumed(after: 3_000, points: points) == 3_000, "idle less than a context switch: not halted yet")
        #expect(resumed(after: 40_000, points: points, busyNeighbour: true) == 100_000,
                "its own CPU idle: its timer there, whatever the other CPU does")
        #expect(VirtualCosts.measured.timerWake.isEmpty && VirtualCosts.measured.timerWakeNanos(idleFor: 1_000_000) == 0)
    }

    @Test("an idle CPU does not stall: stalls come in busy time")
    func stallsComeInBusyTime() {
        var c = CPUModelTests.configuration(cpus: 1)
        // A stall every millisecond of busy time on average, each 100 µs.
        c.stalls = CPUStalls(ratePerSecond: 1_000, thresholdNanos: 100_000, p50Nanos: 100_000,
                             p90Nanos: 100_000, p99Nanos: 100_000, maxNanos: 100_000)
        let s = DeterministicScheduler(c)
        s.spawn("mostly asleep") {
            for _ in 0..<100 {
                HostClock.sleep(nanos: 10_000_000)   // 1 s idle in all
                HostClock.spin(nanos: 10_000)        // 1 ms busy in all
            }
        }
        #expect(s.run() == .completed)
        // About one stall in 1 ms of busy time; counting idle time would give about 100.
        #expect(s.cpuStalls.count < 10, "\(s.cpuStalls.count) stalls")
    }

    @Test("with one-busy stall figures a CPU stalls by them while the other CPUs idle, by the others while they are busy")
    func stallsOneBusy() {
        /// Stalls of two CPUs over 50 ms of spinning: one thread alone, or two at once.
        func stalls(threads: Int, oneBusy: CPUStalls?) -> UInt64 {
            var c = CPUModelTests.configuration(cpus: 2)
            c.stalls = CPUStalls(ratePerSecond: 2_000, thresholdNanos: 10_000, p50Nanos: 10_000,
                                 p90Nanos: 10_000, p99Nanos: 10_000, maxNanos: 10_000)
            c.stallsOneBusy = oneBusy
            let s = DeterministicScheduler(c)
            for i in 0..<threads {
                s.spawn("spinner \(i)") { for _ in 0..<5_000 { HostClock.spin(nanos: 10_000) } }
            }
            #expect(s.run() == .completed)
            return s.cpuStalls.count
        }
        let never = CPUStalls(ratePerSecond: 0, thresholdNanos: 10_000, p50Nanos: 10_000, p90Nanos: 10_000,
                              p99Nanos: 10_000, maxNanos: 10_000)
        #expect(stalls(threads: 1, oneBusy: never) == 0, "alone on the machine: the one-busy figures, no stalls")
        // About 2 stalls a ms of busy time: about 100 in 50 ms on one CPU, 200 on two.
        let alone = stalls(threads: 1, oneBusy: nil)
        #expect(alone > 50 && alone < 150, "without one-busy figures: \(alone)")
        let both = stalls(threads: 2, oneBusy: never)
        #expect(both > 100 && both < 300, "both CPUs busy: the two-busy figures, \(both)")
        #expect(stalls(threads: 1, oneBusy: nil) == alone, "the same seed, the same draws")
    }

    @Test("the stall probe's shared share: the part of a CPU's stalled time in which the other CPU was stalled too")
    func sharedStallShare() {
        // CPU a: [0, 100) and [1000, 1400); CPU b: [50, 150) and [1200, 1300).
        let a: [(UInt64, UInt64)] = [(0, 100), (1_000, 400)], b: [(UInt64, UInt64)] = [(50, 100), (1_200, 100)]
        // Shared: 50 + 100 from a's side, 50 + 100 from b's; stalled: 500 + 200.
        #expect(abs(HostProbe.sharedStallShare(a, b) - 300.0 / 700.0) < 1e-12)
        #expect(HostProbe.sharedStallShare(a, b) == HostProbe.sharedStallShare(b, a))
        // Only the stalls of at least 150 ns: a's second (400 ns, 100 of it shared).
        #expect(abs(HostProbe.sharedStallShare(a, b, least: 150) - 100.0 / 400.0) < 1e-12)
        #expect(HostProbe.sharedStallShare(a, [(5_000, 10)]) == 0, "apart: nothing shared")
        #expect(HostProbe.sharedStallShare([], []) == 0)
    }

    @Test("the tick's interrupt takes its handler's time from the thread it interrupts, at the measured share of ticks, in busy time only")
    func tickInterruptTakesTheRunningThreadsTime() {
        /// How long one thread took for `work` (spun in 10 µs steps, after
        /// `idle` asleep), and the tick interrupts it lost time to.
        func run(_ irq: TickInterrupt?, work: UInt64 = 10_000_000, idle: UInt64 = 0) -> (took: UInt64, irqs: UInt64, nanos: UInt64) {
            var c = CPUModelTests.configuration(cpus: 1)
            c.tickInterrupt = irq
            let s = DeterministicScheduler(c)
            let took = Mutex<UInt64>(0)
            s.spawn("spinner") {
                if idle > 0 { HostClock.sleep(nanos: idle) }
                let start = HostClock.nanos()
                for _ in 0..<(work / 10_000) { HostClock.spin(nanos: 10_000) }
                took.withLock { $0 = HostClock.nanos() - start }
            }
            #expect(s.run() == .completed)
            return (took.withLock { $0 }, s.tickInterrupts.count, s.tickInterrupts.nanos)
        }
        #expect(run(nil).took == 10_000_000, "no measurement: a tick costs nothing")
        #expect(run(TickInterrupt(share: 0, nanos: 20_000)).irqs == 0)
        // Every tick 20 µs: 10 ms of work spans 10 ticks of the 1 ms grid (the handlers' 0.2 ms brings no 11th).
        let every = run(TickInterrupt(share: 1, nanos: 20_000))
        #expect(every.irqs == 10 && every.nanos == 200_000)
        #expect(every.took == 10_000_000 + every.nanos, "the thread lost the handlers' time: \(every.took) ns")
        // Half the ticks, drawn from the seed: over 200 ticks about 100.
        let half = run(TickInterrupt(share: 0.5, nanos: 20_000), work: 200_000_000)
        #expect(half.irqs > 60 && half.irqs < 140, "\(half.irqs) of 200 ticks")
        #expect(half.took == 200_000_000 + half.nanos)
        // 100 ms asleep (the CPU idle) and 1 ms busy: one tick's handler, not a hundred.
        let sleeper = run(TickInterrupt(share: 1, nanos: 20_000), work: 1_000_000, idle: 100_000_000)
        #expect(sleeper.irqs <= 1, "\(sleeper.irqs) tick interrupts")
    }

}
