import SVMEmu

/// GPU reads and writes through the device page table, faulting on a miss
/// (dmirror's READ and WRITE commands). Any thread may act as a GPU engine.
extension MirrorDevice {

    /// Reads `buffer.count` bytes at `address` as the GPU sees them.
    /// - Throws: `.badAddress` (EFAULT) for an address outside any readable VMA
    ///   (PROT_NONE included), other fault errors as hmm_range_fault returns them.
    public func read(_ address: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(Errno) {
        var done = 0
        while done < buffer.count {
            let a = address + UInt64(done)
            let n = min(buffer.count - done, 4096 - Int(a & 4095))
            let dst = buffer.baseAddress! + done
            try access(a, write: false) { dst.copyMemory(from: $0, byteCount: n) }
            done += n
        }
    }

    /// Writes bytes at `address` as the GPU.
    /// - Throws: `.notPermitted` (EPERM) writing read-only memory, `.badAddress` (EFAULT).
    public func write(_ address: UInt64, from buffer: UnsafeRawBufferPointer) throws(Errno) {
        var done = 0
        while done < buffer.count {
            let a = address + UInt64(done)
            let n = min(buffer.count - done, 4096 - Int(a & 4095))
            let src = buffer.baseAddress! + done
            try access(a, write: true) { $0.copyMemory(from: src, byteCount: n) }
            done += n
        }
    }

    public func read(_ address: UInt64, count: Int) throws(Errno) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        let r: Result<Void, Errno> = out.withUnsafeMutableBytes { b in Result { () throws(Errno) in try read(address, into: b) } }
        try r.get()
        return out
    }

    public func write(_ address: UInt64, bytes: [UInt8]) throws(Errno) {
        let r: Result<Void, Errno> = bytes.withUnsafeBytes { b in Result { () throws(Errno) in try write(address, from: b) } }
        try r.get()
    }

    /// One page-bounded access under the page-table lock, faulting until the
    /// device page table maps the page with the needed permission.
    func access(_ address: UInt64, write: Bool, _ body: (UnsafeMutableRawPointer) -> Void) throws(Errno) {
        guard address >= pageTable.base, address < pageTable.end else { throw .badAddress }
        let page = address & ~4095
        while true {
            let hit = pageTableLock.withLock { _ -> Bool in
                let e = pageTable.get(page)
                guard e & DevicePageTable.valid != 0, !write || e & DevicePageTable.write != 0 else { return false }
                body(kernel.pfnToPage(e >> 12).bytes + Int(address & 4095))
                return true
            }
            if hit { return }
            gpuFaultCount.add(1, ordering: .relaxed)
            try gpuFault(page, write: write)
        }
    }

    /// The GPU fault handler.
    func gpuFault(_ page: UInt64, write: Bool) throws(Errno) {
        let t = kernel.phases.begin()
        defer { kernel.phases.end(.fault, t) }
        if settings.gpuFaultPolicy == .migrate {
            mm.mmapReadLock()
            if let vma = mm.vma(containing: page), vma.flags.contains(.read), !write || vma.flags.contains(.write) {
                var start = page, end = page + 4096
                if settings.migrationGranularity == .huge2M {
                    let h = page & ~UInt64((2 << 20) - 1)
                    if h >= vma.start && h + (2 << 20) <= vma.end { start = h; end = h + (2 << 20) }
                }
                _ = try? migrateRangeLocked(start, end, toDevice: true)
            }
            mm.mmapReadUnlock()
            let mapped = pageTableLock.withLock { _ in pageTable.get(page) & DevicePageTable.valid != 0 }
            if mapped { return }
        }
        try mirrorFault(page, page + 4096, write: write)
    }

    /// dmirror_fault: hmm_range_fault, then map under the page-table lock
    /// unless an invalidation ran in between (then start over).
    func mirrorFault(_ start: UInt64, _ end: UInt64, write: Bool) throws(Errno) {
        while true {
            var range = HMMRange(notifier: notifier, start: start, end: end,
                                 defaultFlags: write ? HMMPFN(rawValue: HMMPFN.requestFault.rawValue | HMMPFN.requestWrite.rawValue) : .requestFault,
                                 devicePrivateOwner: owner)
            range.notifierSeq = notifier.readBegin()
            mm.mmapReadLock()
            do {
                try mm.hmmRangeFault(&range)
            } catch .busy {
                mm.mmapReadUnlock()
                continue
            } catch {
                mm.mmapReadUnlock()
                throw error
            }
            mm.mmapReadUnlock()
            let stale = pageTableLock.withLock { _ -> Bool in
                if notifier.readRetry(range.notifierSeq) { return true }
                var a = start
                for p in range.hmmPfns {
                    if p.isValid {
                        let dev = kernel.pfnToPage(p.pfn).isZoneDevice
                        pageTable.set(a, pfn: p.pfn, write: p.isWrite, device: dev)
                    }
                    a += 4096
                }
                return false
            }
            if !stale { return }
        }
    }
}
