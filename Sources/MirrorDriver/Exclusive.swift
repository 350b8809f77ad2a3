import SVMEmu

// Device atomics on system memory through device-exclusive entries
// (dmirror_exclusive(), dmirror_atomic_map(), dmirror_check_atomic() of
// lib/test_hmm.c; nouveau_atomic_range_fault() does the same for GPU atomics).
extension MirrorDevice {

    /// HMM_DMIRROR_EXCLUSIVE: takes every page of the range for atomic access
    /// (`makeDeviceExclusive`, then an atomic device mapping while the folio
    /// is still locked, so a CPU fault cannot restore the page before the
    /// device maps it), then reads the range back through the device page
    /// table into `mirror`; `cpages` counts the pages read.
    /// Throws the first `makeDeviceExclusive` error, or `.noEntry` (-ENOENT)
    /// when a CPU took a page back before the read.
    /// The corresponding kernel function is `dmirror_exclusive()`.
    public func commandExclusive(_ cmd: inout DMirrorCommand, into mirror: UnsafeMutableRawBufferPointer) throws(Errno) {
        cmd.cpages = 0
        cmd.faults = 0
        let (start, end) = try commandRange(cmd, bufferBytes: mirror.count)
        try mapExclusive(start, end)
        var cpages = 0
        defer { cmd.cpages = cpages }
        let complete = pageTableLock.withLock {
            copyMirrored(start, end, &cpages, write: false) { page, offset in
                (mirror.baseAddress! + offset).copyMemory(from: page, byteCount: PageGeometry.pageSize)
            }
        }
        if !complete { throw .noEntry }
    }

    /// HMM_DMIRROR_CHECK_EXCLUSIVE: `.notPermitted` (-EPERM) while any page of
    /// the range is still mapped for device atomics, i.e. no CPU access has
    /// taken it back.
    /// The corresponding kernel function is `dmirror_check_atomic()`.
    public func commandCheckExclusive(_ cmd: inout DMirrorCommand) throws(Errno) {
        cmd.cpages = 0
        cmd.faults = 0
        let (start, end) = try commandRange(cmd, bufferBytes: Int.max)
        let atomic = pageTableLock.withLock { () -> Bool in
            var a = max(start, pageTable.base)
            while a < min(end, pageTable.end) {
                if pageTable.get(a) & DevicePageTable.atomic != 0 { return true }
                a += PageGeometry.pageSize64
            }
            return false
        }
        if atomic { throw .notPermitted }
    }

    /// A device atomic add of `value` to the 64-bit word at `address` (which
    /// must not cross a page): done only while the page is mapped for
    /// atomics; returns false (nothing written) once a CPU took it back, and
    /// the caller asks for exclusive access again (`commandExclusive` or
    /// `mapExclusive`). The word's bytes are changed under the device page
    /// table lock, which the CPU's restoring fault must take (through the
    /// notifier) before its mapping comes back.
    public func atomicAdd(_ address: UInt64, _ value: UInt64) -> Bool {
        pageTableLock.withLock {
            guard address >= pageTable.base, address < pageTable.end else { return false }
            let e = pageTable.get(address)
            guard e & DevicePageTable.atomic != 0 else { return false }
            kernel.pfnToPage(e >> PageGeometry.pageShift).withBytes { page in
                let word = page.baseAddress! + Int(address & ~PageGeometry.pageMask)
                word.storeBytes(of: word.loadUnaligned(as: UInt64.self) &+ value, as: UInt64.self)
            }
            return true
        }
    }

    /// Makes every page of `[start, end)` device-exclusive and maps it for
    /// atomics (`dmirror_atomic_map()`), under the mmap lock for reading.
    /// Throws the first `makeDeviceExclusive` error.
    public func mapExclusive(_ start: UInt64, _ end: UInt64) throws(Errno) {
        mm.mmapReadLock()
        defer { mm.mmapReadUnlock() }
        var a = start & PageGeometry.pageMask
        while a < end {
            try mapExclusivePage(a)
            a += PageGeometry.pageSize64
        }
    }

    /// One page, in the shape of nouveau_atomic_range_fault(): the notifier
    /// sequence before `makeDeviceExclusive` (the folio comes back locked
    /// and referenced), then, under the page-table lock, the atomic mapping
    /// only if no invalidation ran since; otherwise the folio is released
    /// and the page taken again.
    ///
    /// The folio lock keeps a CPU fault from restoring the page before the
    /// mapping, but not a MADV_DONTNEED or munmap: those zap the
    /// device-exclusive entry without the folio lock, and their invalidation
    /// clears the device page table before the mapping exists. Mapped
    /// regardless (dmirror_atomic_map checks nothing), the entry would
    /// outlive the page, freed at the last `put()`, and `atomicAdd` would
    /// write into a freed frame. Caller holds the mmap lock for reading.
    private func mapExclusivePage(_ address: UInt64) throws(Errno) {
        while true {
            let seq = notifier.readBegin()
            let page = try mm.makeDeviceExclusive(address, owner: owner)
            let folio = page.folio
            let mapped = pageTableLock.withLock { () -> Bool in
                if notifier.readRetry(seq) { return false }
                pageTable.set(address, pfn: page.pfn, write: true, device: false, atomic: true)
                return true
            }
            folio.unlock()
            folio.put()
            if mapped { return }
            // The failed attempt (or an earlier call) left the page
            // device-exclusive. Taking it again would first restore it,
            // an invalidation of this page after the new sequence, and fail
            // again, for ever (nouveau's loop runs until its timeout there):
            // so the CPU gets it back before the next sequence is taken.
            var back = HMMRange(start: address, end: address + PageGeometry.pageSize64,
                                defaultFlags: HMMPFN(rawValue: HMMPFN.requestFault.rawValue | HMMPFN.requestWrite.rawValue))
            try? mm.hmmRangeFault(&back)
        }
    }
}
