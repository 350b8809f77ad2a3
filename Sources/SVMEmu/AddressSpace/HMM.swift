import CSVMSupport

/// One output/input word of `hmm_range_fault()` (`unsigned long hmm_pfns[]`):
/// the pfn in the low bits, flags in the high ones.
public struct HMMPFN: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    /// The word as the kernel lays it out.
    public var rawValue: UInt64
    /// The entry with this raw word.
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    /// HMM_PFN_VALID (bit 63); on input HMM_PFN_REQ_FAULT.
    public static let valid = HMMPFN(rawValue: 1 << 63)
    /// HMM_PFN_WRITE (bit 62); on input HMM_PFN_REQ_WRITE.
    public static let write = HMMPFN(rawValue: 1 << 62)
    /// HMM_PFN_ERROR (bit 61): no access possible (PROT_NONE, no VMA).
    public static let error = HMMPFN(rawValue: 1 << 61)
    /// Input: fault the page in (`HMM_PFN_REQ_FAULT`).
    public static let requestFault = valid
    /// Input: fault it in writable (`HMM_PFN_REQ_WRITE`).
    public static let requestWrite = write
    static let orderShift: UInt64 = 56
    static let flagsMask: UInt64 = 0xFF << 56

    /// Whether the entry names a page the device may map (HMM_PFN_VALID).
    public var isValid: Bool { rawValue & HMMPFN.valid.rawValue != 0 }
    /// Whether the CPU mapping is writable (HMM_PFN_WRITE).
    public var isWrite: Bool { rawValue & HMMPFN.write.rawValue != 0 }
    /// Whether no access is possible (HMM_PFN_ERROR).
    public var isError: Bool { rawValue & HMMPFN.error.rawValue != 0 }
    /// The page's pfn, meaningful only when ``isValid``.
    public var pfn: UInt64 { rawValue & ~HMMPFN.flagsMask }
    /// The order of the CPU mapping that backs the entry: 9 for a PMD (2 MiB)
    /// mapping, else 0.
    ///
    /// The corresponding kernel function is `hmm_pfn_to_map_order()`.
    public var mapOrder: Int { Int((rawValue >> HMMPFN.orderShift) & 0x1F) }
    /// `error`, `0`, or the pfn with `write` and the order.
    public var description: String {
        if isError { return "error" }
        if !isValid { return "0" }
        return "pfn 0x\(String(pfn, radix: 16))\(isWrite ? " write" : "")\(mapOrder > 0 ? " order \(mapOrder)" : "")"
    }
}

/// The arguments of `hmm_range_fault()` (`struct hmm_range`).
public struct HMMRange: @unchecked Sendable {
    /// The interval notifier covering the range; with it, the fault gives up
    /// (``Errno/busy``) as soon as an invalidation makes the snapshot stale.
    public var notifier: MMUIntervalNotifier?
    /// From `notifier.readBegin()`.
    public var notifierSeq: UInt64 = 0
    /// First address, page aligned.
    public var start: UInt64
    /// One past the last address, page aligned.
    public var end: UInt64
    /// One entry per page; on input the per-page request flags (masked by `pfnFlagsMask`).
    public var hmmPfns: [HMMPFN]
    /// Flags requested for every page (`default_flags`).
    public var defaultFlags: HMMPFN
    /// Which bits of each input entry count as requests (`pfn_flags_mask`).
    public var pfnFlagsMask: HMMPFN = HMMPFN(rawValue: 0)
    /// Device-private pages of this owner are reported, not faulted.
    public var devicePrivateOwner: DeviceOwner?

    /// A range of `[start, end)` with `hmmPfns` sized for it (all zero: no
    /// per-page request).
    public init(notifier: MMUIntervalNotifier? = nil, start: UInt64, end: UInt64,
                defaultFlags: HMMPFN = HMMPFN(rawValue: 0), devicePrivateOwner: DeviceOwner? = nil) {
        self.notifier = notifier
        self.start = start
        self.end = end
        self.defaultFlags = defaultFlags
        self.devicePrivateOwner = devicePrivateOwner
        hmmPfns = [HMMPFN](repeating: HMMPFN(rawValue: 0), count: end > start ? Int((end - start) >> PageGeometry.pageShift) : 0)
    }
}

extension AddressSpace {
    /// Snapshots (and with request flags, faults in) the CPU mappings of a
    /// range for a device.
    ///
    /// Caller holds the mmap lock for reading (an unlocked call is reported as
    /// a diagnostic) and keeps it; a fault taken here sleeps holding it. The
    /// driver pattern: `range.notifierSeq = notifier.readBegin()`, call this,
    /// then take the driver lock and map the result into the device only if
    /// ``MMUIntervalNotifier/readRetry(_:)`` is false, else start over. No
    /// page reference is taken: the notifier sequence, not a reference, keeps
    /// the result valid.
    ///
    /// On return `range.hmmPfns` holds, per page, ``HMMPFN/valid`` with the
    /// pfn (and ``HMMPFN/write``, and order 9 for a 2 MiB mapping),
    /// ``HMMPFN/error`` where no access is possible, or 0 where nothing is
    /// mapped and no fault was requested. Device-private pages of
    /// `range.devicePrivateOwner` are reported, not faulted; other
    /// device-private pages are faulted back to RAM when requested.
    ///
    /// - Parameters:
    ///   - range: the range, the request flags and the notifier sequence;
    ///     `hmmPfns` is filled in.
    /// - Throws: ``Errno/busy`` when the interval notifier saw an
    ///   invalidation (start over with a new `readBegin()`), or after waiting
    ///   on a migration entry; ``Errno/badAddress`` (EFAULT) when a page that
    ///   must be faulted has no VMA, or the VMA is PROT_NONE or a VM_IO /
    ///   VM_PFNMAP mapping (``VMAFlags/special``; without a fault request
    ///   such pages read ``HMMPFN/error``);
    ///   ``Errno/notPermitted`` (EPERM) when a write is requested on a
    ///   read-only VMA; ``Errno/invalidArgument`` for an empty or unaligned
    ///   range or `hmmPfns` shorter than the range; a fault's own error
    ///   otherwise.
    ///
    /// The corresponding kernel function is `hmm_range_fault()`.
    public func hmmRangeFault(_ range: inout HMMRange) throws(Errno) {
        guard range.end > range.start, range.start & ~PageGeometry.pageMask == 0, range.end & ~PageGeometry.pageMask == 0,
              range.hmmPfns.count >= Int((range.end - range.start) >> PageGeometry.pageShift) else { throw .invalidArgument }
        if !isMmapLocked { kernel.warn("hmm_range_fault: caller must hold the mmap lock", "0x\(String(range.start, radix: 16))", kind: .lockNotHeld) }
        let req = HMMPFN.requestFault.rawValue | HMMPFN.requestWrite.rawValue
        var addr = range.start
        var faulted = false
        while addr < range.end {
            if let n = range.notifier, n.checkRetry(range.notifierSeq) { throw .busy }
            let i = Int((addr - range.start) >> PageGeometry.pageShift)
            let required = (range.defaultFlags.rawValue | (range.hmmPfns[i].rawValue & range.pfnFlagsMask.rawValue)) & req
            let wantFault = required & HMMPFN.requestFault.rawValue != 0
            let wantWrite = required & HMMPFN.requestWrite.rawValue != 0
            // hmm_vma_walk_test(): no VMA, an unreadable one or a VM_IO /
            // VM_PFNMAP one is an error (-EFAULT if a fault is wanted);
            // VM_MIXEDMAP is walked like any other (its pages are normal).
            guard let vma = vma(containing: addr), vma.flags.contains(.read), !vma.flags.contains(.special) else {
                if wantFault { throw .badAddress }
                range.hmmPfns[i] = .error
                addr += PageGeometry.pageSize64
                continue
            }
            let (level, e) = entry(at: addr)
            var out: UInt64? = nil
            var needFault = false
            switch e.kind {
            case .present where !e.isProtNone:
                if wantWrite && !e.isWrite { needFault = true; break }
                var v = HMMPFN.valid.rawValue | (e.isWrite ? HMMPFN.write.rawValue : 0)
                if level == .pmd {
                    v |= UInt64(PageGeometry.pmdOrder) << HMMPFN.orderShift
                    v |= e.pfn + ((addr >> PageGeometry.pageShift) & (PageGeometry.pmdPages64 - 1))
                } else {
                    v |= e.pfn
                }
                out = v
            case .devicePrivate:
                let page = Page(pfn: level == .pmd ? e.pfn + ((addr >> PageGeometry.pageShift) & (PageGeometry.pmdPages64 - 1)) : e.pfn, kernel: kernel)
                if let owner = range.devicePrivateOwner, page.folio.pageMap?.owner == owner {
                    if wantWrite && !e.isWrite { needFault = true; break }
                    out = HMMPFN.valid.rawValue | (e.isWrite ? HMMPFN.write.rawValue : 0) | page.pfn
                        | (level == .pmd ? UInt64(PageGeometry.pmdOrder) << HMMPFN.orderShift : 0)
                } else if wantFault {
                    needFault = true
                } else {
                    out = 0
                }
            case .migration:
                if wantFault {
                    migrationEntryWait(at: addr)
                    throw .busy
                }
                out = 0
            default:
                if wantFault { needFault = true } else { out = 0 }
            }
            if let out {
                range.hmmPfns[i] = HMMPFN(rawValue: out)
                addr += PageGeometry.pageSize64
                continue
            }
            if needFault {
                if wantWrite && !vma.flags.contains(.write) { throw .notPermitted }
                var state = FaultLockState(held: true, mayDrop: false)
                try handleMMFaultLocked(addr, write: wantWrite, &state)
                faulted = true
                // Look at the same page again.
            }
        }
        if faulted, let n = range.notifier, n.checkRetry(range.notifierSeq) { throw .busy }
    }
}
