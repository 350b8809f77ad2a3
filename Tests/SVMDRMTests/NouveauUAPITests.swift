import CLibDRM
import Testing
@testable import SVMDRM

/// `_IOC(dir, type, nr, size)` written out here from include/uapi/asm-generic/ioctl.h,
/// independent of both the C macros and SVMDRM's `LinuxIoctl`.
private func ioc(dir: UInt, type: Character, nr: UInt, size: UInt) -> UInt {
    let nrBits: UInt = 8, typeBits: UInt = 8, sizeBits: UInt = 14
    let nrShift: UInt = 0
    let typeShift = nrShift + nrBits
    let sizeShift = typeShift + typeBits
    let dirShift = sizeShift + sizeBits
    return (dir << dirShift) | (UInt(type.asciiValue!) << typeShift) | (nr << nrShift) | (size << sizeShift)
}
private let iocReadWrite: UInt = 1 | 2 // _IOC_WRITE | _IOC_READ

@Suite("nouveau SVM uAPI: ioctl numbers, struct layout, header encoding")
struct NouveauUAPITests {
    @Test("DRM_IOCTL_NOUVEAU_SVM_INIT = DRM_IOWR(0x40 + 0x08, 16 bytes)")
    func svmInitNumber() throws {
        let expected = ioc(dir: iocReadWrite, type: "d", nr: 0x40 + 0x08, size: 16)
        #expect(expected == 0xC010_6448)
        #expect(NouveauSVMuAPI.ioctlSVMInit == expected)
        #expect(LinuxIoctl.readWrite(type: UInt8(ascii: "d"), number: 0x48, size: 16) == expected)
    }

    @Test("DRM_IOCTL_NOUVEAU_SVM_BIND = DRM_IOWR(0x40 + 0x09, 64 bytes)")
    func svmBindNumber() throws {
        let expected = ioc(dir: iocReadWrite, type: "d", nr: 0x40 + 0x09, size: 64)
        #expect(expected == 0xC040_6449)
        #expect(NouveauSVMuAPI.ioctlSVMBind == expected)
    }

    @Test("DRM_IOCTL_VERSION = DRM_IOWR(0x00, struct drm_version)")
    func versionNumber() throws {
        // struct drm_version on LP64: 3 ints, padding, then 3 (size_t, char *) pairs.
        let size = UInt(MemoryLayout<Int32>.size * 4 + 3 * (MemoryLayout<Int>.size + MemoryLayout<UnsafeRawPointer>.size))
        #expect(size == 64)
        #expect(NouveauSVMuAPI.drmVersionSize == 64)
        #expect(NouveauSVMuAPI.ioctlVersion == ioc(dir: iocReadWrite, type: "d", nr: 0, size: size))
    }

    @Test("the C _IOC_* decoders and LinuxIoctl agree on the fields")
    func decoders() throws {
        for request in [NouveauSVMuAPI.ioctlSVMInit, NouveauSVMuAPI.ioctlSVMBind, NouveauSVMuAPI.ioctlVersion] {
            #expect(UInt(svmdrm_ioc_dir(request)) == LinuxIoctl.direction(request))
            #expect(UInt8(svmdrm_ioc_type(request)) == LinuxIoctl.type(request))
            #expect(UInt8(svmdrm_ioc_nr(request)) == LinuxIoctl.number(request))
            #expect(Int(svmdrm_ioc_size(request)) == LinuxIoctl.size(request))
            #expect(LinuxIoctl.type(request) == UInt8(ascii: "d"))
            #expect(LinuxIoctl.direction(request) == LinuxIoctl.read | LinuxIoctl.write)
        }
        #expect(NouveauSVMuAPI.drmCommandBase == 0x40)
        #expect(NouveauSVMuAPI.svmInitNumber == 0x08)
        #expect(NouveauSVMuAPI.svmBindNumber == 0x09)
    }

    @Test("struct sizes and field offsets are the kernel's (16 and 64 bytes)")
    func layout() throws {
        #expect(MemoryLayout<drm_nouveau_svm_init>.size == 16)
        #expect(MemoryLayout<drm_nouveau_svm_bind>.size == 64)
        #expect(NouveauSVMuAPI.svmInitSize == 16)
        #expect(NouveauSVMuAPI.svmBindSize == 64)
        #expect(MemoryLayout<drm_nouveau_svm_init>.offset(of: \.unmanaged_size) == 8)
        let offsets: [(PartialKeyPath<drm_nouveau_svm_bind>, Int)] = [
            (\.header, 0), (\.va_start, 8), (\.va_end, 16), (\.npages, 24),
            (\.stride, 32), (\.result, 40), (\.reserved0, 48), (\.reserved1, 56),
        ]
        for (path, offset) in offsets {
            #expect(MemoryLayout<drm_nouveau_svm_bind>.offset(of: path) == offset)
        }
    }

    @Test("header constants match nouveau_drm.h")
    func headerConstants() throws {
        #expect(NouveauSVMuAPI.commandShift == 0)
        #expect(NouveauSVMuAPI.commandBits == 8)
        #expect(NouveauSVMuAPI.commandMask == 0xff)
        #expect(NouveauSVMuAPI.priorityShift == 8)
        #expect(NouveauSVMuAPI.priorityBits == 8)
        #expect(NouveauSVMuAPI.priorityMask == 0xff)
        #expect(NouveauSVMuAPI.targetShift == 16)
        #expect(NouveauSVMuAPI.targetBits == 32)
        #expect(NouveauSVMuAPI.targetMask == 0xffff_ffff)
        #expect(NouveauSVMuAPI.validBits == 48)
        #expect(NouveauSVMuAPI.validMask == (1 << 48) - 1)
        #expect(NouveauSVMuAPI.commandMigrate == 0)
        #expect(NouveauSVMuAPI.targetGPUVRAM == 1 << 31)
    }

    @Test("header encode and decode")
    func headerCoding() throws {
        let h = NouveauSVMBindHeader.migrateToVRAM(priority: 0x5a)
        #expect(h.rawValue == (UInt64(1) << 31) << 16 | 0x5a << 8)
        #expect(h.command == 0)
        #expect(h.priority == 0x5a)
        #expect(h.target == 1 << 31)
        #expect(h.invalidBits == 0)
        let bad = NouveauSVMBindHeader(rawValue: h.rawValue | 1 << 48 | 3)
        #expect(bad.invalidBits == 1 << 48)
        #expect(bad.command == 3)
        let args = drm_nouveau_svm_bind.migrateToVRAM(start: 0x10000, end: 0x14000)
        #expect(args.decodedHeader == .migrateToVRAM())
        #expect(args.npages == 4)
        #expect(args.stride == 0 && args.result == 0 && args.reserved0 == 0 && args.reserved1 == 0)
    }
}
