import CSVMSupport

/// What kind of device memory a page map describes (`enum memory_type`).
public enum DevicePageMapType: String, Sendable {
    /// MEMORY_DEVICE_PRIVATE: the CPU cannot address it; mapped by non-present
    /// device-private entries; a CPU touch faults into `migrateToRAM`.
    case `private`
    /// MEMORY_DEVICE_COHERENT: CPU-addressable, mapped by normal PTEs, never pinned.
    case coherent
}

/// A CPU fault on device memory (`struct vm_fault`), handed to `migrateToRAM`.
public struct VMFault: @unchecked Sendable {
    /// The VMA of the faulting address (`vmf->vma`).
    public let vma: VMA
    /// The faulting address (not aligned).
    public let address: UInt64
    /// The device page that faulted (`vmf->page`).
    public let page: Page
    /// True when the fault came from a PMD-level device-private entry (no PTE):
    /// the driver migrates the whole folio (`folio_order(page_folio(vmf->page))`).
    public let isPMD: Bool
    /// Whether the fault path holds the folio lock of `page` while
    /// `migrateToRAM` runs: true under the trylock policies (v6.15 onwards)
    /// and for every PMD-level fault, false for a PTE fault under the legacy
    /// policy (v6.1-v6.14), where collect trylocks the fault page like any
    /// other. `MigrateVMA(fault:)` carries it into the migration.
    public let faultPageLocked: Bool
    /// The faulting address space (`vmf->vma->vm_mm`).
    public var mm: AddressSpace { vma.mm }
}

/// What a fault handler returns (`vm_fault_t`).
public enum VMFaultResult: Sendable, Equatable {
    /// 0: handled (or nothing to do): the access is retried.
    case done
    /// VM_FAULT_SIGBUS.
    case sigbus
    /// VM_FAULT_OOM.
    case oom
}

/// The callbacks of a device page map (`struct dev_pagemap_ops`). Each is
/// optional, as in the kernel; registration checks the ones a type requires.
public struct DevicePageMapOperations: Sendable {
    /// `folio_free`: the folio's reference count reached zero; the driver takes it back.
    public var folioFree: (@Sendable (Folio) -> Void)?
    /// `migrate_to_ram`: a CPU touched a device-private page. Called with the
    /// mmap lock held for reading and a reference on `vmf.page`; in the trylock
    /// policies the page is also locked. Must migrate the page or return `.sigbus`.
    ///
    /// The callback migrates with ``Kernel/migrateVMASetup(_:)`` (with
    /// `faultPage: vmf.page` and ``MigrateSelect/devicePrivate``), then pages
    /// and finalize, and returns with the mmap lock still held; the fault
    /// path, not the callback, drops the page's reference and lock afterwards.
    /// ``VMFaultResult/done`` retries the access even when nothing moved
    /// (another thread may have migrated the page).
    public var migrateToRAM: (@Sendable (VMFault) -> VMFaultResult)?
    /// `folio_split`: called for each new folio when a large device folio is
    /// split (`tail` non-nil), then once with `tail == nil` to mark the end.
    public var folioSplit: (@Sendable (_ head: Folio, _ tail: Folio?) -> Void)?
    /// `memory_failure`: a range of the device memory went bad.
    public var memoryFailure: (@Sendable (_ pfn: UInt64, _ pages: Int) -> Errno?)?
    /// A table of the given callbacks; ``Kernel/memremapPages(type:owner:bytes:operations:)``
    /// checks that the page map's type has the ones it requires.
    public init(folioFree: (@Sendable (Folio) -> Void)? = nil,
                migrateToRAM: (@Sendable (VMFault) -> VMFaultResult)? = nil,
                folioSplit: (@Sendable (Folio, Folio?) -> Void)? = nil,
                memoryFailure: (@Sendable (UInt64, Int) -> Errno?)? = nil) {
        self.folioFree = folioFree
        self.migrateToRAM = migrateToRAM
        self.folioSplit = folioSplit
        self.memoryFailure = memoryFailure
    }
}

/// A range of device memory with page frames (`struct dev_pagemap`): the
/// emulated VRAM. Its pages have real bytes, reachable by the device's copy
/// engine through ``Page/withBytes(_:)`` (``Page/unsafeBytes`` for an engine that
/// completes later), never through the CPU access path.
public final class DevicePageMap: @unchecked Sendable, CustomStringConvertible {
    /// Private or coherent (`pgmap->type`).
    public let type: DevicePageMapType
    /// `pgmap->owner`.
    public let owner: DeviceOwner
    /// The driver's callbacks (`pgmap->ops`).
    public let operations: DevicePageMapOperations
    /// First pfn (`pgmap->range.start` as a pfn).
    public let startPfn: UInt64
    /// Number of pages in the map.
    public let pageCount: UInt64
    let region: UInt16
    let index: UInt32
    unowned let kernel: Kernel

    init(kernel: Kernel, type: DevicePageMapType, owner: DeviceOwner, operations: DevicePageMapOperations,
         startPfn: UInt64, pageCount: UInt64, region: UInt16, index: UInt32) {
        self.kernel = kernel
        self.type = type
        self.owner = owner
        self.operations = operations
        self.startPfn = startPfn
        self.pageCount = pageCount
        self.region = region
        self.index = index
    }

    /// Whether `pfn` lies in this page map.
    public func contains(pfn: UInt64) -> Bool { pfn >= startPfn && pfn < startPfn + pageCount }
    /// The page at `offset` pages from the start of the range; `offset` must
    /// be below ``pageCount`` (else the process stops, see
    /// ``contractViolation(_:file:line:)``). Holds no reference.
    public func page(at offset: UInt64) -> Page {
        if offset >= pageCount { contractViolation("DevicePageMap.page(at:): offset \(offset) outside the map's \(pageCount) pages") }
        return Page(pfn: startPfn + offset, kernel: kernel)
    }
    /// Size of the map in bytes.
    public var byteCount: UInt64 { pageCount << PageGeometry.pageShift }
    /// `dev_pagemap(type, owner, pfn start+count)`.
    public var description: String {
        "dev_pagemap(\(type), \(owner), pfn 0x\(String(startPfn, radix: 16))+\(pageCount))"
    }

    /// `free_zone_device_folio()`: reset what the mapping left, then `folio_free`.
    /// Called when the reference count reached zero; the caller holds no lock
    /// on the folio, and the driver's callback receives it.
    func freeFolio(_ folio: Folio) {
        let m = folio.meta
        m.clearFlags(PageFlags.anon.rawValue | PageFlags.anonExclusive.rawValue | PageFlags.dirty.rawValue
                     | PageFlags.swapBacked.rawValue | PageFlags.lru.rawValue)
        m.mappingMM = 0
        // `__ClearPageAnonExclusive()` on each page: a plain read and write,
        // no lock-prefixed instruction, as in the kernel (nobody else holds
        // a folio whose last reference is gone). Tails mostly have it clear
        // (a PMD mapping keeps it on the head), so the write is skipped then.
        if folio.pageCount > 1 {
            folio.kernelRef._withUnsafeGuaranteedRef { k in
                for pfn in (folio.pfn + 1)..<(folio.pfn + UInt64(folio.pageCount)) {
                    k.metaPtr(pfn).clearFlagsUnshared(PageFlags.anonExclusive.rawValue)
                }
            }
        }
        operations.folioFree?(folio)
    }
}

extension Kernel {
    /// Registers `bytes` of device memory (rounded up to 2 MiB) as a device page
    /// map. Its pages start free: reference count 0 (`zoneDevicePageInit` hands them out).
    ///
    /// Caller holds no lock. The map lives as long as the kernel (there is no
    /// `memunmap_pages()`); its bytes are real memory the device's copy
    /// engine reaches through ``Page/withBytes(_:)``.
    ///
    /// - Parameters:
    ///   - type: private (the CPU cannot address it) or coherent.
    ///   - owner: the `pgmap_owner` migrations filter on; nil is refused.
    ///   - bytes: the size, rounded up to 2 MiB.
    ///   - operations: the driver's callbacks.
    /// - Returns: the new page map.
    /// - Throws: ``Errno/invalidArgument`` when `owner` is nil, a
    ///   device-private map lacks `migrateToRAM` or `folioFree`, a coherent
    ///   map lacks `folioFree`, or the size is zero; ``Errno/noSpace`` past
    ///   ``Kernel/maxPageMaps`` maps or ``Kernel/maxRegions`` physical
    ///   regions; ``Errno/noMemory`` when the map would end beyond
    ///   ``KernelConfiguration/maxPhysicalBytes`` or the host refuses the
    ///   memory. A diagnostic (``Kernel/diagnostics``) names the limit
    ///   reached. Nothing is registered then.
    ///
    /// The corresponding kernel function is `memremap_pages()` (`devm_memremap_pages()`).
    public func memremapPages(type: DevicePageMapType, owner: DeviceOwner?, bytes: UInt64,
                              operations: DevicePageMapOperations) throws(Errno) -> DevicePageMap {
        guard let owner, bytes > 0 else { throw .invalidArgument }
        switch type {
        case .private:
            guard operations.migrateToRAM != nil, operations.folioFree != nil else { throw .invalidArgument }
        case .coherent:
            guard operations.folioFree != nil else { throw .invalidArgument }
        }
        let pages = ((bytes + PageGeometry.pmdSize64 - 1) >> PageGeometry.pmdShift) << PageGeometry.pmdOrder
        var taken = pageMapIndices.load(ordering: .relaxed)
        while true {
            guard taken < Kernel.maxPageMaps else {
                warn("memremap_pages: too many device page maps (at most \(Kernel.maxPageMaps))", kind: .machineLimit)
                throw .noSpace
            }
            let (exchanged, now) = pageMapIndices.compareExchange(expected: taken, desired: taken + 1, ordering: .relaxed)
            if exchanged { break }
            taken = now
        }
        let index = UInt32(taken)
        // An index whose region cannot be added stays unused.
        let (start, region, _) = try addRegion(pages: pages)
        let pgmap = DevicePageMap(kernel: self, type: type, owner: owner, operations: operations,
                                  startPfn: start, pageCount: pages, region: region, index: index)
        for pfn in start..<(start + pages) {
            let m = metaPtr(pfn)
            m.atomicFlags.store(PageFlags.zoneDevice.rawValue, ordering: .releasing)
            m.atomicRefcount.store(0, ordering: .releasing)
            m.pgmap = index + 1
            m.head = pfn
            m.order = 0
        }
        pageMapTable[Int(index)] = Unmanaged.passRetained(pgmap)
        pageMaps.withLock { $0.append(pgmap) }
        return pgmap
    }

    /// Hands out a free device page (or a 2 MiB folio when `order` is 9):
    /// reference count 0 to 1, the folio LOCKED, compound when order > 0.
    /// A page that is in use (reference count not 0, or a tail of a live
    /// large folio), not ZONE_DEVICE, or a misaligned head for order 9 is a
    /// driver bug: reported, and nil returned. Each page of the new folio is
    /// reinitialised, so the pages of a freed 2 MiB folio may be handed out
    /// again as 4 KiB pages (and the other way round).
    ///
    /// The driver calls it on a page its own allocator picked, holding its
    /// own allocator lock if it likes (this takes none). The returned folio's
    /// one reference belongs to the driver, which hands it to a migration as
    /// a destination (``Kernel/migrateVMAPages(_:)`` wants it locked, as it
    /// comes); when the last reference goes, the page map's
    /// ``DevicePageMapOperations/folioFree`` gets the folio back.
    ///
    /// - Parameters:
    ///   - page: a free page of a device page map (the head for order 9).
    ///   - order: 0 for 4 KiB, 9 for a 2 MiB folio.
    /// - Returns: the folio, or nil after a diagnostic.
    ///
    /// The corresponding kernel function is `zone_device_page_init()`.
    @discardableResult
    public func zoneDevicePageInit(_ page: Page, order: Int = 0) -> Folio? {
        let m = page.meta
        guard m.test(PageFlags.zoneDevice.rawValue), m.pgmap != 0 else {
            warn("zone_device_page_init: page is not a ZONE_DEVICE page", "\(page)")
            return nil
        }
        guard order == 0 || (order == PageGeometry.pmdOrder && page.pfn & (PageGeometry.pmdPages64 - 1) == 0) else {
            warn("zone_device_page_init: order must be 0, or 9 on a 2 MiB aligned pfn", "\(page) order \(order)")
            return nil
        }
        let count = 1 << order
        for i in 0..<count where zoneDevicePageInUse(page.pfn + UInt64(i)) {
            warn("zone_device_page_init: page is in use (reference count not zero)", "\(Page(pfn: page.pfn + UInt64(i), kernel: self))")
            return nil
        }
        // Every page of the new folio is set up afresh (head, order, flags,
        // mapping): a page may still carry the head and order of a large
        // folio it belonged to before, freed and carved up since.
        prepareNewFolio(pfn: page.pfn, order: order, flags: PageFlags.zoneDevice.rawValue | PageFlags.locked.rawValue,
                        pgmap: m.pgmap)
        return Folio(pfn: page.pfn, kernel: self)
    }

    /// Whether the device page at `pfn` is in use: it holds references, or
    /// it is a tail of a large folio that is still live (a head that still
    /// covers it and holds references). The head a page records is not
    /// enough: a freed 2 MiB folio leaves it in its tails, and the driver
    /// may have handed the old head out again as a 4 KiB page.
    func zoneDevicePageInUse(_ pfn: UInt64) -> Bool {
        let m = metaPtr(pfn)
        if m.refcount != 0 { return true }
        let head = m.head
        guard head != pfn else { return false }
        let h = metaPtr(head)
        return h.test(PageFlags.head.rawValue) && pfn &- head < (UInt64(1) << UInt64(h.order)) && h.refcount != 0
    }

    /// The device page map containing `pfn`, if any. Takes the page-map list's
    /// lock; fault paths use ``Folio/pageMap`` instead.
    public func pageMap(containing pfn: UInt64) -> DevicePageMap? {
        pageMaps.withLock { $0.first { $0.contains(pfn: pfn) } }
    }
}
