import SVMEmu
import Synchronization

/// One notifier of a ``GPUSVM`` (`struct drm_gpusvm_notifier`): an MMU
/// interval notifier over `[start, end)`, `notifierSize` aligned, and the
/// ranges inside it in address order.
public final class GPUSVMNotifier: @unchecked Sendable, CustomStringConvertible {
    public let start: UInt64
    public let end: UInt64
    /// The interval notifier (`notifier`), for `mmu_interval_read_begin()`.
    public internal(set) var interval: MMUIntervalNotifier! = nil
    /// The ranges, sorted by start. Changed under the driver SVM lock and
    /// the notifier lock for writing; read under either.
    var ranges: [GPUSVMRange] = []
    /// The interval notifier was removed already (`flags.removed`).
    var removed = false

    init(start: UInt64, end: UInt64) {
        self.start = start
        self.end = end
    }

    /// Index of the first range overlapping `[s, e)`.
    func firstIndex(overlapping s: UInt64, _ e: UInt64) -> Int? {
        var lo = 0, hi = ranges.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if ranges[mid].end <= s { lo = mid + 1 } else { hi = mid }
        }
        return lo < ranges.count && ranges[lo].start < e ? lo : nil
    }

    func insert(_ r: GPUSVMRange) {
        var lo = 0, hi = ranges.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if ranges[mid].start < r.start { lo = mid + 1 } else { hi = mid }
        }
        ranges.insert(r, at: lo)
    }

    /// Ranges in the notifier right now.
    public var rangeCount: Int { ranges.count }

    public var description: String {
        "notifier [0x\(String(start, radix: 16)), 0x\(String(end, radix: 16))) \(ranges.count) ranges"
    }
}

/// The state bits of a range's pages (`struct drm_gpusvm_pages_flags`).
public struct GPUSVMPagesFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// The range may migrate to device memory (`migrate_devmem`): an
    /// anonymous VMA and a context that allowed it.
    public static let migrateDevmem = GPUSVMPagesFlags(rawValue: 1 << 0)
    /// The CPU unmapped the range (`unmapped`), from an MMU_NOTIFY_UNMAP.
    public static let unmapped = GPUSVMPagesFlags(rawValue: 1 << 1)
    /// Only part of it was unmapped (`partial_unmap`).
    public static let partialUnmap = GPUSVMPagesFlags(rawValue: 1 << 2)
    /// The range's pages are mapped for the device (`has_dma_mapping`).
    public static let hasDMAMapping = GPUSVMPagesFlags(rawValue: 1 << 3)
    /// They are device pages (`has_devmem_pages`).
    public static let hasDevmemPages = GPUSVMPagesFlags(rawValue: 1 << 4)
    /// They were faulted in without write permission (SVMEmu: the access's
    /// permission, see ``GPUSVMContext/readOnly``).
    public static let readOnly = GPUSVMPagesFlags(rawValue: 1 << 5)
}

/// One mapped entry of a range (`struct drm_pagemap_addr`): the frame the
/// GPU reaches for `1 << order` pages and how.
public struct GPUSVMAddress: Sendable, Hashable {
    /// First frame (a system or device page).
    public var pfn: UInt64
    /// 0, or 9 for a 2 MiB mapping.
    public var order: UInt8
    /// A device page of the owner (`DRM_INTERCONNECT_DRIVER`), else system memory.
    public var device: Bool
    /// The CPU maps it writable.
    public var write: Bool
}

/// A range of a ``GPUSVM`` (`struct drm_gpusvm_range`): the unit the driver
/// faults, migrates and binds, `[start, end)` of one chunk size.
///
/// Its ``flags``, ``addresses`` and ``notifierSeq`` change under the
/// notifier lock; read them under it (``GPUSVM/withNotifierLock(_:)``), or
/// as an advisory snapshot without it (as `READ_ONCE` in Xe).
public final class GPUSVMRange: @unchecked Sendable, CustomStringConvertible {
    public let start: UInt64
    public let end: UInt64
    public unowned let notifier: GPUSVMNotifier
    let flagBits = Atomic<UInt32>(0)
    /// The pages as last mapped (`dma_addr`): one entry per mapping, in
    /// address order, an order-9 entry covering 512 pages.
    public internal(set) var addresses: [GPUSVMAddress] = []
    /// The interval notifier's sequence at the last successful get-pages (`notifier_seq`).
    public internal(set) var notifierSeq: UInt64 = .max
    /// For the driver: whatever it keeps per range (Xe's `tile_present`,
    /// its garbage-collector link). Guarded by the driver's own locks.
    public var driverData: UInt64 = 0

    init(start: UInt64, end: UInt64, notifier: GPUSVMNotifier, migrateDevmem: Bool) {
        self.start = start
        self.end = end
        self.notifier = notifier
        if migrateDevmem { flagBits.store(GPUSVMPagesFlags.migrateDevmem.rawValue, ordering: .relaxed) }
    }

    /// The flags (a `READ_ONCE` snapshot).
    public var flags: GPUSVMPagesFlags { GPUSVMPagesFlags(rawValue: flagBits.load(ordering: .acquiring)) }
    func setFlags(_ f: GPUSVMPagesFlags) { flagBits.store(f.rawValue, ordering: .releasing) }

    public var size: UInt64 { end - start }
    public var pageCount: Int { Int(size >> PageGeometry.pageShift) }

    public var description: String {
        "range [0x\(String(start, radix: 16)), 0x\(String(end, radix: 16))) seq \(notifierSeq == .max ? "-" : String(notifierSeq))"
    }
}

extension GPUSVM {
    /// Whether the range's pages may be bound (`has_devmem_pages` or
    /// `has_dma_mapping`): the check a driver makes under the notifier lock
    /// as the very last step before it commits a GPU binding. Finer than the
    /// notifier sequence, which covers the whole notifier: an invalidation
    /// of another range of the same notifier leaves this one valid.
    ///
    /// Caller holds ``notifierLock`` (either mode); a call without it is
    /// reported as a diagnostic.
    ///
    /// The corresponding kernel function is `drm_gpusvm_range_pages_valid()`.
    public func rangePagesValid(_ range: GPUSVMRange) -> Bool {
        if !notifierLock.isLocked { kernel.warn("drm_gpusvm_range_pages_valid: notifier lock not held", "\(range)", kind: .lockNotHeld) }
        return !range.flags.isDisjoint(with: [.hasDevmemPages, .hasDMAMapping])
    }

    /// Marks `range` unmapped, and partially unmapped when `mmuRange` does
    /// not cover it, for the driver's garbage collector. Called from the
    /// invalidation callback of an MMU_NOTIFY_UNMAP (notifier lock held for
    /// writing; a call without it is reported).
    ///
    /// The corresponding kernel function is `drm_gpusvm_range_set_unmapped()`.
    public func rangeSetUnmapped(_ range: GPUSVMRange, _ mmuRange: MMUNotifierRange) {
        if !notifierWriteHeld.load(ordering: .relaxed) {
            kernel.warn("drm_gpusvm_range_set_unmapped: notifier lock not held for writing", "\(range)", kind: .lockNotHeld)
        }
        var f = range.flags
        f.insert(.unmapped)
        if range.start < mmuRange.start || range.end > mmuRange.end { f.insert(.partialUnmap) }
        range.setFlags(f)
    }
}
