/// Eviction: migrating device pages back to system memory without a VMA
/// (`migrate_device_range()`, `migrate_device_pfns()`), e.g. when a driver
/// frees its device memory. The pages are found by pfn and unmapped through
/// the reverse map.
extension Kernel {

    /// Takes a reference on and trylocks the folio at `pfn`
    /// (`migrate_device_pfn_lock()`): a free page, a tail page or a lock held
    /// elsewhere gives an empty entry.
    func migrateDevicePfnLock(_ pfn: UInt64) -> MigratePFN {
        guard isValid(pfn: pfn) else { return .empty }
        let m = metaPtr(pfn)
        guard m.head == pfn else { return .empty }
        let folio = Folio(pfn: pfn, kernel: self)
        guard folio.tryGet() else { return .empty }
        guard folio.tryLock() else {
            folio.put()
            return .empty
        }
        return MigratePFN(pfn: pfn).with(MigratePFN.migrateBit | (folio.isLarge ? MigratePFN.compoundBit : 0))
    }

    /// Collects and unmaps `count` device pages from `startPfn`.
    /// - Throws: `.invalidArgument` when `src` is shorter than `count`.
    /// The corresponding kernel function is `migrate_device_range()`.
    public func migrateDeviceRange(_ src: inout [MigratePFN], startPfn: UInt64, count: Int) throws(Errno) {
        guard count >= 0, src.count >= count else { throw .invalidArgument }
        for i in 0..<count { src[i] = migrateDevicePfnLock(startPfn + UInt64(i)) }
        _ = migrateDeviceUnmap(&src, count, faultPage: nil, faultPageLocked: false)
    }

    /// Like `migrateDeviceRange` for the pfns `src` already holds (as plain
    /// pfns in `MigratePFN(pfn:)` form).
    /// - Throws: `.invalidArgument` when `src` is shorter than `count`.
    /// The corresponding kernel function is `migrate_device_pfns()`.
    public func migrateDevicePfns(_ src: inout [MigratePFN], count: Int) throws(Errno) {
        guard count >= 0, src.count >= count else { throw .invalidArgument }
        for i in 0..<count { src[i] = src[i].isValid ? migrateDevicePfnLock(src[i].pfn) : .empty }
        _ = migrateDeviceUnmap(&src, count, faultPage: nil, faultPageLocked: false)
    }
}
