import MirrorDriver
import SVMEmu

/// What the soak's threads share: the buffer's geometry, the shadow model,
/// the counters and the audit barrier. Only one thread runs at a time (the
/// scheduler switches between them at scheduling points), so none of it
/// needs a lock; what must
/// not be split by a scheduling point (a word and its shadow) changes
/// inside one CPU access, with none between.
///
/// The model: `shadow[w]` is what word `w` holds. CPU threads write every
/// word but the GPU's (every eighth), which only the GPU thread writes, so
/// a GPU access (which has scheduling points between the device's store
/// and the shadow's) cannot race a CPU store of the same word. While an
/// address-space change of a page is in progress, `busy[page]` says which
/// kind, and `gen[page]` moves at its start and end: an access that
/// overlapped one may fail, a write during a zeroing change (munmap,
/// MADV_DONTNEED), a fork or a swap of two ranges stores nothing (its
/// outcome would depend on the order), and a read then may see the old
/// bytes or zeroes (or, during a swap, the other range's).
final class SoakState: @unchecked Sendable {
    let settings: SoakSettings
    let kernel: Kernel
    let mm: AddressSpace
    let driver: any SoakDriver
    let small: UInt64, smallPages: Int
    let huge: UInt64, hugeRegions: Int
    let scratch: UInt64
    let pages: Int, words: Int
    let shadow: UnsafeMutablePointer<UInt64>
    /// Words whose content is unknown after a GPU write that raced a
    /// zeroing change; the next clean GPU write makes them known again.
    let unknown: UnsafeMutablePointer<Bool>
    let busy: UnsafeMutablePointer<UInt8>
    let gen: UnsafeMutablePointer<UInt32>
    /// Moves at the start and the end of each swap of the page with
    /// another: a GPU access that overlapped one may have reached either.
    let swaps: UnsafeMutablePointer<UInt32>
    /// While a swap is under way, the page each page trades places with: a
    /// read then sees its own word or, once mremap moved the partner in,
    /// the partner's.
    let partner: UnsafeMutablePointer<Int>
    let readOnly: UnsafeMutablePointer<Bool>
    /// The forked child, its shadow and its read-only pages.
    var child: AddressSpace? = nil
    let childShadow: UnsafeMutablePointer<UInt64>
    let childUnknown: UnsafeMutablePointer<Bool>
    let childReadOnly: UnsafeMutablePointer<Bool>

    /// Faults one access may take before the soak calls it stuck.
    static let faultLimit = 10_000
    static let zeroing: UInt8 = 1, forking: UInt8 = 2, reshaping: UInt8 = 3, swapping: UInt8 = 4

    var operations = 0, reads = 0, writes = 0, gpuReads = 0, gpuWrites = 0
    var toDevice = 0, toSystem = 0, hugeMigrations = 0, evictions = 0
    var munmaps = 0, mprotects = 0, madvises = 0, mremaps = 0, forks = 0, childAccesses = 0, pagesMoved = 0
    var writesRefused = 0, raced = 0, accessErrors = 0, corrupted = 0, staleDeviceMappings = 0
    var findings: [String] = []
    var planted = false
    /// Virtual time: when the first thread started, and when the last one ended.
    var startNanos: UInt64 = 0
    var lastNanos: UInt64 = 0

    // The audit barrier.
    var live = 0, parked = 0, epoch = 0
    var auditPending = false, stopped = false
    var audits = 0
    var lastAudit: KernelAudit? = nil
    var failedAudit: KernelAudit? = nil
    var failedAt: Int? = nil

    init(settings: SoakSettings, kernel: Kernel, mm: AddressSpace, driver: any SoakDriver,
         small: UInt64, smallPages: Int, huge: UInt64, hugeRegions: Int, scratch: UInt64) {
        self.settings = settings
        self.kernel = kernel
        self.mm = mm
        self.driver = driver
        self.small = small
        self.smallPages = smallPages
        self.huge = huge
        self.hugeRegions = hugeRegions
        self.scratch = scratch
        pages = smallPages + hugeRegions * PageGeometry.pmdPages
        words = pages * SoakState.wordsPerPage
        shadow = .allocate(capacity: words)
        unknown = .allocate(capacity: words)
        unknown.initialize(repeating: false, count: words)
        childShadow = .allocate(capacity: words)
        childUnknown = .allocate(capacity: words)
        busy = .allocate(capacity: pages)
        busy.initialize(repeating: 0, count: pages)
        gen = .allocate(capacity: pages)
        gen.initialize(repeating: 0, count: pages)
        swaps = .allocate(capacity: pages)
        swaps.initialize(repeating: 0, count: pages)
        partner = .allocate(capacity: pages)
        partner.initialize(repeating: 0, count: pages)
        readOnly = .allocate(capacity: pages)
        readOnly.initialize(repeating: false, count: pages)
        childReadOnly = .allocate(capacity: pages)
    }

    /// Drops the child and the model's storage (after the run).
    func release() {
        child = nil
        for p in [UnsafeMutableRawPointer(shadow), UnsafeMutableRawPointer(unknown), UnsafeMutableRawPointer(childShadow),
                  UnsafeMutableRawPointer(childUnknown), UnsafeMutableRawPointer(busy), UnsafeMutableRawPointer(gen),
                  UnsafeMutableRawPointer(swaps), UnsafeMutableRawPointer(partner),
                  UnsafeMutableRawPointer(readOnly), UnsafeMutableRawPointer(childReadOnly)] {
            p.deallocate()
        }
    }

    static let wordsPerPage = PageGeometry.pageSize / 8

    @inline(__always) func address(ofPage p: Int) -> UInt64 {
        p < smallPages ? small + UInt64(p) << PageGeometry.pageShift
            : huge + UInt64(p - smallPages) << PageGeometry.pageShift
    }
    @inline(__always) func address(ofWord w: Int) -> UInt64 {
        address(ofPage: w / SoakState.wordsPerPage) + UInt64(w % SoakState.wordsPerPage) * 8
    }

    /// A word read while its page was being swapped: its own value or its
    /// partner's (unknown when a GPU store to the partner overlapped).
    func swappedIn(_ v: UInt64, word w: Int) -> Bool {
        let p = w / SoakState.wordsPerPage
        let q = partner[p] * SoakState.wordsPerPage + w % SoakState.wordsPerPage
        return v == shadow[w] || v == shadow[q] || unknown[q]
    }

    func note(_ s: @autoclosure () -> String) {
        if findings.count < 10 { findings.append(s()) }
    }

    // MARK: the barrier and the audit

    /// Claims one operation; false when the budget is spent or an audit
    /// failed. Every `auditEvery` operations the threads meet here, where
    /// none is inside the kernel, and the last to arrive runs the audit.
    func claim() -> Bool {
        if startNanos == 0 { startNanos = HostClock.nanos() }
        if auditPending { park() }
        guard !stopped, operations < settings.operations else { return false }
        operations += 1
        if operations % settings.auditEvery == 0 {
            auditPending = true
            park()
        }
        return true
    }

    private func park() {
        parked += 1
        if parked == live {
            runAudit()
            auditPending = false
            epoch &+= 1
            parked -= 1
            return
        }
        let e = epoch
        while epoch == e { HostThread.yield() }
        parked -= 1
    }

    /// A thread's end: the barrier stops counting it.
    func exit() {
        live -= 1
        lastNanos = max(lastNanos, HostClock.nanos() - startNanos)
        if auditPending && parked == live && live > 0 {
            runAudit()
            auditPending = false
            epoch &+= 1
        }
    }

    /// The kernel's invariants, then every word against the shadow, read
    /// from the frames without faulting (device pages included). A failing
    /// audit stops the soak.
    func runAudit() {
        audits += 1
        let a = kernel.audit()
        lastAudit = a
        corrupted += peekCompare(mm, shadow, unknown)
        if let child { corrupted += peekCompare(child, childShadow, childUnknown) }
        let stale = compareDevicePageTable()
        staleDeviceMappings += stale
        if stale > 0 && failedAt == nil {
            failedAt = operations
            stopped = true
        }
        if !a.isClean && failedAudit == nil {
            failedAudit = a
            failedAt = operations
            stopped = true
        }
    }

    /// The device's page table against the CPU's, at quiescence: every page
    /// the device maps must be the frame the CPU's page tables map at that
    /// address (a system page in place, or the device page behind a
    /// device-private or device-exclusive entry), and a writable device
    /// entry needs a CPU entry that is writable or the device's own. An
    /// invalidation the driver missed, or a mapping it made without checking
    /// the notifier sequence, leaves a device entry that fails this. Returns
    /// the pages that did.
    func compareDevicePageTable() -> Int {
        var bad = 0
        for p in 0..<pages {
            let a = address(ofPage: p)
            guard let d = driver.deviceEntry(at: a) else { continue }
            let cpu = mm.mappedFrame(at: a)
            if cpu?.agrees(withDevicePfn: d.pfn, writable: d.writable) == true { continue }
            bad += 1
            let now = cpu.map { "\($0)" } ?? "\(mm.entry(at: a).entry.kind)"
            note("audit after operation \(operations): the device maps 0x\(String(a, radix: 16)) to pfn 0x\(String(d.pfn, radix: 16))\(d.writable ? " write" : ""), the CPU page tables to \(now)")
        }
        return bad
    }

    /// Bytes of the buffer in `space` that differ from `model`, read
    /// straight from the frames the page tables name (no fault, no lock:
    /// at quiescence only).
    func peekCompare(_ space: AddressSpace, _ model: UnsafeMutablePointer<UInt64>, _ unknown: UnsafeMutablePointer<Bool>) -> Int {
        var bad = 0
        for p in 0..<pages {
            let a = address(ofPage: p)
            var bytes: UnsafeMutableRawPointer? = nil
            if let f = space.mappedFrame(at: a) {
                switch f.entry.kind {
                case .present where f.entry.isSpecial: break  // the zero page reads zeroes
                case .present, .devicePrivate: bytes = kernel.pfnToPage(f.pfn).unsafeBytes
                default: continue  // device-exclusive: the audit checks it
                }
            } else if space.entry(at: a).entry.kind != .none {
                continue  // a migration entry: the audit reports any left
            }
            let w0 = p * SoakState.wordsPerPage
            for i in 0..<SoakState.wordsPerPage where !unknown[w0 + i] {
                let v = bytes?.load(fromByteOffset: i * 8, as: UInt64.self) ?? 0
                if v != model[w0 + i] {
                    bad += Soak.differingBytes(v, model[w0 + i])
                    note("audit after operation \(operations): word at 0x\(String(a + UInt64(i * 8), radix: 16)) holds 0x\(String(v, radix: 16)), shadow 0x\(String(model[w0 + i], radix: 16))")
                }
            }
        }
        return bad
    }

    /// After the run: every word through the CPU (device pages fault back),
    /// in the process and in the child; then the child is released.
    func finalCheck() -> Int {
        var bad = 0
        for (space, model, unknown) in [(mm, shadow, self.unknown)] + (child.map { [($0, childShadow, childUnknown)] } ?? []) {
            for w in 0..<words where !unknown[w] {
                guard let v = try? space.load64(address(ofWord: w)) else {
                    bad += 8
                    note("final check: word at 0x\(String(address(ofWord: w), radix: 16)) cannot be read")
                    continue
                }
                bad += Soak.differingBytes(v, model[w])
            }
        }
        child = nil
        return bad
    }

    func result(steps: UInt64, seconds: Double) -> SoakResult {
        let a = failedAudit ?? lastAudit
        let splits = driver.deviceFolioSplits
        return SoakResult(
            settings: settings, operations: operations, reads: reads, writes: writes,
            gpuReads: gpuReads, gpuWrites: gpuWrites, gpuFaults: driver.faults,
            migrationsToDevice: toDevice, migrationsToSystem: toSystem, hugeMigrations: hugeMigrations,
            deviceFolioSplits: splits, evictions: evictions, munmaps: munmaps, mprotects: mprotects,
            madvises: madvises, mremaps: mremaps, forks: forks, childAccesses: childAccesses, pagesMoved: pagesMoved,
            writesRefused: writesRefused, racedAccesses: raced, audits: audits, bytesCorrupted: corrupted,
            accessErrors: accessErrors, staleDeviceMappings: staleDeviceMappings,
            leakedReferences: (a?.referenceMismatches ?? 0) + (a?.mapCountMismatches ?? 0) + (a?.unreachableFolios ?? 0),
            locksHeld: (a?.foliosLocked ?? 0) + (a?.locksHeld ?? 0),
            leakedFrames: (a?.lostFrames ?? 0) + (a?.entriesToFreeFrames ?? 0) + (a?.migrationEntries ?? 0)
                + (a?.freeCountMismatches ?? 0),
            failedAtOperation: failedAt, audit: a, findings: findings, warnings: [], deadlock: nil,
            scheduleSteps: steps, virtualSeconds: Double(lastNanos) / 1e9, seconds: seconds)
    }
}
