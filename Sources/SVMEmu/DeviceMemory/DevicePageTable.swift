/// The emulated device's MMU: the page table a device's engines translate
/// through, which its driver writes. Hardware, not a kernel interface: the
/// kernel has no such structure (dmirror keeps its mirror in an xarray, Xe
/// in the GPU's own page tables); drivers in this package share it as they
/// would share a GPU design.
///
/// One 64-bit entry per virtual page of the mirrored address space (a flat,
/// lazily touched mapping): the frame's pfn shifted by the page shift, with
/// ``valid``, ``write``, ``device`` and ``atomic`` bits. The driver writes it
/// under its page-table lock (``lock``), and an engine's access reads it
/// under the same lock, so clearing an entry under the lock is also the
/// device TLB invalidation that follows it in a real driver.
public final class DevicePageTable: @unchecked Sendable {
    /// The entry maps a frame.
    public static let valid: UInt64 = 1
    /// The device may write through the entry.
    public static let write: UInt64 = 2
    /// The frame is device memory (else system memory the device mirrors).
    public static let device: UInt64 = 4
    /// Mapped for device atomics (dmirror's `DPT_XA_TAG_ATOMIC`): the CPU
    /// holds a device-exclusive entry for the page.
    public static let atomic: UInt64 = 8

    /// The first address the table covers.
    public let base: UInt64
    /// The end of the range the table covers.
    public let end: UInt64
    /// The driver's lock over the table: writers hold it, and each engine access takes it.
    public let lock: KernelMutex
    let kernel: Kernel
    let entries: UnsafeMutablePointer<UInt64>
    let count: Int

    /// A table of empty entries for `[base, end)` (an address space's
    /// range), guarded by `lock`.
    ///
    /// - Throws: ``HostMemoryRefusal`` when the host refuses the table's
    ///   memory (one entry per page of the range); `what` names the table in it.
    public init(kernel: Kernel, base: UInt64, end: UInt64, lock: KernelMutex, what: String) throws(HostMemoryRefusal) {
        self.kernel = kernel
        self.base = base
        self.end = end
        self.lock = lock
        count = Int((end - base) >> PageGeometry.pageShift)
        entries = try HostMemory.reserve(bytes: count * 8, for: "\(what) of \(count) entries").assumingMemoryBound(to: UInt64.self)
    }
    deinit { HostMemory.release(entries, bytes: count * 8) }

    /// Whether `address` is inside the table's range.
    @inlinable public func covers(_ address: UInt64) -> Bool { address >= base && address < end }

    @inline(__always) func index(_ address: UInt64) -> Int { Int((address - base) >> PageGeometry.pageShift) }

    /// The entry of the page holding `address` (inside the range); caller holds ``lock``.
    public func get(_ address: UInt64) -> UInt64 { entries[index(address)] }

    /// Maps the page holding `address` (inside the range) to frame `pfn`;
    /// caller holds ``lock``.
    public func set(_ address: UInt64, pfn: UInt64, write: Bool, device: Bool, atomic: Bool = false) {
        entries[index(address)] = pfn << PageGeometry.pageShift | DevicePageTable.valid | (write ? DevicePageTable.write : 0)
            | (device ? DevicePageTable.device : 0) | (atomic ? DevicePageTable.atomic : 0)
    }

    /// Clears the entries of `[start, end)` (clipped to the range); caller
    /// holds ``lock``. Returns whether any entry was valid.
    @discardableResult
    public func clear(_ start: UInt64, _ end: UInt64) -> Bool {
        let s = max(start, base), e = min(end, self.end)
        guard e > s else { return false }
        var any = false
        for i in index(s)..<index(e + PageGeometry.pageSize64 - 1) where entries[i] != 0 {
            entries[i] = 0
            any = true
        }
        return any
    }

    /// Runs `body` on the bytes at `address` (to the end of its page) as a
    /// device engine reaches them: under ``lock``, through the entry, which
    /// must be valid (and writable for a write). Where it is not, `fault`
    /// runs on the page's address without the lock (the driver's GPU fault
    /// handler), and the access starts over.
    ///
    /// - Throws: ``Errno/badAddress`` (EFAULT) outside the range; what
    ///   `fault` throws.
    public func access(_ address: UInt64, write: Bool, fault: (UInt64, Bool) throws(Errno) -> Void,
                       _ body: (UnsafeMutableRawPointer) -> Void) throws(Errno) {
        guard covers(address) else { throw .badAddress }
        let page = address & PageGeometry.pageMask
        while true {
            let hit = lock.withLock { () -> Bool in
                let e = get(page)
                guard e & DevicePageTable.valid != 0, !write || e & DevicePageTable.write != 0 else { return false }
                kernel.pfnToPage(e >> PageGeometry.pageShift).withBytes { body($0.baseAddress! + Int(address & ~PageGeometry.pageMask)) }
                return true
            }
            if hit { return }
            try fault(page, write)
        }
    }

    /// Reads `buffer.count` bytes at `address` as the device sees them,
    /// page by page through ``access(_:write:fault:_:)``.
    public func read(_ address: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                     fault: (UInt64, Bool) throws(Errno) -> Void) throws(Errno) {
        guard let base = buffer.baseAddress else { return }
        try forEachPageChunk(address, count: buffer.count) { (a, done, n) throws(Errno) in
            try access(a, write: false, fault: fault) { (base + done).copyMemory(from: $0, byteCount: n) }
        }
    }

    /// Writes `buffer` at `address` as the device, page by page through
    /// ``access(_:write:fault:_:)``.
    public func write(_ address: UInt64, from buffer: UnsafeRawBufferPointer,
                      fault: (UInt64, Bool) throws(Errno) -> Void) throws(Errno) {
        guard let base = buffer.baseAddress else { return }
        try forEachPageChunk(address, count: buffer.count) { (a, done, n) throws(Errno) in
            try access(a, write: true, fault: fault) { $0.copyMemory(from: base + done, byteCount: n) }
        }
    }

    /// The entry of the page holding `address` as a ``DeviceMapping``, or
    /// nil where an engine's access would fault. Takes ``lock``; what it
    /// returns may change as soon as the lock is dropped, so a check that
    /// compares it with the CPU's page table runs at a quiescent point.
    public func mapping(at address: UInt64) -> DeviceMapping? {
        guard covers(address) else { return nil }
        let e = lock.withLock { get(address & PageGeometry.pageMask) }
        guard e & DevicePageTable.valid != 0 else { return nil }
        return DeviceMapping(pfn: e >> PageGeometry.pageShift, writable: e & DevicePageTable.write != 0,
                             devicePage: e & DevicePageTable.device != 0, atomic: e & DevicePageTable.atomic != 0)
    }
}

/// One entry of a ``DevicePageTable``, as ``DevicePageTable/mapping(at:)`` reads it.
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
    /// `pfn 0x…` and the entry's `write`, `device` and `atomic` flags.
    public var description: String {
        "pfn 0x\(String(pfn, radix: 16))\(writable ? " write" : "")\(devicePage ? " device" : "")\(atomic ? " atomic" : "")"
    }
}
