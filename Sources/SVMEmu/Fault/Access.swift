import CSVMSupport

/// The CPU access path: what a load or store instruction does. It walks the
/// page tables (PMD, then PTE), takes the entry's lock for the duration of the
/// byte access (so no page can be unmapped and copied under it, the role TLB
/// shootdown plays on real CPUs), and on anything but a usable present entry
/// takes a page fault and retries.
///
/// Errors: `.badAddress` (EFAULT, SIGSEGV/SEGV_MAPERR) outside any VMA;
/// `.permissionDenied` (EACCES, SEGV_ACCERR) for PROT_NONE or writing a
/// read-only VMA; `.ioError` (SIGBUS) when a device's `migrateToRAM` gives up;
/// `.noMemory` (VM_FAULT_OOM).
extension AddressSpace {

    /// Runs `body` on the bytes of the page containing `address` (from `address`
    /// to the end of that page), faulting as needed.
    @inlinable
    public func withPageBytes<R>(at address: UInt64, write: Bool,
                                 _ body: (UnsafeMutableRawPointer) -> R) throws(Errno) -> R {
        try withPageBytes(at: address, write: write, faultLimit: Int.max, body)!
    }

    /// Like `withPageBytes(at:write:_:)`, but gives up after `faultLimit` page
    /// faults and returns nil: what a thread with a pending signal does when a
    /// fault keeps returning "retry". Stress harnesses use it to stop threads
    /// that a livelock would otherwise keep forever.
    @inlinable
    public func withPageBytes<R>(at address: UInt64, write: Bool, faultLimit: Int,
                                 _ body: (UnsafeMutableRawPointer) -> R) throws(Errno) -> R? {
        markCPU()
        guard covers(address) else { throw .badAddress }
        var faults = 0
        while true {
            let pmd = loadPMD(address)
            if pmd.kind == .table {
                let lock = ptl(address)
                svm_mutex_lock(lock)
                if loadPMD(address).kind == .table {
                    let pte = loadPTE(address)
                    if pte.kind == .present && !pte.isProtNone && (!write || pte.isWrite) {
                        let want = PageTableEntry.youngBit | (write ? PageTableEntry.dirtyBit : 0)
                        if pte.rawValue & want != want { storePTE(address, pte.with(want)) }
                        let r = body(kernel.bytes(ofPfn: pte.pfn) + Int(address & ~PageGeometry.pageMask))
                        svm_mutex_unlock(lock)
                        return r
                    }
                }
                svm_mutex_unlock(lock)
            } else if pmd.kind == .present && !pmd.isProtNone && (!write || pmd.isWrite) {
                let lock = pmdLock(address)
                svm_mutex_lock(lock)
                let again = loadPMD(address)
                if again == pmd {
                    if write && !pmd.isDirty { storePMD(address, pmd.with(PageTableEntry.dirtyBit)) }
                    let r = body(kernel.bytes(ofPfn: pmd.pfn) + Int(address & ~PageGeometry.pmdMask))
                    svm_mutex_unlock(lock)
                    return r
                }
                svm_mutex_unlock(lock)
            }
            if faults >= faultLimit { return nil }
            faults += 1
            try handleMMFault(address, write: write)
        }
    }

    /// Copies `buffer.count` bytes from `address` (`copy_from_user()`).
    public func read(_ address: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(Errno) {
        guard let base = buffer.baseAddress else { return }
        try forEachPageChunk(address, count: buffer.count) { (a, done, n) throws(Errno) in
            try withPageBytes(at: a, write: false) { svm_memcpy(base + done, $0, n) }
        }
    }

    /// Copies `buffer.count` bytes to `address` (`copy_to_user()`).
    public func write(_ address: UInt64, from buffer: UnsafeRawBufferPointer) throws(Errno) {
        guard let base = buffer.baseAddress else { return }
        try forEachPageChunk(address, count: buffer.count) { (a, done, n) throws(Errno) in
            try withPageBytes(at: a, write: true) { svm_memcpy($0, base + done, n) }
        }
    }

    /// Loads one byte.
    @inlinable public func load(_ address: UInt64) throws(Errno) -> UInt8 {
        try withPageBytes(at: address, write: false) { $0.load(as: UInt8.self) }
    }
    /// Stores one byte.
    @inlinable public func store(_ address: UInt64, _ value: UInt8) throws(Errno) {
        try withPageBytes(at: address, write: true) { $0.storeBytes(of: value, as: UInt8.self) }
    }
    /// Loads a 64-bit word that does not cross a page.
    @inlinable public func load64(_ address: UInt64) throws(Errno) -> UInt64 {
        try withPageBytes(at: address, write: false) { $0.loadUnaligned(as: UInt64.self) }
    }
    /// Stores a 64-bit word that does not cross a page.
    @inlinable public func store64(_ address: UInt64, _ value: UInt64) throws(Errno) {
        try withPageBytes(at: address, write: true) { $0.storeBytes(of: value, as: UInt64.self) }
    }

    /// Fills `[address, address + length)` with a deterministic pattern: each
    /// 64-bit word holds `seed` mixed with its address. `verifyPattern` checks it.
    public func fillPattern(_ address: UInt64, length: Int, seed: UInt64) throws(Errno) {
        try forEachPageChunk(address, count: length) { (base, _, n) throws(Errno) in
            try withPageBytes(at: base, write: true) { p in
                var i = 0
                while i + 8 <= n {
                    p.storeBytes(of: AddressSpace.patternWord(base + UInt64(i), seed), toByteOffset: i, as: UInt64.self)
                    i += 8
                }
            }
        }
    }

    /// The first address in `[address, address + length)` whose word differs
    /// from `fillPattern`'s, or nil when all match.
    public func verifyPattern(_ address: UInt64, length: Int, seed: UInt64) throws(Errno) -> UInt64? {
        var a = address
        let end = address + UInt64(length)
        while a < end {
            let n = min(Int(end - a), PageGeometry.pageSize - Int(a & ~PageGeometry.pageMask))
            let base = a
            let bad: Int? = try withPageBytes(at: a, write: false) { p in
                var i = 0
                while i + 8 <= n {
                    if p.load(fromByteOffset: i, as: UInt64.self) != AddressSpace.patternWord(base + UInt64(i), seed) { return i }
                    i += 8
                }
                return nil
            }
            if let bad { return base + UInt64(bad) }
            a += UInt64(n)
        }
        return nil
    }

    @inlinable static func patternWord(_ address: UInt64, _ seed: UInt64) -> UInt64 {
        var x = address &* 0x9E37_79B9_7F4A_7C15 ^ seed
        x ^= x >> 29
        return x &* 0xBF58_476D_1CE4_E5B9
    }
}

/// Splits `[address, address + count)` at 4 KiB page boundaries and calls
/// `body(chunkAddress, offsetInRange, chunkLength)` for each piece in order:
/// the loop every byte-copying access (CPU or device) runs over pages.
@inlinable
public func forEachPageChunk<E: Error>(_ address: UInt64, count: Int,
                                       _ body: (UInt64, Int, Int) throws(E) -> Void) throws(E) {
    var done = 0
    while done < count {
        let a = address + UInt64(done)
        let n = min(count - done, PageGeometry.pageSize - Int(a & ~PageGeometry.pageMask))
        try body(a, done, n)
        done += n
    }
}

/// Anything that reads and writes a virtual address range as some processor
/// sees it: the CPU (`AddressSpace`) or a device (a driver's GPU path).
public protocol VirtualMemoryAccessor {
    func read(_ address: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(Errno)
    func write(_ address: UInt64, from buffer: UnsafeRawBufferPointer) throws(Errno)
}

extension VirtualMemoryAccessor {
    /// Reads bytes into a new array.
    public func read(_ address: UInt64, count: Int) throws(Errno) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        let r: Result<Void, Errno> = out.withUnsafeMutableBytes { b in Result { () throws(Errno) in try read(address, into: b) } }
        try r.get()
        return out
    }

    /// Writes the bytes of an array.
    public func write(_ address: UInt64, bytes: [UInt8]) throws(Errno) {
        let r: Result<Void, Errno> = bytes.withUnsafeBytes { b in Result { () throws(Errno) in try write(address, from: b) } }
        try r.get()
    }
}

extension AddressSpace: VirtualMemoryAccessor {}
