import Testing
import TestSupport
@testable import SVMEmu

@Suite("Kernel.audit")
struct AuditTests {

    /// A machine with one THP and one 4 KiB page mapped and written.
    func machine() throws -> (Kernel, AddressSpace, UInt64) {
        var config = KernelConfiguration()
        config.nodeSizes = [16 << 20]
        let kernel = try Kernel(booting: config)
        let mm = try AddressSpace(kernel: kernel)
        let a = try mm.mmap(length: PageGeometry.pmdSize + 2 * PageGeometry.pageSize)
        try mm.madvise(a, length: PageGeometry.pmdSize, advice: .hugePage)
        try mm.store64(a, 1)
        try mm.store64(a + PageGeometry.pmdSize64, 2)
        _ = try mm.load64(a + PageGeometry.pmdSize64 + PageGeometry.pageSize64)   // the zero page
        return (kernel, mm, a)
    }

    @Test("a quiet machine is clean: every frame free or mapped, references = mappings")
    func quietMachineIsClean() throws {
        let (kernel, mm, _) = try machine()
        let a = kernel.audit()
        #expect(a.isClean, "\(a)")
        #expect(a.folios == 2)
        #expect(a.frames > 0)
        withExtendedLifetime(mm) {}
    }

    @Test("an extra folio reference is a mismatch until the caller declares it held")
    func extraReference() throws {
        let (kernel, mm, base) = try machine()
        let folio = kernel.pfnToPage(mm.entry(at: base + PageGeometry.pmdSize64).entry.pfn).folio
        folio.get()
        let a = kernel.audit()
        #expect(a.referenceMismatches == 1 && !a.isClean, "\(a)")
        #expect(kernel.audit(heldReferences: [folio.pfn: 1]).isClean)
        folio.put()
        #expect(kernel.audit().isClean)
    }

    @Test("a held folio lock, a held PTE lock and an unmapped folio with a reference are found")
    func locksAndUnreachable() throws {
        let (kernel, mm, base) = try machine()
        let folio = kernel.pfnToPage(mm.entry(at: base).entry.pfn).folio
        #expect(folio.tryLock())
        mm.ptl(at: base).lock()
        let orphan = try #require(kernel.allocateFolio())
        let a = kernel.audit()
        #expect(a.foliosLocked == 1 && a.locksHeld == 1 && a.unreachableFolios == 1, "\(a)")
        mm.ptl(at: base).unlock()
        folio.unlock()
        orphan.put()
        #expect(kernel.audit().isClean)
    }

    @Test("an anonymous page whose index its VMA does not give its address is an rmap mismatch; mremap keeps them matched")
    func rmapMismatch() throws {
        let (kernel, mm, base) = try machine()
        let small = base + PageGeometry.pmdSize64
        let folio = kernel.pfnToPage(mm.entry(at: small).entry.pfn).folio
        folio.meta.index += 1
        let a = kernel.audit()
        #expect(a.rmapMismatches == 1 && !a.isClean, "\(a)")
        folio.meta.index -= 1
        #expect(kernel.audit().isClean)
        // Moved elsewhere, the pages keep their index and the VMA its vm_pgoff.
        let target = try mm.mmap(length: 2 * PageGeometry.pageSize)
        #expect(try mm.mremap(small, oldLength: PageGeometry.pageSize, newLength: PageGeometry.pageSize,
                              flags: [.mayMove, .fixed], newAddress: target) == target)
        #expect(mm.entry(at: target).entry.pfn == folio.pfn)
        #expect(try mm.load64(target) == 2)
        let moved = kernel.audit()
        #expect(moved.isClean, "\(moved)")
        #expect(kernel.rmapAddress(of: folio.page(0))?.1 == target)
    }
}
