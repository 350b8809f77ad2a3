import Foundation
import SVMEmu
import SVMProfiles

/// One machine's measured costs: what a TLB hit, a minor fault, a futex call,
/// a wake-up, a context switch, a spin round, a lock, a yield, a TLB
/// shootdown and a copy take on that machine's hardware and kernel, and its
/// scheduler's slice and tick. A deterministic run charges them as virtual
/// time (``virtualCosts``), so a storm on the emulator can say what it would
/// do on that machine: this host (`svmemu calibrate`), or the kernel rig's
/// QEMU guest (the rig's guest calibrator writes the same file).
///
/// Every cost is the machine's own, measured by a microbenchmark (the median
/// of many repetitions; ``methods`` says how each was measured); none is
/// fitted to a storm's outcome. Docs/machine-profiles.md describes the file.
public struct MachineProfile: Sendable, Codable, Equatable {
    /// The profile's name (`native-2core`, `qemu-tcg-2`).
    public var name: String
    /// One sentence for people.
    public var description: String
    /// The machine: CPU model, kernel, hypervisor.
    public var measuredOn: String
    /// The day of the measurement, `YYYY-MM-DD`.
    public var date: String
    /// The program that measured (`svmemu calibrate 0.x`).
    public var tool: String
    /// The CPUs the measurement ran on.
    public var cpus: Int
    /// The costs, in nanoseconds.
    public var costs: Costs
    /// memcpy bandwidth by working set, smallest first.
    public var memcpy: [CopyBandwidth]
    /// The scheduler's timing.
    public var scheduler: Scheduler
    /// How each cost (by its key in ``costs``) was measured; `stalls` too.
    public var methods: [String: String]
    /// How often and how long a busy CPU stops running its thread for
    /// reasons outside the kernel (the host descheduling a vCPU, the
    /// hypervisor). Optional: profiles measured before it load without it.
    public var stalls: Stalls?
    /// The kernel's own code on a device-private fault's path, measured
    /// inside that kernel (the rig's kprobe events). Optional: without it a
    /// run charges nothing for these spans.
    public var deviceFault: DeviceFault?
    /// A sleeper's own timer waking it on an idle CPU: the latency from the
    /// expiry to the sleeper running, by how long the CPU had idled.
    /// Optional: without it a timed-out sleeper takes its CPU at its expiry.
    public var timerWake: TimerWake?
    /// The host's load while the profile's stalls were measured (`idle`,
    /// `loaded`): under QEMU TCG a guest's stalls follow its host's load.
    /// `svmemu fidelity` compares a profile's runs with the kernel
    /// reference's boots of the same load where it has them. Optional:
    /// nil, not recorded.
    public var hostLoad: String?

    /// The timer wake-up latency of an idle CPU, measured inside the
    /// machine's kernel (the kernel rig's `rig-calibrate -W`;
    /// Docs/machine-profiles.md): a thread pinned to an otherwise idle CPU
    /// sleeps in `clock_nanosleep()` with a 1 ns timer slack and reads the
    /// clock when it runs again.
    public struct TimerWake: Sendable, Codable, Equatable {
        /// The measured points, the shortest idle first.
        public var points: [Point]

        /// One sleep length and its latency (the median over the machine's boots of each boot's median).
        public struct Point: Sendable, Codable, Equatable {
            /// The sleep: how long the CPU idled before its timer expired, ns.
            public var idleNanos: Double
            /// From the expiry to the sleeper's first clock read, ns.
            public var latencyNanos: Double

            public init(idleNanos: Double, latencyNanos: Double) {
                self.idleNanos = idleNanos
                self.latencyNanos = latencyNanos
            }
        }

        public init(points: [Point]) { self.points = points }
    }

    /// The measured costs, in nanoseconds (medians).
    public struct Costs: Sendable, Codable, Equatable {
        /// A load that hits the TLB (and the L1 cache).
        public var tlbHit: Double
        /// A load that misses the TLB: the page-table walk, the load itself not counted.
        public var pageTableWalk: Double
        /// A minor fault: exception entry, the fault handler mapping the zero
        /// page, and the return; the load not counted.
        public var faultEntryExit: Double
        /// A system call that does nothing (getppid).
        public var syscall: Double
        /// FUTEX_WAKE with no waiter.
        public var futexWake: Double
        /// FUTEX_WAIT whose value does not match (returns at once).
        public var futexWait: Double
        /// From a futex wake on one CPU to the woken thread running on another.
        public var wakeLatency: Double
        /// One switch between two threads on one CPU (the futex calls not counted).
        public var contextSwitch: Double
        /// One round of a compare-and-exchange spin on a line another CPU writes.
        public var spinRound: Double
        /// Taking an uncontended lock.
        public var lockUncontended: Double
        /// Releasing a lock nobody waits for.
        public var unlock: Double
        /// sched_yield() with nothing else to run.
        public var yield: Double
        /// From the shootdown's sender to the IPI reaching the other CPU.
        public var ipiSendToReceipt: Double
        /// A shootdown IPI's round trip: sent, handled, acknowledged.
        public var ipiRoundTrip: Double
        /// Changing one page's entry and flushing it on the local CPU only.
        public var localFlush: Double

        /// Every cost by its key, in the file's order.
        public var all: [(key: String, nanos: Double)] {
            Mirror(reflecting: self).children.map { ($0.label!, $0.value as! Double) }
        }

        /// The keys of every cost, in the file's order.
        public static let keys = Costs(tlbHit: 0, pageTableWalk: 0, faultEntryExit: 0, syscall: 0, futexWake: 0, futexWait: 0,
                                       wakeLatency: 0, contextSwitch: 0, spinRound: 0, lockUncontended: 0, unlock: 0, yield: 0,
                                       ipiSendToReceipt: 0, ipiRoundTrip: 0, localFlush: 0).all.map(\.key)
    }

    /// memcpy's bandwidth at one working set.
    public struct CopyBandwidth: Sendable, Codable, Equatable {
        /// Bytes of each copy (source and destination are distinct buffers of this size).
        public var workingSetBytes: Int
        /// Bytes copied per nanosecond.
        public var gbPerSecond: Double
    }

    /// vCPU stalls: on each CPU a pinned thread reads CLOCK_MONOTONIC in a
    /// loop, and every gap between two reads above ``thresholdNanos`` that
    /// neither the kernel's tick nor a switch to another task explains is a
    /// stall (Docs/machine-profiles.md, "Stalls").
    public struct Stalls: StallFigures, Sendable, Codable, Equatable {
        /// Stalls per second on one busy CPU.
        public var ratePerSecond: Double
        /// A stall's mean length, ns.
        public var meanNanos: Double
        /// The median stall, ns.
        public var p50Nanos: Double
        /// The 90th percentile, ns.
        public var p90Nanos: Double
        /// The 99th percentile, ns.
        public var p99Nanos: Double
        /// The longest stall seen, ns.
        public var maxNanos: Double
        /// Gaps longer than this were noted (5 x the median clock loop, at least 2 µs).
        public var thresholdNanos: Double
        /// The kernel's tick gaps per second on one CPU (excluded from the stalls; 0 when under the threshold).
        public var tickGapsPerSecond: Double?
        /// The tick gaps' median length, ns.
        public var tickGapP50Nanos: Double?
        /// The tick (1 s / CONFIG_HZ) of the kernel the probe ran on, ns,
        /// when it is not ``MachineProfile/tickNanos`` (absent: the same).
        public var probeTickNanos: Double?
        /// The same probe on one vCPU with the others idle (the rig's
        /// `rig.sh stalls`): a busy CPU's stalls while every other CPU
        /// idles. Optional: absent, the figures above whatever the others do.
        public var oneBusy: OneBusy?

        /// The stalls of one busy CPU while the others idle.
        public struct OneBusy: StallFigures, Sendable, Codable, Equatable {
            /// Stalls per second.
            public var ratePerSecond: Double
            /// A stall's mean length, ns.
            public var meanNanos: Double
            /// The median stall, ns.
            public var p50Nanos: Double
            /// The 90th percentile, ns.
            public var p90Nanos: Double
            /// The 99th percentile, ns.
            public var p99Nanos: Double
            /// The longest stall seen, ns.
            public var maxNanos: Double
            /// Gaps longer than this were noted, ns.
            public var thresholdNanos: Double
        }
    }

    /// Two spans of the kernel's device-private fault path (6.12's legacy
    /// `do_swap_page()`), measured with kprobe events on the machine itself
    /// (`Tools/kernel-rig` `rig.sh probe`; Docs/machine-profiles.md): the
    /// time that kernel's own code takes there, which the other costs (a
    /// minor fault, a lock, a walk) do not cover.
    public struct DeviceFault: Sendable, Codable, Equatable {
        /// From the fault's entry into the handler (`lock_vma_under_rcu()`)
        /// to the page reference before `migrate_to_ram` (the driver's
        /// callback entered right after `get_page()`): both of 6.12's passes,
        /// the per-VMA lock's `VM_FAULT_RETRY` and the pass under
        /// `mmap_read_lock()`. ns.
        public var entryToReferenceNanos: Double
        /// From that reference to `migrate_vma_collect_pmd()`: the driver's
        /// `migrate_to_ram`, `migrate_vma_setup()`, the MMU notifier and the
        /// page-table walk down to the PMD. ns.
        public var referenceToCollectNanos: Double

        /// The spans as measured.
        public init(entryToReferenceNanos: Double, referenceToCollectNanos: Double) {
            self.entryToReferenceNanos = entryToReferenceNanos
            self.referenceToCollectNanos = referenceToCollectNanos
        }

        /// The `methods` text of a profile that could not measure the spans
        /// (`svmemu calibrate`): both 0, nothing charged.
        public static let notMeasuredMethod = "Not measured: both 0, so a run charges nothing for these spans. "
            + "They are timed with kprobe events on a kernel whose device-private pages fault (lib/test_hmm, the "
            + "kernel rig's guest: Tools/kernel-rig rig.sh probe); svmemu calibrate runs as a user program on a "
            + "host without device-private memory or the privileges for kprobes, so it has no equivalent."

        /// Both figures by key, in the file's order.
        public var all: [(key: String, value: Double)] {
            [("entryToReferenceNanos", entryToReferenceNanos), ("referenceToCollectNanos", referenceToCollectNanos)]
        }
    }

    /// The scheduler's timing on the machine.
    public struct Scheduler: Sendable, Codable, Equatable {
        /// EEVDF's base slice (`sysctl_sched_base_slice`, scaled by the CPUs).
        public var baseSliceNanos: UInt64
        /// One scheduler tick (1 s / CONFIG_HZ).
        public var tickNanos: UInt64
        /// The preemption model: none, voluntary, full or lazy.
        public var preemption: String
        /// Where a woken thread goes: "previousCPU" (the CPU it last ran
        /// on, idle or not: no shared last-level cache domain, so
        /// `select_idle_sibling()` searches nothing), "idleSibling" (an
        /// idle CPU first) or "sharedCache" (6.12's search of a shared
        /// last-level cache, SIS_UTIL's gate included); absent: "idleSibling".
        public var wakePlacement: String? = nil

        /// The CPU model's preemption model for ``preemption`` (lazy, which
        /// preempts a fair task at the tick or a return to user, as full).
        public var preemptionModel: DeterministicScheduler.PreemptionModel {
            switch preemption {
            case "none": return .none
            case "voluntary": return .voluntary
            default: return .full
            }
        }

        /// The CPU model's wake placement for ``wakePlacement``.
        public var wakePlacementModel: DeterministicScheduler.WakePlacement {
            wakePlacement.flatMap(DeterministicScheduler.WakePlacement.init(rawValue:)) ?? .idleSibling
        }
    }

    // MARK: what a run charges

    /// The deterministic scheduler's cost table from this machine's costs:
    /// `access` the TLB hit, `fault` the minor fault's entry and exit, `lock`
    /// and `unlock` the uncontended lock, `futex` the dearer of FUTEX_WAKE
    /// and FUTEX_WAIT, `wake` the wake-up latency, `yield`, `contextSwitch`
    /// and `spinRound` as measured, `walk`, `localFlush` and `ipi` from the
    /// page-table walk, the local flush and the IPI round trip, `deviceFaultToReference` and
    /// `referenceToCollect` from ``deviceFault`` (0 without it), `timerWake` from ``timerWake``
    /// (empty without it), and `copyPerKiB` from memcpy's bandwidth
    /// at a 1-2 MiB working set (a 4 KiB to 2 MiB folio copy's source is
    /// rarely in L1). Each is rounded to whole nanoseconds, at least 1: a
    /// free scheduling point would let a spinning thread stop virtual time.
    public var virtualCosts: VirtualCosts {
        func ns(_ v: Double) -> UInt64 { v.isFinite && v >= 1 ? UInt64(v.rounded()) : 1 }
        var v = VirtualCosts(access: ns(costs.tlbHit), fault: ns(costs.faultEntryExit),
                             lock: ns(costs.lockUncontended), unlock: ns(costs.unlock),
                             futex: ns(max(costs.futexWake, costs.futexWait)), wake: ns(costs.wakeLatency),
                             yield: ns(costs.yield), copyPerKiB: ns(copyNanosPerKiB),
                             contextSwitch: ns(costs.contextSwitch), spinRound: ns(costs.spinRound))
        // The kernel's own work a migration does besides locks and copies:
        // its page-table walks, local flushes and IPI rounds.
        v.walk = ns(costs.pageTableWalk)
        v.localFlush = ns(costs.localFlush)
        v.ipi = ns(costs.ipiRoundTrip)
        v.ipiReceipt = ns(costs.ipiSendToReceipt)
        // The kernel's own code on the device-private fault path (0: not
        // measured on this machine, nothing charged).
        func span(_ v: Double?) -> UInt64 { v.map { $0.isFinite && $0 > 0 ? UInt64($0.rounded()) : 0 } ?? 0 }
        v.deviceFaultToReference = span(deviceFault?.entryToReferenceNanos)
        v.referenceToCollect = span(deviceFault?.referenceToCollectNanos)
        // A sleeper's timer on a halted CPU (nothing without the measurement).
        v.timerWake = (timerWake?.points ?? []).sorted { $0.idleNanos < $1.idleNanos }.map {
            .init(idleNanos: UInt64($0.idleNanos.rounded()), latencyNanos: UInt64($0.latencyNanos.rounded()))
        }
        return v
    }

    /// Nanoseconds memcpy takes per KiB at a 1-2 MiB working set: the mean
    /// bandwidth of the entries in that range, or the entry nearest to
    /// 1.5 MiB (by ratio) when none is.
    public var copyNanosPerKiB: Double {
        let range = (1 << 20)...(2 << 20)
        let inRange = memcpy.filter { range.contains($0.workingSetBytes) && $0.gbPerSecond > 0 }
        let points = inRange.isEmpty
            ? Array(memcpy.filter { $0.gbPerSecond > 0 && $0.workingSetBytes > 0 }
                .min { abs(log(Double($0.workingSetBytes) / 1_572_864)) < abs(log(Double($1.workingSetBytes) / 1_572_864)) }
                .map { [$0] } ?? [])
            : inRange
        guard !points.isEmpty else { return Double(VirtualCosts.measured.copyPerKiB) }
        let gbps = points.map(\.gbPerSecond).reduce(0, +) / Double(points.count)
        return 1024 / gbps
    }

    /// The machine's CPU stalls as the deterministic scheduler's CPU model
    /// charges them (nil when the profile has none).
    public var cpuStalls: CPUStalls? {
        guard let s = stalls, s.ratePerSecond > 0 else { return nil }
        return s.charged
    }

    /// The stalls of a busy CPU while the others idle (``Stalls/oneBusy``), as
    /// the CPU model charges them; nil when the profile did not measure them.
    public var cpuStallsOneBusy: CPUStalls? {
        guard cpuStalls != nil, let o = stalls?.oneBusy else { return nil }
        return o.charged
    }

    /// The machine's tick interrupt as the CPU model charges it (nil when
    /// the profile did not measure its gaps): the median tick gap, at the
    /// share of ticks that showed one (tick gaps a second times the probed
    /// kernel's tick, ``Stalls/probeTickNanos`` or else ``tickNanos``, at
    /// most 1). Docs/machine-profiles.md, "The tick's interrupt".
    public var tickInterrupt: TickInterrupt? {
        guard let s = stalls, let rate = s.tickGapsPerSecond, let p50 = s.tickGapP50Nanos, rate > 0, p50 >= 1 else {
            return nil
        }
        let period = s.probeTickNanos ?? Double(tickNanos)
        guard period > 0 else { return nil }
        return TickInterrupt(share: min(1, rate * period / 1e9), nanos: UInt64(p50.rounded()))
    }

    /// The settings a deterministic run takes from this machine: its
    /// costs, its slice and tick, its CPU stalls and tick interrupt, its
    /// preemption model and its wake placement. Its costs carry no jitter
    /// (`jitterPercent` 0): the ±10% a run without a profile puts on every
    /// cost is a setting, not a measurement, and a profile's noise is what
    /// it measured (its stalls and its tick).
    public func apply(to c: inout DeterministicScheduler.Configuration) {
        c.costs = virtualCosts
        c.jitterPercent = 0
        c.timesliceNanos = baseSliceNanos
        c.tickNanos = tickNanos
        c.stalls = cpuStalls
        c.stallsOneBusy = cpuStallsOneBusy
        c.tickInterrupt = tickInterrupt
        c.preemption = scheduler.preemptionModel
        c.wakePlacement = scheduler.wakePlacementModel
    }

    /// EEVDF's base slice on the machine, for the scheduler's timeslices.
    public var baseSliceNanos: UInt64 { scheduler.baseSliceNanos }
    /// The machine's tick, for the scheduler's timeslices.
    public var tickNanos: UInt64 { scheduler.tickNanos }

    // MARK: checks

    /// Checks what a run relies on: a name, every cost finite and not
    /// negative, at least one copy bandwidth (working set and GB/s above 0),
    /// a tick and a slice above 0, CPUs 1-64, stall and device-fault figures
    /// (when present) finite and not negative. Returns the first problem, or nil.
    public var problem: String? {
        if name.isEmpty { return "the profile has no name" }
        for (key, v) in costs.all where !v.isFinite || v < 0 {
            return "costs.\(key) must be a finite number of nanoseconds >= 0 (got \(v))"
        }
        if memcpy.isEmpty { return "memcpy must list at least one working set" }
        for m in memcpy where m.workingSetBytes <= 0 || !m.gbPerSecond.isFinite || m.gbPerSecond <= 0 {
            return "memcpy entries need workingSetBytes > 0 and gbPerSecond > 0 (got \(m.workingSetBytes), \(m.gbPerSecond))"
        }
        if scheduler.tickNanos == 0 { return "scheduler.tickNanos must be above 0" }
        if scheduler.baseSliceNanos == 0 { return "scheduler.baseSliceNanos must be above 0" }
        if let w = scheduler.wakePlacement, DeterministicScheduler.WakePlacement(rawValue: w) == nil {
            return "scheduler.wakePlacement must be previousCPU, idleSibling or sharedCache (got \(w))"
        }
        if let stalls {
            for (key, v) in stalls.all where !v.isFinite || v < 0 {
                return "stalls.\(key) must be a finite number >= 0 (got \(v))"
            }
            for (key, v) in stalls.oneBusy?.all ?? [] where !v.isFinite || v < 0 {
                return "stalls.oneBusy.\(key) must be a finite number >= 0 (got \(v))"
            }
            if let p50 = stalls.tickGapP50Nanos, p50 >= Double(scheduler.tickNanos) {
                return "stalls.tickGapP50Nanos must be under scheduler.tickNanos (got \(p50))"
            }
        }
        if let deviceFault {
            for (key, v) in deviceFault.all where !v.isFinite || v < 0 {
                return "deviceFault.\(key) must be a finite number of nanoseconds >= 0 (got \(v))"
            }
        }
        if let timerWake {
            if timerWake.points.isEmpty { return "timerWake.points must list at least one point" }
            for p in timerWake.points where !p.idleNanos.isFinite || p.idleNanos < 0 || !p.latencyNanos.isFinite || p.latencyNanos < 0 {
                return "timerWake.points need finite idleNanos and latencyNanos >= 0 (got \(p.idleNanos), \(p.latencyNanos))"
            }
        }
        if !(1...CPUSet.maxCPUs).contains(cpus) { return "cpus must be 1...\(CPUSet.maxCPUs) (got \(cpus))" }
        return nil
    }

    // MARK: files

    /// The profile as JSON (pretty-printed, keys sorted, a final newline).
    public func json() throws -> Data {
        var data = try ReportJSON.encoder(pretty: true).encode(self)
        data.append(0x0A)
        return data
    }

    /// Reads a profile from a JSON file and checks it (``problem``).
    public static func load(path: String) throws(MachineProfileError) -> MachineProfile {
        let data: Data
        do { data = try JSONFile.read(path) } catch { throw .unreadable(path: path, reason: error.reason) }
        return try decode(data, source: path)
    }

    /// Decodes and checks a profile; `source` names it in errors.
    public static func decode(_ data: Data, source: String) throws(MachineProfileError) -> MachineProfile {
        let profile: MachineProfile
        do { profile = try JSONFile.decode(MachineProfile.self, from: data) } catch {
            throw .invalid(source: source, reason: error.reason)
        }
        if let problem = profile.problem { throw .invalid(source: source, reason: problem) }
        return profile
    }

    // MARK: shipped profiles

    /// Short names for shipped profiles: `native` is the profile of this
    /// project's host class, measured by `svmemu calibrate`.
    public static let aliases = ["native": "native-2core"]

    /// The names `--machine` accepts besides a file: the aliases, then the
    /// shipped profiles' own names.
    public static var shippedNames: [String] {
        let files = ShippedProfiles.names
        let aliases = Self.aliases.filter { files.contains($0.value) }.map(\.key).sorted()
        return aliases + files
    }

    /// The shipped profile `name` (an alias or a profile's own name, in any
    /// case, as every enumeration value of `svmemu`).
    public static func shipped(_ name: String) throws(MachineProfileError) -> MachineProfile {
        let lowered = name.lowercased()
        let known = shippedNames.first { $0.lowercased() == lowered } ?? name
        guard let url = ShippedProfiles.url(named: aliases[known] ?? known) else { throw .unknownName(name, known: shippedNames) }
        return try load(path: url.path)
    }

    /// What `--machine` names: a shipped profile by name (in any case),
    /// else a file, its path as given (a path with a `/`, a name ending in
    /// `.json`, or any existing file).
    public static func resolve(_ nameOrPath: String) throws(MachineProfileError) -> MachineProfile {
        let lowered = nameOrPath.lowercased()
        if shippedNames.contains(where: { $0.lowercased() == lowered }) { return try shipped(nameOrPath) }
        if nameOrPath.contains("/") || nameOrPath.hasSuffix(".json") || FileManager.default.fileExists(atPath: nameOrPath) {
            return try load(path: nameOrPath)
        }
        throw .unknownName(nameOrPath, known: shippedNames)
    }
}

/// Why a machine profile could not be used.
public enum MachineProfileError: Error, Equatable, CustomStringConvertible {
    /// Not a shipped profile's name, and no such file.
    case unknownName(String, known: [String])
    /// The file could not be read.
    case unreadable(path: String, reason: String)
    /// The file is not a valid profile.
    case invalid(source: String, reason: String)

    /// The error, for the user.
    public var description: String {
        switch self {
        case .unknownName(let name, let known):
            let list = known.isEmpty ? "none in this build (the profile bundle is not next to the binary)" : known.joined(separator: ", ")
            return "no machine profile named \(name): the shipped profiles are \(list), or give a profile's file"
        case .unreadable(let path, let reason):
            return "cannot read the machine profile \(path): \(reason)"
        case .invalid(let source, let reason):
            return "\(source) is not a valid machine profile: \(reason)"
        }
    }
}
