import Synchronization
import CSVMSupport

// The CPU access path: what a load or store instruction does on the
// emulated CPU the calling thread runs on. The contract is on
// `withPageBytes(at:write:faultLimit:_:)`.
extension AddressSpace {

    /// Runs `body` on the bytes of the page containing `address` (from `address`
    /// to the end of that page), faulting as needed.
    ///
    /// The contract is ``withPageBytes(at:write:faultLimit:_:)``'s, without a
    /// fault limit.
    ///
    /// - Parameters:
    ///   - address: any address.
    ///   - write: whether the access is a store.
    ///   - body: runs on the page's bytes inside one access of the calling
    ///     thread's CPU: it must not block, fault or call into the kernel.
    /// - Returns: what `body` returns.
    /// - Throws: as ``withPageBytes(at:write:faultLimit:_:)``.
    @inlinable @inline(__always)
    public func withPageBytes<R>(at address: UInt64, write: Bool,
                                 _ body: (UnsafeMutableRawPointer) -> R) throws(Errno) -> R {
        if let r = accessThroughTLB(address, write: write, body) { return r }
        // Without a fault limit the full path never gives up.
        return try withPageBytesWalking(at: address, write: write, faultLimit: Int.max, body)!
    }

    /// Like `withPageBytes(at:write:_:)`, but gives up after `faultLimit` page
    /// faults and returns nil: what a thread with a pending signal does when a
    /// fault keeps returning "retry". Stress harnesses use it to stop threads
    /// that a livelock would otherwise keep forever.
    ///
    /// What a load or store instruction does on the emulated CPU the calling
    /// thread runs on (it takes a free CPU of the machine first if it has
    /// none). The CPU looks the address up in its TLB; a hit reads or writes
    /// the frame's bytes with no lock at all, as hardware does. A miss walks
    /// the page tables without locks (PMD, then PTE), sets the accessed and
    /// dirty bits the way x86's walker does (atomically; a write through an
    /// entry filled by a read walks again to set dirty) and fills the TLB. An
    /// entry that does not allow the access ends the access and takes a page
    /// fault (`handle_mm_fault()`, which takes the mmap lock for reading);
    /// then the access is retried.
    ///
    /// Nothing here keeps a migration from copying a page while a CPU writes
    /// it: the kernel's order does (unmap to a migration entry, flush the
    /// TLBs, copy, remap). A TLB shootdown waits for `body` to return. With
    /// ``KernelConfiguration/checksStaleTLBEntries`` every TLB hit is checked
    /// against the page tables, and an access through a stale entry is
    /// reported as a diagnostic (and counted in `tlb_stale_accesses`).
    ///
    /// The caller holds no lock: not the mmap lock (a fault takes it), no
    /// page-table lock, and no folio lock a fault might wait for.
    ///
    /// - Parameters:
    ///   - address: any address.
    ///   - write: whether the access is a store.
    ///   - faultLimit: faults to take before giving up.
    ///   - body: runs on the page's bytes inside one access of the calling
    ///     thread's CPU: it must not block, fault or call into the kernel.
    /// - Returns: what `body` returns, or nil after `faultLimit` faults.
    /// - Throws: ``Errno/badAddress`` (EFAULT, SIGSEGV/SEGV_MAPERR) outside
    ///   any VMA; ``Errno/permissionDenied`` (EACCES, SEGV_ACCERR) for
    ///   PROT_NONE or writing a read-only VMA; ``Errno/ioError`` (SIGBUS) in
    ///   a special mapping or when a device's `migrateToRAM` gives up;
    ///   ``Errno/noMemory`` (VM_FAULT_OOM).
    @inlinable @inline(__always)
    public func withPageBytes<R>(at address: UInt64, write: Bool, faultLimit: Int,
                                 _ body: (UnsafeMutableRawPointer) -> R) throws(Errno) -> R? {
        if let r = accessThroughTLB(address, write: write, body) { return r }
        return try withPageBytesWalking(at: address, write: write, faultLimit: faultLimit, body)
    }

    /// The fast path of an access: `body`'s result when the calling thread
    /// has its CPU on this machine and that CPU's TLB holds the entry; nil,
    /// with nothing done, when the full path must run instead: no CPU yet,
    /// an access nested in another, a miss, a thread a deterministic
    /// scheduler runs (its accesses are scheduling points), or a machine that checks every TLB
    /// hit or fences every access (`CPUAccess.fastOwner` binds no thread).
    /// An address outside the address space finds no entry.
    @inlinable @inline(__always)
    func accessThroughTLB<R>(_ address: UInt64, write: Bool, _ body: (UnsafeMutableRawPointer) -> R) -> R? {
        // One test: this thread holds a CPU of this machine, the machine
        // checks nothing on a hit, and no deterministic scheduler runs the
        // thread (`svm_fast_cpu_is`). No range check: a tag's epoch bits
        // lie above every page number (`TLB.epochShift`).
        guard svm_fast_cpu_is(cpuAccess.fastOwner) else { return nil }
        let cpu = CPU(index: Int(svm_bound_cpu_index()), words: svm_bound_cpu_words().unsafelyUnwrapped,
                      tlb: svm_bound_cpu_tlb().unsafelyUnwrapped.assumingMemoryBound(to: TLBEntry.self))
        guard let seq = cpu.beginOuterAccess(self) else { return nil }
        guard let hit = cpu.lookup(address, write: write) else {
            cpu.endOuterAccess(self, seq)
            return nil
        }
        svm_tsan_ignore_begin()
        let r = body(hit.bytes)
        svm_tsan_ignore_end()
        cpu.endOuterAccess(self, seq)
        return r
    }

    /// The rest of an access: taking a CPU, the checked TLB hit, the page
    /// walk, and the faults.
    @inlinable @inline(never)
    func withPageBytesWalking<R>(at address: UInt64, write: Bool, faultLimit: Int,
                                 _ body: (UnsafeMutableRawPointer) -> R) throws(Errno) -> R? {
        guard covers(address) else { throw .badAddress }
        let cpu = cpuAccess.current(self)
        var faults = 0
        while true {
            if _slowPath(svm_det_active()) { DeterministicScheduler.schedulingPoint(.access) }
            let token = cpu.beginAccess(self)
            var bytes: UnsafeMutableRawPointer? = nil
            if let hit = cpu.lookup(address, write: write) {
                if cpuAccess.checksStaleEntries { checkTLBEntry(cpu, hit.entry, address, write: write) }
                bytes = hit.bytes
            } else {
                bytes = walkAndFill(cpu, address, write: write)
            }
            if let bytes {
                svm_tsan_ignore_begin()
                let r = body(bytes)
                svm_tsan_ignore_end()
                cpu.endAccess(self, token)
                return r
            }
            // A page fault ends the instruction: the handler runs between accesses.
            cpu.endAccess(self, token)
            if faults >= faultLimit { return nil }
            faults += 1
            if _slowPath(svm_det_active()) { DeterministicScheduler.schedulingPoint(.fault) }
            do {
                // Back to user space, with an error or to retry: the retry's
                // access point is the return to user.
                defer { if _slowPath(svm_det_active()) { DeterministicScheduler.faultReturned() } }
                try handleMMFault(address, write: write)
            }
        }
    }

    /// The page walk of a TLB miss: no locks, entries read atomically, the
    /// accessed and dirty bits set by compare-and-swap (a changed entry makes
    /// the walk start over). Fills the TLB and returns the bytes, or nil when
    /// the entry does not allow the access (a fault).
    @usableFromInline
    func walkAndFill(_ cpu: CPU, _ address: UInt64, write: Bool) -> UnsafeMutableRawPointer? {
        let want = PageTableEntry.youngBit | (write ? PageTableEntry.dirtyBit : 0)
        while true {
            let pmdSlot = pmdSlot(address)
            let pmd = PageTableEntry(rawValue: UnsafeAtomic(pmdSlot).load(ordering: .acquiring))
            let slot: UnsafeMutablePointer<UInt64>
            let huge: Bool
            switch pmd.kind {
            case .table:
                slot = pteSlot(address)
                huge = false
            case .present:
                slot = pmdSlot
                huge = true
            default:
                return nil
            }
            var entry = huge ? pmd : PageTableEntry(rawValue: UnsafeAtomic(slot).load(ordering: .acquiring))
            guard entry.kind == .present, !entry.isProtNone, !write || entry.isWrite else { return nil }
            if entry.rawValue & want != want {
                var expected = entry.rawValue
                guard UnsafeAtomic(slot).compareExchange(&expected, entry.rawValue | want, successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring) else { continue }
                entry = entry.with(want)
            }
            let frame = kernel.bytes(ofPfn: entry.pfn)
            UnsafeAtomic(cpu.words + CPUWord.misses).store(cpu.words[CPUWord.misses] &+ 1, ordering: .relaxed)
            let gen = cpuAccess.checksStaleEntries ? kernel.metaPtr(entry.pfn).allocGen : 0
            cpu.fill(address, huge: huge, frame: frame, pfn: entry.pfn, writable: entry.isWrite, dirty: entry.isDirty, allocGen: gen)
            return frame + Int(address & (huge ? ~PageGeometry.pmdMask : ~PageGeometry.pageMask))
        }
    }

    /// The stale-entry checker: an access through a TLB entry that no CPU
    /// could still hold had every flush been done in time. Reported:
    ///
    /// - the entry's frame was freed, or freed and handed out again (its
    ///   allocation generation moved on since the entry was filled), whatever
    ///   the address maps now: a frame is freed only after the flush that
    ///   removed its last translation;
    /// - another frame is mapped at the address;
    /// - a write through a writable entry of a frame the page tables now map
    ///   read-only, while no flush of the address space is pending
    ///   (``tlbFlushPending``): the write-protect's flush was skipped.
    ///
    /// Between an unmap and its flush a CPU may still use its entry (the
    /// page table then holds a migration entry or none, the frame still
    /// allocated), which is not reported. The one exception to the above is
    /// a frame a deferred flush (migrc / LUF) holds, read while its new
    /// mapping is still read-only: the bargain that proposal makes.
    @usableFromInline @inline(never)
    func checkTLBEntry(_ cpu: CPU, _ entry: UnsafeMutablePointer<TLBEntry>, _ address: UInt64, write: Bool) {
        let huge = entry >= cpu.tlb + TLB.entries4K
        let filled = entry.pointee.info >> 2
        let old = filled + (huge ? (address >> PageGeometry.pageShift) & (PageGeometry.pmdPages64 - 1) : 0)
        let pmd = loadPMD(address)
        let leaf = pmd.kind == .table ? loadPTE(address) : pmd
        var now: UInt64? = nil
        if leaf.kind == .present { now = leaf.pfn + (pmd.kind == .table ? 0 : (address >> PageGeometry.pageShift) & (PageGeometry.pmdPages64 - 1)) }
        let oldFolio = Page(pfn: old, kernel: kernel).folio
        let freed = oldFolio.refCount == 0
        let reused = !freed && UInt64(kernel.metaPtr(filled).allocGen) != entry.pointee.allocGen
        let remapped = now != nil && now != old
        let writeProtected = write && now == old && !leaf.isWrite && !tlbFlushPending
        guard freed || reused || remapped || writeProtected else { return }
        // A deferred flush (migrc / LUF) keeps the old frame, bytes identical,
        // while the new mapping stays read-only: reading it is the bargain.
        // Once the new mapping is writable (the give-up-on-write rule was
        // skipped), a stale reader can miss a write: that is reported.
        if !freed && !reused && !write && oldFolio.test(.deferredFlush) && !leaf.isWrite { return }
        kernel.vmstat.count(.tlbStaleAccesses)
        let what: String
        if freed {
            what = "the old frame was freed"
        } else if reused {
            what = "the old frame was freed and allocated again since the CPU cached it"
        } else if remapped {
            what = "another frame is mapped there"
        } else {
            what = "the page was write-protected and no flush is pending"
        }
        let newFrame = now.map { "pfn 0x\(String($0, radix: 16))" } ?? "none"
        kernel.warn("stale TLB entry: a CPU accessed a frame no longer mapped at this address (a TLB flush was skipped or late)",
                    "cpu \(cpu.index) \(write ? "write" : "read") at 0x\(String(address, radix: 16)): old frame pfn 0x\(String(old, radix: 16)), new frame \(newFrame); \(what)", kind: .staleTLB)
    }

    /// Copies `buffer.count` bytes from `address`, faulting pages in as a CPU
    /// load would.
    ///
    /// Caller holds no lock (see ``withPageBytes(at:write:faultLimit:_:)``).
    ///
    /// - Parameters:
    ///   - address: the first byte to read.
    ///   - buffer: where the bytes go.
    /// - Throws: as ``withPageBytes(at:write:faultLimit:_:)``; the bytes of
    ///   the pages before the failing one have been copied.
    ///
    /// The corresponding kernel function is `copy_from_user()`.
    public func read(_ address: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(Errno) {
        guard let base = buffer.baseAddress else { return }
        try forEachPageChunk(address, count: buffer.count) { (a, done, n) throws(Errno) in
            try withPageBytes(at: a, write: false) { svm_memcpy(base + done, $0, n) }
        }
    }

    /// Copies `buffer.count` bytes to `address`, faulting pages in as a CPU
    /// store would.
    ///
    /// Caller holds no lock (see ``withPageBytes(at:write:faultLimit:_:)``).
    ///
    /// - Parameters:
    ///   - address: the first byte to write.
    ///   - buffer: the bytes.
    /// - Throws: as ``withPageBytes(at:write:faultLimit:_:)``; the pages
    ///   before the failing one have been written.
    ///
    /// The corresponding kernel function is `copy_to_user()`.
    public func write(_ address: UInt64, from buffer: UnsafeRawBufferPointer) throws(Errno) {
        guard let base = buffer.baseAddress else { return }
        try forEachPageChunk(address, count: buffer.count) { (a, done, n) throws(Errno) in
            try withPageBytes(at: a, write: true) { svm_memcpy($0, base + done, n) }
        }
    }

    /// Loads one byte, as a CPU load; caller holds no lock.
    @inlinable @inline(__always) public func load(_ address: UInt64) throws(Errno) -> UInt8 {
        try withPageBytes(at: address, write: false) { $0.load(as: UInt8.self) }
    }
    /// Stores one byte, as a CPU store; caller holds no lock.
    @inlinable @inline(__always) public func store(_ address: UInt64, _ value: UInt8) throws(Errno) {
        try withPageBytes(at: address, write: true) { $0.storeBytes(of: value, as: UInt8.self) }
    }
    /// Loads a 64-bit word that does not cross a page.
    @inlinable @inline(__always) public func load64(_ address: UInt64) throws(Errno) -> UInt64 {
        try withPageBytes(at: address, write: false) { $0.loadUnaligned(as: UInt64.self) }
    }
    /// Stores a 64-bit word that does not cross a page.
    @inlinable @inline(__always) public func store64(_ address: UInt64, _ value: UInt64) throws(Errno) {
        try withPageBytes(at: address, write: true) { $0.storeBytes(of: value, as: UInt64.self) }
    }

    /// Fills `[address, address + length)` with a deterministic pattern: each
    /// 64-bit word holds `seed` mixed with its address. `verifyPattern` checks it.
    /// Caller holds no lock; the stores fault pages in as CPU stores would.
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
    /// Caller holds no lock; the loads fault pages in as CPU loads would.
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
    /// Copies `buffer.count` bytes from `address` into `buffer`.
    func read(_ address: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(Errno)
    /// Copies `buffer` to `address`.
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
