// Where the multi-threaded folio copy stops paying: the copy of one batch of
// n folios (4 KiB, and one 2 MiB folio) by the single-thread copier against
// the multi-threaded one with its threshold off, batch after batch as the
// move phase of one migratePages run calls it (blocks of batches between the
// copier's begin() and end()), over two working sets: one that stays in the host's
// last-level cache and one that streams from DRAM. Beside them, this host's
// own two-thread memcpy of the same batches (`TwoThreadMemcpy`): the most
// that splitting a batch in two can give here.

import SVMEmu

/// One point of the copier sweep.
public struct NUMACopyPoint: Sendable, Codable {
    /// Folio size in bytes (4 KiB or 2 MiB) and folios per batch.
    public var folioBytes: Int
    /// Folios per batch.
    public var folios: Int
    /// Bytes of the source ring the batches walk (the destination ring is as
    /// large): `cacheRingBytes` stays in the last-level cache, `memoryRingBytes`
    /// streams from DRAM, where one core may already use most of the bandwidth.
    public var ringBytes: Int
    /// Median time to copy one batch, single thread and with `threads` threads.
    public var singleMicros: Double
    /// The multi-threaded copier's median, microseconds.
    public var multiMicros: Double
    /// The multi-threaded copier's threads.
    public var threads: Int
    /// singleMicros / multiMicros: above 1 the threads pay.
    public var speedup: Double
    /// Median time of the same batch copied by this host's own two-thread
    /// memcpy (half on each thread), and twoThreadMicros / multiMicros: the
    /// copier's speed as a share of it (1 = as fast as a plain split).
    public var twoThreadMicros: Double = 0
    /// twoThreadMicros / multiMicros.
    public var ratioToTwoThread: Double = 0
    /// The share of the copier's batches at this point that it split
    /// across its threads (the rest it copied alone: splitting was slower).
    public var splitShare: Double = 1
}

extension NUMABench {
    /// The batch sizes (in 4 KiB folios) the copier sweep measures, and one 2 MiB folio.
    public static let copySweepFolios = [1, 4, 8, 16, 32, 64, 128, 256, 512]
    /// The working sets of the copier sweep: 2 x 8 MiB fits a 32 MiB
    /// last-level cache; 2 x 256 MiB does not fit any.
    public static let cacheRingBytes = 8 << 20
    /// The working set that streams from DRAM.
    public static let memoryRingBytes = 256 << 20

    /// Times batch copies between frames of the kind emulated RAM uses
    /// (`Kernel.reserveFrames`, written once so no host first-touch fault
    /// is timed), alternating the single-thread copier, the multi-threaded
    /// one and the host's two-thread memcpy in blocks of ``copySweepBlock``
    /// batches so that host load hits them alike; each point is the median
    /// of `repeats` batches (rounded up to whole blocks).
    /// Every shape is measured on both working sets (`cacheRingBytes`,
    /// `memoryRingBytes`), each with a fresh multi-threaded copier (its
    /// choice between splitting and copying alone is learnt per working set,
    /// as one migration run's is).
    public static func copySweep(threads: Int, repeats: Int = 101, rings: [Int] = [cacheRingBytes, memoryRingBytes],
                                 shapes: [(folioBytes: Int, folios: Int)]? = nil) -> [NUMACopyPoint] {
        let single = SingleThreadCopier()
        let pair = TwoThreadMemcpy()
        defer { pair.shutdown() }
        var all = copySweepFolios.map { (folioBytes: PageGeometry.pageSize, folios: $0) }
        all.append((PageGeometry.pmdSize, 1))
        var out: [NUMACopyPoint] = []
        for ring in rings {
            let multi = MultiThreadCopier(threads: threads, thresholdPages: 1)
            defer { multi.shutdown() }
            out += copySweep(single, multi, pair, ringBytes: ring, repeats: repeats, shapes: shapes ?? all)
        }
        return out
    }

    /// Batches one copier copies in a row before the next one takes its
    /// turn in ``copySweep(threads:repeats:rings:shapes:)``.
    static let copySweepBlock = 8

    private static func copySweep(_ single: SingleThreadCopier, _ multi: MultiThreadCopier, _ pair: TwoThreadMemcpy,
                                  ringBytes: Int, repeats: Int, shapes: [(folioBytes: Int, folios: Int)]) -> [NUMACopyPoint] {
        Yardsticks.withCopyRings(bytes: ringBytes) { src, dst in
            var out: [NUMACopyPoint] = []
            var jobs: [FolioCopyJob] = []
            jobs.reserveCapacity(512)
            let blocks = (repeats + copySweepBlock - 1) / copySweepBlock
            for (size, count) in shapes {
                var offset = 0
                var times: [[UInt64]] = [[], [], []]
                let splitBefore = multi.splitBatches, aloneBefore = multi.adaptiveSingleBatches
                // The copiers take turns block by block (each sees the host as
                // the others do), and the multi-threaded copier's block is one
                // run (begin() ... end()), as a migration's move phase is: its
                // timing of a batch, up to its next batch, then never includes
                // another copier's batch, and its polling workers never share
                // a core with the two-thread memcpy's helper.
                for b in 0..<(blocks * 3) {
                    let which = b % 3
                    if which == 1 { multi.begin() }
                    for _ in 0..<copySweepBlock {
                        // Consecutive batches walk the ring, as a migration walks its buffer.
                        jobs.removeAll(keepingCapacity: true)
                        for _ in 0..<count {
                            if offset + size > ringBytes { offset = 0 }
                            jobs.append(FolioCopyJob(destination: dst + offset, source: UnsafeRawPointer(src + offset), bytes: size))
                            offset += size
                        }
                        if which == 2 { pair.arm() }
                        let t0 = HostClock.nanos()
                        jobs.withUnsafeBufferPointer { batch in
                            switch which {
                            case 0: single.copy(batch)
                            case 1: multi.copy(batch)
                            default: pair.copy(batch)
                            }
                        }
                        times[which].append(HostClock.nanos() - t0)
                        if which == 2 { pair.disarm() }
                    }
                    if which == 1 { multi.end() }
                }
                func median(_ a: [UInt64]) -> Double { Double(a.sorted()[a.count / 2]) / 1000 }
                let s = median(times[0]), m = median(times[1]), two = median(times[2])
                let split = multi.splitBatches - splitBefore, alone = multi.adaptiveSingleBatches - aloneBefore
                out.append(NUMACopyPoint(folioBytes: size, folios: count, ringBytes: ringBytes, singleMicros: s,
                                         multiMicros: m, threads: multi.threads, speedup: m > 0 ? s / m : 0,
                                         twoThreadMicros: two, ratioToTwoThread: m > 0 ? two / m : 0,
                                         splitShare: split + alone > 0 ? Double(split) / Double(split + alone) : 0))
            }
            return out
        }
    }
}
