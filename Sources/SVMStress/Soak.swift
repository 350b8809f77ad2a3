import MirrorDriver
import SVMEmu
import XeDriver

/// The kinds of operation a soak mixes in besides CPU reads and writes
/// (which every soak runs: they are what checks the bytes).
public struct SoakMix: OptionSet, Sendable, Hashable, Codable, CustomStringConvertible {
    /// The mix's bits.
    public let rawValue: UInt32
    /// A mix from its bits.
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// GPU reads and writes through the mirror's device page table (GPU faults on a miss).
    public static let gpu = SoakMix(rawValue: 1 << 0)
    /// Migrations of single 4 KiB pages to device memory and back.
    public static let migrate = SoakMix(rawValue: 1 << 1)
    /// A THP region (2 MiB aligned, MADV_HUGEPAGE) whose 2 MiB folios migrate
    /// whole (SELECT_COMPOUND) both ways; 4 KiB operations on it split them.
    public static let huge = SoakMix(rawValue: 1 << 2)
    /// Eviction of all device memory (migrate_device_range).
    public static let evict = SoakMix(rawValue: 1 << 3)
    /// munmap of a range, then mmap of the hole (it reads as zeroes).
    public static let munmap = SoakMix(rawValue: 1 << 4)
    /// mprotect read-only and back to read-write.
    public static let mprotect = SoakMix(rawValue: 1 << 5)
    /// madvise: MADV_DONTNEED (zeroes), MADV_HUGEPAGE and MADV_COLLAPSE.
    public static let madvise = SoakMix(rawValue: 1 << 6)
    /// mremap of a range elsewhere and back, or a swap of two ranges (left moved).
    public static let mremap = SoakMix(rawValue: 1 << 7)
    /// fork: a child with its own shadow, accessed and released later.
    public static let fork = SoakMix(rawValue: 1 << 8)
    /// move_pages and migrate_pages between the two RAM nodes.
    public static let movePages = SoakMix(rawValue: 1 << 9)

    /// Every operation.
    public static let all: SoakMix = [.gpu, .migrate, .huge, .evict, .munmap, .mprotect, .madvise, .mremap, .fork, .movePages]
    /// The operations that change the address space (a "process" thread runs them).
    public static let addressSpace: SoakMix = [.munmap, .mprotect, .madvise, .mremap, .fork, .movePages]

    /// Each operation's name, as the CLI's `--mix` and the JSON spell it.
    public static let names: [(String, SoakMix)] = [
        ("gpu", .gpu), ("migrate", .migrate), ("huge", .huge), ("evict", .evict), ("munmap", .munmap),
        ("mprotect", .mprotect), ("madvise", .madvise), ("mremap", .mremap), ("fork", .fork),
        ("move-pages", .movePages),
    ]

    /// Parses a comma-separated list of names, or `all`; nil for an unknown name.
    public init?(names list: String) {
        var m: SoakMix = []
        for n in list.split(separator: ",") {
            if n == "all" { m.formUnion(.all); continue }
            guard let (_, op) = SoakMix.names.first(where: { $0.0 == n }) else { return nil }
            m.insert(op)
        }
        self = m
    }

    /// The names of the operations in the mix, comma-separated.
    public var description: String { SoakMix.names.filter { contains($0.1) }.map(\.0).joined(separator: ",") }

    /// Decodes a mix from its operation names.
    public init(from decoder: any Decoder) throws {
        let s = try decoder.singleValueContainer().decode([String].self)
        guard let m = SoakMix(names: s.joined(separator: ",")) else {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "unknown soak operation in \(s)"))
        }
        self = m
    }

    /// Encodes the mix as its operation names.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(SoakMix.names.filter { contains($0.1) }.map(\.0))
    }
}

/// A leak planted on purpose, to prove that the soak's invariant checks fail.
public enum SoakPlantedLeak: String, Sendable, Codable, CaseIterable {
    /// Halfway through, a folio reference that nothing drops.
    case reference
}

/// The settings of a randomized soak.
public struct SoakSettings: Sendable, Codable, Equatable {
    /// Operations in total, over every thread (accesses, migrations, mm calls).
    public var operations = 100_000
    /// CPU threads reading and writing (one emulated CPU each); a GPU
    /// thread and, when the mix changes the address space, a process
    /// thread run besides them.
    public var cpus = 4
    /// Pages of 4 KiB in the soaked buffer's small-page region.
    public var pages = 64
    /// 2 MiB THP regions besides (with ``SoakMix/huge``).
    public var hugeRegions = 2
    /// Seeds the schedule and every thread's choices.
    public var seed: UInt64 = 1
    /// The kernel's device-private fault path.
    public var faultPolicy: DeviceFaultPolicy = .trylockWait
    /// The operations mixed in besides CPU reads and writes.
    public var mix: SoakMix = .all
    /// Operations between two invariant audits (all threads meet at a
    /// quiescent point, ``Kernel/audit(heldReferences:)`` runs and every
    /// byte is compared with the shadow without faulting it in).
    public var auditEvery = 100_000
    /// Fault injection for tests of the checker; nil in a real soak.
    public var plantedLeak: SoakPlantedLeak? = nil
    /// Scheduling steps to keep, the last ones (``SoakResult/stepLog``);
    /// 0 keeps none. With `operations` set to the operation a finding
    /// names, the log ends there: the same seed replays the same steps.
    public var logSteps = 0
    /// Run the stale-entry checker on every TLB hit
    /// (``KernelConfiguration/checksStaleTLBEntries``): on by default in
    /// debug builds, off in release builds, where `--check-tlb` turns it on.
    public var checksStaleTLBEntries = _isDebugAssertConfiguration()
    /// The machine whose measured costs the soak's virtual time charges
    /// (``MachineProfile/virtualCosts``); nil: ``VirtualCosts/measured``.
    /// Recorded whole in the JSON's settings when given.
    public var machine: MachineProfile? = nil
    /// The driver soaked: `MirrorDevice`, or the Xe-like driver on GPU SVM.
    public var driver: HarnessDriver = .mirror

    /// The defaults.
    public init() {}

    private enum CodingKeys: String, CodingKey {
        case operations, cpus, pages, hugeRegions, seed, faultPolicy, mix, auditEvery, plantedLeak, logSteps,
             checksStaleTLBEntries, driver
    }

    /// Checks the settings; throws `StormError.invalidSettings` with the reason.
    public func validate() throws(StormError) {
        guard (1...1_000_000_000).contains(operations) else {
            throw .invalidSettings("operations must be 1...1000000000 (got \(operations))")
        }
        guard (1...62).contains(cpus) else { throw .invalidSettings("cpus must be 1...62 (got \(cpus))") }
        guard (1...65_536).contains(pages) else { throw .invalidSettings("pages must be 1...65536 (got \(pages))") }
        guard (0...16).contains(hugeRegions) else { throw .invalidSettings("hugeRegions must be 0...16 (got \(hugeRegions))") }
        guard auditEvery >= 1 else { throw .invalidSettings("auditEvery must be at least 1 (got \(auditEvery))") }
        guard (0...1_000_000).contains(logSteps) else { throw .invalidSettings("logSteps must be 0...1000000 (got \(logSteps))") }
    }
}

/// What a soak found.
public struct SoakResult: Sendable, Codable, Equatable {
    /// The soak that ran.
    public var settings: SoakSettings
    /// Operations run, and each kind.
    public var operations: Int
    /// CPU reads done.
    public var reads: Int
    /// CPU writes done.
    public var writes: Int
    /// GPU reads and writes, and the GPU faults (device page-table misses) they took.
    public var gpuReads: Int
    /// GPU writes done.
    public var gpuWrites: Int
    /// GPU faults taken.
    public var gpuFaults: Int
    /// Pages migrated to device memory and back by migrate_vma (4 KiB and 2 MiB calls).
    public var migrationsToDevice: Int
    /// Migrations device -> RAM.
    public var migrationsToSystem: Int
    /// 2 MiB calls (SELECT_COMPOUND) among them, and the device folios split (folio_split callbacks).
    public var hugeMigrations: Int
    /// Device folios split.
    public var deviceFolioSplits: Int
    /// Pages evicted from device memory.
    public var evictions: Int
    /// munmap calls.
    public var munmaps: Int
    /// mprotect calls.
    public var mprotects: Int
    /// madvise calls.
    public var madvises: Int
    /// mremap calls.
    public var mremaps: Int
    /// fork calls.
    public var forks: Int
    /// Reads and writes in the forked children, checked against their own shadows.
    public var childAccesses: Int
    /// Pages moved between RAM nodes by move_pages and migrate_pages.
    public var pagesMoved: Int
    /// Writes refused as they must be (read-only ranges: `.permissionDenied`).
    public var writesRefused: Int
    /// Accesses that overlapped an address-space change of their page
    /// (their outcome depends on the order; a read is checked against both).
    public var racedAccesses: Int
    /// Invariant audits run (at quiescent points and at the end).
    public var audits: Int
    /// Bytes that differed from the shadow copy, during the run and after it.
    public var bytesCorrupted: Int
    /// Accesses that failed where the model says they cannot, or writes that
    /// succeeded on a read-only range.
    public var accessErrors: Int
    /// Device page-table entries that disagreed with the CPU's page tables
    /// at a quiescent point (another frame, or writable where the CPU's
    /// entry is read-only): a missed invalidation or a mapping made
    /// without the notifier sequence. The first one stops the soak.
    public var staleDeviceMappings: Int
    /// References no mapping or holder explains (reference-count and
    /// map-count mismatches, unreachable folios), at the first failing audit.
    public var leakedReferences: Int
    /// Folio locks and kernel locks (PTE, PMD, zone, mmap) held at quiescence.
    public var locksHeld: Int
    /// Frames neither free nor reachable, and entries naming free frames.
    public var leakedFrames: Int
    /// The operation after which the first failing audit ran, or nil.
    public var failedAtOperation: Int?
    /// The last audit (the first failing one, or the final one).
    public var audit: KernelAudit?
    /// The first problems the soak itself saw (corrupted words, failed accesses), described.
    public var findings: [String]
    /// Kernel warnings (diagnostics) recorded.
    public var warnings: [String]
    /// The last scheduling steps of the run (``SoakSettings/logSteps`` of
    /// them), oldest first: which thread ran next, after which event, at
    /// what virtual time.
    public var stepLog: [String] = []
    /// Lock-order cycles (``LockOrder``) the soak's threads closed, described.
    public var lockOrderViolations: [String] = []
    /// The wait-for report when the scheduler found a deadlock, else nil.
    public var deadlock: String?
    /// The run exceeded its host-time limit (a millisecond per operation,
    /// at least 600 s): something spun without end.
    public var timedOut = false
    /// Scheduling points, and virtual seconds, of the run.
    public var scheduleSteps: UInt64
    /// Virtual time the soak took, seconds.
    public var virtualSeconds: Double
    /// Host wall time.
    public var seconds: Double
    /// Scheduling points per host second (the engine's speed; with `seconds`
    /// the only fields that depend on the host).
    public var stepsPerSecond: Double = 0

    /// No corruption, no unexpected access error, no leak, no lock held, no
    /// warning, no lock-order cycle, no deadlock.
    public var clean: Bool {
        bytesCorrupted == 0 && accessErrors == 0 && staleDeviceMappings == 0 && leakedReferences == 0 && locksHeld == 0 && leakedFrames == 0
            && failedAtOperation == nil && warnings.isEmpty && lockOrderViolations.isEmpty && deadlock == nil && !timedOut
    }
}

/// A randomized soak under the deterministic scheduler: CPU threads read and
/// write random words of a buffer while a GPU thread reads and writes it
/// through the device, migrates 4 KiB pages and 2 MiB folios to device
/// memory and back and now and then evicts everything, and a process
/// thread unmaps and remaps, protects, advises, remaps elsewhere, forks
/// and moves pages between nodes. A shadow copy of every word is checked on
/// every read, at every audit and at the end; every `auditEvery`
/// operations all threads meet at a quiescent point where
/// ``Kernel/audit(heldReferences:)`` checks references, locks and frames.
/// Same seed, same soak.
public enum Soak {

    /// Each RAM node's size for a buffer of `bytes`: room for the whole
    /// buffer (move_pages and migrate_pages may gather it on one node), a
    /// forked child's copies of it and the frames the device path brings
    /// back, and at least 64 MiB (what the default buffer has always had,
    /// so a seed's soak is the same as before for buffers up to 16 MiB).
    public static func nodeBytes(_ bytes: Int) -> Int {
        Machine.nodeBytes(2 * bytes, slack: 32 << 20, minimum: 64 << 20)
    }

    /// Runs one soak.
    ///
    /// - Parameter settings: the soak.
    /// - Returns: what it found. It stops at the first failing audit.
    /// - Throws: `StormError` when the settings are invalid or the setup fails.
    public static func run(_ settings: SoakSettings) throws(StormError) -> SoakResult {
        try settings.validate()
        let huge = settings.mix.contains(.huge) ? settings.hugeRegions : 0
        let smallBytes = settings.pages * PageGeometry.pageSize
        let hugeBytes = huge * PageGeometry.pmdSize
        var config = KernelConfiguration()
        config.nodeSizes = Array(repeating: nodeBytes(smallBytes + hugeBytes), count: 2)
        config.addressSpaceSize = 4 << 30
        config.cpus = settings.cpus + 2
        config.deviceFaultPolicy = settings.faultPolicy
        config.transparentHugepage = .madvise
        config.checksStaleTLBEntries = settings.checksStaleTLBEntries
        let machine: Machine
        do { machine = try Machine(booting: config) } catch { throw .hostRefused(error) }
        // The soak audits on its own (at its barriers and at the end).
        defer { machine.finish(auditing: false) }
        let kernel = machine.kernel, mm = machine.mm
        let vram = Machine.roundUp(UInt64(smallBytes + hugeBytes) + (16 << 20), to: 32 << 20)
        let driver: any SoakDriver
        switch settings.driver {
        case .mirror:
            do { driver = try MirrorDevice(kernel: kernel, mm: mm, vramBytes: vram, chunkBytes: min(vram, 32 << 20)) } catch {
                throw .hostRefused(error)
            }
        case .gpusvm:
            do { driver = try XeDevice(kernel: kernel, mm: mm, vramBytes: Machine.roundUp(vram, to: PageGeometry.pmdSize64)) } catch {
                throw .setupFailed("registering \(vram) bytes of VRAM for the Xe-like driver: \(error)")
            }
        }
        machine.attach(driver)
        let state: SoakState
        do {
            let small = try mm.mmap(length: smallBytes)
            var hugeBase: UInt64 = 0
            if huge > 0 {
                hugeBase = try mm.mmap(length: hugeBytes)
                try mm.madvise(hugeBase, length: hugeBytes, advice: .hugePage)
            }
            // Where mremap moves a range and back from: free, 2 MiB aligned.
            let scratch = try mm.mmap(length: PageGeometry.pmdSize)
            try mm.munmap(scratch, length: PageGeometry.pmdSize)
            state = SoakState(settings: settings, kernel: kernel, mm: mm, driver: driver,
                              small: small, smallPages: settings.pages, huge: hugeBase, hugeRegions: huge, scratch: scratch)
            var rng = SplitMix64(state: settings.seed)
            for w in 0..<state.words {
                let v = rng.next()
                state.shadow[w] = v
                try mm.store64(state.address(ofWord: w), v)
            }
        } catch {
            throw .setupFailed("mapping and filling \(settings.pages) pages and \(huge) THP regions: \(error)")
        }
        kernel.cpus.leave()
        defer { state.release() }

        var schedule = DeterministicScheduler.Configuration(seed: settings.seed)
        // A millisecond of host time per operation is far more than any needs.
        schedule.hostTimeoutSeconds = max(600, Double(settings.operations) / 1000)
        schedule.logSteps = settings.logSteps
        settings.machine?.apply(to: &schedule)
        let scheduler = DeterministicScheduler(schedule)
        let process = !settings.mix.isDisjoint(with: .addressSpace)
        state.live = settings.cpus + 1 + (process ? 1 : 0)
        for i in 0..<settings.cpus {
            scheduler.spawn("cpu\(i)") { state.cpuLoop(seed: settings.seed &+ UInt64(i) &* 0x9E37_79B9) }
        }
        scheduler.spawn("gpu") { state.gpuLoop(seed: settings.seed ^ 0xD1B5_4A32_D192_ED03) }
        if process {
            scheduler.spawn("process") { state.processLoop(seed: settings.seed ^ 0x94D0_49BB_1331_11EB) }
        }
        let start = HostClock.hostNanos()
        let outcome = scheduler.run()
        let seconds = Double(HostClock.hostNanos() - start) / 1e9

        let violations = scheduler.lockOrderViolations.map(\.description)
        let stepLog = scheduler.stepLog.map(\.description)
        /// The state's counts with what the scheduler saw.
        func snapshot() -> SoakResult {
            var r = state.result(steps: scheduler.steps, seconds: seconds)
            r.stepsPerSecond = scheduler.stepsPerSecond
            r.lockOrderViolations = violations
            r.stepLog = stepLog
            return r
        }
        var result = snapshot()
        switch outcome {
        case .deadlock(let report):
            result.deadlock = report.description
            return result   // the deadlocked threads hold the pages: nothing more can be judged
        case .hostTimeout:
            result.timedOut = true
            return result
        default: break
        }
        // The final audit, then every word through the CPU (faulting device pages back).
        if state.failedAudit == nil { state.runAudit() }
        result = snapshot()
        // A failed audit may have found a lock held: the CPU would wait for it forever.
        if state.failedAudit == nil { result.bytesCorrupted += state.finalCheck() }
        result.findings = state.findings
        result.warnings = kernel.diagnostics.map { "\($0)" }
        return result
    }

    static func differingBytes(_ a: UInt64, _ b: UInt64) -> Int {
        var x = a ^ b, n = 0
        while x != 0 {
            if x & 0xff != 0 { n += 1 }
            x >>= 8
        }
        return n
    }
}
