import CLibDRM
import Testing
import SVMEmu
import MirrorDriver
import SVMDRM
import TestSupport

@Suite("nouveau SVM_BIND on the emulated device")
struct MirrorBindTests {
    /// Two 32 MiB nodes, a 1 GiB address space, 32 MiB of VRAM.
    static func machine(thp: TransparentHugepageMode) -> TestMachineOptions {
        TestMachineOptions(nodeSizes: [32 << 20, 32 << 20], thp: thp, addressSpaceSize: 1 << 30,
                           vram: 32 << 20, chunkBytes: 16 << 20, maxPhysicalBytes: 512 << 30)
    }

    @Test("a bind migrates two VMAs (skipping the hole between them) to VRAM; CPU touch brings the bytes back")
    func bindMigratesRealBytes() throws {
        try TestMachine.run(Self.machine(thp: .never)) { m in
            let kernel = m.kernel, space = m.mm!, dev = m.device!

            let a = try space.mmap(length: 16 * PageGeometry.pageSize)
            try space.munmap(a + 8 * PageGeometry.pageSize64, length: 2 * PageGeometry.pageSize)  // a hole in the middle
            try space.fillPattern(a, length: 8 * PageGeometry.pageSize, seed: 1)
            try space.fillPattern(a + 10 * PageGeometry.pageSize64, length: 6 * PageGeometry.pageSize, seed: 2)

            let fe = NouveauSVMFrontEnd(backend: dev)
            try fe.svmInit(drm_nouveau_svm_init(unmanagedAddress: 0, unmanagedSize: 1 << 20))
            var bind = drm_nouveau_svm_bind.migrateToVRAM(start: a, end: a + 16 * PageGeometry.pageSize64)
            let outcome = try fe.svmBind(&bind)
            #expect(outcome.pagesMigrated == 14)
            #expect(outcome.ignoredErrors.isEmpty)
            #expect(bind.result == 0)
            #expect(dev.devicePagesInUse == 14)
            #expect(space.entry(at: a).entry.kind == .devicePrivate)
            #expect(space.entry(at: a + 10 * PageGeometry.pageSize64).entry.kind == .devicePrivate)

            // The CPU faults the pages back through migrateToRAM; bytes intact.
            #expect(try space.verifyPattern(a, length: 8 * PageGeometry.pageSize, seed: 1) == nil)
            #expect(try space.verifyPattern(a + 10 * PageGeometry.pageSize64, length: 6 * PageGeometry.pageSize, seed: 2) == nil)
            #expect(dev.devicePagesInUse == 0)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("a bind with a bad header leaves every page in RAM")
    func badBindChangesNothing() throws {
        try TestMachine.run(Self.machine(thp: .madvise)) { m in
            let space = m.mm!, dev = m.device!
            let a = try space.mmap(length: 4 * PageGeometry.pageSize)
            try space.fillPattern(a, length: 4 * PageGeometry.pageSize, seed: 3)
            let fe = NouveauSVMFrontEnd(backend: dev)
            try fe.svmInit(drm_nouveau_svm_init(unmanagedAddress: 0, unmanagedSize: 1 << 20))
            var bind = drm_nouveau_svm_bind.migrateToVRAM(start: a, end: a + 4 * PageGeometry.pageSize64)
            bind.stride = 1
            #expect(throws: Errno.invalidArgument) { try fe.svmBind(&bind) }
            #expect(dev.devicePagesInUse == 0)
            #expect(space.entry(at: a).entry.kind == .present)
            #expect(try space.verifyPattern(a, length: 4 * PageGeometry.pageSize, seed: 3) == nil)
        }
    }
}
