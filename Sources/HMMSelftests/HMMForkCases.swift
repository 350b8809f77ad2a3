import Foundation
import Synchronization
import SVMEmu
import MirrorDriver

/// The hmm-tests cases that fork (anon_write_child, anon_write_child_shared,
/// hmm_cow_in_device), and a fork that lands in the middle of a migration.
/// A child process is a second `AddressSpace` made by `fork()`; "the child
/// exits" is the child address space going away.
/// The time limit only catches a hang: under ThreadSanitizer on a small host
/// these cases wait their turn behind the THP cases for over a minute.
struct HMMForkCases {

    /// anon_write_child_shared's shape: the parent fills the
    /// buffer with i, forks; the child sees i, opens its own mirror of its
    /// own mm, and the device writes -i there (one fault pass, every page).
    /// Returns the parent's ints after the child exits.
    private func writeFromChild(_ f: HMMFixture, shared: Bool) throws -> [Int32] {
        let mm = f.mm!
        let npages = hmmBufferSize >> pageShift
        let size = npages << pageShift
        let buffer = try countingBuffer(mm, npages: npages, shared: shared)
        for i in 0..<(size / 4) { buffer.mirrorInts[i] = Int32(-i) }

        do {
            let child = try mm.fork()
            expect(firstMismatch(try loadInts(child, buffer.ptr, count: size / 4)) { Int32($0) } == nil, #"firstMismatch(try loadInts(child, buffer.ptr, count: size / 4)) { Int32($0) } == nil"#)
            let childDevice = try MirrorDevice(kernel: f.kernel, mm: child, name: "hmm_dmirror0", vramBytes: 64 << 20, chunkBytes: 32 << 20)
            expect(hmmCommand(childDevice, .write, buffer, npages) == 0, #"hmmCommand(childDevice, .write, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            expect(buffer.faults == 1, #"buffer.faults == 1"#)
            expect(firstMismatch(try loadInts(child, buffer.ptr, count: size / 4)) { Int32(-$0) } == nil, #"firstMismatch(try loadInts(child, buffer.ptr, count: size / 4)) { Int32(-$0) } == nil"#)
        }
        return try loadInts(mm, buffer.ptr, count: size / 4)
    }

    /// Check that a device writing an anonymous private mapping will
    /// copy-on-write if a child process inherits the mapping; also that the
    /// child can read memory that was in device memory when it forked. As in
    /// the kernel's current test: once with the pages in system memory and
    /// once migrated to the device first, each with 4 KiB pages and with a
    /// THP (a 2 MiB-aligned MADV_HUGEPAGE buffer of one PMD).
    func anon_write_child(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            for migrate in [false, true] {
                for useTHP in [false, true] {
                    let size = useTHP ? pmdSize : hmmBufferSize
                    let npages = size >> pageShift
                    let buffer = HMMBuffer(size: 2 * size, mirrorBytes: size)
                    buffer.ptr = try mm.mmap(length: 2 * size, protection: .readWrite)
                    let oldPtr = buffer.ptr
                    if useTHP {
                        let map = (buffer.ptr + UInt64(size) - 1) & ~UInt64(size - 1)
                        expect(sys { try mm.madvise(map, length: size, advice: .hugePage) } == 0, #"sys { try mm.madvise(map, length: size, advice: .hugePage) } == 0"#)
                        buffer.ptr = map
                    }
                    try storeInts(mm, buffer.ptr, count: size / 4) { Int32($0) }
                    for i in 0..<(size / 4) { buffer.mirrorInts[i] = Int32(-i) }
                    if migrate {
                        expect(hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0, #"hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0"#)
                        expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
                    }

                    do {
                        let child = try mm.fork()
                        // The child sees the parent's values (faulting device pages back).
                        expect(firstMismatch(try loadInts(child, buffer.ptr, count: size / 4)) { Int32($0) } == nil, #"firstMismatch(try loadInts(child, buffer.ptr, count: size / 4)) { Int32($0) } == nil"#, "migrate \(migrate) thp \(useTHP): child reads")
                        if !migrate {
                            expect(firstMismatch(buffer.mirrorInts.prefix(size / 4)) { Int32(-$0) } == nil, #"firstMismatch(buffer.mirrorInts.prefix(size / 4)) { Int32(-$0) } == nil"#)
                        }
                        let childDevice = try MirrorDevice(kernel: f.kernel, mm: child, name: "hmm_dmirror0",
                                                       vramBytes: 64 << 20, chunkBytes: 32 << 20)
                        expect(hmmCommand(childDevice, .write, buffer, npages) == 0, #"hmmCommand(childDevice, .write, buffer, npages) == 0"#)
                        expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
                        expect(buffer.faults == 1, #"buffer.faults == 1"#)
                        if !migrate {
                            expect(firstMismatch(try loadInts(child, buffer.ptr, count: size / 4)) { Int32(-$0) } == nil, #"firstMismatch(try loadInts(child, buffer.ptr, count: size / 4)) { Int32(-$0) } == nil"#)
                        }
                    }
                    // The child has exited: the parent's buffer did not change.
                    expect(firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { Int32($0) } == nil, #"firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { Int32($0) } == nil"#, "migrate \(migrate) thp \(useTHP): parent's buffer")
                    try mm.munmap(oldPtr, length: 2 * size)
                }
            }
            expect(f.kernel.vmstat[.cowFaults] >= UInt64(hmmBufferSize >> pageShift), #"f.kernel.vmstat[.cowFaults] >= UInt64(hmmBufferSize >> pageShift)"#)
            expect(f.kernel.diagnostics.isEmpty, #"f.kernel.diagnostics.isEmpty"#)
        }
    }

    /// Check that a device writing an anonymous shared mapping will not
    /// copy-on-write if a child process inherits the mapping.
    func anon_write_child_shared(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let parent = try writeFromChild(f, shared: true)
            expect(firstMismatch(parent) { Int32(-$0) } == nil, #"firstMismatch(parent) { Int32(-$0) } == nil"#)
            expect(f.kernel.vmstat[.cowFaults] == 0, #"f.kernel.vmstat[.cowFaults] == 0"#)
            expect(f.kernel.diagnostics.isEmpty, #"f.kernel.diagnostics.isEmpty"#)
        }
    }

    /// Test copy-on-write in device pages: the pages are in device memory
    /// when the process forks; the parent's writes fault them back to
    /// system memory, then copy them; the parent ends with writable pages.
    func hmm_cow_in_device(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            let npages = 4
            let size = npages << pageShift
            let buffer = try countingBuffer(mm, npages: npages)

            expect(hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0, #"hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)

            var child: AddressSpace? = try mm.fork()
            // Both map the device pages, read-only now.
            for i in 0..<npages {
                let a = buffer.ptr + UInt64(i << pageShift)
                for space in [mm, child!] {
                    let e = space.entry(at: a).entry
                    expect(e.kind == (variant.isCoherent ? .present : .devicePrivate) && !e.isWrite, #"e.kind == (variant.isCoherent ? .present : .devicePrivate) && !e.isWrite"#)
                }
            }
            // The parent writes: each device-private page migrates back, then
            // is copied; a coherent page is copied from device memory directly.
            try storeInts(mm, buffer.ptr, count: size / 4) { Int32($0) }
            expect(firstMismatch(try loadInts(child!, buffer.ptr, count: size / 4)) { Int32($0) } == nil, #"firstMismatch(try loadInts(child!, buffer.ptr, count: size / 4)) { Int32($0) } == nil"#)
            child = nil  // kill(pid, SIGTERM); waitpid()

            expect(hmmCommand(f.dev0, .snapshot, buffer, npages) == 0, #"hmmCommand(f.dev0, .snapshot, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            for i in 0..<npages { expect(buffer.mirrorBytes[i] == DMirrorProt.write, #"buffer.mirrorBytes[i] == DMirrorProt.write"#) }
            expect(firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { Int32($0) } == nil, #"firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { Int32($0) } == nil"#)
            expect(f.kernel.diagnostics.isEmpty, #"f.kernel.diagnostics.isEmpty"#)
        }
    }

}
