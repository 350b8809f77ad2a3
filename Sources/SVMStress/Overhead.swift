// The overhead breakdown (issue 6): where a fault's time goes, phase by phase,
// for GPU-fault-driven (RAM -> VRAM) and CPU-fault-driven (VRAM -> RAM)
// migration at 4 KiB and 2 MiB, with a copy engine that models a link. The
// vocabulary is in OverheadTypes.swift, the timed part in
// OverheadMeasurement.swift.
import MirrorDriver
import SVMEmu
import XeDriver

/// The overhead harness: boots a kernel sized for the buffer, a `MirrorDevice`
/// with the chosen copy engine and `gpuFaultPolicy = .migrate`, and times the
/// faults phase by phase with `kernel.phases`.
public enum OverheadHarness {
    /// Whether the reference driver migrates 2 MiB folios. THE SWITCH for
    /// 2 MiB: `true` once `MirrorSettings.migrationGranularity = .huge2M` works.
    public static let hugeMigrationAvailable = true

    /// Runs one configuration.
    public static func run(_ config: OverheadConfiguration) throws(OverheadError) -> OverheadResult {
        if config.granularity == .huge2M && !hugeMigrationAvailable {
            throw .granularityUnavailable(
                "svmemu overhead: 2 MiB migration is not in the reference driver yet (MirrorSettings.migrationGranularity); use --granularity 4k")
        }
        guard config.bytes >= PageGeometry.pmdSize, config.bytes % PageGeometry.pmdSize == 0 else {
            throw .invalidConfiguration("the buffer size must be a positive multiple of 2 MiB (got \(config.bytes) bytes)")
        }
        guard config.rounds >= 1, config.copyThreads >= 1, config.copyThreads <= 64 else {
            throw .invalidConfiguration("rounds must be >= 1 and copy threads 1...64")
        }
        guard config.faultPages >= 1, config.faultPages <= PageGeometry.pmdPages, config.faultPages & (config.faultPages - 1) == 0 else {
            throw .invalidConfiguration("pages per GPU fault must be a power of two, 1...\(PageGeometry.pmdPages) (got \(config.faultPages))")
        }
        guard config.faultPages == 1 || (config.granularity == .base4K && config.direction == .toDevice) else {
            throw .invalidConfiguration("more than one page per fault applies to GPU faults (to-device) at 4 KiB granularity; "
                                        + "a 2 MiB migration always moves its 2 MiB folio and a CPU fault its page")
        }
        if let problem = config.schedule.problem(threads: config.busyCPUs + 1) { throw .invalidConfiguration(problem) }
        if config.schedule.deterministic && config.copyThreads > 1 {
            throw .invalidConfiguration("a deterministic run copies on the faulting thread (copy threads 1): "
                                        + "the copy engine's worker threads are host threads the scheduler does not run")
        }
        var kc = KernelConfiguration()
        let node = Machine.nodeBytes(config.bytes, slack: 512 << 20)
        kc.nodeSizes = [node, node]
        kc.transparentHugepage = config.granularity == .huge2M ? .always : .never
        kc.traceEventsPerCPU = config.traceEventsPerCPU
        let machine: Machine
        do { machine = try Machine(booting: kc, cpus: config.schedule.deterministic ? config.schedule.cpus : nil) } catch {
            throw .hostRefused(error)
        }
        let tag = "\(config.driver == .gpusvm ? "gpusvm " : "")\(config.direction.rawValue) \(config.granularity.rawValue)\(config.faultPages > 1 ? " x\(config.faultPages)" : "") \(config.copyModel.rawValue)"
        var result = try runBooted(machine, config, tag: tag)
        // Every thread has left: the kernel audit, then the teardown.
        if let audit = machine.finish(), !audit.isClean {
            throw .auditFailed("\(tag): the kernel audit after the runs found \(audit)")
        }
        if config.schedule.deterministic { return result }
        let granule = config.granularity == .huge2M ? PageGeometry.pmdSize : PageGeometry.pageSize
        (config.progress ?? { _ in })("\(tag): memcpy of the same chunks (the yardstick)")
        result.memcpyGBps = Yardsticks.chunkedCopyGBps(granule: granule, bytes: config.bytes)
        result.streamCopyGBps = Yardsticks.chunkedCopyGBps(granule: granule, bytes: config.bytes, streaming: true)
        return result
    }

    /// The driver the run faults through, attached to `machine`, with the
    /// copy engine of `config`.
    static func makeDevice(_ machine: Machine, _ config: OverheadConfiguration) throws(OverheadError) -> any OverheadDevice {
        let vramChunk: UInt64 = 256 << 20
        let vram = Machine.roundUp(UInt64(config.bytes), to: vramChunk) + vramChunk
        let engine = config.copyModel.makeEngine(threads: config.copyThreads)
        switch config.driver {
        case .mirror:
            var settings = MirrorSettings()
            settings.gpuFaultPolicy = .migrate
            settings.migrationGranularity = config.granularity
            settings.gpuFaultPages = config.faultPages
            do {
                return machine.attach(try MirrorDevice(kernel: machine.kernel, mm: machine.mm, vramBytes: vram, chunkBytes: vramChunk,
                                                   settings: settings, copyEngine: engine))
            } catch { throw .hostRefused(error) }
        case .gpusvm:
            // The range sizes the granularity asks for: every GPU fault
            // migrates and binds one range.
            let chunks: [UInt64] = config.granularity == .huge2M ? XeDevice.defaultChunkSizes
                : config.faultPages > 1 ? [UInt64(config.faultPages) << PageGeometry.pageShift, PageGeometry.pageSize64]
                : [PageGeometry.pageSize64]
            do {
                return machine.attach(try XeDevice(kernel: machine.kernel, mm: machine.mm, vramBytes: vram, chunkSizes: chunks,
                                                   largeFolios: config.granularity == .huge2M, copyEngine: engine))
            } catch {
                throw .setupFailed("cannot register \(vram >> 20) MiB of VRAM for the Xe-like driver: \(error)")
            }
        }
    }

    /// The run on a booted machine: the device, the buffer filled, the busy
    /// CPUs started, then ``measure`` on the faulting thread (an emulated
    /// one in a deterministic run); the busy CPUs stop before it returns.
    static func runBooted(_ machine: Machine, _ config: OverheadConfiguration, tag: String) throws(OverheadError) -> OverheadResult {
        let kernel = machine.kernel, mm = machine.mm
        let device = try makeDevice(machine, config)
        let bytes = config.bytes
        let say = config.progress ?? { _ in }
        let base: UInt64
        say("\(tag): filling \(bytes >> 20) MiB")
        do {
            base = try mm.mmap(length: bytes)
            try mm.fillPattern(base, length: bytes, seed: config.seed)
        } catch {
            throw .setupFailed("cannot map and fill \(bytes >> 20) MiB: \(error)")
        }
        let timers = kernel.phases
        timers.isEnabled = false
        timers.virtualTime = config.schedule.deterministic
        timers.reset()
        let threads = HarnessThreads(config.schedule)
        let busy: BusyCPUs
        do { busy = try BusyCPUs(mm, count: config.busyCPUs, threads: threads) } catch {
            throw .setupFailed("\(tag): cannot start \(config.busyCPUs) busy CPUs: \(error)")
        }
        var result: OverheadResult
        do {
            result = try threads.run(leaving: kernel.cpus) { () throws(OverheadError) -> OverheadResult in
                defer { busy.stop() }
                busy.waitUntilRunning()
                var run = OverheadMeasurement(config, timers: timers, mm: mm, device: device, base: base, tag: tag)
                return try run.measure()
            }
        } catch let e as OverheadError {
            throw e
        } catch {
            throw .setupFailed("\(tag): \(error)")
        }
        if config.schedule.deterministic {
            result.deterministic = true
            result.cpus = config.schedule.cpus
            result.scheduleSteps = threads.steps
            result.machine = config.schedule.machine?.name
            result.stepsPerSecond = threads.stepsPerSecond
        }
        return result
    }
}

/// What the overhead harness needs from a driver: GPU reads through its
/// page table (a miss is a GPU fault the driver times as the `fault`
/// phase), and moving the buffer between RAM and its VRAM before a run,
/// with the timers off.
protocol OverheadDevice: AnyObject {
    func read(_ address: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(Errno)
    /// Migrates the buffer to VRAM (and maps it for the GPU).
    func placeInDevice(_ address: UInt64, pages: Int) throws(Errno)
    /// Migrates every page of the buffer in VRAM back to RAM.
    func placeInRAM(_ address: UInt64, pages: Int) throws(Errno)
    /// Pages of VRAM in use.
    var pagesInDevice: Int { get }
}

extension MirrorDevice: OverheadDevice {
    func placeInDevice(_ address: UInt64, pages: Int) throws(Errno) { _ = try migrateToDevice(address, pages: pages) }
    func placeInRAM(_ address: UInt64, pages: Int) throws(Errno) {
        if devicePagesInUse > 0 { _ = try migrateToSystem(address, pages: pages) }
    }
    var pagesInDevice: Int { Int(devicePagesInUse) }
}

extension XeDevice: OverheadDevice {
    /// Xe's prefetch to VRAM: every range migrated and bound.
    func placeInDevice(_ address: UInt64, pages: Int) throws(Errno) { _ = try migrateToDevice(address, pages: pages) }
    /// Every VRAM allocation evicted (`drm_pagemap_evict_to_ram()`): the
    /// ranges stay, invalidated, so the run's GPU faults find them and
    /// migrate them again.
    func placeInRAM(_ address: UInt64, pages: Int) throws(Errno) { _ = evictAll() }
    var pagesInDevice: Int { Int(vramPagesInUse) }
}

extension OverheadConfiguration {
    /// One configuration per direction x copy model x granularity (nested in
    /// that order), each a copy of this one. With `wholeRangeFaults`, the
    /// GPU faults of a 4 KiB to-device run migrate the 2 MiB range around
    /// the fault (`faultPages` 512, Xe's shape); every other run moves a
    /// page (or its 2 MiB folio) per fault.
    public func matrix(directions: [OverheadDirection], copyModels: [OverheadCopyModel],
                       granularities: [MigrationGranularity], wholeRangeFaults: Bool = false) -> [OverheadConfiguration] {
        var all: [OverheadConfiguration] = []
        for d in directions {
            for m in copyModels {
                for g in granularities {
                    var c = self
                    c.direction = d
                    c.copyModel = m
                    c.granularity = g
                    c.faultPages = wholeRangeFaults && g == .base4K && d == .toDevice ? PageGeometry.pmdPages : 1
                    all.append(c)
                }
            }
        }
        return all
    }
}

extension OverheadHarness {
    /// Runs each configuration in order. `status`, when given, hears each
    /// run's progress as "run i/n: ..."; `done` sees each result as it comes.
    public static func run(_ configurations: [OverheadConfiguration], status: (@Sendable (String) -> Void)? = nil,
                           done: (OverheadResult) -> Void = { _ in }) throws(OverheadError) -> [OverheadResult] {
        var results: [OverheadResult] = []
        for var c in configurations {
            let run = results.count + 1, runs = configurations.count
            c.progress = status.map { say in { @Sendable line in say("run \(run)/\(runs): \(line)") } }
            let r = try OverheadHarness.run(c)
            results.append(r)
            done(r)
        }
        return results
    }
}
