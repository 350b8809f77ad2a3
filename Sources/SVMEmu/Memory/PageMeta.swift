import CSVMSupport
import Synchronization

/// Page frame metadata: the emulator's `struct page`, 64 bytes per 4 KiB page,
/// in one flat pfn-indexed array (a large anonymous mapping touched lazily).
///
/// Layout (byte offsets):
/// ```
///  0 flags            u32  atomic: lock bit, waiters bit, dirty, lru, ... (PageFlags)
///  4 refcount         i32  atomic, meaningful on the head page (folio_ref_count)
///  8 mapcount         i32  atomic, PTE mappings of this page (page_mapcount)
/// 12 entireMapcount   i32  atomic, PMD mappings of the folio (head only)
/// 16 order            u8   folio order (head only): 0 or 9
/// 18 region           u16  which physical region holds the bytes
/// 20 pgmap            u32  device page map index + 1 (0: not ZONE_DEVICE)
/// 24 head             u64  pfn of the folio head (compound_head); self for a head
/// 32 mappingMM        u32  address-space id of an anonymous mapping (anon rmap),
///                          or the file id of a page-cache folio (PageFlags.pageCache)
/// 36 allocGen         u32  allocation generation: advanced each time the frame is
///                          handed out; TLB entries carry it for the stale-entry checker
/// 40 index            u64  linear page index (folio->index): vm_pgoff plus the page's
///                          offset in the VMA that mapped it first (anon rmap),
///                          or the file page index (page cache)
/// 48 next             u64  free-list link
/// 56 zoneDeviceData   u64  driver-private word (page->zone_device_data)
/// ```
@usableFromInline
enum PageMeta {
    @usableFromInline static let size = 64
    @usableFromInline static let shift = 6
    @usableFromInline static let flags = 0
    @usableFromInline static let refcount = 4
    @usableFromInline static let mapcount = 8
    @usableFromInline static let entireMapcount = 12
    @usableFromInline static let order = 16
    @usableFromInline static let region = 18
    @usableFromInline static let pgmap = 20
    @usableFromInline static let head = 24
    @usableFromInline static let mappingMM = 32
    @usableFromInline static let allocGen = 36
    @usableFromInline static let index = 40
    @usableFromInline static let next = 48
    @usableFromInline static let zoneDeviceData = 56
}

/// The flags word of a page (the subset of `enum pageflags` the emulator uses).
public struct PageFlags: OptionSet, Sendable, Hashable, CustomStringConvertible {
    /// The flags word.
    public let rawValue: UInt32
    /// The flags with these bits.
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// PG_locked: the folio lock.
    public static let locked = PageFlags(rawValue: 1 << 0)
    /// Someone sleeps on the folio lock (PG_waiters).
    public static let waiters = PageFlags(rawValue: 1 << 1)
    /// PG_dirty.
    public static let dirty = PageFlags(rawValue: 1 << 2)
    /// PG_uptodate: the bytes are valid.
    public static let uptodate = PageFlags(rawValue: 1 << 3)
    /// On an LRU list (PG_lru); isolation clears it.
    public static let lru = PageFlags(rawValue: 1 << 4)
    /// PageAnonExclusive: mapped by exactly one process, may be written without copy.
    public static let anonExclusive = PageFlags(rawValue: 1 << 5)
    /// Head of a large folio (PG_head).
    public static let head = PageFlags(rawValue: 1 << 6)
    /// Tail of a large folio.
    public static let tail = PageFlags(rawValue: 1 << 7)
    /// ZONE_DEVICE page (device-private or device-coherent).
    public static let zoneDevice = PageFlags(rawValue: 1 << 8)
    /// Anonymous memory (folio_test_anon).
    public static let anon = PageFlags(rawValue: 1 << 9)
    /// Reserved: the zero pages.
    public static let reserved = PageFlags(rawValue: 1 << 10)
    /// In the buddy allocator.
    public static let buddy = PageFlags(rawValue: 1 << 11)
    /// Swap-backed; MADV_FREE clears it (lazy free).
    public static let swapBacked = PageFlags(rawValue: 1 << 12)
    /// Shared (file/shmem-like) memory: has a mapping other than anon.
    public static let shmem = PageFlags(rawValue: 1 << 13)
    /// Debug: the page is a destination of a migration in progress.
    public static let young = PageFlags(rawValue: 1 << 14)
    /// PG_writeback: the folio's bytes are being written out; migration
    /// waits for it only in MIGRATE_SYNC (Migrate/System/Writeback.swift).
    public static let writeback = PageFlags(rawValue: 1 << 15)
    /// The old frame of a migration whose TLB flush was deferred (migrc /
    /// LUF): held out of the allocator; CPUs may still read it through stale
    /// read-only translations until the deferred flush runs.
    public static let deferredFlush = PageFlags(rawValue: 1 << 16)
    /// A hugetlb folio (`folio_test_hugetlb()`): it belongs to the hugetlb
    /// pool (``HugeTLBPool``) and goes back there when freed.
    public static let hugetlb = PageFlags(rawValue: 1 << 17)
    /// In a file's page cache: `folio->mapping` is the file's address_space,
    /// not an anon_vma (the kernel tells them apart by PAGE_MAPPING_ANON).
    /// `mappingMM` then holds the file's id and `index` the file page; the
    /// rmap walks the file's mappings (`i_mmap`) instead of an address space.
    public static let pageCache = PageFlags(rawValue: 1 << 18)
    /// A hugetlb folio in use that migration may isolate
    /// (`folio_test_hugetlb_migratable()`): set when a fault maps it (it is
    /// on the pool's active list), cleared while a migration list holds it.
    public static let hugetlbMigratable = PageFlags(rawValue: 1 << 19)
    /// A hugetlb folio that belongs to the pool only until it is freed
    /// (`folio_test_hugetlb_temporary()`): a migration destination taken from
    /// a node's memory when the pool had no free page, or, once the
    /// migration succeeded, the source it replaced.
    public static let hugetlbTemporary = PageFlags(rawValue: 1 << 20)

    /// The set flags' names joined by `|`, e.g. `locked|dirty|lru`.
    public var description: String {
        let names: [(PageFlags, String)] = [
            (.locked, "locked"), (.waiters, "waiters"), (.dirty, "dirty"), (.uptodate, "uptodate"),
            (.lru, "lru"), (.anonExclusive, "anon_exclusive"), (.head, "head"), (.tail, "tail"),
            (.zoneDevice, "zone_device"), (.anon, "anon"), (.reserved, "reserved"), (.buddy, "buddy"),
            (.swapBacked, "swapbacked"), (.shmem, "shmem"), (.young, "young"), (.writeback, "writeback"), (.deferredFlush, "deferred_flush"), (.hugetlb, "hugetlb"),
            (.pageCache, "pagecache"), (.hugetlbMigratable, "hugetlb_migratable"), (.hugetlbTemporary, "hugetlb_temporary"),
        ]
        return names.filter { contains($0.0) }.map(\.1).joined(separator: "|")
    }
}

/// Raw accessors to one page's metadata; all atomic where other threads may race.
@usableFromInline
struct MetaPtr {
    @usableFromInline let p: UnsafeMutableRawPointer
    @inlinable init(_ p: UnsafeMutableRawPointer) { self.p = p }

    /// The flags word as a futex word: the folio lock sleeps on it.
    @inlinable var flagsWord: UnsafeMutablePointer<UInt32> { (p + PageMeta.flags).assumingMemoryBound(to: UInt32.self) }
    @inlinable var atomicFlags: UnsafeAtomic<UInt32> { UnsafeAtomic(at: p + PageMeta.flags) }
    @inlinable var atomicRefcount: UnsafeAtomic<Int32> { UnsafeAtomic(at: p + PageMeta.refcount) }
    @inlinable var atomicMapcount: UnsafeAtomic<Int32> { UnsafeAtomic(at: p + PageMeta.mapcount) }
    @inlinable var atomicEntireMapcount: UnsafeAtomic<Int32> { UnsafeAtomic(at: p + PageMeta.entireMapcount) }

    /// Flag changes are full read-modify-writes (`set_bit()` and friends on
    /// the flags word), ordered both ways: a flag set before a page-table
    /// store is seen by whoever sees the entry.
    @inlinable var flags: UInt32 { atomicFlags.load(ordering: .acquiring) }
    @inlinable func setFlags(_ f: UInt32) { atomicFlags.bitwiseOr(f, ordering: .acquiringAndReleasing) }
    @inlinable func clearFlags(_ f: UInt32) { atomicFlags.bitwiseAnd(~f, ordering: .acquiringAndReleasing) }
    @inlinable func test(_ f: UInt32) -> Bool { atomicFlags.load(ordering: .acquiring) & f != 0 }
    /// The non-atomic `__ClearPageFoo()` form: a relaxed read, and a relaxed
    /// write only when a bit of `f` is set. Only for a page nobody else can
    /// reach (a folio being freed or prepared), where the kernel uses the
    /// non-atomic bit operations too.
    @inlinable func clearFlagsUnshared(_ f: UInt32) {
        let old = atomicFlags.load(ordering: .relaxed)
        if old & f != 0 { atomicFlags.store(old & ~f, ordering: .relaxed) }
    }

    @inlinable var order: UInt8 {
        get { p.load(fromByteOffset: PageMeta.order, as: UInt8.self) }
        nonmutating set { p.storeBytes(of: newValue, toByteOffset: PageMeta.order, as: UInt8.self) }
    }
    @inlinable var region: UInt16 {
        get { p.load(fromByteOffset: PageMeta.region, as: UInt16.self) }
        nonmutating set { p.storeBytes(of: newValue, toByteOffset: PageMeta.region, as: UInt16.self) }
    }
    @inlinable var pgmap: UInt32 {
        get { p.load(fromByteOffset: PageMeta.pgmap, as: UInt32.self) }
        nonmutating set { p.storeBytes(of: newValue, toByteOffset: PageMeta.pgmap, as: UInt32.self) }
    }
    @inlinable var head: UInt64 {
        get { UnsafeAtomic<UInt64>(at: p + PageMeta.head).load(ordering: .acquiring) }
        nonmutating set { UnsafeAtomic<UInt64>(at: p + PageMeta.head).store(newValue, ordering: .releasing) }
    }
    @inlinable var mappingMM: UInt32 {
        get { UnsafeAtomic<UInt32>(at: p + PageMeta.mappingMM).load(ordering: .acquiring) }
        nonmutating set { UnsafeAtomic<UInt32>(at: p + PageMeta.mappingMM).store(newValue, ordering: .releasing) }
    }
    /// The frame's allocation generation (no kernel counterpart: the
    /// stale-entry checker's way to tell a frame freed and handed out again
    /// since a CPU cached its translation).
    @inlinable var allocGen: UInt32 {
        get { UnsafeAtomic<UInt32>(at: p + PageMeta.allocGen).load(ordering: .acquiring) }
        nonmutating set { UnsafeAtomic<UInt32>(at: p + PageMeta.allocGen).store(newValue, ordering: .releasing) }
    }
    @inlinable var index: UInt64 {
        get { UnsafeAtomic<UInt64>(at: p + PageMeta.index).load(ordering: .acquiring) }
        nonmutating set { UnsafeAtomic<UInt64>(at: p + PageMeta.index).store(newValue, ordering: .releasing) }
    }
    @inlinable var next: UInt64 {
        get { p.load(fromByteOffset: PageMeta.next, as: UInt64.self) }
        nonmutating set { p.storeBytes(of: newValue, toByteOffset: PageMeta.next, as: UInt64.self) }
    }
    @inlinable var zoneDeviceData: UInt64 {
        get { UnsafeAtomic<UInt64>(at: p + PageMeta.zoneDeviceData).load(ordering: .acquiring) }
        nonmutating set { UnsafeAtomic<UInt64>(at: p + PageMeta.zoneDeviceData).store(newValue, ordering: .releasing) }
    }
    @inlinable var refcount: Int32 { atomicRefcount.load(ordering: .acquiring) }
    @inlinable var mapcount: Int32 { atomicMapcount.load(ordering: .acquiring) }
    @inlinable var entireMapcount: Int32 { atomicEntireMapcount.load(ordering: .acquiring) }
}
