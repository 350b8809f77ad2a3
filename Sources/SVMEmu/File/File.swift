import CSVMSupport

/// A regular file and its page cache (`struct inode` with its
/// `struct address_space`): the file's bytes live in page-cache folios,
/// real frames of the machine's memory nodes, indexed by file page.
///
/// The page cache holds one reference on each of its folios; a folio in it
/// has ``PageFlags/pageCache`` set and names the file and its page index
/// (`folio->mapping`, `folio->index`). ``pread(into:offset:)`` and
/// ``pwrite(from:offset:)`` copy through those folios, allocating them
/// (zero-filled) on first use, as `filemap_read()` and
/// `generic_perform_write()` do; ``AddressSpace/mmap(address:length:protection:shared:file:offset:)``
/// maps them. A MAP_SHARED mapping maps the page-cache folios themselves,
/// so CPU stores through it dirty them and `pread` sees them; a MAP_PRIVATE
/// mapping maps them read-only and copies a page into a new anonymous folio
/// on the first write (`do_cow_fault()`, `wp_page_copy()`).
///
/// The file keeps a list of the VMAs mapping it (`i_mmap`), which the
/// reverse map of its folios walks. A VMA keeps its file alive; when the
/// last reference to the file goes, its page cache is dropped.
///
/// `migrate_pages` moves page-cache folios between nodes as the kernel's
/// `filemap_migrate_folio()` does: the cache entry is switched to the new
/// folio under the cache lock, the cache's reference and the dirty bit going
/// with it (``Kernel/migratePages(_:mode:reason:policy:newFolio:)``).
/// `migrate_vma` refuses them, as the kernel does for device destinations
/// (only anonymous memory moves to a device). There is no writeback: dirty
/// folios stay dirty, the file is memory only (like tmpfs).
public final class File: @unchecked Sendable {
    /// The machine whose memory holds the page cache.
    public let kernel: Kernel
    /// The id page-cache folios record (`folio->mapping` of this file).
    let id: UInt32

    /// The largest size a file may have (`sb->s_maxbytes`): 1 TiB.
    public static let maxSize: Int64 = 1 << 40

    /// `i_size` and the page cache (`mapping->i_pages`): file page index to
    /// the pfn of its folio, which holds one reference for the cache.
    struct PageCache {
        var size: Int64 = 0
        var folios: [UInt64: UInt64] = [:]
    }
    /// The cache and the size, under one lock (the xarray lock and the
    /// inode lock in one). Taken for lookups and changes only, never while
    /// bytes are copied or a folio lock is awaited.
    let cache = LockedValue<PageCache>(PageCache())
    /// `mapping->i_mmap`: every VMA mapping the file, as snapshots its
    /// address space refreshes (under its mmap write lock) whenever such a
    /// VMA appears, changes bounds or goes. Read and changed only under
    /// `mappingsLock`.
    private var mappings: [FileMappingEntry] = []
    /// `mapping->i_mmap_rwsem`: held for writing to change `mappings`, for
    /// reading by a walk from its lookup to the end of its visits. Lock
    /// order: folio lock, then this, then page-table locks; mmap lock, then
    /// this.
    let mappingsLock = KernelRWSemaphore("i_mmap lock", prefersWriters: false, lockClass: .iMmap)

    /// An empty file (`open(O_TMPFILE)` or `memfd_create()`): size 0, no pages.
    ///
    /// - Parameters:
    ///   - kernel: the machine whose memory backs its page cache.
    ///
    /// The corresponding kernel function is `shmem_file_setup()`.
    public init(kernel: Kernel) {
        self.kernel = kernel
        id = kernel.reserveFileID()
        kernel.register(self)
    }

    deinit {
        // iput() of the last reference: no VMA maps the file any more, so
        // each folio holds the cache's reference and perhaps transient ones
        // (a pin, a migration that will fail); it leaves the cache here.
        kernel.unregisterFile(id)
        let pfns = cache.withLock { c in Array(c.folios.values) }
        for pfn in pfns {
            let folio = Folio(pfn: pfn, kernel: kernel)
            deleteFromPageCache(folio)
            folio.put()
        }
    }

    /// The file's size in bytes: a snapshot. Takes the cache lock.
    ///
    /// The corresponding kernel function is `i_size_read()`.
    public var size: Int64 { cache.withLock { $0.size } }

    /// Folios in the page cache (`mapping->nrpages`): a snapshot.
    public var cachedPageCount: Int { cache.withLock { $0.folios.count } }

    /// The page-cache folio of file page `index`, or nil when the page is
    /// not cached: a snapshot for inspection, no reference taken (the folio
    /// may leave the cache at any time).
    ///
    /// - Parameters:
    ///   - index: the file page (byte offset >> page shift).
    /// - Returns: the folio, or nil.
    ///
    /// The corresponding kernel function is `filemap_get_folio()`.
    public func cachedFolio(at index: UInt64) -> Folio? {
        cache.withLock { c in c.folios[index].map { Folio(pfn: $0, kernel: kernel) } }
    }

    // MARK: read and write

    /// Reads up to `buffer.count` bytes at `offset` (`pread(2)`), copying
    /// from the page cache; a page not cached yet is added zero-filled.
    ///
    /// Takes the cache lock per page, and no folio lock: a concurrent
    /// `pwrite` or CPU store through a shared mapping may be seen half done,
    /// as in the kernel. Caller holds no lock.
    ///
    /// - Parameters:
    ///   - buffer: where the bytes go.
    ///   - offset: the file offset of the first byte.
    /// - Returns: the bytes read: fewer than asked at the end of the file, 0
    ///   at or past it.
    /// - Throws: ``Errno/invalidArgument`` for a negative offset or one
    ///   whose range would overflow; ``Errno/noMemory`` when no page could
    ///   be added to the cache before any byte was read. Nothing changes then.
    ///
    /// The corresponding kernel function is `filemap_read()`.
    public func pread(into buffer: UnsafeMutableRawBufferPointer, offset: Int64) throws(Errno) -> Int {
        guard offset >= 0, Int64(buffer.count) <= Int64.max - offset else { throw .invalidArgument }
        guard let base = buffer.baseAddress, buffer.count > 0 else { return 0 }
        let size = self.size
        guard offset < size else { return 0 }
        let total = Int(min(Int64(buffer.count), size - offset))
        var done = 0
        while done < total {
            let pos = UInt64(offset) + UInt64(done)
            let inPage = Int(pos & ~PageGeometry.pageMask)
            let n = min(total - done, PageGeometry.pageSize - inPage)
            guard let folio = grabFolio(pos >> PageGeometry.pageShift) else {
                if done > 0 { return done }
                throw .noMemory
            }
            // Racing CPU stores through a shared mapping are legal, as they
            // are against the kernel's copy_page_to_iter().
            svm_tsan_ignore_begin()
            folio.withBytes { svm_memcpy(base + done, $0.baseAddress! + inPage, n) }
            svm_tsan_ignore_end()
            folio.put()
            done += n
        }
        return done
    }

    /// Writes `buffer` at `offset` (`pwrite(2)`), copying into the page
    /// cache (pages added zero-filled as needed, each locked while it is
    /// written and marked dirty), and grows the file when the write ends
    /// past its size. Mappings of the file see the bytes at once.
    ///
    /// Caller holds no lock; sleeps on each folio's lock (a migration or a
    /// fault holding it finishes first).
    ///
    /// - Parameters:
    ///   - buffer: the bytes.
    ///   - offset: the file offset of the first byte.
    /// - Returns: the bytes written: `buffer.count`, or fewer when the write
    ///   would pass ``maxSize`` or memory ran out part way.
    /// - Throws: ``Errno/invalidArgument`` for a negative offset or one
    ///   whose range would overflow; ``Errno/fileTooLarge`` when `offset` is
    ///   at or past ``maxSize``; ``Errno/noMemory`` when no page could be
    ///   added before any byte was written. Nothing changes then.
    ///
    /// The corresponding kernel function is `generic_perform_write()`.
    public func pwrite(from buffer: UnsafeRawBufferPointer, offset: Int64) throws(Errno) -> Int {
        guard offset >= 0, Int64(buffer.count) <= Int64.max - offset else { throw .invalidArgument }
        guard let base = buffer.baseAddress, buffer.count > 0 else { return 0 }
        guard offset < File.maxSize else { throw .fileTooLarge }
        let total = Int(min(Int64(buffer.count), File.maxSize - offset))
        var done = 0
        while done < total {
            let pos = UInt64(offset) + UInt64(done)
            let index = pos >> PageGeometry.pageShift
            let inPage = Int(pos & ~PageGeometry.pageMask)
            let n = min(total - done, PageGeometry.pageSize - inPage)
            guard let folio = grabFolio(index) else { break }
            folio.lock()
            // Truncated between the lookup and the lock: look again.
            guard folio.test(.pageCache) else {
                folio.unlock()
                folio.put()
                continue
            }
            // A vfs write changes the bytes of a cache folio whose old frame
            // CPUs may still read through a deferred flush's stale
            // translations: the deferral gives up first, as for a write
            // fault (LUF). Under the folio lock: a migration that deferred
            // its flush finished with this folio before the lock was ours.
            kernel.deferredTLB.willMakeWritable()
            svm_tsan_ignore_begin()
            folio.withBytes { svm_memcpy($0.baseAddress! + inPage, base + done, n) }
            svm_tsan_ignore_end()
            folio.markDirty()
            folio.unlock()
            folio.put()
            done += n
        }
        if done == 0 { throw .noMemory }
        let end = offset + Int64(done)
        cache.withLock { c in if end > c.size { c.size = end } }
        return done
    }

    /// Sets the file's size (`ftruncate(2)`). Growing adds no pages (the
    /// new range reads as zeroes). Shrinking unmaps the pages past the new
    /// end from every mapping of the file (MMU notifiers hear of it, TLBs
    /// are flushed), drops them from the page cache and zeroes the tail of
    /// the last partial page; copies made by MAP_PRIVATE writes stay.
    ///
    /// Caller holds no lock (not the mmap lock of a mapping address space:
    /// the unmap takes page-table locks only, as `unmap_mapping_range()`
    /// does); sleeps on each dropped folio's lock.
    ///
    /// - Parameters:
    ///   - size: the new size in bytes.
    /// - Throws: ``Errno/invalidArgument`` for a negative size;
    ///   ``Errno/fileTooLarge`` past ``maxSize``. Nothing changes then.
    ///
    /// The corresponding kernel function is `do_truncate()`.
    public func truncate(to size: Int64) throws(Errno) {
        guard size >= 0 else { throw .invalidArgument }
        guard size <= File.maxSize else { throw .fileTooLarge }
        let firstGone = (UInt64(size) + PageGeometry.pageSize64 - 1) >> PageGeometry.pageShift
        // i_size first: faults past it give SIGBUS from now on.
        let gone = cache.withLock { c -> [(UInt64, Folio)] in
            let shrinking = size < c.size
            c.size = size
            guard shrinking else { return [] }
            // A reference each, taken while the cache's keeps them alive.
            return c.folios.filter { $0.key >= firstGone }.map { entry in
                let folio = Folio(pfn: entry.value, kernel: kernel)
                folio.get()
                return (entry.key, folio)
            }
        }
        for (index, folio) in gone {
            folio.lock()
            // Still ours: a racing truncation may have dropped it already.
            if folio.test(.pageCache) {
                unmapFolio(folio, index: index)
                deleteFromPageCache(folio)
                folio.unlock()
                folio.put()  // the cache's reference
            } else {
                folio.unlock()
            }
            folio.put()
        }
        // truncate_inode_partial_folio(): the bytes past the end read as zero.
        let tail = Int(UInt64(size) & ~PageGeometry.pageMask)
        if tail != 0, let folio = lookupFolio(UInt64(size) >> PageGeometry.pageShift) {
            folio.lock()
            svm_tsan_ignore_begin()
            folio.withBytes { svm_memset($0.baseAddress! + tail, 0, PageGeometry.pageSize - tail) }
            svm_tsan_ignore_end()
            folio.unlock()
            folio.put()
        }
    }

    // MARK: the page cache

    /// The cached folio of `index` with a reference for the caller, or nil.
    func lookupFolio(_ index: UInt64) -> Folio? {
        cache.withLock { c -> Folio? in
            guard let pfn = c.folios[index] else { return nil }
            // The cache's reference keeps the count above zero under the lock.
            let folio = Folio(pfn: pfn, kernel: kernel)
            folio.get()
            return folio
        }
    }

    /// `__filemap_get_folio(FGP_CREAT)`: the cached folio of `index`, or a
    /// new zero-filled one added to the cache (uptodate, on the LRU, the
    /// cache holding the allocation's reference). Returns the folio with a
    /// reference for the caller, or nil when no memory is free. Caller holds
    /// no lock.
    func grabFolio(_ index: UInt64) -> Folio? {
        if let folio = lookupFolio(index) { return folio }
        guard let new = kernel.allocateFolio(order: 0, zeroed: true) else { return nil }
        new.set([.pageCache, .shmem, .uptodate, .lru])
        new.meta.mappingMM = id
        new.meta.index = index
        let raced = cache.withLock { c -> Folio? in
            if let pfn = c.folios[index] {
                let folio = Folio(pfn: pfn, kernel: kernel)
                folio.get()
                return folio
            }
            c.folios[index] = new.pfn
            return nil
        }
        if let raced {
            new.put()
            return raced
        }
        new.get()
        return new
    }

    /// `filemap_fault()`: the folio of `index`, locked and referenced for
    /// the caller, still in the cache and inside the file (checked under the
    /// folio lock, so a truncation cannot slip between this check and the
    /// mapping the caller installs before it unlocks).
    ///
    /// - Throws: ``Errno/ioError`` (VM_FAULT_SIGBUS) at or past the end of
    ///   the file; ``Errno/noMemory`` (VM_FAULT_OOM).
    func faultFolio(_ index: UInt64) throws(Errno) -> Folio {
        while true {
            guard index < (UInt64(size) + PageGeometry.pageSize64 - 1) >> PageGeometry.pageShift else { throw .ioError }
            guard let folio = grabFolio(index) else { throw .noMemory }
            folio.lock()
            if folio.test(.pageCache) && index < (UInt64(size) + PageGeometry.pageSize64 - 1) >> PageGeometry.pageShift {
                return folio
            }
            folio.unlock()
            folio.put()
        }
    }

    /// `__folio_migrate_mapping()` for a page-cache folio (the heart of
    /// `filemap_migrate_folio()`): replaces `folio` by `newFolio` in the
    /// cache if only the expected references are held, and moves the
    /// cache's reference, the mapping (`folio->mapping`, `folio->index`)
    /// and the dirty bit to `newFolio`. `folio` leaves the cache with the
    /// caller's reference only.
    ///
    /// The expected count is the caller's reference, one per page for the
    /// cache (no buffers here, so no `PG_private` one) and `extraCount`
    /// (`folio_expected_ref_count()` + 1 of an unmapped folio). It is frozen
    /// (set to zero) under the cache lock while the entry changes, as
    /// `folio_ref_freeze()` does: every lookup takes its reference under
    /// that lock, so none can find the old folio after the switch, and one
    /// taken before it makes the count differ.
    ///
    /// Caller holds the folio locks of both folios and a reference on each;
    /// `folio` is unmapped (migration entries) and `newFolio` fresh.
    ///
    /// - Returns: false (-EAGAIN) when another reference is held or the
    ///   folio is no longer this file's entry; nothing changes then.
    func migrateFolio(_ newFolio: Folio, _ folio: Folio, extraCount: Int) -> Bool {
        let index = folio.meta.index
        let expected = Int32(1 + folio.pageCount + extraCount)
        return cache.withLock { c -> Bool in
            guard c.folios[index] == folio.pfn else { return false }
            guard folio.atomicRefcount.compareExchange(expected: expected, desired: 0, successOrdering: .acquiringAndReleasing,
                                                       failureOrdering: .relaxed).exchanged else { return false }
            // Frozen: no turning back.
            newFolio.meta.mappingMM = id
            newFolio.meta.index = index
            newFolio.set([.pageCache, .shmem])
            newFolio.refAdd(Int32(folio.pageCount))  // the cache's reference
            if folio.isDirty {
                folio.clear(.dirty)
                newFolio.markDirty()
            }
            c.folios[index] = newFolio.pfn
            // move_to_new_folio(): the old folio forgets its mapping.
            folio.clear([.pageCache, .shmem])
            folio.meta.mappingMM = 0
            // Unfrozen without the cache's reference.
            folio.atomicRefcount.store(expected - Int32(folio.pageCount), ordering: .releasing)
            return true
        }
    }

    /// `filemap_remove_folio()`: the folio leaves the cache and forgets its
    /// mapping. The caller holds the folio lock (or is the file's deinit, when
    /// nobody can find the folio any more) and still owns the cache's
    /// reference, which it drops afterwards.
    private func deleteFromPageCache(_ folio: Folio) {
        let index = folio.meta.index
        cache.withLock { c in
            if c.folios[index] == folio.pfn { c.folios[index] = nil }
        }
        folio.clear([.pageCache, .shmem, .lru])
        folio.meta.mappingMM = 0
    }

    // MARK: the mappings (i_mmap)

    /// Replaces the entries of address space `mmID` with `entries`. Caller
    /// holds that address space's mmap lock for writing; takes
    /// `mappingsLock` for writing, so it waits for the walks in progress.
    func relink(mmID: UInt32, _ entries: [FileMappingEntry]) {
        mappingsLock.withWriteLock {
            mappings.removeAll { $0.mmID == mmID }
            mappings.append(contentsOf: entries)
        }
    }

    /// Calls `body` with every address space mapping file page `index` and
    /// the address it maps it at (`rmap_walk_file()` over `i_mmap`),
    /// holding `mappingsLock` for reading (`i_mmap_lock_read()`): no
    /// address space is pinned; each is reached through its kernel view,
    /// unretained, which stays valid because its exit unlinks it under the
    /// lock held for writing. `body` gets an
    /// address space valid only during the call; it checks each entry under
    /// its page-table lock, must not keep the address space, take an mmap
    /// lock or change VMAs. Caller holds no page-table lock.
    func forEachMapping(of index: UInt64, file: StaticString = #fileID, line: UInt = #line,
                        _ body: (AddressSpace, UInt64) -> Void) {
        mappingsLock.downRead(file: file, line: line)
        for e in mappings where e.maps(index) {
            e.mm._withUnsafeGuaranteedRef { mm in
                kernel.mmHooks.visiting(mm)
                body(mm, e.address(of: index))
            }
        }
        mappingsLock.upRead()
    }

    /// `unmap_mapping_folio()`: clears every present PTE of `folio` (file
    /// page `index`) in every mapping, dropping the mapping's rmap and
    /// reference, inside an `MMU_NOTIFY_CLEAR` invalidation with a TLB flush.
    /// Caller holds the folio lock (so no migration entry of it exists) and
    /// a reference.
    private func unmapFolio(_ folio: Folio, index: UInt64) {
        forEachMapping(of: index) { mm, address in mm.zapFilePage(folio, at: address) }
    }
}

/// One entry of a file's `i_mmap`: an address space maps file pages
/// `[pageOffset, pageOffset + (end - start) / page size)` at `[start, end)`.
struct FileMappingEntry {
    /// The address space's kernel view, unretained: valid while the entry
    /// is linked and `mappingsLock` is held.
    let mm: Unmanaged<AddressSpace>
    let mmID: UInt32
    let start: UInt64
    let end: UInt64
    let pageOffset: UInt64

    func maps(_ index: UInt64) -> Bool {
        index >= pageOffset && index - pageOffset < (end - start) >> PageGeometry.pageShift
    }
    func address(of index: UInt64) -> UInt64 { start + ((index - pageOffset) << PageGeometry.pageShift) }
}
