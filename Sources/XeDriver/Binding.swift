import GPUSVM
import SVMEmu

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
    public func gpuMapping(at address: UInt64) -> DeviceMapping? { pageTable.mapping(at: address) }

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
