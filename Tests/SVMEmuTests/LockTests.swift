import Testing
@testable import SVMEmu

@Suite("Page-table locks")
struct PageTableLockTests {
    @Test("withPTL holds the PTE lock for its body only, on return and on throw")
    func scopedPTL() {
        withMachine { _, mm in
            let a = mm.baseAddress
            let lock = mm.ptl(at: a)
            #expect(!lock.isLocked)
            #expect(mm.withPTL(a) { lock.isLocked })
            #expect(!lock.isLocked)
            #expect(throws: Errno.badAddress) {
                try mm.withPTL(a) { () throws(Errno) in throw .badAddress }
            }
            #expect(!lock.isLocked)
            #expect(mm.withPMDLock(a) { mm.pmdLock(at: a).isLocked })
            #expect(!mm.pmdLock(at: a).isLocked)
        }
    }

    @Test("nesting a lock in itself takes it once (two addresses of one PTE table)")
    func nestingSameLock() {
        withMachine { _, mm in
            let a = mm.baseAddress
            let held = mm.ptl(at: a).withLock(nesting: mm.ptl(at: a + UInt64(pageSize))) { mm.ptl(at: a).isLocked }
            #expect(held)
            #expect(!mm.ptl(at: a).isLocked)
        }
    }

#if DEBUG
    @Test("an rmap call whose contract needs the PTE lock, made without it, is reported by its rule")
    func ptlContractAssertion() {
        withMachine { kernel, mm in
            let a = mm.baseAddress
            guard let folio = kernel.allocateFolio(order: 0) else { Issue.record("no memory"); return }
            _ = kernel.takeDiagnostics()
            mm.withPTL(a) { mm.addAnonRmap(page: folio.page(0), address: a, exclusive: true) }
            #expect(kernel.takeDiagnostics().isEmpty)
            mm.addAnonRmap(page: folio.page(0), address: a, exclusive: true)
            #expect(kernel.takeDiagnostics().map(\.rule) == ["folio_add_anon_rmap_pte: PTE lock not held"])
            mm.removeRmap(page: folio.page(0))
            mm.removeRmap(page: folio.page(0))
            folio.put()
        }
    }
#endif
}
