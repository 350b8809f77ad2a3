import MirrorDriver
import SVMEmu
import SVMStress
import Testing

@Suite("machine: boot, teardown, audit")
struct MachineTests {
    /// A small machine: one 64 MiB node.
    static func config() -> KernelConfiguration {
        var c = KernelConfiguration()
        c.nodeSizes = [64 << 20]
        c.transparentHugepage = .never
        return c
    }

    @Test("a clean run audits clean; teardown releases the device and the address space once")
    func cleanRun() throws {
        let machine = try Machine(booting: Self.config(), cpus: 4)
        #expect(machine.kernel.cpus.count == 4, "cpus overrides the configuration's")
        let device = machine.attach(try MirrorDevice(kernel: machine.kernel, mm: machine.mm, vramBytes: 32 << 20, chunkBytes: 32 << 20))
        let base = try machine.mm.mmap(length: 1 << 20)
        try machine.mm.fillPattern(base, length: 1 << 20, seed: 3)
        #expect(try device.migrateToDevice(base, pages: 256) == 256)
        #expect(try machine.mm.verifyPattern(base, length: 1 << 20, seed: 3) == nil)
        let audit = try #require(machine.finish())
        #expect(audit.isClean, "\(audit)")
        #expect(machine.audit == audit, "the machine keeps the last audit")
        machine.tearDown()  // idempotent
        #expect(throws: Never.self) { try machine.finishAudited("again") }
    }

    @Test("a reference the run leaks fails finishAudited, naming the run")
    func leakedReference() throws {
        let machine = try Machine(booting: Self.config())
        let base = try machine.mm.mmap(length: 4096)
        try machine.mm.store(base, 1)
        let pages = try machine.mm.getUserPages(base, count: 1)  // never put
        #expect(pages.count == 1)
        let failure = #expect(throws: HarnessFailure.self) { try machine.finishAudited("the leak test") }
        #expect(failure?.description.hasPrefix("the leak test: the kernel audit after the run found") == true)
        #expect(machine.audit?.isClean == false)
    }

    @Test("node sizes round up to whole 2 MiB and keep their minimum")
    func sizing() throws {
        #expect(Machine.nodeBytes(1, slack: 0) == PageGeometry.pmdSize)
        #expect(Machine.nodeBytes(3 << 20, slack: 1 << 20) == 4 << 20)
        #expect(Machine.nodeBytes(1 << 20, slack: 0, minimum: 64 << 20) == 64 << 20)
        #expect(Machine.roundUp(UInt64(33 << 20), to: 32 << 20) == 64 << 20)
    }

    @Test("the overhead matrix nests direction, copy model, granularity; whole-range faults only at 4 KiB to-device")
    func overheadMatrix() throws {
        var base = OverheadConfiguration()
        base.bytes = 8 << 20
        let all = base.matrix(directions: OverheadDirection.allCases, copyModels: [.memcpy, .pcie4],
                              granularities: MigrationGranularity.allCases, wholeRangeFaults: true)
        #expect(all.count == 2 * 2 * MigrationGranularity.allCases.count)
        #expect(all.allSatisfy { $0.bytes == 8 << 20 })
        #expect(all[0].direction == .toDevice && all[0].copyModel == .memcpy && all[0].granularity == .base4K)
        #expect(all.last?.direction == .toRAM && all.last?.copyModel == .pcie4)
        for c in all {
            let whole = c.granularity == .base4K && c.direction == .toDevice
            #expect(c.faultPages == (whole ? PageGeometry.pmdPages : 1))
        }
    }
}
