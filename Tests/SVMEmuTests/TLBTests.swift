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

    @Test("once a second thread runs in the mm, a flush sends it one IPI, which it takes at its next access")
    func remoteFlushWithTwoThreads() throws {
        try withMachine(thp: .never) { kernel, mm in
            let a = try mm.mmap(length: 8 * pageSize)
            try stampPages(mm, a, pages: 8)
            // Only this thread has used the mm: local flushes only.
            var before = kernel.vmstat.snapshot()
            try mm.munmap(a + UInt64(6 * pageSize), length: 2 * pageSize)
            #expect(delta(before, kernel, .tlbRemoteFlush) == 0)
            #expect(delta(before, kernel, .tlbLocalFlushOne) == 2)

            // Another thread, on another emulated CPU, touches a page and stays
            // (between accesses: it is not waited for, but it gets the IPI).
            let other = WorkerThread()
            defer { _ = other.stop() }
            #expect(other.run { _ = try? mm.load(a + 123) })
            #expect(kernel.cpus.boundCount == 2)

            before = kernel.vmstat.snapshot()
            try mm.munmap(a, length: 4 * pageSize)
            #expect(delta(before, kernel, .tlbRemoteFlush) == 1)
            #expect(delta(before, kernel, .tlbIPIsSent) == 1)
            #expect(delta(before, kernel, .tlbLocalFlushOne) == 4)
            #expect(delta(before, kernel, .tlbPagesFlushed) == 4)
            // The other CPU takes the IPI when it next runs in the mm.
            #expect(delta(before, kernel, .tlbRemoteFlushReceived) == 0)
            #expect(other.run { _ = try? mm.load(a + UInt64(4 * pageSize)) })
            #expect(delta(before, kernel, .tlbRemoteFlushReceived) == 1)
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

@Suite("CPUs of the machine")
struct CPUSlotTests {
    @Test("a thread takes a free CPU and gives it back when it exits; one beyond the count waits for a free CPU")
    func threadsTakeAndGiveBackCPUs() throws {
        var config = KernelConfiguration()
        config.nodeSizes = [16 << 20]
        config.maxPhysicalBytes = 1 << 30
        config.cpus = 1
        let kernel = try Kernel(booting: config)
        let mm = try AddressSpace(kernel: kernel)
        defer { withExtendedLifetime((mm, kernel)) {} }
        let a = try mm.mmap(length: pageSize)
        try mm.store(a, 5)
        #expect(kernel.cpus.boundCount == 1)
        // The only CPU is this thread's: another thread waits for it.
        let other = WorkerThread()
        defer { _ = other.stop() }
        let read = SharedCounter()
        other.start { read.value.store(Int((try? mm.load(a)) ?? 0), ordering: .releasing) }
        #expect(!other.wait(timeout: 0.2))
        #expect(read.current == 0)
        #expect(kernel.diagnostics(of: .machineLimit).contains { $0.rule.hasPrefix("more threads than CPUs") })
        // Giving it back lets the other thread run.
        kernel.cpus.leave()
        #expect(other.wait())
        #expect(read.current == 5)
        #expect(kernel.cpus.boundCount == 1)
        #expect(other.stop())
        #expect(eventually { kernel.cpus.boundCount == 0 })
    }

    @Test("an address outside the address space faults with EFAULT from a CPU whose TLB holds the page, even one that differs from a cached page only above bit 47")
    func outsideTheSpaceMissesTheTLB() throws {
        try withMachine(thp: .never) { kernel, mm in
            let a = try mm.mmap(length: pageSize)
            try mm.store(a, 7)
            #expect(try mm.load(a) == 7)  // in this CPU's TLB now
            // Page numbers that share the cached one's low bits, and addresses
            // whose page number reaches the tag's epoch bits (bit 36 and up).
            for bad in [a & 0xFFF, a | 1 << 47, a | 1 << 48, a | 1 << 52, a | 1 << 63, UInt64.max] {
                #expect(throws: Errno.badAddress) { _ = try mm.load(bad) }
                #expect(throws: Errno.badAddress) { try mm.store(bad, 1) }
            }
            #expect(try mm.load(a) == 7)
            #expect(kernel.vmstat[.tlbStaleAccesses] == 0)
        }
    }

    @Test("a machine takes 1 to 64 CPUs", arguments: [0, 65])
    func cpuCountChecked(cpus: Int) throws {
        var config = KernelConfiguration()
        config.cpus = cpus
        #expect(throws: KernelConfigurationError.self) { try config.validate() }
    }

    @Test("after a migration returns, a CPU that read the page before reads the new value, never the old frame's")
    func readersSeeTheNewValue() throws {
        try withMachine(thp: .never) { kernel, mm in
            let a = try mm.mmap(length: pageSize)
            let reader = WorkerThread()
            defer { _ = reader.stop() }
            let seen = SharedCounter()
            for v in 1...20 {
                try mm.store(a, UInt8(v))
                #expect(reader.run { seen.value.store(Int((try? mm.load(a)) ?? 0), ordering: .releasing) })
                #expect(seen.current == v)
                // MADV_DONTNEED drops the page; the next write faults in a new frame.
                try mm.madvise(a, length: pageSize, advice: .dontNeed)
                try mm.store(a, UInt8(v + 100))
                #expect(reader.run { seen.value.store(Int((try? mm.load(a)) ?? 0), ordering: .releasing) })
                #expect(seen.current == v + 100)
            }
            #expect(kernel.vmstat[.tlbStaleAccesses] == 0)
        }
    }
}
