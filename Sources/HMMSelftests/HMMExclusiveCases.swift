import Foundation
import Synchronization
import SVMEmu
import MirrorDriver

/// The hmm-tests device-exclusive cases (exclusive, exclusive_mprotect,
/// exclusive_cow) and a device atomic storm against CPU writers.
/// The time limit only catches a hang: under ThreadSanitizer on a small host
/// these cases wait their turn behind the THP cases for over a minute.
struct HMMExclusiveCases {

    /// The buffer every case starts from: HMM_BUFFER_SIZE of private
    /// anonymous memory holding i, taken for device atomics.
    private func exclusiveBuffer(_ f: HMMFixture) throws -> (HMMBuffer, Int) {
        let mm = f.mm!
        let npages = hmmBufferSize >> pageShift
        let buffer = try countingBuffer(mm, npages: npages)

        expect(hmmCommand(f.dev0, .exclusive, buffer, npages) == 0, #"hmmCommand(f.dev0, .exclusive, buffer, npages) == 0"#)
        expect(buffer.cpages == npages, #"buffer.cpages == npages"#)
        expect(firstMismatch(buffer.mirrorInts) { Int32($0) } == nil, #"firstMismatch(buffer.mirrorInts) { Int32($0) } == nil"#)
        // One device-exclusive entry type since v6.15: it keeps no write
        // permission (the restore takes it from the VMA).
        let e = mm.entry(at: buffer.ptr).entry
        expect(e.kind == .deviceExclusive && !e.isWrite, #"e.kind == .deviceExclusive && !e.isWrite"#)
        expect(hmmCommand(f.dev0, .checkExclusive, buffer, npages) == -EPERM, #"hmmCommand(f.dev0, .checkExclusive, buffer, npages) == -EPERM"#)
        return (buffer, npages)
    }

    /// `ptr[i]++` over the buffer, checking the old value is `i`, then that
    /// every int is `i + 1`: what the CPU side of the exclusive cases does.
    private func incrementAndCheck(_ mm: AddressSpace, _ buffer: HMMBuffer) throws {
        let count = buffer.size / 4
        let old = try loadInts(mm, buffer.ptr, count: count)
        expect(firstMismatch(old) { Int32($0) } == nil, #"firstMismatch(old) { Int32($0) } == nil"#)
        try storeInts(mm, buffer.ptr, count: count) { old[$0] + 1 }
        expect(firstMismatch(try loadInts(mm, buffer.ptr, count: count)) { Int32($0 + 1) } == nil, #"firstMismatch(try loadInts(mm, buffer.ptr, count: count)) { Int32($0 + 1) } == nil"#)
    }

    /// Basic check of exclusive faulting.
    func exclusive(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let (buffer, npages) = try exclusiveBuffer(f)
            // Fault pages back to system memory and check them.
            try incrementAndCheck(f.mm, buffer)
            // Check atomic access revoked.
            expect(hmmCommand(f.dev0, .checkExclusive, buffer, npages) == 0, #"hmmCommand(f.dev0, .checkExclusive, buffer, npages) == 0"#)
            expect(f.kernel.vmstat[.deviceExclusiveRestored] >= UInt64(npages), #"f.kernel.vmstat[.deviceExclusiveRestored] >= UInt64(npages)"#)
            expect(f.kernel.diagnostics.isEmpty, #"f.kernel.diagnostics.isEmpty"#)
        }
    }

    /// mprotect(PROT_READ) over exclusive pages: the device may no longer write.
    func exclusive_mprotect(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let (buffer, npages) = try exclusiveBuffer(f)
            expect(sys { try f.mm.mprotect(buffer.ptr, length: buffer.size, protection: .read) } == 0, #"sys { try f.mm.mprotect(buffer.ptr, length: buffer.size, protection: .read) } == 0"#)
            // Simulate a device writing system memory.
            expect(hmmCommand(f.dev0, .write, buffer, npages) == -EPERM, #"hmmCommand(f.dev0, .write, buffer, npages) == -EPERM"#)
            expect(f.kernel.diagnostics.isEmpty, #"f.kernel.diagnostics.isEmpty"#)
        }
    }

    /// Check copy-on-write works: fork with exclusive pages restores them
    /// in the parent and shares them; each process then writes its own copy.
    func exclusive_cow(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let (buffer, npages) = try exclusiveBuffer(f)
            let child = try f.mm.fork()
            // fork's MMU_NOTIFY_PROTECTION_PAGE took the atomic mappings away.
            expect(hmmCommand(f.dev0, .checkExclusive, buffer, npages) == 0, #"hmmCommand(f.dev0, .checkExclusive, buffer, npages) == 0"#)
            try incrementAndCheck(f.mm, buffer)
            try incrementAndCheck(child, buffer)
            expect(f.kernel.diagnostics.isEmpty, #"f.kernel.diagnostics.isEmpty"#)
        }
    }

}
