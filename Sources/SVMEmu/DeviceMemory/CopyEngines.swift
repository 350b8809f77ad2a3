import CSVMSupport
#if canImport(Glibc)
import Glibc
#endif

/// The transfer-time curve of a device link (PCIe, NVLink-C2C), for
/// `LinkCopyEngine`.
///
/// The model is UVMSmart's (gpgpu-sim) DMA curve,
/// `GB/s = (2a / π) · atan(k · size_KiB)` with `k = 0.07292`: `a` is the
/// bandwidth a very large transfer approaches; small transfers are dominated
/// by a fixed setup latency of about `1024 / ((2a/π) · k)` ns (`22 µs / a`:
/// 0.92 µs on PCIe 4, 0.46 µs on PCIe 5). Anchors: PCIe 3 (`a = 12`) moves
/// 4 KiB in 1.9 µs and 2 MiB in 176 µs.
///
/// NVLink-C2C uses the same curve scaled to its 450 GB/s per direction
/// (`a = 450`), not a flat 450 GB/s: a flat rate would make a 4 KiB copy cost
/// 9 ns, below any DMA setup. Either way it is faster than this machine's own
/// memcpy (about 13 GB/s for 4 KiB chunks), so an NVLink-C2C engine charges
/// what the memcpy costs: the copy share it reports is an upper bound.
public struct LinkModel: Sendable, Hashable, CustomStringConvertible {
    /// Short name (`pcie4`, `pcie5`, `nvlink-c2c`).
    public let name: String
    /// `a`: the bandwidth large transfers approach, in GB/s (10^9 bytes a second).
    public let peakGBps: Double
    /// `k`: how fast the curve rises with the transfer size, per KiB.
    public let kneePerKiB: Double

    /// A link curve; `peakGBps` and `kneePerKiB` must be positive (else the
    /// process stops, see ``contractViolation(_:file:line:)``).
    public init(name: String, peakGBps: Double, kneePerKiB: Double = 0.07292) {
        if !(peakGBps > 0 && kneePerKiB > 0) { contractViolation("LinkModel: peakGBps and kneePerKiB must be positive") }
        self.name = name
        self.peakGBps = peakGBps
        self.kneePerKiB = kneePerKiB
    }

    /// PCIe 3 x16 (UVMSmart's calibration, `a = 12`).
    public static let pcie3 = LinkModel(name: "pcie3", peakGBps: 12)
    /// PCIe 4 x16 (`a = 24`; the link is ~32 GB/s per direction, DMA reaches ~75% of it).
    public static let pcie4 = LinkModel(name: "pcie4", peakGBps: 24)
    /// PCIe 5 x16 (`a = 48`).
    public static let pcie5 = LinkModel(name: "pcie5", peakGBps: 48)
    /// NVLink-C2C (Grace Hopper): the same curve scaled to 450 GB/s per direction.
    public static let nvlinkC2C = LinkModel(name: "nvlink-c2c", peakGBps: 450)

    /// The modelled bandwidth of one transfer of `bytes` bytes, in GB/s.
    @inlinable public func bandwidthGBps(bytes: Int) -> Double {
        2 * peakGBps / Double.pi * atan(kneePerKiB * Double(bytes) / 1024)
    }

    /// The modelled time of one transfer of `bytes` bytes, in nanoseconds
    /// (1 GB/s is one byte a nanosecond).
    @inlinable public func transferNanos(bytes: Int) -> Double {
        bytes <= 0 ? 0 : Double(bytes) / bandwidthGBps(bytes: bytes)
    }

    /// The name.
    public var description: String { name }
}

/// A copy engine that models a device link: it copies the bytes for real
/// (memcpy, optionally split across worker threads) and charges the time the
/// link would take for a transfer of that size when that is longer than the
/// memcpy, like a DMA engine on PCIe 4, PCIe 5 or NVLink-C2C.
///
/// Asynchronous, like a DMA queue: `copy` returns as soon as the transfer is
/// queued. Each thread has its own queue: a transfer starts when the thread's
/// previous one completes (or when issued, if later) and completes
/// `model.transferNanos(bytes:)` later, or when its bytes have really been
/// copied, whichever is later. `wait()` returns at the calling thread's modelled
/// completion (a precise wait: sleeps for long waits, spins for the last
/// ~100 µs since sleeps overshoot by ~50 µs). Work done between `copy` and
/// `wait` overlaps the transfer, as with a real fence.
///
/// With `threads > 1` a copy larger than 32 pages (128 KiB) is split into
/// `threads` parts: the caller copies one, `threads - 1` worker threads copy
/// the others, and `wait()` also waits for them (the kernel's multi-threaded
/// folio copy is useful only above 32 base pages). The link time does not
/// change: threads speed up the host memcpy, not the link.
///
/// Per-thread state lives in a fixed slot array indexed by the emulated CPU id
/// (`svm_thread_slot()`, one per live thread); nothing is allocated on the copy path.
public final class LinkCopyEngine: CopyEngine, @unchecked Sendable {
    /// The model's name (or `memcpy`), with `xN` for N threads.
    public let name: String
    /// The link, or nil for a plain (possibly multi-threaded) memcpy engine.
    public let model: LinkModel?
    /// Threads that copy one large transfer (the caller included).
    public let threads: Int
    /// Copies above this size are split across the worker threads.
    public static let splitThresholdBytes = 32 * PageGeometry.pageSize

    static let slotCount = Int(SVM_THREAD_SLOTS)
    static let slotBytes = 64
    // Per slot: completion time (UInt64 ns, offset 0), outstanding worker parts
    // (UInt32, offset 8), last size and its transfer time (offsets 16, 24).
    private let slots: UnsafeMutableRawPointer
    private let pool: CopyWorkerPool?

    /// An engine for `model` with `threads` copying threads; `threads` must be
    /// 1...64 (else the process stops, see ``contractViolation(_:file:line:)``).
    ///
    /// - Parameters:
    ///   - model: the link whose transfer time is charged; nil charges nothing
    ///     beyond the memcpy (a multi-threaded memcpy engine).
    ///   - threads: threads copying a transfer above 32 pages (1: the caller only).
    public init(model: LinkModel?, threads: Int = 1) {
        if !(1...64).contains(threads) { contractViolation("LinkCopyEngine: threads must be 1...64 (got \(threads))") }
        self.model = model
        self.threads = threads
        name = (model?.name ?? "memcpy") + (threads > 1 ? "x\(threads)" : "")
        let bytes = LinkCopyEngine.slotCount * LinkCopyEngine.slotBytes
        slots = .allocate(byteCount: bytes, alignment: 64)
        slots.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
        pool = threads > 1 ? CopyWorkerPool(workers: threads - 1) : nil
    }

    deinit {
        pool?.shutdown()
        slots.deallocate()
    }

    @inline(__always) private func slot() -> UnsafeMutableRawPointer {
        let slot = svm_thread_slot()
        if slot < 0 { contractViolation("LinkCopyEngine: more than \(LinkCopyEngine.slotCount) live threads copy at once") }
        return slots + Int(slot) * LinkCopyEngine.slotBytes
    }

    /// Copies the bytes (split across the workers above 32 pages) and queues
    /// the modelled transfer behind the calling thread's previous one.
    public func copy(to destination: UnsafeMutableRawPointer, from source: UnsafeRawPointer, bytes: Int) {
        guard bytes > 0 else { return }
        let s = slot()
        let issued = model == nil ? 0 : HostClock.nanos()
        if let pool, bytes > LinkCopyEngine.splitThresholdBytes {
            let pending = (s + 8).assumingMemoryBound(to: UInt32.self)
            // Parts of whole pages; the caller takes the first.
            let part = PageGeometry.pageAlign(bytes / threads)
            var offset = part
            while offset < bytes {
                let n = min(part, bytes - offset)
                pool.submit(CopyWorkerPool.Job(destination: destination + offset, source: source + offset,
                                               bytes: n, pending: pending))
                offset += n
            }
            svm_memcpy(destination, source, min(part, bytes))
        } else {
            svm_memcpy(destination, source, bytes)
        }
        guard let model else { return }
        let completion = s.assumingMemoryBound(to: UInt64.self)
        // One-entry memo per thread: drivers copy the same size over and over.
        let lastBytes = (s + 16).assumingMemoryBound(to: Int.self)
        let lastNanos = (s + 24).assumingMemoryBound(to: UInt64.self)
        if lastBytes.pointee != bytes {
            lastBytes.pointee = bytes
            lastNanos.pointee = UInt64(model.transferNanos(bytes: bytes).rounded(.up))
        }
        let start = max(issued, completion.pointee)
        completion.pointee = max(start + lastNanos.pointee, HostClock.nanos())
    }

    /// Waits for the calling thread's worker parts, then until its last
    /// modelled transfer completes.
    public func wait() {
        let s = slot()
        if pool != nil { CopyWorkerPool.waitForZero((s + 8).assumingMemoryBound(to: UInt32.self)) }
        if model != nil { LinkCopyEngine.waitUntil(nanos: s.load(as: UInt64.self)) }
    }

    /// Waits until the monotonic clock (`HostClock.nanos()`) reaches `target`:
    /// sleeps while more than 200 µs remain (waking 100 µs early, since a
    /// sleep overshoots by ~50 µs), then spins.
    public static func waitUntil(nanos target: UInt64) {
        var now = HostClock.nanos()
        if _slowPath(svm_det_active()) {
            // Virtual time does not pass by spinning: sleep the rest.
            if target > now { HostClock.sleep(nanos: target - now) }
            return
        }
        if target > now + 200_000 {
            let sleep = target - now - 100_000
            HostClock.sleep(nanos: sleep)
            now = HostClock.nanos()
        }
        while now < target {
            svm_cpu_relax()
            now = HostClock.nanos()
        }
    }
}
