import CSVMSupport
import Foundation
import Testing
import TestSupport
@testable import SVMEmu

@Suite("TLB flush accounting")
struct TLBTests {

    @Test("munmap of 16 written pages flushes 16 pages one by one, locally only")
    func munmapCountsPages() throws {
        try withMachine(thp: .never) { kernel, mm in
            let a = try mm.mmap(length: 16 * pageSize)
            try stampPages(mm, a, pages: 16)
            let before = kernel.vmstat.snapshot()
            try mm.munmap(a, length: 16 * pageSize)
            #expect(delta(before, kernel, .tlbPagesFlushed) == 16)
            #expect(delta(before, kernel, .tlbLocalFlushOne) == 16)
            #expect(delta(before, kernel, .tlbLocalFlushAll) == 0)
            #expect(delta(before, kernel, .tlbRemoteFlush) == 0)
            #expect(delta(before, kernel, .tlbRemoteFlushReceived) == 0)
            #expect(kernel.vmstat.snapshot()["tlb_pages_flushed"] == kernel.vmstat[.tlbPagesFlushed])
            #expect(kernel.vmstat.snapshot()["nr_tlb_local_flush_one"] == kernel.vmstat[.tlbLocalFlushOne])
        }
    }

    @Test("a flush of 33 pages is 33 single-page flushes; 34 pages is one full flush")
    func singlePageFlushCeiling() throws {
        try withMachine(thp: .never) { kernel, mm in
            let a = try mm.mmap(length: 33 * pageSize)
            let b = try mm.mmap(length: 34 * pageSize)
            try stampPages(mm, a, pages: 33)
            try stampPages(mm, b, pages: 34)

            var before = kernel.vmstat.snapshot()
            try mm.munmap(a, length: 33 * pageSize)
            #expect(delta(before, kernel, .tlbLocalFlushOne) == 33)
            #expect(delta(before, kernel, .tlbLocalFlushAll) == 0)
            #expect(delta(before, kernel, .tlbPagesFlushed) == 33)

            before = kernel.vmstat.snapshot()
            try mm.munmap(b, length: 34 * pageSize)
            #expect(delta(before, kernel, .tlbLocalFlushAll) == 1)
            #expect(delta(before, kernel, .tlbLocalFlushOne) == 0)
            #expect(delta(before, kernel, .tlbPagesFlushed) == 34)
        }
    }

    @Test("mprotect and MADV_DONTNEED flush exactly the pages of their range")
    func mprotectAndDontNeedFlush() throws {
        try withMachine(thp: .never) { kernel, mm in
            let a = try mm.mmap(length: 64 * pageSize)
            try stampPages(mm, a, pages: 64)
            var before = kernel.vmstat.snapshot()
            try mm.mprotect(a + UInt64(8 * pageSize), length: 8 * pageSize, protection: .read)
            #expect(delta(before, kernel, .tlbPagesFlushed) == 8)
            #expect(delta(before, kernel, .tlbLocalFlushOne) == 8)

            before = kernel.vmstat.snapshot()
            try mm.madvise(a + UInt64(32 * pageSize), length: 32 * pageSize, advice: .dontNeed)
            #expect(delta(before, kernel, .tlbPagesFlushed) == 32)
            #expect(delta(before, kernel, .tlbLocalFlushOne) == 32)
            #expect(delta(before, kernel, .mmuNotifierInvalidations) == 1)
            #expect(try stampsIntact(mm, a, pages: 32))
        }
    }

    @Test("once a second thread has touched the mm, a flush also counts one remote flush (IPI)")
    func remoteFlushWithTwoThreads() throws {
        try withMachine(thp: .never) { kernel, mm in
            let a = try mm.mmap(length: 8 * pageSize)
            try stampPages(mm, a, pages: 8)
            // Only this thread has used the mm: local flushes only.
            var before = kernel.vmstat.snapshot()
            try mm.munmap(a + UInt64(6 * pageSize), length: 2 * pageSize)
            #expect(delta(before, kernel, .tlbRemoteFlush) == 0)
            #expect(delta(before, kernel, .tlbLocalFlushOne) == 2)

            // Another thread, on another emulated CPU (the cpumask has 64 bits:
            // pick a thread whose CPU id differs modulo 64), touches a page.
            let me = svm_cpu_id() & 63
            let otherCPU = SharedCounter()
            var distinct = false
            for _ in 0..<4 where !distinct {
                let ok = onAnotherThread(keepAlive: [kernel, mm]) {
                    otherCPU.value.store(Int(svm_cpu_id() & 63), ordering: .releasing)
                    _ = try? mm.load(a + 123)
                }
                try #require(ok)
                distinct = otherCPU.current != Int(me)
            }
            try #require(distinct)

            before = kernel.vmstat.snapshot()
            try mm.munmap(a, length: 4 * pageSize)
            #expect(delta(before, kernel, .tlbRemoteFlush) == 1)
            #expect(delta(before, kernel, .tlbRemoteFlushReceived) == 1)
            #expect(delta(before, kernel, .tlbLocalFlushOne) == 4)
            #expect(delta(before, kernel, .tlbPagesFlushed) == 4)
            #expect(try stampsIntact(mm, a + UInt64(4 * pageSize), pages: 2))
        }
    }

    @Test("splitting a PMD-mapped THP flushes its 2 MiB once")
    func thpSplitFlush() throws {
        try withMachine(thp: .always) { kernel, mm in
            let a = try mm.mmap(length: hugeSize)
            try mm.store(a, 1)
            #expect(mm.entry(at: a).level == .pmd)
            let before = kernel.vmstat.snapshot()
            try mm.mprotect(a, length: pageSize, protection: .read)
            #expect(delta(before, kernel, .thpSplitPmd) == 1)
            // 512 pages for the split (a full flush), then 1 for the protection change.
            #expect(delta(before, kernel, .tlbPagesFlushed) == 513)
            #expect(delta(before, kernel, .tlbLocalFlushAll) == 1)
            #expect(delta(before, kernel, .tlbLocalFlushOne) == 1)
            #expect(try mm.load(a) == 1)
            #expect(throws: Errno.permissionDenied) { try mm.store(a, 2) }
            try mm.store(a + UInt64(pageSize), 3)
            #expect(try mm.load(a + UInt64(pageSize)) == 3)
        }
    }
}

@Suite("TLB flush range")
struct TLBFlushRangeTests {
    @Test("munmap flushes only the pages that were mapped, not the untouched rest of the VMA")
    func munmapFlushesOnlyClearedRange() throws {
        try withMachine(thp: .never) { kernel, mm in
            let base = try mm.mmap(length: 64 * PageGeometry.pageSize)
            try mm.store(base + 3 * PageGeometry.pageSize64, 1)
            try mm.store(base + 5 * PageGeometry.pageSize64, 1)
            let before = kernel.vmstat[.tlbPagesFlushed]
            try mm.munmap(base, length: 64 * PageGeometry.pageSize)
            // Pages 3..5 bound what was cleared: 3 pages flushed, not 64.
            #expect(kernel.vmstat[.tlbPagesFlushed] - before == 3)
            let untouched = try mm.mmap(length: 16 * PageGeometry.pageSize)
            let again = kernel.vmstat[.tlbPagesFlushed]
            try mm.munmap(untouched, length: 16 * PageGeometry.pageSize)
            #expect(kernel.vmstat[.tlbPagesFlushed] == again)
        }
    }
}
