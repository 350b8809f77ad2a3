import Foundation
import SVMEmu

/// Measures this host's primitives into a ``MachineProfile`` (`svmemu
/// calibrate`). Every figure is the median of `rounds` repetitions of a
/// microbenchmark (`HostProbe`, SVMEmu's Host layer), each repetition a batch of thousands of
/// operations, or for the one-event measurements (a wake-up) `rounds` × 20
/// events. The two-CPU measurements use the first two CPUs the process may
/// run on; a one-CPU host reports them as 0 and says so in ``MachineProfile/methods``.
public enum Calibration {
    /// What a calibration is asked for.
    public struct Settings: Sendable, Equatable {
        /// Repetitions of each measurement (the median is kept).
        public var rounds = 21
        /// The profile's name (default `native-<N>core`).
        public var name: String? = nil
        /// The profile's description.
        public var description: String? = nil
        /// memcpy working sets, bytes (4 KiB to 64 MiB, doubling).
        public var copySizes: [Int] = (12...26).map { 1 << $0 }
        /// Pages of the page-walk chase (each load a TLB miss at any size
        /// above the second-level TLB's reach).
        public var walkPages = 8192
        /// Rounds of the stall measurement (0: not measured).
        public var stallRounds = 5
        /// Nanoseconds of each stall round.
        public var stallRoundNanos: UInt64 = 2_000_000_000

        /// The defaults.
        public init() {}
    }

    /// The tool string recorded in profiles.
    public static let tool = "svmemu calibrate 0.1"

    /// One measured figure: the median and the spread of its repetitions.
    public struct Figure: Sendable, Equatable {
        /// The median of the repetitions.
        public var median: Double
        /// The lowest.
        public var low: Double
        /// The highest.
        public var high: Double
        init(_ values: [Double]) {
            let v = values.filter(\.isFinite).sorted()
            median = v.isEmpty ? 0 : (v.count % 2 == 1 ? v[v.count / 2] : (v[v.count / 2 - 1] + v[v.count / 2]) / 2)
            low = v.first ?? 0
            high = v.last ?? 0
        }
        init(median: Double, low: Double, high: Double) {
            self.median = median
            self.low = low
            self.high = high
        }
    }

    /// A calibration's outcome: the profile, and each cost's spread.
    public struct Result: Sendable {
        /// The profile measured.
        public var profile: MachineProfile
        /// Each cost's repetitions, by cost key (low and high of the repetitions).
        public var figures: [String: Figure]
    }

    /// Why a calibration could not run.
    public struct Failure: Error, CustomStringConvertible {
        /// What went wrong, for the user.
        public let description: String

        /// The host refused measurement `what` with `error`.
        init(refused what: String, _ error: Errno) {
            description = "\(what): the host refused (\(String(cString: strerror(error.rawValue))))"
        }
        init(description: String) { self.description = description }
    }

    /// Runs every measurement; `progress` hears which one runs.
    public static func run(_ settings: Settings, progress: ((String) -> Void)? = nil) throws(Failure) -> Result {
        let rounds = max(1, settings.rounds)
        let hostCPUs = HostProbe.cpus
        guard hostCPUs >= 1 else { throw Failure(description: "cannot read this process's CPUs (sched_getaffinity)") }
        let (a, b) = twoCPUs()
        var figures: [String: Figure] = [:]
        var methods: [String: String] = [:]

        /// `body`'s figures; a refusal names `what`.
        func probe<T>(_ what: String, _ body: () throws(Errno) -> T) throws(Failure) -> T {
            progress?(what)
            do { return try body() } catch { throw Failure(refused: what, error) }
        }
        func measure(_ what: String, _ p: HostProbe.Single) throws(Failure) -> [Double] {
            try probe(what) { () throws(Errno) in try HostProbe.measure(p, samples: rounds) }
        }
        /// Records `key` as the median of `values`.
        func keep(_ key: String, _ values: [Double], _ method: String) -> Double {
            let f = Figure(values)
            figures[key] = f
            methods[key] = method
            return f.median
        }
        /// Records `key` as `a - b`, per repetition, clamped at 0.
        func keepDifference(_ key: String, _ x: [Double], _ y: [Double], _ method: String) -> Double {
            keep(key, zip(x, y).map { max(0, $0 - $1) }, method)
        }

        let hits = try measure("TLB hit", .tlbHit)
        let tlbHit = keep("tlbHit", hits, "a random pointer chase over the 64 cache lines of one 4 KiB page "
                          + "(every load hits the L1 cache and the first-level TLB), 2^20 dependent loads a repetition")
        let (walks, packed) = try probe("page-table walk") { () throws(Errno) in
            try HostProbe.pageWalk(samples: rounds, pages: settings.walkPages)
        }
        let pageTableWalk = keepDifference("pageTableWalk", walks, packed,
            "a random pointer chase with one cache line in each of \(settings.walkPages) 4 KiB pages "
            + "(\(settings.walkPages * 4 / 1024) MiB, MADV_NOHUGEPAGE: every load misses both TLB levels, the lines stay in L2) "
            + "minus the same chase over as many lines packed into \(settings.walkPages * 64 / 1024) KiB (TLB hits)")
        let faults = try measure("minor fault", .minorFault)
        let faultEntryExit = keepDifference("faultEntryExit", faults, Array(repeating: tlbHit, count: rounds),
            "the first read of each of 256 pages of a fresh private anonymous mapping (MADV_NOHUGEPAGE: a minor fault "
            + "that maps the zero page), per page, minus a TLB hit")
        _ = keep("syscall", try measure("system call", .syscall),
                 "syscall(SYS_getppid), 20000 a repetition")
        let futexWake = keep("futexWake", try measure("futex wake", .futexWake),
                             "FUTEX_WAKE_PRIVATE of a word nobody waits on, 20000 a repetition")
        let futexWait = keep("futexWait", try measure("futex wait", .futexWait),
                             "FUTEX_WAIT_PRIVATE with a value that does not match (EAGAIN at once), 20000 a repetition")
        let (locks, unlocks) = try probe("lock") { () throws(Errno) in try HostProbe.lock(samples: rounds) }
        _ = keep("lockUncontended", locks,
            "the emulator's futex mutex (svm_mutex_lock: one compare-and-exchange) on one thread: 10^6 lock/unlock pairs "
            + "minus 10^6 unlocks alone")
        _ = keep("unlock", unlocks, "svm_mutex_unlock (one exchange, no waiter to wake), 10^6 a repetition")
        _ = keep("yield", try measure("yield", .yield),
                 "sched_yield() pinned to one CPU, 20000 a repetition (nothing else runnable there unless the host is busy)")

        var wakeLatency = 0.0, contextSwitch = 0.0, spinRound = 0.0
        var ipiSendToReceipt = 0.0, ipiRoundTrip = 0.0, localFlush = 0.0
        let oneCPU = "not measured: the process may run on one CPU only"
        if let a, let b {
            let wakes = try probe("wake-up latency") { () throws(Errno) in
                try HostProbe.wakeLatency(samples: rounds * 20, a: a, b: b)
            }
            wakeLatency = keep("wakeLatency", wakes,
                "a thread on CPU \(a) stores a futex word and calls FUTEX_WAKE; the thread on CPU \(b), asleep in FUTEX_WAIT "
                + "for 200 µs, reads the clock when it runs: the time between, \(rounds * 20) wake-ups")
            let switches = try measure("context switch", .contextSwitch(cpu: a))
            contextSwitch = keepDifference("contextSwitch", switches,
                                           Array(repeating: futexWake + futexWait, count: rounds),
                "two threads pinned to CPU \(a) hand a futex word back and forth (2000 round trips a repetition); "
                + "per switch, minus one FUTEX_WAKE and one FUTEX_WAIT (each switch makes both calls)")
            spinRound = keep("spinRound", try measure("spin round", .spinRound(a: a, b: b)),
                "on CPU \(a): load, compare-and-exchange and pause on a cache line a thread on CPU \(b) keeps writing, "
                + "10^5 rounds a repetition")
            let shootdown = try probe("TLB shootdown") { () throws(Errno) in try HostProbe.shootdown(samples: rounds, a: a, b: b) }
            let (local, remote) = (shootdown.local, shootdown.remote)
            localFlush = keep("localFlush", local,
                "mprotect() of one present, written page to read-only and back (2000 calls a repetition) while the "
                + "process's other thread sleeps (its CPU skipped): a system call, the entry's change and a local "
                + "flush, per call")
            ipiRoundTrip = keepDifference("ipiRoundTrip", remote, local,
                "the same mprotect() calls while the process's other thread spins in user mode on CPU \(b) "
                + "(each call must then flush that CPU too and wait for it), minus the local call; local and "
                + "remote repetitions alternate")
            let perCall = Figure(shootdown.interrupted).median
            let handled = Figure(shootdown.handling).median
            if perCall >= 0.5 {
                ipiSendToReceipt = keep("ipiSendToReceipt", zip(remote, local).map { max(0, ($0 - $1 - handled) / 2) },
                    "derived: (ipiRoundTrip - the IPI's handling on CPU \(b)) / 2, the handling being the median "
                    + "interruption (\(Int(handled.rounded())) ns) the spinning thread saw in its own clock_gettime loop "
                    + "during the flushes (\(String(format: "%.2f", perCall)) a call); the sender's and the "
                    + "acknowledgement's legs taken as equal")
            } else {
                ipiSendToReceipt = keep("ipiSendToReceipt", zip(remote, local).map { max(0, ($0 - $1) / 2) },
                    "derived: ipiRoundTrip / 2. The spinning thread saw \(String(format: "%.2f", perCall)) interruptions "
                    + "a call: the flushes did not reach its CPU as interrupts (a paravirtual remote flush: the "
                    + "hypervisor flushes for the guest), so no handling time is known and the legs are taken as equal")
            }
        } else {
            for key in ["wakeLatency", "contextSwitch", "spinRound", "ipiSendToReceipt", "ipiRoundTrip", "localFlush"] {
                methods[key] = oneCPU
                figures[key] = Figure(median: 0, low: 0, high: 0)
            }
        }

        var memcpy: [MachineProfile.CopyBandwidth] = []
        for size in settings.copySizes {
            let gbps = try measure("memcpy \(size >> 10) KiB", .memcpy(bytes: size))
            memcpy.append(.init(workingSetBytes: size, gbPerSecond: Figure(gbps).median))
        }
        methods["memcpy"] = "memcpy() between two buffers of the working set's size each (MADV_NOHUGEPAGE), repeated "
            + "for at least 64 MiB a repetition (cache-warm when they fit): bytes per nanosecond, median of \(rounds)"

        progress?("scheduler tick")
        let (tickNanos, tickMethod) = tick(cpu: a ?? 0)
        let (slice, sliceMethod) = baseSlice(cpus: hostCPUs)
        let (preemption, preemptionMethod) = self.preemption()
        methods["tickNanos"] = tickMethod
        methods["baseSliceNanos"] = sliceMethod
        methods["preemption"] = preemptionMethod

        var stalls: MachineProfile.Stalls? = nil
        if settings.stallRounds > 0 {
            progress?("stalls (\(settings.stallRounds) x \(Double(settings.stallRoundNanos) / 1e9) s)")
            (stalls, methods["stalls"]) = try measureStalls(a: a ?? 0, b: b ?? -1, rounds: settings.stallRounds,
                                                            roundNanos: settings.stallRoundNanos, tickNanos: tickNanos)
        }

        // A tenth of a nanosecond (a hundredth of a GB/s) is below any
        // repetition's spread: the file keeps no false digits.
        func r(_ v: Double) -> Double { (v * 10).rounded() / 10 }
        memcpy = memcpy.map { .init(workingSetBytes: $0.workingSetBytes, gbPerSecond: ($0.gbPerSecond * 100).rounded() / 100) }
        let costs = MachineProfile.Costs(
            tlbHit: r(tlbHit), pageTableWalk: r(pageTableWalk), faultEntryExit: r(faultEntryExit),
            syscall: r(figures["syscall"]!.median), futexWake: r(futexWake), futexWait: r(futexWait),
            wakeLatency: r(wakeLatency), contextSwitch: r(contextSwitch), spinRound: r(spinRound),
            lockUncontended: r(figures["lockUncontended"]!.median), unlock: r(figures["unlock"]!.median),
            yield: r(figures["yield"]!.median), ipiSendToReceipt: r(ipiSendToReceipt), ipiRoundTrip: r(ipiRoundTrip),
            localFlush: r(localFlush))
        let cpus = min(hostCPUs, CPUSet.maxCPUs)
        methods["deviceFault"] = MachineProfile.DeviceFault.notMeasuredMethod
        let profile = MachineProfile(
            name: settings.name ?? "native-\(cpus)core",
            description: settings.description ?? "This host, measured by svmemu calibrate (\(rounds) repetitions a cost).",
            measuredOn: machineDescription(), date: today(), tool: tool, cpus: cpus, costs: costs,
            memcpy: memcpy,
            scheduler: .init(baseSliceNanos: slice, tickNanos: tickNanos, preemption: preemption),
            methods: methods, stalls: stalls, deviceFault: .init(entryToReferenceNanos: 0, referenceToCollectNanos: 0))
        return Result(profile: profile, figures: figures)
    }

    /// vCPU stalls (``HostProbe/stalls(a:b:rounds:roundNanos:tickNanos:)``): the figures and their method.
    static func measureStalls(a: Int32, b: Int32, rounds: Int, roundNanos: UInt64,
                              tickNanos: UInt64) throws(Failure) -> (MachineProfile.Stalls, String) {
        let f: HostProbe.Stalls
        do { f = try HostProbe.stalls(a: a, b: b, rounds: rounds, roundNanos: roundNanos, tickNanos: tickNanos) } catch {
            throw Failure(refused: "stalls", error)
        }
        func r(_ v: Double) -> Double { (v * 10).rounded() / 10 }
        let stalls = MachineProfile.Stalls(
            ratePerSecond: r(f.ratePerSecond), meanNanos: r(f.meanNanos), p50Nanos: r(f.p50Nanos),
            p90Nanos: r(f.p90Nanos), p99Nanos: r(f.p99Nanos), maxNanos: r(f.maxNanos),
            thresholdNanos: r(f.thresholdNanos), tickGapsPerSecond: r(f.tickGapsPerSecond),
            tickGapP50Nanos: r(f.tickGapP50Nanos))
        let cpus = b >= 0 ? "CPUs \(a) and \(b) (at the same time)" : "CPU \(a)"
        let method = "On \(cpus) one pinned thread each reads CLOCK_MONOTONIC in a loop, \(rounds) rounds of "
            + String(format: "%.1f s", Double(roundNanos) / 1e9) + ", and notes every gap between two reads above "
            + String(format: "%.0f ns", f.thresholdNanos) + " (5 x the median loop of "
            + String(format: "%.0f ns", f.loopNanos) + ", at least 2 µs). Gaps in which the thread's involuntary "
            + "context switches went up (getrusage RUSAGE_THREAD: the kernel ran another task there) are not stalls "
            + String(format: "(%.1f a second a CPU)", f.preemptionsPerSecond) + ". The tick's gaps are not stalls: "
            + (f.byTimerCount
               ? "a gap in which the CPU's local timer interrupt count went up (/proc/interrupts LOC, read after each gap), "
               : "/proc/interrupts unreadable, so by phase: the start times modulo the tick (\(tickNanos) ns) of the gaps no "
                 + "longer than a quarter tick are binned in 100 bins a CPU and the bin that stands out is the tick's; a gap there ")
            + "no longer than a quarter tick and than 4 x the median of such short gaps is the tick's ("
            + String(format: "%.1f a second a CPU, median %.0f ns", f.tickGapsPerSecond, f.tickGapP50Nanos)
            + "; 0 when the tick's handler stays under the threshold). Every other gap is a stall: "
            + "\(f.stalls) in " + String(format: "%.1f", f.seconds) + " CPU-seconds; rate per second per CPU, "
            + "mean, nearest-rank percentiles and the longest over both CPUs"
            + String(format: "; the CPUs were stalled %.1f%% of the time", f.stalledShare * 100)
            + (b >= 0 ? String(format: ", and in %.0f%% of a CPU's stalled time the other was stalled too (%.0f%% for the "
                               + "stalls of at least the p99; the model draws each CPU's stalls on their own)",
                               f.sharedShare * 100, f.longSharedShare * 100) : "")
            + (f.dropped > 0 ? " (\(f.dropped) gaps beyond the buffer not counted)" : "") + "."
        return (stalls, method)
    }

    // MARK: the host

    /// The first two CPUs the process may run on.
    static func twoCPUs() -> (Int32?, Int32?) { HostProbe.firstTwoCPUs() }

    /// The tick: local timer interrupts per second on a busy CPU, rounded to
    /// the nearest CONFIG_HZ choice (100, 250, 300, 1000).
    static func tick(cpu: Int32) -> (UInt64, String) {
        // The configuration is the kernel's own word; the interrupt count
        // also counts other timers when the host is busy.
        if let config = kernelConfig(),
           let line = config.split(separator: "\n").first(where: { $0.hasPrefix("CONFIG_HZ=") }),
           let hz = UInt64(line.dropFirst("CONFIG_HZ=".count)), hz > 0 {
            return (1_000_000_000 / hz, "the kernel's configuration (CONFIG_HZ=\(hz), from /proc/config.gz or /boot/config-*)")
        }
        let hz = HostProbe.tickHz(cpu: cpu, millis: 500)
        let choices: [Double] = [100, 250, 300, 1000]
        if hz > 0 {
            let nearest = choices.min { abs($0 - hz) < abs($1 - hz) }!
            return (UInt64(1e9 / nearest), String(format: "local timer interrupts (/proc/interrupts, LOC) on CPU %d kept busy for 0.5 s: %.0f a second, "
                                              + "the nearest CONFIG_HZ is %.0f", cpu, hz, nearest))
        }
        return (1_000_000, "not measured (/proc/interrupts unreadable): HZ=1000 assumed")
    }

    /// EEVDF's base slice: debugfs when mounted, else the kernel's rule
    /// (0.75 ms × (1 + log2 of the CPUs, at most 8), SCHED_TUNABLESCALING_LOG).
    static func baseSlice(cpus: Int) -> (UInt64, String) {
        for path in ["/sys/kernel/debug/sched/base_slice_ns", "/proc/sys/kernel/sched_base_slice_ns"] {
            if let text = try? String(contentsOfFile: path, encoding: .utf8),
               let v = UInt64(text.trimmingCharacters(in: .whitespacesAndNewlines)), v > 0 {
                return (v, "read from \(path)")
            }
        }
        let factor = 1 + UInt64(Int.bitWidth - 1 - min(max(cpus, 1), 8).leadingZeroBitCount)
        return (750_000 * factor, "not readable (debugfs not mounted): the kernel's default rule, 0.75 ms x (1 + log2 min(CPUs, 8)) "
                + "= 0.75 ms x \(factor) for \(cpus) CPUs (kernel/sched/fair.c, SCHED_TUNABLESCALING_LOG)")
    }

    /// The preemption model: debugfs, else the kernel's boot message
    /// ("Dynamic Preempt: ..."), else its configuration.
    static func preemption() -> (String, String) {
        if let text = try? String(contentsOfFile: "/sys/kernel/debug/sched/preempt", encoding: .utf8),
           let open = text.firstIndex(of: "("), let close = text[open...].firstIndex(of: ")") {
            return (String(text[text.index(after: open)..<close]), "read from /sys/kernel/debug/sched/preempt")
        }
        if let config = kernelConfig() {
            for (option, model) in [("CONFIG_PREEMPT_NONE=y", "none"), ("CONFIG_PREEMPT_VOLUNTARY=y", "voluntary"),
                                    ("CONFIG_PREEMPT_LAZY=y", "lazy"), ("CONFIG_PREEMPT=y", "full")]
            where config.contains(option) {
                return (model, "the kernel's configuration (/proc/config.gz: \(option)); a preempt= boot option could change it")
            }
        }
        return ("unknown", "neither debugfs nor the kernel's configuration readable")
    }

    static func kernelConfig() -> String? {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", "zcat /proc/config.gz 2>/dev/null || cat /boot/config-$(uname -r) 2>/dev/null"]
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = FileHandle.nullDevice
        do { try p.run() } catch { return nil }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return data.isEmpty ? nil : String(decoding: data, as: UTF8.self)
    }

    static func machineDescription() -> String {
        var model = "unknown CPU"
        if let info = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
           let line = info.split(separator: "\n").first(where: { $0.hasPrefix("model name") }),
           let colon = line.firstIndex(of: ":") {
            model = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        var u = utsname()
        uname(&u)
        func field<T>(_ value: T) -> String {
            withUnsafeBytes(of: value) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        }
        var hypervisor = ""
        if let info = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8), info.contains(" hypervisor") {
            hypervisor = ", a virtual machine"
        }
        return "\(model), \(HostProbe.cpus) CPUs\(hypervisor), Linux \(field(u.release))"
    }

    static func today() -> String {
        var t = time(nil)
        var tm = tm()
        gmtime_r(&t, &tm)
        return String(format: "%04d-%02d-%02d", Int(tm.tm_year) + 1900, Int(tm.tm_mon) + 1, Int(tm.tm_mday))
    }
}
