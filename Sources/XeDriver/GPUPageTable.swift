import GPUSVM
import SVMEmu

/// The GPU's page table: one 64-bit entry per virtual page of the mirrored
/// address space, pfn << 12 with VALID, WRITE and DEVICE bits, lazily
/// touched host memory. Guarded by the device's page-table lock; a GPU
/// access reads it under that lock, so zapping an entry under the lock is
/// also the GPU TLB invalidation that follows it in Xe.
final class GPUPageTable: @unchecked Sendable {
    static let valid: UInt64 = 1
    static let write: UInt64 = 2
    static let device: UInt64 = 4
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
        entries = try HostMemory.reserve(bytes: count * 8, for: "the GPU page table of \(count) entries").assumingMemoryBound(to: UInt64.self)
    }
    deinit { HostMemory.release(entries, bytes: count * 8) }

    @inline(__always) func index(_ address: UInt64) -> Int { Int((address - base) >> PageGeometry.pageShift) }
    @inline(__always) func get(_ address: UInt64) -> UInt64 { entries[index(address)] }
    @inline(__always) func set(_ address: UInt64, pfn: UInt64, write: Bool, device: Bool) {
        entries[index(address)] = pfn << PageGeometry.pageShift | GPUPageTable.valid
            | (write ? GPUPageTable.write : 0) | (device ? GPUPageTable.device : 0)
    }
    /// Clears `[start, end)`; returns whether any entry was valid.
    @discardableResult
    func zap(_ start: UInt64, _ end: UInt64) -> Bool {
        let s = max(start, base), e = min(end, self.end)
        guard e > s else { return false }
        var any = false
        for i in index(s)..<index(e + PageGeometry.pageSize64 - 1) where entries[i] != 0 {
            entries[i] = 0
            any = true
        }
        return any
    }
}

/// One entry of an ``XeDevice``'s GPU page table, as ``XeDevice/gpuMapping(at:)`` reads it.
public struct XeMapping: Sendable, Equatable, CustomStringConvertible {
    public let pfn: UInt64
    public let writable: Bool
    /// The frame is VRAM (else system memory mapped in place).
    public let devicePage: Bool
    public var description: String {
        "pfn 0x\(String(pfn, radix: 16))\(writable ? " write" : "")\(devicePage ? " vram" : "")"
    }
}

/// Per-range binding state, kept in ``GPUSVMRange/driverData`` under the
/// page-table lock (`tile_present`, `tile_invalidated`).
enum RangeBinding {
    static let present: UInt64 = 1
    static let invalidated: UInt64 = 2
}

extension XeDevice {
    /// The GPU page table's entry for the page holding `address`, or nil
    /// where a GPU access would fault. At a quiescent point only: it may
    /// change once the lock is dropped.
    public func gpuMapping(at address: UInt64) -> XeMapping? {
        guard address >= pageTable.base, address < pageTable.end else { return nil }
        let e = pageTableLock.withLock { pageTable.get(address & PageGeometry.pageMask) }
        guard e & GPUPageTable.valid != 0 else { return nil }
        return XeMapping(pfn: e >> PageGeometry.pageShift, writable: e & GPUPageTable.write != 0,
                         devicePage: e & GPUPageTable.device != 0)
    }

    /// Writes the range's pages into the GPU page table (`xe_vm_range_rebind()`'s
    /// commit). Caller holds the notifier lock (read) and has just checked
    /// ``GPUSVM/rangePagesValid(_:)``; this takes the page-table lock.
    func bind(_ range: GPUSVMRange) {
        let t = kernel.phases.begin()
        defer { kernel.phases.end(.pageTableUpdate, t) }
        pageTableLock.withLock {
            var a = range.start
            for e in range.addresses {
                for j in 0..<(1 << Int(e.order)) {
                    pageTable.set(a, pfn: e.pfn + UInt64(j), write: e.write, device: e.device)
                    a += PageGeometry.pageSize64
                }
            }
            range.driverData = RangeBinding.present
        }
    }

    /// Whether the range is bound and no invalidation zapped it since
    /// (`xe_svm_range_is_valid()`), with write permission for a write.
    func rangeIsValid(_ range: GPUSVMRange, write: Bool) -> Bool {
        pageTableLock.withLock {
            range.driverData == RangeBinding.present && (!write || !range.flags.contains(.readOnly))
        }
    }
}
