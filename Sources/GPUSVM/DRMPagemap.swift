import SVMEmu
import Synchronization

/// The driver's device-memory operations (`struct drm_pagemap_devmem_ops`).
///
/// The copy operations get the migration's arrays as they stand: entry `i`
/// of the device side and of the system side describe the same virtual
/// page; an entry with COMPOUND covers 512 pages (2 MiB) on both sides.
public struct DRMPagemapDevmemOperations: Sendable {
    /// The allocation's last device page was freed (`devmem_release`): give
    /// the device memory back. Runs on whatever thread dropped the last
    /// reference, possibly holding page-table locks: take only leaf locks.
    public var devmemRelease: @Sendable (_ devmem: DRMPagemapDevmem) -> Void
    /// The allocation's device pfns, one per 4 KiB page, in order
    /// (`populate_devmem_pfn`). A 2 MiB aligned run of 512 contiguous pfns
    /// can back a 2 MiB folio.
    public var populateDevmemPfn: @Sendable (_ devmem: DRMPagemapDevmem, _ npages: Int, _ pfns: inout [UInt64]) -> Errno?
    /// Copies system pages (or zeroes, for an entry without a page) into the
    /// device pages of `device` (`copy_to_devmem`), for every valid device entry.
    public var copyToDevmem: @Sendable (_ device: [MigratePFN], _ system: [MigratePFN], _ npages: Int) -> Errno?
    /// Copies device pages into the system pages of `system` (`copy_to_ram`),
    /// for every valid system entry.
    public var copyToRAM: @Sendable (_ device: [MigratePFN], _ system: [MigratePFN], _ npages: Int) -> Errno?

    public init(devmemRelease: @escaping @Sendable (_ devmem: DRMPagemapDevmem) -> Void,
                populateDevmemPfn: @escaping @Sendable (_ devmem: DRMPagemapDevmem, _ npages: Int, _ pfns: inout [UInt64]) -> Errno?,
                copyToDevmem: @escaping @Sendable (_ device: [MigratePFN], _ system: [MigratePFN], _ npages: Int) -> Errno?,
                copyToRAM: @escaping @Sendable (_ device: [MigratePFN], _ system: [MigratePFN], _ npages: Int) -> Errno?) {
        self.devmemRelease = devmemRelease
        self.populateDevmemPfn = populateDevmemPfn
        self.copyToDevmem = copyToDevmem
        self.copyToRAM = copyToRAM
    }
}

/// One device-memory allocation (`struct drm_pagemap_devmem`): what a range
/// migrates into. Its device pages reference it (through the zone device
/// data every page carries): it is *detached*, and released, when the last
/// of them is freed.
public final class DRMPagemapDevmem: @unchecked Sendable {
    public let mm: AddressSpace
    public let pagemap: DRMPagemap
    /// Bytes (`size`): a CPU fault on any of its pages migrates this much
    /// around the fault back to RAM.
    public let size: UInt64
    public let operations: DRMPagemapDevmemOperations
    /// For the driver: what it keeps per allocation (its VRAM block).
    public let driverData: UInt64
    let detachedFlag = Atomic<Bool>(false)

    /// The corresponding kernel function is `drm_pagemap_devmem_init()`.
    public init(mm: AddressSpace, pagemap: DRMPagemap, size: UInt64, operations: DRMPagemapDevmemOperations, driverData: UInt64 = 0) {
        self.mm = mm
        self.pagemap = pagemap
        self.size = size
        self.operations = operations
        self.driverData = driverData
    }

    /// No device page refers to the allocation any more (`detached`).
    public var isDetached: Bool { detachedFlag.load(ordering: .acquiring) }
    public var pageCount: Int { Int(size >> PageGeometry.pageShift) }
}

/// The zone device data of drm_pagemap's pages (`struct drm_pagemap_zdd`):
/// a reference count, one for the migration that creates it and one per
/// device folio; the last put detaches and releases the allocation. Pages
/// store its address in ``Page/zoneDeviceData``; the count, not ARC, keeps
/// it alive.
final class DRMPagemapZDD: @unchecked Sendable {
    let refs = Atomic<Int>(1)
    let devmem: DRMPagemapDevmem

    /// `drm_pagemap_zdd_alloc()`: one reference, owned by the caller.
    static func make(_ devmem: DRMPagemapDevmem) -> DRMPagemapZDD {
        let z = DRMPagemapZDD(devmem)
        _ = Unmanaged.passRetained(z)
        return z
    }
    private init(_ devmem: DRMPagemapDevmem) { self.devmem = devmem }

    var token: UInt64 { UInt64(UInt(bitPattern: Unmanaged.passUnretained(self).toOpaque())) }

    static func from(_ token: UInt64) -> DRMPagemapZDD? {
        guard token != 0, let p = UnsafeRawPointer(bitPattern: UInt(token)) else { return nil }
        return Unmanaged<DRMPagemapZDD>.fromOpaque(p).takeUnretainedValue()
    }

    func get() { refs.add(1, ordering: .relaxed) }

    /// `drm_pagemap_zdd_put()`; the last one runs `drm_pagemap_zdd_destroy()`.
    func put() {
        guard refs.subtract(1, ordering: .acquiringAndReleasing).newValue == 0 else { return }
        devmem.detachedFlag.store(true, ordering: .releasing)
        devmem.operations.devmemRelease(devmem)
        Unmanaged.passUnretained(self).release()
    }
}

/// The driver's pagemap operations (`struct drm_pagemap_ops`).
public struct DRMPagemapOperations: Sendable {
    /// Populates `[start, end)` of `mm` with device memory (`populate_mm`):
    /// allocate a ``DRMPagemapDevmem`` and call
    /// ``DRMPagemap/migrateToDevmem(_:start:end:)``. Runs with the mmap lock
    /// held for reading. Best effort: an error leaves the range where it was.
    public var populateMM: @Sendable (_ pagemap: DRMPagemap, _ start: UInt64, _ end: UInt64, _ mm: AddressSpace) -> Errno?
    public init(populateMM: @escaping @Sendable (_ pagemap: DRMPagemap, _ start: UInt64, _ end: UInt64, _ mm: AddressSpace) -> Errno?) {
        self.populateMM = populateMM
    }
}

/// A device's memory as drm_pagemap sees it (`struct drm_pagemap`): a
/// device-private page map whose callbacks are drm_pagemap's, the driver's
/// ``DRMPagemapOperations``, and the migrations between it and RAM.
public final class DRMPagemap: @unchecked Sendable {
    public let kernel: Kernel
    /// The device-private page map (`pagemap`), registered by the driver with
    /// ``pagemapOperations`` (or its own wrapper around them).
    public let pageMap: DevicePageMap
    public let operations: DRMPagemapOperations
    /// Whether migrations to the device may move 2 MiB folios whole
    /// (SELECT_COMPOUND for a 2 MiB aligned range): drm_pagemap with THP
    /// support (2026). Off: every page moves as 4 KiB. May change between
    /// migrations.
    public var largeFolios: Bool {
        get { largeFolioFlag.load(ordering: .relaxed) }
        set { largeFolioFlag.store(newValue, ordering: .relaxed) }
    }
    let largeFolioFlag: Atomic<Bool>

    /// The corresponding kernel function is `drm_pagemap_init()`.
    public init(kernel: Kernel, pageMap: DevicePageMap, operations: DRMPagemapOperations, largeFolios: Bool = true) {
        self.kernel = kernel
        self.pageMap = pageMap
        self.operations = operations
        self.largeFolioFlag = Atomic(largeFolios)
    }

    /// This memory's `pgmap_owner`.
    public var owner: DeviceOwner { pageMap.owner }

    /// The page-map callbacks of drm_pagemap: `folio_free` drops the
    /// folio's zone-device-data reference, `migrate_to_ram` is
    /// ``migrateToRAM(_:)``, `folio_split` gives each new folio a reference
    /// of its own.
    ///
    /// The corresponding kernel function is `drm_pagemap_pagemap_ops_get()`.
    public static let pagemapOperations = DevicePageMapOperations(
        folioFree: { folio in folioFree(folio) },
        migrateToRAM: { vmf in migrateToRAM(vmf) },
        folioSplit: { head, tail in folioSplit(head, tail) })

    /// `drm_pagemap_folio_free()`: the folio's reference on its allocation goes.
    public static func folioFree(_ folio: Folio) {
        let head = folio.page(0)
        let z = DRMPagemapZDD.from(head.zoneDeviceData)
        head.zoneDeviceData = 0
        z?.put()
    }

    /// A 2 MiB device folio was split: each new folio refers to the allocation too.
    public static func folioSplit(_ head: Folio, _ tail: Folio?) {
        guard let tail, let z = DRMPagemapZDD.from(head.page(0).zoneDeviceData) else { return }
        z.get()
        tail.page(0).zoneDeviceData = z.token
    }

    /// The allocation a device page of drm_pagemap belongs to, or nil.
    ///
    /// The corresponding kernel function is `drm_pagemap_page_to_dpagemap()`
    /// (which returns the allocation's pagemap).
    public static func allocation(of page: Page) -> DRMPagemapDevmem? {
        DRMPagemapZDD.from(page.folio.page(0).zoneDeviceData)?.devmem
    }

    /// Populates `[start, end)` of `mm` with this device's memory through
    /// the driver's ``DRMPagemapOperations/populateMM``, holding the mmap
    /// lock for reading (the caller must not hold it).
    ///
    /// - Throws: what the driver's operation returns.
    ///
    /// The corresponding kernel function is `drm_pagemap_populate_mm()`.
    public func populateMM(start: UInt64, end: UInt64, mm: AddressSpace) throws(Errno) {
        mm.mmapReadLock()
        let err = operations.populateMM(self, start, end, mm)
        mm.mmapReadUnlock()
        if let err { throw err }
    }
}
