import SVMEmu

/// The device's VRAM allocator: a buddy allocator over one device page map,
/// blocks of 4 KiB to 2 MiB (orders 0 to 9), each naturally aligned and
/// physically contiguous, as Xe's VRAM manager hands a range one block
/// (`xe_svm_copy` relies on it). Guarded by the device's VRAM lock.
struct VRAMBuddy {
    let startPfn: UInt64
    let pageCount: UInt64
    /// Free blocks by order, as pfns.
    var free: [Set<UInt64>] = Array(repeating: [], count: PageGeometry.pmdOrder + 1)
    var freePages: UInt64 = 0

    init(startPfn: UInt64, pageCount: UInt64) {
        self.startPfn = startPfn
        self.pageCount = pageCount
        var pfn = startPfn
        while pfn + PageGeometry.pmdPages64 <= startPfn + pageCount {
            free[PageGeometry.pmdOrder].insert(pfn)
            pfn += PageGeometry.pmdPages64
        }
        freePages = pfn - startPfn
    }

    /// The order of a block of `pages` pages (a power of two up to 512), or nil.
    static func order(pages: Int) -> Int? {
        guard pages > 0, pages & (pages - 1) == 0, pages <= PageGeometry.pmdPages else { return nil }
        return pages.trailingZeroBitCount
    }

    /// A free block of `order`, split from a larger one if need be (lowest pfn first).
    mutating func allocate(order: Int) -> UInt64? {
        var o = order
        while o <= PageGeometry.pmdOrder && free[o].isEmpty { o += 1 }
        guard o <= PageGeometry.pmdOrder, let pfn = free[o].min() else { return nil }
        free[o].remove(pfn)
        while o > order {
            o -= 1
            free[o].insert(pfn + (UInt64(1) << UInt64(o)))
        }
        freePages -= UInt64(1) << UInt64(order)
        return pfn
    }

    /// Gives a block back, merging it with its free buddies.
    mutating func release(_ pfn: UInt64, order: Int) {
        freePages += UInt64(1) << UInt64(order)
        var p = pfn, o = order
        while o < PageGeometry.pmdOrder {
            let buddy = startPfn + ((p - startPfn) ^ (UInt64(1) << UInt64(o)))
            guard free[o].remove(buddy) != nil else { break }
            p = min(p, buddy)
            o += 1
        }
        free[o].insert(p)
    }
}
