import Foundation
import TestSupport
import Testing
@testable import SVMEmu

@Suite("Page-table locks")
struct PageTableLockTests {
    @Test("withPTL holds the PTE lock for its body only, on return and on throw")
    func scopedPTL() throws {
        try withMachine { _, mm in
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
    func nestingSameLock() throws {
        try withMachine { _, mm in
            let a = mm.baseAddress
            let held = mm.ptl(at: a).withLock(nesting: mm.ptl(at: a + UInt64(pageSize))) { mm.ptl(at: a).isLocked }
            #expect(held)
            #expect(!mm.ptl(at: a).isLocked)
        }
    }

#if DEBUG
    @Test("an rmap call whose contract needs the PTE lock, made without it, is reported by its rule")
    func ptlContractAssertion() throws {
        try withMachine { kernel, mm in
            let a = mm.baseAddress
            guard let folio = kernel.allocateFolio(order: 0) else { Issue.record("no memory"); return }
            _ = kernel.takeDiagnostics()
            mm.withPTL(a) { mm.addAnonRmap(page: folio.page(0), address: a, exclusive: true) }
            #expect(kernel.takeDiagnostics().isEmpty)
            mm.addAnonRmap(page: folio.page(0), address: a, exclusive: true)
            #expect(kernel.takeDiagnostics(of: .lockNotHeld).map(\.rule) == ["folio_add_anon_rmap_pte: PTE lock not held"])
            mm.removeRmap(page: folio.page(0))
            mm.removeRmap(page: folio.page(0))
            folio.put()
        }
    }
#endif
}

/// `set_pte_at()` / `set_pmd_at()` need the lock of their table; the tests
/// validate locks (lockdep on everywhere), so the check is exact: the
/// calling thread must hold it, another thread holding it does not do.
@Suite("Page-table store lock contracts")
struct PageTableStoreContractTests {
    @Test("a PTE store without the PTE table lock is reported as set_pte_at's rule, of kind lockNotHeld")
    func pteStoreWithoutLock() throws {
        try withMachine { kernel, mm in
            let a = mm.baseAddress
            mm.withPTL(a) { mm.storePTE(a, .none) }
            #expect(kernel.diagnostics(of: .lockNotHeld).isEmpty)
            mm.storePTE(a, .none)
            let found = kernel.takeDiagnostics(of: .lockNotHeld)
            #expect(found.map(\.rule) == ["set_pte_at: caller must hold the PTE table lock (pte_lockptr)"])
            #expect(found.first?.detail == "address 0x\(String(a, radix: 16))")
        }
    }

    @Test("a PMD store without the PMD lock is reported as set_pmd_at's rule; the PTE lock is not the PMD lock")
    func pmdStoreWithoutLock() throws {
        try withMachine { kernel, mm in
            let a = mm.baseAddress
            mm.withPMDLock(a) { mm.storePMD(a, .none) }
            #expect(kernel.diagnostics(of: .lockNotHeld).isEmpty)
            mm.withPTL(a) { mm.storePMD(a, .none) }
            #expect(kernel.takeDiagnostics(of: .lockNotHeld).map(\.rule)
                    == ["set_pmd_at: caller must hold the PMD lock (pmd_lockptr)"])
        }
    }

    @Test("the lock must be the caller's: a PTE store while another thread holds the lock is reported")
    func pteStoreUnderSomeoneElsesLock() throws {
        try withMachine { kernel, mm in
            let a = mm.baseAddress
            #expect(LockOrder.isEnabledEverywhere, "the test machine validates every thread's locks")
            let holding = SharedCounter(), release = SharedCounter()
            let holder = Thread {
                mm.withPTL(a) {
                    holding.add()
                    let start = Date()
                    while release.current == 0 && Date().timeIntervalSince(start) < 10 { sched_yield() }
                }
            }
            holder.start()
            let start = Date()
            while holding.current == 0 && Date().timeIntervalSince(start) < 10 { sched_yield() }
            mm.storePTE(a, .none)
            release.add()
            #expect(kernel.takeDiagnostics(of: .lockNotHeld).map(\.rule)
                    == ["set_pte_at: caller must hold the PTE table lock (pte_lockptr)"])
            while mm.ptl(at: a).isLocked && Date().timeIntervalSince(start) < 20 { sched_yield() }
        }
    }
}
