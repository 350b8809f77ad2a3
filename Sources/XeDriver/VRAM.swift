import GPUSVM
import SVMEmu

/// One VRAM block backing a ``DRMPagemapDevmem`` (Xe's VRAM buffer object):
/// freed when the allocation is released and no eviction is using it.
final class XeVRAMAllocation: @unchecked Sendable {
    let pfn: UInt64
    let order: Int
    /// Guarded by the VRAM lock.
    var released = false
    var evicting = 0
    var devmem: DRMPagemapDevmem? = nil
    init(pfn: UInt64, order: Int) {
        self.pfn = pfn
        self.order = order
    }
}

/// The VRAM lock's state.
struct VRAMState {
    var buddy: VRAMBuddy
    /// Live allocations, least recently migrated first (the eviction LRU).
    var live: [XeVRAMAllocation] = []
}

extension XeDevice {

    /// Migrates `range` to VRAM through drm_pagemap (`xe_svm_alloc_vram()`):
    /// `drm_pagemap_populate_mm()` over the range, which calls back
    /// ``populateMM(_:_:_:_:)``. Caller holds the VM lock, no mmap lock.
    func allocateVRAM(for range: GPUSVMRange) throws(Errno) {
        try pagemap.populateMM(start: range.start, end: range.end, mm: mm)
    }

    /// drm_pagemap's `populate_mm` (`xe_drm_pagemap_populate_mm()`): one VRAM
    /// block of the range's size (evicting the least recently migrated
    /// allocations while VRAM is full), a device-memory allocation over it,
    /// and `drm_pagemap_migrate_to_devmem()`. Mmap lock held for reading.
    func populateMM(_ pagemap: DRMPagemap, _ start: UInt64, _ end: UInt64, _ mm: AddressSpace) -> Errno? {
        let pages = Int((end - start) >> PageGeometry.pageShift)
        guard let order = VRAMBuddy.order(pages: pages) else { return .invalidArgument }
        if settings.failDeviceAllocation { return .noMemory }
        let a = kernel.phases.begin()
        var block: XeVRAMAllocation? = nil
        for _ in 0..<8 {
            if let pfn = vram.withLock({ $0.buddy.allocate(order: order) }) {
                block = XeVRAMAllocation(pfn: pfn, order: order)
                break
            }
            // VRAM pressure: evict the oldest allocation (TTM's eviction of a BO).
            guard evictOldest() else { break }
        }
        kernel.phases.end(.allocate, a)
        guard let block else { return .noMemory }
        let devmem = DRMPagemapDevmem(mm: mm, pagemap: pagemap, size: UInt64(pages) << PageGeometry.pageShift,
                                      operations: devmemOperations(block))
        vram.withLock { v in
            block.devmem = devmem
            v.live.append(block)
        }
        do {
            try pagemap.migrateToDevmem(devmem, start: start, end: end)
        } catch {
            return error
        }
        return nil
    }

    /// The allocation's operations (`xe_svm_devmem_ops`).
    func devmemOperations(_ block: XeVRAMAllocation) -> DRMPagemapDevmemOperations {
        let kernel = self.kernel, engine = copyEngine, vram = self.vram
        return DRMPagemapDevmemOperations(
            devmemRelease: { _ in
                vram.withLock { v in
                    block.released = true
                    if block.evicting == 0 { XeDevice.free(block, &v) }
                }
            },
            populateDevmemPfn: { _, npages, pfns in
                for i in 0..<npages { pfns[i] = block.pfn + UInt64(i) }
                return nil
            },
            copyToDevmem: { device, system, npages in
                XeDevice.copy(kernel, engine, to: device, from: system, npages, zeroHoles: true)
                return nil
            },
            copyToRAM: { device, system, npages in
                XeDevice.copy(kernel, engine, to: system, from: device, npages, zeroHoles: false)
                return nil
            })
    }

    /// Frees a released block that no eviction uses. VRAM lock held.
    static func free(_ block: XeVRAMAllocation, _ v: inout VRAMState) {
        guard let i = v.live.firstIndex(where: { $0 === block }) else { return }
        v.live.remove(at: i)
        block.devmem = nil
        v.buddy.release(block.pfn, order: block.order)
    }

    /// The device's copy engine (`xe_svm_copy()`): for every valid entry of
    /// `to`, the bytes of `from` (2 MiB for a compound entry), or zeroes
    /// where `from` has no page and `zeroHoles`.
    static func copy(_ kernel: Kernel, _ engine: any CopyEngine, to: [MigratePFN], from: [MigratePFN], _ npages: Int, zeroHoles: Bool) {
        var i = 0
        while i < npages {
            let d = to[i]
            let step = d.isCompound || from[i].isCompound ? PageGeometry.pmdPages : 1
            defer { i += step }
            guard d.isValid else { continue }
            let bytes = d.isCompound ? PageGeometry.pmdSize : PageGeometry.pageSize
            let dst = kernel.pfnToPage(d.pfn).unsafeBytes
            if let src = kernel.page(from[i])?.unsafeBytes {
                engine.copy(to: dst, from: src, bytes: bytes)
            } else if zeroHoles {
                dst.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
            }
        }
        engine.wait()
    }

    /// Evicts the least recently migrated allocation still live. Returns
    /// false when there is none.
    func evictOldest() -> Bool {
        guard let block = vram.withLock({ v -> XeVRAMAllocation? in
            guard let b = v.live.first(where: { !$0.released && $0.evicting == 0 }) else { return nil }
            // To the back: a failed eviction is not picked again at once.
            v.live.removeAll { $0 === b }
            v.live.append(b)
            b.evicting += 1
            return b
        }) else { return false }
        evict(block)
        return true
    }

    /// Evicts every VRAM allocation to RAM (`drm_pagemap_evict_to_ram()` on
    /// each; what TTM does when the device is suspended or VRAM is reclaimed).
    /// Caller holds no mmap lock and no VM lock is needed.
    /// - Returns: VRAM pages freed.
    @discardableResult
    public func evictAll() -> Int {
        let before = vramPagesInUse
        let blocks = vram.withLock { v -> [XeVRAMAllocation] in
            let l = v.live.filter { !$0.released }
            for b in l { b.evicting += 1 }
            return l
        }
        for b in blocks { evict(b) }
        let after = vramPagesInUse
        return before > after ? Int(before - after) : 0
    }

    /// One eviction; the caller counted itself in `block.evicting`.
    private func evict(_ block: XeVRAMAllocation) {
        if let devmem = vram.withLock({ _ in block.devmem }) {
            try? DRMPagemap.evictToRAM(devmem)
            evictedPages.add(devmem.pageCount, ordering: .relaxed)
        }
        vram.withLock { v in
            block.evicting -= 1
            if block.released && block.evicting == 0 { XeDevice.free(block, &v) }
        }
    }

    /// Pages evicted from VRAM so far.
    public var pagesEvicted: Int { evictedPages.load(ordering: .relaxed) }
}
