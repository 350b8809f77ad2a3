import Foundation
import Synchronization
import Testing
import SVMEmu
import MirrorDriver
import HMMSelftests
import TestSupport

/// The hmm-tests device-exclusive cases (exclusive, exclusive_mprotect,
/// exclusive_cow) and a device atomic storm against CPU writers.
/// The time limit only catches a hang: under ThreadSanitizer on a small host
/// these cases wait their turn behind the THP cases for over a minute.
@Suite("hmm-tests exclusive", .timeLimit(.minutes(10)))
struct HMMExclusiveTests {

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
