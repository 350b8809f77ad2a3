import CLibDRM
import SVMEmu
import Testing
@testable import SVMDRM

private let page = PageGeometry.pageSize64

/// Runs SVM_BIND and returns the errno it threw, or nil.
private func bindErrno(_ fe: NouveauSVMFrontEnd, _ args: inout drm_nouveau_svm_bind) -> Errno? {
    do throws(Errno) { try fe.svmBind(&args); return nil } catch { return error }
}

private func initErrno(_ fe: NouveauSVMFrontEnd, address: UInt64 = 0, size: UInt64 = 1 << 20) -> Errno? {
    do throws(Errno) {
        try fe.svmInit(drm_nouveau_svm_init(unmanagedAddress: address, unmanagedSize: size)); return nil
    } catch { return error }
}

/// A front end over a fake device with SVM initialised and two VMAs with a hole between.
private func readyFrontEnd() -> (NouveauSVMFrontEnd, FakeNouveauDevice) {
    let device = FakeNouveauDevice()
    device.map(0x10000..<0x14000)
    device.map(0x20000..<0x22000)
    let fe = NouveauSVMFrontEnd(backend: device)
    #expect(initErrno(fe, address: 0x4000_0000, size: 0x1000_0000) == nil)
    return (fe, device)
}

@Suite("nouveau_svmm_init() rules")
struct NouveauSVMInitTests {
    @Test("no SVM on the device: ENOSYS, backend not called")
    func noSVM() throws {
        let device = FakeNouveauDevice(supportsSVM: false)
        let fe = NouveauSVMFrontEnd(backend: device)
        #expect(initErrno(fe) == .notImplemented)
        #expect(device.state.withLock { $0.initCalls.isEmpty })
        #expect(!fe.isSVMEnabled)
    }

    @Test("second SVM_INIT on the same client: EBUSY")
    func twice() throws {
        let device = FakeNouveauDevice()
        let fe = NouveauSVMFrontEnd(backend: device)
        #expect(initErrno(fe, address: 0x1000, size: 0x2000) == nil)
        #expect(fe.isSVMEnabled)
        #expect(fe.unmanagedRange == 0x1000..<0x3000)
        #expect(initErrno(fe) == .busy)
        #expect(device.state.withLock { $0.initCalls.count } == 1)
        // Another client (another open file) on the same device may init.
        #expect(initErrno(NouveauSVMFrontEnd(backend: device)) == nil)
    }

    @Test("the VMM constructor's error is returned and SVM stays off; a retry works")
    func backendError() throws {
        let device = FakeNouveauDevice()
        device.state.withLock { $0.initError = .noMemory }
        let fe = NouveauSVMFrontEnd(backend: device)
        #expect(initErrno(fe) == .noMemory)
        #expect(!fe.isSVMEnabled)
        device.state.withLock { $0.initError = nil }
        #expect(initErrno(fe, address: 7, size: 9) == nil)
        #expect(device.state.withLock { $0.initCalls.last! } == (7, 9))
    }
}

@Suite("nouveau_svmm_bind() rules")
struct NouveauSVMBindRuleTests {
    @Test("reserved0 or reserved1 non-zero: EINVAL")
    func reserved() throws {
        let (fe, _) = readyFrontEnd()
        var a = drm_nouveau_svm_bind.migrateToVRAM(start: 0x10000, end: 0x11000)
        a.reserved0 = 1
        #expect(bindErrno(fe, &a) == .invalidArgument)
        a.reserved0 = 0; a.reserved1 = 1 << 63
        #expect(bindErrno(fe, &a) == .invalidArgument)
    }

    @Test("header bits above NOUVEAU_SVM_BIND_VALID_MASK: EINVAL")
    func invalidHeaderBits() throws {
        let (fe, _) = readyFrontEnd()
        for bit in [48, 55, 63] {
            var a = drm_nouveau_svm_bind.migrateToVRAM(start: 0x10000, end: 0x11000)
            a.header |= 1 << UInt64(bit)
            #expect(bindErrno(fe, &a) == .invalidArgument)
        }
    }

    @Test("va_start >= va_end after page rounding: EINVAL")
    func emptyRange() throws {
        let (fe, _) = readyFrontEnd()
        var equal = drm_nouveau_svm_bind.migrateToVRAM(start: 0x11000, end: 0x11000)
        #expect(bindErrno(fe, &equal) == .invalidArgument)
        var reversed = drm_nouveau_svm_bind.migrateToVRAM(start: 0x12000, end: 0x11000)
        #expect(bindErrno(fe, &reversed) == .invalidArgument)
        // va_end rounds up past 2^64 to 0.
        var wrapped = drm_nouveau_svm_bind.migrateToVRAM(start: 0x10000, end: UInt64.max)
        #expect(bindErrno(fe, &wrapped) == .invalidArgument)
        #expect(wrapped.va_end == 0)
    }

    @Test("a sub-page range rounds out to one page and is accepted")
    func subPage() throws {
        let (fe, device) = readyFrontEnd()
        var a = drm_nouveau_svm_bind.migrateToVRAM(start: 0x10800, end: 0x10900)
        let outcome = try fe.svmBind(&a)
        #expect(a.va_start == 0x10000)
        #expect(a.va_end == 0x11000)
        #expect(outcome.pagesMigrated == 1)
        #expect(device.state.withLock { $0.vram.keys.sorted() } == [0x10000])
    }

    @Test("command other than MIGRATE: EINVAL")
    func badCommand() throws {
        let (fe, _) = readyFrontEnd()
        for command: UInt64 in [1, 2, 0xff] {
            var a = drm_nouveau_svm_bind.migrateToVRAM(start: 0x10000, end: 0x11000)
            a.header = NouveauSVMBindHeader(command: command, target: NouveauSVMuAPI.targetGPUVRAM).rawValue
            #expect(bindErrno(fe, &a) == .invalidArgument)
        }
    }

    @Test("target other than GPU_VRAM (including any CPU target): EINVAL")
    func badTarget() throws {
        let (fe, _) = readyFrontEnd()
        for target: UInt64 in [0, 1, (1 << 31) - 1, (1 << 31) | 1, 0xffff_ffff] {
            var a = drm_nouveau_svm_bind.migrateToVRAM(start: 0x10000, end: 0x11000)
            a.header = NouveauSVMBindHeader(command: 0, target: target).rawValue
            #expect(bindErrno(fe, &a) == .invalidArgument)
        }
    }

    @Test("non-zero stride: EINVAL")
    func stride() throws {
        let (fe, _) = readyFrontEnd()
        var a = drm_nouveau_svm_bind.migrateToVRAM(start: 0x10000, end: 0x11000)
        a.stride = 1
        #expect(bindErrno(fe, &a) == .invalidArgument)
    }

    @Test("no address space for the caller: EINVAL")
    func noMM() throws {
        let device = FakeNouveauDevice(hasAddressSpace: false)
        device.map(0x10000..<0x11000)
        let fe = NouveauSVMFrontEnd(backend: device)
        #expect(initErrno(fe) == nil)
        var a = drm_nouveau_svm_bind.migrateToVRAM(start: 0x10000, end: 0x11000)
        #expect(bindErrno(fe, &a) == .invalidArgument)
        #expect(device.state.withLock { $0.system.count } == 1)
    }

    @Test("SVM_BIND before SVM_INIT: EINVAL, decided under the mmap lock, nothing migrated")
    func notInitialised() throws {
        let device = FakeNouveauDevice()
        device.map(0x10000..<0x11000)
        let fe = NouveauSVMFrontEnd(backend: device)
        var a = drm_nouveau_svm_bind.migrateToVRAM(start: 0x10000, end: 0x11000)
        #expect(bindErrno(fe, &a) == .invalidArgument)
        let s = device.state.withLock { $0 }
        #expect(s.lockAcquisitions == 1)
        #expect(s.migrateCalls.isEmpty)
        #expect(s.vram.isEmpty)
    }

    @Test("argument refusals never reach the backend or take the lock")
    func refusalsAreEarly() throws {
        let (fe, device) = readyFrontEnd()
        var a = drm_nouveau_svm_bind.migrateToVRAM(start: 0x10000, end: 0x11000)
        a.stride = 4096
        a.reserved1 = 1
        #expect(bindErrno(fe, &a) == .invalidArgument)
        let s = device.state.withLock { $0 }
        #expect(s.lockAcquisitions == 0)
        #expect(s.migrateCalls.isEmpty)
    }

    @Test("va_start/va_end are rounded and written back even when the bind fails")
    func roundingWrittenBack() throws {
        let (fe, _) = readyFrontEnd()
        var a = drm_nouveau_svm_bind.migrateToVRAM(start: 0x10123, end: 0x12001)
        a.stride = 8
        #expect(bindErrno(fe, &a) == .invalidArgument)
        #expect(a.va_start == 0x10000)
        #expect(a.va_end == 0x13000)
    }

    @Test("priority and npages are not checked (the current kernel ignores them)")
    func ignoredFields() throws {
        let (fe, _) = readyFrontEnd()
        var a = drm_nouveau_svm_bind.migrateToVRAM(start: 0x10000, end: 0x11000, priority: 0xff)
        a.npages = 0
        a.result = 12345
        #expect(try fe.svmBind(&a).pagesMigrated == 1)
        #expect(a.result == 0)
    }
}

@Suite("nouveau SVM bind: migration on the fake device")
struct NouveauSVMMigrationTests {
    @Test("bind migrates a range to VRAM and CPU faults bring it back, bytes intact")
    func roundTrip() throws {
        let (fe, device) = readyFrontEnd()
        let before = device.state.withLock { $0.system }
        #expect(before.count == 6)

        // 0x0f000..0x23000 covers both VMAs, the hole between, and unmapped edges.
        var a = drm_nouveau_svm_bind.migrateToVRAM(start: 0x0f000, end: 0x23000)
        let outcome = try fe.svmBind(&a)
        #expect(a.result == 0)
        #expect(outcome.pagesMigrated == 6)
        #expect(outcome.ranges == [0x10000..<0x14000, 0x20000..<0x22000])
        #expect(outcome.ignoredErrors.isEmpty)

        var s = device.state.withLock { $0 }
        #expect(s.system.isEmpty)
        #expect(s.vram == before)
        #expect(s.backendCallsOutsideLock == 0)
        #expect(s.migrateCalls.allSatisfy { $0.1 })

        // The device writes one page while it is in VRAM.
        device.state.withLock { $0.vram[0x21000]![0] = 0xEE }

        let back = try fe.migrateToSystem(start: 0x10000, end: 0x22000)
        #expect(back == 6)
        s = device.state.withLock { $0 }
        #expect(s.vram.isEmpty)
        for (address, bytes) in before where address != 0x21000 {
            #expect(s.system[address] == bytes, "page \(String(address, radix: 16))")
        }
        var written = before[0x21000]!
        written[0] = 0xEE
        #expect(s.system[0x21000] == written)
        #expect(s.backendCallsOutsideLock == 0)
        #expect(s.migrateCalls.filter { !$0.1 }.allSatisfy { $0.0.count == Int(page) })
    }

    @Test("partial overlap migrates only the part inside the range")
    func partial() throws {
        let (fe, device) = readyFrontEnd()
        var a = drm_nouveau_svm_bind.migrateToVRAM(start: 0x12000, end: 0x21000)
        let outcome = try fe.svmBind(&a)
        #expect(outcome.ranges == [0x12000..<0x14000, 0x20000..<0x21000])
        #expect(outcome.pagesMigrated == 3)
        #expect(device.state.withLock { $0.vram.keys.sorted() } == [0x12000, 0x13000, 0x20000])
    }

    @Test("a range with no VMA succeeds and migrates nothing (the kernel stops, it does not fail)")
    func noVMA() throws {
        let (fe, device) = readyFrontEnd()
        var a = drm_nouveau_svm_bind.migrateToVRAM(start: 0x30000, end: 0x40000)
        let outcome = try fe.svmBind(&a)
        #expect(outcome.pagesMigrated == 0)
        #expect(outcome.ranges.isEmpty)
        #expect(device.state.withLock { $0.migrateCalls.isEmpty })
    }

    @Test("migration errors are ignored: best effort, the next VMA still migrates")
    func bestEffort() throws {
        let (fe, device) = readyFrontEnd()
        device.state.withLock { s in
            for p: UInt64 in [0x10000, 0x11000, 0x12000, 0x13000] { s.failing[p] = .busy }
        }
        var a = drm_nouveau_svm_bind.migrateToVRAM(start: 0x10000, end: 0x22000)
        let outcome = try fe.svmBind(&a)
        #expect(outcome.ignoredErrors == [.busy])
        #expect(outcome.pagesMigrated == 2)
        #expect(device.state.withLock { $0.vram.keys.sorted() } == [0x20000, 0x21000])
    }

    @Test("migrateToSystem outside any VMA moves nothing; an empty range is EINVAL")
    func toSystemEdges() throws {
        let (fe, _) = readyFrontEnd()
        #expect(try fe.migrateToSystem(start: 0x30000, end: 0x31000) == 0)
        #expect(throws: Errno.invalidArgument) { try fe.migrateToSystem(start: 0x5000, end: 0x5000) }
    }
}

@Suite("raw ioctl dispatch, as drm_ioctl() does it")
struct NouveauSVMIoctlTests {
    @Test("SVM_INIT and SVM_BIND through request numbers and raw memory")
    func rawIoctls() throws {
        let device = FakeNouveauDevice()
        device.map(0x10000..<0x12000)
        let fe = NouveauSVMFrontEnd(backend: device)

        var bind = drm_nouveau_svm_bind.migrateToVRAM(start: 0x10010, end: 0x12000)
        // Before SVM_INIT: -EINVAL, and the struct is still copied back (rounded).
        #expect(fe.ioctl(NouveauSVMuAPI.ioctlSVMBind, &bind) == -Errno.invalidArgument.rawValue)
        #expect(bind.va_start == 0x10000)

        var initArgs = drm_nouveau_svm_init(unmanagedAddress: 0x1000, unmanagedSize: 0x1000)
        #expect(fe.ioctl(NouveauSVMuAPI.ioctlSVMInit, &initArgs) == 0)
        #expect(fe.ioctl(NouveauSVMuAPI.ioctlSVMInit, &initArgs) == -Errno.busy.rawValue)

        bind.result = 99
        #expect(fe.ioctl(NouveauSVMuAPI.ioctlSVMBind, &bind) == 0)
        #expect(bind.result == 0)
        #expect(device.state.withLock { $0.vram.count } == 2)

        var bad = drm_nouveau_svm_bind.migrateToVRAM(start: 0x10000, end: 0x11000)
        bad.stride = 1
        #expect(fe.ioctl(NouveauSVMuAPI.ioctlSVMBind, &bad) == -Errno.invalidArgument.rawValue)
    }

    @Test("unknown request: -EINVAL; NULL argument: -EFAULT")
    func unknownAndNull() throws {
        let fe = NouveauSVMFrontEnd(backend: FakeNouveauDevice())
        var scratch = drm_nouveau_svm_bind()
        let gemNew = LinuxIoctl.readWrite(type: UInt8(ascii: "d"), number: 0x40 + 0x40, size: 48)
        #expect(fe.ioctl(gemNew, &scratch) == -Errno.invalidArgument.rawValue)
        #expect(fe.ioctl(NouveauSVMuAPI.ioctlVersion, &scratch) == -Errno.invalidArgument.rawValue)
        #expect(fe.ioctl(NouveauSVMuAPI.ioctlSVMInit, nil) == -Errno.badAddress.rawValue)
    }

    @Test("a shorter user struct is zero-extended, as drm_ioctl() does")
    func shortStruct() throws {
        let device = FakeNouveauDevice()
        device.map(0x10000..<0x11000)
        let fe = NouveauSVMFrontEnd(backend: device)
        var initArgs = drm_nouveau_svm_init(unmanagedAddress: 0x1000, unmanagedSize: 0x1000)
        #expect(fe.ioctl(NouveauSVMuAPI.ioctlSVMInit, &initArgs) == 0)
        // An old 48-byte bind (no reserved fields): the kernel sees reserved0/1 as zero.
        var full = drm_nouveau_svm_bind.migrateToVRAM(start: 0x10000, end: 0x11000)
        full.reserved0 = 0xdead   // beyond the 48 bytes the request names: never read
        let short = LinuxIoctl.readWrite(type: UInt8(ascii: "d"), number: 0x49, size: 48)
        #expect(fe.ioctl(short, &full) == 0)
        #expect(full.reserved0 == 0xdead)   // and never written back
        #expect(device.state.withLock { $0.vram.count } == 1)
    }
}
