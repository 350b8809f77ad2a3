import Synchronization
import CSVMSupport

/// The batched flush of `migratePages` (`struct tlbflush_unmap_batch` with
/// TTU_BATCH_FLUSH): `tryToMigrate` hands each cleared mapping's range here
/// instead of flushing it, and the batch flushes once, for every address
/// space, with `flush()` (`try_to_unmap_flush()`).
///
/// With deferral on (migrc / LUF), the ranges of the folio being unmapped are
/// held apart until the folio is done: if every mapping it lost was
/// read-only, they go to the kernel's deferred flush with the source frame
/// instead of into this batch (`takeFolio(deferrable:)`).
///
/// Nothing here keeps an address space: only its flush state
/// (`TLBContext`), so an address space that exits meanwhile (a forked
/// child, during a `movePages` of the pages it shares) is neither kept
/// alive nor torn down by the migration.
struct UnmapFlushBatch {
    var batch = TLBFlushBatch()
    /// The current folio's mappings: whose flush state, which range, and
    /// whether any was writable. `folioContext` stays set after the folio
    /// (no retain per folio of one address space).
    var folioContext: TLBContext? = nil
    var folioStart: UInt64 = .max
    var folioEnd: UInt64 = 0
    var folioWritable = false
    var folioMapped = false
    /// Flushes issued by `flush()`.
    var flushes = 0

    init() { batch.contexts.reserveCapacity(4) }

    /// A mapping of `[start, end)` in `mm` was cleared; `writable`: it
    /// allowed writes. Called under no lock the batch cares about; keeps
    /// no reference to `mm`.
    mutating func add(_ mm: AddressSpace, _ start: UInt64, _ end: UInt64, writable: Bool) {
        if batch.kernel == nil { batch.kernel = mm.kernel }
        let ctx = mm.tlbContext
        if folioMapped, let cur = folioContext, cur !== ctx {
            // A second address space for one folio: no deferral, batch both.
            folioWritable = true
            batch.add(cur, folioStart, folioEnd)
            folioStart = .max
            folioEnd = 0
        }
        if folioContext !== ctx { folioContext = ctx }
        folioStart = min(folioStart, start)
        folioEnd = max(folioEnd, end)
        folioWritable = folioWritable || writable
        folioMapped = true
    }

    /// Ends the current folio. When `deferrable` and every mapping it lost was
    /// read-only, returns its address space's flush state and range for a
    /// deferred flush; otherwise its range joins the batch and nil is
    /// returned.
    mutating func takeFolio(deferrable: Bool) -> (TLBContext, UInt64, UInt64)? {
        defer {
            folioStart = .max
            folioEnd = 0
            folioWritable = false
            folioMapped = false
        }
        guard folioMapped, let ctx = folioContext else { return nil }
        if deferrable && !folioWritable { return (ctx, folioStart, folioEnd) }
        batch.add(ctx, folioStart, folioEnd)
        return nil
    }

    var isEmpty: Bool { batch.isEmpty }

    /// `try_to_unmap_flush()`: one full flush of every CPU that may cache a
    /// mapping gathered.
    mutating func flush() {
        guard !batch.isEmpty else { return }
        batch.flush()
        flushes += 1
    }
}

/// The deferred TLB flush of migrc (Byungchul Park, 2023) and its successor
/// LUF (RFC, not merged): a folio whose every mapping was read-only when
/// migration unmapped it is moved without a flush; CPUs may keep reading the
/// old frame through stale translations, which is harmless because its bytes
/// are identical and nobody may write it. The old frame is therefore kept out
/// of the allocator until a later, batched flush has run:
///
/// - when the frames held reach `frameLimit` (a batched flush of many
///   migrations at once: the saving);
/// - before an allocation that would otherwise fail (the frames must never
///   be reused while a stale translation may reach them);
/// - when a mapping of the address space may become writable or change: a
///   write fault that makes a read-only entry writable, mprotect, munmap
///   (the give-up-on-write rule: a writer must not race a stale reader).
///   `giveUpOnWrite = false` disables the write and mprotect hooks: the
///   hazard Dave Hansen warned of, kept for the stale-entry test.
///
/// Thread-safe: the pending ranges and frames sit behind one lock; the
/// hooks on the fault path cost one atomic load when nothing is pending.
public final class DeferredTLBFlush: @unchecked Sendable {
    struct Pending {
        var ranges: [(context: TLBContext, start: UInt64, end: UInt64)] = []
        var folios: [Folio] = []
        var frames = 0
    }
    private let state = LockedValue<Pending>(Pending())
    // [0] frames held, [8] flushes run, [16] frames those flushes released,
    // [24] give-up flushes, [32] give-up-on-write (1 on, 0 off).
    private let words: UnsafeMutablePointer<UInt64>
    /// Set once by the kernel at boot (the kernel owns this object).
    unowned(unsafe) var kernel: Kernel! = nil

    /// Held frames (base pages) that trigger a batched flush.
    public var frameLimit: Int = 64 * 1024

    init() {
        words = .allocate(capacity: 40)
        words.initialize(repeating: 0, count: 40)
        UnsafeAtomic(words + 32).store(1, ordering: .releasing)
    }
    deinit { words.deallocate() }

    /// Base pages of old frames held for a pending flush.
    public var heldFrames: Int { Int(UnsafeAtomic(words).load(ordering: .acquiring)) }
    /// The folios held for the pending flush, one reference each (for the audit).
    var heldFolios: [Folio] { state.withLock { $0.folios } }
    /// Deferred flushes run so far.
    public var flushes: UInt64 { UnsafeAtomic(words + 8).load(ordering: .acquiring) }
    /// Frames those flushes returned to the allocator.
    public var framesReleased: UInt64 { UnsafeAtomic(words + 16).load(ordering: .acquiring) }
    /// Flushes run early because a mapping became writable or changed.
    public var giveUpFlushes: UInt64 { UnsafeAtomic(words + 24).load(ordering: .acquiring) }
    /// The give-up-on-write rule (on by default). Off, a write fault or an
    /// mprotect does not flush the pending stale translations first.
    public var giveUpOnWrite: Bool {
        get { UnsafeAtomic(words + 32).load(ordering: .acquiring) != 0 }
        set { UnsafeAtomic(words + 32).store(newValue ? 1 : 0, ordering: .releasing) }
    }

    /// Takes over the last reference of `folio` (the migrated source) and
    /// the range of its read-only mappings in the address space whose flush
    /// state is `ctx`, to be flushed later. Like a TLB batch it keeps no
    /// address space: one may exit while its range waits here.
    /// Returns whether the held frames reached ``frameLimit``: the caller
    /// then runs ``flush()`` once it holds no folio lock.
    func hold(_ folio: Folio, _ ctx: TLBContext, _ start: UInt64, _ end: UInt64) -> Bool {
        let pages = folio.pageCount
        // PG deferred_flush was set when the flush was deferred, at unmap
        // (before the new page was mapped); the flush below clears it.
        let total = state.withLock { p -> Int in
            if let last = p.ranges.last, last.context === ctx, start <= last.end, end >= last.start {
                p.ranges[p.ranges.count - 1] = (ctx, min(last.start, start), max(last.end, end))
            } else {
                p.ranges.append((ctx, start, end))
            }
            p.folios.append(folio)
            p.frames += pages
            return p.frames
        }
        _ = UnsafeAtomic(words).wrappingAdd(UInt64(pages), ordering: .relaxed).newValue
        return total >= frameLimit
    }

    /// Runs the pending flush: one flush per address space over the union
    /// of its ranges, then the held frames go back to the allocator.
    /// Returns the frames released.
    @discardableResult
    public func flush() -> Int {
        guard UnsafeAtomic(words).load(ordering: .acquiring) != 0 else { return 0 }
        let p = state.withLock { p -> Pending in
            let taken = p
            p = Pending()
            return taken
        }
        guard !p.folios.isEmpty else { return 0 }
        // Ranges by address space, merged into one span each (arch_tlbbatch).
        var spans: [(TLBContext, UInt64, UInt64)] = []
        for r in p.ranges {
            if let i = spans.firstIndex(where: { $0.0 === r.context }) {
                spans[i].1 = min(spans[i].1, r.start)
                spans[i].2 = max(spans[i].2, r.end)
            } else {
                spans.append((r.context, r.start, r.end))
            }
        }
        // By flush state, not by address space: an exited one's CPUs may
        // still hold its translations of the frames (no lookup, no
        // reference taken, so no exit_mmap on this thread either).
        for (ctx, s, e) in spans { kernel.shootdown(ctx, s, e) }
        _ = UnsafeAtomic(words + 8).wrappingAdd(1, ordering: .relaxed).newValue
        // Frames leave only after the flush.
        for f in p.folios {
            f.clear(.deferredFlush)
            f.put()
        }
        _ = UnsafeAtomic(words).wrappingAdd(UInt64(bitPattern: -Int64(p.frames)), ordering: .relaxed).newValue
        _ = UnsafeAtomic(words + 16).wrappingAdd(UInt64(p.frames), ordering: .relaxed).newValue
        return p.frames
    }

    /// The give-up rule: a mapping of some address space is about to become
    /// writable (write fault on a read-only entry, mprotect adding write).
    /// Flushes what is pending unless the rule is switched off.
    func willMakeWritable() {
        guard UnsafeAtomic(words).load(ordering: .acquiring) != 0, UnsafeAtomic(words + 32).load(ordering: .acquiring) != 0 else { return }
        giveUp()
    }

    /// A mapping is being removed or replaced (munmap, mmap over it): flush
    /// what is pending, whatever the switch says.
    func mappingWillChange() {
        guard UnsafeAtomic(words).load(ordering: .acquiring) != 0 else { return }
        giveUp()
    }

    private func giveUp() {
        if flush() > 0 { _ = UnsafeAtomic(words + 24).wrappingAdd(1, ordering: .relaxed).newValue }
    }
}
