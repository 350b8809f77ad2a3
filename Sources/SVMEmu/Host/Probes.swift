// This host's own costs, measured for `svmemu calibrate` (Docs/machine-profiles.md):
// the C microbenchmarks of CSVMSupport's svm_calibrate.c behind a typed Swift face,
// so that only SVMEmu talks to CSVMSupport. Not the emulator: the real hardware
// and kernel, timed with CLOCK_MONOTONIC around batches of operations.
import CSVMSupport

/// Microbenchmarks of the host's primitives: what a TLB hit, a page-table
/// walk, a minor fault, a system call, a futex call, a wake-up, a context
/// switch, a spin round, a lock, a yield, a TLB shootdown and a memcpy cost
/// on this machine, and how often its CPUs stall.
///
/// Each measurement takes `samples` repetitions and returns one figure per
/// repetition (nanoseconds per operation, or GB/s for a copy); the caller
/// takes the median. Two-thread measurements pin their threads to the CPUs
/// given (`sched_setaffinity`) and restore the caller's affinity. A host
/// that refuses (a CPU that cannot be pinned, a mapping that fails) throws
/// its ``Errno``.
public enum HostProbe {
    /// A measurement with one figure per repetition.
    public enum Single: Sendable {
        /// A dependent load hitting the L1 cache and the first-level TLB (a
        /// random pointer chase over the 64 lines of one 4 KiB page).
        case tlbHit
        /// The first read of each page of a fresh private anonymous mapping
        /// (a minor fault mapping the zero page), per page, the read included.
        case minorFault
        /// `getppid()` through `syscall(2)`.
        case syscall
        /// `FUTEX_WAKE` of a word nobody waits on.
        case futexWake
        /// `FUTEX_WAIT` with a value that does not match (`EAGAIN` at once).
        case futexWait
        /// `sched_yield()` pinned to one CPU.
        case yield
        /// Two threads pinned to `cpu` handing a futex word back and forth: per switch.
        case contextSwitch(cpu: Int32)
        /// One load, compare-and-exchange and pause on CPU `a` on a line a
        /// thread on CPU `b` keeps writing.
        case spinRound(a: Int32, b: Int32)
        /// `memcpy` between two buffers of `bytes` each, repeated: GB/s.
        case memcpy(bytes: Int)
    }

    /// Runs `probe` `samples` times (at least 1).
    ///
    /// - Throws: ``Errno`` when the host refused.
    public static func measure(_ probe: Single, samples: Int) throws(Errno) -> [Double] {
        try run(samples) { out, n in
            switch probe {
            case .tlbHit: svm_cal_tlb_hit(out, n)
            case .minorFault: svm_cal_minor_fault(out, n)
            case .syscall: svm_cal_syscall(out, n)
            case .futexWake: svm_cal_futex_wake(out, n)
            case .futexWait: svm_cal_futex_wait(out, n)
            case .yield: svm_cal_yield(out, n)
            case .contextSwitch(let cpu): svm_cal_context_switch(out, n, cpu)
            case .spinRound(let a, let b): svm_cal_spin_round(out, n, a, b)
            case .memcpy(let bytes): svm_cal_memcpy(out, n, bytes)
            }
        }
    }

    /// A random pointer chase with one line in each of `pages` 4 KiB pages
    /// (every load misses both TLB levels) and the same chase over as many
    /// lines packed together (TLB hits): `walk[i]` and `packed[i]`, ns a load.
    public static func pageWalk(samples: Int, pages: Int) throws(Errno) -> (walk: [Double], packed: [Double]) {
        var packed: [Double] = []
        let walk = try run(samples) { out, n in
            packed = [Double](repeating: 0, count: Int(n))
            return packed.withUnsafeMutableBufferPointer { svm_cal_page_walk(out, $0.baseAddress!, n, Int32(pages)) }
        }
        return (walk, packed)
    }

    /// An uncontended lock and unlock of the emulator's futex mutex
    /// (`svm_mutex_lock` / `svm_mutex_unlock`), ns each.
    public static func lock(samples: Int) throws(Errno) -> (lock: [Double], unlock: [Double]) {
        var unlock: [Double] = []
        let lock = try run(samples) { out, n in
            unlock = [Double](repeating: 0, count: Int(n))
            return unlock.withUnsafeMutableBufferPointer { svm_cal_lock(out, $0.baseAddress!, n) }
        }
        return (lock, unlock)
    }

    /// `FUTEX_WAKE` on CPU `a` to a thread asleep in `FUTEX_WAIT` on CPU `b`,
    /// until it runs: one wake-up a sample, ns.
    public static func wakeLatency(samples: Int, a: Int32, b: Int32) throws(Errno) -> [Double] {
        try run(samples) { svm_cal_wake_latency($0, $1, a, b) }
    }

    /// What a TLB shootdown costs, per `mprotect()` of one present page to
    /// read-only and back.
    public struct Shootdown: Sendable {
        /// With no other thread running (a local flush), ns a call.
        public var local: [Double]
        /// With a thread of the process spinning on the other CPU (a
        /// shootdown IPI each call), ns a call.
        public var remote: [Double]
        /// The median interruption the spinning thread saw in its own clock
        /// loop while the flushes ran (the IPI's handling), ns.
        public var handling: [Double]
        /// Interruptions per call on the spinning thread (about 1 when each
        /// flush reached it as an interrupt, about 0 when the hypervisor flushed for it).
        public var interrupted: [Double]
    }

    /// The shootdown measurement on CPUs `a` (the caller) and `b` (the
    /// spinning thread); local and remote repetitions alternate.
    public static func shootdown(samples: Int, a: Int32, b: Int32) throws(Errno) -> Shootdown {
        let n = max(1, samples)
        var s = Shootdown(local: .init(repeating: 0, count: n), remote: .init(repeating: 0, count: n),
                          handling: .init(repeating: 0, count: n), interrupted: .init(repeating: 0, count: n))
        let rc = s.local.withUnsafeMutableBufferPointer { l in
            s.remote.withUnsafeMutableBufferPointer { r in
                s.handling.withUnsafeMutableBufferPointer { h in
                    s.interrupted.withUnsafeMutableBufferPointer { i in
                        svm_cal_shootdown(l.baseAddress!, r.baseAddress!, h.baseAddress!, i.baseAddress!, Int32(n), a, b)
                    }
                }
            }
        }
        if rc != 0 { throw Errno(rawValue: -rc) }
        return s
    }

    /// Local timer interrupts per second on `cpu` kept busy for `millis`
    /// (`/proc/interrupts`, LOC): the kernel's tick rate, or 0 or less when unreadable.
    public static func tickHz(cpu: Int32, millis: Int32) -> Double { svm_cal_tick_hz(cpu, millis) }

    /// Host CPUs this process may run on (`sched_getaffinity`), or 0 or less when unreadable.
    public static var cpus: Int { Int(svm_cal_cpus()) }

    /// The first two CPUs the process may run on (nil for one it does not have).
    public static func firstTwoCPUs() -> (Int32?, Int32?) {
        var a: Int32 = -1, b: Int32 = -1
        svm_cal_first_cpus(&a, &b)
        return (a >= 0 ? a : nil, b >= 0 ? b : nil)
    }

    /// What threads spinning on a clock loop on each CPU saw: the CPUs'
    /// stalls (a hypervisor taking the vCPU away), the kernel's tick and its
    /// preemptions told apart.
    public struct Stalls: Sendable {
        /// Stalls per second per CPU.
        public var ratePerSecond: Double
        /// Their length: mean, p50, p90, p99 (nearest rank), the longest (ns).
        public var meanNanos, p50Nanos, p90Nanos, p99Nanos, maxNanos: Double
        /// Gaps longer than this were noted (5 x the median loop, at least 2 µs), ns.
        public var thresholdNanos: Double
        /// The median loop (one clock read), the slower CPU's, ns.
        public var loopNanos: Double
        /// The tick's gaps per second per CPU and their median (0 when under the threshold).
        public var tickGapsPerSecond, tickGapP50Nanos: Double
        /// Gaps in which the kernel ran another task there, per second per CPU (not stalls).
        public var preemptionsPerSecond: Double
        /// Seconds the loops covered, summed over the CPUs.
        public var seconds: Double
        /// Counts: stalls, tick gaps, preemptions, gaps not stored (a full buffer).
        public var stalls, tickGaps, preemptions, dropped: UInt64
        /// Whether the tick was found by the timer interrupt count on some CPU (else by phase).
        public var byTimerCount: Bool
        /// The share of the covered time the CPUs spent stalled.
        public var stalledShare: Double
        /// With two CPUs: the share of the stalled time in which the other
        /// CPU was stalled too, over every stall and over those at least
        /// `p99Nanos` long (0 with one CPU). Stalls that come to both CPUs
        /// at once (a hypervisor pausing the whole machine) stop every
        /// thread; a stall of one CPU alone lets the others go on.
        public var sharedShare, longSharedShare: Double
    }

    /// ``Stalls/sharedShare``'s computation for two CPUs' stalls, each a
    /// (start, length) pair in nanoseconds, in time order on each CPU,
    /// counting only stalls at least `least` ns long (`svm_cal_stall_shared()`).
    public static func sharedStallShare(_ a: [(UInt64, UInt64)], _ b: [(UInt64, UInt64)], least: UInt64 = 0) -> Double {
        let fa = a.flatMap { [CUnsignedLongLong($0.0), CUnsignedLongLong($0.1)] }
        let fb = b.flatMap { [CUnsignedLongLong($0.0), CUnsignedLongLong($0.1)] }
        return svm_cal_stall_shared(fa, Int32(a.count), fb, Int32(b.count), CUnsignedLongLong(least))
    }

    /// One clock-reading thread pinned to each of CPUs `a` and `b` (`b` < 0:
    /// `a` only) for `rounds` rounds of `roundNanos`; the gaps between reads
    /// are split into preemptions, the tick (by the local timer interrupt
    /// count, else by the gap's phase in `tickNanos`) and stalls.
    public static func stalls(a: Int32, b: Int32, rounds: Int, roundNanos: UInt64, tickNanos: UInt64) throws(Errno) -> Stalls {
        var f = svm_cal_stall_figures()
        let rc = svm_cal_stalls(&f, a, b, Int32(rounds), roundNanos, tickNanos)
        if rc != 0 { throw Errno(rawValue: -rc) }
        return Stalls(ratePerSecond: f.ratePerSecond, meanNanos: f.meanNanos, p50Nanos: f.p50Nanos, p90Nanos: f.p90Nanos,
                      p99Nanos: f.p99Nanos, maxNanos: f.maxNanos, thresholdNanos: f.thresholdNanos, loopNanos: f.loopNanos,
                      tickGapsPerSecond: f.tickGapsPerSecond, tickGapP50Nanos: f.tickGapP50Nanos,
                      preemptionsPerSecond: f.preemptionsPerSecond, seconds: f.seconds, stalls: UInt64(f.stalls),
                      tickGaps: UInt64(f.tickGaps), preemptions: UInt64(f.preemptions), dropped: UInt64(f.dropped),
                      byTimerCount: f.byTimerCount > 0, stalledShare: f.stalledShare, sharedShare: f.sharedShare,
                      longSharedShare: f.longSharedShare)
    }

    /// `samples` figures (at least 1) from `body`, which returns 0 or -errno.
    private static func run(_ samples: Int, _ body: (UnsafeMutablePointer<Double>, Int32) -> Int32) throws(Errno) -> [Double] {
        var out = [Double](repeating: 0, count: max(1, samples))
        let rc = out.withUnsafeMutableBufferPointer { body($0.baseAddress!, Int32($0.count)) }
        if rc != 0 { throw Errno(rawValue: -rc) }
        return out
    }
}
