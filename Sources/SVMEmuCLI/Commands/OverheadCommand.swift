// `svmemu overhead`: where a fault's time goes (issue 6).
import ArgumentParser
import Foundation
import MirrorDriver
import SVMEmu
import SVMStress

// MigrationGranularity and OverheadDirection are CaseInsensitiveArgument (Support/Vocabulary.swift).

struct OverheadCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "overhead",
        abstract: "Where a fault's time goes: migrate_vma phases at 4 KiB and 2 MiB.",
        discussion: """
            Runs GPU-fault-driven migration (to-device: the GPU reads one byte per page, each miss \
            migrates to VRAM) and CPU-fault-driven migration (to-ram: the CPU reads one byte per page \
            of a buffer in VRAM) and prints, per phase, the time per fault and its share of the fault, \
            then the migrate_vma fraction (collect + unmap + pages + finalize), the copy fraction, the \
            mean fault time and the throughput (best of --rounds timed runs). What the phase timers \
            cost is measured in the same run, faulting chunks of the buffer with the timers on and \
            off in turns. --fault-size 2m makes each GPU fault migrate the 2 MiB range around it \
            even at 4 KiB granularity (Xe's drm_gpusvm shape: one fault, 512 pages in one \
            migrate_vma call), the fault Xe measured at 966 µs. --driver gpusvm faults through the \
            Xe-like driver on GPU SVM instead (ranges of the granularity's size: 4 KiB chunks, or Xe's \
            2 MiB/64 KiB/4 KiB moved as 2 MiB folios; with --fault-size 2m at 4 KiB, 2 MiB ranges of \
            4 KiB pages): its fault phase is xe_svm_handle_pagefault, find-or-insert, get_pages (an \
            hmm_range_fault) and the bind included. Every byte is verified afterwards. Without --granularity both 4k and 2m run; without --direction both \
            directions. --copy-model takes one model, a comma-separated list, or `all` (the default \
            with --svg). With --json prints one object (Docs/json.md) whose results are runs: [...], one \
            object per run (granularity, direction, copyModel, faults, phases, migrateVMAFraction, \
            ...). Build with -c release.

            --svg and --trace paths are checked before the runs start (a file that cannot be \
            created is refused with the system's reason), and so is the host's memory: a run \
            touches about 2.2 times --size plus 640 MiB, and a size the host cannot hold \
            (MemAvailable) is refused with both figures.

            --deterministic runs the faulting thread and the --busy-cpus readers under the emulator's \
            scheduler on --cpus emulated CPUs (at least --busy-cpus + 1), one at a time in virtual time, \
            the schedule seeded by --seed: every time is virtual (the scheduler's cost table and the copy \
            model's link time; memcpy itself costs none), the same seed gives byte-identical results on any \
            host and under any load (but for stepsPerSecond), and the host-measured figures are not \
            measured (memcpyGBps, streamCopyGBps and the instrumentation cost are 0). Each run adds \
            deterministic, cpus, scheduleSteps and stepsPerSecond (scheduling points per host second: the \
            engine's speed). --copy-threads must be 1 (the copy workers are host threads).

            \(ExitStatus.helpParagraph)
            """)

    @Option(name: .long, help: "Migration granularity: 4k or 2m (default: both).")
    var granularity: MigrationGranularity?

    @Option(name: .long, help: "to-device (GPU faults) or to-ram (CPU faults) (default: both).")
    var direction: OverheadDirection?

    @Option(name: .customLong("fault-size"), help: "What one GPU fault migrates: 4k (the faulting page, dmirror's shape; the default) or 2m (the 2 MiB range around it; at --granularity 4k that is Xe's shape, 512 pages in one migrate_vma call). Applies to to-device runs.")
    var faultSize: MigrationGranularity?

    @Option(name: .long, help: "The driver faulted through: mirror (MirrorDevice, dmirror's shape) or gpusvm (the Xe-like driver on drm_gpusvm and drm_pagemap; its ranges are the granularity's size).")
    var driver = "mirror"

    @Option(name: .long, parsing: .unconditional, help: "Buffer size, 2M to 64G, a multiple of 2M (e.g. 256M, 1G); needs about 2.2 times as much host memory.")
    var size = "256M"

    @Option(name: .customLong("copy-model"), help: "memcpy, pcie4, pcie5, nvlink-c2c, a comma-separated list, or all (default: memcpy; all with --svg).")
    var copyModel: String?

    @Option(name: .customLong("copy-threads"), parsing: .unconditional, help: "Threads per copy above 32 pages (multi-threaded copy; 1-64).")
    var copyThreads = 1

    @Option(name: .customLong("busy-cpus"), parsing: .unconditional, help: "Other CPUs reading the address space during the runs (0-16): each TLB flush then sends them IPIs and waits for them (the tlbFlush phase).")
    var busyCPUs = 0

    @Option(name: .long, parsing: .unconditional, help: "Rounds: a timed run (the best is reported) and a run timing chunks on and off in turns (instrumentation cost; 1-20).")
    var rounds = 3

    @OptionGroup var threads: HarnessScheduleOptions

    @OptionGroup var output: JSONOutputOptions

    @OptionGroup var report: ReportFileOptions

    @Option(name: .long, help: "Write a stacked bar chart of the phases (4 KiB vs 2 MiB, per copy model) to this SVG file.")
    var svg: String?

    @Option(name: .long, help: "Write a Chrome/Perfetto trace-event timeline of faults and phases to this JSON file (the first 65536 events per CPU; the output says how many were dropped).")
    var trace: String?

    /// Events the trace keeps per CPU (`--trace`): 65,536 events, the first
    /// 8,192 faults of a 4 KiB run (a fault and its seven phases). Later
    /// events are counted and reported as dropped, not kept.
    static let traceEventsPerCPU = 1 << 16

    /// The results of `--json`: one object per run, in the order they ran.
    struct Runs: Encodable {
        var runs: [OverheadResult]
    }

    /// Sizes `--size` takes: whole 2 MiB folios, up to 64 GiB.
    static let sizeRange = 2 * ByteSize.mib...64 * ByteSize.gib
    static let sizeMultiple = 2 * ByteSize.mib

    /// Host memory a run over `bytes` touches: RAM and VRAM frames for the
    /// buffer with their metadata (2.05 bytes per byte) plus about 555 MiB
    /// (a spare VRAM chunk, the memcpy yardstick's buffers, the program),
    /// measured as peak RSS of 512 MiB and 1 GiB runs; with a margin.
    static func memoryNeeded(bytes: Int) -> Int { bytes / 5 * 11 + 640 * ByteSize.mib }

    func copyModels() throws -> [OverheadCopyModel] {
        guard let copyModel else { return svg != nil ? OverheadCopyModel.allCases : [.memcpy] }
        let valid = (OverheadCopyModel.allCases.map(\.rawValue) + ["all"]).joined(separator: ", ")
        if copyModel.lowercased() == "all" { return OverheadCopyModel.allCases }
        let names = copyModel.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces).lowercased() }
        guard names.contains(where: { !$0.isEmpty }) else {
            throw ValidationError("--copy-model: no model given; valid models: \(valid)")
        }
        return try names.filter { !$0.isEmpty }.map {
            guard let m = OverheadCopyModel(rawValue: $0) else {
                throw ValidationError("--copy-model: unknown model '\($0)'; valid models: \(valid)")
            }
            return m
        }
    }

    /// `--driver`, checked.
    func harnessDriver() throws -> HarnessDriver {
        try LivelockCommand.parse(driver, "--driver")
    }

    func validate() throws {
        _ = try harnessDriver()
        _ = try ByteSize.check(size, flag: "--size", range: Self.sizeRange, multiple: Self.sizeMultiple)
        try OutputFile.checkDistinct([("--svg", svg), ("--trace", trace), ("--output", report.output)])
        try checkRange(copyThreads, 1...64, flag: "--copy-threads")
        try checkRange(rounds, 1...20, flag: "--rounds")
        try checkRange(busyCPUs, 0...16, flag: "--busy-cpus")
        _ = try copyModels()
        if faultSize == .base4K && granularity == .huge2M {
            throw ValidationError("--fault-size 4k needs --granularity 4k: a 2 MiB migration always moves its whole 2 MiB folio")
        }
        if faultSize == .huge2M && granularity != .huge2M && direction == .toRAM {
            throw ValidationError("--fault-size applies to GPU faults (to-device); a CPU fault migrates the page it faulted on")
        }
        _ = try harnessSchedule()
        if threads.deterministic && copyThreads > 1 {
            throw ValidationError("--copy-threads needs real threads: with --deterministic the copy runs on the faulting thread "
                                  + "(the copy engine's workers are host threads the scheduler does not run)")
        }
        if granularity == .huge2M && !OverheadHarness.hugeMigrationAvailable {
            throw ValidationError("2 MiB migration is not in the reference driver yet; use --granularity 4k")
        }
    }

    /// The schedule of the runs: the faulting thread and the busy CPUs.
    func harnessSchedule() throws -> HarnessSchedule { try threads.harnessSchedule(threads: busyCPUs + 1) }

    /// The output files asked for (`--svg`, `--trace`).
    var outputFiles: [OutputFile] { [svg, trace].compactMap { $0.map(OutputFile.init) } }

    /// What is checked before anything runs: every output file can be
    /// written, and the host has the memory the runs need (`available`:
    /// bytes available, `HostResources.availableBytes()` by default).
    /// Throws `CLIError` (exit status 1).
    func preflight(available: Int? = HostResources.availableBytes()) throws(CLIError) {
        for file in outputFiles { try file.checkWritable() }
        try HostResources.checkMemory(needed: Self.memoryNeeded(bytes: ByteSize.parse(size)!), available: available,
                                      for: "svmemu overhead --size \(size)")
    }

    /// Every run asked for (directions x copy models x granularities), in
    /// order, with a progress line on standard error; `done` sees each result
    /// as it comes.
    ///
    /// - Throws: `CLIError.runFailed` when a run fails.
    func runs(_ done: (OverheadResult) -> Void = { _ in }) throws -> [OverheadResult] {
        let bytes = ByteSize.parse(size)!
        var granularities = granularity.map { [$0] } ?? MigrationGranularity.allCases
        if granularity == nil && !OverheadHarness.hugeMigrationAvailable {
            FileHandle.standardError.write(Data("svmemu overhead: 2 MiB migration is not in the reference driver yet; running 4 KiB only\n".utf8))
            granularities = [.base4K]
        }
        let directions = direction.map { [$0] } ?? OverheadDirection.allCases
        let line = ProgressLine(label: "svmemu overhead")
        var base = OverheadConfiguration()
        base.bytes = bytes
        base.driver = try harnessDriver()
        base.copyThreads = copyThreads
        base.rounds = rounds
        base.busyCPUs = busyCPUs
        base.seed = threads.seed
        base.schedule = try harnessSchedule()
        base.traceEventsPerCPU = trace != nil ? Self.traceEventsPerCPU : 0
        let configurations = base.matrix(directions: directions, copyModels: try copyModels(), granularities: granularities,
                                         wholeRangeFaults: faultSize == .huge2M)
        do {
            return try OverheadHarness.run(configurations, status: line.enabled ? { @Sendable in line.say($0) } : nil) { r in
                line.done()
                done(r)
            }
        } catch {
            line.done()
            throw CLIError.runFailed("svmemu overhead: \(error)")
        }
    }

    func run() throws {
        try preflight()
        warnIfDebugBuild("svmemu overhead")
        let bytes = ByteSize.parse(size)!
        let results = try runs { r in if !output.json { print(OverheadReport.table(r)) } }
        if !output.json && results.count > 1 {
            print("Summary (\(bytes >> 20) MiB; shares of the mean fault)")
            print(OverheadReport.summary(results))
        }
        if output.json { print(try JSONReport.render(for: self, results: Runs(runs: results))) }
        if let svg {
            try OutputFile(svg).write(OverheadReport.svg(results))
            if !output.json { print("chart: \(svg)") }
        }
        if let trace {
            try OutputFile(trace).write(OverheadReport.traceJSON(results))
            if !output.json {
                print("trace: \(trace) (open in https://ui.perfetto.dev)")
                let dropped = results.reduce(0) { $0 + ($1.traceEventsDropped ?? 0) }
                if dropped > 0 {
                    print("trace: \(dropped) events DROPPED: each CPU keeps its first \(Self.traceEventsPerCPU) events "
                          + "(about 8,192 faults); traceEventsDropped in the JSON, see Docs/overhead.md")
                }
            }
        }
    }
}
