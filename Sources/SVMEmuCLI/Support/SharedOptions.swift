// Option groups that several commands share: one declaration, one help text
// and one check each.
import ArgumentParser
import MirrorDriver
import SVMEmu
import SVMStress

/// `--json`: one JSON object on standard output instead of the tables, in
/// the shape every command shares (`JSONReport`, Docs/json.md).
struct JSONOutputOptions: ParsableArguments {
    @Flag(name: .long, help: "Print one JSON object instead of the tables (arguments, host, version and the results; see Docs/json.md).")
    var json = false
}

/// `--rounds` of `bench memory`, `bench migrate` and `bench thp`: timed
/// rounds (the best reported; `bench thp`: the mean, as the kernel test).
struct BenchRoundsOptions: ParsableArguments {
    @Option(name: .long, parsing: .unconditional, help: "Timed rounds of each measurement (1-100; bench memory and bench migrate report the best, bench thp the mean).")
    var rounds = 5

    func validate() throws {
        try checkRange(rounds, 1...100, flag: "--rounds")
    }
}

/// `--seed` of a benchmark: the seed of the data pattern it writes and
/// checks after every migration (nothing else in a benchmark is random).
/// Recorded in the JSON's `arguments` like every option.
struct PatternSeedOption: ParsableArguments {
    @Option(name: .long, parsing: .unconditional, help: "Seed of the data pattern written and checked (0 to 2^64-1).")
    var seed: UInt64 = 1
}

/// The one syntax of `--seeds`, a set of seeds (`soak`, `explore`,
/// `fidelity`): seeds and ranges A-B, comma-separated. One seed is `--seed S`
/// everywhere.
enum SeedsSyntax {
    /// The help's description of the syntax.
    static let help = "seeds and ranges A-B, comma-separated: 1-100, 3,7,12 or 1-4,9"

    /// The set `text` names, at most `maxCount` seeds.
    ///
    /// - Throws: `ValidationError` naming `--seeds`, its syntax and the value.
    static func parse(_ text: String, maxCount: UInt64 = SeedRange.maxCount) throws(ValidationError) -> SeedSet {
        guard let set = SeedSet(parsing: text), set.count > 0, set.count <= maxCount else {
            throw ValidationError("--seeds must be \(help) (A <= B; at most \(maxCount) seeds) (got \(text))")
        }
        return set
    }
}

/// The defaults a command gives its `StormOptions`.
protocol StormOptionDefaults {
    static var pages: Int { get }
    static var stallSeconds: Double { get }
    /// The stall window under the deterministic scheduler (virtual time).
    static var deterministicStallSeconds: Double { get }
    static var lookupDelayUs: Int { get }
}

extension StormOptionDefaults {
    /// 0.1 s of virtual time: a livelocked page costs about 20 s of host
    /// time per virtual second at 16 threads (every retry is a scheduling
    /// step), so the real-thread default (seconds) would run for minutes;
    /// a page that moves takes well under a millisecond of virtual time.
    static var deterministicStallSeconds: Double { 0.1 }
}

/// The shape of a fault storm that `livelock` and `demo` share, each with
/// its own defaults (`Defaults`); checked by `StormSettings.validate()` once
/// applied.
struct StormOptions<Defaults: StormOptionDefaults>: ParsableArguments {
    @Option(name: .long, parsing: .unconditional, help: "Threads that go at each page (1-256).")
    var threads = 8

    @Option(name: .long, parsing: .unconditional, help: "Pages, processed one after the other (1-65536).")
    var pages = Defaults.pages

    @Option(name: .long, parsing: .unconditional, help: "Seconds a page may take before the run is declared livelocked (more than 0, at most 3600; default \(Defaults.stallSeconds); with --deterministic, virtual seconds, default \(Defaults.deterministicStallSeconds)).")
    var stallSeconds: Double?

    @Option(name: .long, parsing: .unconditional, help: "Microseconds migrateToRAM works before migrate_vma_setup (range lookup, its own locks), holding its lock and the page reference (0-1000000).")
    var lookupDelayUs = Defaults.lookupDelayUs

    /// Sets the storm's threads, pages, stall window (the deterministic
    /// default with `deterministic`) and lookup time.
    func apply(to s: inout StormSettings, deterministic: Bool = false) {
        s.threads = threads
        s.pages = pages
        s.stallSeconds = stallSeconds ?? (deterministic ? Defaults.deterministicStallSeconds : Defaults.stallSeconds)
        s.migrateToRAMLookupMicros = lookupDelayUs
    }
}

/// The scenario knobs of a storm that `livelock`, `explore` and `replay`
/// share: which storm, which fault path, which driver lock, the DMA wait, the
/// page size, the barrier's release style and the seed.
struct StormScenarioOptions: ParsableArguments {
    @Option(name: .long, help: "Storm: readers, writers, ping-pong, two-devices.", completion: .list(StormScenario.allCases.map(\.rawValue)))
    var scenario = "readers"

    @Option(name: .long, help: "The kernel's device-private fault path: legacy, trylock, trylock-wait.", completion: .list(DeviceFaultPolicy.allCases.map(\.rawValue)))
    var faultPolicy = "legacy"

    @Option(name: .long, help: "The lock the driver takes in migrateToRAM: none, exclusive.", completion: .list(DriverLockMode.allCases.map(\.rawValue)))
    var driverLock = "exclusive"

    @Option(name: .long, help: "The driver: mirror (MirrorDevice, dmirror's shape) or gpusvm (the Xe-like driver on drm_gpusvm and drm_pagemap).")
    var driver = "mirror"

    @Option(name: .long, parsing: .unconditional, help: "Microseconds migrateToRAM waits for its work (after the copy, before migrate_vma_pages), holding its lock and the page reference (0-1000000).")
    var faultDelayUs = 50

    @Option(name: .long, help: "Which migrateToRAM calls wait --fault-delay-us: copy (only a call that copied something, a DMA wait) or every-call (every call, as the kernel rig's test_hmm patch does).")
    var driverWork = "copy"

    @Option(name: .long, help: "How migrateToRAM waits: sleep (gives the CPU away), spin (keeps it), or fsleep (the kernel's rule: spin up to 10 µs, usleep_range(d, 2d) up to 20 ms, msleep beyond).")
    var driverWait = "sleep"

    @Option(name: .long, help: "Page size: 4k or 2m.", completion: .list(["4k", "2m"]))
    var pageSize = "4k"

    @Option(name: .long, parsing: .unconditional, help: "Seed of the data pattern the pages are filled with and, with --deterministic, of the schedule (0 to 2^64-1).")
    var seed: UInt64 = 1

    @Option(name: .long, help: "How the threads leave the barrier before each page: all (at once, CPUs spinning in a barrier), one-by-one (a futex wake chain, each woken thread waking the next) or wake-all (glibc's pthread_barrier_wait: one FUTEX_WAKE for all, the last to arrive goes on at once).")
    var release = "all"

    /// `--driver-work` and `--driver-wait`, parsed (the spellings `everycall`
    /// and `every_call` too); a ValidationError names the flag.
    static func driverShape(work: String, wait: String) throws -> (DriverWorkShape, DriverWait) {
        (try LivelockCommand.parse(work, "--driver-work"), try LivelockCommand.parse(wait, "--driver-wait"))
    }

    /// Sets the scenario, fault path, driver lock, DMA wait, page size, release style and seed.
    func apply(to s: inout StormSettings) throws {
        s.scenario = try LivelockCommand.parse(scenario, "--scenario")
        s.faultPolicy = try LivelockCommand.parse(faultPolicy, "--fault-policy")
        s.driverLock = try LivelockCommand.parse(driverLock, "--driver-lock")
        s.pageSize = try LivelockCommand.parse(pageSize, "--page-size", ["4k", "2m"]) { v in
            switch v { case "4k", "4096", "4kib": .small; case "2m", "2mib", "2097152": .huge; default: nil }
        }
        s.release = try LivelockCommand.parse(release, "--release")
        (s.driverWork, s.driverWait) = try Self.driverShape(work: driverWork, wait: driverWait)
        s.driver = try LivelockCommand.parse(driver, "--driver")
        s.migrateToRAMWorkMicros = faultDelayUs
        s.seed = seed
    }
}

extension StormScenarioOptions {
    /// The storm of these knobs in `storm`'s shape, under the deterministic
    /// scheduler of `schedule` when `deterministic` (`livelock`; always for
    /// `explore` and `replay`), checked: a `ValidationError` names the flag.
    func stormSettings<D>(_ storm: StormOptions<D>, _ schedule: ScheduleOptions, deterministic: Bool = true) throws -> StormSettings {
        var s = StormSettings()
        try apply(to: &s)
        storm.apply(to: &s, deterministic: deterministic)
        if deterministic { try schedule.apply(to: &s) }
        do { try s.validate() } catch { throw ValidationError(LivelockCommand.flagged(error.description)) }
        return s
    }
}

/// `--machine` of a deterministic run: whose costs its virtual time charges
/// (a shipped profile by name, or a profile file; Docs/machine-profiles.md).
struct MachineOptions: ParsableArguments {
    @Option(name: .long, help: "Machine profile whose measured costs a deterministic run charges: native, qemu-tcg-2 (the kernel rig's guest on an idle host), qemu-tcg-2-loaded (on a loaded one) or a profile FILE (svmemu calibrate --output FILE); default: the built-in costs.")
    var machine: String?

    /// The profile `--machine` names, read and checked; nil without it.
    /// Throws `ValidationError` naming the flag (and the shipped names for
    /// an unknown one).
    func profile() throws(ValidationError) -> MachineProfile? {
        guard let machine else { return nil }
        do { return try MachineProfile.resolve(machine) } catch {
            throw ValidationError("--machine: \(error.description)")
        }
    }
}

/// `--cpus`, `--preemptions` and `--machine` of a run under the deterministic scheduler.
struct ScheduleOptions: ParsableArguments {
    @Option(name: .long, parsing: .unconditional, help: "Emulated CPUs of the machine in a deterministic run (1-64, default 8), independent of the host's cores.")
    var cpus: Int?

    @Option(name: .long, parsing: .unconditional, help: "Seeded preemption points of a deterministic schedule (0-1000, default 3; PCT's depth).")
    var preemptions: Int?

    @OptionGroup var machine: MachineOptions

    /// Whether any was given.
    var given: Bool { cpus != nil || preemptions != nil || machine.machine != nil }

    /// Refuses `--cpus`, `--preemptions` and `--machine` without
    /// `--deterministic`, and a `--machine` that names no valid profile.
    func check(deterministic: Bool) throws {
        if given && !deterministic {
            throw ValidationError("--cpus, --preemptions and --machine need --deterministic (real-thread runs use the kernel's default CPUs and the host's own costs)")
        }
        _ = try machine.profile()
    }

    /// Sets the CPUs, preemption points and machine profile and turns the
    /// deterministic scheduler on.
    func apply(to s: inout StormSettings) throws {
        s.deterministic = true
        if let cpus { s.cpus = cpus }
        if let preemptions { s.preemptions = preemptions }
        if let profile = try machine.profile() { s.machine = profile }
    }
}

/// `--deterministic`, `--cpus`, `--preemptions` and `--seed` of a harness
/// that runs threads (`overhead`, `numa`): real threads by default, or the
/// harness's threads under the deterministic scheduler.
struct HarnessScheduleOptions: ParsableArguments {
    @Flag(name: .long, help: "Run the threads under the deterministic scheduler (one at a time, in virtual time, the schedule seeded by --seed): the same seed gives the same results on any host.")
    var deterministic = false

    @OptionGroup var schedule: ScheduleOptions

    @Option(name: .long, parsing: .unconditional, help: "Seed of the data pattern and, with --deterministic, of the schedule (0 to 2^64-1).")
    var seed: UInt64 = 1

    func validate() throws { try schedule.check(deterministic: deterministic) }

    /// The harness's schedule; `threads`: the emulated threads the run
    /// needs (checked against `--cpus`). Throws `ValidationError` naming the flag.
    func harnessSchedule(threads: Int) throws -> HarnessSchedule {
        var h = HarnessSchedule()
        h.seed = seed
        guard deterministic else { return h }
        h.deterministic = true
        if let cpus = schedule.cpus { h.cpus = cpus }
        if let preemptions = schedule.preemptions { h.preemptions = preemptions }
        if let profile = try schedule.machine.profile() { h.machine = profile }
        if let problem = h.problem(threads: threads) { throw ValidationError(LivelockCommand.flagged(problem)) }
        return h
    }
}
