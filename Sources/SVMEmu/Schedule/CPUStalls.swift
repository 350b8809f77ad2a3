#if canImport(Glibc)
import Glibc
#endif

/// How often a busy CPU stops for reasons outside the emulated kernel, and
/// for how long (a machine profile's `stalls`, measured by a thread that
/// spins reading the clock on each CPU and records the gaps).
public struct CPUStalls: Sendable, Equatable {
    /// Stalls per second of a busy CPU.
    public var ratePerSecond: Double
    /// The shortest gap counted, and the gaps' quantiles, in nanoseconds.
    public var thresholdNanos: UInt64
    public var p50Nanos: UInt64
    public var p90Nanos: UInt64
    public var p99Nanos: UInt64
    public var maxNanos: UInt64

    public init(ratePerSecond: Double, thresholdNanos: UInt64, p50Nanos: UInt64, p90Nanos: UInt64,
                p99Nanos: UInt64, maxNanos: UInt64) {
        self.ratePerSecond = ratePerSecond
        self.thresholdNanos = thresholdNanos
        self.p50Nanos = p50Nanos
        self.p90Nanos = p90Nanos
        self.p99Nanos = p99Nanos
        self.maxNanos = maxNanos
    }

    /// A stall's length for a uniform draw `u`: the measured quantiles,
    /// linear between them.
    func duration(uniform u: Double) -> UInt64 {
        let points: [(Double, UInt64)] = [(0, thresholdNanos), (0.5, p50Nanos), (0.9, p90Nanos), (0.99, p99Nanos),
                                          (1, max(maxNanos, p99Nanos))]
        for i in 1..<points.count where u <= points[i].0 {
            let (p0, v0) = points[i - 1], (p1, v1) = points[i]
            let f = (u - p0) / (p1 - p0)
            return v0 + UInt64(Double(v1 >= v0 ? v1 - v0 : 0) * f)
        }
        return maxNanos
    }

    /// The busy time until the next stall for a uniform draw `u`
    /// (exponential: stalls come as a Poisson process at the measured rate,
    /// or at `rate`).
    func interval(uniform u: Double, ratePerSecond rate: Double? = nil) -> UInt64 {
        let r = rate ?? ratePerSecond
        guard r > 0 else { return .max / 2 }
        return UInt64(-log1p(-u) / r * 1e9)
    }
}

/// The kernel's tick interrupt on a busy CPU, as a machine profile measured
/// it (`stalls.tickGapsPerSecond`, `tickGapP50Nanos`: the gaps a thread
/// spinning on the clock sees at its CPU's local timer interrupts): on the
/// tick grid (``DeterministicScheduler/Configuration/tickNanos``) a busy
/// CPU's running thread loses ``nanos`` at ``share`` of the ticks.
public struct TickInterrupt: Sendable, Equatable {
    /// The share of ticks (0-1) whose handler the running thread loses: the
    /// measured tick gaps a second over the ticks a second of the kernel the
    /// probe ran on (a tick whose handler stayed under the probe's threshold,
    /// or fell inside a stall, is not among the gaps).
    public var share: Double
    /// The handler's time (the gaps' median), nanoseconds; under a tick.
    public var nanos: UInt64

    public init(share: Double, nanos: UInt64) {
        self.share = share
        self.nanos = nanos
    }
}
