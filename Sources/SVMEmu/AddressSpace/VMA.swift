/// Protection of a mapping (`PROT_*`).
public struct Protection: OptionSet, Sendable, Hashable {
    /// The `PROT_*` bits.
    public let rawValue: UInt32
    /// The protection with these bits.
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// `PROT_READ`.
    public static let read = Protection(rawValue: 1)
    /// `PROT_WRITE` (implies read for the emulator's anonymous mappings).
    public static let write = Protection(rawValue: 2)
    /// `PROT_NONE`: no access.
    public static let none: Protection = []
    /// `PROT_READ | PROT_WRITE`.
    public static let readWrite: Protection = [.read, .write]
}

/// VMA flags (`VM_*`).
public struct VMAFlags: OptionSet, Sendable, Hashable, CustomStringConvertible {
    /// The flag bits.
    public let rawValue: UInt32
    /// The flags with these bits.
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// VM_READ.
    public static let read = VMAFlags(rawValue: 1 << 0)
    /// VM_WRITE.
    public static let write = VMAFlags(rawValue: 1 << 1)
    /// VM_SHARED: a MAP_SHARED mapping.
    public static let shared = VMAFlags(rawValue: 1 << 3)
    /// VM_HUGEPAGE (MADV_HUGEPAGE).
    public static let hugepage = VMAFlags(rawValue: 1 << 4)
    /// VM_NOHUGEPAGE (MADV_NOHUGEPAGE).
    public static let noHugepage = VMAFlags(rawValue: 1 << 5)
    /// VM_PFNMAP | VM_IO: a mapping of raw pfns (`remap_pfn_range()` of
    /// device registers) with no struct pages behind it. CPU faults in it are
    /// SIGBUS, `hmm_range_fault()` reports it as an error and
    /// `migrate_vma_setup()` refuses it.
    public static let special = VMAFlags(rawValue: 1 << 6)
    /// VM_HUGETLB: a MAP_HUGETLB mapping, backed by 2 MiB pages of the
    /// hugetlb pool, mapped by PMD entries only.
    public static let hugetlb = VMAFlags(rawValue: 1 << 7)
    /// VM_MIXEDMAP: a driver inserts pages into it itself
    /// (``AddressSpace/insertPage(_:at:in:)``, `vm_insert_page()`). Its
    /// pages are normal pages: `hmm_range_fault()` reports them; only
    /// `migrate_vma_setup()` refuses the VMA (VM_SPECIAL includes VM_MIXEDMAP).
    public static let mixedMap = VMAFlags(rawValue: 1 << 8)

    /// `rw`/`-`, `s`/`p` and the huge page and special flags, as
    /// `/proc/PID/maps` shows them.
    public var description: String {
        var s = ""
        s += contains(.read) ? "r" : "-"
        s += contains(.write) ? "w" : "-"
        s += contains(.shared) ? "s" : "p"
        if contains(.hugepage) { s += " hugepage" }
        if contains(.noHugepage) { s += " nohugepage" }
        if contains(.special) { s += " special" }
        if contains(.hugetlb) { s += " hugetlb" }
        if contains(.mixedMap) { s += " mixedmap" }
        return s
    }
}

/// A virtual memory area (`struct vm_area_struct`): `[start, end)` with flags.
///
/// Reference type: migrate_vma arguments name a VMA by identity, as the kernel
/// passes a pointer. Its fields change only under the mmap lock held for writing.
public final class VMA: @unchecked Sendable, CustomStringConvertible {
    /// First address (`vm_start`); stable while the mmap lock is held.
    public internal(set) var start: UInt64
    /// One past the last address (`vm_end`); stable while the mmap lock is held.
    public internal(set) var end: UInt64
    /// The flags (`vm_flags`); stable while the mmap lock is held.
    public internal(set) var flags: VMAFlags
    /// The address space this VMA belongs to (`vma->vm_mm`).
    public unowned let mm: AddressSpace
    /// False once munmap removed it.
    public internal(set) var isLive = true
    /// A hugetlb VMA's reservations (the owner's `resv_map`); shared by the
    /// pieces a split makes, nil for a fork child's copy.
    var hugetlbReservation: HugeTLBReservation?
    /// The file this VMA maps (`vma->vm_file`), or nil for anonymous memory
    /// and driver mappings. The VMA keeps the file alive.
    public let file: File?
    /// The linear page index of ``start`` (`vma->vm_pgoff`, in pages):
    /// for a file mapping the file page mapped there; for private
    /// anonymous memory `start >> PAGE_SHIFT` when it was mapped, kept
    /// when `mremap()` moves it, so that the anonymous folios it maps keep
    /// their index (`folio->index`) and the rmap finds them at
    /// `start + (index - pageOffset) << PAGE_SHIFT` (`vma_address()`).
    /// 0 for shared anonymous memory (an offset in its shmem object), a
    /// hugetlb mapping (in its hugetlbfs file) and a driver's mapping (the
    /// device file's offset). A split gives the second piece the index of
    /// its first page. Stable while the mmap lock is held.
    public internal(set) var pageOffset: UInt64

    init(mm: AddressSpace, start: UInt64, end: UInt64, flags: VMAFlags, file: File? = nil, pageOffset: UInt64 = 0) {
        self.mm = mm
        self.start = start
        self.end = end
        self.flags = flags
        self.file = file
        self.pageOffset = pageOffset
    }

    /// Whether this is private anonymous memory: no file, not shared, not a
    /// raw pfn mapping, not hugetlb (a file on the internal hugetlbfs mount). Shared mappings behave like shmem (they have a
    /// mapping); a MAP_PRIVATE file mapping is not anonymous either, though
    /// the pages its writes copy are. A VM_MIXEDMAP mapping a driver made
    /// without fault handlers (dmirror's) counts as anonymous, as in the
    /// kernel, where the test is `!vma->vm_ops`.
    ///
    /// The corresponding kernel function is `vma_is_anonymous()`.
    public var isAnonymous: Bool { file == nil && flags.isDisjoint(with: [.shared, .special, .hugetlb]) }

    /// The linear page index of `address` (in this VMA): the file page a
    /// file mapping maps there, or the `folio->index` an anonymous folio
    /// mapped there has.
    ///
    /// The corresponding kernel function is `linear_page_index()`.
    func linearPageIndex(_ address: UInt64) -> UInt64 {
        pageOffset &+ ((address &- start) >> PageGeometry.pageShift)
    }

    /// Whether anonymous folios may be mapped here, so that the anon rmap
    /// must visit it: every VMA but a shared file mapping (its pages are
    /// the page cache's, found through the file) and a raw pfn mapping
    /// (no pages). A private file mapping holds the anonymous copies its
    /// write faults make; shared anonymous memory is walked like private
    /// (the emulator has no shmem object for it).
    var isInAnonRmap: Bool {
        !flags.contains(.special) && !(file != nil && flags.contains(.shared))
    }
    /// `end - start` in bytes.
    public var length: UInt64 { end - start }
    /// Whether `address` lies in `[start, end)`.
    public func contains(_ address: UInt64) -> Bool { address >= start && address < end }

    /// Whether a 2 MiB folio may back `address`: the aligned 2 MiB lies inside
    /// the VMA, the VMA does not forbid huge pages, and the THP policy allows
    /// it.
    ///
    /// - Parameters:
    ///   - address: any address in the VMA.
    ///   - mode: the THP policy in force.
    ///
    /// The corresponding kernel function is `thp_vma_allowable_order()`.
    public func allowsHugePage(at address: UInt64, mode: TransparentHugepageMode) -> Bool {
        guard flags.isDisjoint(with: [.noHugepage, .special, .hugetlb, .mixedMap]), file == nil else { return false }
        switch mode {
        case .never: return false
        case .madvise: if !flags.contains(.hugepage) { return false }
        case .always: break
        }
        let base = address & PageGeometry.pmdMask
        return base >= start && base + PageGeometry.pmdSize64 <= end
    }

    /// `vma(start-end flags)`.
    public var description: String {
        "vma(0x\(String(start, radix: 16))-0x\(String(end, radix: 16)) \(flags))"
    }
}
