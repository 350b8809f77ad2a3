import SVMEmu
import MirrorDriver
#if canImport(Glibc)
import Glibc
#endif

/// The hugetlbfs cases of hmm-tests (MAP_HUGETLB buffers backed by 2 MiB
/// pages of the hugetlb pool, which the fixture sizes to
/// ``HMMFixture/hugetlbPages``), and the emulator's own hugetlb checks: pool
/// exhaustion, pages returning to the pool, fork, bad input, and a device
/// storm against a CPU writer.
/// The time limit only catches a hang.
struct HMMHugeTLBCases {
    /// ALIGN(TWOMEG, default_hsize): one 2 MiB hugetlb page.
    let hugeSize = (2 << 20 + HugeTLBPool.pageSize - 1) / HugeTLBPool.pageSize * HugeTLBPool.pageSize

    /// Write huge TLBFS page.
    func anon_write_hugetlbfs(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            // hugetlb_free_default_pages(): the kernel test SKIPs without one.
            try require(f.kernel.hugetlb.freePages > 0, #"f.kernel.hugetlb.freePages > 0"#)
            let size = hugeSize, npages = size >> pageShift
            let buffer = HMMBuffer(size: size)
            buffer.ptr = try mm.mmapHugeTLB(length: size, protection: .readWrite)

            // Initialize data that the device will write to buffer->ptr.
            for i in 0..<size / 4 { buffer.mirrorInts[i] = Int32(i) }
            // Simulate a device writing system memory.
            expect(hmmCommand(f.dev0, .write, buffer, npages) == 0, #"hmmCommand(f.dev0, .write, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            expect(buffer.faults == 1, #"buffer.faults == 1"#)
            // Check what the device wrote.
            expect(firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { Int32($0) } == nil, #"firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { Int32($0) } == nil"#)

            // One pool page backs the whole buffer, mapped by one PMD entry.
            expect(mm.entry(at: buffer.ptr).level == .pmd, #"mm.entry(at: buffer.ptr).level == .pmd"#)
            expect(f.kernel.hugetlb.freePages == HMMFixture.hugetlbPages - 1, #"f.kernel.hugetlb.freePages == HMMFixture.hugetlbPages - 1"#)
            try mm.munmap(buffer.ptr, length: size)
            expect(f.kernel.hugetlb.freePages == HMMFixture.hugetlbPages, #"f.kernel.hugetlb.freePages == HMMFixture.hugetlbPages"#)
            expect(f.kernel.diagnostics.isEmpty, #"f.kernel.diagnostics.isEmpty"#)
        }
    }

    /// Test the hmm_range_fault() handling of large pages (PMD or PUD) that
    /// should be mapped by a large page table entry.
    func compound(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            try require(f.kernel.hugetlb.freePages > 0, #"f.kernel.hugetlb.freePages > 0"#)
            let size = hugeSize, npages = size >> pageShift
            let buffer = HMMBuffer(size: size, mirrorBytes: npages)
            buffer.ptr = try mm.mmapHugeTLB(length: size, protection: .readWrite)

            // Initialize the pages the device will snapshot in buffer->ptr.
            try storeInts(mm, buffer.ptr, count: size / 4) { Int32($0) }

            // Simulate a device snapshotting CPU pagetables.
            expect(hmmCommand(f.dev0, .snapshot, buffer, npages) == 0, #"hmmCommand(f.dev0, .snapshot, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            // One huge page, reported at PMD or PUD level: every page alike.
            var m = buffer.mirrorBytes
            var prot = DMirrorProt.write | (m[0] & DMirrorProt.pud != 0 ? DMirrorProt.pud : DMirrorProt.pmd)
            expect(m.firstIndex { $0 != prot } == nil, #"m.firstIndex { $0 != prot } == nil"#)
            expect(prot == DMirrorProt.write | DMirrorProt.pmd, #"prot == DMirrorProt.write | DMirrorProt.pmd"#)

            // Make the region read-only.
            expect(sys { try mm.mprotect(buffer.ptr, length: size, protection: .read) } == 0, #"sys { try mm.mprotect(buffer.ptr, length: size, protection: .read) } == 0"#)

            // Simulate a device snapshotting CPU pagetables.
            expect(hmmCommand(f.dev0, .snapshot, buffer, npages) == 0, #"hmmCommand(f.dev0, .snapshot, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            m = buffer.mirrorBytes
            prot = DMirrorProt.read | (m[0] & DMirrorProt.pud != 0 ? DMirrorProt.pud : DMirrorProt.pmd)
            expect(m.firstIndex { $0 != prot } == nil, #"m.firstIndex { $0 != prot } == nil"#)
            expect(prot == DMirrorProt.read | DMirrorProt.pmd, #"prot == DMirrorProt.read | DMirrorProt.pmd"#)

            try mm.munmap(buffer.ptr, length: size)
            expect(f.kernel.diagnostics.isEmpty, #"f.kernel.diagnostics.isEmpty"#)
        }
    }

}
