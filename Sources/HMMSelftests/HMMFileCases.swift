import Foundation
import SVMEmu
import MirrorDriver
#if canImport(Glibc)
import Glibc
#endif

/// hmm_create_file(): an unlinked temporary file (O_TMPFILE) of `size`
/// bytes (ftruncate), on the emulator's page cache.
func hmmCreateFile(_ kernel: Kernel, size: Int) throws -> File {
    let file = File(kernel: kernel)
    try file.truncate(to: Int64(size))
    return file
}

/// The file cases' preamble: npages of HMM_BUFFER_SIZE, a file of that
/// size (hmm_create_file), and a buffer for it (not mapped yet).
private func fileBuffer(_ f: HMMFixture) throws -> (npages: Int, size: Int, file: File, buffer: HMMBuffer) {
    let npages = hmmBufferSize >> pageShift
    let size = npages << pageShift
    return (npages, size, try hmmCreateFile(f.kernel, size: size), HMMBuffer(size: size))
}

/// The hmm-tests cases on file-backed memory (file_read, file_write,
/// migrate_file_private) and on a driver's own mapping (mixedmap), in both
/// fixture variants, with the kernel's expectations.
struct HMMFileCases {

    /// Read mmap'ed file memory.
    func file_read(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            let (npages, size, file, buffer) = try fileBuffer(f)

            // Write initial contents of the file.
            for i in 0..<(size / 4) { buffer.mirrorInts[i] = Int32(i) }
            expect(try file.pwrite(from: UnsafeRawBufferPointer(buffer.mirror), offset: 0) == size, #"try file.pwrite(from: UnsafeRawBufferPointer(buffer.mirror), offset: 0) == size"#)
            buffer.mirror.initializeMemory(as: UInt8.self, repeating: 0)

            buffer.ptr = try mm.mmap(length: size, protection: .read, shared: true, file: file)

            // Simulate a device reading system memory.
            expect(hmmCommand(f.dev0, .read, buffer, npages) == 0, #"hmmCommand(f.dev0, .read, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            expect(buffer.faults == 1, #"buffer.faults == 1"#)

            // Check what the device read.
            expect(firstMismatch(buffer.mirrorInts) { Int32($0) } == nil, #"firstMismatch(buffer.mirrorInts) { Int32($0) } == nil"#)

            // hmm_buffer_free(): munmap and close; the page cache keeps only
            // its own reference on every page.
            try mm.munmap(buffer.ptr, length: size)
            expect(file.cachedPageCount == npages, #"file.cachedPageCount == npages"#)
            expect(file.cachedFolio(at: 0).map { $0.refCount == 1 && $0.mapCount == 0 } == true, #"file.cachedFolio(at: 0).map { $0.refCount == 1 && $0.mapCount == 0 } == true"#)
            expect(f.kernel.diagnostics.isEmpty, #"f.kernel.diagnostics.isEmpty"#)
        }
    }

    /// Write mmap'ed file memory.
    func file_write(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            let (npages, size, file, buffer) = try fileBuffer(f)
            buffer.ptr = try mm.mmap(length: size, protection: .readWrite, shared: true, file: file)

            // Initialize data that the device will write to buffer->ptr.
            for i in 0..<(size / 4) { buffer.mirrorInts[i] = Int32(i) }

            // Simulate a device writing system memory.
            expect(hmmCommand(f.dev0, .write, buffer, npages) == 0, #"hmmCommand(f.dev0, .write, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
            expect(buffer.faults == 1, #"buffer.faults == 1"#)

            // Check what the device wrote.
            expect(firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { Int32($0) } == nil, #"firstMismatch(try loadInts(mm, buffer.ptr, count: size / 4)) { Int32($0) } == nil"#)

            // Check that the device also wrote the file.
            buffer.mirror.initializeMemory(as: UInt8.self, repeating: 0)
            expect(try file.pread(into: buffer.mirror, offset: 0) == size, #"try file.pread(into: buffer.mirror, offset: 0) == size"#)
            expect(firstMismatch(buffer.mirrorInts) { Int32($0) } == nil, #"firstMismatch(buffer.mirrorInts) { Int32($0) } == nil"#)
            // The write faults dirtied the page-cache folios themselves.
            expect(file.cachedFolio(at: UInt64(npages - 1))?.isDirty == true, #"file.cachedFolio(at: UInt64(npages - 1))?.isDirty == true"#)
            expect(f.kernel.diagnostics.isEmpty, #"f.kernel.diagnostics.isEmpty"#)
        }
    }

    /// Migrate private file memory to device private memory.
    func migrate_file_private(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let mm = f.mm!
            let (npages, size, file, buffer) = try fileBuffer(f)
            buffer.ptr = try mm.mmap(length: size, protection: .readWrite, shared: false, file: file)

            // Initialize buffer in system memory (each page a private copy).
            try storeInts(mm, buffer.ptr, count: size / 4) { Int32($0) }

            // Migrate memory to device.
            expect(hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0, #"hmmCommand(f.dev0, .migrateToDevice, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)

            // Check what the device read.
            expect(firstMismatch(buffer.mirrorInts) { Int32($0) } == nil, #"firstMismatch(buffer.mirrorInts) { Int32($0) } == nil"#)

            // The file never saw the private stores.
            var first = [UInt8](repeating: 0xAA, count: 16)
            expect(try first.withUnsafeMutableBytes { try file.pread(into: $0, offset: 4) } == 16, #"try first.withUnsafeMutableBytes { try file.pread(into: $0, offset: 4) } == 16"#)
            expect(first.allSatisfy { $0 == 0 }, #"first.allSatisfy { $0 == 0 }"#)

            // hmm_buffer_free(): the munmap zaps device entries of a file
            // VMA (the kernel's zap_nonpresent_ptes() warning this case was
            // added for must stay silent).
            try mm.munmap(buffer.ptr, length: size)
            expect(f.dev0.devicePagesInUse == 0, #"f.dev0.devicePagesInUse == 0"#)
            expect(f.kernel.diagnostics.isEmpty, #"f.kernel.diagnostics.isEmpty"#)
        }
    }

    /// Test memory snapshot without faulting in pages accessed by the device.
    func mixedmap(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let npages = 1
            let size = npages << pageShift
            let buffer = HMMBuffer(size: size, mirrorBytes: npages)

            // Reserve a range of addresses: mmap of the dmirror device itself.
            buffer.ptr = try f.dev0.mmap(length: size, protection: .readWrite, shared: false)
            expect(f.mm.mappings.first { $0.contains(buffer.ptr) }?.flags.contains(.mixedMap) == true, #"f.mm.mappings.first { $0.contains(buffer.ptr) }?.flags.contains(.mixedMap) == true"#)

            // Simulate a device snapshotting CPU pagetables.
            expect(hmmCommand(f.dev0, .snapshot, buffer, npages) == 0, #"hmmCommand(f.dev0, .snapshot, buffer, npages) == 0"#)
            expect(buffer.cpages == npages, #"buffer.cpages == npages"#)

            // Check what the device saw.
            expect(buffer.mirrorBytes[0] == DMirrorProt.read, #"buffer.mirrorBytes[0] == DMirrorProt.read"#)

            try f.mm.munmap(buffer.ptr, length: size)
            expect(f.kernel.diagnostics.isEmpty, #"f.kernel.diagnostics.isEmpty"#)
        }
    }

}
