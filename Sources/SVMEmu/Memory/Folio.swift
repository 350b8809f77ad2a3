import CSVMSupport
import Synchronization

/// A base page frame (`struct page`): a pfn on this machine.
///
/// A value type of two words with no reference counting of its own: holding a
/// `Page` does not hold a page reference, exactly like holding a `struct page *`.
public struct Page: Hashable, @unchecked Sendable, CustomStringConvertible {
    /// The page frame number.
    public let pfn: UInt64
    /// The kernel, unretained: a page (like a `struct page *`) does not keep the
    /// machine alive, and reaching its metadata costs no reference counting.
    @usableFromInline let kernelRef: Unmanaged<Kernel>
    @inlinable var kernel: Kernel { kernelRef.takeUnretainedValue() }

    @inlinable init(pfn: UInt64, kernel: Kernel) { self.pfn = pfn; self.kernelRef = .passUnretained(kernel) }
    @inlinable init(pfn: UInt64, kernelRef: Unmanaged<Kernel>) { self.pfn = pfn; self.kernelRef = kernelRef }

    @inlinable var meta: MetaPtr { kernelRef._withUnsafeGuaranteedRef { $0.metaPtr(pfn) } }

    /// The folio this page belongs to (itself for a small page).
    ///
    /// Stable only while the caller holds a reference or the folio lock: a
    /// split can make a tail page its own folio.
    ///
    /// The corresponding kernel function is `page_folio()`.
    @inlinable public var folio: Folio { Folio(pfn: meta.head, kernelRef: kernelRef) }
    /// The first byte of this 4 KiB page, as a pointer that outlives every
    /// scope: only for a copy engine or a copy job that holds it until its
    /// own completion (a DMA mapping's role), while the caller holds a
    /// reference or the folio lock. Everything else uses ``withBytes(_:)``.
    @inlinable public var unsafeBytes: UnsafeMutableRawPointer { kernelRef._withUnsafeGuaranteedRef { $0.bytes(ofPfn: pfn) } }

    /// Runs `body` with this page's 4 KiB (`kmap_local_page()` ...
    /// `kunmap_local()`): the buffer is valid inside `body` only. The caller
    /// holds a reference or the folio lock.
    @inlinable public func withBytes<R, E: Error>(_ body: (UnsafeMutableRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try body(UnsafeMutableRawBufferPointer(start: unsafeBytes, count: PageGeometry.pageSize))
    }

    /// Copies `source`'s 4 KiB into this page.
    ///
    /// The corresponding kernel function is `copy_highpage()`.
    @inlinable public func copyBytes(from source: Page) {
        svm_memcpy(unsafeBytes, source.unsafeBytes, PageGeometry.pageSize)
    }

    /// Fills this page with zeros.
    ///
    /// The corresponding kernel function is `clear_highpage()`.
    @inlinable public func zeroBytes() { svm_memset(unsafeBytes, 0, PageGeometry.pageSize) }
    /// PTE mappings of this page, without the folio's PMD mappings.
    ///
    /// The corresponding kernel function is `page_mapcount()`.
    public var mapCount: Int { Int(meta.mapcount) }
    /// The page's map count word (`page->_mapcount`), for the rmap code.
    @inlinable var atomicMapcount: UnsafeAtomic<Int32> { meta.atomicMapcount }
    /// The page's flags word (`page->flags`).
    @inlinable var atomicFlags: UnsafeAtomic<UInt32> { meta.atomicFlags }
    /// Whether the page belongs to a device page map.
    ///
    /// The corresponding kernel function is `is_zone_device_page()`.
    public var isZoneDevice: Bool { meta.test(PageFlags.zoneDevice.rawValue) }
    /// Whether this page is anon-exclusive: mapped by exactly one process,
    /// which may write it without a copy.
    ///
    /// The corresponding kernel function is `PageAnonExclusive()`.
    public var isAnonExclusive: Bool { meta.test(PageFlags.anonExclusive.rawValue) }
    /// The driver's private word (`page->zone_device_data`): drivers keep a
    /// pointer or index to their own per-page state here. The kernel never
    /// reads it; a migration does not carry it to the destination.
    public var zoneDeviceData: UInt64 {
        get { meta.zoneDeviceData }
        nonmutating set { meta.zoneDeviceData = newValue }
    }
    /// The same pfn of the same kernel.
    public static func == (a: Page, b: Page) -> Bool { a.pfn == b.pfn && a.kernelRef.toOpaque() == b.kernelRef.toOpaque() }
    /// Hashes the pfn.
    public func hash(into h: inout Hasher) { h.combine(pfn) }
    /// `page(pfn: 0x...)`.
    public var description: String { "page(pfn: 0x\(String(pfn, radix: 16)))" }
}

/// A folio: a head page and, for order 9, 511 tails that resolve to it.
///
/// The reference count, the map counts, the flags and the folio lock live in the
/// head page's metadata. Like `Page`, a `Folio` value holds no reference:
/// use `get()`/`put()` for that.
public struct Folio: Hashable, @unchecked Sendable, CustomStringConvertible {
    /// The head page's pfn.
    ///
    /// The corresponding kernel function is `folio_pfn()`.
    public let pfn: UInt64
    /// The kernel, unretained (see `Page`).
    @usableFromInline let kernelRef: Unmanaged<Kernel>
    @inlinable var kernel: Kernel { kernelRef.takeUnretainedValue() }

    @inlinable init(pfn: UInt64, kernel: Kernel) { self.pfn = pfn; self.kernelRef = .passUnretained(kernel) }
    @inlinable init(pfn: UInt64, kernelRef: Unmanaged<Kernel>) { self.pfn = pfn; self.kernelRef = kernelRef }
    @inlinable var meta: MetaPtr { kernelRef._withUnsafeGuaranteedRef { $0.metaPtr(pfn) } }

    /// The same head pfn of the same kernel.
    public static func == (a: Folio, b: Folio) -> Bool { a.pfn == b.pfn && a.kernelRef.toOpaque() == b.kernelRef.toOpaque() }
    /// Hashes the head pfn.
    public func hash(into h: inout Hasher) { h.combine(pfn) }
    /// The pfn, order, reference count and map count.
    public var description: String { "folio(pfn: 0x\(String(pfn, radix: 16)), order: \(order), ref: \(refCount), map: \(mapCount))" }

    /// The folio's order: 0 (4 KiB) or 9 (2 MiB).
    ///
    /// The corresponding kernel function is `folio_order()`.
    @inlinable public var order: Int { Int(meta.order) }
    /// Base pages in the folio: 1 or 512.
    ///
    /// The corresponding kernel function is `folio_nr_pages()`.
    @inlinable public var pageCount: Int { 1 << order }
    /// The folio's size in bytes.
    ///
    /// The corresponding kernel function is `folio_size()`.
    @inlinable public var size: Int { PageGeometry.pageSize << order }
    /// Whether the folio has more than one page.
    ///
    /// The corresponding kernel function is `folio_test_large()`.
    @inlinable public var isLarge: Bool { meta.order != 0 }
    /// The `i`-th page of the folio; `i` must be below ``pageCount``.
    ///
    /// The corresponding kernel function is `folio_page()`.
    @inlinable public func page(_ i: Int) -> Page { Page(pfn: pfn + UInt64(i), kernelRef: kernelRef) }
    /// The first byte of the whole folio (contiguous), as a pointer that
    /// outlives every scope: only for a copy engine or a copy job that holds
    /// it until its own completion, while the caller holds a reference or
    /// the folio lock. Everything else uses ``withBytes(_:)``.
    @inlinable public var unsafeBytes: UnsafeMutableRawPointer { kernelRef._withUnsafeGuaranteedRef { $0.bytes(ofPfn: pfn) } }

    /// Runs `body` with the folio's bytes (``size`` of them, contiguous):
    /// the buffer is valid inside `body` only. The caller holds a reference
    /// or the folio lock.
    @inlinable public func withBytes<R, E: Error>(_ body: (UnsafeMutableRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try body(UnsafeMutableRawBufferPointer(start: unsafeBytes, count: size))
    }

    /// Copies `source`'s bytes into this folio; both have ``size`` bytes
    /// (a smaller source copies its size).
    ///
    /// The corresponding kernel function is `folio_copy()`.
    @inlinable public func copyBytes(from source: Folio) {
        svm_memcpy(unsafeBytes, source.unsafeBytes, min(size, source.size))
    }

    /// Fills the folio with zeros.
    ///
    /// The corresponding kernel function is `folio_zero_range()` (of the whole folio).
    @inlinable public func zeroBytes() { svm_memset(unsafeBytes, 0, size) }

    /// The flags word: a snapshot.
    public var flags: PageFlags { PageFlags(rawValue: meta.flags) }
    /// The folio's reference count: a snapshot, exact only while nobody else
    /// can take or drop a reference.
    ///
    /// The corresponding kernel function is `folio_ref_count()`.
    @inlinable public var refCount: Int { Int(meta.refcount) }
    /// PTE mappings of every page plus PMD mappings: for a large folio
    /// one word, `folio->_large_mapcount`, that every rmap change of the
    /// folio keeps (as since Linux 6.9: no walk over its pages).
    ///
    /// The corresponding kernel function is `folio_mapcount()`.
    public var mapCount: Int {
        let head = meta
        if head.order == 0 { return Int(head.entireMapcount) + Int(head.mapcount) }
        return Int(atomicLargeMapcount.load(ordering: .acquiring))
    }
    /// `folio->_large_mapcount` of a large folio: its PTE mappings plus its
    /// PMD mappings. The kernel keeps it in the first tail page's
    /// `struct page`; here it is that page's entire-map-count slot, which
    /// a tail page does not use otherwise. Only for a large folio.
    @inlinable var atomicLargeMapcount: UnsafeAtomic<Int32> {
        UnsafeAtomic(at: meta.p + PageMeta.size + PageMeta.entireMapcount)
    }
    /// Adds `n` to `_large_mapcount` when the folio is large (the part of
    /// `folio_add_*_rmap_*()` / `folio_remove_rmap_*()` that counts the
    /// folio's mappings as a whole); nothing for a small folio.
    @inlinable func largeMapcountAdd(_ n: Int32) {
        if isLarge { atomicLargeMapcount.wrappingAdd(n, ordering: .acquiringAndReleasing) }
    }
    /// PMD mappings of the folio.
    ///
    /// The corresponding kernel function is `folio_entire_mapcount()`.
    public var entireMapCount: Int { Int(meta.entireMapcount) }
    /// The folio's reference count word (`folio->_refcount`).
    @inlinable var atomicRefcount: UnsafeAtomic<Int32> { meta.atomicRefcount }
    /// The folio's PMD map count word (`folio->_entire_mapcount`), for the rmap code.
    @inlinable var atomicEntireMapcount: UnsafeAtomic<Int32> { meta.atomicEntireMapcount }
    /// The head page's flags word (`folio->flags`).
    @inlinable var atomicFlags: UnsafeAtomic<UInt32> { meta.atomicFlags }
    /// Whether any page of the folio is mapped.
    ///
    /// The corresponding kernel function is `folio_mapped()`.
    public var isMapped: Bool { mapCount > 0 }
    /// Whether the folio belongs to a device page map.
    ///
    /// The corresponding kernel function is `folio_is_zone_device()`.
    @inlinable public var isZoneDevice: Bool { meta.test(PageFlags.zoneDevice.rawValue) }
    /// Whether the folio is anonymous memory.
    ///
    /// The corresponding kernel function is `folio_test_anon()`.
    @inlinable public var isAnon: Bool { meta.test(PageFlags.anon.rawValue) }
    /// Whether this is the zero page or the huge zero page.
    ///
    /// The corresponding kernel function is `is_zero_folio()`.
    public var isZeroPage: Bool { meta.test(PageFlags.reserved.rawValue) }
    /// The device page map of a ZONE_DEVICE folio, or nil for system memory.
    ///
    /// The corresponding kernel function is `page_pgmap()`.
    public var pageMap: DevicePageMap? {
        let i = meta.pgmap
        return i == 0 ? nil : kernelRef._withUnsafeGuaranteedRef { $0.pageMapTable[Int(i) - 1]?.takeUnretainedValue() }
    }
    /// Runs `body` on the folio's device page map, or returns nil for a folio
    /// outside every page map. Per-page paths use it: no reference counting.
    @inlinable func withPageMap<R>(_ body: (DevicePageMap) -> R) -> R? {
        let i = meta.pgmap
        guard i != 0 else { return nil }
        return kernelRef._withUnsafeGuaranteedRef { k in
            k.pageMapTable[Int(i) - 1].map { $0._withUnsafeGuaranteedRef(body) }
        }
    }
    /// Whether the folio belongs to a page map of `owner` (`page_pgmap(page)->owner == owner`).
    @inlinable func isOwned(by owner: DeviceOwner?) -> Bool {
        withPageMap { $0.owner == owner } ?? false
    }
    /// Whether the folio is device-private memory.
    ///
    /// The corresponding kernel function is `folio_is_device_private()`.
    public var isDevicePrivate: Bool { withPageMap { $0.type == .private } ?? false }
    /// Whether the folio is device-coherent memory.
    ///
    /// The corresponding kernel function is `folio_is_device_coherent()`.
    public var isDeviceCoherent: Bool { withPageMap { $0.type == .coherent } ?? false }

    // MARK: references

    /// Takes a reference.
    ///
    /// The caller must already hold a reference (or otherwise know the count
    /// is not zero, e.g. under the page-table lock of a mapping); taking one
    /// on a free folio is reported as a diagnostic. The caller owns the new
    /// reference and drops it with ``put()``.
    ///
    /// The corresponding kernel function is `folio_get()`.
    @inlinable public func get() {
        let n = atomicRefcount.wrappingAdd(1, ordering: .acquiringAndReleasing).newValue
        if n <= 1 { kernel.warn("folio_get: folio had no reference (use folio_try_get)", "\(self)", kind: .referenceCount) }
    }
    /// Takes a reference unless the count is zero (the folio is free or being
    /// freed): the way to reference a folio found without holding one.
    ///
    /// - Returns: whether a reference was taken (then owned by the caller).
    ///
    /// The corresponding kernel function is `folio_try_get()`.
    @inlinable public func tryGet() -> Bool {
        var cur = meta.refcount
        while cur > 0 {
            let (exchanged, seen) = atomicRefcount.compareExchange(
                expected: cur, desired: cur + 1, successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring)
            if exchanged { return true }
            cur = seen
        }
        return false
    }
    /// Drops a reference; the last one frees the folio (to its node, or to the
    /// device page map's ``DevicePageMapOperations/folioFree``).
    ///
    /// The caller must own the reference it drops. Freeing happens on the
    /// calling thread, so the caller must not hold a lock the driver's
    /// `folioFree` takes. An underflow is reported as a diagnostic.
    ///
    /// The corresponding kernel function is `folio_put()`.
    @inlinable public func put() {
        let n = atomicRefcount.wrappingAdd(-1, ordering: .acquiringAndReleasing).newValue
        if n == 0 { kernelRef._withUnsafeGuaranteedRef { $0.freeFolio(self) } } else if n < 0 {
            atomicRefcount.store(0, ordering: .releasing)
            kernel.warn("folio_put: reference count underflow", "\(self)", kind: .referenceCount)
        }
    }
    /// `folio_ref_add()`.
    @inlinable func refAdd(_ n: Int32) { atomicRefcount.wrappingAdd(n, ordering: .acquiringAndReleasing) }

    /// The references one FOLL_PIN pin counts for (`GUP_PIN_COUNTING_BIAS`).
    /// The kernel counts pins of a large folio in `_pincount` instead; here
    /// every folio uses the bias.
    public static let pinCountingBias = 1024
    /// Whether the folio may be pinned for DMA: its reference count reaches
    /// the pin bias. A folio with that many plain references is a false
    /// positive, as in the kernel.
    ///
    /// The corresponding kernel function is `folio_maybe_dma_pinned()`.
    public var isMaybeDMAPinned: Bool { refCount >= Folio.pinCountingBias }
    /// Adds one pin (`GUP_PIN_COUNTING_BIAS` references); the caller holds
    /// a reference, so the count is not zero.
    func pin() { refAdd(Int32(Folio.pinCountingBias)) }
    /// Drops one pin; the last reference frees the folio, as ``put()`` does.
    func unpin() {
        let n = atomicRefcount.wrappingAdd(-Int32(Folio.pinCountingBias), ordering: .acquiringAndReleasing).newValue
        if n == 0 { kernelRef._withUnsafeGuaranteedRef { $0.freeFolio(self) } } else if n < 0 {
            atomicRefcount.store(0, ordering: .releasing)
            kernel.warn("unpin_user_page: reference count underflow", "\(self)", kind: .referenceCount)
        }
    }

    // MARK: the folio lock (PG_locked)

    /// Takes the folio lock if it is free; never blocks.
    ///
    /// The lock is not tied to a thread: whoever finishes the work unlocks.
    ///
    /// - Returns: whether the caller now holds the lock.
    ///
    /// The corresponding kernel function is `folio_trylock()`.
    @inlinable public func tryLock(file: StaticString = #fileID, line: UInt = #line) -> Bool {
        let taken = tryLockBit()
        if taken && _slowPath(svm_lockdep_enabled()) {
            LockOrder.acquired(meta.flagsWord, .folio, site: LockSite(file, line, trylock: "folio_trylock"))
        }
        return taken
    }

    /// The trylock itself, without lock-order validation.
    @inlinable func tryLockBit() -> Bool {
        svm_det_lock_event(meta.flagsWord, Int32(SVM_DET_BEFORE_ACQUIRE) | Int32(SVM_DET_SLEEPING))
        let old = meta.atomicFlags.bitwiseOr(PageFlags.locked.rawValue, ordering: .acquiringAndReleasing).oldValue
        let taken = old & PageFlags.locked.rawValue == 0
        if taken {
            svm_tsan_acquire(meta.flagsWord)
            svm_det_lock_event(meta.flagsWord, Int32(SVM_DET_ACQUIRED) | Int32(SVM_DET_SLEEPING))
        }
        return taken
    }

    /// Takes the folio lock, sleeping while another thread holds it.
    ///
    /// The caller must hold a reference (so the folio cannot be freed while
    /// it sleeps) and no page-table lock, and must not already hold this
    /// folio's lock (it is not recursive: that would wait forever).
    ///
    /// Uncontended, one atomic. Otherwise the caller queues at the tail of
    /// the folio's wait queue (`FolioWaitTable`) and sleeps; an unlock
    /// wakes one such waiter, which takes the lock unless a newcomer stole it
    /// first, and after `sysctl_page_lock_unfairness` (5) lost wake-ups gets
    /// the lock handed over by the unlocker.
    ///
    /// - Parameters:
    ///   - file: the call site, for lock-order reports (``LockOrder``).
    ///   - line: the call site's line.
    ///
    /// The corresponding kernel functions are `folio_lock()` and `__folio_lock()`.
    public func lock(file: StaticString = #fileID, line: UInt = #line) {
        DeterministicScheduler.mightSleepPoint()
        let lockdep = _slowPath(svm_lockdep_enabled())
        if lockdep { LockOrder.acquiring(.folio, site: LockSite(file, line)) }
        defer { if lockdep { LockOrder.acquired(meta.flagsWord, .folio, site: LockSite(file, line)) } }
        if tryLockBit() { return }
        lockSlowPath()
    }

    /// `__folio_lock()`: `folio_wait_bit_common(PG_locked, EXCLUSIVE)`;
    /// returns holding the lock.
    @inline(never) func lockSlowPath() {
        kernelRef._withUnsafeGuaranteedRef { k in
            k.vmstat.count(.folioLockWaits)
            _ = k.folioWaitTable.wait(word: meta.flagsWord, pfn: pfn, exclusive: true)
        }
        svm_tsan_acquire(meta.flagsWord)
        svm_det_lock_event(meta.flagsWord, Int32(SVM_DET_ACQUIRED) | Int32(SVM_DET_SLEEPING))
    }

    /// Releases the lock; when `PG_waiters` is set, wakes the folio's
    /// waiters as the kernel does: every `folio_wait_locked()` sleeper up to
    /// the first `folio_lock()` sleeper, which is woken too (and, after its
    /// lost wake-ups, handed the lock). Any thread may unlock (the kernel's
    /// page lock is released by whoever finishes the work).
    ///
    /// Unlocking a folio that is not locked is reported as a diagnostic.
    ///
    /// The corresponding kernel functions are `folio_unlock()` and `folio_wake_bit()`.
    @inlinable public func unlock() {
        if _slowPath(svm_lockdep_enabled()) { LockOrder.releasedFolio(meta.flagsWord) }
        svm_tsan_release(meta.flagsWord)
        let old = meta.atomicFlags.bitwiseAnd(~PageFlags.locked.rawValue, ordering: .acquiringAndReleasing).oldValue
        if old & PageFlags.locked.rawValue == 0 {
            kernel.warn("folio_unlock: folio is not locked (VM_BUG_ON_FOLIO)", "\(self)")
        }
        // With waiters, the wake-up reports the release to the scheduler.
        if old & PageFlags.waiters.rawValue != 0 { wakeLocked() } else { svm_det_lock_event(meta.flagsWord, Int32(SVM_DET_RELEASED) | Int32(SVM_DET_SLEEPING)) }
    }

    /// `folio_wake_bit(folio, PG_locked)`.
    @usableFromInline @inline(never) func wakeLocked() {
        kernelRef._withUnsafeGuaranteedRef { $0.folioWaitTable.wake(word: meta.flagsWord, pfn: pfn) }
    }

    /// Whether some thread holds the folio lock: a snapshot.
    ///
    /// The corresponding kernel function is `folio_test_locked()`.
    @inlinable public var isLocked: Bool { meta.test(PageFlags.locked.rawValue) }

    /// Sleeps until an unlock wakes the caller, without taking the lock, at
    /// most `timeoutNanos` (0: no limit); returns at once when the folio is
    /// not locked.
    ///
    /// The caller queues on the folio's wait queue; an unlock wakes every such
    /// waiter ahead of the first `folio_lock()` waiter. Takes no reference,
    /// so a waiter cannot make a migration's reference check fail; the
    /// caller holds no page-table lock.
    ///
    /// - Parameters:
    ///   - timeoutNanos: the longest sleep, in nanoseconds; 0 for no limit.
    /// - Returns: whether the folio was seen unlocked or an unlock woke the
    ///   caller (false: the time ran out).
    ///
    /// The corresponding kernel functions are `folio_wait_locked()` and
    /// `folio_wait_bit_common(PG_locked, SHARED)`.
    @discardableResult
    public func waitUnlocked(timeoutNanos: UInt64 = 0) -> Bool {
        waitUnlocked(timeoutNanos: timeoutNanos, afterQueued: {})
    }

    /// `waitUnlocked(timeoutNanos:)` that runs `afterQueued` once the caller
    /// is queued (or saw the folio unlocked), before it sleeps
    /// (`migration_entry_wait_on_locked()` drops the page-table lock there).
    func waitUnlocked(timeoutNanos: UInt64, afterQueued: () -> Void) -> Bool {
        if !isLocked { afterQueued(); return true }
        return kernelRef._withUnsafeGuaranteedRef { k in
            k.folioWaitTable.wait(word: meta.flagsWord, pfn: pfn, exclusive: false, timeoutNanos: timeoutNanos,
                                  afterQueued: afterQueued)
        }
    }

    // MARK: flags the migration code uses

    /// Whether the folio is dirty.
    ///
    /// The corresponding kernel function is `folio_test_dirty()`.
    public var isDirty: Bool { meta.test(PageFlags.dirty.rawValue) }
    /// Marks the folio dirty. A folio dirty already is only read, no atomic
    /// write: the kernel's `folio_mark_dirty()` of an anonymous folio
    /// (`noop_dirty_folio()`) tests the flag first.
    ///
    /// The corresponding kernel function is `folio_mark_dirty()`.
    public func markDirty() { if !meta.test(PageFlags.dirty.rawValue) { meta.setFlags(PageFlags.dirty.rawValue) } }
    @inlinable func set(_ f: PageFlags) { meta.setFlags(f.rawValue) }
    @inlinable func clear(_ f: PageFlags) { meta.clearFlags(f.rawValue) }
    @inlinable func test(_ f: PageFlags) -> Bool { meta.test(f.rawValue) }
}
