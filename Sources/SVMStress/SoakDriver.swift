import GPUSVM
import MirrorDriver
import SVMEmu
import XeDriver

/// Which reference driver a harness runs against.
public enum HarnessDriver: String, Sendable, Codable, CaseIterable {
    /// `MirrorDevice` (lib/test_hmm.c's dmirror shape).
    case mirror
    /// `XeDevice`, the Xe-like driver on GPU SVM and drm_pagemap.
    case gpusvm
}

/// What the soak needs from a driver: GPU accesses through its page table,
/// migrations both ways at 4 KiB and 2 MiB, eviction, and its counters.
protocol SoakDriver: AnyObject, Sendable {
    func read(_ address: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(Errno)
    func write(_ address: UInt64, from buffer: UnsafeRawBufferPointer) throws(Errno)
    func migrateToDevice(_ address: UInt64, pages: Int) throws(Errno) -> Int
    func migrateToSystem(_ address: UInt64, pages: Int) throws(Errno) -> Int
    /// One 2 MiB region to the device or back as a whole folio where it can.
    func migrateHuge(_ address: UInt64, toDevice: Bool) -> Int
    func evictAll() -> Int
    var faults: Int { get }
    /// Device folios split so far.
    var deviceFolioSplits: Int { get }
    /// The frame the device's page table maps at `address` and whether the
    /// device may write it, or nil where a device access would fault. At a
    /// quiescent point only.
    func deviceEntry(at address: UInt64) -> (pfn: UInt64, writable: Bool)?
}

extension MirrorDevice: SoakDriver {
    func migrateHuge(_ address: UInt64, toDevice: Bool) -> Int {
        var s = settings
        s.migrationGranularity = .huge2M
        settings = s
        let n = toDevice ? (try? migrateToDevice(address, pages: PageGeometry.pmdPages)) ?? 0
            : (try? migrateToSystem(address, pages: PageGeometry.pmdPages)) ?? 0
        s.migrationGranularity = .base4K
        settings = s
        return n
    }
    var deviceFolioSplits: Int { folioSplitCalls.ends }
    func deviceEntry(at address: UInt64) -> (pfn: UInt64, writable: Bool)? {
        deviceMapping(at: address).map { ($0.pfn, $0.writable) }
    }
}

extension XeDevice: SoakDriver {
    /// A 2 MiB aligned region in a VMA that covers it gets a 2 MiB range,
    /// which drm_pagemap moves as one folio.
    func migrateHuge(_ address: UInt64, toDevice: Bool) -> Int {
        toDevice ? (try? migrateToDevice(address, pages: PageGeometry.pmdPages)) ?? 0
            : (try? migrateToSystem(address, pages: PageGeometry.pmdPages)) ?? 0
    }
    /// drm_pagemap gives every new folio of a split its own reference; the
    /// device does not count splits.
    var deviceFolioSplits: Int { 0 }
    func deviceEntry(at address: UInt64) -> (pfn: UInt64, writable: Bool)? {
        gpuMapping(at: address).map { ($0.pfn, $0.writable) }
    }
}

extension XeDevice: StormDriver {
    /// Applies the storm's driver-side knobs (see ``StormDriver/prepare(for:)``).
    public func prepare(for settings: StormSettings) {
        var s = self.settings
        s.exclusiveMigrateToRAMLock = settings.driverLock == .exclusive
        self.settings = s
        pagemap.largeFolios = settings.pageSize == .huge
    }

    /// The driver lock of its `migrateToRAM`.
    public var driverLockProbe: DriverLockProbe? {
        let (waiting, holding) = migrateToRAMLockState
        return DriverLockProbe(waiting: waiting, holding: holding)
    }

    /// drm_pagemap moves 2 MiB ranges as 2 MiB folios.
    public var supportsHugePages: Bool { true }

    /// A storm driver factory for the Xe-like driver: `vramBytes` of VRAM,
    /// Xe's chunk sizes. When the machine refuses the VRAM (its physical
    /// layout is full, see ``KernelConfiguration/maxPhysicalBytes``), the
    /// factory throws ``StormError/setupFailed(_:)`` naming the size, the
    /// error and the kernel's diagnostic.
    public static func stormFactory(vramBytes: UInt64) -> StormDriverFactory {
        { (kernel, mm, index) throws(StormError) -> any StormDriver in
            let bytes = Machine.roundUp(vramBytes, to: PageGeometry.pmdSize64)
            do {
                return try XeDevice(kernel: kernel, mm: mm, name: "xe\(index)", vramBytes: bytes)
            } catch {
                let said = kernel.diagnostics.suffix(1).map { " (kernel: \($0))" }.joined()
                throw .setupFailed("xe\(index): cannot register \(bytes >> 20) MiB of VRAM: \(error)\(said)")
            }
        }
    }
}
