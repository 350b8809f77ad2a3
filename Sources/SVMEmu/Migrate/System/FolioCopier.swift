import Synchronization
import CSVMSupport

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
/// It never loses to one thread by much: splitting pays only where the
/// host has a core to spare and the working set is not already limited by
/// memory bandwidth one core can use, and a worker that the host has
/// descheduled in the middle of a chunk makes the batch wait for it. So the
/// copier times every batch (in a run, from its start to the next batch's
/// start, which includes the migrating thread's unmap, flush and remap that
/// polling workers slow down on a busy host; outside a run, the copy) and
/// keeps, per batch size (powers of two), a moving average of the time per
/// byte copied alone and split; it copies the next batch the faster way, and now and then (after 8 batches, then
/// ever more rarely while the other way keeps losing: 16, 32, ... up to
/// 1024) tries the other way again. While it copies alone its workers
/// sleep instead of polling, leaving the host CPU to the threads that run.
/// Batches copied alone by that choice: ``adaptiveSingleBatches``.
///
/// And it does not split at all while the host has no core to spare: when
/// more threads are runnable than the host has CPUs (besides the caller
/// and the copier's polling workers: the fourth field of /proc/loadavg,
/// read when a run begins and every 64 batches), a worker would share a
/// core with a thread that runs anyway and could be descheduled holding a
/// chunk the batch must wait for. Batches copied alone for that reason:
/// ``busyHostBatches``.
///
/// One batch at a time: the copier holds its own lock for a batch, so it can
/// be shared by several migrating threads. Nothing is allocated per batch.
public final class MultiThreadCopier: FolioCopier, @unchecked Sendable {
    public let name: String
    public let threads: Int
    /// Batches smaller than this many base pages stay on the calling thread.
    public let thresholdPages: Int
    /// Whether the copier chooses between one thread and all by timing
    /// (see above); without it every batch above the threshold is split.
    public let adaptive: Bool
    /// Batches that were small enough to stay on one thread.
    public var singleThreadedBatches: Int { Int(UnsafeAtomic(stats).load(ordering: .acquiring)) }
    /// Batches above the threshold that the copier copied on the calling
    /// thread alone because splitting was the slower way.
    public var adaptiveSingleBatches: Int { Int(UnsafeAtomic(stats + 2).load(ordering: .acquiring)) }
    /// Batches split across the threads.
    public var splitBatches: Int { Int(UnsafeAtomic(stats + 3).load(ordering: .acquiring)) }
    /// Batches above the threshold copied alone because the host had no
    /// core to spare (more threads runnable than CPUs).
    public var busyHostBatches: Int { Int(UnsafeAtomic(stats + 7).load(ordering: .acquiring)) }

    /// Bytes per chunk a thread claims.
    static let chunkBytes = 64 << 10

    // words: [0] batch lock, [16] generation (workers sleep on it),
    // [32] chunks not yet copied (the caller sleeps on it), [48] stopping,
    // [64] runs between begin() and end(), [72] workers wanted (the last
    // batch above the threshold was split: idle workers poll in a run).
    private let words: UnsafeMutablePointer<UInt32>
    // [0] single-threaded batches, [2] adaptive single batches, [3] split
    // batches; [4] when the run's latest batch started (0: none pending),
    // [5] its class, way and probe bit, [6] its bytes, [7] busy-host
    // batches; [9] the host is busy (1) or not (0), [10] batches until it
    // is looked at again; [8] the claim word: the batch's generation (24 bits), its
    // chunk count (20 bits), the next chunk (20 bits).
    private let stats: UnsafeMutablePointer<UInt64>
    // Per batch-size class (log2 of the batch's bytes), one cache line each:
    // [0] alone, [1] split: moving averages of picoseconds per KiB (0: not
    // measured yet); [2] batches until the other way is tried again;
    // [3] that interval. Read and written with atomic loads and stores: two
    // migrating threads may update one class at once, and either update is
    // as good a sample as the other.
    private let tuning: UnsafeMutablePointer<UInt64>
    static let tuningClasses = 24
    static let firstProbeInterval: UInt64 = 8
    static let lastProbeInterval: UInt64 = 1024
    // The batch being copied and how it is cut (written under the batch lock
    // before the claim word is published; constant until every chunk is done).
    private var jobs: UnsafeBufferPointer<FolioCopyJob> = UnsafeBufferPointer(start: nil, count: 0)
    /// Split mode: pieces per folio; deal mode: folios per chunk.
    private var perChunk = 1
    private var split = false
    /// The batch workers (host threads 1..<threads; the caller is thread 0).
    private var workers = HostWorkerThreads()

    /// - Parameters:
    ///   - threads: 1...64 threads, the caller included.
    ///   - thresholdPages: below this many base pages a batch is copied by the caller alone.
    ///   - adaptive: choose between one thread and all by timing the
    ///     batches (the default); false splits every batch above the threshold.
    public init(threads: Int, thresholdPages: Int = 32, adaptive: Bool = true) {
        if !(1...64).contains(threads) { contractViolation("MultiThreadCopier: threads must be 1...64 (got \(threads))") }
        self.threads = threads
        self.thresholdPages = max(1, thresholdPages)
        self.adaptive = adaptive
        name = "mt\(threads)"
        words = .allocate(capacity: 80)
        words.initialize(repeating: 0, count: 80)
        words[72] = 1
        stats = .allocate(capacity: 16)
        stats.initialize(repeating: 0, count: 16)
        tuning = .allocate(capacity: Self.tuningClasses * 8)
        tuning.initialize(repeating: 0, count: Self.tuningClasses * 8)
        for c in 0..<Self.tuningClasses { tuning[c * 8 + 2] = Self.firstProbeInterval; tuning[c * 8 + 3] = Self.firstProbeInterval }
        // Unowned: the copier's deinit stops and joins its workers.
        workers = HostWorkerThreads(count: threads - 1, first: 1, for: "MultiThreadCopier") {
            [unowned(unsafe) self] index in self.work(index: index)
        }
    }

    /// Stops and joins the workers. Call once when done with the copier;
    /// the workers keep it alive until then.
    public func shutdown() {
        guard !workers.isEmpty else { return }
        UnsafeAtomic(words + 48).store(1, ordering: .releasing)
        UnsafeAtomic(words + 16).store(UnsafeAtomic(words + 16).load(ordering: .acquiring) &+ 1, ordering: .releasing)
        _ = svm_futex_wake(words + 16, Int32.max)
        workers.join()
    }

    public func begin() {
        UnsafeAtomic(stats + 10).store(0, ordering: .releasing)   // look at the host at the run's first batch
        if UnsafeAtomic(UnsafeMutableRawPointer(words + 64).assumingMemoryBound(to: Int32.self)).wrappingAdd(1, ordering: .acquiringAndReleasing).newValue == 1 && UnsafeAtomic(words + 72).load(ordering: .acquiring) != 0 {
            // Wake sleeping workers into polling: a generation with no batch.
            UnsafeAtomic(words + 16).store(UnsafeAtomic(words + 16).load(ordering: .acquiring) &+ 1, ordering: .releasing)
            _ = svm_futex_wake(words + 16, Int32.max)
        }
    }

    public func end() {
        let left = UnsafeAtomic(UnsafeMutableRawPointer(words + 64).assumingMemoryBound(to: Int32.self)).wrappingAdd(-1, ordering: .acquiringAndReleasing).newValue
        if left < 0 { contractViolation("MultiThreadCopier: end() without begin()") }
        // The run's last batch has no next one to end its time.
        if left == 0 { UnsafeAtomic(stats + 4).store(0, ordering: .releasing) }
    }

    deinit {
        shutdown()
        words.deallocate()
        stats.deallocate()
        tuning.deallocate()
    }

    public func copy(_ jobs: UnsafeBufferPointer<FolioCopyJob>) {
        var bytes = 0
        for j in jobs { bytes += j.bytes }
        if threads == 1 || bytes >> PageGeometry.pageShift < thresholdPages || workers.isEmpty {
            _ = UnsafeAtomic(stats).wrappingAdd(1, ordering: .relaxed).newValue
            for j in jobs { svm_memcpy(j.destination, j.source, j.bytes) }
            return
        }
        guard adaptive else { return copySplit(jobs) }
        let now = HostClock.hostNanos()
        let inRun = UnsafeAtomic(words + 64).load(ordering: .acquiring) != 0
        if hostIsBusy() {
            if inRun { recordPending(until: now) }
            _ = UnsafeAtomic(stats + 7).wrappingAdd(1, ordering: .relaxed).newValue
            UnsafeAtomic(words + 72).store(0, ordering: .releasing)
            for j in jobs { svm_memcpy(j.destination, j.source, j.bytes) }
            return
        }
        // In a run, a batch's cost is the time until the next batch starts:
        // its copy and the migrating thread's unmap, flush and remap of the
        // next batch, which polling workers slow down on a host without a
        // core to spare. Outside a run, the copy alone.
        if inRun { recordPending(until: now) }
        let cls = min(Self.tuningClasses - 1, Int.bitWidth - 1 - bytes.leadingZeroBitCount)
        let c = tuning + cls * 8
        let alone = UnsafeAtomic(c).load(ordering: .acquiring), splitCost = UnsafeAtomic(c + 1).load(ordering: .acquiring)
        var splitting: Bool
        var probing = false, warm = false
        if splitCost == 0 { splitting = true }
        else if alone == 0 { splitting = false }
        else {
            let preferSplit = splitCost < alone
            let left = UnsafeAtomic(c + 2).load(ordering: .acquiring)
            if left <= 1 {
                probing = true
                splitting = !preferSplit
            } else {
                UnsafeAtomic(c + 2).store(left - 1, ordering: .releasing)
                splitting = preferSplit
                // The batch before a probe of splitting wakes the workers, so that
                // the probe finds them polling, as split batches in a row do.
                warm = left == 2 && !preferSplit
            }
        }
        if splitting {
            copySplit(jobs)
        } else {
            _ = UnsafeAtomic(stats + 2).wrappingAdd(1, ordering: .relaxed).newValue
            UnsafeAtomic(words + 72).store(warm ? 1 : 0, ordering: .releasing)
            if warm {
                UnsafeAtomic(words + 16).store(UnsafeAtomic(words + 16).load(ordering: .acquiring) &+ 1, ordering: .releasing)
                _ = svm_futex_wake(words + 16, Int32.max)
            }
            for j in jobs { svm_memcpy(j.destination, j.source, j.bytes) }
        }
        if inRun {
            UnsafeAtomic(stats + 5).store(UInt64(cls) << 2 | (splitting ? 1 : 0) << 1 | (probing ? 1 : 0), ordering: .releasing)
            UnsafeAtomic(stats + 6).store(UInt64(bytes), ordering: .releasing)
            UnsafeAtomic(stats + 4).store(now, ordering: .releasing)
        } else {
            record(class: cls, splitting: splitting, probing: probing, nanos: HostClock.hostNanos() &- now, bytes: bytes)
        }
    }

    /// Whether more threads are runnable on the host than it has CPUs,
    /// besides the caller and the workers that poll: looked at every 64th
    /// batch (and at a run's first), a read of /proc/loadavg. A host whose
    /// count cannot be read is taken as not busy.
    private func hostIsBusy() -> Bool {
        let left = UnsafeAtomic(stats + 10).load(ordering: .acquiring)
        if left > 0 {
            UnsafeAtomic(stats + 10).store(left - 1, ordering: .releasing)
            return UnsafeAtomic(stats + 9).load(ordering: .acquiring) != 0
        }
        UnsafeAtomic(stats + 10).store(63, ordering: .releasing)
        guard let runnable = system_runnable_threads() else {
            UnsafeAtomic(stats + 9).store(0, ordering: .releasing)
            return false
        }
        let polling = UnsafeAtomic(words + 64).load(ordering: .acquiring) != 0 && UnsafeAtomic(words + 72).load(ordering: .acquiring) != 0 ? threads - 1 : 0
        let others = max(0, runnable - 1 - polling)
        let busy = others + threads > Self.hostCPUs
        UnsafeAtomic(stats + 9).store(busy ? 1 : 0, ordering: .releasing)
        return busy
    }

    /// The host's online CPUs, read once.
    static let hostCPUs = system_online_cpus()

    /// Records the batch of this run that started last (if any) as taking
    /// until `now`, and forgets it.
    private func recordPending(until now: UInt64) {
        let start = UnsafeAtomic(stats + 4).load(ordering: .acquiring)
        guard start != 0, now > start else { return }
        UnsafeAtomic(stats + 4).store(0, ordering: .releasing)
        let what = UnsafeAtomic(stats + 5).load(ordering: .acquiring)
        record(class: Int(what >> 2), splitting: what & 2 != 0, probing: what & 1 != 0, nanos: now - start,
               bytes: Int(UnsafeAtomic(stats + 6).load(ordering: .acquiring)))
    }

    /// Adds one batch's time to its class's average for the way it was
    /// copied; after a probe, sets when the next probe comes.
    private func record(class cls: Int, splitting: Bool, probing: Bool, nanos: UInt64, bytes: Int) {
        let c = tuning + cls * 8
        let sample = nanos &* 1000 / UInt64(max(1, bytes >> 10))
        let slot = c + (splitting ? 1 : 0)
        let old = UnsafeAtomic(slot).load(ordering: .acquiring)
        // A probe weighs half: one sample taken rarely must be able to turn the choice.
        let updated = old == 0 ? sample : probing ? (old + sample) / 2 : old - old / 4 + sample / 4
        UnsafeAtomic(slot).store(max(1, updated), ordering: .releasing)
        if probing {
            let nowPreferSplit = UnsafeAtomic(c + 1).load(ordering: .acquiring) < UnsafeAtomic(c).load(ordering: .acquiring)
            let interval = nowPreferSplit == splitting ? Self.firstProbeInterval
                : min(Self.lastProbeInterval, UnsafeAtomic(c + 3).load(ordering: .acquiring) * 2)
            UnsafeAtomic(c + 3).store(interval, ordering: .releasing)
            UnsafeAtomic(c + 2).store(interval, ordering: .releasing)
        }
    }

    /// Splits `jobs` across the threads (the caller included) and returns
    /// when every chunk is copied.
    private func copySplit(_ jobs: UnsafeBufferPointer<FolioCopyJob>) {
        _ = UnsafeAtomic(stats + 3).wrappingAdd(1, ordering: .relaxed).newValue
        UnsafeAtomic(words + 72).store(1, ordering: .releasing)
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
            UnsafeAtomic(words + 32).store(UInt32(chunks), ordering: .releasing)
            let gen = UnsafeAtomic(words + 16).load(ordering: .acquiring) &+ 1
            UnsafeAtomic(stats + 8).store((UInt64(gen & 0xff_ffff) << 40) | (UInt64(chunks) << 20), ordering: .releasing)
            UnsafeAtomic(words + 16).store(gen, ordering: .releasing)
            _ = svm_futex_wake(words + 16, Int32.max)
            claimAndCopy(gen)
            // Wait for the chunks others claimed: spin briefly, then sleep.
            var spins = 0
            while true {
                let v = UnsafeAtomic(words + 32).load(ordering: .acquiring)
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
            var word = UnsafeAtomic(claim).load(ordering: .acquiring)
            let next = word & 0xf_ffff, count = (word >> 20) & 0xf_ffff
            guard word >> 40 == UInt64(gen & 0xff_ffff), next < count else { return }
            guard UnsafeAtomic(claim).compareExchange(&word, word + 1, successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring) else { continue }
            copyChunk(Int(next))
            if UnsafeAtomic(UnsafeMutableRawPointer(words + 32).assumingMemoryBound(to: Int32.self)).wrappingAdd(-1, ordering: .acquiringAndReleasing).newValue == 0 {
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
            let now = UnsafeAtomic(words + 16).load(ordering: .acquiring)
            if now == seen {
                spins += 1
                if spins & 63 != 0 { svm_cpu_relax(); continue }
                if UnsafeAtomic(words + 64).load(ordering: .acquiring) != 0 && UnsafeAtomic(words + 72).load(ordering: .acquiring) != 0 {
                    HostThread.yield()
                    continue
                }
                if HostClock.nanos() - spinningSince < MultiThreadCopier.spinNanos { continue }
                _ = svm_futex_wait(words + 16, seen, 0)
                spinningSince = HostClock.nanos()
                continue
            }
            seen = now
            if UnsafeAtomic(words + 48).load(ordering: .acquiring) != 0 { return }
            claimAndCopy(now)
            spinningSince = HostClock.nanos()
            spins = 0
        }
    }
}
