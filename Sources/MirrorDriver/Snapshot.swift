import SVMEmu

/// The per-page byte of `HMM_DMIRROR_SNAPSHOT` (lib/test_hmm_uapi.h's
/// `HMM_DMIRROR_PROT_*`): what the CPU page tables say about a page, as
/// `hmm_range_fault()` reports it without faulting.
public enum DMirrorProt {
    /// No VMA, or a VMA without read permission (HMM_PFN_ERROR).
    public static let error: UInt8 = 0xFF
    /// Nothing mapped (or a device-private page of another owner, which
    /// hmm_range_fault does not report).
    public static let none: UInt8 = 0x00
    public static let read: UInt8 = 0x01
    public static let write: UInt8 = 0x02
    /// Mapped by a PMD (2 MiB), `hmm_pfn_to_map_order() == 9`.
    public static let pmd: UInt8 = 0x04
    /// Mapped by a PUD (1 GiB); the emulator has no PUD mappings.
    public static let pud: UInt8 = 0x08
    /// The shared 4 KiB zero page (`is_zero_pfn()`; the huge zero page is not one).
    public static let zero: UInt8 = 0x10
    public static let devicePrivateLocal: UInt8 = 0x20
    public static let devicePrivateRemote: UInt8 = 0x30
    public static let deviceCoherentLocal: UInt8 = 0x40
    public static let deviceCoherentRemote: UInt8 = 0x50
}

extension MirrorDevice {

    /// Snapshots the CPU page tables of `pages` pages at `address` without
    /// faulting anything in: one `DMirrorProt` byte per page.
    ///
    /// Like `dmirror_range_snapshot()`, each 64-page chunk gets its own
    /// temporary interval notifier (any invalidation in it makes the chunk
    /// start over), `hmm_range_fault()` runs with no fault request and this
    /// device as `dev_private_owner`, and the bytes are made under the device
    /// lock once `mmu_interval_read_retry()` says the snapshot is current.
    /// - Throws: `.invalidArgument` for a bad range; `.busy` when a chunk could
    ///   not be snapshot within one second (HMM_RANGE_DEFAULT_TIMEOUT).
    /// The corresponding kernel function is `dmirror_snapshot()`.
    public func snapshot(_ address: UInt64, pages: Int) throws(Errno) -> [UInt8] {
        var cmd = DMirrorCommand(address: address, npages: pages)
        var out = [UInt8](repeating: 0, count: max(0, pages))
        let r: Result<Void, Errno> = out.withUnsafeMutableBytes { b in
            Result { () throws(Errno) in try commandSnapshot(&cmd, into: b) }
        }
        try r.get()
        return out
    }

    /// HMM_DMIRROR_SNAPSHOT: `snapshot(_:pages:)` into `mirror` (one byte per
    /// page); `cpages` counts the pages snapshot.
    public func commandSnapshot(_ cmd: inout DMirrorCommand, into mirror: UnsafeMutableRawBufferPointer) throws(Errno) {
        cmd.cpages = 0
        cmd.faults = 0
        guard cmd.npages >= 0, mirror.count >= cmd.npages, cmd.address & ~PageGeometry.pageMask == 0 else { throw .invalidArgument }
        let (start, end) = try commandRange(cmd, bufferBytes: Int.max)
        guard start >= mm.baseAddress, end <= mm.endAddress else { throw .invalidArgument }
        var a = start
        while a < end {
            let next = min(a + 64 << PageGeometry.pageShift, end)
            try snapshotChunk(a, next, into: mirror.baseAddress! + Int((a - start) >> PageGeometry.pageShift))
            cmd.cpages += Int((next - a) >> PageGeometry.pageShift)
            a = next
        }
    }

    private func snapshotChunk(_ start: UInt64, _ end: UInt64, into perm: UnsafeMutableRawPointer) throws(Errno) {
        // dmirror_snapshot_invalidate: only the sequence matters; any
        // invalidation in the interval invalidates the whole snapshot.
        let temporary = mm.insertIntervalNotifier(start: start, end: end) { [unowned self] n, _, seq in
            pageTableLock.withLock { n.setSeq(seq) }
            return true
        }
        defer { mm.removeIntervalNotifier(temporary) }
        try withStableRange(temporary, start, end, flags: HMMPFN(rawValue: 0),
                            deadlineNanos: HostClock.nanos() + 1_000_000_000) { range in
            for (i, entry) in range.hmmPfns.enumerated() {
                perm.storeBytes(of: permission(of: entry), toByteOffset: i, as: UInt8.self)
            }
        }
    }

    /// `dmirror_mkentry()`: one snapshot byte from one `hmm_range_fault()` entry.
    func permission(of entry: HMMPFN) -> UInt8 {
        if entry.isError { return DMirrorProt.error }
        if !entry.isValid { return DMirrorProt.none }
        let page = kernel.pfnToPage(entry.pfn)
        var p: UInt8
        if page.isZoneDevice, let pgmap = page.folio.pageMap {
            let local = pgmap.owner == owner
            switch pgmap.type {
            case .private: p = local ? DMirrorProt.devicePrivateLocal : DMirrorProt.devicePrivateRemote
            case .coherent: p = local ? DMirrorProt.deviceCoherentLocal : DMirrorProt.deviceCoherentRemote
            }
        } else if entry.pfn == kernel.zeroPage.pfn {
            // is_zero_pfn(): the 4 KiB zero page only.
            p = DMirrorProt.zero
        } else {
            p = DMirrorProt.none
        }
        p |= entry.isWrite ? DMirrorProt.write : DMirrorProt.read
        if entry.mapOrder == PageGeometry.pmdOrder { p |= DMirrorProt.pmd } else if entry.mapOrder == 18 { p |= DMirrorProt.pud }
        return p
    }
}
