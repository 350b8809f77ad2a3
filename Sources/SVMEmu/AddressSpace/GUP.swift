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
