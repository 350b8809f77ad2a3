import Synchronization
import CSVMSupport

/// Copy offload to DMA channels (Shivank Garg's series, 2025-2026), timed by
/// a device link model: the batch is cut into transactions of
/// `foliosPerTransaction` folios; each goes to a free channel, which is busy
/// for the link's transfer time of that transaction. A copy that finds every
/// channel busy is refused by the engine and copied by the CPU instead
/// (counted in `cpuFallbacks`). The bytes themselves are moved by the
/// calling thread (the emulator has no DMA hardware); the call returns when
/// both the bytes and the modelled transfers are complete.
///
/// Channels are shared by every thread that uses the copier, so two
/// migrating threads compete for them as two CPUs compete for a DMA engine.
public final class OffloadCopier: FolioCopier, @unchecked Sendable {
    public let name: String
    public let model: LinkModel
    /// DMA channels.
    public let threads: Int
    /// Folios per DMA transaction (32 in the series).
    public let foliosPerTransaction: Int
    // Per channel, the time it is busy until (ns), one cache line apart; then
    // the counters: transactions offloaded, refused (copied by the CPU).
    private let words: UnsafeMutablePointer<UInt64>

    /// - Parameters:
    ///   - model: the link whose transfer time a transaction takes.
    ///   - channels: 1...16 DMA channels.
    ///   - foliosPerTransaction: folios per transaction.
    public init(model: LinkModel, channels: Int = 16, foliosPerTransaction: Int = 32) {
        if !(1...16).contains(channels) { contractViolation("OffloadCopier: channels must be 1...16 (got \(channels))") }
        self.model = model
        threads = channels
        self.foliosPerTransaction = max(1, foliosPerTransaction)
        name = "dma-\(model.name)"
        words = .allocate(capacity: (channels + 2) * 8)
        words.initialize(repeating: 0, count: (channels + 2) * 8)
    }
    deinit { words.deallocate() }

    /// Transactions the DMA channels took.
    public var offloaded: UInt64 { UnsafeAtomic(words + threads * 8).load(ordering: .acquiring) }
    /// Transactions refused because every channel was busy, copied by the CPU.
    public var cpuFallbacks: UInt64 { UnsafeAtomic(words + threads * 8 + 8).load(ordering: .acquiring) }

    public func copy(_ jobs: UnsafeBufferPointer<FolioCopyJob>) {
        var latest: UInt64 = 0
        var i = 0
        while i < jobs.count {
            let end = min(jobs.count, i + foliosPerTransaction)
            var bytes = 0
            for k in i..<end { bytes += jobs[k].bytes }
            let now = HostClock.nanos()
            if let done = claimChannel(now: now, nanos: UInt64(model.transferNanos(bytes: bytes).rounded(.up))) {
                _ = UnsafeAtomic(words + threads * 8).wrappingAdd(1, ordering: .relaxed).newValue
                latest = max(latest, done)
            } else {
                _ = UnsafeAtomic(words + threads * 8 + 8).wrappingAdd(1, ordering: .relaxed).newValue
            }
            for k in i..<end { svm_memcpy(jobs[k].destination, jobs[k].source, jobs[k].bytes) }
            i = end
        }
        if latest > 0 { LinkCopyEngine.waitUntil(nanos: latest) }
    }

    /// Takes a channel that is idle at `now` for `nanos`; nil when all are busy.
    private func claimChannel(now: UInt64, nanos: UInt64) -> UInt64? {
        for c in 0..<threads {
            let w = words + c * 8
            var busy = UnsafeAtomic(w).load(ordering: .acquiring)
            while busy <= now {
                if UnsafeAtomic(w).compareExchange(&busy, now + nanos, successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring) { return now + nanos }
            }
        }
        return nil
    }
}
