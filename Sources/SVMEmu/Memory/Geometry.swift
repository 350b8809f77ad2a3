/// The emulated machine's page geometry, under the kernel's names: x86-64's
/// 4 KiB base pages and the 2 MiB a PMD entry maps (a THP, an order-9 folio).
///
/// Sizes and counts are `Int` (byte counts, buffer lengths, page counts);
/// the `...64` forms and the masks are `UInt64`, for address and pfn
/// arithmetic. Each is an inlinable constant, so that hot paths in other
/// modules (page-table walks, drivers) fold it as the kernel's macros fold.
public enum PageGeometry {
    /// log2 of the base page size.
    ///
    /// The corresponding kernel constant is `PAGE_SHIFT`.
    @inlinable public static var pageShift: Int { 12 }

    /// Bytes per base page (4096).
    ///
    /// The corresponding kernel constant is `PAGE_SIZE`.
    @inlinable public static var pageSize: Int { 1 << pageShift }

    /// `pageSize` for address arithmetic.
    @inlinable public static var pageSize64: UInt64 { UInt64(pageSize) }

    /// Clears the offset within a page: `address & pageMask` is the page's
    /// start, `address & ~pageMask` the offset in it.
    ///
    /// The corresponding kernel constant is `PAGE_MASK`.
    @inlinable public static var pageMask: UInt64 { ~(pageSize64 - 1) }

    /// log2 of the bytes one PMD entry maps.
    ///
    /// The corresponding kernel constant is `PMD_SHIFT`.
    @inlinable public static var pmdShift: Int { 21 }

    /// Bytes one PMD entry maps (2 MiB): a huge page, a PTE table's reach.
    ///
    /// The corresponding kernel constant is `HPAGE_PMD_SIZE` (`PMD_SIZE`).
    @inlinable public static var pmdSize: Int { 1 << pmdShift }

    /// `pmdSize` for address arithmetic.
    @inlinable public static var pmdSize64: UInt64 { UInt64(pmdSize) }

    /// Clears the offset within a PMD's 2 MiB: `address & pmdMask` is the
    /// start of its huge page, `address & ~pmdMask` the offset in it.
    ///
    /// The corresponding kernel constant is `PMD_MASK`.
    @inlinable public static var pmdMask: UInt64 { ~(pmdSize64 - 1) }

    /// The order of a PMD-sized folio (9).
    ///
    /// The corresponding kernel constant is `HPAGE_PMD_ORDER`.
    @inlinable public static var pmdOrder: Int { pmdShift - pageShift }

    /// Base pages per PMD-sized folio, and entries per PTE table (512).
    ///
    /// The corresponding kernel constant is `HPAGE_PMD_NR` (`PTRS_PER_PTE`).
    @inlinable public static var pmdPages: Int { 1 << pmdOrder }

    /// `pmdPages` for pfn arithmetic.
    @inlinable public static var pmdPages64: UInt64 { UInt64(pmdPages) }

    /// `x` rounded up to a whole number of pages.
    ///
    /// The corresponding kernel macro is `PAGE_ALIGN()`.
    @inlinable
    public static func pageAlign<T: FixedWidthInteger>(_ x: T) -> T {
        (x + T(pageSize) - 1) & ~(T(pageSize) - 1)
    }
}
