import MirrorDriver
import SVMEmu

/// The settings of a randomized soak.
public struct SoakSettings: Sendable, Codable, Equatable {
    /// Operations in total, over every thread (reads, writes, migrations).
    public var operations = 100_000
    /// CPU threads reading and writing (one emulated CPU each); one GPU
    /// thread migrates pages besides them.
    public var cpus = 4
    /// Pages of 4 KiB in the soaked buffer.
    public var pages = 64
    /// Seeds the schedule and every thread's choices.
    public var seed: UInt64 = 1
    /// The kernel's device-private fault path.
    public var faultPolicy: DeviceFaultPolicy = .trylockWait

    public init() {}

    /// Checks the settings; throws `StormError.invalidSettings` with the reason.
    public func validate() throws(StormError) {
        guard (1...1_000_000_000).contains(operations) else {
            throw .invalidSettings("operations must be 1...1000000000 (got \(operations))")
        }
        guard (1...63).contains(cpus) else { throw .invalidSettings("cpus must be 1...63 (got \(cpus))") }
        guard (1...65_536).contains(pages) else { throw .invalidSettings("pages must be 1...65536 (got \(pages))") }
    }
}

/// What a soak found.
public struct SoakResult: Sendable, Codable, Equatable {
    public var settings: SoakSettings
    /// Operations run: reads, writes, migrations to device memory and back, evictions.
    public var operations: Int
    public var reads: Int
    public var writes: Int
    public var migrationsToDevice: Int
    public var migrationsToSystem: Int
    public var evictions: Int
    /// Bytes that differed from the shadow copy, during the run and after it.
    public var bytesCorrupted: Int
    /// Pages whose folio holds references beyond its mappings after the run.
    public var leakedReferences: Int
    /// Folios still locked after the run.
    public var locksHeld: Int
    /// Kernel warnings (diagnostics) recorded.
    public var warnings: [String]
    /// The wait-for report when the scheduler found a deadlock, else nil.
    public var deadlock: String?
    /// Scheduling points, and virtual seconds, of the run.
    public var scheduleSteps: UInt64
    public var virtualSeconds: Double
    /// Host wall time.
    public var seconds: Double

    /// No corruption, no leak, no lock held, no warning, no deadlock.
    public var clean: Bool {
        bytesCorrupted == 0 && leakedReferences == 0 && locksHeld == 0 && warnings.isEmpty && deadlock == nil
    }
}

/// A randomized soak under the deterministic scheduler: CPU threads read and
/// write random words of a buffer while a GPU thread migrates random pages
/// to device memory and back (and now and then evicts everything); a shadow
/// copy of every word is checked on every read and at the end, and the
/// teardown invariants (every folio unlocked, references = mappings, no
/// kernel warning) after it. Same seed, same soak.
public enum Soak {

    /// Runs one soak.
    ///
    /// - Parameter settings: the soak.
    /// - Returns: what it found.
    /// - Throws: `StormError` when the settings are invalid or the setup fails.
    public static func run(_ settings: SoakSettings) throws(StormError) -> SoakResult {
        try settings.validate()
        let bytes = settings.pages * PageGeometry.pageSize
        var config = KernelConfiguration()
        config.nodeSizes = [64 << 20]
        config.cpus = settings.cpus + 1
        config.deviceFaultPolicy = settings.faultPolicy
        config.transparentHugepage = .never
        let kernel = Kernel(config)
        let mm = AddressSpace(kernel: kernel)
        let vram = StormHarness.roundUp(UInt64(bytes) + (16 << 20), to: 32 << 20)
        let driver = MirrorDevice(kernel: kernel, mm: mm, vramBytes: vram, chunkBytes: min(vram, 32 << 20))
        let words = bytes / 8
        let shadow = UnsafeMutablePointer<UInt64>.allocate(capacity: words)
        defer { shadow.deallocate() }
        let base: UInt64
        do {
            base = try mm.mmap(length: bytes)
            var rng = SplitMix64(state: settings.seed)
            for w in 0..<words {
                let v = rng.next()
                shadow[w] = v
                try mm.store64(base + UInt64(w * 8), v)
            }
        } catch {
            throw .setupFailed("mapping and filling \(settings.pages) pages: \(error)")
        }
        kernel.cpus.leave()

        let state = SoakState(settings: settings, mm: mm, driver: driver, base: base, shadow: shadow, words: words)
        let scheduler = DeterministicScheduler(.init(seed: settings.seed))
        for i in 0..<settings.cpus {
            scheduler.spawn("cpu\(i)") { state.cpuLoop(seed: settings.seed &+ UInt64(i) &* 0x9E37_79B9) }
        }
        scheduler.spawn("gpu") { state.gpuLoop(seed: settings.seed ^ 0xD1B5_4A32_D192_ED03) }
        let start = HostClock.hostNanos()
        let outcome = scheduler.run()
        let seconds = Double(HostClock.hostNanos() - start) / 1e9

        var result = SoakResult(settings: settings, operations: state.operations, reads: state.reads,
                                writes: state.writes, migrationsToDevice: state.toDevice,
                                migrationsToSystem: state.toSystem, evictions: state.evictions,
                                bytesCorrupted: state.corrupted, leakedReferences: 0, locksHeld: 0, warnings: [],
                                deadlock: nil, scheduleSteps: scheduler.steps,
                                virtualSeconds: Double(state.lastNanos) / 1e9, seconds: seconds)
        if case .deadlock(let report) = outcome {
            result.deadlock = report.description
            return result   // the deadlocked threads hold the pages: nothing more can be judged
        }
        // Teardown invariants, then every word against the shadow (faulting device pages back).
        for p in 0..<settings.pages {
            let e = mm.entry(at: base + UInt64(p) << PageGeometry.pageShift).entry
            guard e.kind == .present || e.kind == .devicePrivate, !(e.kind == .present && e.isSpecial) else { continue }
            let folio = kernel.pfnToPage(e.pfn).folio
            if folio.isLocked { result.locksHeld += 1 }
            if folio.refCount != folio.mapCount { result.leakedReferences += 1 }
        }
        for w in 0..<words {
            guard let v = try? mm.load64(base + UInt64(w * 8)) else { result.bytesCorrupted += 8; continue }
            result.bytesCorrupted += differingBytes(v, shadow[w])
        }
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


/// What the soak's threads share. Only one of them runs at a time (the
/// scheduler's baton orders their accesses), so the counters and the shadow
/// need no lock; a word and its shadow change inside one access, with no
/// scheduling point between them.
final class SoakState: @unchecked Sendable {
    let settings: SoakSettings
    let mm: AddressSpace
    let driver: MirrorDevice
    let base: UInt64
    let shadow: UnsafeMutablePointer<UInt64>
    let words: Int
    var operations = 0, reads = 0, writes = 0, toDevice = 0, toSystem = 0, evictions = 0, corrupted = 0
    /// Virtual time: when the first thread started, and when the last one ended.
    var startNanos: UInt64 = 0
    var lastNanos: UInt64 = 0

    init(settings: SoakSettings, mm: AddressSpace, driver: MirrorDevice, base: UInt64,
         shadow: UnsafeMutablePointer<UInt64>, words: Int) {
        self.settings = settings
        self.mm = mm
        self.driver = driver
        self.base = base
        self.shadow = shadow
        self.words = words
    }

    /// Claims one operation; false when the budget is spent.
    func claim() -> Bool {
        guard operations < settings.operations else { return false }
        operations += 1
        return true
    }

    func cpuLoop(seed: UInt64) {
        if startNanos == 0 { startNanos = HostClock.nanos() }
        var rng = SplitMix64(state: seed)
        while claim() {
            let r = rng.next()
            let w = Int((r >> 8) % UInt64(words))
            let address = base + UInt64(w * 8)
            let write = r & 1 == 1
            let value = rng.next()
            let shadow = self.shadow
            let bad: Int? = try? mm.withPageBytes(at: address, write: write) { p in
                if write {
                    p.storeBytes(of: value, as: UInt64.self)
                    shadow[w] = value
                    return 0
                }
                return Soak.differingBytes(p.load(as: UInt64.self), shadow[w])
            }
            if write { writes += 1 } else { reads += 1 }
            corrupted += bad ?? 8
        }
        lastNanos = max(lastNanos, HostClock.nanos() - startNanos)
    }

    func gpuLoop(seed: UInt64) {
        if startNanos == 0 { startNanos = HostClock.nanos() }
        var rng = SplitMix64(state: seed)
        while claim() {
            let r = rng.next()
            let page = Int((r >> 16) % UInt64(settings.pages))
            let address = base + UInt64(page) << PageGeometry.pageShift
            if r % 1000 == 0 {
                evictions += driver.evictAll()
            } else if r & 1 == 0 {
                toDevice += (try? driver.migrateToDevice(address, pages: 1)) ?? 0
            } else {
                toSystem += (try? driver.migrateToSystem(address, pages: 1)) ?? 0
            }
        }
        lastNanos = max(lastNanos, HostClock.nanos() - startNanos)
    }
}
