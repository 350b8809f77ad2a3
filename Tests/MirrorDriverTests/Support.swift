import SVMEmu
import MirrorDriver

/// A small machine for one test: two 64 MiB nodes, one address space, one device.
func bootMachine(policy: DeviceFaultPolicy = .trylock, thp: TransparentHugepageMode = .never,
                 vram: UInt64 = 64 << 20) -> (Kernel, AddressSpace, MirrorDevice) {
    var config = KernelConfiguration()
    config.nodeSizes = [64 << 20, 64 << 20]
    config.deviceFaultPolicy = policy
    config.transparentHugepage = thp
    config.addressSpaceSize = 4 << 30
    let kernel = Kernel(config)
    let mm = AddressSpace(kernel: kernel)
    let device = MirrorDevice(kernel: kernel, mm: mm, vramBytes: vram, chunkBytes: 32 << 20)
    return (kernel, mm, device)
}
