// The yardsticks every migration and copy figure is reported against,
// measured in one place: memcpy of the same bytes (`MemcpyBaseline`: a round
// trip between buffers backed like emulated RAM and VRAM, with and without
// streaming stores), memcpy in granule-sized chunks (the overhead
// breakdown's), a cache-hot 4 KiB memcpy (bench memory's), and this host's
// own two-thread memcpy (`TwoThreadMemcpy`, the folio copier's).
//
// (The machine profile's memcpy bandwidths, `svmemu calibrate`, are a
// different measurement: C loops over working sets of every size, for the
// virtual costs; see Calibration.swift.)

import Foundation
import SVMEmu
import Synchronization

/// The memcpy yardsticks: the chunked copy, a single figure, and
/// ``Memcpy4K``, whose rounds bench memory interleaves with its own (as
/// benchmarks do with ``MemcpyBaseline`` and ``TwoThreadMemcpy``).
public enum Yardsticks {
    /// memcpy of `bytes` in `granule` chunks over a ring of at most 64 MiB
    /// (source and destination), best of three, in GB/s. With `streaming`,
    /// the chunks are copied with streaming stores (one fence per round).
    /// The overhead breakdown's `memcpyGBps` and `streamCopyGBps`.
    public static func chunkedCopyGBps(granule: Int, bytes: Int, streaming: Bool = false) -> Double {
        let ring = min(bytes, 64 << 20)
        return withCopyRings(bytes: ring) { src, dst in
            var best = UInt64.max
            for _ in 0..<3 {
                var done = 0, offset = 0
                let t0 = HostClock.nanos()
                while done < bytes {
                    HostMemory.copy(to: dst + offset, from: src + offset, bytes: granule, streaming: streaming)
                    HostMemory.escape(dst + offset)
                    done += granule
                    offset += granule
                    if offset + granule > ring { offset = 0 }
                }
                if streaming { HostMemory.storeFence() }
                best = min(best, HostClock.nanos() - t0)
            }
            return Double(bytes) / Double(max(1, best))
        }
    }

    /// A cache-hot 4 KiB memcpy whose rounds a benchmark can interleave
    /// with its own (bench memory's TLB-hit reads), so that both see the
    /// same machine: on a host whose speed comes and goes, the best round
    /// of each then comes from the same fast spell.
    public final class Memcpy4K {
        private let src: UnsafeMutableRawPointer
        private let dst: UnsafeMutableRawPointer

        public init() {
            src = .allocate(byteCount: PageGeometry.pageSize, alignment: PageGeometry.pageSize)
            dst = .allocate(byteCount: PageGeometry.pageSize, alignment: PageGeometry.pageSize)
            src.initializeMemory(as: UInt8.self, repeating: 0x5A, count: PageGeometry.pageSize)
            dst.initializeMemory(as: UInt8.self, repeating: 0, count: PageGeometry.pageSize)
        }
        deinit { src.deallocate(); dst.deallocate() }

        /// One round of `copies` copies (a byte of the source changes
        /// before each, so none is optimised away), in nanoseconds per copy.
        public func round(copies: Int = 200_000) -> Double {
            let t0 = HostClock.nanos()
            for i in 0..<copies {
                src.storeBytes(of: UInt8(truncatingIfNeeded: i), as: UInt8.self)
                HostMemory.copy(to: dst, from: src, bytes: PageGeometry.pageSize)
                HostMemory.escape(dst)
            }
            return Double(HostClock.nanos() - t0) / Double(max(1, copies))
        }
    }

    /// Runs `body` with two rings of `bytes` for timing copies: backed like
    /// emulated RAM and VRAM (`Kernel.reserveFrames`, as ``MemcpyBaseline``'s), the
    /// source filled with 0x5a and the destination zeroed, both written once so
    /// that no host first-touch fault is timed; released after.
    static func withCopyRings<R>(bytes: Int, _ body: (UnsafeMutableRawPointer, UnsafeMutableRawPointer) throws -> R) rethrows -> R {
        let src = Kernel.reserveFrames(bytes: bytes)
        let dst = Kernel.reserveFrames(bytes: bytes)
        defer {
            Kernel.releaseFrames(src, bytes: bytes)
            Kernel.releaseFrames(dst, bytes: bytes)
        }
        src.initializeMemory(as: UInt8.self, repeating: 0x5a, count: bytes)
        dst.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
        return try body(src, dst)
    }
}

/// memcpy of `bytes` there and back (A -> B, then B -> A) between two buffers
/// from `Kernel.reserveFrames` (host huge pages where the host allows, like the
/// emulated frames a migration copies between), filled with a pattern.
///
/// Both copies really happen: an optimiser that sees `memcpy(b, a)` followed by
/// `memcpy(a, b)` may drop the second (a is unchanged by it), and one that
/// knows a's contents may turn both into a memset. A compiler barrier between
/// the copies stops both, and `verify()` checks the bytes.
///
/// A benchmark interleaves `round()` with its own rounds, so that both sides
/// see the same machine (this VM's memory bandwidth drifts by tens of percent
/// over seconds).
///
/// Each round also times the same two copies with streaming (non-temporal)
/// stores, the copy `MemcpyCopyEngine` does per page: glibc's memcpy streams
/// only above a size it picks from the cache size, so at some sizes it is the
/// slower of the two, and a migration can beat "memcpy". The best of both is
/// the most an emulated migration could reach.
public final class MemcpyBaseline {
    /// Bytes per direction.
    public let bytes: Int
    let seed: UInt64
    let a: UnsafeMutableRawPointer
    let b: UnsafeMutableRawPointer
    /// The best round so far: the seconds for both copies.
    public private(set) var bestSeconds = Double.infinity
    /// The best round of the same copies with streaming stores.
    public private(set) var bestStreamSeconds = Double.infinity

    /// Reserves and fills both buffers and runs one untimed warm-up round.
    public init(bytes: Int, seed: UInt64 = 0x5eed) {
        if !(bytes > 0 && bytes & 63 == 0) { contractViolation("MemcpyBaseline: bytes must be a positive multiple of 64 (got \(bytes))") }
        self.bytes = bytes
        self.seed = seed
        a = Kernel.reserveFrames(bytes: bytes)
        b = Kernel.reserveFrames(bytes: bytes)
        Self.fill(a, bytes: bytes, seed: seed)
        b.initializeMemory(as: UInt8.self, repeating: 0xa5, count: bytes)
        _ = copyThereAndBack()
        _ = copyThereAndBack(streaming: true)
    }

    deinit {
        Kernel.releaseFrames(a, bytes: bytes)
        Kernel.releaseFrames(b, bytes: bytes)
    }

    /// One timed round of each copy; returns the memcpy seconds and keeps the bests.
    @discardableResult
    public func round() -> Double {
        let s = copyThereAndBack()
        bestSeconds = min(bestSeconds, s)
        bestStreamSeconds = min(bestStreamSeconds, copyThereAndBack(streaming: true))
        return s
    }

    /// Whether both buffers hold the pattern (both copies really moved the bytes).
    public func verify() -> Bool {
        Self.check(a, bytes: bytes, seed: seed) && Self.check(b, bytes: bytes, seed: seed)
    }

    /// Throughput of the best round, counted like a migration round trip:
    /// `2 * bytes` over the time.
    public var gigabytesPerSecond: Double { Double(2 * bytes) / bestSeconds / 1e9 }
    /// The same for the streaming copy.
    public var streamGigabytesPerSecond: Double { Double(2 * bytes) / bestStreamSeconds / 1e9 }

    /// Warm-up plus `rounds` timed rounds on their own; nil when the bytes
    /// differ afterwards (a broken copy, not a figure).
    public static func measure(bytes: Int, rounds: Int, seed: UInt64 = 0x5eed) -> MemcpyBaseline? {
        let m = MemcpyBaseline(bytes: bytes, seed: seed)
        for _ in 0..<max(1, rounds) { m.round() }
        return m.verify() ? m : nil
    }

    private func copyThereAndBack(streaming: Bool = false) -> Double {
        HostMemory.escape(a)
        HostMemory.escape(b)
        let t0 = HostClock.nanos()
        HostMemory.copy(to: b, from: a, bytes: bytes, streaming: streaming)
        if streaming { HostMemory.storeFence() }
        HostMemory.escape(b)
        HostMemory.copy(to: a, from: b, bytes: bytes, streaming: streaming)
        if streaming { HostMemory.storeFence() }
        HostMemory.escape(a)
        let t1 = HostClock.nanos()
        return Double(t1 - t0) / 1e9
    }

    static func word(_ i: Int, _ seed: UInt64) -> UInt64 {
        var x = UInt64(i) &* 0x9E37_79B9_7F4A_7C15 ^ seed
        x ^= x >> 29
        return x &* 0xBF58_476D_1CE4_E5B9
    }

    static func fill(_ p: UnsafeMutableRawPointer, bytes: Int, seed: UInt64) {
        let w = p.assumingMemoryBound(to: UInt64.self)
        for i in 0..<(bytes >> 3) { w[i] = word(i, seed) }
    }

    static func check(_ p: UnsafeMutableRawPointer, bytes: Int, seed: UInt64) -> Bool {
        let w = p.assumingMemoryBound(to: UInt64.self)
        for i in 0..<(bytes >> 3) where w[i] != word(i, seed) { return false }
        return true
    }
}

/// This host's own two-thread memcpy: the yardstick of the multi-threaded
/// folio copier. The calling thread copies the first half of a batch (of one
/// folio: its first half, cut at a page boundary; of several: the first
/// half of the folios) while one helper thread copies the other half; the
/// call returns when both are done. Between `arm()` and `disarm()` the
/// helper polls for work as the copier's workers do in a run (a spin,
/// `sched_yield` every 64 polls), so both pay the same hand-off; otherwise
/// it sleeps, leaving the host's CPUs to what else is measured. Nothing
/// else (no claims, no chunks, no choice).
public final class TwoThreadMemcpy: @unchecked Sendable {
    private let generation = Atomic<UInt64>(0)
    private let finished = Atomic<UInt64>(0)
    private let stopping = Atomic<Bool>(false)
    // The helper's half, written before `generation` is raised (release)
    // and read after the helper sees it (acquire).
    private var helperJobs = UnsafeBufferPointer<FolioCopyJob>(start: nil, count: 0)
    private var helperOffset = 0
    private var thread: Thread?
    private let exited = Atomic<Bool>(false)
    private let armed = Atomic<Bool>(false)
    private let polling = Atomic<Bool>(false)
    private let wake = NSCondition()

    /// Starts the helper thread.
    public init() {
        let t = Thread { [unowned(unsafe) self] in self.help() }
        thread = t
        t.start()
    }

    deinit { shutdown() }

    /// Stops the helper (bounded: it polls).
    public func shutdown() {
        guard thread != nil else { return }
        stopping.store(true, ordering: .releasing)
        wake.lock(); wake.signal(); wake.unlock()
        while !exited.load(ordering: .acquiring) { HostThread.yield() }
        thread = nil
    }

    /// Wakes the helper and returns once it polls for work.
    public func arm() {
        wake.lock()
        armed.store(true, ordering: .releasing)
        wake.signal()
        wake.unlock()
        while !polling.load(ordering: .acquiring) { HostThread.yield() }
    }

    /// Lets the helper sleep until the next `arm()`.
    public func disarm() { armed.store(false, ordering: .releasing) }

    /// Copies every job, half on the calling thread and half on the helper
    /// (between `arm()` and `disarm()`).
    public func copy(_ jobs: UnsafeBufferPointer<FolioCopyJob>) {
        guard !jobs.isEmpty else { return }
        let mine: UnsafeBufferPointer<FolioCopyJob>
        if jobs.count == 1 {
            // One folio: the helper takes its second half.
            let half = (jobs[0].bytes / 2) & ~(PageGeometry.pageSize - 1)
            helperJobs = jobs
            helperOffset = half
            mine = jobs
            publish()
            svm_copy(jobs[0].destination, jobs[0].source, half)
        } else {
            let cut = jobs.count / 2
            helperJobs = UnsafeBufferPointer(rebasing: jobs[cut...])
            helperOffset = 0
            mine = UnsafeBufferPointer(rebasing: jobs[..<cut])
            publish()
            for j in mine { svm_copy(j.destination, j.source, j.bytes) }
        }
        let target = generation.load(ordering: .relaxed)
        while finished.load(ordering: .acquiring) != target { HostThread.relax() }
    }

    private func publish() { generation.add(1, ordering: .releasing) }

    private func svm_copy(_ d: UnsafeMutableRawPointer, _ s: UnsafeRawPointer, _ n: Int) {
        HostMemory.copy(to: d, from: s, bytes: n, streaming: false)
    }

    private func help() {
        var seen: UInt64 = 0
        var polls = 0
        var saidPolling = false
        while !stopping.load(ordering: .acquiring) {
            if !armed.load(ordering: .acquiring) {
                polling.store(false, ordering: .releasing)
                saidPolling = false
                wake.lock()
                while !armed.load(ordering: .acquiring) && !stopping.load(ordering: .acquiring) { wake.wait() }
                wake.unlock()
                continue
            }
            if !saidPolling {
                polling.store(true, ordering: .releasing)
                saidPolling = true
            }
            let now = generation.load(ordering: .acquiring)
            if now == seen {
                polls += 1
                if polls & 63 == 0 { HostThread.yield() } else { HostThread.relax() }
                continue
            }
            seen = now
            if helperJobs.count == 1 && helperOffset > 0 {
                let j = helperJobs[0]
                svm_copy(j.destination + helperOffset, j.source + helperOffset, j.bytes - helperOffset)
            } else {
                for j in helperJobs { svm_copy(j.destination, j.source, j.bytes) }
            }
            finished.store(now, ordering: .releasing)
        }
        exited.store(true, ordering: .releasing)
    }
}
