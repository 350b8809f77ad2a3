/// The frame the page tables map at one address, as
/// ``AddressSpace/mappedFrame(at:)`` reads it.
public struct MappedFrame: Sendable, Equatable, CustomStringConvertible {
    /// The 4 KiB frame at the address: for a 2 MiB entry, its first frame
    /// plus the address's page within it.
    public let pfn: UInt64
    /// The entry's level.
    public let level: PageTableLevel
    /// The entry: present (system memory or the zero page, `isSpecial`),
    /// device-private (``pfn`` is the device page) or device-exclusive
    /// (``pfn`` is the system page a device holds for atomics).
    public let entry: PageTableEntry

    /// Whether a device entry that maps `devicePfn`, `writable` or not, at
    /// this address agrees with the page tables: it names the same frame,
    /// and it is writable only where the CPU entry is writable or the page
    /// is the device's (a device-private or device-exclusive entry). A
    /// device entry that fails this survived an invalidation it should
    /// have heard, or was made without checking the notifier sequence.
    public func agrees(withDevicePfn devicePfn: UInt64, writable: Bool) -> Bool {
        pfn == devicePfn && (!writable || entry.isWrite || entry.kind != .present)
    }

    public var description: String {
        "pfn 0x\(String(pfn, radix: 16)) (\(level) \(entry.kind)\(entry.isWrite ? " write" : ""))"
    }
}

extension AddressSpace {
    /// The frame the page tables map at `address`, the 2 MiB entry's offset
    /// included: the page of a present entry, or the page behind a
    /// device-private or device-exclusive entry; nil where no frame is
    /// mapped (no entry, a migration or other swap-style entry). No locks:
    /// a snapshot, exact at quiescence.
    ///
    /// This is the one lookup checkers and tests compare a device's page
    /// table with (``MappedFrame/agrees(withDevicePfn:writable:)``, or
    /// ``deviceEntryAgrees(at:pfn:writable:)``).
    ///
    /// The closest kernel function is `folio_walk_start()` (`follow_page()`
    /// before v6.12): a page-table walk that names the page mapped at an
    /// address; like `hmm_range_fault()`, this one also names the device
    /// page behind a device-private entry.
    public func mappedFrame(at address: UInt64) -> MappedFrame? {
        let (level, e) = entry(at: address)
        switch e.kind {
        case .present, .devicePrivate, .deviceExclusive:
            let offset = level == .pmd ? (address & ~PageGeometry.pmdMask) >> PageGeometry.pageShift : 0
            return MappedFrame(pfn: e.pfn + offset, level: level, entry: e)
        default:
            return nil
        }
    }

    /// Whether a device entry mapping `pfn` (`writable` or not) at
    /// `address` agrees with the page tables
    /// (``MappedFrame/agrees(withDevicePfn:writable:)``); false where the
    /// page tables map no frame there.
    ///
    /// The closest kernel function is `folio_walk_start()` (see
    /// ``mappedFrame(at:)``).
    public func deviceEntryAgrees(at address: UInt64, pfn: UInt64, writable: Bool) -> Bool {
        mappedFrame(at: address)?.agrees(withDevicePfn: pfn, writable: writable) ?? false
    }
}
