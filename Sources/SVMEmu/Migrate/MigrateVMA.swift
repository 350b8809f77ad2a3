/// Which pages `migrateVMASetup` collects (`MIGRATE_VMA_SELECT_*`).
public struct MigrateSelect: OptionSet, Sendable, Hashable {
    /// The flag bits, as the kernel numbers them.
    public let rawValue: UInt32
    /// The selection with these bits.
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// MIGRATE_VMA_SELECT_SYSTEM (1 << 0): system RAM pages, the zero page and holes.
    public static let system = MigrateSelect(rawValue: 1 << 0)
    /// MIGRATE_VMA_SELECT_DEVICE_PRIVATE (1 << 1): device-private pages of the caller's owner.
    public static let devicePrivate = MigrateSelect(rawValue: 1 << 1)
    /// MIGRATE_VMA_SELECT_DEVICE_COHERENT (1 << 2): device-coherent pages of the caller's owner.
    public static let deviceCoherent = MigrateSelect(rawValue: 1 << 2)
    /// MIGRATE_VMA_SELECT_COMPOUND (1 << 3): keep 2 MiB folios whole.
    public static let compound = MigrateSelect(rawValue: 1 << 3)
}

/// One src or dst entry of a migration, bit-compatible with the kernel's
/// `unsigned long` encoding: bit 0 VALID, bit 1 MIGRATE, bit 3 WRITE,
/// bit 4 COMPOUND, the pfn from bit 6 up.
public struct MigratePFN: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    /// The entry as the kernel lays it out.
    public var rawValue: UInt64
    /// The entry with this raw word.
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// MIGRATE_PFN_VALID: the entry names a page.
    public static let validBit: UInt64 = 1 << 0
    /// MIGRATE_PFN_MIGRATE: the page (or hole) is migrating; cleared when it
    /// cannot.
    public static let migrateBit: UInt64 = 1 << 1
    /// MIGRATE_PFN_WRITE: the source was mapped writable.
    public static let writeBit: UInt64 = 1 << 3
    /// MIGRATE_PFN_COMPOUND: the entry stands for a whole 2 MiB folio (or
    /// hole); the next 511 entries are empty.
    public static let compoundBit: UInt64 = 1 << 4
    /// MIGRATE_PFN_SHIFT: where the pfn starts.
    public static let shift: UInt64 = 6

    /// An empty entry (no page, not migrating).
    public static let empty = MigratePFN(rawValue: 0)
    /// `MIGRATE_PFN_MIGRATE` alone: a hole (or the zero page) that may be filled.
    public static let hole = MigratePFN(rawValue: migrateBit)

    /// The entry for a page frame: `pfn << 6 | VALID`.
    ///
    /// The corresponding kernel function is `migrate_pfn()`.
    @inlinable public init(pfn: UInt64) { rawValue = pfn << MigratePFN.shift | MigratePFN.validBit }
    /// The entry for `page`: what a driver stores in `dst[i]` for a
    /// destination (`migrate_pfn(page_to_pfn(page))`).
    @inlinable public init(page: Page) { self.init(pfn: page.pfn) }

    /// The pfn, meaningful only when `isValid`.
    @inlinable public var pfn: UInt64 { rawValue >> MigratePFN.shift }
    /// Whether ``validBit`` is set: the entry names a page.
    @inlinable public var isValid: Bool { rawValue & MigratePFN.validBit != 0 }
    /// Whether ``migrateBit`` is set: the entry is (still) migrating.
    @inlinable public var isMigrating: Bool { rawValue & MigratePFN.migrateBit != 0 }
    /// Whether ``writeBit`` is set.
    @inlinable public var isWrite: Bool { rawValue & MigratePFN.writeBit != 0 }
    /// Whether ``compoundBit`` is set.
    @inlinable public var isCompound: Bool { rawValue & MigratePFN.compoundBit != 0 }

    /// This entry with `bits` set.
    @inlinable public func with(_ bits: UInt64) -> MigratePFN { MigratePFN(rawValue: rawValue | bits) }
    /// This entry with `bits` cleared.
    @inlinable public func without(_ bits: UInt64) -> MigratePFN { MigratePFN(rawValue: rawValue & ~bits) }

    /// `pfn 0x...|MIGRATE|WRITE|COMPOUND`, or `0` for an empty entry.
    public var description: String {
        var parts: [String] = []
        if isValid { parts.append("pfn 0x\(String(pfn, radix: 16))") }
        if isMigrating { parts.append("MIGRATE") }
        if isWrite { parts.append("WRITE") }
        if isCompound { parts.append("COMPOUND") }
        return parts.isEmpty ? "0" : parts.joined(separator: "|")
    }
}

extension Kernel {
    /// The page of a VALID entry, nil otherwise. Holds no reference.
    ///
    /// The corresponding kernel function is `migrate_pfn_to_page()`.
    @inlinable public func page(_ entry: MigratePFN) -> Page? {
        entry.isValid ? Page(pfn: entry.pfn, kernel: self) : nil
    }
}

/// The arguments of a migration over a virtual range (`struct migrate_vma`).
///
/// The driver fills `vma`, `start`, `end`, `flags`, `pgmapOwner` and, from a
/// CPU fault, `faultPage`; `migrateVMASetup` fills `src`, `cpages`, `npages`;
/// the driver fills `dst`; `migrateVMAPages` and `migrateVMAFinalize` finish.
/// ``Kernel/migrateVMASetup(_:)`` documents the protocol.
public struct MigrateVMA: @unchecked Sendable {
    /// The VMA of the range (`migrate->vma`).
    public var vma: VMA?
    /// First address of the range; masked down to a page boundary by setup.
    public var start: UInt64
    /// One past the last address; masked down to a page boundary by setup.
    public var end: UInt64
    /// One entry per base page of `[start, end)`; must hold at least that many.
    public var src: [MigratePFN]
    /// One entry per base page of `[start, end)`; must hold at least that many.
    public var dst: [MigratePFN]
    /// Entries collected for migration (a compound entry counts once).
    public internal(set) var cpages: Int = 0
    /// Entries walked.
    public internal(set) var npages: Int = 0
    /// Only device pages whose page map has this owner are selected.
    public var pgmapOwner: DeviceOwner?
    /// Which pages are collected.
    public var flags: MigrateSelect
    /// The locked device page a CPU fault is migrating (`migrate->fault_page`).
    public var faultPage: Page?

    enum Phase { case idle, setUp, pagesDone, finalized }
    var phase: Phase = .idle
    /// Whether the fault path holds `faultPage`'s folio lock: known from the
    /// `VMFault` the arguments were prepared with, else fixed at setup by the
    /// policy's contract (locked unless the policy is legacy).
    var faultPageLocked: Bool?

    /// Arguments for `[start, end)` with `src` and `dst` sized for it (see
    /// ``prepare(vma:start:end:flags:pgmapOwner:faultPage:)``).
    public init(vma: VMA?, start: UInt64, end: UInt64, flags: MigrateSelect,
                pgmapOwner: DeviceOwner? = nil, faultPage: Page? = nil) {
        self.init(vma: vma, start: start, end: end, flags: flags, pgmapOwner: pgmapOwner, faultPage: faultPage, faultPageLocked: nil)
    }

    /// Arguments for a migration a CPU fault asked for (`migrate_to_ram`):
    /// `faultPage` is `fault.page`, and whether the fault path holds its lock
    /// travels with it.
    public init(vma: VMA?, start: UInt64, end: UInt64, flags: MigrateSelect,
                pgmapOwner: DeviceOwner? = nil, fault: VMFault) {
        self.init(vma: vma, start: start, end: end, flags: flags, pgmapOwner: pgmapOwner,
                  faultPage: fault.page, faultPageLocked: fault.faultPageLocked)
    }

    private init(vma: VMA?, start: UInt64, end: UInt64, flags: MigrateSelect,
                 pgmapOwner: DeviceOwner?, faultPage: Page?, faultPageLocked: Bool?) {
        self.vma = nil
        self.start = 0
        self.end = 0
        self.flags = []
        src = []
        dst = []
        prepare(vma: vma, start: start, end: end, flags: flags, pgmapOwner: pgmapOwner, faultPage: faultPage)
        self.faultPageLocked = faultPageLocked
    }

    /// Reuses these arguments (and their arrays' storage) for another range:
    /// a driver migrating in batches allocates once, not once per batch.
    ///
    /// `src` and `dst` grow to the range's page count when shorter (they
    /// never shrink), `dst` is cleared, and the counts reset. Reusing
    /// arguments whose migration was set up but not finalized records a
    /// diagnostic.
    public mutating func prepare(vma: VMA?, start: UInt64, end: UInt64, flags: MigrateSelect,
                                 pgmapOwner: DeviceOwner? = nil, fault: VMFault) {
        prepare(vma: vma, start: start, end: end, flags: flags, pgmapOwner: pgmapOwner, faultPage: fault.page)
        faultPageLocked = fault.faultPageLocked
    }

    /// Reuses these arguments for another range (see the other form); a
    /// `faultPage` given here is locked or not as the policy's contract says.
    public mutating func prepare(vma: VMA?, start: UInt64, end: UInt64, flags: MigrateSelect,
                                 pgmapOwner: DeviceOwner? = nil, faultPage: Page? = nil) {
        if phase == .setUp || phase == .pagesDone {
            vma?.mm.kernel.warn("migrate_vma: arguments reused before migrate_vma_finalize", "range 0x\(String(self.start, radix: 16))")
        }
        self.vma = vma
        self.start = start
        self.end = end
        self.flags = flags
        self.pgmapOwner = pgmapOwner
        self.faultPage = faultPage
        self.faultPageLocked = nil
        let n = end > start ? Int((end - start + PageGeometry.pageSize64 - 1) >> PageGeometry.pageShift) : 0
        if src.count < n {
            src.append(contentsOf: repeatElement(.empty, count: n - src.count))
            dst.append(contentsOf: repeatElement(.empty, count: n - dst.count))
        }
        for i in 0..<n { dst[i] = .empty }
        cpages = 0
        npages = 0
        phase = .idle
    }
}
