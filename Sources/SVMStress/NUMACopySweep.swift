// Where the multi-threaded folio copy stops paying: the copy of one batch of
// n folios (4 KiB, and one 2 MiB folio) by the single-thread copier against
// the multi-threaded one with its threshold off, batch after batch as the
// move phase of one migratePages run calls it (between the copier's begin()
// and end()), over two working sets: one that stays in the host's
// last-level cache and one that streams from DRAM.

import SVMEmu

/// One point of the copier sweep.
public struct NUMACopyPoint: Sendable, Codable {
    /// Folio size in bytes (4 KiB or 2 MiB) and folios per batch.
    public var folioBytes: Int
    public var folios: Int
    /// Bytes of the source ring the batches walk (the destination ring is as
    /// large): `cacheRingBytes` stays in the last-level cache, `memoryRingBytes`
    /// streams from DRAM, where one core may already use most of the bandwidth.
    public var ringBytes: Int
    /// Median time to copy one batch, single thread and with `threads` threads.
    public var singleMicros: Double
    public var multiMicros: Double
    public var threads: Int
    /// singleMicros / multiMicros: above 1 the threads pay.
    public var speedup: Double
    public init(folioBytes: Int, folios: Int, ringBytes: Int, singleMicros: Double, multiMicros: Double, threads: Int,
                speedup: Double) {
        self.folioBytes = folioBytes
        self.folios = folios
        self.ringBytes = ringBytes
        self.singleMicros = singleMicros
        self.multiMicros = multiMicros
        self.threads = threads
        self.speedup = speedup
    }
}

extension NUMABench {
    /// The batch sizes (in 4 KiB folios) the copier sweep measures, and one 2 MiB folio.
    public static let copySweepFolios = [1, 4, 8, 16, 32, 64, 128, 256, 512]
    /// The working sets of the copier sweep: 2 x 8 MiB fits a 32 MiB
    /// last-level cache; 2 x 256 MiB does not fit any.
    public static let cacheRingBytes = 8 << 20
    public static let memoryRingBytes = 256 << 20

    /// Times batch copies between frames of the kind emulated RAM uses
    /// (`Kernel.reserveFrames`, written once so no host first-touch fault
    /// is timed), alternating the two copiers batch by batch so that host
    /// load hits both alike; each point is the median of `repeats` batches.
    /// Every shape is measured on both working sets (`cacheRingBytes`,
    /// `memoryRingBytes`).
    public static func copySweep(threads: Int, repeats: Int = 101) -> [NUMACopyPoint] {
        let single = SingleThreadCopier()
        let multi = MultiThreadCopier(threads: threads, thresholdPages: 1)
        defer { multi.shutdown() }
        var out: [NUMACopyPoint] = []
        for ring in [cacheRingBytes, memoryRingBytes] {
            out += copySweep(single, multi, ringBytes: ring, repeats: repeats)
        }
        return out
    }

    private static func copySweep(_ single: SingleThreadCopier, _ multi: MultiThreadCopier, ringBytes: Int,
                                  repeats: Int) -> [NUMACopyPoint] {
        withCopyRings(bytes: ringBytes) { src, dst in
            multi.begin()
            defer { multi.end() }
            var out: [NUMACopyPoint] = []
            var shapes = copySweepFolios.map { (PageGeometry.pageSize, $0) }
            shapes.append((PageGeometry.pmdSize, 1))
            var jobs: [FolioCopyJob] = []
            jobs.reserveCapacity(512)
            for (size, count) in shapes {
                var offset = 0
                var times: ([UInt64], [UInt64]) = ([], [])
                for r in 0..<(repeats * 2) {
                    // Consecutive batches walk the ring, as a migration walks its buffer.
                    jobs.removeAll(keepingCapacity: true)
                    for _ in 0..<count {
                        if offset + size > ringBytes { offset = 0 }
                        jobs.append(FolioCopyJob(destination: dst + offset, source: UnsafeRawPointer(src + offset), bytes: size))
                        offset += size
                    }
                    let copier: any FolioCopier = r & 1 == 0 ? single : multi
                    let t0 = HostClock.nanos()
                    jobs.withUnsafeBufferPointer { copier.copy($0) }
                    let t = HostClock.nanos() - t0
                    if r & 1 == 0 { times.0.append(t) } else { times.1.append(t) }
                }
                func median(_ a: [UInt64]) -> Double { Double(a.sorted()[a.count / 2]) / 1000 }
                let s = median(times.0), m = median(times.1)
                out.append(NUMACopyPoint(folioBytes: size, folios: count, ringBytes: ringBytes, singleMicros: s,
                                         multiMicros: m, threads: multi.threads, speedup: m > 0 ? s / m : 0))
            }
            return out
        }
    }
}
