@testable import SVMEmu
import Synchronization
import Testing

/// The CPU model's EEVDF run queues, wake placement and preemption points
/// (6.12's kernel/sched/fair.c): small deterministic runs whose clocks show
/// where a woken thread ran and when it preempted its waker.
@Suite("EEVDF run queues")
struct EEVDFTests {

    static func configuration(cpus: Int) -> DeterministicScheduler.Configuration {
        var c = DeterministicScheduler.Configuration(seed: 1)
        c.cpus = cpus
        c.preemptions = 0
        c.jitterPercent = 0
        c.costs.wake = 50_000
        c.costs.contextSwitch = 5_000
        return c
    }

    /// Runs the threads `spawn` starts on a scheduler of `c` and returns
    /// how long after the wake-up the woken thread resumed, in virtual
    /// nanoseconds. `wake` sets the shared word and wakes its waiters;
    /// `waitForWake` sleeps on it until then.
    static func nanosFromWakeToResume(_ c: DeterministicScheduler.Configuration,
                                      _ spawn: (DeterministicScheduler, _ wake: @escaping @Sendable () -> Void,
                                                _ waitForWake: @escaping @Sendable () -> Void) -> Void) -> UInt64 {
        let word = UnsafeMutablePointer<UInt32>.allocate(capacity: 1)
        word.initialize(to: 0)
        defer { word.deallocate() }
        let futex = FutexWord(word)
        let woke = Mutex<UInt64>(0), resumed = Mutex<UInt64>(0)
        let s = DeterministicScheduler(c)
        spawn(s, {
            futex.store(1, ordering: .releasing)
            woke.withLock { $0 = HostClock.nanos() }
            _ = futex.wake(FutexWord.everyone)
        }, {
            while futex.load(ordering: .acquiring) == 0 { _ = futex.wait(expected: 0) }
            resumed.withLock { $0 = HostClock.nanos() }
        })
        #expect(s.run() == .completed)
        return resumed.withLock { $0 } - woke.withLock { $0 }
    }

    @Test("a woken thread queues on the CPU it last ran on, behind its waker, while the other CPU idles (no LLC domain); with one it takes the idle CPU")
    func wakeGoesToThePreviousCPU() {
        func resumedAfterWake(_ placement: DeterministicScheduler.WakePlacement) -> UInt64 {
            var c = Self.configuration(cpus: 2)
            c.wakePlacement = placement
            // CPU 0: the sleeper, the waker queued behind it; CPU 1: a thread that exits at once.
            return Self.nanosFromWakeToResume(c) { s, wake, waitForWake in
                s.spawn("sleeper") { waitForWake() }
                s.spawn("idler") {}
                s.spawn("waker") {
                    HostClock.spin(nanos: 100_000)
                    wake()
                    HostClock.spin(nanos: 500_000)   // within its first slice: not preempted
                }
            }
        }
        let previous = resumedAfterWake(.previousCPU), idle = resumedAfterWake(.idleSibling)
        #expect(previous >= 500_000 && previous < 520_000,
                "queued on CPU 0 until the waker exits: \(previous) ns after the wake-up")
        #expect(idle >= 50_000 && idle < 60_000, "on the halted CPU 1 after the wake-up latency: \(idle) ns")
    }

    @Test("with a shared last-level cache a woken thread whose CPU is busy takes the idle one while the cache is lightly used, and queues on its own once SIS_UTIL stops the search")
    func sharedCacheSearchFollowsUtilisation() {
        /// Nanoseconds from the wake-up to the sleeper's resumption, after
        /// both CPUs were kept busy for `busyNanos` (the waker on CPU 0, the
        /// other thread on CPU 1, which then exits and leaves CPU 1 idle).
        func resumedAfterWake(busyNanos: UInt64) -> UInt64 {
            var c = Self.configuration(cpus: 2)
            c.wakePlacement = .sharedCache
            c.tickNanos = 0
            return Self.nanosFromWakeToResume(c) { s, wake, waitForWake in
                s.spawn("sleeper") { waitForWake() }
                s.spawn("other") { if busyNanos > 0 { HostClock.spin(nanos: busyNanos) } }
                s.spawn("waker") {
                    HostClock.spin(nanos: busyNanos + 100_000)
                    wake()
                    HostClock.spin(nanos: 500_000)
                }
            }
        }
        let light = resumedAfterWake(busyNanos: 0)
        #expect(light >= 50_000 && light < 60_000, "on the idle CPU 1 after the wake-up latency: \(light) ns")
        // 300 ms busy: util_avg about 1024 on both (CPU 1 idle for the last 0.1 ms), over
        // 100/117 of capacity: nr_idle_scan is 0 and the sleeper queues behind its waker on CPU 0.
        let heavy = resumedAfterWake(busyNanos: 300_000_000)
        #expect(heavy >= 500_000 && heavy < 520_000, "queued on CPU 0 until the waker exits: \(heavy) ns")
    }

    @Test("SIS_UTIL's scan width and PELT's decay: every CPU at mean utilisation x scans CPUs * (1 - (1.17 x / 1024)^2); utilisation halves in 32 ms")
    func sisUtilScanWidth() {
        var c = Self.configuration(cpus: 2)
        c.wakePlacement = .sharedCache
        let s = DeterministicScheduler(c)
        #expect(s.idleScan(at: 0) == 2, "idle: scan both")
        s.cpus[0].util = 1024
        s.cpus[1].util = 0
        // x = 512: 512^2 * 117^2 / (10000 * 1024) = 350 (rounded down); (1024 - 350) * 2 / 1024 = 1.
        #expect(s.idleScan(at: 0) == 1)
        s.cpus[1].util = 1024
        #expect(s.idleScan(at: 0) == 0, "full: no scan")
        #expect(abs(s.utilisation(0, at: 32 * 1_024_000) - 512) < 1e-9, "idle for 32 periods of 1024 µs: half")
        s.noteUtilisation(1, at: 0, busy: true)
        #expect(abs(s.utilisation(1, at: 32 * 1_024_000) - 1024) < 1e-9, "busy stays full")
    }

    @Test("a wake-up that makes the wakee EEVDF's pick preempts the waker only at a preemption point: at once with full preemption, at the return to user with voluntary")
    func wakeupPreemptionWaitsForAPreemptionPoint() {
        func resumedAfterWake(_ model: DeterministicScheduler.PreemptionModel) -> UInt64 {
            var c = Self.configuration(cpus: 1)
            c.preemption = model
            // The waker runs 100 µs, then sleeps; the wakee runs and blocks at
            // once, owed service (positive lag). Placed with that lag when the
            // waker wakes it, it is the earliest eligible deadline.
            return Self.nanosFromWakeToResume(c) { s, wake, waitForWake in
                s.spawn("waker") {
                    HostClock.spin(nanos: 100_000)
                    HostClock.sleep(nanos: 10_000)
                    DeterministicScheduler.withCurrent { $0.inKernel += 1 }   // as inside a fault handler
                    wake()
                    for _ in 0..<20 { HostClock.spin(nanos: 10_000) }   // kernel work: no preemption point
                    DeterministicScheduler.faultReturned()
                    HostClock.spin(nanos: 1)                             // the return to user
                    HostClock.spin(nanos: 300_000)
                }
                s.spawn("wakee") { waitForWake() }
            }
        }
        let full = resumedAfterWake(.full), voluntary = resumedAfterWake(.voluntary)
        #expect(full >= 15_000 && full < 20_000, "at the first point after the wake-up: \(full) ns")
        #expect(voluntary >= 205_000 && voluntary < 210_000, "at the return to user, after 200 µs in the kernel: \(voluntary) ns")
    }
}
