import CSVMSupport
import Synchronization

/// One cached translation: 32 bytes.
@usableFromInline
struct TLBEntry {
    /// The virtual page number (or 2 MiB frame number) with the TLB's epoch
    /// in bits 52 and up; 0 never matches (epochs start at 1).
    @usableFromInline var tag: UInt64
    /// Host address of the frame's first byte (the page, or the 2 MiB folio).
    @usableFromInline var frame: UnsafeMutableRawPointer?
    /// `pfn << 2 | dirty << 1 | writable`.
    @usableFromInline var info: UInt64
    /// With the stale-entry checker on, the frame's allocation generation
    /// when the entry was filled (the head's for a 2 MiB entry); else 0.
    @usableFromInline var allocGen: UInt64
}

/// The shape of every CPU's TLB: set-associative, 4 ways, 2,048 entries for
/// 4 KiB pages and 128 for 2 MiB pages (the order of an x86 core's second-level
/// TLB), most recently filled way first, invalidated whole by starting a new epoch.
@usableFromInline
enum TLB {
    @usableFromInline static let ways = 4
    @usableFromInline static let sets4K = 512
    @usableFromInline static let sets2M = 32
    @usableFromInline static let entries4K = sets4K * ways
    @usableFromInline static let entriesPerCPU = entries4K + sets2M * ways
    /// Where the epoch starts in a tag: above every page number a 64-bit
    /// address has (52 bits), so no address, however wild, matches an entry
    /// it does not own, and the access fast path needs no range check. Every
    /// entry maps an address inside its address space (below 2^47,
    /// ``KernelConfiguration/maxAddressSpaceSize``); any other address misses
    /// and takes the full path, which finds no VMA.
    @usableFromInline static let epochShift: UInt64 = 52
    /// Epochs fit in the tag's top 12 bits: at the last one the TLB is
    /// cleared and epochs start again (one 70 KB clear per 4,095 full
    /// flushes or switches of address space).
    static let maxEpoch: UInt64 = 1 << 12
    @usableFromInline static let writable: UInt64 = 1
    @usableFromInline static let dirty: UInt64 = 2
}

/// What CPUs know of an address space (the parts of `mm_struct` the x86 TLB
/// code reads): its flush generation and which CPUs have it loaded. CPUs
/// retain it, so an address space may go away while a CPU still has it loaded.
@usableFromInline
final class TLBContext: @unchecked Sendable {
    @usableFromInline let id: UInt32
    /// `mm->context.tlb_gen`: advanced by every flush of the address space.
    @usableFromInline let gen: UnsafeMutablePointer<UInt64>
    /// `mm_cpumask()`: CPUs that have the address space loaded. A CPU sets
    /// its bit when it switches to the address space and clears it when it
    /// switches away; flushers only read it.
    let cpumask = Atomic<UInt64>(0)
    /// Fault injection for tests: the address space's flushes are forgotten
    /// (see `AddressSpace.skipsTLBFlushes`), batched and deferred ones too.
    let skipsFlushes = Atomic<Bool>(false)
    init(id: UInt32) {
        self.id = id
        gen = .allocate(capacity: 8)  // a cache line of its own
        gen.initialize(repeating: 0, count: 8)
    }
    deinit { gen.deallocate() }
    /// The current flush generation.
    var generation: UInt64 { UnsafeAtomic(gen).load(ordering: .acquiring) }
    @usableFromInline var syncAddress: UnsafeRawPointer { UnsafeRawPointer(Unmanaged.passUnretained(self).toOpaque()) }
}

/// A CPU of the emulated machine, as the thread running on it sees it: its
/// state words and its TLB. Only that thread calls the `mutating`-style
/// operations below; flushers reach a CPU only through its inbox.
@usableFromInline
struct CPU {
    @usableFromInline let index: Int
    @usableFromInline let words: UnsafeMutablePointer<UInt64>
    @usableFromInline let tlb: UnsafeMutablePointer<TLBEntry>

    @inlinable init(index: Int, words: UnsafeMutablePointer<UInt64>, tlb: UnsafeMutablePointer<TLBEntry>) {
        self.index = index
        self.words = words
        self.tlb = tlb
    }

    // MARK: instruction boundaries

    /// The start of an access: the CPU is inside an instruction until
    /// `endAccess(_:_:)`. Loads `mm` if another address space is loaded, and
    /// catches up with flushes it was not interrupted for.
    ///
    /// - Returns: the token `endAccess(_:_:)` takes: the access sequence as
    ///   it was, odd when this access is nested in another (a body that
    ///   accesses memory again), which then leaves the boundary to it.
    @inlinable @inline(__always)
    func beginAccess(_ mm: AddressSpace) -> UInt64 {
        // Only this CPU's thread writes `seq`: the value read here is kept in
        // a register for the end, and nesting is its parity (no counter to
        // load and store again at each boundary).
        let seq = UnsafeAtomic(words + CPUWord.seq).load(ordering: .relaxed)
        if seq & 1 == 0 {
            UnsafeAtomic(words + CPUWord.seq).store(seq &+ 1, ordering: .relaxed)
            // The flusher's membarrier() orders its side; here the compiler
            // must only keep the loads below after the store above.
            if mm.cpuAccess.fenceOnAccess { svm_fence() } else { svm_compiler_barrier() }
        }
        enterIfNeeded(mm)
        return seq
    }

    /// The start of an access that is not nested in another, on a machine
    /// whose accesses need no fence (the access fast path): like
    /// ``beginAccess(_:)``, or nil, having done nothing, inside an access.
    /// The access ends with ``endOuterAccess(_:_:)``.
    @inlinable @inline(__always)
    func beginOuterAccess(_ mm: AddressSpace) -> UInt64? {
        let seq = UnsafeAtomic(words + CPUWord.seq).load(ordering: .relaxed)
        guard seq & 1 == 0 else { return nil }
        UnsafeAtomic(words + CPUWord.seq).store(seq &+ 1, ordering: .relaxed)
        svm_compiler_barrier()
        enterIfNeeded(mm)
        return seq
    }

    /// Loads `mm` and catches up with its flushes, when either is needed.
    @inlinable @inline(__always)
    func enterIfNeeded(_ mm: AddressSpace) {
        // Both checks first, one rarely taken call after them: the common
        // access spills no register for either.
        let loaded = UnsafeAtomic(words + CPUWord.loadedMM).load(ordering: .relaxed)
        let gen = UnsafeAtomic(mm.tlbGen).load(ordering: .acquiring)
        if _slowPath(loaded != UInt64(mm.id) || gen != words[CPUWord.localGen]) { enter(mm) }
    }

    /// The rest of an access's start: load `mm` if another address space
    /// is loaded (`switch_mm()`), then catch up with its flushes.
    @usableFromInline @inline(never)
    func enter(_ mm: AddressSpace) {
        if UnsafeAtomic(words + CPUWord.loadedMM).load(ordering: .relaxed) != UInt64(mm.id) { switchTo(mm) }
        let gen = UnsafeAtomic(mm.tlbGen).load(ordering: .acquiring)
        if gen != words[CPUWord.localGen] { catchUp(mm, gen) }
    }

    /// The end of an access (an instruction boundary): a flusher waiting for
    /// this CPU may go on, and an IPI that arrived meanwhile is handled.
    /// `token` is what `beginAccess(_:)` returned; a nested access ends
    /// nothing.
    @inlinable @inline(__always)
    func endAccess(_ mm: AddressSpace, _ token: UInt64) {
        if token & 1 == 0 { endOuterAccess(mm, token) }
    }

    /// The end of an access ``beginOuterAccess(_:)`` began (`seq` is what
    /// it returned).
    @inlinable @inline(__always)
    func endOuterAccess(_ mm: AddressSpace, _ seq: UInt64) {
        svm_tsan_release(words)
        UnsafeAtomic(words + CPUWord.seq).store(seq &+ 2, ordering: .releasing)
        if UnsafeAtomic(words + CPUWord.inboxGen).load(ordering: .relaxed) != 0 { handleIPI(mm) }
    }

    // MARK: lookups and fills

    /// The bytes `address` translates to through this TLB for a read or a
    /// write, or nil on a miss (or an entry that does not allow the access).
    @inlinable @inline(__always)
    func lookup(_ address: UInt64, write: Bool) -> (entry: UnsafeMutablePointer<TLBEntry>, bytes: UnsafeMutableRawPointer)? {
        let epoch = words[CPUWord.epoch] << TLB.epochShift
        let need: UInt64 = write ? TLB.writable | TLB.dirty : 0
        let vpn = address >> PageGeometry.pageShift
        var e = tlb + Int(truncatingIfNeeded: vpn & UInt64(TLB.sets4K - 1)) &* TLB.ways
        var tag = vpn | epoch
        for _ in 0..<TLB.ways {
            if e.pointee.tag == tag {
                guard e.pointee.info & need == need, let frame = e.pointee.frame else { return nil }
                return (e, frame + Int(truncatingIfNeeded: address & ~PageGeometry.pageMask))
            }
            e += 1
        }
        let hpn = address >> PageGeometry.pmdShift
        e = tlb + (TLB.entries4K &+ Int(truncatingIfNeeded: hpn & UInt64(TLB.sets2M - 1)) &* TLB.ways)
        tag = hpn | epoch
        for _ in 0..<TLB.ways {
            if e.pointee.tag == tag {
                guard e.pointee.info & need == need, let frame = e.pointee.frame else { return nil }
                return (e, frame + Int(truncatingIfNeeded: address & ~PageGeometry.pmdMask))
            }
            e += 1
        }
        return nil
    }

    /// Caches a translation found by a page walk: replaces an entry for the
    /// same page, else goes in first and pushes the set's oldest out.
    @usableFromInline
    func fill(_ address: UInt64, huge: Bool, frame: UnsafeMutableRawPointer, pfn: UInt64, writable: Bool, dirty: Bool, allocGen: UInt32 = 0) {
        let epoch = words[CPUWord.epoch] << TLB.epochShift
        let number = huge ? address >> PageGeometry.pmdShift : address >> PageGeometry.pageShift
        let base = huge ? tlb + TLB.entries4K + Int(number & UInt64(TLB.sets2M - 1)) * TLB.ways
                        : tlb + Int(number & UInt64(TLB.sets4K - 1)) * TLB.ways
        let tag = number | epoch
        let entry = TLBEntry(tag: tag, frame: frame, info: pfn << 2 | (dirty ? TLB.dirty : 0) | (writable ? TLB.writable : 0), allocGen: UInt64(allocGen))
        for w in 0..<TLB.ways where base[w].tag == tag {
            base[w] = entry
            return
        }
        var w = TLB.ways - 1
        while w > 0 { base[w] = base[w - 1]; w -= 1 }
        base[0] = entry
    }

    // MARK: invalidation (the CPU's own)

    /// Drops every entry (a full flush, or a switch of address space): a new epoch.
    func invalidateAll() {
        var epoch = words[CPUWord.epoch] + 1
        if epoch >= TLB.maxEpoch {
            tlb.update(repeating: TLBEntry(tag: 0, frame: nil, info: 0, allocGen: 0), count: TLB.entriesPerCPU)
            epoch = 1
        }
        words[CPUWord.epoch] = epoch
    }

    /// Drops the entries of `[start, end)`: page by page up to the flush
    /// ceiling, else everything (x86's `flush_tlb_func()`). Returns whether it
    /// flushed everything.
    @discardableResult
    func invalidate(_ start: UInt64, _ end: UInt64) -> Bool {
        let pages = (end - start) >> PageGeometry.pageShift
        guard pages <= AddressSpace.singlePageFlushCeiling else {
            invalidateAll()
            return true
        }
        let epoch = words[CPUWord.epoch] << TLB.epochShift
        var a = start & PageGeometry.pageMask
        while a < end {
            let vpn = a >> PageGeometry.pageShift
            let base = tlb + Int(vpn & UInt64(TLB.sets4K - 1)) * TLB.ways
            for w in 0..<TLB.ways where base[w].tag == vpn | epoch { base[w].tag = 0 }
            a += PageGeometry.pageSize64
        }
        var h = start >> PageGeometry.pmdShift
        while h <= (end - 1) >> PageGeometry.pmdShift {
            let base = tlb + TLB.entries4K + Int(h & UInt64(TLB.sets2M - 1)) * TLB.ways
            for w in 0..<TLB.ways where base[w].tag == h | epoch { base[w].tag = 0 }
            h += 1
        }
        return false
    }

    // MARK: slow paths

    /// `switch_mm()`: leave the loaded address space (clearing this CPU's bit
    /// in its mask), load `mm`, start with an empty TLB (no PCIDs).
    @usableFromInline @inline(never)
    func switchTo(_ mm: AddressSpace) {
        let set = mm.kernel.cpus
        let bit = UInt64(1) << UInt64(index)
        if let old = set.loaded[index] {
            old.takeUnretainedValue().cpumask.bitwiseAnd(~bit, ordering: .releasing)
            old.release()
        }
        let ctx = mm.tlbContext
        set.loaded[index] = .passRetained(ctx)
        invalidateAll()
        drainInbox(set)
        UnsafeAtomic(words + CPUWord.loadedMM).store(UInt64(mm.id), ordering: .releasing)
        // A full barrier (a locked RMW): either a flusher sees the bit, or
        // the generation read below sees its flush.
        ctx.cpumask.bitwiseOr(bit, ordering: .sequentiallyConsistent)
        words[CPUWord.localGen] = ctx.generation
        svm_tsan_acquire(ctx.syncAddress)
    }

    /// The address space was flushed while this CPU was not interrupted for
    /// it (it was between accesses, or had no thread): take the IPI that
    /// waits in the inbox, or flush everything when generations were missed.
    @usableFromInline @inline(never)
    func catchUp(_ mm: AddressSpace, _ gen: UInt64) {
        let ctx = mm.tlbContext, set = mm.kernel.cpus
        svm_tsan_acquire(ctx.syncAddress)
        let local = words[CPUWord.localGen]
        if let r = drainInbox(set), r.mm == UInt64(ctx.id), r.gen == gen, gen == local + 1 {
            if invalidate(r.start, r.end) { set.vmstat.count(.tlbLocalFlushAll) }
        } else {
            invalidateAll()
        }
        words[CPUWord.localGen] = gen
    }

    /// The generation an IPI of a batched flush carries (`arch_tlbbatch_flush()`
    /// asks for everything, with no address space and no generation).
    static let fullFlushRequest = UInt64.max

    /// An IPI arrived during the access just ended: flush what it asks. A
    /// full request flushes everything if this CPU is behind the generation
    /// of the address space it has loaded, and catches up to it
    /// (`flush_tlb_func()` with no mm).
    @usableFromInline @inline(never)
    func handleIPI(_ mm: AddressSpace) {
        defer { wakeFlushers() }
        let set = mm.kernel.cpus
        guard let r = drainInbox(set) else { return }
        let local = words[CPUWord.localGen]
        if r.gen == CPU.fullFlushRequest {
            guard UnsafeAtomic(words + CPUWord.loadedMM).load(ordering: .relaxed) == UInt64(mm.id) else { return }
            let gen = UnsafeAtomic(mm.tlbGen).load(ordering: .acquiring)
            if gen != local {
                invalidateAll()
                words[CPUWord.localGen] = gen
            }
            return
        }
        guard r.mm == UnsafeAtomic(words + CPUWord.loadedMM).load(ordering: .relaxed) else { return }
        guard r.gen > local else { return }
        if r.gen == local + 1 {
            invalidate(r.start, r.end)
        } else {
            invalidateAll()
        }
        words[CPUWord.localGen] = r.gen
    }

    /// The futex word flushers sleep on while this CPU finishes an access.
    var flusherSleeping: UnsafeMutablePointer<UInt32> {
        UnsafeMutableRawPointer(words + CPUWord.flusherSleeping).assumingMemoryBound(to: UInt32.self)
    }

    /// Wakes the flushers sleeping until this CPU left its access (called
    /// at the boundary, after the sequence word moved on).
    func wakeFlushers() {
        guard UnsafeAtomic(flusherSleeping).load(ordering: .acquiring) != 0 else { return }
        UnsafeAtomic(flusherSleeping).store(0, ordering: .releasing)
        _ = svm_futex_wake(flusherSleeping, Int32.max)
    }

    /// Takes the flush request waiting in the inbox, counting it received.
    @discardableResult
    func drainInbox(_ set: CPUSet) -> (mm: UInt64, gen: UInt64, start: UInt64, end: UInt64)? {
        guard UnsafeAtomic(words + CPUWord.inboxGen).load(ordering: .relaxed) != 0 else { return nil }
        let r = inboxLock.withLock {
            let r = (mm: words[CPUWord.inboxMM], gen: words[CPUWord.inboxGen],
                     start: words[CPUWord.inboxStart], end: words[CPUWord.inboxEnd])
            UnsafeAtomic(words + CPUWord.inboxGen).store(0, ordering: .relaxed)
            return r
        }
        guard r.gen != 0 else { return nil }
        set.vmstat.count(.tlbRemoteFlushReceived)
        return r
    }

    /// Puts a flush request in this CPU's inbox (the IPI). Requests that meet
    /// there merge: one range, the newest generation (which then fails the
    /// "exactly one behind" test and makes the CPU flush everything).
    func post(mm: UInt64, gen: UInt64, start: UInt64, end: UInt64) {
        inboxLock.withLock {
        if UnsafeAtomic(words + CPUWord.inboxGen).load(ordering: .relaxed) == 0 {
            words[CPUWord.inboxMM] = mm
            words[CPUWord.inboxStart] = start
            words[CPUWord.inboxEnd] = end
            UnsafeAtomic(words + CPUWord.inboxGen).store(gen, ordering: .relaxed)
        } else {
            if words[CPUWord.inboxMM] != mm { words[CPUWord.inboxMM] = 0 }
            words[CPUWord.inboxStart] = 0
            words[CPUWord.inboxEnd] = UInt64.max & PageGeometry.pageMask
            UnsafeAtomic(words + CPUWord.inboxGen).store(max(gen, UnsafeAtomic(words + CPUWord.inboxGen).load(ordering: .relaxed)), ordering: .relaxed)
        }
        }
    }

    /// The inbox lock (protects the inbox words; the CPU and its flushers take it).
    private var inboxLock: SpinLockRef {
        SpinLockRef(UnsafeMutableRawPointer(words + CPUWord.inboxLock).assumingMemoryBound(to: UInt32.self), .callQueue)
    }
}
