// `svmemu calibrate`: measure this host's primitives into a machine profile.
import ArgumentParser
import Foundation
import SVMEmu
import SVMStress

/// Measures what a TLB hit, a page-table walk, a minor fault, a system call,
/// a futex call, a wake-up, a context switch, a spin round, a lock, a yield,
/// a TLB shootdown and memcpy cost on this host, and prints them as a
/// machine profile (`--machine FILE` of the deterministic commands).
struct CalibrateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "calibrate",
        abstract: "Measure this host's costs (faults, futexes, wake-ups, switches, IPIs, memcpy) into a machine profile.",
        discussion: """
            Runs a microbenchmark for each cost a deterministic run charges as virtual time and for \
            the rest of a machine profile: a TLB hit, a page-table walk, a minor fault's entry and \
            exit, getppid, FUTEX_WAKE and FUTEX_WAIT, the wake-up latency from one CPU to another, \
            a context switch, a spin round on a contended line, an uncontended lock and unlock, \
            sched_yield, a TLB shootdown (IPI round trip and send-to-receipt) and a local flush, \
            memcpy's bandwidth from 4 KiB to 64 MiB, the scheduler's tick, base slice and \
            preemption model, and vCPU stalls (a clock loop on each CPU for 5 x 2 s: how often and \
            how long a busy CPU stops running its thread for reasons outside the kernel, the tick \
            and preemptions by other tasks excluded). Each figure is the median of --rounds repetitions; the table shows \
            the spread and how each was measured (Docs/machine-profiles.md). The two-CPU \
            measurements pin threads to the first two CPUs the process may use. It takes about \
            about 40 seconds; other work on the host shows in the figures, so calibrate an idle host.

            --output FILE writes the profile, which `--machine FILE` of livelock, explore, replay, \
            soak, overhead and numa reads. With --json prints one object (Docs/json.md) whose \
            results are the profile's keys: name, description, measuredOn, date, tool, cpus, costs, \
            memcpy, scheduler, stalls and methods.

            \(ExitStatus.helpParagraph)
            """)

    @Option(name: .long, parsing: .unconditional, help: "Repetitions of each measurement; the median is kept (3-1001).")
    var rounds = 21

    @Option(name: .long, help: "The profile's name (default native-<CPUs>core).")
    var name: String?

    @Option(name: .long, help: "The profile's description.")
    var description: String?

    @Option(name: .long, help: "Write the profile (JSON, for --machine FILE) to this file.")
    var output: String?

    @Flag(name: .long, help: "No progress line on standard error.")
    var quiet = false

    @OptionGroup var json: JSONOutputOptions

    func validate() throws {
        try checkRange(rounds, 3...1001, flag: "--rounds")
        if let name, name.isEmpty || name.contains("/") {
            throw ValidationError("--name must be a non-empty name without '/' (got '\(name)')")
        }
        if let output { try OutputFile(output).checkWritable() }
    }

    func run() throws {
        var settings = Calibration.Settings()
        settings.rounds = rounds
        settings.name = name
        settings.description = description
        let line = ProgressLine(label: "svmemu calibrate")
        let say = quiet ? nil : line.sink
        let result: Calibration.Result
        do { result = try Calibration.run(settings) { say?("measuring \($0)") } } catch {
            line.done()
            throw CLIError.runFailed("svmemu: calibration failed: \(error.description)")
        }
        line.done()
        if let output {
            try OutputFile(output).write(String(decoding: try result.profile.json(), as: UTF8.self))
        }
        try printReport(result.profile, json: json.json,
                        text: Self.table(result) + (output.map { "profile written to \($0)\n" } ?? ""))
    }

    /// The readable report: one row per cost (median, spread, what a run
    /// charges for it), the copy bandwidths, the scheduler, then each method.
    static func table(_ r: Calibration.Result) -> String {
        let p = r.profile
        let charged = p.virtualCosts
        let charges: [String: String] = [
            "tlbHit": "access \(charged.access)", "faultEntryExit": "fault \(charged.fault)",
            "lockUncontended": "lock \(charged.lock)", "unlock": "unlock \(charged.unlock)",
            "futexWake": "futex \(charged.futex) (the dearer)", "futexWait": "futex \(charged.futex) (the dearer)",
            "wakeLatency": "wake \(charged.wake)", "yield": "yield \(charged.yield)",
            "contextSwitch": "contextSwitch \(charged.contextSwitch)", "spinRound": "spinRound \(charged.spinRound)",
        ]
        func ns(_ v: Double) -> String { v >= 100 ? String(format: "%.0f", v) : String(format: "%.1f", v) }
        var rows = [["COST", "NS (MEDIAN)", "LOW-HIGH", "A RUN CHARGES (NS)"]]
        for (key, v) in p.costs.all {
            let f = r.figures[key]
            rows.append([key, ns(v), f.map { "\(ns($0.low))-\(ns($0.high))" } ?? "-", charges[key] ?? "-"])
        }
        var out = "\(p.name): \(p.measuredOn), \(p.date)\n\n" + Table.columns(rows) + "\n"
        var copy = [["MEMCPY WORKING SET", "GB/S"]]
        for m in p.memcpy { copy.append([ByteSize.format(m.workingSetBytes), String(format: "%.1f", m.gbPerSecond)]) }
        out += Table.columns(copy)
        out += String(format: "copyPerKiB charged: %d ns (memcpy at 1-2 MiB: %.1f ns a KiB)\n\n", charged.copyPerKiB, p.copyNanosPerKiB)
        out += "scheduler: base slice \(Double(p.scheduler.baseSliceNanos) / 1e6) ms, tick \(Double(p.scheduler.tickNanos) / 1e6) ms, "
            + "preemption \(p.scheduler.preemption)\n\n"
        if let st = p.stalls {
            var rows = [["STALLS", "PER SECOND A CPU", "MEAN NS", "P50", "P90", "P99", "MAX", "THRESHOLD"]]
            rows.append(["vCPU stalls", String(format: "%.1f", st.ratePerSecond), ns(st.meanNanos), ns(st.p50Nanos),
                         ns(st.p90Nanos), ns(st.p99Nanos), ns(st.maxNanos), ns(st.thresholdNanos)])
            if let rate = st.tickGapsPerSecond, let p50 = st.tickGapP50Nanos {
                rows.append(["tick (excluded)", String(format: "%.1f", rate), "-", ns(p50), "-", "-", "-", "-"])
            }
            out += Table.columns(rows) + "\n"
        }
        out += "how each was measured:\n"
        for key in MachineProfile.Costs.keys + ["memcpy", "tickNanos", "baseSliceNanos", "preemption", "stalls"] {
            if let m = p.methods[key] { out += "  \(key): \(m)\n" }
        }
        return out
    }
}
