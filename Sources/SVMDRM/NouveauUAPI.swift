// The nouveau SVM uAPI (include/uapi/drm/nouveau_drm.h; libdrm's nouveau_drm.h):
// the two ioctl argument structs, the bind header encoding and the request numbers.
public import CLibDRM
import SVMEmu

// The C structs are used as they are: `drm_nouveau_svm_init` and
// `drm_nouveau_svm_bind` come from libdrm's nouveau_drm.h through CLibDRM, so
// their layout is the compiler's, i.e. the kernel ABI (16 and 64 bytes).

/// The Linux `_IOC` request encoding (`include/uapi/asm-generic/ioctl.h`, used
/// by x86, arm64 and riscv): `dir << 30 | size << 16 | type << 8 | nr`.
public enum LinuxIoctl {
    /// `_IOC_NONE`, `_IOC_WRITE`, `_IOC_READ` (direction as seen from user space).
    public static let none: UInt = 0, write: UInt = 1, read: UInt = 2

    /// `_IOC(dir, type, nr, size)`.
    public static func encode(direction: UInt, type: UInt8, number: UInt8, size: Int) -> UInt {
        if !(0..<(1 << 14)).contains(size) { contractViolation("_IOC: the size field is 14 bits (got \(size))") }
        return (direction << 30) | (UInt(size) << 16) | (UInt(type) << 8) | UInt(number)
    }
    /// `_IOWR(type, nr, T)`.
    public static func readWrite(type: UInt8, number: UInt8, size: Int) -> UInt {
        encode(direction: read | write, type: type, number: number, size: size)
    }
    /// `_IOC_DIR(request)`.
    public static func direction(_ request: UInt) -> UInt { (request >> 30) & 0x3 }
    /// `_IOC_TYPE(request)`.
    public static func type(_ request: UInt) -> UInt8 { UInt8(truncatingIfNeeded: request >> 8) }
    /// `_IOC_NR(request)`.
    public static func number(_ request: UInt) -> UInt8 { UInt8(truncatingIfNeeded: request) }
    /// `_IOC_SIZE(request)`.
    public static func size(_ request: UInt) -> Int { Int((request >> 16) & 0x3fff) }
}

/// The nouveau SVM uAPI constants, as libdrm's headers define them (read
/// through the CLibDRM shim, so they are the C values, not retyped numbers).
public enum NouveauSVMuAPI {
    /// `DRM_IOCTL_BASE`, `'d'`.
    public static let drmIoctlBase = UInt8(ascii: "d")
    /// `DRM_COMMAND_BASE`: driver-private ioctls start here.
    public static let drmCommandBase = UInt8(DRM_COMMAND_BASE)
    /// `DRM_NOUVEAU_SVM_INIT` (0x08), relative to `DRM_COMMAND_BASE`.
    public static let svmInitNumber = UInt8(DRM_NOUVEAU_SVM_INIT)
    /// `DRM_NOUVEAU_SVM_BIND` (0x09), relative to `DRM_COMMAND_BASE`.
    public static let svmBindNumber = UInt8(DRM_NOUVEAU_SVM_BIND)

    /// `DRM_IOCTL_NOUVEAU_SVM_INIT` = `DRM_IOWR(DRM_COMMAND_BASE + DRM_NOUVEAU_SVM_INIT, struct drm_nouveau_svm_init)`.
    public static let ioctlSVMInit = UInt(svmdrm_ioctl_nouveau_svm_init())
    /// `DRM_IOCTL_NOUVEAU_SVM_BIND` = `DRM_IOWR(DRM_COMMAND_BASE + DRM_NOUVEAU_SVM_BIND, struct drm_nouveau_svm_bind)`.
    public static let ioctlSVMBind = UInt(svmdrm_ioctl_nouveau_svm_bind())
    /// `DRM_IOCTL_VERSION` = `DRM_IOWR(0x00, struct drm_version)`, issued by `drmGetVersion()`.
    public static let ioctlVersion = UInt(svmdrm_ioctl_version())

    /// `sizeof(struct drm_nouveau_svm_init)` as C lays it out (16).
    public static let svmInitSize = Int(svmdrm_sizeof_svm_init())
    /// `sizeof(struct drm_nouveau_svm_bind)` as C lays it out (64).
    public static let svmBindSize = Int(svmdrm_sizeof_svm_bind())
    /// `sizeof(struct drm_version)` as C lays it out (64 on LP64).
    public static let drmVersionSize = Int(svmdrm_sizeof_drm_version())

    /// `NOUVEAU_SVM_BIND_COMMAND_SHIFT` (0).
    public static let commandShift = svmdrm_bind_command_shift()
    /// `NOUVEAU_SVM_BIND_COMMAND_BITS` (8).
    public static let commandBits = svmdrm_bind_command_bits()
    /// `NOUVEAU_SVM_BIND_COMMAND_MASK` (0xff).
    public static let commandMask = svmdrm_bind_command_mask()
    /// `NOUVEAU_SVM_BIND_PRIORITY_SHIFT` (8).
    public static let priorityShift = svmdrm_bind_priority_shift()
    /// `NOUVEAU_SVM_BIND_PRIORITY_BITS` (8).
    public static let priorityBits = svmdrm_bind_priority_bits()
    /// `NOUVEAU_SVM_BIND_PRIORITY_MASK` (0xff).
    public static let priorityMask = svmdrm_bind_priority_mask()
    /// `NOUVEAU_SVM_BIND_TARGET_SHIFT` (16).
    public static let targetShift = svmdrm_bind_target_shift()
    /// `NOUVEAU_SVM_BIND_TARGET_BITS` (32).
    public static let targetBits = svmdrm_bind_target_bits()
    /// `NOUVEAU_SVM_BIND_TARGET_MASK` (0xffffffff).
    public static let targetMask = svmdrm_bind_target_mask()
    /// `NOUVEAU_SVM_BIND_VALID_BITS` (48).
    public static let validBits = svmdrm_bind_valid_bits()
    /// `NOUVEAU_SVM_BIND_VALID_MASK` (`(1 << 48) - 1`): header bits a bind may set.
    public static let validMask = svmdrm_bind_valid_mask()
    /// `NOUVEAU_SVM_BIND_COMMAND__MIGRATE` (0): synchronous migration to the target.
    public static let commandMigrate = svmdrm_bind_command_migrate()
    /// `NOUVEAU_SVM_BIND_TARGET__GPU_VRAM` (`1 << 31`): the GPU's VRAM.
    public static let targetGPUVRAM = svmdrm_bind_target_gpu_vram()
}

/// The `header` word of `struct drm_nouveau_svm_bind`: command in bits 0-7,
/// priority in bits 8-15, target in bits 16-47; bits 48-63 must be zero.
public struct NouveauSVMBindHeader: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// Encodes the fields with the `NOUVEAU_SVM_BIND_*_SHIFT` / `_MASK` layout.
    public init(command: UInt64, priority: UInt64 = 0, target: UInt64) {
        typealias U = NouveauSVMuAPI
        rawValue = ((command & U.commandMask) << U.commandShift)
            | ((priority & U.priorityMask) << U.priorityShift)
            | ((target & U.targetMask) << U.targetShift)
    }

    /// `NOUVEAU_SVM_BIND_COMMAND__MIGRATE` to `NOUVEAU_SVM_BIND_TARGET__GPU_VRAM`.
    public static func migrateToVRAM(priority: UInt64 = 0) -> NouveauSVMBindHeader {
        NouveauSVMBindHeader(command: NouveauSVMuAPI.commandMigrate, priority: priority,
                             target: NouveauSVMuAPI.targetGPUVRAM)
    }

    public var command: UInt64 { (rawValue >> NouveauSVMuAPI.commandShift) & NouveauSVMuAPI.commandMask }
    public var priority: UInt64 { (rawValue >> NouveauSVMuAPI.priorityShift) & NouveauSVMuAPI.priorityMask }
    public var target: UInt64 { (rawValue >> NouveauSVMuAPI.targetShift) & NouveauSVMuAPI.targetMask }
    /// Bits outside `NOUVEAU_SVM_BIND_VALID_MASK`.
    public var invalidBits: UInt64 { rawValue & ~NouveauSVMuAPI.validMask }

    public var description: String {
        "header(command \(command), priority \(priority), target 0x\(String(target, radix: 16))"
            + (invalidBits != 0 ? ", invalid bits 0x\(String(invalidBits, radix: 16)))" : ")")
    }
}

extension drm_nouveau_svm_init {
    /// An SVM_INIT argument: the GPU virtual range `[address, address + size)`
    /// that stays managed by the client (not mirrored from the CPU).
    public init(unmanagedAddress: UInt64, unmanagedSize: UInt64) {
        self.init(unmanaged_addr: unmanagedAddress, unmanaged_size: unmanagedSize)
    }
}

extension drm_nouveau_svm_bind {
    /// A well-formed SVM_BIND argument that migrates `[start, end)` to VRAM,
    /// as user space (e.g. a Mesa/nouveau test) would fill it.
    public static func migrateToVRAM(start: UInt64, end: UInt64, priority: UInt64 = 0) -> drm_nouveau_svm_bind {
        var args = drm_nouveau_svm_bind()
        args.header = NouveauSVMBindHeader.migrateToVRAM(priority: priority).rawValue
        args.va_start = start
        args.va_end = end
        args.npages = end > start ? (end - start) / PageGeometry.pageSize64 : 0
        return args
    }

    /// The decoded `header`.
    public var decodedHeader: NouveauSVMBindHeader { NouveauSVMBindHeader(rawValue: header) }
}
