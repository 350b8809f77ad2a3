import Testing
import SVMEmu
import MirrorDriver
import HMMSelftests
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// The hugetlbfs cases of hmm-tests (MAP_HUGETLB buffers backed by 2 MiB
/// pages of the hugetlb pool, which the fixture sizes to
/// ``HMMFixture/hugetlbPages``), and the emulator's own hugetlb checks: pool
/// exhaustion, pages returning to the pool, fork, bad input, and a device
/// storm against a CPU writer.
/// The time limit only catches a hang.
@Suite("hmm-tests hugetlbfs", .timeLimit(.minutes(10)))
struct HMMHugeTLBTests {

    // MARK: the emulator's own hugetlb checks (device-private fixture only)

    /// The pool reserves a mapping's pages at mmap: a mapping the free,
    /// unreserved pages cannot cover fails with -ENOMEM and changes nothing;
    /// the pool cannot shrink below what is in use or reserved, and gives
    /// every page back to the nodes once they are free.
    @Test func hugetlb_pool_exhaustion() throws {
        try withHMM { f in
            let mm = f.mm!, pool = f.kernel.hugetlb
            let n = HMMFixture.hugetlbPages
            let ramFree = f.kernel.freePages
            let all = try mm.mmapHugeTLB(length: n * HugeTLBPool.pageSize)
            #expect((pool.pageCount, pool.freePages, pool.reservedPages) == (n, n, n))

            let before = mm.mappings.map { ($0.start, $0.end) }
            #expect(sys { try mm.mmapHugeTLB(length: HugeTLBPool.pageSize) } == -ENOMEM)
            #expect((pool.pageCount, pool.freePages, pool.reservedPages) == (n, n, n))
            #expect(mm.mappings.map { ($0.start, $0.end) }.elementsEqual(before) { $0 == $1 })

            // The reserved pages fault in: no fault fails.
            try mm.fillPattern(all, length: 2 * HugeTLBPool.pageSize, seed: 7)
            #expect((pool.freePages, pool.reservedPages) == (n - 2, n - 2))
            #expect(try mm.verifyPattern(all, length: 2 * HugeTLBPool.pageSize, seed: 7) == nil)

            // Shrinking keeps what is reserved or in use; in-use pages beyond
            // the new size become surplus.
            #expect(pool.setPageCount(0) == n - 2)
            #expect(pool.surplusPages == 2)
            try mm.munmap(all, length: n * HugeTLBPool.pageSize)
            #expect((pool.pageCount, pool.freePages, pool.reservedPages, pool.surplusPages) == (n - 2, n - 2, 0, 0))
            #expect(pool.setPageCount(0) == 0)
            #expect(f.kernel.freePages == ramFree + UInt64(n * PageGeometry.pmdPages))
            #expect(sys { try mm.mmapHugeTLB(length: 1) } == -ENOMEM)
            #expect(pool.setPageCount(n) == n)
            #expect(f.kernel.diagnostics.isEmpty)
        }
    }

    /// munmap, a shrinking mremap and MADV_DONTNEED return hugetlb pages
    /// (and unused reservations) to the pool; mapping and unmapping over and
    /// over leaks nothing.
    @Test func hugetlb_munmap_returns_pages() throws {
        try withHMM { f in
            let mm = f.mm!, pool = f.kernel.hugetlb
            let n = HMMFixture.hugetlbPages, huge = UInt64(HugeTLBPool.pageSize)
            for round in 0..<20 {
                let p = try mm.mmapHugeTLB(length: n * HugeTLBPool.pageSize)
                try mm.fillPattern(p, length: n * HugeTLBPool.pageSize, seed: UInt64(round))
                #expect(pool.freePages == 0)
                // Half the mapping, on a 2 MiB boundary.
                try mm.munmap(p, length: 2 * HugeTLBPool.pageSize)
                #expect(pool.freePages == 2)
                try mm.munmap(p + 2 * huge, length: (n - 2) * HugeTLBPool.pageSize)
                #expect((pool.freePages, pool.reservedPages) == (n, 0))
            }
            // mremap shrinks in place: the tail's page and reservation return.
            let r = try mm.mmapHugeTLB(length: 2 * HugeTLBPool.pageSize)
            try mm.store64(r, 1)
            #expect((pool.freePages, pool.reservedPages) == (n - 1, 1))
            #expect(try mm.mremap(r, oldLength: 2 * HugeTLBPool.pageSize, newLength: pageSize) == r)
            #expect((pool.freePages, pool.reservedPages) == (n - 1, 0))
            #expect(try mm.load64(r) == 1)
            // mprotect on the 2 MiB boundary; a CPU store then faults (EACCES).
            #expect(sys { try mm.mprotect(r, length: HugeTLBPool.pageSize, protection: .read) } == 0)
            #expect(sys { try mm.store64(r, 2) } == -EACCES)
            try mm.munmap(r, length: HugeTLBPool.pageSize)
            #expect((pool.freePages, pool.reservedPages) == (n, 0))

            // MADV_DONTNEED drops the page; the next touch gets a zeroed one.
            let p = try mm.mmapHugeTLB(length: HugeTLBPool.pageSize)
            try mm.store64(p + 64, 0xABCD)
            #expect(pool.freePages == n - 1)
            try mm.madvise(p, length: HugeTLBPool.pageSize, advice: .dontNeed)
            #expect(pool.freePages == n)
            #expect(try mm.load64(p + 64) == 0)
            #expect(pool.freePages == n - 1)
            try mm.munmap(p, length: HugeTLBPool.pageSize)
            #expect((pool.freePages, pool.reservedPages) == (n, 0))
            #expect(f.kernel.diagnostics.isEmpty)
        }
    }

    /// fork shares a private hugetlb page read-only; the parent's write
    /// copies the 2 MiB page (a second pool page), the child keeps the old
    /// bytes, and both pages go back to the pool.
    @Test func hugetlb_fork_copy_on_write() throws {
        try withHMM { f in
            let mm = f.mm!, pool = f.kernel.hugetlb
            let n = HMMFixture.hugetlbPages
            let p = try mm.mmapHugeTLB(length: HugeTLBPool.pageSize)
            try mm.fillPattern(p, length: HugeTLBPool.pageSize, seed: 1)
            var child: AddressSpace? = try mm.fork()
            #expect(pool.freePages == n - 1)
            #expect(try child!.verifyPattern(p, length: HugeTLBPool.pageSize, seed: 1) == nil)
            try mm.fillPattern(p, length: HugeTLBPool.pageSize, seed: 2)
            #expect(pool.freePages == n - 2)
            #expect(try child!.verifyPattern(p, length: HugeTLBPool.pageSize, seed: 1) == nil)
            #expect(try mm.verifyPattern(p, length: HugeTLBPool.pageSize, seed: 2) == nil)
            // The child now maps the old page alone: its write reuses it.
            try child!.store64(p, 5)
            #expect(pool.freePages == n - 2)
            child = nil
            #expect(pool.freePages == n - 1)

            // A page that may be pinned is copied for the child at fork:
            // the pin keeps seeing the parent's page.
            let pinned = try mm.pinUserPagesFast(p + 8192, count: 1, flags: [.write, .longterm])
            let atFork = try mm.load64(p)
            child = try mm.fork()
            #expect(pool.freePages == n - 2)
            try mm.store64(p, 9)
            #expect(pool.freePages == n - 2)
            #expect(pinned[0].folio.withBytes { $0.load(fromByteOffset: 0, as: UInt64.self) } == 9)
            #expect(try child!.load64(p) == atFork)
            f.kernel.unpinUserPage(pinned[0])
            child = nil
            #expect(pool.freePages == n - 1)
            try mm.munmap(p, length: HugeTLBPool.pageSize)
            #expect(f.kernel.diagnostics.isEmpty)
        }
    }

    /// Input the kernel refuses for a hugetlb mapping gives its errno and
    /// changes nothing: a fixed address off 2 MiB, cuts (munmap, mprotect,
    /// MADV_DONTNEED) inside a 2 MiB page, MADV_FREE and MADV_COLLAPSE,
    /// growing mremap, migrate_vma (dmirror's migration, -EINVAL) and
    /// make_device_exclusive (-EOPNOTSUPP). A length off 2 MiB is rounded
    /// up, as the kernel rounds it. move_pages, not bad input, moves the
    /// page to the other node with the bytes.
    @Test func hugetlb_bad_input() throws {
        try withHMM { f in
            let mm = f.mm!, pool = f.kernel.hugetlb
            let huge = UInt64(HugeTLBPool.pageSize), page = UInt64(pageSize)
            #expect(sys { try mm.mmapHugeTLB(length: 0) } == -EINVAL)
            let p = try mm.mmapHugeTLB(length: pageSize)
            #expect(mm.mappings.first { $0.start == p }?.length == huge)
            try mm.fillPattern(p, length: HugeTLBPool.pageSize, seed: 3)
            let q = try mm.mmapHugeTLB(length: 2 * HugeTLBPool.pageSize)
            #expect(sys { try mm.mmapHugeTLB(address: q + page, length: HugeTLBPool.pageSize) } == -EINVAL)
            #expect(sys { try mm.mmap(address: q + page, length: pageSize) } == -EINVAL)
            #expect(sys { try mm.munmap(p, length: pageSize) } == -EINVAL)
            #expect(sys { try mm.munmap(p + page, length: pageSize) } == -EINVAL)
            #expect(sys { try mm.munmap(q + page, length: HugeTLBPool.pageSize) } == -EINVAL)
            #expect(sys { try mm.mprotect(p, length: pageSize, protection: .read) } == -EINVAL)
            #expect(sys { try mm.madvise(p + page, length: pageSize, advice: .dontNeed) } == -EINVAL)
            #expect(sys { try mm.madvise(p, length: HugeTLBPool.pageSize, advice: .free) } == -EINVAL)
            #expect(sys { try mm.madvise(p, length: HugeTLBPool.pageSize, advice: .collapse) } == -EINVAL)
            #expect(sys { try mm.mremap(p, oldLength: HugeTLBPool.pageSize, newLength: 2 * HugeTLBPool.pageSize, flags: .mayMove) } == -EINVAL)
            // MADV_DONTNEED of less than a huge page rounds the end down: nothing.
            #expect(sys { try mm.madvise(p, length: pageSize, advice: .dontNeed) } == 0)
            // MADV_HUGEPAGE leaves a hugetlb VMA as it is.
            #expect(sys { try mm.madvise(p, length: pageSize, advice: .hugePage) } == 0)
            let buffer = HMMBuffer(size: HugeTLBPool.pageSize)
            buffer.ptr = p
            #expect(hmmCommand(f.dev0, .migrateToDevice, buffer, HugeTLBPool.pageSize >> pageShift) == -EINVAL)

            // Device-exclusive access is for anonymous memory only.
            let exclusive = mm.withMmapReadLock { () -> Int32 in
                sys { _ = try mm.makeDeviceExclusive(p, owner: f.dev0.owner) }
            }
            #expect(exclusive == -EOPNOTSUPP)
            // move_pages isolates the hugetlb folio from the pool's active
            // list and migrates it (unmap_and_move_huge_page) into the one
            // free pool page no reservation holds.
            var status = [PageStatus](repeating: .error(.noEntry), count: 1)
            try mm.movePages([p], nodes: nil, status: &status)
            guard case .node(let here) = status[0] else { Issue.record("no node for the page: \(status[0])"); return }
            try mm.movePages([p], nodes: [1 - here], status: &status)
            #expect(status[0] == .node(1 - here))

            // Nothing else changed: one VMA each, the bytes, the pool.
            #expect(mm.mappings.filter { $0.flags.contains(.hugetlb) }.map(\.length) == [huge, 2 * huge])
            #expect(try mm.verifyPattern(p, length: HugeTLBPool.pageSize, seed: 3) == nil)
            #expect(mm.entry(at: p).level == .pmd)
            #expect((pool.freePages, pool.reservedPages) == (HMMFixture.hugetlbPages - 1, 2))
            try mm.munmap(p, length: HugeTLBPool.pageSize)
            try mm.munmap(q, length: 2 * HugeTLBPool.pageSize)
            #expect(f.kernel.diagnostics.isEmpty)
        }
    }

    /// A device writes and reads the first 256 KiB of one hugetlb page
    /// (dmirror WRITE and READ through hmm_range_fault) while a CPU thread
    /// writes those of the other and a second device thread reads them; the
    /// first touches race on the fault mutex. Each side checks its own bytes
    /// every round; the device reader sees only whole ints the CPU stored
    /// (low 16 bits its index), since device and CPU share the one pool page.
    @Test func hugetlb_device_storm_against_cpu_writer() throws {
        try withHMM { f in
            let mm = f.mm!, dev0 = f.dev0!, dev1 = f.dev1!
            // A window of each page keeps the per-round checks short under
            // ThreadSanitizer; the faults still map whole 2 MiB pages.
            let size = 64 << pageShift, npages = size >> pageShift, ints = size / 4
            let indexMask = Int32(ints - 1)
            let base = try mm.mmapHugeTLB(length: 2 * HugeTLBPool.pageSize)
            let a = base, b = base + UInt64(HugeTLBPool.pageSize)
            let rounds = 8
            let issues = ThreadIssues()
            let ok = runThreads(3, timeout: 120, keepAlive: [mm, dev0, dev1]) { t in
                switch t {
                case 0:
                    // Device 0 owns page A.
                    let buffer = HMMBuffer(size: size)
                    buffer.ptr = a
                    for r in 0..<rounds {
                        for i in 0..<ints { buffer.mirrorInts[i] = Int32(r << 16) | Int32(i) }
                        if hmmCommand(dev0, .write, buffer, npages) != 0 { issues.record("device write failed"); return }
                        buffer.mirror.initializeMemory(as: UInt8.self, repeating: 0)
                        if hmmCommand(dev0, .read, buffer, npages) != 0 { issues.record("device read failed"); return }
                        if let i = firstMismatch(buffer.mirrorInts, { Int32(r << 16) | Int32($0) }) {
                            issues.record("page A int \(i) read back \(buffer.mirrorInts[i]) in round \(r)")
                        }
                    }
                case 1:
                    // The CPU owns page B.
                    for r in 0..<rounds {
                        do {
                            try storeInts(mm, b, count: ints) { Int32(r << 16) | Int32($0) }
                            if let i = firstMismatch(try loadInts(mm, b, count: ints), { Int32(r << 16) | Int32($0) }) {
                                issues.record("page B int \(i) wrong after CPU round \(r)")
                            }
                        } catch { issues.record("CPU access failed: \(error)") }
                    }
                default:
                    // Device 1 reads page B while the CPU writes it.
                    let buffer = HMMBuffer(size: size)
                    buffer.ptr = b
                    for _ in 0..<rounds {
                        if hmmCommand(dev1, .read, buffer, npages) != 0 { issues.record("device 1 read failed"); return }
                        // Zero: not written yet; otherwise a whole int of some CPU round.
                        let seen = buffer.mirrorInts
                        if let i = seen.indices.first(where: { seen[$0] != 0 && seen[$0] & indexMask != Int32($0) }) {
                            issues.record("page B int \(i) seen by the device as \(buffer.mirrorInts[i])")
                        }
                    }
                }
            }
            // A run that did not finish leaks its objects; check nothing more.
            try #require(ok)
            #expect(issues.all.isEmpty, "\(issues.all.prefix(5))")
            // The last round of each side, as the other side sees it.
            let last = Int32((rounds - 1) << 16)
            #expect(firstMismatch(try loadInts(mm, a, count: ints)) { last | Int32($0) } == nil)
            let buffer = HMMBuffer(size: size)
            buffer.ptr = b
            #expect(hmmCommand(dev1, .read, buffer, npages) == 0)
            #expect(firstMismatch(buffer.mirrorInts) { last | Int32($0) } == nil)
            #expect(f.kernel.hugetlb.freePages == HMMFixture.hugetlbPages - 2)
            try mm.munmap(base, length: 2 * HugeTLBPool.pageSize)
            #expect(f.kernel.diagnostics.isEmpty)
        }
    }
}
