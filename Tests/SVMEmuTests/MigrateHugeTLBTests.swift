import Foundation
import Testing
import TestSupport
@testable import SVMEmu

// migrate_pages / move_pages of hugetlb folios (unmap_and_move_huge_page):
// isolated from the pool's active list, the destination from the pool (or
// a temporary page of the target node), the source back in the pool.

/// A machine with two 64 MiB nodes and a hugetlb pool of `poolPages` pages
/// (interleaved over the nodes, node 0 first), and one address space.
private func withHugeTLBMachine(poolPages: Int, sourceLocation: SourceLocation = #_sourceLocation,
                                _ body: (Kernel, AddressSpace) throws -> Void) throws {
    let options = TestMachineOptions(maxPhysicalBytes: 1 << 30) { $0.hugetlbPages = poolPages }
    try TestMachine.run(options, sourceLocation: sourceLocation) { m in
        try body(m.kernel, m.mm)
        m.tearDown(sourceLocation: sourceLocation)
        // Every pool page is free again, none reserved, the pool its size.
        #expect(m.kernel.hugetlb.freePages == m.kernel.hugetlb.pageCount, sourceLocation: sourceLocation)
        #expect(m.kernel.hugetlb.pageCount == poolPages && m.kernel.hugetlb.reservedPages == 0,
                sourceLocation: sourceLocation)
    }
}

/// The hugetlb folio mapped at `a`.
private func hugeFolio(_ kernel: Kernel, _ mm: AddressSpace, _ a: UInt64) throws -> Folio {
    let e = mm.entry(at: a)
    try #require(e.level == .pmd && e.entry.kind == .present, "\(e)")
    return Folio(pfn: e.entry.pfn, kernel: kernel)
}

@Suite("migrate_pages and move_pages of hugetlb folios")
struct MigrateHugeTLBTests {

    @Test("migrate_pages(2) moves a MAP_HUGETLB page to the other node: the 2 MiB folio comes from the pool, every byte follows, the old folio goes back to the pool; move_pages brings it back")
    func hugetlbPageMoves() throws {
        try withHugeTLBMachine(poolPages: 4) { kernel, mm in
            let pool = kernel.hugetlb
            let a = try mm.mmapHugeTLB(length: hugeSize)
            try mm.fillPattern(a, length: hugeSize, seed: 9)
            let src = try hugeFolio(kernel, mm, a)
            let here = try #require(kernel.nodeID(of: src)), there = 1 - here
            #expect((pool.pageCount, pool.freePages, pool.reservedPages) == (4, 3, 0))
            let success = kernel.vmstat[.pgmigrateSuccess]

            #expect(try mm.migratePages(from: [here], to: [there]) == 0)
            let dst = try hugeFolio(kernel, mm, a)
            #expect(dst != src)
            #expect(kernel.nodeID(of: dst) == there)
            #expect(try mm.verifyPattern(a, length: hugeSize, seed: 9) == nil)
            #expect(kernel.vmstat[.pgmigrateSuccess] - success == UInt64(PageGeometry.pmdPages))
            // The destination is mapped once, writable and exclusive, and
            // migratable again; the source is a free pool page.
            #expect(dst.refCount == 1 && dst.entireMapCount == 1 && dst.mapCount == 1)
            #expect(dst.flags.isSuperset(of: [.hugetlb, .hugetlbMigratable, .anon]) && !dst.flags.contains(.hugetlbTemporary))
            #expect(mm.entry(at: a).entry.isWrite && dst.page(0).isAnonExclusive)
            #expect(src.refCount == 0 && pool.freeFolioPfns.contains(src.pfn))
            #expect((pool.pageCount, pool.freePages, pool.reservedPages, pool.surplusPages) == (4, 3, 0, 0))
            #expect(kernel.audit().isClean, "\(kernel.audit())")

            // A write after the move goes to the new page.
            try mm.store64(a + 64, 0x4854_4C42)
            #expect(try mm.load64(a + 64) == 0x4854_4C42)
            try mm.store64(a + 64, AddressSpace.patternWord(a + 64, 9))

            var status: [PageStatus] = []
            #expect(try mm.movePages([a + UInt64(5 * pageSize)], nodes: [here], status: &status) == 0)
            #expect(status == [.node(here)])
            #expect(kernel.nodeID(of: try hugeFolio(kernel, mm, a)) == here)
            #expect(try mm.verifyPattern(a, length: hugeSize, seed: 9) == nil)
            #expect((pool.pageCount, pool.freePages) == (4, 3))
            #expect(kernel.audit().isClean, "\(kernel.audit())")
            try mm.munmap(a, length: hugeSize)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("with no free pool page and no free 2 MiB block on the target node, a hugetlb page is not migrated (-ENOMEM) and nothing changes; with the node's memory back, a temporary page carries it and the pool keeps its size")
    func noDestination() throws {
        try withHugeTLBMachine(poolPages: 1) { kernel, mm in
            let pool = kernel.hugetlb
            let a = try mm.mmapHugeTLB(length: hugeSize)
            try mm.fillPattern(a, length: hugeSize, seed: 4)
            let src = try hugeFolio(kernel, mm, a)
            #expect(kernel.nodeID(of: src) == 0)
            // Node 1 has no 2 MiB block left.
            var hogs: [Folio] = []
            while let f = kernel.allocateFolio(order: PageGeometry.pmdOrder, node: 1) { hogs.append(f) }
            let before = StateSnapshot(kernel, mm)

            #expect(throws: Errno.noMemory) { try mm.migratePages(from: [0], to: [1]) }
            var status: [PageStatus] = []
            #expect(throws: Errno.noMemory) { try mm.movePages([a], nodes: [1], status: &status) }
            #expect(try hugeFolio(kernel, mm, a) == src)
            #expect(src.refCount == 1 && src.entireMapCount == 1 && src.flags.contains(.hugetlbMigratable))
            #expect(try mm.verifyPattern(a, length: hugeSize, seed: 4) == nil)
            #expect((pool.pageCount, pool.freePages, pool.reservedPages) == (1, 0, 0))
            let after = StateSnapshot(kernel, mm)
            #expect(after.vmas == before.vmas && after.freePages == before.freePages)
            let held = Dictionary(uniqueKeysWithValues: hogs.map { ($0.pfn, 1) })
            #expect(kernel.audit(heldReferences: held).isClean, "\(kernel.audit(heldReferences: held))")

            // The node's memory back: alloc_migrate_hugetlb_folio() takes a
            // fresh 2 MiB folio there; the source becomes temporary and
            // leaves the pool for node 0's free lists.
            for f in hogs { f.put() }
            let free0 = kernel.nodes[0].freePages
            #expect(try mm.migratePages(from: [0], to: [1]) == 0)
            let dst = try hugeFolio(kernel, mm, a)
            #expect(kernel.nodeID(of: dst) == 1 && !dst.flags.contains(.hugetlbTemporary))
            #expect(try mm.verifyPattern(a, length: hugeSize, seed: 4) == nil)
            #expect((pool.pageCount, pool.freePages, pool.surplusPages) == (1, 0, 0))
            #expect(kernel.nodes[0].freePages - free0 == UInt64(PageGeometry.pmdPages))
            #expect(src.refCount == 0 && src.flags.contains(.buddy))
            #expect(kernel.audit().isClean, "\(kernel.audit())")
            try mm.munmap(a, length: hugeSize)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("a free pool page promised to another mapping is not a migration destination: the temporary page is used instead")
    func reservedPagesStay() throws {
        try withHugeTLBMachine(poolPages: 2) { kernel, mm in
            let pool = kernel.hugetlb
            let a = try mm.mmapHugeTLB(length: hugeSize)
            try mm.fillPattern(a, length: hugeSize, seed: 6)
            let src = try hugeFolio(kernel, mm, a)
            let here = try #require(kernel.nodeID(of: src)), there = 1 - here
            // The other pool page (on `there`) is reserved by a second mapping.
            let b = try mm.mmapHugeTLB(length: hugeSize)
            #expect((pool.freePages, pool.reservedPages) == (1, 1))
            let reservedPfn = try #require(pool.freeFolioPfns.first)
            #expect(try mm.migratePages(from: [here], to: [there]) == 0)
            let dst = try hugeFolio(kernel, mm, a)
            #expect(dst.pfn != reservedPfn && kernel.nodeID(of: dst) == there)
            #expect(pool.freeFolioPfns == [reservedPfn])
            #expect((pool.pageCount, pool.freePages, pool.reservedPages) == (2, 1, 1))
            #expect(try mm.verifyPattern(a, length: hugeSize, seed: 6) == nil)
            // The reservation still backs b's first fault.
            try mm.store64(b, 1)
            #expect(try hugeFolio(kernel, mm, b).pfn == reservedPfn)
            #expect(kernel.audit().isClean, "\(kernel.audit())")
            try mm.munmap(a, length: hugeSize)
            try mm.munmap(b, length: hugeSize)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("a hugetlb page shared by fork moves in both processes with MPOL_MF_MOVE_ALL (and stays with MPOL_MF_MOVE: -EACCES); a pinned exclusive page is not migrated")
    func forkSharedAndPinned() throws {
        try withHugeTLBMachine(poolPages: 4) { kernel, mm in
            let pool = kernel.hugetlb
            let a = try mm.mmapHugeTLB(length: hugeSize)
            try mm.fillPattern(a, length: hugeSize, seed: 8)
            var child: AddressSpace? = try mm.fork()
            let src = try hugeFolio(kernel, mm, a)
            #expect(try hugeFolio(kernel, child!, a) == src && src.entireMapCount == 2)
            let there = 1 - (kernel.nodeID(of: src) ?? 0)
            var status: [PageStatus] = []
            #expect(try mm.movePages([a], nodes: [there], status: &status) == 0)
            #expect(status == [.error(.permissionDenied)])
            #expect(try mm.movePages([a], nodes: [there], status: &status, flags: .moveAll) == 0)
            #expect(status == [.node(there)])
            let dst = try hugeFolio(kernel, mm, a)
            #expect(try hugeFolio(kernel, child!, a) == dst)
            #expect(dst.refCount == 2 && dst.entireMapCount == 2 && !mm.entry(at: a).entry.isWrite)
            #expect(try mm.verifyPattern(a, length: hugeSize, seed: 8) == nil)
            #expect(try child!.verifyPattern(a, length: hugeSize, seed: 8) == nil)
            #expect(kernel.audit().isClean, "\(kernel.audit())")
            // A write in the child copies (hugetlb_wp), the parent keeps dst.
            try child!.store64(a, 7)
            #expect(try mm.verifyPattern(a, length: hugeSize, seed: 8) == nil)
            child = nil
            #expect(pool.freePages == 3)

            // Pinned and exclusive: try_to_migrate leaves it mapped, -EAGAIN.
            try mm.store64(a, AddressSpace.patternWord(a, 8))
            let pinned = try mm.pinUserPagesFast(a, count: 1, flags: .write)
            let here = kernel.nodeID(of: dst) ?? 0
            #expect(try mm.movePages([a], nodes: [1 - here], status: &status) == 1)
            #expect(try hugeFolio(kernel, mm, a) == dst && mm.entry(at: a).entry.isWrite)
            for p in pinned { kernel.unpinUserPage(p) }
            #expect(try mm.movePages([a], nodes: [1 - here], status: &status) == 0)
            #expect(status == [.node(1 - here)])
            #expect(try mm.verifyPattern(a, length: hugeSize, seed: 8) == nil)
            #expect(kernel.audit().isClean, "\(kernel.audit())")
            try mm.munmap(a, length: hugeSize)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("readers and a writer of a hugetlb page never see a wrong byte while it migrates back and forth: their faults wait on the migration entry")
    func accessesDuringMigration() throws {
        try withHugeTLBMachine(poolPages: 4) { kernel, mm in
            let a = try mm.mmapHugeTLB(length: hugeSize)
            try mm.fillPattern(a, length: hugeSize, seed: 12)
            let stop = SharedCounter(), bad = SharedCounter(), reads = SharedCounter(), moved = SharedCounter()
            let passes = SharedCounter()
            let words = hugeSize / 8
            let ok = runThreads(3, timeout: 90, keepAlive: [kernel, mm]) { t in
                switch t {
                case 0:
                    // The race needs the others: on a loaded host they may
                    // start after all the rounds would have run.
                    guard eventually(within: 30, { reads.current > 0 && passes.current > 0 }) else {
                        bad.add()
                        stop.add()
                        return
                    }
                    var st: [PageStatus] = []
                    for round in 0..<12 {
                        if (try? mm.movePages([a], nodes: [(round + 1) & 1], status: &st)) == 0, st == [.node((round + 1) & 1)] {
                            moved.add()
                        }
                    }
                    stop.add()
                case 1:
                    // Word 0 of each 4 KiB page counts up.
                    var v: UInt64 = 0
                    while stop.current == 0 {
                        v += 1
                        for p in 0..<PageGeometry.pmdPages where (try? mm.store64(a + UInt64(p * pageSize), v)) == nil { bad.add() }
                        passes.add()
                    }
                default:
                    var i = 0
                    while stop.current == 0 {
                        let w = 1 + (i * 97) % (words - 1)
                        let addr = a + UInt64(w * 8)
                        if addr % UInt64(pageSize) != 0, (try? mm.load64(addr)) != AddressSpace.patternWord(addr, 12) { bad.add() }
                        reads.add()
                        i += 1
                    }
                }
            }
            #expect(ok)
            #expect(bad.current == 0)
            #expect(moved.current == 12)
            #expect(reads.current > 0)
            #expect(kernel.audit().isClean, "\(kernel.audit())")
            try mm.munmap(a, length: hugeSize)
            #expect(kernel.diagnostics.isEmpty)
        }
    }
}
