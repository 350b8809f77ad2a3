import CSVMSupport

/// `FOLL_*` flags of get_user_pages / pin_user_pages.
public struct GUPFlags: OptionSet, Sendable, Hashable {
    /// The flag bits.
    public let rawValue: UInt32
    /// The flags with these bits.
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// `FOLL_WRITE`: the pages will be written; each is faulted in writable
    /// (a shared anonymous page is copied first).
    public static let write = GUPFlags(rawValue: 0x01)
    /// `FOLL_LONGTERM`: the pin may last indefinitely; pages that must not
    /// stay pinned where they are (device memory) are migrated to system
    /// memory first. Only with a pin.
    public static let longterm = GUPFlags(rawValue: 0x10000)
}

// get_user_pages() and pin_user_pages() (mm/gup.c): references (FOLL_GET)
// or pins (FOLL_PIN) on the pages of a range, faulting them in first. A
// device-private page is never returned: the fault migrates it to RAM.
extension AddressSpace {

    /// Takes a reference (`FOLL_GET`) on each page of `[start, start + count
    /// pages)`, faulting each in as a CPU access would (writable with
    /// ``GUPFlags/write``; a device-private page migrates back to RAM).
    ///
    /// Caller holds the mmap lock for reading (an unlocked call is reported
    /// as a diagnostic) and keeps it; faults sleep holding it. Each returned
    /// page's folio holds one reference the caller drops with
    /// ``Folio/put()``.
    ///
    /// - Parameters:
    ///   - start: the first address (rounded down to its page).
    ///   - count: how many pages; at least 1.
    ///   - flags: ``GUPFlags/write``; ``GUPFlags/longterm`` is refused
    ///     without a pin.
    /// - Returns: the pages, in address order.
    /// - Throws: ``Errno/invalidArgument`` for `count < 1` or
    ///   ``GUPFlags/longterm``; ``Errno/badAddress`` (EFAULT) for an address
    ///   without a VMA, a PROT_NONE or special VMA, or the zero page asked
    ///   for writing's copy failing; a fault's own error. References taken
    ///   before the error are dropped.
    ///
    /// The corresponding kernel function is `get_user_pages()`.
    public func getUserPages(_ start: UInt64, count: Int, flags: GUPFlags = []) throws(Errno) -> [Page] {
        guard count >= 1, !flags.contains(.longterm) else { throw .invalidArgument }
        return try gup(start, count: count, flags: flags, pin: false)
    }

    /// Pins (`FOLL_PIN`) each page of `[start, start + count pages)`:
    /// ``Folio/pinCountingBias`` references per page, which make
    /// ``Folio/isMaybeDMAPinned`` true, so migrate_vma's collect skips the
    /// page (`folio_try_share_anon_rmap_pte()` refuses it) and every
    /// migration's reference check fails. A shared anonymous page is made
    /// exclusive first (it is faulted for writing when the VMA allows it:
    /// the emulator's unshare fault). With ``GUPFlags/longterm`` no device
    /// page ends up pinned: device-private pages fault back to RAM anyway,
    /// and a device-coherent page is migrated to a system page first
    /// (`migrate_device_coherent_folio()`), then pinned there. The address
    /// space is marked as one that has pinned (`MMF_HAS_PINNED`): from then
    /// on ``fork()`` gives the child its own copy of each anonymous page
    /// that may be pinned, so the pin keeps seeing what this address space
    /// writes.
    ///
    /// Caller holds the mmap lock for reading, as for
    /// ``getUserPages(_:count:flags:)``. Release each page with
    /// ``Kernel/unpinUserPage(_:)``.
    ///
    /// - Parameters:
    ///   - start: the first address (rounded down to its page).
    ///   - count: how many pages; at least 1.
    ///   - flags: ``GUPFlags/write``, ``GUPFlags/longterm``.
    /// - Returns: the pinned pages, in address order.
    /// - Throws: as ``getUserPages(_:count:flags:)`` (``GUPFlags/longterm``
    ///   allowed); ``Errno/busy`` when a device-coherent page that a
    ///   long-term pin must move cannot be migrated (referenced elsewhere,
    ///   no system page). Pins taken before the error are dropped.
    ///
    /// The corresponding kernel function is `pin_user_pages()`.
    public func pinUserPages(_ start: UInt64, count: Int, flags: GUPFlags = []) throws(Errno) -> [Page] {
        guard count >= 1 else { throw .invalidArgument }
        return try gup(start, count: count, flags: flags, pin: true)
    }

    /// ``getUserPages(_:count:flags:)`` taking the mmap lock itself.
    ///
    /// The caller must not hold the mmap lock.
    ///
    /// - Parameters:
    ///   - start: the first address.
    ///   - count: how many pages.
    ///   - flags: as ``getUserPages(_:count:flags:)``.
    /// - Returns: the pages, each with one reference for the caller.
    /// - Throws: as ``getUserPages(_:count:flags:)``.
    ///
    /// The corresponding kernel function is `get_user_pages_fast()`.
    public func getUserPagesFast(_ start: UInt64, count: Int, flags: GUPFlags = []) throws(Errno) -> [Page] {
        mmapReadLock(); defer { mmapReadUnlock() }
        return try getUserPages(start, count: count, flags: flags)
    }

    /// ``pinUserPages(_:count:flags:)`` taking the mmap lock itself.
    ///
    /// The caller must not hold the mmap lock.
    ///
    /// - Parameters:
    ///   - start: the first address.
    ///   - count: how many pages.
    ///   - flags: as ``pinUserPages(_:count:flags:)``.
    /// - Returns: the pinned pages.
    /// - Throws: as ``pinUserPages(_:count:flags:)``.
    ///
    /// The corresponding kernel function is `pin_user_pages_fast()`.
    public func pinUserPagesFast(_ start: UInt64, count: Int, flags: GUPFlags = []) throws(Errno) -> [Page] {
        mmapReadLock(); defer { mmapReadUnlock() }
        return try pinUserPages(start, count: count, flags: flags)
    }

    /// `__get_user_pages()`: per page, look the entry up under the PTE lock
    /// (`follow_page_pte()`) and take the reference or pin there, or fault
    /// and look again. We enter and return with the mmap lock held for
    /// reading and no page-table lock.
    private func gup(_ start: UInt64, count: Int, flags: GUPFlags, pin: Bool) throws(Errno) -> [Page] {
        if !isMmapLocked { kernel.warn("get_user_pages: caller must hold the mmap lock", "0x\(String(start, radix: 16))", kind: .lockNotHeld) }
        // mm_set_has_pinned_flag(): from the first pin on, fork copies the
        // anonymous pages that may be pinned instead of sharing them.
        if pin && !state.hasPinned.load(ordering: .relaxed) { state.hasPinned.store(true, ordering: .relaxed) }
        var pages: [Page] = []
        pages.reserveCapacity(count)
        let write = flags.contains(.write)
        var a = start & PageGeometry.pageMask
        do throws(Errno) {
            while pages.count < count {
                guard let vma = vma(containing: a), vma.flags.contains(.read), !vma.flags.contains(.special) else { throw Errno.badAddress }
                if write && !vma.flags.contains(.write) { throw Errno.badAddress }
                if let page = followPage(a, vma, write: write, pin: pin, longterm: flags.contains(.longterm)) {
                    if pin && flags.contains(.longterm) && page.folio.isDeviceCoherent {
                        // check_and_migrate_movable_pages(): device memory must
                        // not stay pinned; the pin becomes a plain reference,
                        // which the migration consumes, and the page is
                        // looked up again.
                        let folio = page.folio
                        folio.get()
                        kernel.unpinUserPage(page)
                        guard kernel.migrateDeviceCoherentFolio(folio) else { throw Errno.busy }
                        continue
                    }
                    pages.append(page)
                    a += PageGeometry.pageSize64
                    continue
                }
                // faultin_page(): a pin of a shared anonymous page unshares
                // it, and so does a FOLL_LONGTERM pin of a file page in a
                // private mapping (the emulator's unshare is a write fault).
                var unshare = pin && vma.isAnonymous && vma.flags.contains(.write)
                if pin && !unshare, case let e = entry(at: a).entry, e.kind == .present, !e.isSpecial {
                    unshare = mustUnshare(Page(pfn: e.pfn, kernel: kernel), vma, pin: pin, longterm: flags.contains(.longterm))
                }
                var state = FaultLockState(held: true, mayDrop: false)
                try handleMMFaultLocked(a, write: write || unshare, &state)
            }
        } catch {
            for p in pages { if pin { kernel.unpinUserPage(p) } else { p.folio.put() } }
            throw error
        }
        return pages
    }

    /// `gup_must_unshare()` for a pin: in a private writable mapping, an
    /// anonymous page that is not exclusive, or with `longterm` any page
    /// that is not anonymous (a page-cache or driver page the mapping still
    /// shares), must be unshared (copied) before it is pinned. Caller holds
    /// the page-table lock of the entry, or reads a snapshot before a fault.
    private func mustUnshare(_ page: Page, _ vma: VMA, pin: Bool, longterm: Bool) -> Bool {
        guard pin, !vma.flags.contains(.shared), vma.flags.contains(.write) else { return false }
        if page.folio.isAnon { return !page.isAnonExclusive }
        return longterm
    }

    /// `follow_page_pte()`: the page mapped at `address` with a reference or
    /// pin taken, or nil when a fault is needed (nothing present, not
    /// writable for a write, a page a pin must unshare (`gup_must_unshare()`), a 2 MiB
    /// mapping, which is looked up per 4 KiB page after a split).
    private func followPage(_ address: UInt64, _ vma: VMA, write: Bool, pin: Bool, longterm: Bool) -> Page? {
        let pmd = loadPMD(address)
        if pmd.kind == .present && !pmd.isSpecial && !pmd.isProtNone && (!write || pmd.isWrite) {
            return withPMDLock(address) { () -> Page? in
                let now = loadPMD(address)
                guard now == pmd else { return nil }
                // follow_huge_pmd(): the unshare check reads the head, which
                // carries a PMD mapping's PageAnonExclusive; then the page.
                if mustUnshare(Page(pfn: pmd.pfn, kernel: kernel), vma, pin: pin, longterm: longterm) { return nil }
                let page = Page(pfn: pmd.pfn + ((address >> PageGeometry.pageShift) & (PageGeometry.pmdPages64 - 1)), kernel: kernel)
                page.folio.get()
                if pin { page.folio.pin(); page.folio.put() }
                return page
            }
        }
        guard pmd.kind == .table else { return nil }
        return withPTL(address) { () -> Page? in
            guard loadPMD(address).kind == .table else { return nil }
            let pte = loadPTE(address)
            guard pte.kind == .present, !pte.isProtNone, !write || pte.isWrite else { return nil }
            // The zero page (read only: a write faulted it away above): a
            // reference for FOLL_GET, no pin accounting for FOLL_PIN.
            if pte.isSpecial {
                let zero = Page(pfn: pte.pfn, kernel: kernel)
                if !pin { zero.folio.get() }
                return zero
            }
            let page = Page(pfn: pte.pfn, kernel: kernel)
            if mustUnshare(page, vma, pin: pin, longterm: longterm) { return nil }
            page.folio.get()
            if pin { page.folio.pin(); page.folio.put() }
            return page
        }
    }
}

extension Kernel {
    /// Drops a pin taken by ``AddressSpace/pinUserPages(_:count:flags:)``.
    ///
    /// The caller owns the pin. The last reference frees the folio. The
    /// zero page is returned by pins without being pinned, and is left alone.
    ///
    /// - Parameters:
    ///   - page: a page returned by a pin.
    ///
    /// The corresponding kernel function is `unpin_user_page()`.
    public func unpinUserPage(_ page: Page) {
        // The zero page is never pin-accounted.
        if page.folio == zeroPage { return }
        page.folio.unpin()
    }
}

extension AddressSpace {
    /// The page mapped present at `address`, with a reference the caller
    /// owns (drop it with `page.folio.put()`), without faulting anything in.
    ///
    /// Returns nil where nothing present is mapped: no VMA, an empty entry,
    /// the zero page, a migration entry (the page is being migrated) or a
    /// device-private entry. The reference keeps the frame from being freed
    /// or migrated (migration's reference check fails while it is held); it
    /// does not keep the page mapped. Takes the mmap lock for reading (the
    /// kernel's fast path walks with interrupts off instead); call with no
    /// page-table lock held.
    ///
    /// - Parameter address: any user address.
    /// - Returns: the page, referenced, or nil.
    ///
    /// The corresponding kernel function is `get_user_pages_fast_only()`.
    public func getUserPage(_ address: UInt64) -> Page? {
        withMmapReadLock { followPage(address) }
    }
}
