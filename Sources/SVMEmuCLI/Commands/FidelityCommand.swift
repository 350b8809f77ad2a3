// `svmemu fidelity`: the kernel rig's livelock cases on the emulator, beside the real kernel's results.
import ArgumentParser
import Foundation
import MirrorDriver
import SVMEmu
import SVMStress

/// Runs the livelock cases a real kernel ran (Tools/kernel-rig, `make
/// kernel-check`) on the emulator, deterministically, with the rig's machine
/// profile and driver shape, and prints kernel and emulator side by side.
struct FidelityCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fidelity",
        abstract: "Run the real kernel's livelock cases on the emulator and set both side by side.",
        discussion: """
            The reference is a real kernel's results (Data/kernel/livelock.json, written by \
            `make kernel-check`: Linux 6.12 with test_hmm in QEMU TCG, 2 vCPUs): for each case \
            THREADS:MUTEX:MICROS (threads reading each of 512 device-private pages after a barrier; \
            whether the driver takes a mutex around its migration; the fsleep() inside \
            migrate_to_ram) and each fault path (legacy, trylock), whether every page completed \
            and how many migrate_to_ram calls a page took, over several boots.

            Each case runs here under the deterministic scheduler once per seed of --seeds \
            (default 1-5; --seed S: that seed only), on --cpus \
            emulated CPUs, charging the --machine profile's measured costs (default qemu-tcg-2: \
            measured inside the rig's guest), with the rig's driver shape (every call sleeps, \
            with the kernel's fsleep rule). A run counts as a livelock when a page makes no \
            progress for --stall-seconds virtual seconds (default 30, the rig's own watchdog; \
            livelocking seeds run to the window). The runs share the host's cores (--jobs): \
            about 100 s of host time for 5 seeds on 2 cores. \
            No cost is fitted to these outcomes: \
            Docs/fidelity.md says how each was measured and what still differs.

            Under TCG the guest's timing follows its host's load: where the reference records \
            the host's load of a case's boots, a case compares with the boots of the profile's \
            load (its hostLoad: qemu-tcg-2 an idle host, qemu-tcg-2-loaded a loaded one), shown \
            as [idle host] in the table; --kernel-boots all compares with every boot.

            A row agrees when at least 4 in 5 seeds end as the kernel did (as on every boot, or \
            as on some boot when the kernel's boots differed); "calls" compares calls per page \
            (within 2x of the kernel's range over boots). Exits 1 when \
            an outcome differs. With --json prints one object (Docs/json.md) whose results hold \
            the reference (kernel, date, qemu) and one row per case and policy: case, policy, \
            kernel and emulator (outcome, majority, completed, livelocked, callsPerPage [low, \
            high]), seedsAgreeing, outcomeAgrees, callsWithin2x, kernelHostLoad.

            \(ExitStatus.helpParagraph)
            """)

    @Option(name: .long, help: "The machine profile whose costs the runs charge: a shipped name or a profile file (default qemu-tcg-2).")
    var machine = "qemu-tcg-2"

    @Option(name: .long, help: "The kernel's results to compare with (default: the shipped Data/kernel/livelock.json).")
    var reference: String?

    @Option(name: .long, help: "The seeds each case runs with: \(SeedsSyntax.help) (default 1-5; at most 100 seeds).")
    var seeds: String?

    @Option(name: .long, parsing: .unconditional, help: "Run each case with this one seed only (0 to 2^64-1), instead of --seeds.")
    var seed: UInt64?

    @Option(name: .long, parsing: .unconditional, help: "Emulated CPUs (1-64, default 2: the rig's vCPUs).")
    var cpus = 2

    @Option(name: .long, help: "Only these cases, comma-separated (for example 8:1:50,2:1:50).")
    var cases: String?

    @Option(name: .long, help: "Only this fault path: legacy or trylock (default both).")
    var faultPolicy: String?

    @Option(name: .long, parsing: .unconditional, help: "Virtual seconds without page progress that count as a livelock (0.01-60, default 30: the rig's watchdog; 1 runs faster and calls more runs livelocks than the kernel would).")
    var stallSeconds = FidelityHarness.rigWatchdogSeconds

    @Option(name: .long, help: "Which migrateToRAM calls sleep: every-call (the rig's) or copy.")
    var driverWork = "every-call"

    @Option(name: .long, help: "How they sleep: fsleep (the rig's), sleep or spin.")
    var driverWait = "fsleep"

    @Option(name: .long, help: "Which of the kernel's boots a case compares with: same-load (the boots whose host load is the profile's hostLoad, when the case has any; else every boot) or all.")
    var kernelBoots = "same-load"

    @Option(name: .long, parsing: .unconditional, help: "Runs at a time, each on a host thread (1-64, default: the host's cores); the rows are the same for any number.")
    var jobs = FidelityHarness.Settings().jobs

    @OptionGroup var json: JSONOutputOptions

    @OptionGroup var report: ReportFileOptions

    @OptionGroup var alwaysDeterministic: AlwaysDeterministicFlag

    /// The seeds without `--seeds` and `--seed`.
    static let defaultSeeds = "1-5"

    mutating func validate() throws {
        if let text = seeds, !text.isEmpty, text.allSatisfy(\.isNumber), let n = Int(text), n >= 1 {
            // The old spelling: --seeds N, a count (the seeds 1 to N).
            Deprecation.warn(old: "fidelity --seeds \(n) (a count of seeds)", new: "--seeds 1-\(n)")
            seeds = "1-\(n)"
        }
        if seeds != nil && seed != nil { throw ValidationError("give --seed (one seed) or --seeds (a set), not both") }
        _ = try seedSet()
        try checkRange(cpus, 1...64, flag: "--cpus")
        try checkRange(jobs, 1...64, flag: "--jobs")
        guard (0.01...60).contains(stallSeconds) else {
            throw ValidationError("--stall-seconds must be 0.01...60 (got \(stallSeconds))")
        }
        if let faultPolicy, !["legacy", "trylock"].contains(faultPolicy.lowercased()) {
            throw ValidationError("invalid --fault-policy '\(faultPolicy)'; valid values: legacy, trylock")
        }
        _ = try shape()
        _ = try kernelBootsChoice()
        if let cases {
            for c in cases.split(separator: ",") where c.split(separator: ":").count != 3 {
                throw ValidationError("--cases: '\(c)' is not THREADS:MUTEX:MICROS (for example 8:1:50)")
            }
        }
        // The files --reference and --machine name, and the cases --cases
        // names: checked here, so that an error shows this command's usage.
        _ = try loadReference()
        _ = try settings()
    }

    /// `--kernel-boots`, in any case. Throws `ValidationError` naming the flag.
    func kernelBootsChoice() throws -> FidelityHarness.KernelBoots {
        guard let k = FidelityHarness.KernelBoots(rawValue: kernelBoots.lowercased()) else {
            throw ValidationError("invalid --kernel-boots '\(kernelBoots)'; valid values: "
                                  + FidelityHarness.KernelBoots.allCases.map(\.rawValue).joined(separator: ", "))
        }
        return k
    }

    func shape() throws -> (DriverWorkShape, DriverWait) {
        try StormScenarioOptions.driverShape(work: driverWork, wait: driverWait)
    }

    /// The reference, cut to `--cases` and `--fault-policy`.
    func loadReference() throws -> KernelLivelockReference {
        var r: KernelLivelockReference
        do {
            r = try reference.map { try KernelLivelockReference.load(URL(fileURLWithPath: $0)) } ?? KernelLivelockReference.shipped()
        } catch {
            throw ValidationError("--reference: \(error)")
        }
        if let cases {
            let wanted = Set(cases.split(separator: ",").map(String.init))
            var known: [String] = []   // in the reference's order
            for c in r.cases where !known.contains(c.case) { known.append(c.case) }
            if let missing = wanted.subtracting(known).sorted().first {
                throw ValidationError("--cases: the reference has no case \(missing) (it has \(known.joined(separator: ", ")))")
            }
            r.cases = r.cases.filter { wanted.contains($0.case) }
        }
        if let faultPolicy { r.cases = r.cases.filter { $0.policy == faultPolicy.lowercased() } }
        return r
    }

    /// The harness settings the options give.
    func settings() throws -> FidelityHarness.Settings {
        let profile: MachineProfile
        do { profile = try MachineProfile.resolve(machine) } catch {
            throw ValidationError("--machine: \(error.description)")
        }
        var s = FidelityHarness.Settings()
        s.machine = profile
        s.cpus = cpus
        s.seeds = Array(try seedSet().seeds)
        s.stallSeconds = stallSeconds
        s.jobs = jobs
        s.kernelBoots = try kernelBootsChoice()
        (s.driverWork, s.driverWait) = try shape()
        return s
    }

    /// The seeds of `--seed` or `--seeds` (default 1-5). Throws `ValidationError` naming the flag.
    func seedSet() throws(ValidationError) -> SeedSet {
        if let seed { return SeedSet(SeedRange(first: seed, last: seed)) }
        return try SeedsSyntax.parse(seeds ?? Self.defaultSeeds, maxCount: 100)
    }

    /// What `--json` prints as results.
    struct Results: Encodable {
        let kernel: String
        let date: String
        let qemu: String
        let machine: String
        let cpus: Int
        let seeds: Int
        let rows: [FidelityRow]
        let agree: Int
        let differ: Int
    }

    func run() throws {
        let reference = try loadReference()
        let settings = try settings()
        let seeds = settings.seeds.count
        let line = ProgressLine(label: "svmemu fidelity")
        let rows: [FidelityRow]
        do {
            rows = try FidelityHarness.run(reference, settings) { row, done, total in
                line.say("\(done)/\(total) cases (\(row.case) \(row.policy): \(row.emulator.outcome))")
            }
        } catch {
            line.done()
            throw CLIError.runFailed("svmemu fidelity: \(error)")
        }
        line.done()
        let differ = rows.filter { !$0.outcomeAgrees }.count
        try printReport(Results(kernel: reference.kernel, date: reference.date, qemu: reference.qemu, machine: machine, cpus: cpus,
                                seeds: seeds, rows: rows, agree: rows.count - differ, differ: differ),
                        json: json.json, text: Self.table(rows, reference, machine: machine, seeds: seeds))
        if differ > 0 { throw ExitCode(1) }
    }

    static func table(_ rows: [FidelityRow], _ r: KernelLivelockReference, machine: String, seeds: Int) -> String {
        func side(_ s: FidelitySide) -> String {
            let calls = s.callsPerPage.map { $0[0] == $0[1] ? String(format: "%.2f", $0[0]) : String(format: "%.2f-%.2f", $0[0], $0[1]) }
            switch s.outcome {
            case "livelock": return "LIVELOCK (\(s.livelocked)/\(s.livelocked + s.completed))"
            case "mixed": return "mixed: \(s.completed) complete, \(s.livelocked) livelock" + (calls.map { ", \($0)" } ?? "")
            default: return "completes, " + (calls ?? "-")
            }
        }
        var table = [["CASE", "POLICY", "KERNEL (\(r.kernel), BOOTS)", "EMULATOR (\(machine), \(seeds) SEEDS)", "OUTCOME", "CALLS/PAGE"]]
        for row in rows {
            let seedsShown = "\(row.seedsAgreeing)/\(row.emulator.completed + row.emulator.livelocked) seeds"
            table.append([row.case, row.policy, side(row.kernel) + (row.kernelHostLoad.map { " [\($0) host]" } ?? ""), side(row.emulator),
                          (row.outcomeAgrees ? "agrees, " : "DIFFERS, ") + seedsShown,
                          row.callsWithin2x.map { $0 ? "within 2x" : "beyond 2x" } ?? "-"])
        }
        let agree = rows.filter(\.outcomeAgrees).count
        let calls = rows.compactMap(\.callsWithin2x)
        return "kernel: Linux \(r.kernel), \(r.date), \(r.qemu.split(separator: " ").prefix(8).joined(separator: " ")) ...\n"
            + "case = threads:driver mutex:µs slept in migrate_to_ram; 512 pages\n\n"
            + Table.columns(table)
            + "\noutcomes agree in \(agree) of \(rows.count) rows; calls per page within 2x in \(calls.filter { $0 }.count) of \(calls.count)\n"
    }
}
