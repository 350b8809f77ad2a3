import MirrorDriver
import SVMEmu

/// What a fault storm needs from a driver. Conform your own driver prototype to
/// run the same storms against its migration logic (`StormHarness.run(_:makeDriver:)`).
///
/// The harness boots the machine, asks the factory for one driver per device
/// (two for `StormScenario.twoDevices`), and talks to each driver only
/// through this protocol; the kernel side (faults, references, the folio lock)
/// is the emulator's.
public protocol StormDriver: AnyObject, Sendable {
    /// The address space the driver mirrors.
    var mm: AddressSpace { get }
    /// Applies the storm's driver-side knobs before the storm starts: the lock
    /// `migrateToRAM` takes (`StormSettings.driverLock`) and the time it works
    /// while holding that lock and the page reference
    /// (`StormSettings.migrateToRAMWorkMicros`, and before `migrate_vma_setup()`:
    /// `migrateToRAMLookupMicros`). A driver without such knobs
    /// may ignore them.
    func prepare(for settings: StormSettings)
    /// Migrates `[address, address + pages * 4096)` to this driver's device
    /// memory. Returns how many pages of the range are in its device memory
    /// afterwards; throws when some page could not be migrated (for example
    /// `.noEntry`: another device holds it, or someone else was migrating it).
    func migrateToDevice(_ address: UInt64, pages: Int) throws(Errno) -> Int
    /// Calls of the driver's `migrateToRAM` callback so far (monotonic).
    var migrateToRAMCalls: Int { get }
    /// Threads blocked on, and holding, the lock `migrateToRAM` takes, right
    /// now; nil when the driver cannot tell. Sampled by the watchdog.
    var driverLockProbe: DriverLockProbe? { get }
    /// Whether the driver migrates 2 MiB folios whole (SELECT_COMPOUND).
    var supportsHugePages: Bool { get }
}

/// A snapshot of a driver lock's state.
public struct DriverLockProbe: Sendable, Codable, Equatable {
    /// Threads inside `migrateToRAM` waiting for the lock.
    public var waiting: Int
    /// Threads holding it (0 or 1 for an exclusive lock).
    public var holding: Int
    /// A snapshot of `waiting` and `holding` threads.
    public init(waiting: Int, holding: Int) {
        self.waiting = waiting
        self.holding = holding
    }
}

/// Builds the driver for device `index` (0, or 0 and 1) of a freshly booted
/// machine; throws ``StormError/setupFailed(_:)`` when it cannot (its
/// device memory refused, for example).
public typealias StormDriverFactory = @Sendable (_ kernel: Kernel, _ mm: AddressSpace, _ index: Int) throws(StormError) -> any StormDriver

extension MirrorDevice: StormDriver {
    /// Applies the storm's driver-side knobs to the mirror's settings.
    public func prepare(for settings: StormSettings) {
        var s = self.settings
        s.driverLock = settings.driverLock
        s.migrateToRAMWorkNanos = UInt64(max(0, settings.migrateToRAMWorkMicros)) * 1000
        s.migrateToRAMLookupNanos = UInt64(max(0, settings.migrateToRAMLookupMicros)) * 1000
        s.migrateToRAMWorkShape = settings.driverWork
        s.migrateToRAMWait = settings.driverWait
        s.migrationGranularity = settings.pageSize == .huge ? .huge2M : .base4K
        self.settings = s
    }

    /// The mirror's driver lock.
    public var driverLockProbe: DriverLockProbe? {
        DriverLockProbe(waiting: driverLockWaiters, holding: driverLockHolders)
    }

    /// MirrorDevice migrates whole 2 MiB folios with `MigrationGranularity.huge2M`.
    public var supportsHugePages: Bool { true }

    /// The default storm driver: a `MirrorDevice` with enough VRAM for `pages`.
    public static func stormFactory(vramBytes: UInt64) -> StormDriverFactory {
        { kernel, mm, index throws(StormError) -> any StormDriver in
            do throws(HostMemoryRefusal) {
                return try MirrorDevice(kernel: kernel, mm: mm, name: "mirror\(index)",
                                        vramBytes: vramBytes, chunkBytes: min(vramBytes, 32 << 20))
            } catch { throw StormError.hostRefused(error) }
        }
    }
}
