// The overhead breakdown's vocabulary: what a run does (direction, copy
// model, configuration), what it measures (phases, trace events, the
// result) and why it fails. The harness is in Overhead.swift.
import Foundation
import MirrorDriver
import SVMEmu

/// Which way the faults migrate.
public enum OverheadDirection: String, CaseIterable, Sendable, Codable {
    /// The GPU reads one byte per page; each miss is a GPU fault that migrates
    /// to VRAM (`gpuFaultPolicy = .migrate`).
    case toDevice = "to-device"
    /// The CPU reads one byte per page of a buffer in VRAM; each read is a CPU
    /// fault on a device-private entry (`migrateToRAM`).
    case toRAM = "to-ram"

    /// The direction for a table's heading.
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
    /// 4 KiB or 2 MiB migration.
    public var granularity: MigrationGranularity = .base4K
    /// Which way the faults migrate.
    public var direction: OverheadDirection = .toDevice
    /// The copy engine.
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
    /// The defaults: 256 MiB, 4 KiB, to-device, memcpy, MirrorDevice.
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
    /// The phase (`MigrationPhase.name`).
    public var name: String
    /// The CPU that ran it.
    public var cpu: Int
    /// Nanoseconds since the timer was created, converted from clock ticks.
    public var startNanos: Double
    /// Its end, nanoseconds since the timer was created.
    public var endNanos: Double

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
    /// 4k or 2m.
    public var granularity: String
    /// to-device or to-ram.
    public var direction: String
    /// The copy model's name.
    public var copyModel: String
    /// Threads per large copy.
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
    /// The timers-on half of the cost run.
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
    /// migrate_vma_finalize calls per MiB migrated.
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
    /// Events the timers recorded past each CPU's buffer.
    public var traceEventsDropped: Int?
    /// Faults whose whole-fault event the trace kept.
    public var traceFaults: Int?
    /// The trace's buffer, events per CPU.
    public var traceEventsPerCPU: Int?
    /// With a deterministic schedule: true, the emulated CPUs and the
    /// scheduling points the run took (nil, and absent from the JSON, on
    /// real threads).
    public var deterministic: Bool?
    /// The emulated CPUs of a deterministic run.
    public var cpus: Int?
    /// Scheduling points of a deterministic run.
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

    /// One JSON object, compact, in the reports' conventions (``ReportJSON``).
    public func jsonString() -> String {
        String(decoding: (try? ReportJSON.encoder(pretty: false).encode(self)) ?? Data("{}".utf8), as: UTF8.self)
    }
}

/// Why a run could not be made or failed its checks.
public enum OverheadError: Error, CustomStringConvertible, Equatable {
    /// The reference driver cannot migrate at the granularity asked for.
    case granularityUnavailable(String)
    /// A setting out of its range, or settings that do not go together.
    case invalidConfiguration(String)
    /// The bytes read through the faults, or the buffer after the runs,
    /// differ from the pattern written.
    case dataMismatch(String)
    /// The buffer, the device or the busy CPUs could not be set up.
    case setupFailed(String)
    /// The host refused the machine's memory at boot (`ulimit -v`).
    case hostRefused(HostMemoryRefusal)
    /// The kernel audit after the runs found a leaked reference, a lock
    /// held or a lost frame (``Machine/finish(auditing:)``).
    case auditFailed(String)

    /// What went wrong, for the user.
    public var description: String {
        switch self {
        case .hostRefused(let r): r.description
        case .granularityUnavailable(let m), .invalidConfiguration(let m), .dataMismatch(let m), .setupFailed(let m),
             .auditFailed(let m): m
        }
    }
}
