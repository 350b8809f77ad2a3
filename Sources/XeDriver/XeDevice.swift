import GPUSVM
import SVMEmu
import Synchronization

/// The knobs of an ``XeDevice``. Change them between runs with ``XeDevice/settings``.
public struct XeSettings: Sendable {
    /// Migrate a range to VRAM on a GPU fault (Xe on a discrete GPU, whose
    /// preferred location is VRAM); off, the GPU maps system memory in place.
    public var migrateOnFault = true
    /// Ranges of at most this many bytes are not migrated on a GPU fault
    /// (Xe skips ranges of 64 KiB and less on devices that cannot migrate
    /// 4 KiB pages); 0 migrates every size.
    public var noMigrationAtOrBelow: UInt64 = 0
    /// Forces every VRAM allocation to fail (VRAM exhausted, no eviction helps).
    public var failDeviceAllocation = false
    /// `migrate_to_ram` holds one exclusive driver lock throughout: the
    /// livelock ingredient of `svmemu livelock --driver-lock exclusive`.
    /// drm_pagemap takes none.
    public var exclusiveMigrateToRAMLock = false
    /// GPU fault attempts (garbage collection, find, migrate, get pages,
    /// bind) before the fault gives up with `.busy`; Xe retries without bound.
    public var faultRetryLimit = 1000
    public init() {}
}

/// An Xe-like driver on ``GPUSVM`` and ``DRMPagemap``, in the shape of
/// drivers/gpu/drm/xe/xe_svm.c: one GPU VM mirroring one address space
/// (`xe_vm` with a CPU-address-mirror VMA over all of it), one tile with its
/// own VRAM.
///
/// - **GPU faults** (``handlePageFault(_:write:)``, `xe_svm_handle_pagefault()`):
///   garbage-collect unmapped ranges, find or insert the range, migrate it to
///   VRAM if the policy says so (`drm_pagemap_populate_mm()`), get its pages,
///   and bind them under the notifier lock if ``GPUSVM/rangePagesValid(_:)``
///   still says so; otherwise start over.
/// - **Invalidations** (`xe_svm_invalidate()`): zap the GPU page-table
///   entries of every bound range the invalidation touches, one GPU TLB
///   invalidation for them, unmap the ranges' pages, and queue ranges the
///   CPU unmapped for the garbage collector.
/// - **VRAM** (``XeVRAMAllocation``): a buddy allocator; a range takes one
///   contiguous block of its size; when VRAM runs out, the least recently
///   migrated allocation is evicted (`drm_pagemap_evict_to_ram()`).
///
/// Locks, outermost first: the VM lock (``svmLock``, Xe's `vm->lock`, the
/// layer's driver SVM lock) serialises GPU faults, prefetches and the
/// garbage collector; the mmap lock (GPU SVM takes it); the notifier lock;
/// the GPU page-table lock (``pageTableLock``); the VRAM lock. The CPU
/// fault path (`migrate_to_ram`) takes none of the driver's locks, unless
/// ``XeSettings/exclusiveMigrateToRAMLock``.
///
/// Uses only the public SVMEmu API.
public final class XeDevice: @unchecked Sendable {
    public let kernel: Kernel
    public let mm: AddressSpace
    public let name: String
    /// The device's `pgmap_owner` (Xe uses its `xe_device`).
    public let owner: DeviceOwner
    public let copyEngine: any CopyEngine
    /// The VRAM page map and drm_pagemap over it.
    public private(set) var pagemap: DRMPagemap! = nil
    /// GPU SVM over the whole address space.
    public private(set) var svm: GPUSVM! = nil

    /// The VM lock (`vm->lock`, the layer's driver SVM lock).
    public let svmLock = KernelMutex("xe vm lock")
    /// Protects the GPU page table and each range's binding state.
    let pageTableLock = KernelMutex("xe page-table lock")
    /// The GPU page table (the GPU's own page tables, which Xe writes).
    let pageTable: DevicePageTable
    /// Ranges the CPU unmapped, for the garbage collector (`garbage_collector.range_list`).
    let garbage = LockedValue<[GPUSVMRange]>([])
    /// VRAM: the buddy allocator and the live allocations, least recently migrated first.
    let vram: LockedValue<VRAMState>
    let settingsStore: LockedValue<XeSettings>
    /// The CPU-fault side: `migrate_to_ram` calls and its optional lock.
    let gate = MigrateToRAMGate()

    let faultCount = Atomic<Int>(0)
    let retryCount = Atomic<Int>(0)
    let tlbInvalidationCount = Atomic<Int>(0)
    let collectedCount = Atomic<Int>(0)
    let evictedPages = Atomic<Int>(0)

    /// A device bound to `mm` with `vramBytes` of VRAM (a multiple of 2 MiB).
    ///
    /// - Parameters:
    ///   - chunkSizes: GPU SVM's range sizes (Xe: 2 MiB, 64 KiB, 4 KiB).
    ///   - notifierSize: bytes per GPU SVM notifier (Xe: 512 MiB).
    ///   - largeFolios: migrate 2 MiB ranges as 2 MiB folios.
    /// - Throws: ``Errno/invalidArgument`` for bad chunk or notifier sizes,
    ///   what `memremapPages` throws for the VRAM, ``Errno/noMemory`` when
    ///   the host refuses the GPU page table (8 bytes per page of `mm`).
    public init(kernel: Kernel, mm: AddressSpace, name: String = "xe0", vramBytes: UInt64 = 256 << 20,
                chunkSizes: [UInt64] = XeDevice.defaultChunkSizes, notifierSize: UInt64 = 512 << 20,
                largeFolios: Bool = true, owner: DeviceOwner = .unique(), settings: XeSettings = XeSettings(),
                copyEngine: any CopyEngine = MemcpyCopyEngine()) throws(Errno) {
        self.kernel = kernel
        self.mm = mm
        self.name = name
        self.owner = owner
        self.copyEngine = copyEngine
        self.settingsStore = LockedValue(settings)
        do {
            pageTable = try DevicePageTable(kernel: kernel, base: mm.baseAddress, end: mm.endAddress, lock: pageTableLock,
                                            what: "the GPU page table")
        } catch { throw .noMemory }
        let gate = self.gate, store = settingsStore
        var ops = DRMPagemap.pagemapOperations
        ops.migrateToRAM = { vmf in gate.migrateToRAM(vmf, exclusive: store.withLock { $0.exclusiveMigrateToRAMLock }) }
        let pgmap = try kernel.memremapPages(type: .private, owner: owner, bytes: vramBytes, operations: ops)
        vram = LockedValue(VRAMState(buddy: VRAMBuddy(startPfn: pgmap.startPfn, pageCount: pgmap.pageCount)))
        let populate = DRMPagemapOperations { [unowned(unsafe) self] pagemap, start, end, mm in
            populateMM(pagemap, start, end, mm)
        }
        pagemap = DRMPagemap(kernel: kernel, pageMap: pgmap, operations: populate, largeFolios: largeFolios)
        svm = try GPUSVM(name: name, mm: mm, devicePrivateOwner: owner, mmStart: mm.baseAddress,
                         mmRange: mm.endAddress - mm.baseAddress, notifierSize: notifierSize, chunkSizes: chunkSizes,
                         operations: GPUSVMOperations { [unowned(unsafe) self] svm, notifier, range in
                             invalidate(svm, notifier, range)
                         })
    }

    deinit {
        svmLock.withLock { svm.fini() }
        evictAll()
    }

    /// Xe's range sizes: 2 MiB, 64 KiB, 4 KiB.
    public static let defaultChunkSizes: [UInt64] = [PageGeometry.pmdSize64, 64 << 10, PageGeometry.pageSize64]

    public var settings: XeSettings {
        get { settingsStore.withLock { $0 } }
        set { settingsStore.withLock { $0 = newValue } }
    }

    /// GPU faults taken (page-table misses that ran the fault handler).
    public var faults: Int { faultCount.load(ordering: .relaxed) }
    /// Fault-handler passes that started over (a lost race: pages invalidated
    /// before the bind, a range unmapped, a mixed range evicted).
    public var faultRetries: Int { retryCount.load(ordering: .relaxed) }
    /// GPU TLB invalidations sent by the notifier callback.
    public var tlbInvalidations: Int { tlbInvalidationCount.load(ordering: .relaxed) }
    /// Ranges the garbage collector removed.
    public var rangesCollected: Int { collectedCount.load(ordering: .relaxed) }
    /// Calls of `migrate_to_ram` (CPU faults on this device's pages).
    public var migrateToRAMCalls: Int { gate.calls.load(ordering: .relaxed) }
    /// Threads waiting for, and holding, the exclusive `migrate_to_ram` lock.
    public var migrateToRAMLockState: (waiting: Int, holding: Int) {
        (gate.waiting.load(ordering: .relaxed), gate.holding.load(ordering: .relaxed))
    }
    /// VRAM pages in use.
    public var vramPagesInUse: UInt64 { vram.withLock { $0.buddy.pageCount - $0.buddy.freePages } }
    /// Live VRAM allocations.
    public var vramAllocations: Int { vram.withLock { $0.live.count } }
    /// Ranges GPU SVM tracks.
    public var rangeCount: Int { svmLock.withLock { svm.ranges(mm.baseAddress, mm.endAddress).count } }
}

extension XeDevice: VirtualMemoryAccessor {}

/// The page map's `migrate_to_ram` as the device registers it: drm_pagemap's,
/// counted, and optionally under one exclusive driver lock.
final class MigrateToRAMGate: Sendable {
    let calls = Atomic<Int>(0)
    let waiting = Atomic<Int>(0)
    let holding = Atomic<Int>(0)
    let lock = KernelMutex("xe migrate_to_ram lock")

    func migrateToRAM(_ vmf: VMFault, exclusive: Bool) -> VMFaultResult {
        calls.add(1, ordering: .relaxed)
        // The CPU fault's time in the overhead breakdown, as MirrorDevice's.
        let phases = vmf.mm.kernel.phases
        let t = phases.begin()
        defer { phases.end(.fault, t) }
        guard exclusive else { return DRMPagemap.migrateToRAM(vmf) }
        waiting.add(1, ordering: .relaxed)
        return lock.withLock {
            waiting.subtract(1, ordering: .relaxed)
            holding.add(1, ordering: .relaxed)
            defer { holding.subtract(1, ordering: .relaxed) }
            return DRMPagemap.migrateToRAM(vmf)
        }
    }
}
