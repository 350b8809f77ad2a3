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
            let word = kernel.pfnToPage(e >> PageGeometry.pageShift).bytes + Int(address & ~PageGeometry.pageMask)
            word.storeBytes(of: word.loadUnaligned(as: UInt64.self) &+ value, as: UInt64.self)
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
            let page = try mm.makeDeviceExclusive(a, owner: owner)
            let folio = page.folio
            pageTableLock.withLock { pageTable.set(a, pfn: page.pfn, write: true, device: false, atomic: true) }
            folio.unlock()
            folio.put()
            a += PageGeometry.pageSize64
        }
    }
}
