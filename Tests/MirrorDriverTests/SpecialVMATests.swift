import Testing
import SVMEmu
import MirrorDriver

@Suite("VM_SPECIAL mappings")
struct SpecialVMATests {
    @Test("migrate_vma_setup refuses a VM_PFNMAP|VM_IO VMA with EINVAL and changes nothing")
    func setupRefusesSpecialVMA() throws {
        let (kernel, mm, _) = try bootMachine()
        let base = try mm.mmap(length: 8 * PageGeometry.pageSize, special: true)
        let vma = try #require(mm.vma(containing: base))
        #expect(vma.flags.contains(.special))
        let stats = kernel.vmstat.snapshot()
        mm.mmapReadLock()
        var args = MigrateVMA(vma: vma, start: base, end: base + 8 * PageGeometry.pageSize64, flags: .system)
        #expect(throws: Errno.invalidArgument) { try kernel.migrateVMASetup(&args) }
        mm.mmapReadUnlock()
        #expect(args.cpages == 0 && args.npages == 0)
        #expect(kernel.vmstat.snapshot() == stats)
        #expect(mm.entry(at: base).entry.isNone)
        #expect(kernel.diagnostics.isEmpty)
    }

    @Test("a CPU touch of a VM_PFNMAP mapping without a fault handler is SIGBUS (EIO)")
    func cpuFaultIsSIGBUS() throws {
        let (_, mm, _) = try bootMachine()
        let base = try mm.mmap(length: PageGeometry.pageSize, special: true)
        #expect(throws: Errno.ioError) { _ = try mm.load(base) }
        #expect(mm.entry(at: base).entry.isNone)
    }
}
