import Foundation
import Synchronization
import SVMEmu
import MirrorDriver
#if canImport(Glibc)
import Glibc
#endif

/// The kernel's hmm-tests (tools/testing/selftests/mm/hmm-tests.c), ported
/// case by case with the same expectations: return codes, cpages, faults,
/// bytes, snapshot permissions. Test names are the kernel's. Cases that need
/// what the emulator does not model are listed in Docs/conformance.md.
/// These are the FIXTURE(hmm) and FIXTURE(hmm2) device-private variants.
/// The time limit only catches a hang: under ThreadSanitizer on a small host
/// the cases of both fixture variants queue for over a minute.
struct HMMCases {

    /// Simple NULL test of device open/close.
    func open_close(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            expect(f.dev0.devicePagesInUse == 0, #"f.dev0.devicePagesInUse == 0"#)
            expect(f.dev1.devicePagesInUse == 0, #"f.dev1.devicePagesInUse == 0"#)
            expect(f.kernel.diagnostics.isEmpty, #"f.kernel.diagnostics.isEmpty"#)
        }
    }

    /// Read private anonymous memory.
    func anon_read(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            let npages = hmmBufferSize >> pageShift
            let size = npages << pageShift
            let buffer = HMMBuffer(size: size)
            buffer.ptr = try mm.mmap(length: size, protection: .readWrite)
            // Initialize in system memory but leave the first two pages zero
            // (pte_none and the zero page).
            try storeInts(mm, buffer.ptr, from: 2 * pageSize / 4, count: size / 4) { Int32($0) }
            expect(sys { try mm.mprotect(buffer.ptr, length: size, protection: .read) } == 0, #"sys { try mm.mprotect(buffer.ptr, length: size, protection: .read) } == 0"#)
            // Populate the CPU page table with the zero page.
            expect(try loadInt(mm, buffer.ptr + UInt64(pageSize), 0) == 0, #"try loadInt(mm, buffer.ptr + UInt64(pageSize), 0) == 0"#)

            expect(hmmCommand(f.dev0, .read, buffer, npages) == 0, #"hmmCommand(f.dev0, .read, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            expect(buffer.faults == 1, #"buffer.faults == 1"#)
            expect(firstMismatch(buffer.mirrorInts) { $0 < 2 * pageSize / 4 ? 0 : Int32($0) } == nil, #"firstMismatch(buffer.mirrorInts) { $0 < 2 * pageSize / 4 ? 0 : Int32($0) } == nil"#)
            expect(f.kernel.diagnostics.isEmpty, #"f.kernel.diagnostics.isEmpty"#)
        }
    }

    /// Read private anonymous memory protected with PROT_NONE.
    func anon_read_prot(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            let npages = hmmBufferSize >> pageShift
            let size = npages << pageShift
            let buffer = HMMBuffer(size: size)
            buffer.ptr = try mm.mmap(length: size, protection: .readWrite)
            try storeInts(mm, buffer.ptr, count: size / 4) { Int32($0) }
            for i in 0..<(size / 4) { buffer.mirrorInts[i] = -Int32(i) }
            expect(sys { try mm.mprotect(buffer.ptr, length: size, protection: .none) } == 0, #"sys { try mm.mprotect(buffer.ptr, length: size, protection: .none) } == 0"#)

            expect(hmmCommand(f.dev0, .read, buffer, npages) == -EFAULT, #"hmmCommand(f.dev0, .read, buffer, npages) == -EFAULT"#)

            expect(sys { try mm.mprotect(buffer.ptr, length: size, protection: .read) } == 0, #"sys { try mm.mprotect(buffer.ptr, length: size, protection: .read) } == 0"#)
            expect(firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { Int32($0) } == nil, #"firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { Int32($0) } == nil"#)
            // The device wrote nothing.
            expect(firstMismatch(buffer.mirrorInts) { -Int32($0) } == nil, #"firstMismatch(buffer.mirrorInts) { -Int32($0) } == nil"#)
        }
    }

    /// Write private anonymous memory.
    func anon_write(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            let npages = hmmBufferSize >> pageShift
            let size = npages << pageShift
            let buffer = HMMBuffer(size: size)
            buffer.ptr = try mm.mmap(length: size, protection: .readWrite)
            for i in 0..<(size / 4) { buffer.mirrorInts[i] = Int32(i) }

            expect(hmmCommand(f.dev0, .write, buffer, npages) == 0, #"hmmCommand(f.dev0, .write, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            expect(buffer.faults == 1, #"buffer.faults == 1"#)
            expect(firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { Int32($0) } == nil, #"firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { Int32($0) } == nil"#)
        }
    }

    /// Write private anonymous memory protected with PROT_READ.
    func anon_write_prot(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            let npages = hmmBufferSize >> pageShift
            let size = npages << pageShift
            let buffer = HMMBuffer(size: size)
            buffer.ptr = try mm.mmap(length: size, protection: .read)

            // The device reads a zero page.
            expect(hmmCommand(f.dev0, .read, buffer, 1) == 0, #"hmmCommand(f.dev0, .read, buffer, 1) == 0"#)
            expect(buffer.cpages == 1, #"buffer.cpages == 1"#)
            expect(buffer.faults == 1, #"buffer.faults == 1"#)

            for i in 0..<(size / 4) { buffer.mirrorInts[i] = Int32(i) }
            expect(hmmCommand(f.dev0, .write, buffer, npages) == -EPERM, #"hmmCommand(f.dev0, .write, buffer, npages) == -EPERM"#)
            expect(firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { _ in 0 } == nil, #"firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { _ in 0 } == nil"#)

            // Now allow writing and see that the zero page is replaced.
            expect(sys { try mm.mprotect(buffer.ptr, length: size, protection: .readWrite) } == 0, #"sys { try mm.mprotect(buffer.ptr, length: size, protection: .readWrite) } == 0"#)
            expect(hmmCommand(f.dev0, .write, buffer, npages) == 0, #"hmmCommand(f.dev0, .write, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            expect(buffer.faults == 1, #"buffer.faults == 1"#)
            expect(firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { Int32($0) } == nil, #"firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { Int32($0) } == nil"#)
        }
    }

    /// Write a private anonymous huge page.
    func anon_write_huge(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            let buffer = HMMBuffer(size: 2 * pmdSize, mirrorBytes: pmdSize)
            buffer.ptr = try mm.mmap(length: 2 * pmdSize, protection: .readWrite)
            let size = pmdSize
            let npages = size >> pageShift
            let map = (buffer.ptr + UInt64(size) - 1) & ~UInt64(size - 1)
            expect(sys { try mm.madvise(map, length: size, advice: .hugePage) } == 0, #"sys { try mm.madvise(map, length: size, advice: .hugePage) } == 0"#)
            let oldPtr = buffer.ptr
            buffer.ptr = map
            for i in 0..<(size / 4) { buffer.mirrorInts[i] = Int32(i) }

            expect(hmmCommand(f.dev0, .write, buffer, npages) == 0, #"hmmCommand(f.dev0, .write, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            expect(buffer.faults == 1, #"buffer.faults == 1"#)
            expect(firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { Int32($0) } == nil, #"firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { Int32($0) } == nil"#)
            // Emulator-side check of what the case is about: the device fault
            // allocated a THP mapped by a PMD.
            expect(mm.entry(at: map).level == .pmd, #"mm.entry(at: map).level == .pmd"#)
            try mm.munmap(oldPtr, length: 2 * pmdSize)
        }
    }

    /// Migrate anonymous memory to device private memory.
    func migrate(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            let npages = hmmBufferSize >> pageShift
            let size = npages << pageShift
            let buffer = HMMBuffer(size: size)
            buffer.ptr = try mm.mmap(length: size, protection: .readWrite)
            try storeInts(mm, buffer.ptr, count: size / 4) { Int32($0) }

            expect(hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0, #"hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            expect(firstMismatch(buffer.mirrorInts) { Int32($0) } == nil, #"firstMismatch(buffer.mirrorInts) { Int32($0) } == nil"#)
            expect(f.dev0.devicePagesInUse == UInt64(npages), #"f.dev0.devicePagesInUse == UInt64(npages)"#)
        }
    }

    /// Migrate to the device, fault half back, migrate the mix again.
    func migrate_fault(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            let npages = hmmBufferSize >> pageShift
            let size = npages << pageShift
            let buffer = HMMBuffer(size: size)
            buffer.ptr = try mm.mmap(length: size, protection: .readWrite)
            try storeInts(mm, buffer.ptr, count: size / 4) { Int32($0) }

            expect(hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0, #"hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            expect(firstMismatch(buffer.mirrorInts) { Int32($0) } == nil, #"firstMismatch(buffer.mirrorInts) { Int32($0) } == nil"#)

            // Fault half the pages back to system memory and check them.
            expect(firstMismatch(try loadInts(mm, buffer.ptr, count: size / 8)) { Int32($0) } == nil, #"firstMismatch(try loadInts(mm, buffer.ptr, count: size / 8)) { Int32($0) } == nil"#)

            // Migrate memory to the device again.
            buffer.mirror.initializeMemory(as: UInt8.self, repeating: 0)
            expect(hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0, #"hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            expect(firstMismatch(buffer.mirrorInts) { Int32($0) } == nil, #"firstMismatch(buffer.mirrorInts) { Int32($0) } == nil"#)
        }
    }

    /// Migrate to the device, release (evict) all device memory, fault back.
    func migrate_release(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            let npages = hmmBufferSize >> pageShift
            let size = npages << pageShift
            let buffer = HMMBuffer(size: size)
            buffer.ptr = try mm.mmap(length: size, protection: .readWrite)
            try storeInts(mm, buffer.ptr, count: size / 4) { Int32($0) }

            expect(hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0, #"hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            expect(firstMismatch(buffer.mirrorInts) { Int32($0) } == nil, #"firstMismatch(buffer.mirrorInts) { Int32($0) } == nil"#)

            expect(hmmCommand(f.dev0, .release, buffer, npages) == 0, #"hmmCommand(f.dev0, .release, buffer, npages) == 0"#)
            expect(f.dev0.devicePagesInUse == 0, #"f.dev0.devicePagesInUse == 0"#)
            expect(firstMismatch(try loadInts(mm, buffer.ptr, count: size / 8)) { Int32($0) } == nil, #"firstMismatch(try loadInts(mm, buffer.ptr, count: size / 8)) { Int32($0) } == nil"#)
        }
    }

    /// Migrating anonymous shared memory migrates nothing: -ENOENT.
    func migrate_shared(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            let npages = hmmBufferSize >> pageShift
            let size = npages << pageShift
            let buffer = HMMBuffer(size: size)
            buffer.ptr = try mm.mmap(length: size, protection: .readWrite, shared: true)

            expect(hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == -ENOENT, #"hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == -ENOENT"#)
            expect(f.dev0.devicePagesInUse == 0, #"f.dev0.devicePagesInUse == 0"#)
        }
    }

    /// Try to migrate various memory types to device private memory (hmm2).
    func migrate_mixed(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            let npages = 6
            let size = npages << pageShift
            let buffer = HMMBuffer(size: size)
            buffer.ptr = try mm.mmap(length: size, protection: .none)
            let p = buffer.ptr
            let page = UInt64(pageSize)

            // Migrating a protected area is an error.
            expect(hmmCommand(f.dev1, .migrateToDevice, buffer, npages) == -EINVAL, #"hmmCommand(f.dev1, .migrateToDevice, buffer, npages) == -EINVAL"#)
            // Punch a hole after the first page: the VMA no longer covers the range.
            expect(sys { try mm.munmap(p + page, length: pageSize) } == 0, #"sys { try mm.munmap(p + page, length: pageSize) } == 0"#)
            expect(hmmCommand(f.dev1, .migrateToDevice, buffer, 3) == -EINVAL, #"hmmCommand(f.dev1, .migrateToDevice, buffer, 3) == -EINVAL"#)

            // Page 2: a read-only zero page.
            expect(sys { try mm.mprotect(p + 2 * page, length: pageSize, protection: .read) } == 0, #"sys { try mm.mprotect(p + 2 * page, length: pageSize, protection: .read) } == 0"#)
            let val = try loadInt(mm, p + 2 * page, 0) + 3
            expect(val == 3, #"val == 3"#)
            // Page 3: read-only.
            expect(sys { try mm.mprotect(p + 3 * page, length: pageSize, protection: .readWrite) } == 0, #"sys { try mm.mprotect(p + 3 * page, length: pageSize, protection: .readWrite) } == 0"#)
            try storeInts(mm, p + 3 * page, count: 1) { _ in val }
            expect(sys { try mm.mprotect(p + 3 * page, length: pageSize, protection: .read) } == 0, #"sys { try mm.mprotect(p + 3 * page, length: pageSize, protection: .read) } == 0"#)
            // Pages 4-5: read-write.
            expect(sys { try mm.mprotect(p + 4 * page, length: 2 * pageSize, protection: .readWrite) } == 0, #"sys { try mm.mprotect(p + 4 * page, length: 2 * pageSize, protection: .readWrite) } == 0"#)
            try storeInts(mm, p + 4 * page, count: 1) { _ in val }
            try storeInts(mm, p + 5 * page, count: 1) { _ in val }

            // Now migrate pages 2-5 to device 1.
            buffer.ptr = p + 2 * page
            expect(hmmCommand(f.dev1, .migrateToDevice, buffer, 4) == 0, #"hmmCommand(f.dev1, .migrateToDevice, buffer, 4) == 0"#)
            expect(buffer.cpages == 4, #"buffer.cpages == 4"#)

            // Page 5 is not migrated to device 0: it is on device 1.
            buffer.ptr = p + 5 * page
            expect(hmmCommand(f.dev0, .migrateToDevice, buffer, 1) == -ENOENT, #"hmmCommand(f.dev0, .migrateToDevice, buffer, 1) == -ENOENT"#)
            buffer.ptr = p
        }
    }

    /// Migrate to the device and fault back by CPU access, NTIMES.
    func migrate_multiple(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            // NTIMES rounds of 1 MiB instead of HMM_BUFFER_SIZE (4 MiB): the
            // ConformanceTests target must stay fast on 2 cores in debug builds.
            let npages = (hmmBufferSize / 4) >> pageShift
            let size = npages << pageShift
            for _ in 0..<ntimes {
                let buffer = HMMBuffer(size: size)
                buffer.ptr = try mm.mmap(length: size, protection: .readWrite)
                try storeInts(mm, buffer.ptr, count: size / 4) { Int32($0) }

                expect(hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0, #"hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0"#)
                expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
                expect(firstMismatch(buffer.mirrorInts) { Int32($0) } == nil, #"firstMismatch(buffer.mirrorInts) { Int32($0) } == nil"#)
                // Device-private: back to system memory through CPU faults.
                expect(firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { Int32($0) } == nil, #"firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { Int32($0) } == nil"#)
                try mm.munmap(buffer.ptr, length: size)
            }
            expect(f.dev0.devicePagesInUse == 0, #"f.dev0.devicePagesInUse == 0"#)
        }
    }

    /// Read anonymous memory NTIMES.
    func anon_read_multiple(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            // NTIMES rounds of 1 MiB instead of HMM_BUFFER_SIZE (4 MiB): the
            // ConformanceTests target must stay fast on 2 cores in debug builds.
            let npages = (hmmBufferSize / 4) >> pageShift
            let size = npages << pageShift
            for c in 0..<ntimes {
                let buffer = HMMBuffer(size: size)
                buffer.ptr = try mm.mmap(length: size, protection: .readWrite)
                try storeInts(mm, buffer.ptr, count: size / 4) { Int32($0 + c) }

                expect(hmmCommand(f.dev0, .read, buffer, npages) == 0, #"hmmCommand(f.dev0, .read, buffer, npages) == 0"#)
                expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
                expect(buffer.faults == 1, #"buffer.faults == 1"#)
                expect(firstMismatch(buffer.mirrorInts) { Int32($0 + c) } == nil, #"firstMismatch(buffer.mirrorInts) { Int32($0 + c) } == nil"#)
                try mm.munmap(buffer.ptr, length: size)
            }
        }
    }

    /// Read anonymous memory while another thread unmaps half of it.
    func anon_teardown(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            // NTIMES rounds of 1 MiB instead of HMM_BUFFER_SIZE (4 MiB): the
            // ConformanceTests target must stay fast on 2 cores in debug builds.
            let npages = (hmmBufferSize / 4) >> pageShift
            let size = npages << pageShift
            var succeeded = 0
            for c in 0..<ntimes {
                let buffer = HMMBuffer(size: size)
                buffer.ptr = try mm.mmap(length: size, protection: .readWrite)
                try storeInts(mm, buffer.ptr, count: size / 4) { Int32($0 + c) }

                // unmap_buffer(): sleep a random 0-32 us, then unmap the second half.
                let half = buffer.ptr + UInt64(size / 2)
                let done = DispatchSemaphore(value: 0)
                let unmapper = Thread {
                    var t = timespec(tv_sec: 0, tv_nsec: Int.random(in: 0..<32_000))
                    nanosleep(&t, nil)
                    _ = try? mm.munmap(half, length: size / 2)
                    done.signal()
                }
                unmapper.start()

                let rc = hmmCommand(f.dev0, .read, buffer, npages)
                if rc == 0 {
                    succeeded += 1
                    expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
                    expect(buffer.faults == 1, #"buffer.faults == 1"#)
                    expect(firstMismatch(buffer.mirrorInts) { Int32($0 + c) } == nil, #"firstMismatch(buffer.mirrorInts) { Int32($0 + c) } == nil"#)
                } else {
                    // What the read can run into: the unmapped half.
                    expect(rc == -EFAULT, #"rc == -EFAULT"#)
                }
                // pthread_join, bounded.
                expect(done.wait(timeout: .now() + 10) == .success, #"done.wait(timeout: .now() + 10) == .success"#)
                try mm.munmap(buffer.ptr, length: size)
            }
            _ = succeeded
            expect(f.kernel.diagnostics.isEmpty, #"f.kernel.diagnostics.isEmpty"#)
        }
    }

    /// Snapshot the CPU page tables without faulting (hmm2).
    func snapshot(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            let npages = 7
            let size = npages << pageShift
            let buffer = HMMBuffer(size: size, mirrorBytes: npages)
            buffer.ptr = try mm.mmap(length: size, protection: .none)
            let p = buffer.ptr
            let page = UInt64(pageSize)

            // Punch a hole after the first page.
            expect(sys { try mm.munmap(p + page, length: pageSize) } == 0, #"sys { try mm.munmap(p + page, length: pageSize) } == 0"#)
            // Page 2: read-only zero page.
            expect(sys { try mm.mprotect(p + 2 * page, length: pageSize, protection: .read) } == 0, #"sys { try mm.mprotect(p + 2 * page, length: pageSize, protection: .read) } == 0"#)
            let val = try loadInt(mm, p + 2 * page, 0) + 3
            expect(val == 3, #"val == 3"#)
            // Page 3: read-only.
            expect(sys { try mm.mprotect(p + 3 * page, length: pageSize, protection: .readWrite) } == 0, #"sys { try mm.mprotect(p + 3 * page, length: pageSize, protection: .readWrite) } == 0"#)
            try storeInts(mm, p + 3 * page, count: 1) { _ in val }
            expect(sys { try mm.mprotect(p + 3 * page, length: pageSize, protection: .read) } == 0, #"sys { try mm.mprotect(p + 3 * page, length: pageSize, protection: .read) } == 0"#)
            // Pages 4-6: read-write.
            expect(sys { try mm.mprotect(p + 4 * page, length: 3 * pageSize, protection: .readWrite) } == 0, #"sys { try mm.mprotect(p + 4 * page, length: 3 * pageSize, protection: .readWrite) } == 0"#)
            try storeInts(mm, p + 4 * page, count: 1) { _ in val }

            // Page 5 to device 0, page 6 to device 1.
            buffer.ptr = p + 5 * page
            expect(hmmCommand(f.dev0, .migrateToDevice, buffer, 1) == 0, #"hmmCommand(f.dev0, .migrateToDevice, buffer, 1) == 0"#)
            expect(buffer.cpages == 1, #"buffer.cpages == 1"#)
            buffer.ptr = p + 6 * page
            expect(hmmCommand(f.dev1, .migrateToDevice, buffer, 1) == 0, #"hmmCommand(f.dev1, .migrateToDevice, buffer, 1) == 0"#)
            expect(buffer.cpages == 1, #"buffer.cpages == 1"#)

            buffer.ptr = p
            expect(hmmCommand(f.dev0, .snapshot, buffer, npages) == 0, #"hmmCommand(f.dev0, .snapshot, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            let m = buffer.mirrorBytes
            expect(m[0] == DMirrorProt.error, #"m[0] == DMirrorProt.error"#)
            expect(m[1] == DMirrorProt.error, #"m[1] == DMirrorProt.error"#)
            expect(m[2] == DMirrorProt.zero | DMirrorProt.read, #"m[2] == DMirrorProt.zero | DMirrorProt.read"#)
            expect(m[3] == DMirrorProt.read, #"m[3] == DMirrorProt.read"#)
            expect(m[4] == DMirrorProt.write, #"m[4] == DMirrorProt.write"#)
            if variant.isCoherent {
                // Coherent pages are mapped by normal PTEs: the other device sees them too.
                expect(m[5] == DMirrorProt.deviceCoherentLocal | DMirrorProt.write, #"m[5] == DMirrorProt.deviceCoherentLocal | DMirrorProt.write"#)
                expect(m[6] == DMirrorProt.deviceCoherentRemote | DMirrorProt.write, #"m[6] == DMirrorProt.deviceCoherentRemote | DMirrorProt.write"#)
            } else {
                expect(m[5] == DMirrorProt.devicePrivateLocal | DMirrorProt.write, #"m[5] == DMirrorProt.devicePrivateLocal | DMirrorProt.write"#)
                expect(m[6] == DMirrorProt.none, #"m[6] == DMirrorProt.none"#)
            }
        }
    }

    /// Two devices reading the same memory (hmm2).
    func double_map(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            let npages = 6
            let size = npages << pageShift
            let buffer = HMMBuffer(size: size)
            buffer.ptr = try mm.mmap(length: size, protection: .readWrite)
            try storeInts(mm, buffer.ptr, count: size / 4) { Int32($0) }
            expect(sys { try mm.mprotect(buffer.ptr, length: size, protection: .read) } == 0, #"sys { try mm.mprotect(buffer.ptr, length: size, protection: .read) } == 0"#)

            expect(hmmCommand(f.dev0, .read, buffer, npages) == 0, #"hmmCommand(f.dev0, .read, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            expect(buffer.faults == 1, #"buffer.faults == 1"#)
            expect(firstMismatch(buffer.mirrorInts) { Int32($0) } == nil, #"firstMismatch(buffer.mirrorInts) { Int32($0) } == nil"#)

            buffer.mirror.initializeMemory(as: UInt8.self, repeating: 0)
            expect(hmmCommand(f.dev1, .read, buffer, npages) == 0, #"hmmCommand(f.dev1, .read, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            expect(buffer.faults == 1, #"buffer.faults == 1"#)
            expect(firstMismatch(buffer.mirrorInts) { Int32($0) } == nil, #"firstMismatch(buffer.mirrorInts) { Int32($0) } == nil"#)

            // Migrate the pages to device 1 and read them from device 0.
            expect(hmmCommand(f.dev1, .migrateToDevice, buffer, npages) == 0, #"hmmCommand(f.dev1, .migrateToDevice, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)

            buffer.mirror.initializeMemory(as: UInt8.self, repeating: 0)
            expect(hmmCommand(f.dev0, .read, buffer, npages) == 0, #"hmmCommand(f.dev0, .read, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            expect(buffer.faults == 1, #"buffer.faults == 1"#)
            expect(firstMismatch(buffer.mirrorInts) { Int32($0) } == nil, #"firstMismatch(buffer.mirrorInts) { Int32($0) } == nil"#)
        }
    }

}
