import SVMEmu

/// The device's own page table: one 64-bit entry per virtual page of the
/// mirrored address space (a flat, lazily touched mapping), pfn << 12 with
/// VALID, WRITE and DEVICE bits. Protected by the device's page-table lock.
final class DevicePageTable: @unchecked Sendable {
    static let valid: UInt64 = 1
    static let write: UInt64 = 2
    static let device: UInt64 = 4
    /// Mapped for atomic access (dmirror's DPT_XA_TAG_ATOMIC): the CPU
    /// holds a device-exclusive entry for the page.
    static let atomic: UInt64 = 8
    let base: UInt64
    let end: UInt64
    let entries: UnsafeMutablePointer<UInt64>
    let count: Int

    /// - Throws: ``HostMemoryRefusal`` when the host refuses the table's
    ///   address space (one entry per page of the mirrored range).
    init(base: UInt64, end: UInt64) throws(HostMemoryRefusal) {
        self.base = base
        self.end = end
        count = Int((end - base) >> PageGeometry.pageShift)
        entries = try HostMemory.reserve(bytes: count * 8, for: "the device page table of \(count) entries").assumingMemoryBound(to: UInt64.self)
    }
    deinit { HostMemory.release(entries, bytes: count * 8) }

    @inline(__always) func index(_ address: UInt64) -> Int { Int((address - base) >> PageGeometry.pageShift) }
    @inline(__always) func get(_ address: UInt64) -> UInt64 { entries[index(address)] }
    @inline(__always) func set(_ address: UInt64, pfn: UInt64, write: Bool, device: Bool, atomic: Bool = false) {
        entries[index(address)] = pfn << PageGeometry.pageShift | DevicePageTable.valid | (write ? DevicePageTable.write : 0)
            | (device ? DevicePageTable.device : 0) | (atomic ? DevicePageTable.atomic : 0)
    }
    @inline(__always) func clear(_ address: UInt64) { entries[index(address)] = 0 }
    func clear(_ start: UInt64, _ end: UInt64) {
        let s = max(start, base), e = min(end, self.end)
        guard e > s else { return }
        let i = index(s), j = index(e + PageGeometry.pageSize64 - 1)
        (entries + i).update(repeating: 0, count: j - i)
    }
}

/// One entry of a ``MirrorDevice``'s page table, as ``MirrorDevice/deviceMapping(at:)`` reads it.
public struct DeviceMapping: Sendable, Equatable, CustomStringConvertible {
    /// The frame the device reaches at that address.
    public let pfn: UInt64
    /// Whether the device may write through the entry.
    public let writable: Bool
    /// Whether the frame is device memory (else system memory the device mirrors).
    public let devicePage: Bool
    /// Whether the entry is mapped for device atomics (the CPU holds a
    /// device-exclusive entry for the page).
    public let atomic: Bool
    public var description: String {
        "pfn 0x\(String(pfn, radix: 16))\(writable ? " write" : "")\(devicePage ? " device" : "")\(atomic ? " atomic" : "")"
    }
}

extension MirrorDevice {
    /// The device page table's entry for the page holding `address`, or nil
    /// where a GPU access would fault. Takes the page-table lock; what it
    /// returns may change as soon as the lock is dropped, so a check that
    /// compares it with the CPU's page table runs at a quiescent point.
    public func deviceMapping(at address: UInt64) -> DeviceMapping? {
        guard address >= pageTable.base, address < pageTable.end else { return nil }
        let e = pageTableLock.withLock { pageTable.get(address & PageGeometry.pageMask) }
        guard e & DevicePageTable.valid != 0 else { return nil }
        return DeviceMapping(pfn: e >> PageGeometry.pageShift, writable: e & DevicePageTable.write != 0,
                             devicePage: e & DevicePageTable.device != 0, atomic: e & DevicePageTable.atomic != 0)
    }
}
