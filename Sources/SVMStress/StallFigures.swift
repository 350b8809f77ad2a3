import SVMEmu

/// What a stall probe measured on a machine's CPUs, all busy
/// (``MachineProfile/Stalls``) or one (``MachineProfile/Stalls/OneBusy``):
/// the same record, read the same way.
public protocol StallFigures {
    /// Stalls per second on one busy CPU.
    var ratePerSecond: Double { get }
    /// Gaps longer than this were noted, ns.
    var thresholdNanos: Double { get }
    /// The stalls' median, 90th and 99th percentiles and longest, ns.
    var p50Nanos: Double { get }
    var p90Nanos: Double { get }
    var p99Nanos: Double { get }
    var maxNanos: Double { get }
}

extension StallFigures {
    /// Every figure by its key, in the file's order (the optional ones when present).
    public var all: [(key: String, value: Double)] {
        Mirror(reflecting: self).children.compactMap { c in (c.value as? Double?).flatMap { $0 }.map { (c.label!, $0) } }
    }

    /// The figures as the deterministic scheduler's CPU model charges them
    /// (whole nanoseconds; a negative or non-finite figure as 0).
    var charged: CPUStalls {
        func ns(_ v: Double) -> UInt64 { v.isFinite && v > 0 ? UInt64(v.rounded()) : 0 }
        return CPUStalls(ratePerSecond: ratePerSecond, thresholdNanos: ns(thresholdNanos), p50Nanos: ns(p50Nanos),
                         p90Nanos: ns(p90Nanos), p99Nanos: ns(p99Nanos), maxNanos: ns(maxNanos))
    }
}
