import Synchronization
import CSVMSupport

/// TLB shootdowns: how a change to the page tables reaches every CPU's TLB.
///
/// The flusher invalidates its own TLB, advances the address space's flush
/// generation, and sends an IPI to every other CPU that runs the address
/// space; it then waits for each CPU that is inside an access to reach the
/// end of it (an instruction boundary), where the CPU flushes what the IPI
/// asked. A CPU between accesses is not waited for: it flushes when it next
/// runs in the address space, because its generation is behind (x86's
/// `tlb_gen`). A CPU with no thread (lazy TLB) gets no IPI at all.
///
/// What keeps data safe is the kernel's order around this: unmap (a migration
/// entry), flush, copy, remap. Until the flush returns, another CPU may still
/// read and write the old frame through its TLB.
extension AddressSpace {
    /// Range flushes above this many pages flush everything
    /// (x86's `tlb_single_page_flush_ceiling`).
    static let singlePageFlushCeiling: UInt64 = 33
    /// How long a flusher waits for one CPU before it reports the CPU stuck
    /// (the kernel's CSD-lock warning); it keeps waiting afterwards.
    static let shootdownWarnNanos: UInt64 = 5_000_000_000

    /// Flushes `[start, end)` of this address space from every CPU's TLB and
    /// returns when no CPU can use a translation of it any more.
    ///
    /// Call it after changing the entries of the range (under their lock or
    /// not), and before relying on no CPU accessing the old frames: before
    /// copying a page being migrated, before freeing a page that was mapped.
    /// Must not be called from inside an access (a `withPageBytes` body).
    ///
    /// Counts `nr_tlb_local_flush_one` per page (or `nr_tlb_local_flush_all`
    /// above the ceiling) when this CPU has the address space loaded,
    /// `nr_tlb_remote_flush` once when an IPI went out, `tlb_ipis_sent` per
    /// IPI, and each receiving CPU counts `nr_tlb_remote_flush_received`.
    /// The time spent waiting for other CPUs is the `tlbFlush` phase.
    ///
    /// - Parameters:
    ///   - start: first address flushed.
    ///   - end: one past the last address; an empty range does nothing.
    ///
    /// The corresponding kernel function is `flush_tlb_mm_range()`.
    public func flushTLBRange(_ start: UInt64, _ end: UInt64) {
        guard end > start else { return }
        kernel.shootdown(tlbContext, start, end)
    }
}

extension Kernel {
    /// ``AddressSpace/flushTLBRange(_:_:)`` of the address space `ctx`
    /// belongs to, reached through its flush generation and CPU mask only
    /// (what a deferred flush keeps: the address space itself may be gone).
    /// Does nothing when the address space skips its flushes.
    func shootdown(_ ctx: TLBContext, _ start: UInt64, _ end: UInt64) {
        guard end > start, !ctx.skipsFlushes.load(ordering: .relaxed) else { return }
        let pages = (end - start) >> PageGeometry.pageShift
        let vm = vmstat
        svm_tsan_release(ctx.syncAddress)
        let gen = UInt64(bitPattern: Int64(UnsafeAtomic(ctx.gen).wrappingAdd(1, ordering: .sequentiallyConsistent).newValue))
        vm.count(.tlbPagesFlushed, pages)
        var me: UInt64 = 0
        if let cpu = cpus.currentIfBound(), UnsafeAtomic(cpu.words + CPUWord.loadedMM).load(ordering: .relaxed) == UInt64(ctx.id) {
            me = UInt64(1) << UInt64(cpu.index)
            if cpu.invalidate(start, end) { vm.count(.tlbLocalFlushAll) } else { vm.count(.tlbLocalFlushOne, pages) }
            if _slowPath(svm_det_active()) { DeterministicScheduler.charge(\.localFlush, "local TLB flush") }
            // Up to date unless flushes were missed (then the next access catches up).
            if cpu.words[CPUWord.localGen] == gen - 1 { cpu.words[CPUWord.localGen] = gen }
        }
        let others = ctx.cpumask.load(ordering: .sequentiallyConsistent) & ~me
        guard others != 0 else { return }
        ipiRound(others) { cpu in
            // No thread (lazy TLB) or another address space loaded: no IPI.
            guard UnsafeAtomic(cpu.words + CPUWord.bound).load(ordering: .acquiring) != 0,
                  UnsafeAtomic(cpu.words + CPUWord.loadedMM).load(ordering: .acquiring) == UInt64(ctx.id) else { return false }
            cpu.post(mm: UInt64(ctx.id), gen: gen, start: start, end: end)
            return true
        }
    }

    /// The IPI round of a flush: `post` puts a request in the inbox of each
    /// CPU of `mask` it accepts (false: no IPI for that one), and the
    /// flusher waits for each CPU so interrupted inside an access to reach
    /// its instruction boundary. The asymmetric fence stands for the IPI's
    /// delivery: every CPU that began an access before it has published it;
    /// every one that begins later sees the new generation. Counts
    /// `nr_tlb_remote_flush` once when an IPI went out and `tlb_ipis_sent`
    /// per IPI; the time is the `tlbFlush` phase.
    @inline(__always)
    private func ipiRound(_ mask: UInt64, _ post: (CPU) -> Bool) {
        let mark = phases.begin()
        svm_membarrier()
        var sent: UInt64 = 0
        var rest = mask
        while rest != 0 {
            let i = rest.trailingZeroBitCount
            rest &= rest - 1
            let cpu = cpus.cpu(i)
            guard post(cpu) else { continue }
            sent += 1
            let seq = UnsafeAtomic(cpu.words + CPUWord.seq).load(ordering: .acquiring)
            if seq & 1 == 1 { waitForBoundary(cpu, seq) }
            svm_tsan_acquire(cpu.words)
        }
        if sent > 0 {
            vmstat.count(.tlbRemoteFlush)
            vmstat.count(.tlbIPIsSent, sent)
            if _slowPath(svm_det_active()) { DeterministicScheduler.charge(\.ipi, "IPI round") }
        }
        phases.end(.tlbFlush, mark)
    }

    /// The full flush of a batch (`arch_tlbbatch_flush()`): every CPU of
    /// `cpumask` (the flusher's own included) drops its whole TLB if it is
    /// behind the generation of the address space it has loaded, and
    /// catches up to it. The generations of the batch's address spaces were
    /// advanced before `cpumask` was read. Counts `nr_tlb_local_flush_all`
    /// for the flusher's own CPU, `nr_tlb_remote_flush` once when an IPI
    /// went out and `tlb_ipis_sent` per IPI; the wait is the `tlbFlush`
    /// phase.
    func shootdownAll(_ cpumask: UInt64, _ contexts: [TLBContext]) {
        var me: UInt64 = 0
        if let cpu = cpus.currentIfBound(), cpumask & (UInt64(1) << UInt64(cpu.index)) != 0 {
            me = UInt64(1) << UInt64(cpu.index)
            let loaded = UnsafeAtomic(cpu.words + CPUWord.loadedMM).load(ordering: .relaxed)
            if let ctx = contexts.first(where: { UInt64($0.id) == loaded }) {
                let gen = ctx.generation
                if cpu.words[CPUWord.localGen] != gen {
                    cpu.invalidateAll()
                    cpu.words[CPUWord.localGen] = gen
                    vmstat.count(.tlbLocalFlushAll)
                }
            }
        }
        let others = cpumask & ~me
        guard others != 0 else { return }
        ipiRound(others) { cpu in
            // No thread (lazy TLB): no IPI; it catches up when it next runs.
            guard UnsafeAtomic(cpu.words + CPUWord.bound).load(ordering: .acquiring) != 0 else { return false }
            cpu.post(mm: 0, gen: CPU.fullFlushRequest, start: 0, end: UInt64.max & PageGeometry.pageMask)
            return true
        }
    }

    /// Spins briefly, then sleeps, until `cpu` leaves the access it was in.
    ///
    /// Sleeping rather than yielding matters when the host has fewer cores
    /// than busy threads: the thread that emulates `cpu` may have been
    /// preempted inside its access, and a flusher that spins or yields keeps
    /// the core it needs. The sleep asks to be woken (`flusherSleeping`,
    /// then `membarrier()`: either the CPU's boundary store is visible below,
    /// or its boundary check sees the IPI posted before and wakes us, see
    /// `CPU.handleIPI`); it is also bounded to 1 ms, so a wake-up that never
    /// comes (the CPU took the IPI early, in a nested access) costs time only.
    private func waitForBoundary(_ cpu: CPU, _ seq: UInt64) {
        var spins = 0
        var since: UInt64 = 0
        var warned = false
        while UnsafeAtomic(cpu.words + CPUWord.seq).load(ordering: .acquiring) == seq {
            spins += 1
            if spins < 128 { svm_cpu_relax(); continue }
            UnsafeAtomic(cpu.flusherSleeping).store(1, ordering: .releasing)
            svm_membarrier()
            if UnsafeAtomic(cpu.words + CPUWord.seq).load(ordering: .acquiring) != seq { break }
            _ = svm_futex_wait(cpu.flusherSleeping, 1, 1_000_000)
            if !warned {
                let now = HostClock.nanos()
                if since == 0 { since = now } else if now - since > AddressSpace.shootdownWarnNanos {
                    warned = true
                    warn("TLB shootdown: a CPU has not reached an instruction boundary for 5 s (an access body that blocks?)",
                                "cpu \(cpu.index)", kind: .hungTask)
                }
            }
        }
    }
}

extension AddressSpace {
    /// Marks the start of a change to entries whose TLB flush comes later
    /// (`inc_tlb_flush_pending()`): until the matching
    /// ``decTLBFlushPending()``, a CPU may still use a translation the
    /// page tables no longer give, and code that reads an entry to decide
    /// what CPUs can do with a page (the deferred flush's "every mapping
    /// was read-only", the stale-entry checker) must not trust it.
    /// Call it before the first entry changes.
    func incTLBFlushPending() { state.flushPendingCount.add(1, ordering: .sequentiallyConsistent) }
    /// The flush that covers the change has returned (`dec_tlb_flush_pending()`).
    func decTLBFlushPending() {
        if state.flushPendingCount.subtract(1, ordering: .sequentiallyConsistent).newValue < 0 {
            state.flushPendingCount.store(0, ordering: .relaxed)
            kernel.warn("dec_tlb_flush_pending: more decrements than increments (an unbalanced tlb_gather)", "address space \(id)")
        }
    }
    /// Whether some change of this address space's entries still waits for
    /// its TLB flush (`mm_tlb_flush_pending()`). Read it under the
    /// page-table lock of the entry in question: a change in progress there
    /// was counted before its lock was taken.
    public var tlbFlushPending: Bool { state.flushPendingCount.load(ordering: .sequentiallyConsistent) > 0 }
}

/// A deferred, batched flush (`struct tlbflush_unmap_batch`): mappings
/// cleared while unmapping many pages, in one or several address spaces,
/// are flushed once, from every CPU that may cache them.
///
/// Like the kernel's batch it keeps no address space, only what the flush
/// needs: the CPUs that had one of them loaded (`arch_tlbbatch`'s cpumask)
/// and each one's flush generation and CPU mask (its `TLBContext`, which
/// CPUs keep too and which outlives the address space). An address space
/// may therefore exit while its ranges wait here. The flush is a full one,
/// as `arch_tlbbatch_flush()`'s.
public struct TLBFlushBatch {
    /// The CPUs to flush, gathered as mappings are added.
    var cpumask: UInt64 = 0
    /// The flush state of each address space added (retained).
    var contexts: [TLBContext] = []
    /// Base pages whose mappings were added, for `nr_tlb_pages_flushed`.
    var pages: UInt64 = 0
    var kernel: Kernel? = nil

    /// An empty batch.
    public init() {}

    /// Adds the cleared mappings of `[start, end)` in `mm` to the batch:
    /// the CPUs that have `mm` loaded join its CPU mask
    /// (`set_tlb_ubc_flush_pending()`). The batch keeps no reference to
    /// `mm`.
    ///
    /// The corresponding kernel function is `arch_tlbbatch_add_pending()`.
    ///
    /// - Parameters:
    ///   - mm: the address space whose entries were cleared.
    ///   - start: first address cleared.
    ///   - end: one past the last address; an empty range adds nothing.
    public mutating func add(_ mm: AddressSpace, _ start: UInt64, _ end: UInt64) {
        if kernel == nil { kernel = mm.kernel }
        add(mm.tlbContext, start, end)
    }

    /// ``add(_:_:_:)`` by the address space's flush state alone.
    mutating func add(_ ctx: TLBContext, _ start: UInt64, _ end: UInt64) {
        guard end > start, !ctx.skipsFlushes.load(ordering: .relaxed) else { return }
        if !contexts.contains(where: { $0 === ctx }) { contexts.append(ctx) }
        cpumask |= ctx.cpumask.load(ordering: .sequentiallyConsistent)
        pages &+= (end - start) >> PageGeometry.pageShift
    }

    /// Whether nothing waits to be flushed.
    public var isEmpty: Bool { contexts.isEmpty }

    /// Flushes everything gathered and empties the batch: advances the
    /// flush generation of every address space added (`inc_mm_tlb_gen()`),
    /// then has every CPU of the mask flush its whole TLB and catch up
    /// (one IPI round for all address spaces), waiting for each CPU inside
    /// an access to reach its end. Counts `nr_tlb_pages_flushed` for the
    /// pages added, and the flushes and IPIs as
    /// ``AddressSpace/flushTLBRange(_:_:)`` does.
    ///
    /// The emulator advances the generations here rather than when a
    /// mapping is added: its CPUs compare generations at every access, and
    /// an early advance would flush them before the batch does.
    ///
    /// The corresponding kernel function is `try_to_unmap_flush()`.
    public mutating func flush() {
        defer {
            cpumask = 0
            contexts.removeAll(keepingCapacity: true)
            pages = 0
        }
        guard !contexts.isEmpty, let kernel else { return }
        var mask = cpumask
        for ctx in contexts {
            svm_tsan_release(ctx.syncAddress)
            _ = UnsafeAtomic(ctx.gen).wrappingAdd(1, ordering: .sequentiallyConsistent).newValue
            // CPUs that loaded it since it was added started with an empty
            // TLB, but are now behind: flushing them is cheap and keeps the
            // generations in step.
            mask |= ctx.cpumask.load(ordering: .sequentiallyConsistent)
        }
        kernel.vmstat.count(.tlbPagesFlushed, pages)
        kernel.shootdownAll(mask, contexts)
    }
}
