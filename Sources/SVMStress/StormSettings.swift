import MirrorDriver
import SVMEmu

/// Which storm to run. In every storm the pages are processed one at a time:
/// the storm's threads meet at a barrier, then all go at the same page.
public enum StormScenario: String, Sendable, CaseIterable, Codable {
    /// The canonical storm: every page starts in device memory; after the
    /// barrier all threads read it (the 2024 livelock report).
    case readers
    /// As `readers`, but every thread writes the page (a read-modify-write of
    /// one word that keeps the bytes intact).
    case writers
    /// CPU readers race a GPU thread that keeps migrating the page back to
    /// device memory until every reader has read it once.
    case pingPong = "ping-pong"
    /// Two devices race to migrate the same page to their VRAM: half the
    /// threads drive device 0, half device 1. A thread that finds the page in
    /// the other device's memory touches it from the CPU first (pulling it back
    /// to RAM through that device's `migrateToRAM`), then migrates again. Each
    /// page starts in RAM and is done once every thread's migration succeeded.
    case twoDevices = "two-devices"
}

/// How a storm's threads leave the barrier before each page.
public enum StormRelease: String, Sendable, CaseIterable, Codable {
    /// All at once: CPUs spinning in a barrier see the release together
    /// (the harness's default).
    case all
    /// One by one: `pthread_barrier_wait()`'s futex wake-ups, which the
    /// kernel developers' own storm tests use. The last to arrive leaves at
    /// once and wakes one waiter; each woken waiter wakes the next, one
    /// wake-up latency apart.
    case oneByOne = "one-by-one"
    /// The last to arrive wakes every waiter with one FUTEX_WAKE and goes
    /// on at once; the woken queue for CPUs (glibc 2.25+'s
    /// `pthread_barrier_wait()`, which the kernel rig's livelock program
    /// uses).
    case wakeAll = "wake-all"
}

/// The storm's page size.
public enum StormPageSize: String, Sendable, CaseIterable, Codable {
    case small = "4k"
    case huge = "2m"
    /// Bytes per storm page.
    public var bytes: Int { self == .small ? PageGeometry.pageSize : PageGeometry.pmdSize }
    /// Base (4 KiB) pages per storm page.
    public var basePages: Int { bytes >> PageGeometry.pageShift }
}

/// Everything a storm run is configured by.
public struct StormSettings: Sendable, Codable, Equatable {
    /// What the threads do to each page.
    public var scenario: StormScenario = .readers
    /// The driver the storm runs against (without a `makeDriver` factory).
    public var driver: HarnessDriver = .mirror
    /// The kernel's device-private fault path (`do_swap_page()`).
    public var faultPolicy: DeviceFaultPolicy = .legacy
    /// The lock the driver takes in `migrateToRAM`.
    public var driverLock: DriverLockMode = .exclusive
    /// The time `migrateToRAM` waits for its DMA copy (after the copy is
    /// issued, before `migrate_vma_pages()`), holding its lock and the page
    /// reference, in microseconds; the copy engine's own time comes on top.
    /// Only a call that migrates something waits, as in the kernel's test
    /// driver: the losers of the folio trylock return at once.
    public var migrateToRAMWorkMicros: Int = 50
    /// Which migrateToRAM calls wait `migrateToRAMWorkMicros`: those that
    /// copied (`.copy`, the default) or every one (`.everyCall`, the kernel
    /// rig's shape).
    public var driverWork: DriverWorkShape = .copy
    /// How they wait: sleep (the default), spin, or the kernel's fsleep rule.
    public var driverWait: DriverWait = .sleep
    /// The time `migrateToRAM` works before `migrate_vma_setup()` (looking up
    /// its range, taking its own locks), holding its lock and the page
    /// reference, in microseconds. 0 by default. Every call waits, loser or
    /// winner: the references held across the winner's check make a storm
    /// without a driver lock livelock whenever the host leaves the faulters
    /// inside that window (not the kernel's test driver's shape).
    public var migrateToRAMLookupMicros: Int = 0
    /// Threads that go at each page.
    public var threads: Int = 8
    /// Pages processed one after the other.
    public var pages: Int = 512
    /// 4 KiB pages or 2 MiB folios.
    public var pageSize: StormPageSize = .small
    /// Seeds the data pattern every page is filled with (checked after the run).
    public var seed: UInt64 = 1
    /// A page that has not completed after this long is declared livelocked.
    public var stallSeconds: Double = 2
    /// The longest teardown waits for the threads to leave after a stop.
    public var joinTimeoutSeconds: Double = 10
    /// Run the storm's threads under a ``DeterministicScheduler`` seeded with
    /// `seed`: one at a time, in virtual time, the same run for the same seed
    /// on any host. The stall window is then virtual time too.
    public var deterministic = false
    /// The emulated CPUs of the machine (`KernelConfiguration.cpus`) in a
    /// deterministic storm; real-thread storms keep the kernel's default.
    public var cpus = 8
    /// Seeded preemption points of a deterministic storm (PCT's depth).
    public var preemptions = 3
    /// How the threads leave the barrier before each page.
    public var release: StormRelease = .all
    /// Whether the threads meet at a second barrier after each page's access
    /// (the kernel rig's `rig-livelock`: `pthread_barrier_wait()` before and
    /// after the read), released the same way; false: one barrier a page.
    public var barrierAfterAccess = false
    /// The machine whose measured costs a deterministic storm charges
    /// (``MachineProfile/virtualCosts``); nil: ``VirtualCosts/measured``.
    public var machine: MachineProfile? = nil

    /// The defaults.
    public init() {}

    /// The settings of the canonical storm with the given knobs.
    public init(scenario: StormScenario = .readers, faultPolicy: DeviceFaultPolicy, driverLock: DriverLockMode,
                migrateToRAMWorkMicros: Int = 50, threads: Int = 8, pages: Int = 512,
                pageSize: StormPageSize = .small, seed: UInt64 = 1, stallSeconds: Double = 2) {
        self.scenario = scenario
        self.faultPolicy = faultPolicy
        self.driverLock = driverLock
        self.migrateToRAMWorkMicros = migrateToRAMWorkMicros
        self.threads = threads
        self.pages = pages
        self.pageSize = pageSize
        self.seed = seed
        self.stallSeconds = stallSeconds
    }

    /// Devices (drivers) the scenario needs.
    public var devices: Int { scenario == .twoDevices ? 2 : 1 }

    /// Checks the settings; throws `StormError.invalidSettings` with the reason.
    public func validate() throws(StormError) {
        guard (1...256).contains(threads) else { throw .invalidSettings("threads must be 1...256 (got \(threads))") }
        guard (1...65_536).contains(pages) else { throw .invalidSettings("pages must be 1...65536 (got \(pages))") }
        guard (0...1_000_000).contains(migrateToRAMWorkMicros) else {
            throw .invalidSettings("migrateToRAM work must be 0...1000000 µs (got \(migrateToRAMWorkMicros))")
        }
        guard (0...1_000_000).contains(migrateToRAMLookupMicros) else {
            throw .invalidSettings("migrateToRAM lookup time must be 0...1000000 µs (got \(migrateToRAMLookupMicros))")
        }
        guard stallSeconds > 0, stallSeconds <= 3600 else {
            throw .invalidSettings("stall window must be > 0 and at most 3600 s (got \(stallSeconds))")
        }
        guard joinTimeoutSeconds > 0 else { throw .invalidSettings("join timeout must be > 0") }
        guard (1...64).contains(cpus) else { throw .invalidSettings("cpus must be 1...64 (got \(cpus))") }
        guard (0...1000).contains(preemptions) else {
            throw .invalidSettings("preemptions must be 0...1000 (got \(preemptions))")
        }
        if scenario == .twoDevices && threads < 2 {
            throw .invalidSettings("the two-devices storm needs at least 2 threads (one per device)")
        }
        if pageSize == .huge && pages > 2048 {
            throw .invalidSettings("2 MiB storms take at most 2048 pages (4 GiB)")
        }
    }
}

/// Why a storm could not run.
public enum StormError: Error, CustomStringConvertible, Equatable {
    case invalidSettings(String)
    /// The driver cannot migrate 2 MiB folios whole.
    case hugePagesUnsupported(String)
    /// Setting the storm up failed (mmap, filling, the first migration).
    case setupFailed(String)
    /// The host refused the machine's memory at boot (`ulimit -v`).
    case hostRefused(HostMemoryRefusal)

    /// The error, for the user.
    public var description: String {
        switch self {
        case .hostRefused(let r): r.description
        case .invalidSettings(let s): s
        case .hugePagesUnsupported(let s): s
        case .setupFailed(let s): "storm setup failed: \(s)"
        }
    }
}
