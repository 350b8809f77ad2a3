import CSVMSupport

// File-backed mappings: mmap of a File, the file faults (`do_read_fault()`,
// `do_shared_fault()`, `do_cow_fault()`), the file rmap (`i_mmap`), and
// driver-made VM_MIXEDMAP mappings with `vm_insert_page()`.
extension AddressSpace {

    /// Maps `length` bytes of `file` from `offset` (`mmap(fd)`).
    ///
    /// Takes the mmap lock for writing: the caller must not hold it. The new
    /// VMA maps no page yet; the first touch of each page faults it in from
    /// the page cache (`filemap_fault()`), adding a zero-filled page where
    /// the file has none. MAP_SHARED maps the page-cache folios themselves:
    /// a read fault maps them read-only, a write (or the first write after a
    /// read) makes the entry writable and dirties the folio, and `pread`
    /// sees the stores. MAP_PRIVATE maps them read-only too, and the first
    /// write to a page copies it into a new anonymous folio of this process
    /// (`do_cow_fault()`, or `wp_page_copy()` after a read). A touch at or
    /// past the end of the file is SIGBUS (``Errno/ioError``). The VMA is
    /// not anonymous: `migrate_vma` finds no holes in it and moves only the
    /// anonymous copies of a MAP_PRIVATE mapping to a device.
    ///
    /// - Parameters:
    ///   - address: with a value, MAP_FIXED (page aligned; what was mapped
    ///     there is unmapped first); without, the emulator picks a free range.
    ///   - length: bytes to map, rounded up to whole pages.
    ///   - protection: ``Protection/read`` and/or ``Protection/write``.
    ///   - shared: MAP_SHARED (true) or MAP_PRIVATE (false).
    ///   - file: the file; the mapping keeps it alive.
    ///   - offset: the file offset mapped at the start; page aligned, not
    ///     negative.
    /// - Returns: the start of the new mapping.
    /// - Throws: ``Errno/invalidArgument`` for a zero length, an unaligned
    ///   or negative offset, or an unaligned or out-of-range fixed address;
    ///   ``Errno/noMemory`` when no range is free. Nothing changes then.
    ///
    /// The corresponding kernel function is `do_mmap()`.
    @discardableResult
    public func mmap(address: UInt64? = nil, length: Int, protection: Protection = .readWrite,
                     shared: Bool, file: File, offset: Int64 = 0) throws(Errno) -> UInt64 {
        guard offset >= 0, UInt64(offset) & ~PageGeometry.pageMask == 0 else { throw .invalidArgument }
        mmapWriteLock(); defer { mmapWriteUnlock() }
        let vma = try mapRegionLocked(address: address, length: length, protection: protection,
                                      shared: shared, special: false, file: file,
                                      pageOffset: UInt64(offset) >> PageGeometry.pageShift)
        relinkFileMappings([file])
        return vma.start
    }

    /// Maps a device file (`mmap()` of a character device): the emulator
    /// creates the VMA and hands it to the driver's mmap handler
    /// (`file->f_op->mmap`), which may insert pages with
    /// ``insertPage(_:at:in:)``.
    ///
    /// Takes the mmap lock for writing and runs `handler` with it held (the
    /// caller must not hold it). When `handler` throws, the VMA and whatever
    /// it inserted are unmapped again.
    ///
    /// - Parameters:
    ///   - address: with a value, MAP_FIXED (page aligned).
    ///   - length: bytes to map, rounded up to whole pages.
    ///   - protection: ``Protection/read`` and/or ``Protection/write``.
    ///   - shared: MAP_SHARED (true) or MAP_PRIVATE (false).
    ///   - handler: the driver's mmap: runs with the mmap lock held for
    ///     writing; must not take it again.
    /// - Returns: the start of the new mapping.
    /// - Throws: ``Errno/invalidArgument`` for a zero length or an unaligned
    ///   or out-of-range fixed address; ``Errno/noMemory`` when no range is
    ///   free; what `handler` throws. Nothing stays mapped then.
    ///
    /// The corresponding kernel function is `mmap_region()`.
    @discardableResult
    public func mmap(address: UInt64? = nil, length: Int, protection: Protection = .readWrite, shared: Bool = false,
                     handler: (VMA) throws(Errno) -> Void) throws(Errno) -> UInt64 {
        mmapWriteLock(); defer { mmapWriteUnlock() }
        let vma = try mapRegionLocked(address: address, length: length, protection: protection,
                                      shared: shared, special: false, file: nil, pageOffset: 0)
        do {
            try handler(vma)
        } catch {
            unmapLocked(vma.start, vma.end)
            throw error
        }
        return vma.start
    }

    /// Inserts `page` into `vma` at `address` (`vm_insert_page()`): a
    /// driver's mmap handler maps its own pages this way. The VMA becomes
    /// VM_MIXEDMAP; the entry takes a reference and a map count of the page
    /// (the caller keeps its own reference and drops it when it wants), and
    /// is writable only in a shared writable VMA (a private one copies on
    /// write, as `vma->vm_page_prot` makes it read-only). Zapping the VMA
    /// drops the entry's reference like any other mapping.
    ///
    /// Caller holds the mmap lock for writing (an unlocked call is reported
    /// as a diagnostic) and a reference on `page`.
    ///
    /// - Parameters:
    ///   - page: a system page, not anonymous memory and not ZONE_DEVICE.
    ///   - address: a page-aligned address in `vma`.
    ///   - vma: a VMA of this address space, not VM_PFNMAP.
    /// - Throws: ``Errno/badAddress`` (EFAULT) for an address outside `vma`;
    ///   ``Errno/invalidArgument`` for an anonymous, device, zero or free
    ///   page, an unaligned address, a VMA of another address space or a
    ///   VM_PFNMAP one; ``Errno/busy`` when something is mapped there
    ///   already. Nothing changes then.
    ///
    /// The corresponding kernel function is `vm_insert_page()`.
    public func insertPage(_ page: Page, at address: UInt64, in vma: VMA) throws(Errno) {
        if !isMmapLocked { kernel.warn("vm_insert_page: caller must hold the mmap lock for writing", "\(vma)", kind: .lockNotHeld) }
        guard address >= vma.start, address < vma.end else { throw .badAddress }
        guard vma.mm.state === state, vma.isLive, address & ~PageGeometry.pageMask == 0 else { throw .invalidArgument }
        if vma.flags.contains(.special) {
            kernel.warn("vm_insert_page: VM_PFNMAP vma (BUG_ON(vma->vm_flags & VM_PFNMAP))", "\(vma)")
            throw .invalidArgument
        }
        let folio = page.folio
        // validate_page_before_insert(): no anonymous or typed pages.
        guard folio.refCount > 0, !folio.isAnon, !folio.isZoneDevice, !folio.isZeroPage else { throw .invalidArgument }
        guard ensurePTETable(address).kind == .table else { throw .busy }
        let writable = vma.flags.contains(.shared) && vma.flags.contains(.write)
        let inserted = withPTL(address) { () -> Bool in
            guard loadPMD(address).kind == .table, loadPTE(address).isNone else { return false }
            folio.get()
            addFileRmap(page: page)
            storePTE(address, .present(pfn: page.pfn, write: writable))
            return true
        }
        guard inserted else { throw .busy }
        vma.flags.insert(.mixedMap)
    }

    // MARK: internals

    /// `mmap_region()` for anonymous, file and driver mappings: a new VMA
    /// in the address space, nothing mapped in it, linked into the anon
    /// rmap. `pageOffset` is its `vm_pgoff`; nil for anonymous memory,
    /// which gets `do_mmap()`'s: the start's page number for a private
    /// mapping, 0 for a shared one. Caller holds the mmap lock for writing.
    func mapRegionLocked(address: UInt64?, length: Int, protection: Protection, shared: Bool, special: Bool,
                         file: File?, pageOffset: UInt64?) throws(Errno) -> VMA {
        guard length > 0 else { throw .invalidArgument }
        let len = PageGeometry.pageAlign(UInt64(length))
        var flags: VMAFlags = []
        if protection.contains(.read) { flags.insert(.read) }
        if protection.contains(.write) { flags.insert([.write, .read]) }
        if shared { flags.insert(.shared) }
        if special { flags.insert(.special) }
        let start: UInt64
        if let address {
            guard address & ~PageGeometry.pageMask == 0, address >= baseAddress, address <= endAddress, len <= endAddress - address else {
                throw .invalidArgument
            }
            try hugetlbCheckSplit(address, address + len)
            start = address
            unmapLocked(start, start + len)
        } else {
            guard let s = freeRange(length: len, align: len >= AddressSpace.pmdSize ? AddressSpace.pmdSize : PageGeometry.pageSize64) else {
                throw .noMemory
            }
            start = s
        }
        let pgoff = pageOffset ?? (shared ? 0 : start >> PageGeometry.pageShift)
        let vma = VMA(mm: kernelView, start: start, end: start + len, flags: flags, file: file, pageOffset: pgoff)
        let i = vmas.firstIndex { $0.start > start } ?? vmas.count
        vmas.insert(vma, at: i)
        relinkAnonMappings()
        return vma
    }

    /// Refreshes this address space's entries in the `i_mmap` of each of
    /// `files` from its VMAs (`vma_link()`, `vma_adjust()`, `unlink_file_vma()`).
    /// Caller holds the mmap lock for writing.
    func relinkFileMappings(_ files: [File]) {
        var done: [ObjectIdentifier] = []
        for file in files where !done.contains(ObjectIdentifier(file)) {
            done.append(ObjectIdentifier(file))
            let entries = vmas.compactMap { v -> FileMappingEntry? in
                guard v.file === file else { return nil }
                return FileMappingEntry(mm: state.kernelViewRef, mmID: id, start: v.start, end: v.end, pageOffset: v.pageOffset)
            }
            file.relink(mmID: id, entries)
        }
    }

    /// The file fault of a none PTE (`do_fault()`): a read maps the
    /// page-cache folio read-only (`do_read_fault()`); a write in a shared
    /// VMA maps it writable and dirties it (`do_shared_fault()`); a write in
    /// a private VMA maps a new anonymous copy (`do_cow_fault()`).
    ///
    /// We enter with the mmap lock held for reading and no page-table lock;
    /// the folio is locked from `filemap_fault()` until its entry is set
    /// (`finish_fault()`), so a truncation cannot race the mapping. A changed
    /// entry just retries the access. We return with no page-table lock.
    func fileFault(_ vma: VMA, _ address: UInt64, write: Bool) throws(Errno) {
        guard let file = vma.file else { return }
        let addr = address & PageGeometry.pageMask
        let folio = try file.faultFolio(vma.linearPageIndex(addr))
        defer { folio.unlock() }
        if write && !vma.flags.contains(.shared) {
            defer { folio.put() }
            guard let copy = kernel.allocateFolio(order: 0) else { throw .noMemory }
            copy.copyBytes(from: folio)
            let mapped = withPTL(addr) { () -> Bool in
                guard loadPMD(addr).kind == .table, loadPTE(addr).isNone else { return false }
                addNewAnonRmap(copy, vma, address: addr, pmdMapped: false)
                storePTE(addr, .present(pfn: copy.pfn, write: true, dirty: true))
                return true
            }
            if mapped { kernel.vmstat.count(.cowFaults) } else { copy.put() }
            return
        }
        if write { kernel.deferredTLB.willMakeWritable() }
        let mapped = withPTL(addr) { () -> Bool in
            guard loadPMD(addr).kind == .table, loadPTE(addr).isNone else { return false }
            addFileRmap(page: folio.page(0))
            storePTE(addr, .present(pfn: folio.pfn, write: write, dirty: write))
            return true
        }
        // The fault's reference becomes the mapping's.
        if !mapped { folio.put(); return }
        if write { folio.markDirty() }
    }

    /// `folio_add_file_rmap_pte()`: one more PTE mapping of a page that is
    /// not anonymous; its `folio->mapping` stays what it is.
    func addFileRmap(page: Page) {
        page.atomicMapcount.wrappingAdd(1, ordering: .acquiringAndReleasing)
        page.folio.largeMapcountAdd(1)
    }

    /// Clears the PTE at `address` if it maps `folio` (truncation's
    /// `unmap_mapping_folio()`), inside an `MMU_NOTIFY_CLEAR` invalidation;
    /// the mapping's rmap and reference go after the TLB flush. We enter and
    /// return with no page-table lock; the caller holds the folio lock.
    func zapFilePage(_ folio: Folio, at address: UInt64) {
        guard covers(address) else { return }
        withInvalidation(address, address + PageGeometry.pageSize64, .clear) {
            let cleared = withPTL(address) { () -> Bool in
                let pte = loadPTE(address)
                guard loadPMD(address).kind == .table, pte.kind == .present, pte.pfn == folio.pfn else { return false }
                // ptep_get_and_clear(): a dirty bit set since the load comes along.
                if exchangePTE(address, .none).isDirty { folio.markDirty() }
                removeRmap(page: folio.page(0))
                return true
            }
            if cleared {
                flushTLBRange(address, address + PageGeometry.pageSize64)
                folio.put()
            }
        }
    }
}

extension Kernel {
    /// `rmap_walk_file()` for one page of a page-cache folio: `body` gets
    /// each address space mapping the page's file page and the address.
    /// The caller checks each entry under its page-table lock.
    func rmapWalkFile(_ page: Page, _ body: (AddressSpace, UInt64) -> Void) {
        let folio = page.folio
        let head = folio.meta
        guard let file = file(id: head.mappingMM) else { return }
        file.forEachMapping(of: head.index &+ (page.pfn &- folio.pfn), body)
    }
}
