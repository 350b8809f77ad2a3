import SVMEmu
import MirrorDriver
#if canImport(Glibc)
import Glibc
#endif

/// The THP cases of hmm-tests: 2 MiB (read_pmd_pagesize()) regions migrated
/// whole with SELECT_COMPOUND, the huge zero page, partial unmaps, mremap and
/// forced large-allocation failures (HMM_DMIRROR_FLAG_FAIL_ALLOC).
/// The time limit only catches a hang: under ThreadSanitizer on a small host
/// the cases of both fixture variants queue for over a minute.
struct HMMHugeCases {

    /// mmap 2 * size, then the 2 MiB-aligned `map` inside it (ALIGN(ptr, size)).
    func hugeBuffer(_ mm: AddressSpace, protection: Protection, mirrorBytes: Int = pmdSize) throws -> (HMMBuffer, UInt64) {
        let buffer = HMMBuffer(size: 2 * pmdSize, mirrorBytes: mirrorBytes)
        buffer.mirror.initializeMemory(as: UInt8.self, repeating: 0xFF)
        let old = try mm.mmap(length: 2 * pmdSize, protection: protection)
        buffer.ptr = (old + UInt64(pmdSize) - 1) & ~UInt64(pmdSize - 1)
        return (buffer, old)
    }

    /// Migrate a private anonymous huge empty page.
    func migrate_anon_huge_empty(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            let size = pmdSize, npages = size >> pageShift
            let (buffer, old) = try hugeBuffer(mm, protection: .read)
            expect(sys { try mm.madvise(buffer.ptr, length: size, advice: .hugePage) } == 0, #"sys { try mm.madvise(buffer.ptr, length: size, advice: .hugePage) } == 0"#)

            expect(hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0, #"hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            expect(firstMismatch(buffer.mirrorInts) { _ in 0 } == nil, #"firstMismatch(buffer.mirrorInts) { _ in 0 } == nil"#)
            try mm.munmap(old, length: 2 * size)
        }
    }

    /// Migrate a private anonymous huge zero page.
    func migrate_anon_huge_zero(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            let size = pmdSize, npages = size >> pageShift
            let (buffer, old) = try hugeBuffer(mm, protection: .read)
            expect(sys { try mm.madvise(buffer.ptr, length: size, advice: .hugePage) } == 0, #"sys { try mm.madvise(buffer.ptr, length: size, advice: .hugePage) } == 0"#)
            // A read maps the huge zero page.
            expect(try loadInt(mm, buffer.ptr, 0) == 0, #"try loadInt(mm, buffer.ptr, 0) == 0"#)

            expect(hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0, #"hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            expect(firstMismatch(buffer.mirrorInts) { _ in 0 } == nil, #"firstMismatch(buffer.mirrorInts) { _ in 0 } == nil"#)
            // Fault the pages back to system memory and check them.
            expect(firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { _ in 0 } == nil, #"firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { _ in 0 } == nil"#)
            try mm.munmap(old, length: 2 * size)
        }
    }

    /// Migrate a private anonymous huge page, then MADV_FREE it.
    func migrate_anon_huge_free(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            let size = pmdSize, npages = size >> pageShift
            let (buffer, old) = try hugeBuffer(mm, protection: .readWrite)
            expect(sys { try mm.madvise(buffer.ptr, length: size, advice: .hugePage) } == 0, #"sys { try mm.madvise(buffer.ptr, length: size, advice: .hugePage) } == 0"#)
            try storeInts(mm, buffer.ptr, count: size / 4) { Int32($0) }

            expect(hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0, #"hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            expect(firstMismatch(buffer.mirrorInts) { Int32($0) } == nil, #"firstMismatch(buffer.mirrorInts) { Int32($0) } == nil"#)

            expect(sys { try mm.madvise(buffer.ptr, length: size, advice: .free) } == 0, #"sys { try mm.madvise(buffer.ptr, length: size, advice: .free) } == 0"#)
            try mm.munmap(old, length: 2 * size)
            expect(f.dev0.devicePagesInUse == 0, #"f.dev0.devicePagesInUse == 0"#)
            expect(f.kernel.diagnostics.isEmpty, #"f.kernel.diagnostics.isEmpty"#)
        }
    }

    /// Migrate a private anonymous huge page and fault it back to system memory.
    func migrate_anon_huge_fault(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            let size = pmdSize, npages = size >> pageShift
            let (buffer, old) = try hugeBuffer(mm, protection: .readWrite)
            // As the kernel test: fill 4 KiB pages, then collapse them into one THP.
            try storeInts(mm, buffer.ptr, count: size / 4) { Int32($0) }
            expect(mm.entry(at: buffer.ptr).level == .pte, #"mm.entry(at: buffer.ptr).level == .pte"#)
            expect(sys { try mm.madvise(buffer.ptr, length: size, advice: .collapse) } == 0, #"sys { try mm.madvise(buffer.ptr, length: size, advice: .collapse) } == 0"#)
            expect(mm.entry(at: buffer.ptr).level == .pmd, #"mm.entry(at: buffer.ptr).level == .pmd"#)

            expect(hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0, #"hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            expect(firstMismatch(buffer.mirrorInts) { Int32($0) } == nil, #"firstMismatch(buffer.mirrorInts) { Int32($0) } == nil"#)

            let snap = HMMBuffer(size: size, mirrorBytes: npages)
            snap.ptr = buffer.ptr
            expect(hmmCommand(f.dev0, .snapshot, snap, npages) == 0, #"hmmCommand(f.dev0, .snapshot, snap, npages) == 0"#)
            expect(snap.cpages == npages, #"snap.cpages == npages"#)
            let local = variant.isCoherent ? DMirrorProt.deviceCoherentLocal : DMirrorProt.devicePrivateLocal
            let want = local | DMirrorProt.write | DMirrorProt.pmd
            expect(snap.mirrorBytes.firstIndex { $0 != want } == nil, #"snap.mirrorBytes.firstIndex { $0 != want } == nil"#)
            // /proc/self/pagemap: every page is a swap-type entry, not present
            // (coherent memory: present, mapped by the PMD).
            let kind: PageTableEntry.Kind = variant.isCoherent ? .present : .devicePrivate
            for i in 0..<npages {
                let e = mm.entry(at: buffer.ptr + UInt64(i * pageSize)).entry
                expect(e.kind == kind, #"e.kind == kind"#, "page \(i): \(e)")
                if e.kind != kind { break }
            }

            expect(firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { Int32($0) } == nil, #"firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { Int32($0) } == nil"#)
            try mm.munmap(old, length: 2 * size)
        }
    }

    /// Migrate, unmap half (at three offsets, with and without THP), fault the rest back.
    func migrate_partial_unmap_fault(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            let size = pmdSize, npages = size >> pageShift
            let unmapSize = size / 2
            let offsets = [0, size / 4, size / 2]
            for useTHP in [false, true] {
                for offset in offsets {
                    let (buffer, old) = try hugeBuffer(mm, protection: .readWrite)
                    expect(sys { try mm.madvise(buffer.ptr, length: size, advice: useTHP ? .hugePage : .noHugePage) } == 0, #"sys { try mm.madvise(buffer.ptr, length: size, advice: useTHP ? .hugePage : .noHugePage) } == 0"#)
                    try storeInts(mm, buffer.ptr, count: size / 4) { Int32($0) }

                    expect(hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0, #"hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0"#)
                    expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
                    expect(firstMismatch(buffer.mirrorInts) { Int32($0) } == nil, #"firstMismatch(buffer.mirrorInts) { Int32($0) } == nil"#)

                    try mm.munmap(buffer.ptr + UInt64(offset), length: unmapSize)

                    // Fault the remaining pages back and check them.
                    if offset > 0 {
                        let head = try loadInts(mm, buffer.ptr, count: offset / 4)
                        expect(firstMismatch(head) { Int32($0) } == nil, #"firstMismatch(head) { Int32($0) } == nil"#, "thp \(useTHP) offset \(offset)")
                    }
                    let tailStart = offset + unmapSize
                    if tailStart < size {
                        let tail = try loadInts(mm, buffer.ptr + UInt64(tailStart), count: (size - tailStart) / 4)
                        expect(firstMismatch(tail) { Int32($0 + tailStart / 4) } == nil, #"firstMismatch(tail) { Int32($0 + tailStart / 4) } == nil"#, "thp \(useTHP) offset \(offset)")
                    }
                    try mm.munmap(old, length: 2 * size)
                }
            }
            expect(f.dev0.devicePagesInUse == 0, #"f.dev0.devicePagesInUse == 0"#)
            expect(f.kernel.diagnostics.isEmpty, #"f.kernel.diagnostics.isEmpty"#)
        }
    }

    /// mremap (MAYMOVE | FIXED, with and without DONTUNMAP) before or after
    /// migrating, with and without THP, to three destination offsets; then
    /// fault everything back through the new address.
    func migrate_remap_fault(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            let size = pmdSize, npages = size >> pageShift
            let offsets = [0, size / 4, size / 2]
            for before in [false, true] {
                for dontUnmap in [false, true] {
                    for useTHP in [false, true] {
                        for offset in offsets {
                            let label = "before \(before) dontunmap \(dontUnmap) thp \(useTHP) offset \(offset)"
                            var flags: MRemapFlags = [.mayMove, .fixed]
                            if dontUnmap { flags.insert(.dontUnmap) }
                            let buffer = HMMBuffer(size: 8 * size, mirrorBytes: size)
                            buffer.mirror.initializeMemory(as: UInt8.self, repeating: 0xFF)
                            let old = try mm.mmap(length: buffer.size, protection: .readWrite)
                            let map = (old + UInt64(size) - 1) & ~UInt64(size - 1)
                            expect(sys { try mm.madvise(map, length: size, advice: useTHP ? .hugePage : .noHugePage) } == 0, #"sys { try mm.madvise(map, length: size, advice: useTHP ? .hugePage : .noHugePage) } == 0"#)
                            try mm.munmap(map + UInt64(size), length: size * 2)
                            buffer.ptr = map
                            try storeInts(mm, buffer.ptr, count: size / 4) { Int32($0) }

                            let target = map + UInt64(size + offset)
                            var newPtr: UInt64 = 0
                            if before {
                                newPtr = try mm.mremap(map, oldLength: size, newLength: size, flags: flags, newAddress: target)
                                expect(newPtr == target, #"newPtr == target"#)
                                buffer.ptr = newPtr
                            }
                            expect(hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0, #"hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0"#, "\(label)")
                            expect(buffer.cpages == npages, #"buffer.cpages == npages"#, "\(label)")
                            expect(firstMismatch(buffer.mirrorInts) { Int32($0) } == nil, #"firstMismatch(buffer.mirrorInts) { Int32($0) } == nil"#, "\(label)")
                            if !before {
                                newPtr = try mm.mremap(map, oldLength: size, newLength: size, flags: flags, newAddress: target)
                                expect(newPtr == target, #"newPtr == target"#)
                                buffer.ptr = newPtr
                            }
                            // Fault the pages back to system memory and check them.
                            let back = try loadInts(mm, buffer.ptr, count: size / 4)
                            expect(firstMismatch(back) { Int32($0) } == nil, #"firstMismatch(back) { Int32($0) } == nil"#, "\(label)")
                            if dontUnmap {
                                // The old range stays mapped, and empty.
                                expect(try loadInt(mm, map, 0) == 0, #"try loadInt(mm, map, 0) == 0"#, "\(label)")
                            }
                            try mm.munmap(newPtr, length: size)
                            try mm.munmap(old, length: buffer.size)
                        }
                    }
                }
            }
            expect(f.dev0.devicePagesInUse == 0, #"f.dev0.devicePagesInUse == 0"#)
            expect(f.kernel.diagnostics.isEmpty, #"f.kernel.diagnostics.isEmpty"#)
        }
    }

    /// Migrate a private anonymous huge page with forced allocation errors.
    func migrate_anon_huge_err(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            let size = pmdSize, npages = size >> pageShift
            var (buffer, old) = try hugeBuffer(mm, protection: .readWrite, mirrorBytes: 2 * size)
            expect(sys { try mm.madvise(buffer.ptr, length: size, advice: .hugePage) } == 0, #"sys { try mm.madvise(buffer.ptr, length: size, advice: .hugePage) } == 0"#)
            try storeInts(mm, buffer.ptr, count: size / 4) { Int32($0) }

            // Migrate to the device but force a THP allocation error.
            expect(hmmSetFlags(f.dev0, .failAlloc) == 0, #"hmmSetFlags(f.dev0, .failAlloc) == 0"#)
            expect(hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0, #"hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            expect(firstMismatch(buffer.mirrorInts.prefix(size / 4)) { Int32($0) } == nil, #"firstMismatch(buffer.mirrorInts.prefix(size / 4)) { Int32($0) } == nil"#)
            // Emulator-side: the fallback gave 4 KiB device pages.
            expect(mm.entry(at: buffer.ptr).level == .pte, #"mm.entry(at: buffer.ptr).level == .pte"#)
            expect(mm.entry(at: buffer.ptr).entry.kind == (variant.isCoherent ? .present : .devicePrivate), #"mm.entry(at: buffer.ptr).entry.kind == (variant.isCoherent ? .present : .devicePrivate)"#)

            // Fault back a single (4 KiB) page.
            expect(try loadInt(mm, buffer.ptr, 2048) == 2048, #"try loadInt(mm, buffer.ptr, 2048) == 2048"#)

            // Unmap and map again to reset things.
            expect(sys { try mm.munmap(old, length: 2 * size) } == 0, #"sys { try mm.munmap(old, length: 2 * size) } == 0"#)
            old = try mm.mmap(length: 2 * size, protection: .readWrite)
            buffer.ptr = (old + UInt64(size) - 1) & ~UInt64(size - 1)
            expect(sys { try mm.madvise(buffer.ptr, length: size, advice: .hugePage) } == 0, #"sys { try mm.madvise(buffer.ptr, length: size, advice: .hugePage) } == 0"#)
            try storeInts(mm, buffer.ptr, count: size / 4) { Int32($0) }

            // Migrate the THP to the device.
            expect(hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0, #"hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            expect(mm.entry(at: buffer.ptr).level == .pmd, #"mm.entry(at: buffer.ptr).level == .pmd"#)

            // Force an allocation error when migrating the device THP back.
            expect(hmmSetFlags(f.dev0, .failAlloc) == 0, #"hmmSetFlags(f.dev0, .failAlloc) == 0"#)
            expect(hmmCommand(f.dev0, .migrateToSystem, buffer, npages) == 0, #"hmmCommand(f.dev0, .migrateToSystem, buffer, npages) == 0"#)
            expect(try loadInt(mm, buffer.ptr, 2048) == 2048, #"try loadInt(mm, buffer.ptr, 2048) == 2048"#)
            // Emulator-side: it came back as 4 KiB pages, all of it. A
            // PMD-mapped coherent THP is not collected without SELECT_SYSTEM
            // (migrate_vma_collect_huge_pmd): it stays where the CPU reads it.
            expect(mm.entry(at: buffer.ptr).level == (variant.isCoherent ? .pmd : .pte), #"mm.entry(at: buffer.ptr).level == (variant.isCoherent ? .pmd : .pte)"#)
            expect(firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { Int32($0) } == nil, #"firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { Int32($0) } == nil"#)
            try mm.munmap(old, length: 2 * size)
            _ = buffer
        }
    }

    /// Migrate a private anonymous huge zero page with forced allocation errors.
    func migrate_anon_huge_zero_err(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            let size = pmdSize, npages = size >> pageShift
            var (buffer, old) = try hugeBuffer(mm, protection: .read, mirrorBytes: 2 * size)
            expect(sys { try mm.madvise(buffer.ptr, length: size, advice: .hugePage) } == 0, #"sys { try mm.madvise(buffer.ptr, length: size, advice: .hugePage) } == 0"#)

            // Migrate to the device but force a THP allocation error.
            expect(hmmSetFlags(f.dev0, .failAlloc) == 0, #"hmmSetFlags(f.dev0, .failAlloc) == 0"#)
            expect(hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0, #"hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            expect(firstMismatch(buffer.mirrorInts.prefix(size / 4)) { _ in 0 } == nil, #"firstMismatch(buffer.mirrorInts.prefix(size / 4)) { _ in 0 } == nil"#)

            // Fault back a single (4 KiB) page.
            expect(try loadInt(mm, buffer.ptr, 2048) == 0, #"try loadInt(mm, buffer.ptr, 2048) == 0"#)

            // Unmap and map again to reset things.
            expect(sys { try mm.munmap(old, length: 2 * size) } == 0, #"sys { try mm.munmap(old, length: 2 * size) } == 0"#)
            old = try mm.mmap(length: 2 * size, protection: .read)
            buffer.ptr = (old + UInt64(size) - 1) & ~UInt64(size - 1)
            expect(sys { try mm.madvise(buffer.ptr, length: size, advice: .hugePage) } == 0, #"sys { try mm.madvise(buffer.ptr, length: size, advice: .hugePage) } == 0"#)
            // A read maps the huge zero page.
            expect(try loadInt(mm, buffer.ptr, 0) == 0, #"try loadInt(mm, buffer.ptr, 0) == 0"#)

            expect(hmmSetFlags(f.dev0, .failAlloc) == 0, #"hmmSetFlags(f.dev0, .failAlloc) == 0"#)
            expect(hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0, #"hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            // Fault the device memory back and check it.
            expect(firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { _ in 0 } == nil, #"firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { _ in 0 } == nil"#)
            try mm.munmap(old, length: 2 * size)
        }
    }

}
