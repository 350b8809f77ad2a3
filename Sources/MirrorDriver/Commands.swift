import SVMEmu
import Synchronization

/// One dmirror command (`struct hmm_dmirror_cmd` of lib/test_hmm_uapi.h):
/// `address` and `npages` in, `cpages` (pages copied) and `faults` (device
/// faults taken) out. Both outputs are reset at the start of every command,
/// and are set even when the command fails, as the ioctl copies them back.
public struct DMirrorCommand: Sendable, Equatable {
    public var address: UInt64
    public var npages: Int
    public var cpages: Int = 0
    public var faults: Int = 0
    public init(address: UInt64, npages: Int) {
        self.address = address
        self.npages = npages
    }
}

/// `HMM_DMIRROR_FLAGS` values.
public struct DMirrorFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    /// HMM_DMIRROR_FLAG_FAIL_ALLOC: the next 2 MiB allocation of a migration
    /// (either direction) fails, once, so the migration falls back to 4 KiB pages.
    public static let failAlloc = DMirrorFlags(rawValue: 1 << 0)
}

/// The dmirror command surface (`dmirror_fops_unlocked_ioctl()` of
/// lib/test_hmm.c) on a `MirrorDevice`: what the kernel's hmm-tests drive.
///
/// These follow dmirror, not the SVM-driver style of `read(_:into:)` /
/// `migrateToDevice(_:pages:)`:
/// - READ and WRITE copy through the device page table and, on the first page
///   it does not map (with write permission for WRITE), fault the rest of the
///   range in with `hmm_range_fault()` (64 pages per call, like `dmirror_fault`)
///   and count one fault per such pass: a range that is not mirrored at all
///   costs one fault.
/// - MIGRATE_TO_DEV always collects with SELECT_COMPOUND in 2 MiB batches, then
///   reads the range back from the device page table: a page it does not
///   mirror gives `.noEntry` (-ENOENT), with `cpages` the pages read before it.
/// - MIGRATE_TO_SYS migrates this device's pages of the range back
///   (SELECT_DEVICE_PRIVATE | SELECT_COMPOUND); `cpages` counts pages moved.
/// - A range outside any readable VMA gives `.invalidArgument` (-EINVAL) for
///   migrations; `.badAddress` (-EFAULT) for READ (PROT_NONE included) and
///   `.notPermitted` (-EPERM) for WRITE of read-only memory, as
///   `hmm_range_fault()` returns them.
extension MirrorDevice {

    /// HMM_DMIRROR_READ: the device reads `npages` pages at `cmd.address` into
    /// `mirror` (which is written only when the whole read succeeds).
    /// The corresponding kernel function is `dmirror_read()`.
    public func commandRead(_ cmd: inout DMirrorCommand, into mirror: UnsafeMutableRawBufferPointer) throws(Errno) {
        cmd.cpages = 0
        cmd.faults = 0
        let (start, end) = try commandRange(cmd, bufferBytes: mirror.count)
        let bounce = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(end - start), alignment: PageGeometry.pageSize)
        defer { bounce.deallocate() }
        var cpages = 0
        defer { cmd.cpages = cpages }
        while true {
            let complete = pageTableLock.withLock {
                copyMirrored(start, end, &cpages, write: false) { page, offset in
                    (bounce.baseAddress! + offset).copyMemory(from: page, byteCount: PageGeometry.pageSize)
                }
            }
            if complete { break }
            try commandFault(start + UInt64(cpages) << PageGeometry.pageShift, end, write: false)
            cmd.faults += 1
        }
        if let base = mirror.baseAddress { base.copyMemory(from: bounce.baseAddress!, byteCount: bounce.count) }
    }

    /// HMM_DMIRROR_WRITE: the device writes `npages` pages of `mirror` at `cmd.address`.
    /// The corresponding kernel function is `dmirror_write()`.
    public func commandWrite(_ cmd: inout DMirrorCommand, from mirror: UnsafeRawBufferPointer) throws(Errno) {
        cmd.cpages = 0
        cmd.faults = 0
        let (start, end) = try commandRange(cmd, bufferBytes: mirror.count)
        var cpages = 0
        defer { cmd.cpages = cpages }
        while true {
            let complete = pageTableLock.withLock {
                copyMirrored(start, end, &cpages, write: true) { page, offset in
                    page.copyMemory(from: mirror.baseAddress! + offset, byteCount: PageGeometry.pageSize)
                }
            }
            if complete { break }
            try commandFault(start + UInt64(cpages) << PageGeometry.pageShift, end, write: true)
            cmd.faults += 1
        }
    }

    /// HMM_DMIRROR_MIGRATE_TO_DEV: migrates the range to this device's memory,
    /// then reads it back from the device page table into `mirror` (if given).
    /// The corresponding kernel function is `dmirror_migrate_to_device()`.
    public func commandMigrateToDevice(_ cmd: inout DMirrorCommand,
                                       into mirror: UnsafeMutableRawBufferPointer? = nil) throws(Errno) {
        cmd.cpages = 0
        cmd.faults = 0
        // The mirror receives what fits: hmm-tests passes a one-byte-per-page
        // snapshot buffer to this command too (and copy_to_user overruns it).
        let (start, end) = try commandRange(cmd, bufferBytes: Int.max)
        mm.mmapReadLock()
        do {
            try migrateRangeLocked(start, end, toDevice: true, granularity: .huge2M)
        } catch {
            mm.mmapReadUnlock()
            throw error
        }
        mm.mmapReadUnlock()
        var cpages = 0
        defer { cmd.cpages = cpages }
        let complete = pageTableLock.withLock {
            copyMirrored(start, end, &cpages, write: false) { page, offset in
                if let mirror, let base = mirror.baseAddress, offset < mirror.count {
                    (base + offset).copyMemory(from: page, byteCount: min(PageGeometry.pageSize, mirror.count - offset))
                }
            }
        }
        if !complete { throw .noEntry }
    }

    /// HMM_DMIRROR_MIGRATE_TO_SYS: migrates this device's pages of the range
    /// back to system memory; `cpages` counts the pages moved.
    /// The corresponding kernel function is `dmirror_migrate_to_system()`.
    public func commandMigrateToSystem(_ cmd: inout DMirrorCommand) throws(Errno) {
        cmd.cpages = 0
        cmd.faults = 0
        let (start, end) = try commandRange(cmd, bufferBytes: Int.max)
        mm.mmapReadLock()
        defer { mm.mmapReadUnlock() }
        cmd.cpages = try migrateRangeLocked(start, end, toDevice: false, granularity: .huge2M)
    }

    /// HMM_DMIRROR_RELEASE: evicts all of this device's memory to system memory.
    /// The corresponding kernel function is `dmirror_device_remove_chunks()`
    /// (its eviction half, `dmirror_device_evict_chunk()`).
    public func commandRelease() {
        evictAll()
    }

    /// HMM_DMIRROR_FLAGS: sets the command flags (`dmirror->flags`).
    /// `.failAlloc` is one-shot: the next 2 MiB allocation of a migration, to
    /// the device or back (a CPU fault included), fails and clears it.
    /// Deliberate difference: dmirror consumes the flag on the next allocation
    /// of any size and fails a 4 KiB one with -ENOMEM; the emulated driver
    /// only consumes it on a 2 MiB allocation (the case the tests exercise).
    public func setCommandFlags(_ flags: DMirrorFlags) {
        failNextAllocation.store(flags.contains(.failAlloc), ordering: .releasing)
    }

    /// Takes the one-shot allocation failure, if set.
    @inline(__always)
    func consumeFailNextAllocation() -> Bool {
        failNextAllocation.load(ordering: .relaxed) && failNextAllocation.exchange(false, ordering: .acquiringAndReleasing)
    }

    // MARK: helpers

    func commandRange(_ cmd: DMirrorCommand, bufferBytes: Int) throws(Errno) -> (UInt64, UInt64) {
        guard cmd.npages >= 0, cmd.npages <= Int(UInt32.max) else { throw .invalidArgument }
        let size = UInt64(cmd.npages) << PageGeometry.pageShift
        let (end, overflow) = cmd.address.addingReportingOverflow(size)
        guard !overflow, bufferBytes >= Int(size) else { throw .invalidArgument }
        return (cmd.address, end)
    }

    /// `dmirror_do_read()` / `dmirror_do_write()`: walks the device page table
    /// from page `cpages` of `[start, end)`, handing each mapped page (with
    /// write permission when `write`) to `body` with its offset in the range.
    /// Caller holds the page-table lock. Returns false at the first page that
    /// is not usable (`-ENOENT`).
    func copyMirrored(_ start: UInt64, _ end: UInt64, _ cpages: inout Int, write: Bool,
                      _ body: (UnsafeMutableRawPointer, Int) -> Void) -> Bool {
        var a = start + UInt64(cpages) << PageGeometry.pageShift
        while a < end {
            guard a >= pageTable.base, a < pageTable.end else { return false }
            let e = pageTable.get(a)
            guard e & DevicePageTable.valid != 0, !write || e & DevicePageTable.write != 0 else { return false }
            kernel.pfnToPage(e >> PageGeometry.pageShift).withBytes { body($0.baseAddress!, Int(a - start)) }
            cpages += 1
            a += PageGeometry.pageSize64
        }
        return true
    }

    /// `dmirror_fault()`: `hmm_range_fault()` with fault requests over
    /// `[start, end)`, 64 pages per call, each mapped in the device page table.
    /// One GPU fault is counted per call of this function.
    func commandFault(_ start: UInt64, _ end: UInt64, write: Bool) throws(Errno) {
        gpuFaultCount.add(1, ordering: .relaxed)
        guard start >= pageTable.base, end <= pageTable.end else { throw .badAddress }
        var a = start
        while a < end {
            let next = min(a + 64 << PageGeometry.pageShift, end)
            try mirrorFault(a, next, write: write)
            a = next
        }
    }
}

extension MirrorDevice {
    /// Maps the device file itself into its address space
    /// (`dmirror_fops_mmap()`): every page of the new VMA gets a zeroed
    /// system page, inserted with ``AddressSpace/insertPage(_:at:in:)``
    /// (`vm_insert_page()`), which makes the VMA VM_MIXEDMAP. The mapping
    /// then holds the only reference to each page; unmapping it frees them.
    /// hmm-tests' `mixedmap` snapshots such a mapping.
    ///
    /// Takes the address space's mmap lock for writing (the caller must not
    /// hold it).
    ///
    /// - Parameters:
    ///   - length: bytes, rounded up to whole pages.
    ///   - protection: the mapping's protection.
    ///   - shared: MAP_SHARED (true) or MAP_PRIVATE (false).
    /// - Returns: the start of the mapping.
    /// - Throws: ``Errno/noMemory`` when a page cannot be allocated (nothing
    ///   stays mapped), or what `mmap` throws.
    ///
    /// The corresponding kernel function is `dmirror_fops_mmap()`.
    public func mmap(length: Int, protection: Protection = .readWrite, shared: Bool = false) throws(Errno) -> UInt64 {
        let kernel = self.kernel
        let mm = self.mm
        return try mm.mmap(length: length, protection: protection, shared: shared) { (vma: VMA) throws(Errno) in
            var address = vma.start
            while address < vma.end {
                guard let folio = kernel.allocateFolio(order: 0, zeroed: true) else { throw .noMemory }
                // The mapping takes its own reference; ours goes either way.
                defer { folio.put() }
                try mm.insertPage(folio.page(0), at: address, in: vma)
                address += PageGeometry.pageSize64
            }
        }
    }
}
