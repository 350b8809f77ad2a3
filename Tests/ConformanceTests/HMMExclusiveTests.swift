import Foundation
import Synchronization
import Testing
import SVMEmu
import MirrorDriver
import TestSupport

/// The hmm-tests device-exclusive cases (exclusive, exclusive_mprotect,
/// exclusive_cow) and a device atomic storm against CPU writers.
/// The time limit only catches a hang: under ThreadSanitizer on a small host
/// these cases wait their turn behind the THP cases for over a minute.
@Suite("hmm-tests exclusive", .timeLimit(.minutes(3)))
struct HMMExclusiveTests {

    /// The buffer every case starts from: HMM_BUFFER_SIZE of private
    /// anonymous memory holding i, taken for device atomics.
    private func exclusiveBuffer(_ f: HMMFixture) throws -> (HMMBuffer, Int) {
        let mm = f.mm!
        let npages = hmmBufferSize >> pageShift
        let buffer = try countingBuffer(mm, npages: npages)

        #expect(hmmCommand(f.dev0, .exclusive, buffer, npages) == 0)
        #expect(buffer.cpages == npages)
        #expect(firstMismatch(buffer.mirrorInts) { Int32($0) } == nil)
        // One device-exclusive entry type since v6.15: it keeps no write
        // permission (the restore takes it from the VMA).
        let e = mm.entry(at: buffer.ptr).entry
        #expect(e.kind == .deviceExclusive && !e.isWrite)
        #expect(hmmCommand(f.dev0, .checkExclusive, buffer, npages) == -EPERM)
        return (buffer, npages)
    }

    /// `ptr[i]++` over the buffer, checking the old value is `i`, then that
    /// every int is `i + 1`: what the CPU side of the exclusive cases does.
    private func incrementAndCheck(_ mm: AddressSpace, _ buffer: HMMBuffer) throws {
        let count = buffer.size / 4
        let old = try loadInts(mm, buffer.ptr, count: count)
        #expect(firstMismatch(old) { Int32($0) } == nil)
        try storeInts(mm, buffer.ptr, count: count) { old[$0] + 1 }
        #expect(firstMismatch(try loadInts(mm, buffer.ptr, count: count)) { Int32($0 + 1) } == nil)
    }

    /// Basic check of exclusive faulting.
    @Test(arguments: HMMVariant.allCases) func exclusive(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let (buffer, npages) = try exclusiveBuffer(f)
            // Fault pages back to system memory and check them.
            try incrementAndCheck(f.mm, buffer)
            // Check atomic access revoked.
            #expect(hmmCommand(f.dev0, .checkExclusive, buffer, npages) == 0)
            #expect(f.kernel.vmstat[.deviceExclusiveRestored] >= UInt64(npages))
            #expect(f.kernel.diagnostics.isEmpty)
        }
    }

    /// mprotect(PROT_READ) over exclusive pages: the device may no longer write.
    @Test(arguments: HMMVariant.allCases) func exclusive_mprotect(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let (buffer, npages) = try exclusiveBuffer(f)
            #expect(sys { try f.mm.mprotect(buffer.ptr, length: buffer.size, protection: .read) } == 0)
            // Simulate a device writing system memory.
            #expect(hmmCommand(f.dev0, .write, buffer, npages) == -EPERM)
            #expect(f.kernel.diagnostics.isEmpty)
        }
    }

    /// Check copy-on-write works: fork with exclusive pages restores them
    /// in the parent and shares them; each process then writes its own copy.
    @Test(arguments: HMMVariant.allCases) func exclusive_cow(_ variant: HMMVariant) throws {
        try withHMM(variant) { f in
            let (buffer, npages) = try exclusiveBuffer(f)
            let child = try f.mm.fork()
            // fork's MMU_NOTIFY_PROTECTION_PAGE took the atomic mappings away.
            #expect(hmmCommand(f.dev0, .checkExclusive, buffer, npages) == 0)
            try incrementAndCheck(f.mm, buffer)
            try incrementAndCheck(child, buffer)
            #expect(f.kernel.diagnostics.isEmpty)
        }
    }

    /// A device adds to the first word of each page with atomics while one
    /// CPU thread increments the same word with a plain load and store, and
    /// another CPU thread its own word of the page. The device may add only
    /// while the page is device-exclusive, a CPU may store only while it maps
    /// the page, and the two never overlap (the conversion flushes the CPUs'
    /// TLBs; the restore waits for the device through its notifier), so no
    /// increment is lost: the shared word ends at exactly the sum of both
    /// sides' increments, the CPU-only word at its thread's.
    @Test func atomic_storm_against_cpu_writers() throws {
        try withHMM { f in
            let mm = f.mm!, dev = f.dev0!
            let pages = 8
            let base = try mm.mmap(length: pages << pageShift, protection: .readWrite)
            for p in 0..<pages { try mm.store64(base + UInt64(p << pageShift), 0) }
            let cpuThreads = 2, cpuRounds = 300, gpuRounds = 150
            let gpuAdds = (0..<pages).map { _ in SharedCounter() }
            let ok = runThreads(cpuThreads + 1, timeout: 30, keepAlive: [mm, dev]) { t in
                if t == cpuThreads {
                    for _ in 0..<gpuRounds {
                        try? dev.mapExclusive(base, base + UInt64(pages << pageShift))
                        for p in 0..<pages where dev.atomicAdd(base + UInt64(p << pageShift), 1) { gpuAdds[p].add() }
                    }
                    return
                }
                for _ in 0..<cpuRounds {
                    for p in 0..<pages {
                        _ = try? mm.withPageBytes(at: base + UInt64(p << pageShift + t * 8), write: true) { w in
                            w.storeBytes(of: w.load(as: UInt64.self) &+ 1, as: UInt64.self)
                        }
                    }
                }
            }
            #expect(ok)
            for p in 0..<pages {
                let page = base + UInt64(p << pageShift)
                #expect(try mm.load64(page) == UInt64(cpuRounds + gpuAdds[p].current))
                #expect(try mm.load64(page + 8) == UInt64(cpuRounds))
            }
            #expect(gpuAdds.reduce(0) { $0 + $1.current } > 0)
            #expect(f.kernel.diagnostics.isEmpty)
        }
    }
}
