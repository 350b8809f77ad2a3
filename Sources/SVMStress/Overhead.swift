// The overhead breakdown (issue 6): where a fault's time goes, phase by phase,
// for GPU-fault-driven (RAM -> VRAM) and CPU-fault-driven (VRAM -> RAM)
// migration at 4 KiB and 2 MiB, with a copy engine that models a link.
import Foundation
import MirrorDriver
import SVMEmu
import Synchronization
import XeDriver

/// Which way the faults migrate.
public enum OverheadDirection: String, CaseIterable, Sendable, Codable {
    /// The GPU reads one byte per page; each miss is a GPU fault that migrates
    /// to VRAM (`gpuFaultPolicy = .migrate`).
    case toDevice = "to-device"
    /// The CPU reads one byte per page of a buffer in VRAM; each read is a CPU
    /// fault on a device-private entry (`migrateToRAM`).
    case toRAM = "to-ram"

    public var label: String { self == .toDevice ? "GPU fault, RAM -> VRAM" : "CPU fault, VRAM -> RAM" }
}

/// The copy engine a run uses.
public enum OverheadCopyModel: String, CaseIterable, Sendable, Codable {
    /// What memcpy costs on this machine (`MemcpyCopyEngine`).
    case memcpy
    /// PCIe 4 x16 (`LinkCopyEngine(model: .pcie4)`).
    case pcie4
    /// PCIe 5 x16 (`LinkCopyEngine(model: .pcie5)`).
    case pcie5
    /// NVLink-C2C (`LinkCopyEngine(model: .nvlinkC2C)`).
    case nvlinkC2C = "nvlink-c2c"

    /// The link whose transfer time the engine charges (nil: memcpy only).
    public var link: LinkModel? {
        switch self {
        case .memcpy: nil
        case .pcie4: .pcie4
        case .pcie5: .pcie5
        case .nvlinkC2C: .nvlinkC2C
        }
    }

    /// A fresh engine; `threads > 1` splits copies above 32 pages across threads.
    public func makeEngine(threads: Int = 1) -> any CopyEngine {
        if self == .memcpy && threads == 1 { return MemcpyCopyEngine() }
        return LinkCopyEngine(model: link, threads: threads)
    }
}

/// What one overhead run does.
public struct OverheadConfiguration: Sendable {
    /// Buffer size in bytes (a multiple of 2 MiB).
    public var bytes: Int = 256 << 20
    public var granularity: MigrationGranularity = .base4K
    public var direction: OverheadDirection = .toDevice
    public var copyModel: OverheadCopyModel = .memcpy
    /// The driver faulted through: `MirrorDevice` (dmirror's shape), or the
    /// Xe-like driver on GPU SVM and drm_pagemap, whose ranges are the
    /// granularity's size (4 KiB: 4 KiB chunks; 2 MiB: Xe's 2 MiB, 64 KiB,
    /// 4 KiB chunks, moved as 2 MiB folios; `faultPages` > 1 at 4 KiB: ranges
    /// of that many 4 KiB pages).
    public var driver: HarnessDriver = .mirror
    /// Threads per large copy (the multi-threaded copy option).
    public var copyThreads = 1
    /// Pages one GPU fault migrates at 4 KiB granularity (to-device only):
    /// 1, dmirror's shape, or up to 512, Xe's (the 2 MiB range around the
    /// fault in one migrate_vma call). See `MirrorSettings.gpuFaultPages`.
    public var faultPages = 1
    /// Rounds: a run with timers on over the whole buffer (the figures come
    /// from the best one) and a cost run with timers on and off in turns.
    public var rounds = 3
    /// Whether to make the cost runs (for `instrumentationOverheadPercent`;
    /// 0 is reported without them).
    public var measureInstrumentationCost = true
    /// Trace events kept per CPU for `--trace` (0: none).
    public var traceEventsPerCPU = 0
    /// Other CPUs running the address space during the timed runs: each
    /// reads a page of its own in a loop, so every TLB flush of the buffer
    /// sends them IPIs and waits for the ones inside an access (the
    /// `tlbFlush` phase). 0: the faulting CPU is the only one.
    public var busyCPUs = 0
    /// Seed of the byte pattern.
    public var seed: UInt64 = 0x5EED
    /// Real threads (the default), or the faulting thread and the busy CPUs
    /// as emulated threads of a deterministic scheduler: every time is then
    /// virtual, and the host-measured figures (the memcpy yardsticks, the
    /// instrumentation cost) are not measured (0).
    public var schedule = HarnessSchedule()
    /// Called with a short status line as the run goes (for a progress display).
    public var progress: (@Sendable (String) -> Void)? = nil
    public init() {}
}

/// One phase of the breakdown.
public struct OverheadPhaseFigure: Sendable, Codable, Equatable {
    /// Total time in the phase over all faults.
    public var seconds: Double
    /// Share of the total fault time (phases, `other` included, sum to 1).
    public var fraction: Double
    /// Times the phase ran (for `collect`: migrate_vma_setup calls).
    public var count: UInt64
    /// Mean time per fault, in microseconds.
    public var microsPerFault: Double
}

/// A timeline event for the trace file.
public struct OverheadTraceEvent: Sendable, Equatable {
    public var name: String
    public var cpu: Int
    /// Nanoseconds since the timer was created, converted from clock ticks.
    public var startNanos: Double
    public var endNanos: Double

    public init(name: String, cpu: Int, startNanos: Double, endNanos: Double) {
        self.name = name
        self.cpu = cpu
        self.startNanos = startNanos
        self.endNanos = endNanos
    }

    /// Start and duration in whole nanoseconds, for the trace file: both
    /// ends are rounded first and the duration is their difference, so that
    /// phases that share a clock read (one ends where the next begins, see
    /// `PhaseTimer.endAndBegin`) share a nanosecond too: a phase's start plus
    /// its duration is exactly the next phase's start, never 1 ns past it
    /// (as rounding the start and the duration separately gave).
    public var wholeNanos: (start: Int64, duration: Int64) {
        let start = Int64(startNanos.rounded()), end = Int64(endNanos.rounded())
        return (start, max(0, end - start))
    }
}

/// The figures of one run. Encodes as the JSON object of `svmemu overhead --json`.
public struct OverheadResult: Sendable, Codable {
    /// The driver faulted through (`HarnessDriver`: mirror or gpusvm).
    public var driver: String = HarnessDriver.mirror.rawValue
    public var granularity: String
    public var direction: String
    public var copyModel: String
    public var copyThreads: Int
    /// Pages one GPU fault migrates (1 unless `faultPages` asked for more).
    public var faultPages: Int = 1
    /// Other CPUs reading the address space during the run (`busyCPUs`).
    public var busyCPUs: Int = 0
    /// Bytes migrated by the faults.
    public var bytes: Int
    /// Faults timed (phase `fault` count: GPU fault handlers or migrateToRAM calls).
    public var faults: Int
    /// By phase name: collect, unmap, allocate, copy, pages, pageTableUpdate,
    /// finalize, other (the fault's time outside those: locks, lookups,
    /// bookkeeping), and fault (the whole; fraction 1).
    public var phases: [String: OverheadPhaseFigure]
    /// (collect + unmap + pages + finalize) / fault: the kernel's migrate_vma_* calls.
    public var migrateVMAFraction: Double
    /// copy / fault.
    public var copyFraction: Double
    /// Mean fault time in microseconds.
    public var faultMicrosMean: Double
    /// Bytes over the wall time of the faulting loop (timers on), in GB/s.
    public var throughputGBps: Double
    /// memcpy of the same bytes in granule-sized chunks, in GB/s (the yardstick).
    public var memcpyGBps: Double
    /// The same chunks copied with streaming stores, as `MemcpyCopyEngine`
    /// copies a page: glibc's memcpy does not stream chunks this small, so
    /// this is usually the faster of the two (0 when not measured).
    public var streamCopyGBps: Double = 0
    /// Wall time of the faulting loop over the whole buffer, timers on, best round.
    public var wallSeconds: Double
    /// The cost run: wall time of the chunks faulted with timers off, and of
    /// as many chunks faulted with timers on, in the same run (alternating).
    public var wallSecondsTimersOff: Double
    public var wallSecondsTimersOn: Double
    /// What the phase timers cost, in percent: the median over pairs of
    /// neighbouring chunks of (on - off) / off (0 when not measured).
    public var instrumentationOverheadPercent: Double
    /// The same cost estimated from the timer records per fault times what one
    /// begin/end pair costs (measured apart): steadier than the wall-time
    /// comparison on a busy machine.
    public var instrumentationEstimatePercent: Double = 0
    /// migrate_vma_setup and migrate_vma_finalize calls per MiB migrated.
    public var setupCallsPerMiB: Double
    public var finalizeCallsPerMiB: Double
    /// Every byte of the buffer matched its pattern after the runs.
    public var verified: Bool
    /// Timeline of the best timed run (only with `traceEventsPerCPU > 0`; not encoded).
    public var trace: [OverheadTraceEvent] = []
    /// With a trace: the events it kept (`trace.count`), the events the
    /// timers recorded past each CPU's buffer and the trace therefore lacks
    /// (the trace keeps the first `traceEventsPerCPU` events per CPU), the
    /// faults whose whole-fault event it kept, and the buffer size. Nil (and
    /// absent from the JSON) without a trace.
    public var traceEvents: Int?
    public var traceEventsDropped: Int?
    public var traceFaults: Int?
    public var traceEventsPerCPU: Int?
    /// With a deterministic schedule: true, the emulated CPUs and the
    /// scheduling points the run took (nil, and absent from the JSON, on
    /// real threads).
    public var deterministic: Bool?
    public var cpus: Int?
    public var scheduleSteps: UInt64?
    /// The machine profile a deterministic run charged (`--machine`); nil,
    /// and absent from the JSON, without one.
    public var machine: String?
    /// Scheduling points per host second (the engine's speed; the one field
    /// of a deterministic run that depends on the host).
    public var stepsPerSecond: Double?

    enum CodingKeys: String, CodingKey {
        case driver, granularity, direction, copyModel, copyThreads, faultPages, busyCPUs, bytes, faults, phases, migrateVMAFraction,
             copyFraction, faultMicrosMean, throughputGBps, memcpyGBps, streamCopyGBps, wallSeconds, wallSecondsTimersOff,
             wallSecondsTimersOn, instrumentationOverheadPercent, instrumentationEstimatePercent, setupCallsPerMiB, finalizeCallsPerMiB, verified,
             traceEvents, traceEventsDropped, traceFaults, traceEventsPerCPU, deterministic, cpus, scheduleSteps, machine,
             stepsPerSecond
    }

    /// The phases a fault is split into, in the order they run, then `other`.
    public static let phaseOrder = ["collect", "unmap", "allocate", "copy", "pages", "pageTableUpdate", "finalize", "other"]

    /// One JSON object (keys sorted).
    public func jsonString() -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        encoder.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        return String(decoding: (try? encoder.encode(self)) ?? Data("{}".utf8), as: UTF8.self)
    }
}

/// Why a run could not be made or failed its checks.
public enum OverheadError: Error, CustomStringConvertible, Equatable {
    case granularityUnavailable(String)
    case invalidConfiguration(String)
    case dataMismatch(String)
    case setupFailed(String)
    /// The host refused the machine's memory at boot (`ulimit -v`).
    case hostRefused(HostMemoryRefusal)

    public var description: String {
        switch self {
        case .hostRefused(let r): r.description
        case .granularityUnavailable(let m), .invalidConfiguration(let m), .dataMismatch(let m), .setupFailed(let m): m
        }
    }
}

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
        if config.schedule.deterministic { kc.cpus = config.schedule.cpus }
        let node = (config.bytes + (512 << 20) + PageGeometry.pmdSize - 1) & ~(PageGeometry.pmdSize - 1)
        kc.nodeSizes = [node, node]
        kc.transparentHugepage = config.granularity == .huge2M ? .always : .never
        kc.traceEventsPerCPU = config.traceEventsPerCPU
        let kernel: Kernel
        do { kernel = try Kernel(booting: kc) } catch { throw .hostRefused(error) }
        // The device and the address space refer to the kernel: they go first.
        return try withExtendedLifetime(kernel) { () throws(OverheadError) -> OverheadResult in
            try runBooted(kernel, config)
        }
    }

    static func runBooted(_ kernel: Kernel, _ config: OverheadConfiguration) throws(OverheadError) -> OverheadResult {
        let mm = AddressSpace(kernel: kernel)
        let vramChunk: UInt64 = 256 << 20
        let vram = (UInt64(config.bytes) + vramChunk - 1) / vramChunk * vramChunk + vramChunk
        let engine = config.copyModel.makeEngine(threads: config.copyThreads)
        let device: any OverheadDevice
        switch config.driver {
        case .mirror:
            var settings = MirrorSettings()
            settings.gpuFaultPolicy = .migrate
            settings.migrationGranularity = config.granularity
            settings.gpuFaultPages = config.faultPages
            device = MirrorDevice(kernel: kernel, mm: mm, vramBytes: vram, chunkBytes: vramChunk,
                                  settings: settings, copyEngine: engine)
        case .gpusvm:
            // The range sizes the granularity asks for: every GPU fault
            // migrates and binds one range.
            let chunks: [UInt64] = config.granularity == .huge2M ? XeDevice.defaultChunkSizes
                : config.faultPages > 1 ? [UInt64(config.faultPages) << PageGeometry.pageShift, PageGeometry.pageSize64]
                : [PageGeometry.pageSize64]
            do {
                device = try XeDevice(kernel: kernel, mm: mm, vramBytes: vram, chunkSizes: chunks,
                                      largeFolios: config.granularity == .huge2M, copyEngine: engine)
            } catch {
                throw .setupFailed("cannot register \(vram >> 20) MiB of VRAM for the Xe-like driver: \(error)")
            }
        }
        let bytes = config.bytes
        let say = config.progress ?? { _ in }
        let tag = "\(config.driver == .gpusvm ? "gpusvm " : "")\(config.direction.rawValue) \(config.granularity.rawValue)\(config.faultPages > 1 ? " x\(config.faultPages)" : "") \(config.copyModel.rawValue)"
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
        defer { withExtendedLifetime(device) {} }
        do {
            result = try threads.run(leaving: kernel.cpus) { () throws(OverheadError) -> OverheadResult in
                defer { busy.stop() }
                busy.waitUntilRunning()
                return try measure(kernel, config, mm: mm, device: device, base: base, tag: tag)
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
            return result
        }
        let granule = config.granularity == .huge2M ? PageGeometry.pmdSize : PageGeometry.pageSize
        say("\(tag): memcpy of the same chunks (the yardstick)")
        result.memcpyGBps = measureMemcpy(granule: granule, bytes: bytes)
        result.streamCopyGBps = measureMemcpy(granule: granule, bytes: bytes, streaming: true)
        return result
    }

    /// The timed part of a run, on the faulting thread (an emulated one in a
    /// deterministic run): warm-up, the rounds, the cost runs, the check of
    /// every byte.
    static func measure(_ kernel: Kernel, _ config: OverheadConfiguration, mm: AddressSpace, device: any OverheadDevice,
                        base: UInt64, tag: String) throws(OverheadError) -> OverheadResult {
        let bytes = config.bytes
        let pages = bytes >> PageGeometry.pageShift
        let say = config.progress ?? { _ in }
        let timers = kernel.phases
        // In virtual time the timers cost nothing: no cost runs.
        let measuresCost = config.measureInstrumentationCost && !config.schedule.deterministic

        // Puts the buffer where the run starts from (timers off).
        func prepare() throws(OverheadError) {
            do {
                switch config.direction {
                case .toDevice: try device.placeInRAM(base, pages: pages)
                case .toRAM: try device.placeInDevice(base, pages: pages)
                }
            } catch {
                throw .setupFailed("\(tag): cannot move the buffer into place before a run: \(error)")
            }
            if config.direction == .toDevice && device.pagesInDevice != 0 {
                throw .setupFailed("\(tag): \(device.pagesInDevice) pages still in VRAM before a to-device run")
            }
        }

        // One byte per page, from where the data is now, without faulting: the
        // checksum every faulting run must reproduce.
        func checksumInPlace() throws(OverheadError) -> UInt64 {
            var sum: UInt64 = 0
            var byte: UInt8 = 0
            do {
                for p in 0..<pages {
                    let a = base + UInt64(p) << PageGeometry.pageShift
                    if config.direction == .toDevice {
                        sum = sum &* 31 &+ UInt64(try mm.load(a))
                    } else {
                        try withUnsafeMutableBytes(of: &byte) { (b) throws(Errno) in try device.read(a, into: b) }
                        sum = sum &* 31 &+ UInt64(byte)
                    }
                }
            } catch {
                throw .setupFailed("\(tag): cannot read the buffer in place: \(error)")
            }
            return sum
        }

        // The faulting loop over pages [from, to): one byte per page, the
        // checksum chained from `sum`. Returns (checksum, wall nanos).
        func faultingLoop(_ from: Int, _ to: Int, _ start: UInt64 = 0) throws(OverheadError) -> (UInt64, UInt64) {
            var sum = start
            var byte: UInt8 = 0
            let t0 = HostClock.nanos()
            do {
                switch config.direction {
                case .toDevice:
                    for p in from..<to {
                        try withUnsafeMutableBytes(of: &byte) { (b) throws(Errno) in try device.read(base + UInt64(p) << PageGeometry.pageShift, into: b) }
                        sum = sum &* 31 &+ UInt64(byte)
                    }
                case .toRAM:
                    for p in from..<to { sum = sum &* 31 &+ UInt64(try mm.load(base + UInt64(p) << PageGeometry.pageShift)) }
                }
            } catch {
                throw .dataMismatch("\(tag): a faulting access failed: \(error)")
            }
            return (sum, HostClock.nanos() - t0)
        }

        func prepareChecked() throws(OverheadError) {
            try prepare()
            let before = try checksumInPlace()
            guard before == expected else {
                throw .dataMismatch("\(tag): DATA CORRUPTION: moving the buffer into place changed its bytes (checksum \(before) != \(expected))")
            }
        }

        // Warm-up (VRAM and page tables touched once), then the expected checksum.
        say("\(tag): warm-up (first touch of RAM and VRAM)")
        try prepare()
        let expected = try checksumInPlace()
        _ = try faultingLoop(0, pages)
        var bestOn = UInt64.max
        var best: [MigrationPhase: PhaseTotals] = [:]
        var trace: [OverheadTraceEvent] = []
        // Instrumentation cost: chunks of the buffer alternately timed and not
        // (in pairs, the order swapped every pair) in the same run, so that
        // machine noise hits both alike; the median of the pairs' differences.
        // Whole faults per chunk: a chunk boundary inside a fault's window would
        // leave the next chunk nothing to fault.
        let chunk = max(config.granularity == .huge2M ? PageGeometry.pmdPages : 256, config.faultPages)
        var pairRatios: [Double] = []
        var offNanos: UInt64 = 0, onNanos: UInt64 = 0
        for round in 0..<config.rounds {
            try prepareChecked()
            say("\(tag): round \(round + 1)/\(config.rounds), timers on")
            timers.reset()
            timers.isEnabled = true
            let (sum, nanos) = try faultingLoop(0, pages)
            timers.isEnabled = false
            guard sum == expected else {
                throw .dataMismatch("\(tag): the bytes read through the faults differ from the buffer's (checksum \(sum) != \(expected))")
            }
            if nanos < bestOn {
                bestOn = nanos
                best = timers.totals()
                if timers.traceCapacity > 0 {
                    trace = timers.traceEvents().map {
                        OverheadTraceEvent(name: $0.phase.name, cpu: $0.cpu, startNanos: $0.startNanos, endNanos: $0.endNanos)
                    }
                }
            }
            guard measuresCost else { continue }
            try prepareChecked()
            say("\(tag): round \(round + 1)/\(config.rounds), timers on and off in turns")
            var p = 0, pair = 0
            var chained: UInt64 = 0
            while p + 2 * chunk <= pages {
                var t: (on: UInt64, off: UInt64) = (0, 0)
                for half in 0..<2 {
                    let on = (half == 0) == (pair % 2 == 0)
                    timers.isEnabled = on
                    let (sum, nanos) = try faultingLoop(p, p + chunk, chained)
                    timers.isEnabled = false
                    chained = sum
                    if on { t.on = nanos } else { t.off = nanos }
                    p += chunk
                }
                onNanos += t.on
                offNanos += t.off
                if t.off > 0 { pairRatios.append((Double(t.on) - Double(t.off)) / Double(t.off)) }
                pair += 1
            }
            let (sum2, _) = try faultingLoop(p, pages, chained)
            guard sum2 == expected else {
                throw .dataMismatch("\(tag): the bytes read through the faults differ from the buffer's (checksum \(sum2) != \(expected))")
            }
            timers.reset()
        }
        // Every byte, wherever it is now (the CPU faults it back if needed).
        say("\(tag): verifying every byte")
        let bad: UInt64?
        do { bad = try mm.verifyPattern(base, length: bytes, seed: config.seed) } catch {
            throw .dataMismatch("\(tag): verifying the buffer failed: \(error)")
        }
        if let bad {
            throw .dataMismatch("\(tag): DATA CORRUPTION: byte at 0x\(String(bad, radix: 16)) differs from the pattern after migration")
        }
        var result = summarize(best, config: config, wallOn: bestOn)
        result.driver = config.driver.rawValue
        result.busyCPUs = config.busyCPUs
        if !pairRatios.isEmpty {
            pairRatios.sort()
            let mid = pairRatios.count / 2
            let median = pairRatios.count % 2 == 1 ? pairRatios[mid] : (pairRatios[mid - 1] + pairRatios[mid]) / 2
            result.instrumentationOverheadPercent = median * 100
            result.wallSecondsTimersOn = Double(onNanos) / 1e9
            result.wallSecondsTimersOff = Double(offNanos) / 1e9
        }
        result.trace = trace
        if timers.traceCapacity > 0 {
            // Every record counts in the totals; the trace keeps what fitted.
            let recorded = best.values.reduce(0) { $0 + Int($1.count) }
            result.traceEvents = trace.count
            result.traceEventsDropped = max(0, recorded - trace.count)
            result.traceFaults = trace.reduce(0) { $0 + ($1.name == MigrationPhase.fault.name ? 1 : 0) }
            result.traceEventsPerCPU = timers.traceCapacity
        }
        let records = best.filter { $0.key != .fault }.reduce(UInt64(0)) { $0 + $1.value.count } + (best[.fault]?.count ?? 0)
        let faultNanos = best[.fault]?.nanos ?? 0
        if faultNanos > 0 && measuresCost {
            result.instrumentationEstimatePercent = Double(records) * timerRecordNanos() / faultNanos * 100
        }
        return result
    }

    /// Turns phase totals into the figures.
    public static func summarize(_ totals: [MigrationPhase: PhaseTotals], config: OverheadConfiguration,
                                 wallOn: UInt64) -> OverheadResult {
        let fault = totals[.fault] ?? PhaseTotals()
        let faults = Int(fault.count)
        let faultSeconds = fault.nanos / 1e9
        func figure(_ nanos: Double, _ count: UInt64) -> OverheadPhaseFigure {
            OverheadPhaseFigure(seconds: nanos / 1e9, fraction: fault.nanos > 0 ? nanos / fault.nanos : 0, count: count,
                                microsPerFault: faults > 0 ? nanos / 1e3 / Double(faults) : 0)
        }
        var phases: [String: OverheadPhaseFigure] = [:]
        var inside = 0.0
        for p in MigrationPhase.allCases where p != .fault {
            let t = totals[p] ?? PhaseTotals()
            phases[p.name] = figure(t.nanos, t.count)
            // The shootdown wait is part of the phase that flushed (collect, unmap ...).
            if !p.isNested { inside += t.nanos }
        }
        phases["other"] = figure(max(0, fault.nanos - inside), fault.count)
        phases["fault"] = figure(fault.nanos, fault.count)
        let migrateVMA = MigrationPhase.allCases.filter(\.isMigrateVMA).reduce(0.0) { $0 + (totals[$1]?.nanos ?? 0) }
        let mib = Double(config.bytes) / Double(ByteSize.mib)
        return OverheadResult(
            granularity: config.granularity.rawValue, direction: config.direction.rawValue,
            copyModel: config.copyModel.rawValue, copyThreads: config.copyThreads, faultPages: config.faultPages,
            bytes: config.bytes, faults: faults, phases: phases,
            migrateVMAFraction: fault.nanos > 0 ? migrateVMA / fault.nanos : 0,
            copyFraction: fault.nanos > 0 ? (totals[.copy]?.nanos ?? 0) / fault.nanos : 0,
            faultMicrosMean: faults > 0 ? faultSeconds * 1e6 / Double(faults) : 0,
            throughputGBps: wallOn > 0 && wallOn != .max ? Double(config.bytes) / Double(wallOn) : 0,
            memcpyGBps: 0,
            wallSeconds: wallOn == .max ? 0 : Double(wallOn) / 1e9,
            wallSecondsTimersOff: 0, wallSecondsTimersOn: 0, instrumentationOverheadPercent: 0,
            setupCallsPerMiB: Double(totals[.collect]?.count ?? 0) / mib,
            finalizeCallsPerMiB: Double(totals[.finalize]?.count ?? 0) / mib,
            verified: true)
    }

    /// What one timed phase costs with the timers on (a `begin()` and an
    /// `end()`: two cycle-counter reads and the per-CPU adds), in nanoseconds,
    /// best of five rounds.
    public static func timerRecordNanos() -> Double {
        let timer = PhaseTimer()
        timer.isEnabled = true
        let n = 200_000
        var best = Double.infinity
        for _ in 0..<5 {
            let t0 = HostClock.nanos()
            for _ in 0..<n {
                let m = timer.begin()
                timer.end(.copy, m)
            }
            best = min(best, Double(HostClock.nanos() - t0) / Double(n))
        }
        return best
    }

    /// The end of `svmemu demo`: to-device and to-ram at 4 KiB and 2 MiB over
    /// a small buffer (one round, no timers-off runs), as a summary table.
    public static func demoBreakdown(bytes: Int = 64 << 20, copyModel: OverheadCopyModel = .memcpy,
                                     progress: (@Sendable (String) -> Void)? = nil) throws(OverheadError) -> String {
        demoSummary(try demoRuns(bytes: bytes, copyModel: copyModel, progress: progress))
    }

    /// The runs of `demoBreakdown`, for `svmemu demo --json`.
    public static func demoRuns(bytes: Int = 64 << 20, copyModel: OverheadCopyModel = .memcpy,
                                progress: (@Sendable (String) -> Void)? = nil) throws(OverheadError) -> [OverheadResult] {
        var results: [OverheadResult] = []
        for direction in OverheadDirection.allCases {
            for granularity in MigrationGranularity.allCases where granularity != .huge2M || hugeMigrationAvailable {
                var c = OverheadConfiguration()
                c.bytes = bytes
                c.direction = direction
                c.granularity = granularity
                c.copyModel = copyModel
                c.rounds = 1
                c.measureInstrumentationCost = false
                c.progress = progress
                results.append(try run(c))
            }
        }
        return results
    }

    /// The summary table of `demoBreakdown` for runs of one size and copy model.
    public static func demoSummary(_ results: [OverheadResult]) -> String {
        let bytes = results.first?.bytes ?? 0, copyModel = results.first?.copyModel ?? "?"
        return "Where a fault's time goes, 4 KiB versus 2 MiB (\(bytes >> 20) MiB, copy model \(copyModel)):\n"
            + OverheadReport.summary(results)
            + "migrate_vma = collect + unmap + pages + finalize (the kernel's migrate_vma_* calls); see Docs/overhead.md.\n"
    }

    /// memcpy of `bytes` in `granule` chunks over a ring of at most 64 MiB
    /// (source and destination), best of three, in GB/s. With `streaming`,
    /// the chunks are copied with streaming stores (one fence per round).
    public static func measureMemcpy(granule: Int, bytes: Int, streaming: Bool = false) -> Double {
        let ring = min(bytes, 64 << 20)
        return withCopyRings(bytes: ring) { src, dst in
            var best = UInt64.max
            for _ in 0..<3 {
                var done = 0, offset = 0
                let t0 = HostClock.nanos()
                while done < bytes {
                    HostMemory.copy(to: dst + offset, from: src + offset, bytes: granule, streaming: streaming)
                    HostMemory.escape(dst + offset)
                    done += granule
                    offset += granule
                    if offset + granule > ring { offset = 0 }
                }
                if streaming { HostMemory.storeFence() }
                best = min(best, HostClock.nanos() - t0)
            }
            return Double(bytes) / Double(max(1, best))
        }
    }
}

/// CPUs that keep running an address space: each thread reads a page of its
/// own in a loop (so it is inside an access most of the time) until stopped.
/// A TLB flush of that address space then sends each an IPI and waits for it.
final class BusyCPUs: @unchecked Sendable {
    private let stopFlag = Atomic<Int>(0)
    private let running = Atomic<Int>(0)
    private let count: Int
    private let threads: HarnessThreads

    /// Maps the pages (on the calling thread) and spawns the readers as
    /// helpers of `threads`.
    init(_ mm: AddressSpace, count: Int, threads: HarnessThreads) throws(Errno) {
        self.count = count
        self.threads = threads
        guard count > 0 else { return }
        let base = try mm.mmap(length: count * PageGeometry.pageSize)
        for i in 0..<count { try mm.store(base + UInt64(i * PageGeometry.pageSize), 1) }
        for i in 0..<count {
            let page = base + UInt64(i * PageGeometry.pageSize)
            threads.spawn("busy\(i)") { [self] in
                _ = try? mm.load(page)
                running.add(1, ordering: .releasing)
                while stopFlag.load(ordering: .acquiring) == 0 { _ = try? mm.load(page) }
            }
        }
    }

    /// Waits until each has run in the address space once (bounded: 5 s).
    func waitUntilRunning() {
        let deadline = HostClock.nanos() + 5_000_000_000
        while running.load(ordering: .acquiring) < count && HostClock.nanos() < deadline { HostThread.yield() }
    }

    /// Stops the threads and waits for them (bounded: 5 s).
    func stop() {
        stopFlag.store(1, ordering: .releasing)
        _ = threads.waitForHelpers(timeoutNanos: 5_000_000_000)
    }
}

/// Runs `body` with two rings of `bytes` for timing copies: backed like
/// emulated RAM and VRAM (`Kernel.reserveFrames`, see MemcpyBaseline), the
/// source filled with 0x5a and the destination zeroed, both written once so
/// that no host first-touch fault is timed; released after.
func withCopyRings<R>(bytes: Int, _ body: (UnsafeMutableRawPointer, UnsafeMutableRawPointer) throws -> R) rethrows -> R {
    let src = Kernel.reserveFrames(bytes: bytes)
    let dst = Kernel.reserveFrames(bytes: bytes)
    defer {
        Kernel.releaseFrames(src, bytes: bytes)
        Kernel.releaseFrames(dst, bytes: bytes)
    }
    src.initializeMemory(as: UInt8.self, repeating: 0x5a, count: bytes)
    dst.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
    return try body(src, dst)
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
