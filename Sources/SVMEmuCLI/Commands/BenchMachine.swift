import MirrorDriver
import SVMEmu

/// The machine a migration benchmark runs on: RAM for the buffer plus the
/// pages that come back while the old ones are still being freed (and slack),
/// VRAM for the whole buffer in 256 MiB chunks, the plain memcpy copy engine.
/// Torn down device first, then the address space, then the kernel.
final class BenchMachine {
    let kernel: Kernel
    private(set) var mm: AddressSpace!
    private(set) var device: MirrorDevice!

    /// - Throws: ``HostMemoryRefusal`` when the host refuses the machine's memory.
    init(bytes: Int, thp: TransparentHugepageMode, granularity: MigrationGranularity, deviceName: String) throws(HostMemoryRefusal) {
        let chunk: UInt64 = 256 << 20
        var config = KernelConfiguration()
        let node = ((bytes + (64 << 20)) + PageGeometry.pmdSize - 1) & ~(PageGeometry.pmdSize - 1)
        config.nodeSizes = [node, node]
        config.transparentHugepage = thp
        config.addressSpaceSize = max(UInt64(4) << 30, UInt64(bytes) * 2)
        config.maxPhysicalBytes = max(UInt64(64) << 30, UInt64(bytes) * 8)
        kernel = try Kernel(booting: config)
        mm = AddressSpace(kernel: kernel)
        var settings = MirrorSettings()
        settings.migrationGranularity = granularity
        let vram = (UInt64(bytes) + chunk - 1) / chunk * chunk + chunk
        device = MirrorDevice(kernel: kernel, mm: mm, name: deviceName, vramBytes: vram,
                              chunkBytes: chunk, settings: settings, copyEngine: MemcpyCopyEngine())
    }

    deinit {
        device = nil
        mm = nil
    }
}
