import CSVMSupport

/// Host memory for flat, address-indexed storage (page-table arrays, frames,
/// device page tables): anonymous private mappings that cost nothing until
/// touched, and the byte copies the copy engines and benchmarks make.
public enum HostMemory {
    /// Whether this build runs under ThreadSanitizer (`make tsan`): its
    /// shadow memory needs far more address space than a `ulimit -v` leaves,
    /// so a run under such a limit cannot even start.
    public static var underThreadSanitizer: Bool { svm_tsan_enabled() }

    /// Reserves `bytes` of lazily touched, zero-filled memory with no swap
    /// reservation; nil when the host refuses the address space. Release it
    /// with `release(_:bytes:)`.
    ///
    /// The corresponding C function is `mmap(MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)`.
    public static func reserve(bytes: Int) -> UnsafeMutableRawPointer? {
        if let limit = refusesFromBytes, bytes >= limit { return nil }
        return system_mmap_anonymous(bytes)
    }

    /// `reserve(bytes:)` for a caller that reports the refusal: the error
    /// names how much was asked, for what, and the host's errno (`ENOMEM`
    /// under `ulimit -v`). Drivers reserve their own flat tables with it
    /// and throw the refusal to their caller: valid input never stops the
    /// process.
    ///
    /// - Parameters:
    ///   - bytes: how much address space.
    ///   - what: what it is for, for the message ("the device page table").
    /// - Throws: ``HostMemoryRefusal``.
    ///
    /// The corresponding C function is `mmap(MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)`.
    public static func reserve(bytes: Int, for what: String) throws(HostMemoryRefusal) -> UnsafeMutableRawPointer {
        guard let p = reserve(bytes: bytes) else {
            throw HostMemoryRefusal(bytes: bytes, purpose: what,
                                    errno: refusesFromBytes.map { bytes >= $0 } == true ? .noMemory : Errno(rawValue: system_errno))
        }
        return p
    }

    /// A host that refuses, for tests: while bound (in the binding task
    /// only, so tests running beside it are unaffected), every reservation
    /// of at least this many bytes fails with `ENOMEM`, as under a
    /// `ulimit -v` that leaves less than that.
    @TaskLocal static var refusesFromBytes: Int? = nil

    /// Asks the host to back `bytes` at `p` (from `reserve`) with huge pages
    /// where it can: one host TLB entry and one host fault per 2 MiB.
    ///
    /// The corresponding C function is `madvise(MADV_HUGEPAGE)`.
    static func adviseHugePages(_ p: UnsafeMutableRawPointer, bytes: Int) {
        system_madvise_hugepage(p, bytes)
    }

    /// Backs `bytes` at `p` (from `reserve`) with host memory now, so that
    /// later first writes do not each take a host page fault (and, with host
    /// huge pages, the zeroing of 2 MiB). A host without
    /// `MADV_POPULATE_WRITE` gets one write per host page instead.
    ///
    /// The corresponding C function is `madvise(MADV_POPULATE_WRITE)`.
    static func populate(_ p: UnsafeMutableRawPointer, bytes: Int) {
        if system_madvise_populate_write(p, bytes) { return }
        var offset = 0
        while offset < bytes {
            (p + offset).storeBytes(of: 0, as: UInt8.self)
            offset += PageGeometry.pageSize
        }
    }

    /// Returns memory from `reserve(bytes:)` to the host.
    ///
    /// The corresponding C function is `munmap`.
    public static func release(_ p: UnsafeMutableRawPointer, bytes: Int) {
        system_munmap(p, bytes)
    }

    /// Copies `bytes` bytes: through the caches, or with `streaming` with
    /// non-temporal stores and non-temporal prefetches of the source, as a
    /// DMA engine reads and writes memory without filling the CPU caches
    /// (64-byte multiples on 16-byte aligned buffers; anything else is a plain
    /// copy). Streaming stores are weakly ordered: other threads
    /// see them after `storeFence()`.
    ///
    /// The corresponding C function is `memcpy`.
    @inlinable @inline(__always)
    public static func copy(to destination: UnsafeMutableRawPointer, from source: UnsafeRawPointer, bytes: Int,
                            streaming: Bool = false) {
        if streaming {
            svm_copy_stream_unfenced(destination, source, bytes)
        } else {
            svm_memcpy(destination, source, bytes)
        }
    }

    /// Orders every earlier streaming store of this thread before its later
    /// stores: one fence for a batch of streaming copies, like one DMA completion.
    @inlinable @inline(__always)
    public static func storeFence() { svm_store_fence() }

    /// A compiler barrier on `p`: the optimizer must assume the bytes there
    /// are read and written, so a benchmark's copies are neither dropped nor
    /// merged.
    @inlinable @inline(__always)
    public static func escape(_ p: UnsafeMutableRawPointer) { svm_escape(p) }
}

/// The host refused address space the emulator needed (an `mmap` failed,
/// typically under `ulimit -v` or a cgroup's memory limit): how much, for
/// what, and the host's errno. ``Kernel/init(booting:)`` throws it.
public struct HostMemoryRefusal: Error, Sendable, Equatable, CustomStringConvertible {
    /// Bytes of address space asked for.
    public let bytes: Int
    /// What they were for ("page metadata", "RAM node 0").
    public let purpose: String
    /// What `mmap` failed with (`ENOMEM` under `ulimit -v`).
    public let errno: Errno

    public init(bytes: Int, purpose: String, errno: Errno) {
        self.bytes = bytes
        self.purpose = purpose
        self.errno = errno
    }

    /// "the host refused 8.0 GiB of address space for page metadata
    /// (ENOMEM (Cannot allocate memory)); is a limit set (ulimit -v)?"
    public var description: String {
        "the host refused \(ByteSize.describe(bytes)) of address space for \(purpose) (\(errno))"
            + (errno == .noMemory ? "; the address-space limit (ulimit -v) or the host's memory is too small" : "")
    }
}
