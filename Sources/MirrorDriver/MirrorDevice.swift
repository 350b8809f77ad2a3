import SVMEmu
import Synchronization

/// How a `MirrorDevice`'s `migrateToRAM` serialises itself.
public enum DriverLockMode: String, Sendable, CaseIterable, Codable {
    /// No driver lock (lib/test_hmm.c's dmirror).
    case none
    /// One exclusive driver lock held across the whole migrateToRAM, as some
    /// drivers take around their migration: the livelock ingredient.
    case exclusive
}

/// When `migrateToRAM` waits for its work (``MirrorSettings/migrateToRAMWorkNanos``).
public enum DriverWorkShape: String, Sendable, CaseIterable, Codable {
    /// Only a call that copied something waits, after its reference check
    /// passed (a DMA wait).
    case copy
    /// Every call waits, after its copy step and before `migrate_vma_pages`,
    /// whether or not it collected anything: the shape of the kernel rig's
    /// test_hmm patch (an `fsleep()` in dmirror_devmem_fault).
    case everyCall = "every-call"
}

/// How `migrateToRAM` waits for its work.
public enum DriverWait: String, Sendable, CaseIterable, Codable {
    /// The kernel's `fsleep()`: spins up to 10 µs, sleeps beyond
    /// (``HostClock/fsleep(micros:)``).
    case fsleep
    /// Sleeps the time given (gives the CPU away).
    case sleep
    /// Spins the time given (keeps the CPU).
    case spin
}

/// What a GPU access that misses the device page table does.
public enum GPUFaultPolicy: String, Sendable, CaseIterable, Codable {
    /// dmirror: mirror the CPU mapping with hmm_range_fault (system memory is
    /// accessed in place; device pages of this device are used where they are).
    case mirror
    /// SVM drivers (Xe, nouveau, amdgpu): migrate the range to VRAM first.
    case migrate
}

/// The size of the folios a migration moves.
public enum MigrationGranularity: String, Sendable, CaseIterable, Codable {
    /// 4 KiB pages.
    case base4K = "4k"
    /// 2 MiB folios (falls back to 4 KiB where a range or allocation does not allow it).
    case huge2M = "2m"
}

/// The driver's knobs. Change them between runs with `MirrorDevice.settings`.
public struct MirrorSettings: Sendable {
    public var driverLock: DriverLockMode = .none
    /// Time migrateToRAM spends waiting for its (emulated) DMA copy, after
    /// the copy is issued and before `migrateVMAPages`, holding the driver
    /// lock and the page reference, in nanoseconds. Sleeps. Only a call that
    /// copied something waits: one whose `migrateVMASetup` collected nothing
    /// (a lost trylock, a failed reference check) returns at once, as
    /// dmirror_devmem_fault does.
    public var migrateToRAMWorkNanos: UInt64 = 0
    /// Which calls wait `migrateToRAMWorkNanos` (the shape of the work).
    public var migrateToRAMWorkShape: DriverWorkShape = .copy
    /// How they wait.
    public var migrateToRAMWait: DriverWait = .sleep
    /// Time migrateToRAM spends before `migrateVMASetup` (looking up its range
    /// and taking its own locks, as amdgpu and Xe do there), holding the
    /// driver lock and the page reference, in nanoseconds. Sleeps. Every call
    /// waits, so every concurrent faulter holds its reference across the
    /// winner's reference check: without a driver lock this can livelock for
    /// real when the host is busy (dmirror has no such delay).
    public var migrateToRAMLookupNanos: UInt64 = 0
    /// Forces every device-memory allocation to fail (VRAM exhausted).
    public var failDeviceAllocation = false
    /// Forces 2 MiB device allocations to fail, so 2 MiB migrations to the
    /// device fall back to 4 KiB pages (dmirror's FAIL_ALLOC flag).
    public var failLargeDeviceAllocation = false
    /// Forces 2 MiB system allocations to fail, so 2 MiB migrations back to
    /// RAM fall back to 4 KiB pages (dmirror's FAIL_ALLOC flag, other direction).
    public var failLargeSystemAllocation = false
    /// Granularity of migrations this driver starts (migrateToDevice, GPU faults
    /// with `.migrate`): 4 KiB pages, or whole 2 MiB folios (SELECT_COMPOUND).
    /// CPU faults migrate what faulted: a PMD-mapped device folio comes back whole.
    public var migrationGranularity: MigrationGranularity = .base4K
    public var gpuFaultPolicy: GPUFaultPolicy = .mirror
    /// Pages migrated per migrate_vma call (at most 512; dmirror uses 64).
    public var batchPages = PageGeometry.pmdPages
    /// Pages a GPU fault with `.migrate` moves at 4 KiB granularity: the
    /// aligned window of this many pages around the faulting one, within its
    /// VMA. 1 (the default) is dmirror's shape, one page per fault; 512 is
    /// Xe's drm_gpusvm shape, the 2 MiB range around the fault in one
    /// migrate_vma call of 512 entries. A power of two, 1...512 (other values
    /// round down to one). With 2 MiB granularity a fault always moves its
    /// 2 MiB folio.
    public var gpuFaultPages = 1
    public init() {}
}

/// The reference driver: a device with device-private memory (emulated VRAM)
/// mirroring one address space, in the spirit of lib/test_hmm.c's dmirror.
/// It uses only the public SVMEmu API, as a driver prototype would.
///
/// Locking: `pageTableLock` (dmirror->mutex) protects the device page table;
/// the interval notifier's invalidations take it. The VRAM free lists have
/// their own lock. With `DriverLockMode.exclusive`, `migrateToRAM` holds
/// `driverLock` across the whole migration.
public final class MirrorDevice: @unchecked Sendable {
    public let kernel: Kernel
    public let mm: AddressSpace
    public let name: String
    /// This device's `pgmap_owner`.
    public let owner: DeviceOwner
    /// The kind of device memory it registers: device-private (the CPU
    /// faults to reach it) or device-coherent (the CPU maps it directly).
    public let memoryType: DevicePageMapType
    /// Most VRAM the device will register, in bytes; registered in chunks.
    public let vramBytes: UInt64
    public let chunkBytes: UInt64

    let settingsStore: LockedValue<MirrorSettings>
    /// Free VRAM, shared with the page maps' `folioFree` (captured strongly:
    /// the pool holds no page map, so there is no cycle, and a free costs no
    /// weak load of the device).
    let pool = VRAMPoolLock()
    /// The registered chunks (`dmirror->chunks`).
    let chunks = LockedValue<[DevicePageMap]>([])
    /// Held across the whole `migrateToRAM` with `DriverLockMode.exclusive`.
    let driverLock = KernelMutex("mirror driver lock")
    /// Serialises growing VRAM by a chunk.
    let growLock = KernelMutex("mirror grow lock")
    /// The device page table (`dmirror->pt`).
    let pageTable: DevicePageTable
    /// Protects the above (`dmirror->mutex`): every read and change of the
    /// device page table, the notifier's invalidations included.
    let pageTableLock = KernelMutex("mirror page-table lock")
    private(set) var notifier: MMUIntervalNotifier! = nil

    /// Moves the bytes of every migration (the device's DMA engine).
    public let copyEngine: any CopyEngine
    let gpuFaultCount = Atomic<Int>(0)
    let folioSplitTails = Atomic<Int>(0)
    let folioSplitEnds = Atomic<Int>(0)
    let migrateToRAMCount = Atomic<Int>(0)
    let driverLockWaiting = Atomic<Int>(0)
    let driverLockHolding = Atomic<Int>(0)
    let argsPool = LockedValue<[MigrateVMA]>([])
    /// dmirror's one-shot HMM_DMIRROR_FLAG_FAIL_ALLOC (set by `setCommandFlags`):
    /// the next 2 MiB allocation of a migration fails and clears it.
    let failNextAllocation = Atomic<Bool>(false)

    /// A device bound to `mm` (like opening /dev/hmm_dmirror0 in a process).
    ///
    /// - Throws: ``HostMemoryRefusal`` when the host refuses the device page
    ///   table's address space (8 bytes per page of `mm`; dmirror's xarray
    ///   allocation fails with `-ENOMEM` there).
    public init(kernel: Kernel, mm: AddressSpace, name: String = "mirror0",
                vramBytes: UInt64 = 1 << 30, chunkBytes: UInt64 = 256 << 20,
                owner: DeviceOwner = .unique(), settings: MirrorSettings = MirrorSettings(),
                copyEngine: any CopyEngine = MemcpyCopyEngine(), memoryType: DevicePageMapType = .private) throws(HostMemoryRefusal) {
        self.kernel = kernel
        self.memoryType = memoryType
        self.copyEngine = copyEngine
        self.mm = mm
        self.name = name
        self.owner = owner
        self.vramBytes = vramBytes
        self.chunkBytes = min(chunkBytes, vramBytes)
        self.settingsStore = LockedValue(settings)
        pageTable = try DevicePageTable(kernel: kernel, base: mm.baseAddress, end: mm.endAddress, lock: pageTableLock,
                                        what: "the device page table")
        notifier = mm.insertIntervalNotifier(start: mm.baseAddress, end: mm.endAddress) { [unowned self] n, range, seq in
            self.invalidate(n, range, seq)
        }
    }

    deinit {
        mm.removeIntervalNotifier(notifier)
        // Device removal (dmirror_device_remove_chunks): evict every device page
        // first. Without this, pages still mapped in `mm` were freed later (when
        // `mm` went away) through a folioFree callback of a dead device: a crash
        // (found by MirrorDriverTests; fix by the tests' owner, see the report).
        evictAll()
    }

    public var settings: MirrorSettings {
        get { settingsStore.withLock { $0 } }
        set { settingsStore.withLock { $0 = newValue } }
    }

    /// GPU faults taken (device page table misses), like dmirror's fault counter.
    public var faults: Int { gpuFaultCount.load(ordering: .relaxed) }
    /// `folioSplit` callbacks received: one per new folio (`tails`) and one
    /// marking the end of each split (`ends`).
    public var folioSplitCalls: (tails: Int, ends: Int) {
        (folioSplitTails.load(ordering: .relaxed), folioSplitEnds.load(ordering: .relaxed))
    }
    /// Calls of migrateToRAM so far.
    public var migrateToRAMCalls: Int { migrateToRAMCount.load(ordering: .relaxed) }
    /// Threads inside migrateToRAM blocked on the exclusive driver lock right
    /// now (a probe for stress harnesses; always 0 with `DriverLockMode.none`).
    public var driverLockWaiters: Int { driverLockWaiting.load(ordering: .relaxed) }
    /// Threads holding the exclusive driver lock right now (0 or 1).
    public var driverLockHolders: Int { driverLockHolding.load(ordering: .relaxed) }
    /// Device pages currently allocated (not on the free lists).
    public var devicePagesInUse: UInt64 { pool.withLock { $0.registered - $0.freePages } }
    /// Device memory registered so far.
    public var registeredPageMaps: [DevicePageMap] { chunks.withLock { $0 } }

    /// The interval notifier callback (dmirror_interval_invalidate): drop the
    /// device mappings of the range, except for this device's own
    /// migrations and its own device-exclusive requests (which map the page
    /// for atomics right after, as nouveau skips its own MMU_NOTIFY_EXCLUSIVE).
    func invalidate(_ n: MMUIntervalNotifier, _ range: MMUNotifierRange, _ seq: UInt64) -> Bool {
        if (range.event == .migrate || range.event == .exclusive) && range.owner == owner { return true }
        pageTableLock.withLock {
            n.setSeq(seq)
            pageTable.clear(range.start, range.end)
        }
        return true
    }

    // MARK: VRAM

    /// Allocates a free device folio of `order` 0 or 9 and hands it out with
    /// `zoneDevicePageInit` (one reference, locked). Nil when VRAM is exhausted
    /// or allocation failure is forced.
    public func allocateDeviceFolio(order: Int = 0) -> Folio? {
        if settings.failDeviceAllocation { return nil }
        return takeDeviceFolio(order: order)
    }

    /// `allocateDeviceFolio` without reading the settings (batch loops read them once).
    func takeDeviceFolio(order: Int) -> Folio? {
        guard let pfn = pool.withLock({ $0.take(order: order) }) ?? growAndTake(order: order) else { return nil }
        guard let folio = kernel.zoneDevicePageInit(kernel.pfnToPage(pfn), order: order) else {
            pool.withLock { $0.give(pfn, order: order) }
            return nil
        }
        return folio
    }

    /// Registers one more chunk of VRAM (dmirror_allocate_chunk), serialised
    /// so that racing allocators do not exceed `vramBytes`.
    private func growAndTake(order: Int) -> UInt64? {
        growLock.withLock { growLocked(order: order) }
    }

    private func growLocked(order: Int) -> UInt64? {
        if let pfn = pool.withLock({ $0.take(order: order) }) { return pfn }
        let canGrow = pool.withLock { $0.registered + (chunkBytes >> PageGeometry.pageShift) <= vramBytes >> PageGeometry.pageShift }
        guard canGrow else { return nil }
        let ops = DevicePageMapOperations(
            // The pool, not the device: the page map outlives the device (the
            // kernel keeps it), and deinit's eviction frees pages while `self`
            // is deinitialising; they go back to a pool nobody takes from.
            folioFree: { [pool] folio in pool.withLock { $0.give(folio.pfn, order: folio.order) } },
            // Weak, not unowned: a fault can reach a page map of a device that is gone.
            migrateToRAM: { [weak self] vmf in self?.migrateToRAM(vmf) ?? .sigbus },
            // dmirror_devmem_folio_split: the driver's per-folio state follows
            // each new folio; the mirror keeps none, so it only counts.
            folioSplit: { [weak self] _, tail in
                if tail == nil { self?.folioSplitEnds.add(1, ordering: .relaxed) }
                else { self?.folioSplitTails.add(1, ordering: .relaxed) }
            })
        guard let pgmap = try? kernel.memremapPages(type: memoryType, owner: owner, bytes: chunkBytes, operations: ops) else {
            return nil
        }
        chunks.withLock { $0.append(pgmap) }
        return pool.withLock { p in
            p.add(pgmap)
            return p.take(order: order)
        }
    }

    // MARK: argument reuse

    /// Lends a `MigrateVMA` whose arrays are reused across calls, so that a
    /// migration allocates nothing per page or per call once warm.
    func withArgs<R, E: Error>(_ body: (inout MigrateVMA) throws(E) -> R) throws(E) -> R {
        var args = argsPool.withLock { $0.popLast() } ?? MigrateVMA(vma: nil, start: 0, end: PageGeometry.pmdSize64, flags: [])
        defer { argsPool.withLock { $0.append(args) } }
        return try body(&args)
    }
}

/// `VRAMPool` behind a lock, shareable with the page maps' callbacks.
final class VRAMPoolLock: Sendable {
    let state = LockedValue<VRAMPool>(VRAMPool())
    @inline(__always) func withLock<R>(_ body: (inout sending VRAMPool) -> sending R) -> sending R {
        state.withLock(body)
    }
}

/// Free device pages, by order. 4 KiB pages are handed out first in, first
/// out: pages freed in address order come back in address order, so the copy
/// engine reads and writes VRAM ascending (descending frames would halve the
/// host's copy bandwidth through its prefetchers).
struct VRAMPool {
    var free4K: [UInt64] = []
    var free4KHead = 0
    var free2M: [UInt64] = []
    var registered: UInt64 = 0
    var freePages: UInt64 = 0

    mutating func add(_ pgmap: DevicePageMap) {
        registered += pgmap.pageCount
        freePages += pgmap.pageCount
        free4K.reserveCapacity(Int(registered))
        free2M.reserveCapacity(Int(registered >> PageGeometry.pmdOrder))
        var pfn = pgmap.startPfn + pgmap.pageCount
        while pfn > pgmap.startPfn {
            pfn -= PageGeometry.pmdPages64
            free2M.append(pfn)
        }
    }

    mutating func take(order: Int) -> UInt64? {
        if order == PageGeometry.pmdOrder {
            guard let pfn = free2M.popLast() else { return nil }
            freePages -= PageGeometry.pmdPages64
            return pfn
        }
        if free4KHead == free4K.count, let block = free2M.popLast() {
            for pfn in block..<(block + PageGeometry.pmdPages64) { free4K.append(pfn) }
        }
        guard free4KHead < free4K.count else { return nil }
        let pfn = free4K[free4KHead]
        free4KHead += 1
        if free4KHead == free4K.count {
            free4K.removeAll(keepingCapacity: true)
            free4KHead = 0
        } else if free4KHead >= 4096 && free4KHead * 2 >= free4K.count {
            free4K.removeFirst(free4KHead)  // drop the taken half: amortised O(1)
            free4KHead = 0
        }
        freePages -= 1
        return pfn
    }

    mutating func give(_ pfn: UInt64, order: Int) {
        if order == PageGeometry.pmdOrder { free2M.append(pfn); freePages += PageGeometry.pmdPages64 } else { free4K.append(pfn); freePages += 1 }
    }
}
