import CSVMSupport
#if canImport(Glibc)
import Glibc
#endif

/// One folio's copy in the move phase of `migratePages`: the destination
/// frame's bytes, the source frame's, and the folio size.
public struct FolioCopyJob: @unchecked Sendable {
    public var destination: UnsafeMutableRawPointer
    public var source: UnsafeRawPointer
    public var bytes: Int
    public init(destination: UnsafeMutableRawPointer, source: UnsafeRawPointer, bytes: Int) {
        self.destination = destination
        self.source = source
        self.bytes = bytes
    }
}

/// How the move phase of `migratePages` copies a batch of folios whose
/// sources are unmapped, flushed and locked. `copy` returns when every byte
/// is in place and visible to other threads.
///
/// Called once per batch (not per page), from the migrating thread; an
/// implementation shared by several migrating threads serialises them itself.
public protocol FolioCopier: AnyObject, Sendable {
    /// Short name for reports (`single`, `mt2`, `dma-pcie5`).
    var name: String { get }
    /// Threads (or DMA channels) the copier may use.
    var threads: Int { get }
    /// Copies every job.
    func copy(_ jobs: UnsafeBufferPointer<FolioCopyJob>)
    /// A `migratePages` run that will call `copy` batch after batch begins:
    /// a copier with workers may keep them ready until the matching `end()`
    /// (the kernel queues its copy work on kworkers that are a few
    /// microseconds from running; a host futex wake-up here is tens).
    /// Calls nest; each `begin()` is matched by one `end()`.
    func begin()
    /// The run that called `begin()` is over.
    func end()
}

extension FolioCopier {
    public func begin() {}
    public func end() {}
}

/// The kernel's own copy: one folio after another on the migrating thread
/// (`folio_mc_copy()`).
public final class SingleThreadCopier: FolioCopier, @unchecked Sendable {
    public let name = "single"
    public let threads = 1
    public init() {}
    /// Copies every job on the calling thread (on an emulated thread, in
    /// ``VirtualCosts/copyPerKiB`` of virtual time).
    public func copy(_ jobs: UnsafeBufferPointer<FolioCopyJob>) {
        for j in jobs {
            if _slowPath(svm_det_active()) { DeterministicScheduler.copied(bytes: j.bytes) }
            svm_memcpy(j.destination, j.source, j.bytes)
        }
    }
}

/// Zi Yan's multi-threaded folio copy (RFC, January 2025): after the batched
/// unmap and flush, `threads` threads (the migrating thread and
/// `threads - 1` workers) copy the batch. With no more folios than threads
/// each folio is split across the threads; otherwise the folios are dealt
/// out. A batch below `thresholdPages` base pages (32 by default, as in the
/// seed) is copied by the migrating thread alone: waking workers costs more
/// than they save.
///
/// The batch is cut into chunks of about 64 KiB (pieces of a split folio,
/// or runs of whole folios) that every thread claims one at a time, the
/// migrating thread included, so a worker the host has not scheduled yet
/// delays nothing: the migrating thread copies what nobody claimed and
/// waits only for chunks being copied. (On a host with more busy threads
/// than cores, a fixed share per thread made the batch wait for the
/// slowest worker's wake-up.)
///
/// Between `begin()` and `end()` (one `migratePages` run) an idle worker
/// polls for the next batch, giving its host CPU away with `sched_yield`
/// between polls, instead of sleeping on a futex: a batch finds the workers
/// awake. Outside a run a worker sleeps after `spinNanos`.
///
/// One batch at a time: the copier holds its own lock for a batch, so it can
/// be shared by several migrating threads. Nothing is allocated per batch.
public final class MultiThreadCopier: FolioCopier, @unchecked Sendable {
    public let name: String
    public let threads: Int
    /// Batches smaller than this many base pages stay on the calling thread.
    public let thresholdPages: Int
    /// Batches that were small enough to stay on one thread.
    public var singleThreadedBatches: Int { Int(svm_load64(stats)) }

    /// Bytes per chunk a thread claims.
    static let chunkBytes = 64 << 10

    // words: [0] batch lock, [16] generation (workers sleep on it),
    // [32] chunks not yet copied (the caller sleeps on it), [48] stopping,
    // [64] runs between begin() and end().
    private let words: UnsafeMutablePointer<UInt32>
    // [0] single-threaded batches; [8] the claim word: the batch's
    // generation (24 bits), its chunk count (20 bits), the next chunk (20 bits).
    private let stats: UnsafeMutablePointer<UInt64>
    // The batch being copied and how it is cut (written under the batch lock
    // before the claim word is published; constant until every chunk is done).
    private var jobs: UnsafeBufferPointer<FolioCopyJob> = UnsafeBufferPointer(start: nil, count: 0)
    /// Split mode: pieces per folio; deal mode: folios per chunk.
    private var perChunk = 1
    private var split = false
    private var handles: [pthread_t] = []

    /// - Parameters:
    ///   - threads: 1...64 threads, the caller included.
    ///   - thresholdPages: below this many base pages a batch is copied by the caller alone.
    public init(threads: Int, thresholdPages: Int = 32) {
        if !(1...64).contains(threads) { contractViolation("MultiThreadCopier: threads must be 1...64 (got \(threads))") }
        self.threads = threads
        self.thresholdPages = max(1, thresholdPages)
        name = "mt\(threads)"
        words = .allocate(capacity: 80)
        words.initialize(repeating: 0, count: 80)
        stats = .allocate(capacity: 16)
        stats.initialize(repeating: 0, count: 16)
        for index in 1..<threads {
            var handle = pthread_t()
            let box = Unmanaged.passRetained(WorkerStart(copier: self, index: index)).toOpaque()
            let rc = pthread_create(&handle, nil, { context in
                let start = Unmanaged<WorkerStart>.fromOpaque(context!).takeRetainedValue()
                start.copier.work(index: start.index)
                return nil
            }, box)
            if rc != 0 { contractViolation("MultiThreadCopier: the host refused a copy worker thread (error \(rc))") }
            handles.append(handle)
        }
    }

    private final class WorkerStart {
        unowned(unsafe) let copier: MultiThreadCopier
        let index: Int
        init(copier: MultiThreadCopier, index: Int) { self.copier = copier; self.index = index }
    }

    /// Stops and joins the workers. Call once when done with the copier;
    /// the workers keep it alive until then.
    public func shutdown() {
        guard !handles.isEmpty else { return }
        svm_store32(words + 48, 1)
        svm_store32(words + 16, svm_load32(words + 16) &+ 1)
        _ = svm_futex_wake(words + 16, Int32.max)
        for h in handles { pthread_join(h, nil) }
        handles.removeAll()
    }

    public func begin() {
        if svm_add32(UnsafeMutableRawPointer(words + 64).assumingMemoryBound(to: Int32.self), 1) == 1 {
            // Wake sleeping workers into polling: a generation with no batch.
            svm_store32(words + 16, svm_load32(words + 16) &+ 1)
            _ = svm_futex_wake(words + 16, Int32.max)
        }
    }

    public func end() {
        if svm_add32(UnsafeMutableRawPointer(words + 64).assumingMemoryBound(to: Int32.self), -1) < 0 {
            contractViolation("MultiThreadCopier: end() without begin()")
        }
    }

    deinit {
        shutdown()
        words.deallocate()
        stats.deallocate()
    }

    public func copy(_ jobs: UnsafeBufferPointer<FolioCopyJob>) {
        var pages = 0
        for j in jobs { pages += j.bytes >> PageGeometry.pageShift }
        if threads == 1 || pages < thresholdPages || handles.isEmpty {
            _ = svm_add64(stats, 1)
            for j in jobs { svm_memcpy(j.destination, j.source, j.bytes) }
            return
        }
        // One batch at a time: the batch lock guards `jobs`, `split` and `perChunk`.
        SpinLockRef(words, .copierQueue).withLock {
            self.jobs = jobs
            let chunks: Int
            split = jobs.count <= threads
            if split {
                var largest = 0
                for j in jobs { largest = max(largest, j.bytes) }
                perChunk = max(1, largest / MultiThreadCopier.chunkBytes)
                chunks = jobs.count * perChunk
            } else {
                perChunk = max(1, MultiThreadCopier.chunkBytes / max(PageGeometry.pageSize, jobs[0].bytes))
                chunks = (jobs.count + perChunk - 1) / perChunk
            }
            // The claim word's 20-bit fields: at most 64 folios split in 32, or 2^20 runs.
            if chunks >= 1 << 20 { contractViolation("MultiThreadCopier: a batch of \(jobs.count) folios is too large") }
            svm_store32(words + 32, UInt32(chunks))
            let gen = svm_load32(words + 16) &+ 1
            svm_store64(stats + 8, (UInt64(gen & 0xff_ffff) << 40) | (UInt64(chunks) << 20))
            svm_store32(words + 16, gen)
            _ = svm_futex_wake(words + 16, Int32.max)
            claimAndCopy(gen)
            // Wait for the chunks others claimed: spin briefly, then sleep.
            var spins = 0
            while true {
                let v = svm_load32(words + 32)
                if v == 0 { break }
                if spins < 200 { spins += 1; svm_cpu_relax() } else { _ = svm_futex_wait(words + 32, v, 1_000_000) }
            }
            self.jobs = UnsafeBufferPointer(start: nil, count: 0)
        }
    }

    /// Claims chunks of batch `gen` until none is left, copying each.
    private func claimAndCopy(_ gen: UInt32) {
        let claim = stats + 8
        while true {
            var word = svm_load64(claim)
            let next = word & 0xf_ffff, count = (word >> 20) & 0xf_ffff
            guard word >> 40 == UInt64(gen & 0xff_ffff), next < count else { return }
            guard svm_cas64(claim, &word, word + 1) else { continue }
            copyChunk(Int(next))
            if svm_add32(UnsafeMutableRawPointer(words + 32).assumingMemoryBound(to: Int32.self), -1) == 0 {
                _ = svm_futex_wake(words + 32, 1)
            }
        }
    }

    /// Copies chunk `c` of the current batch.
    private func copyChunk(_ c: Int) {
        if split {
            let j = jobs[c / perChunk]
            let piece = ((j.bytes / perChunk) + PageGeometry.pageSize - 1) & ~(PageGeometry.pageSize - 1)
            let start = piece * (c % perChunk)
            guard start < j.bytes else { return }
            svm_memcpy(j.destination + start, j.source + start, min(piece, j.bytes - start))
        } else {
            let lo = c * perChunk, hi = min(jobs.count, lo + perChunk)
            for i in lo..<hi { svm_memcpy(jobs[i].destination, jobs[i].source, jobs[i].bytes) }
        }
    }

    /// How long a worker that finished watches for the next batch before it
    /// sleeps: a host futex wake-up costs tens of microseconds here (a
    /// kernel worker's a few), and the next batch usually follows soon.
    static let spinNanos: UInt64 = 20_000

    private func work(index: Int) {
        // The generation at creation, not at this thread's start: a batch
        // posted before the thread first ran is still this thread's to copy.
        var seen: UInt32 = 0
        var spinningSince: UInt64 = HostClock.nanos()
        var spins = 0
        while true {
            let now = svm_load32(words + 16)
            if now == seen {
                spins += 1
                if spins & 63 != 0 { svm_cpu_relax(); continue }
                if svm_load32(words + 64) != 0 {
                    HostThread.yield()
                    continue
                }
                if HostClock.nanos() - spinningSince < MultiThreadCopier.spinNanos { continue }
                _ = svm_futex_wait(words + 16, seen, 0)
                spinningSince = HostClock.nanos()
                continue
            }
            seen = now
            if svm_load32(words + 48) != 0 { return }
            claimAndCopy(now)
            spinningSince = HostClock.nanos()
            spins = 0
        }
    }
}

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
    public var offloaded: UInt64 { svm_load64(words + threads * 8) }
    /// Transactions refused because every channel was busy, copied by the CPU.
    public var cpuFallbacks: UInt64 { svm_load64(words + threads * 8 + 8) }

    public func copy(_ jobs: UnsafeBufferPointer<FolioCopyJob>) {
        var latest: UInt64 = 0
        var i = 0
        while i < jobs.count {
            let end = min(jobs.count, i + foliosPerTransaction)
            var bytes = 0
            for k in i..<end { bytes += jobs[k].bytes }
            let now = HostClock.nanos()
            if let done = claimChannel(now: now, nanos: UInt64(model.transferNanos(bytes: bytes).rounded(.up))) {
                _ = svm_add64(words + threads * 8, 1)
                latest = max(latest, done)
            } else {
                _ = svm_add64(words + threads * 8 + 8, 1)
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
            var busy = svm_load64(w)
            while busy <= now {
                if svm_cas64(w, &busy, now + nanos) { return now + nanos }
            }
        }
        return nil
    }
}
