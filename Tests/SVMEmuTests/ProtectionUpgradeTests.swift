import Testing
@testable import SVMEmu

// mprotect's write upgrade (MM_CP_TRY_CHANGE_WRITABLE,
// can_change_pte_writable(), can_change_pmd_writable()) and the v6.15
// device-exclusive rule (mprotect leaves the entry alone;
// restore_exclusive_pte() takes write permission from the VMA).

@Suite("mprotect write upgrade and device-exclusive entries")
struct ProtectionUpgradeTests {

    @Test("mprotect read-write makes the PTE of an exclusive anonymous page writable at once; a page shared after fork and the zero page wait for a write fault")
    func upgradeExclusivePTEs() throws {
        try withMachine(thp: .never) { kernel, mm in
            let ps = UInt64(pageSize)
            let a = try mm.mmap(length: 4 * pageSize)
            try mm.store64(a, 1)
            try mm.store64(a + ps, 2)
            _ = try mm.load64(a + 2 * ps)  // the zero page
            try mm.mprotect(a, length: 4 * pageSize, protection: .read)
            for i in 0..<3 { #expect(!mm.entry(at: a + UInt64(i) * ps).entry.isWrite) }
            let pfn0 = mm.entry(at: a).entry.pfn

            try mm.mprotect(a, length: 4 * pageSize, protection: .readWrite)
            #expect(mm.entry(at: a).entry.isWrite && mm.entry(at: a + ps).entry.isWrite)
            let zero = mm.entry(at: a + 2 * ps).entry
            #expect(zero.isSpecial && !zero.isWrite)
            #expect(mm.entry(at: a + 3 * ps).entry.isNone)
            let wp = kernel.vmstat[.wpFaults]
            try mm.store64(a, 3)
            #expect(kernel.vmstat[.wpFaults] == wp, "no write fault for a writable entry")
            #expect(mm.entry(at: a).entry.pfn == pfn0)

            // Shared copy-on-write with a child: not exclusive, stays read-only.
            var child: AddressSpace? = try mm.fork()
            try mm.mprotect(a, length: 4 * pageSize, protection: .read)
            try mm.mprotect(a, length: 4 * pageSize, protection: .readWrite)
            #expect(!mm.entry(at: a).entry.isWrite && !mm.entry(at: a + ps).entry.isWrite)
            try mm.store64(a, 4)
            #expect(kernel.vmstat[.wpFaults] == wp + 1)
            #expect(try child!.load64(a) == 3)
            child = nil
            #expect(kernel.audit().isClean, "\(kernel.audit())")
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("mprotect read-write makes the PMD of an exclusive THP writable at once (change_huge_pmd)")
    func upgradeExclusivePMD() throws {
        try withMachine(thp: .madvise) { kernel, mm in
            let a = try mm.mmap(length: hugeSize)
            try mm.madvise(a, length: hugeSize, advice: .hugePage)
            try mm.fillPattern(a, length: hugeSize, seed: 9)
            #expect(mm.entry(at: a).level == .pmd)
            let pfn = mm.entry(at: a).entry.pfn
            try mm.mprotect(a, length: hugeSize, protection: .read)
            #expect(!mm.entry(at: a).entry.isWrite)
            try mm.mprotect(a, length: hugeSize, protection: .readWrite)
            let (level, e) = mm.entry(at: a)
            #expect(level == .pmd && e.kind == .present && e.isWrite && e.pfn == pfn)
            let wp = kernel.vmstat[.wpFaults]
            try mm.store64(a + 4096, 1)
            #expect(kernel.vmstat[.wpFaults] == wp)
            #expect(mm.entry(at: a).level == .pmd && mm.entry(at: a).entry.pfn == pfn)
            #expect(kernel.audit().isClean, "\(kernel.audit())")
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("in a shared file mapping mprotect read-write makes a dirty entry writable at once, a clean one on its write fault")
    func upgradeSharedDirty() throws {
        try withMachine(thp: .never) { kernel, mm in
            let ps = UInt64(pageSize)
            let file = File(kernel: kernel)
            try file.truncate(to: Int64(2 * pageSize))
            let a = try mm.mmap(length: 2 * pageSize, shared: true, file: file)
            try mm.store64(a, 1)
            _ = try mm.load64(a + ps)
            try mm.mprotect(a, length: 2 * pageSize, protection: .read)
            try mm.mprotect(a, length: 2 * pageSize, protection: .readWrite)
            let dirty = mm.entry(at: a).entry, clean = mm.entry(at: a + ps).entry
            #expect(dirty.isDirty && dirty.isWrite)
            #expect(clean.kind == .present && !clean.isDirty && !clean.isWrite)
            try mm.store64(a + ps, 2)
            #expect(mm.entry(at: a + ps).entry.isWrite)
            try mm.munmap(a, length: 2 * pageSize)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    /// Makes the page at `a` device-exclusive and drops the folio lock and
    /// reference `makeDeviceExclusive` returns with (what a driver does
    /// once it mapped the page for atomics).
    private func makeExclusive(_ mm: AddressSpace, _ a: UInt64) throws {
        let page = try mm.withMmapReadLock { () throws(Errno) in try mm.makeDeviceExclusive(a, owner: nil) }
        page.folio.unlock()
        page.folio.put()
    }

    @Test("mprotect leaves a device-exclusive entry alone; the access that restores it takes write permission from the VMA (v6.15)")
    func deviceExclusiveFollowsVMA() throws {
        try withMachine(thp: .never) { kernel, mm in
            let a = try mm.mmap(length: pageSize)
            try mm.store64(a, 42)
            let pfn = mm.entry(at: a).entry.pfn
            try makeExclusive(mm, a)
            let entry = mm.entry(at: a).entry
            #expect(entry.kind == .deviceExclusive && !entry.isWrite && entry.pfn == pfn)

            // Read-only, then read-write again, with no CPU access between.
            try mm.mprotect(a, length: pageSize, protection: .read)
            #expect(mm.entry(at: a).entry == entry)
            try mm.mprotect(a, length: pageSize, protection: .readWrite)
            #expect(mm.entry(at: a).entry == entry)
            // A read restores it writable (the page is still exclusive) and
            // dirty (the folio is): no write fault follows.
            #expect(try mm.load64(a) == 42)
            let restored = mm.entry(at: a).entry
            #expect(restored.kind == .present && restored.isWrite && restored.isDirty && restored.pfn == pfn)
            let wp = kernel.vmstat[.wpFaults]
            try mm.store64(a, 43)
            #expect(kernel.vmstat[.wpFaults] == wp)

            // In a read-only VMA the restore maps it read-only; read-write
            // again upgrades the present entry at once.
            try makeExclusive(mm, a)
            try mm.mprotect(a, length: pageSize, protection: .read)
            #expect(try mm.load64(a) == 43)
            #expect(mm.entry(at: a).entry.kind == .present && !mm.entry(at: a).entry.isWrite)
            #expect(throws: Errno.permissionDenied) { try mm.store64(a, 44) }
            try mm.mprotect(a, length: pageSize, protection: .readWrite)
            #expect(mm.entry(at: a).entry.isWrite)
            #expect(kernel.vmstat[.deviceExclusiveRestored] == 2)
            #expect(kernel.audit().isClean, "\(kernel.audit())")
            #expect(kernel.diagnostics.isEmpty)
        }
    }
}
