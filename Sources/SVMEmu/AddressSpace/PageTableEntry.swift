/// A page-table entry, PTE or PMD level, as one 64-bit word.
///
/// Bits 0-2 give the kind; bits 3-9 flags; bits 12 and up the pfn.
/// At PMD level `.table` means "points to a PTE table" and the other kinds
/// are huge (2 MiB) entries.
public struct PageTableEntry: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    /// The entry's word.
    public var rawValue: UInt64
    /// The entry with this word.
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// What an entry is (bits 0-2).
    public enum Kind: UInt64, Sendable {
        /// pte_none / pmd_none.
        case none = 0
        /// A present mapping of a page frame (pte_present / pmd_trans_huge).
        case present = 1
        /// A migration entry: the page is being migrated; faults wait.
        case migration = 2
        /// A device-private entry: the page lives in device memory the CPU cannot address.
        case devicePrivate = 3
        /// PMD only: points to a PTE table.
        case table = 4
        /// A device-exclusive entry (PTE only): a device holds the page for
        /// atomic access; the CPU faults and gets its mapping back. The
        /// entry keeps the mapping's reference and map count.
        case deviceExclusive = 5
    }
    /// Writable (`pte_write`); on a migration or device-private entry, the
    /// mapping it stands for was writable. Never set on a device-exclusive
    /// entry.
    public static let writeBit: UInt64 = 1 << 3
    /// Dirty (`pte_dirty`).
    public static let dirtyBit: UInt64 = 1 << 4
    /// Accessed (`pte_young`).
    public static let youngBit: UInt64 = 1 << 5
    /// A "special" mapping: the zero page (pte_special).
    public static let specialBit: UInt64 = 1 << 6
    /// Migration entry made from an anon-exclusive read-only mapping.
    public static let readExclusiveBit: UInt64 = 1 << 7
    /// Soft-dirty (`pte_soft_dirty`).
    public static let softDirtyBit: UInt64 = 1 << 8
    /// PROT_NONE: present to the kernel but not accessible (pte_protnone).
    /// Migration, device-private and device-exclusive entries in a PROT_NONE
    /// VMA carry it too:
    /// it is the VMA's `vm_page_prot` as the entry's eventual mapping must
    /// take it (`remove_migration_pte()` builds the PTE from `vm_page_prot`),
    /// kept in the entry because the emulator's reverse map walks reach
    /// the page table without the VMA. mprotect sets and clears it.
    public static let protNoneBit: UInt64 = 1 << 9

    /// The empty entry (`pte_none`).
    public static let none = PageTableEntry(rawValue: 0)

    /// What the entry is.
    @inlinable public var kind: Kind { Kind(rawValue: rawValue & 7) ?? .none }
    /// Whether the word is zero (`pte_none()`).
    @inlinable public var isNone: Bool { rawValue == 0 }
    /// The pfn the entry names (`pte_pfn()`, or the swap entry's pfn).
    @inlinable public var pfn: UInt64 { rawValue >> PageGeometry.pageShift }
    /// Whether ``writeBit`` is set.
    @inlinable public var isWrite: Bool { rawValue & Self.writeBit != 0 }
    /// Whether ``dirtyBit`` is set.
    @inlinable public var isDirty: Bool { rawValue & Self.dirtyBit != 0 }
    /// Whether ``youngBit`` is set.
    @inlinable public var isYoung: Bool { rawValue & Self.youngBit != 0 }
    /// Whether the entry maps a zero page (``specialBit``).
    @inlinable public var isSpecial: Bool { rawValue & Self.specialBit != 0 }
    /// Whether ``readExclusiveBit`` is set.
    @inlinable public var isReadExclusive: Bool { rawValue & Self.readExclusiveBit != 0 }
    /// Whether ``protNoneBit`` is set.
    @inlinable public var isProtNone: Bool { rawValue & Self.protNoneBit != 0 }

    /// An entry of `kind` for `pfn` with raw flag bits.
    @inlinable public static func make(_ kind: Kind, pfn: UInt64, flags: UInt64 = 0) -> PageTableEntry {
        PageTableEntry(rawValue: pfn << PageGeometry.pageShift | flags | kind.rawValue)
    }
    /// A present mapping (`mk_pte()`).
    @inlinable public static func present(pfn: UInt64, write: Bool, dirty: Bool = false, young: Bool = true, special: Bool = false) -> PageTableEntry {
        make(.present, pfn: pfn, flags: (write ? writeBit : 0) | (dirty ? dirtyBit : 0) | (young ? youngBit : 0) | (special ? specialBit : 0))
    }
    /// A migration entry (`make_writable_migration_entry()` and friends).
    @inlinable public static func migration(pfn: UInt64, write: Bool, readExclusive: Bool, dirty: Bool, young: Bool) -> PageTableEntry {
        make(.migration, pfn: pfn, flags: (write ? writeBit : 0) | (readExclusive ? readExclusiveBit : 0) | (dirty ? dirtyBit : 0) | (young ? youngBit : 0))
    }
    /// A device-private entry (`make_writable_device_private_entry()` / readable).
    @inlinable public static func devicePrivate(pfn: UInt64, write: Bool) -> PageTableEntry {
        make(.devicePrivate, pfn: pfn, flags: write ? writeBit : 0)
    }
    /// A device-exclusive entry (`make_device_exclusive_entry()`). Since
    /// v6.15 there is one type, with no write permission: restoring the
    /// mapping takes it from the VMA.
    @inlinable public static func deviceExclusive(pfn: UInt64) -> PageTableEntry {
        make(.deviceExclusive, pfn: pfn)
    }
    /// A PMD entry that points to a PTE table.
    @inlinable public static var table: PageTableEntry { PageTableEntry(rawValue: Kind.table.rawValue) }

    /// This entry with `bits` set.
    @inlinable public func with(_ bits: UInt64) -> PageTableEntry { PageTableEntry(rawValue: rawValue | bits) }
    /// This entry with `bits` cleared.
    @inlinable public func without(_ bits: UInt64) -> PageTableEntry { PageTableEntry(rawValue: rawValue & ~bits) }

    /// The kind, pfn and flags, e.g. `present(pfn: 0x1234, write, dirty)`.
    public var description: String {
        switch kind {
        case .none: return "none"
        case .table: return "table"
        default:
            var s = "\(kind)(pfn: 0x\(String(pfn, radix: 16))"
            if isWrite { s += ", write" }
            if isDirty { s += ", dirty" }
            if isSpecial { s += ", zero" }
            if isReadExclusive { s += ", read-exclusive" }
            if isProtNone { s += ", protnone" }
            return s + ")"
        }
    }
}
