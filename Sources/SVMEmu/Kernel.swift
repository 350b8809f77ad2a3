import CSVMSupport
import Synchronization

/// Transparent huge page policy (`/sys/kernel/mm/transparent_hugepage/enabled`).
public enum TransparentHugepageMode: String, Sendable, CaseIterable {
    /// Every anonymous VMA may get 2 MiB folios.
    case always
    /// Only VMAs marked with `MADV_HUGEPAGE`.
    case madvise
    /// Never.
    case never
}

/// How the CPU fault path handles a device-private entry (`do_swap_page()`).
public enum DeviceFaultPolicy: String, Sendable, CaseIterable, Codable {
    /// v6.1 to v6.14: take a page reference, drop the page-table lock, call
    /// `migrate_to_ram`. Concurrent faulters each hold a reference.
    case legacy
    /// v6.15 ("Trylock device page in do_swap_page"): only the thread that wins
    /// `folio_trylock` takes a reference and migrates; the others return and retry.
    case trylock
    /// The 2026 starvation fix: a loser sleeps until the page is unlocked, then retries.
    case trylockWait = "trylock-wait"
}

/// The emulated machine's settings, fixed at boot except where noted.
public struct KernelConfiguration: Sendable {
    /// The largest ``addressSpaceSize``: an address space starts at 4 GiB and
    /// ends at or below 128 TiB (`TASK_SIZE` of x86-64 with 4-level page
    /// tables), so every address a TLB entry maps is below 2^47.
    public static let maxAddressSpaceSize: UInt64 = (1 << 47) - (1 << 32)
    /// System RAM per NUMA node, in bytes (rounded down to 2 MiB). Two nodes by default.
    public var nodeSizes: [Int] = [2 << 30, 2 << 30]
    /// The transparent huge page policy (`madvise` by default).
    public var transparentHugepage: TransparentHugepageMode = .madvise
    /// The device-private fault policy; can also be changed at run time.
    public var deviceFaultPolicy: DeviceFaultPolicy = .trylock
    /// Virtual address space of each address space (mm), in bytes, from 4 GiB
    /// on: at least 2 MiB, rounded up to 1 GiB, at most
    /// ``maxAddressSpaceSize`` (the space ends by 128 TiB, x86-64's 47-bit
    /// user address space).
    public var addressSpaceSize: UInt64 = 256 << 30
    /// The most physical memory (system RAM plus device memory) the machine can hold.
    public var maxPhysicalBytes: UInt64 = 512 << 30
    /// Print each driver-misuse diagnostic to standard error as it happens.
    public var printDiagnostics: Bool = false
    /// Trace events kept per CPU for a timeline (0: no trace).
    public var traceEventsPerCPU: Int = 0
    /// CPUs of the machine (1...64): each thread that accesses memory runs on
    /// one, with its own TLB; a thread beyond the count waits for a free CPU.
    public var cpus: Int = CPUSet.maxCPUs
    /// Check every access through a TLB entry against the page tables and
    /// report one whose frame is no longer mapped there (a stale translation)
    /// as a diagnostic. On in debug builds, off in release builds (benchmarks).
    public var checksStaleTLBEntries: Bool = _isDebugAssertConfiguration()
    /// Back every RAM frame with host memory at boot instead of at its first
    /// write. Off by default (a machine costs nothing until used); benchmarks
    /// that copy into fresh frames turn it on, so that the host's first-touch
    /// faults (zeroing the frame) are not counted as the emulated copy's time.
    public var populatesRAM = false
    /// 2 MiB pages in the hugetlb pool at boot (`vm.nr_hugepages` on the
    /// kernel command line); 0 by default, so MAP_HUGETLB mappings fail
    /// with `-ENOMEM` until the pool is grown (``HugeTLBPool/setPageCount(_:)``).
    /// The pages come out of the RAM nodes.
    public var hugetlbPages = 0
    /// The default machine: two 2 GiB RAM nodes, THP on `madvise`, the
    /// trylock fault policy.
    public init() {}

    /// Checks the settings a machine cannot boot with.
    ///
    /// - Throws: ``KernelConfigurationError`` naming the setting and its limit.
    public func validate() throws(KernelConfigurationError) {
        guard !nodeSizes.isEmpty else { throw .init("nodeSizes: the machine needs at least one RAM node") }
        guard nodeSizes.count <= Kernel.maxRegions / 2 else {
            throw .init("nodeSizes: at most \(Kernel.maxRegions / 2) RAM nodes (got \(nodeSizes.count))")
        }
        let pmdSize = Int(AddressSpace.pmdSize)
        for (id, size) in nodeSizes.enumerated() where size < pmdSize {
            throw .init("nodeSizes[\(id)]: a node needs at least 2 MiB (got \(size) bytes)")
        }
        let ram = nodeSizes.reduce(UInt64(0)) { $0 + (UInt64($1) & AddressSpace.pmdMask) }
        guard Kernel.firstRAMPfn << PageGeometry.pageShift + ram <= maxPhysicalBytes else {
            throw .init("maxPhysicalBytes: \(maxPhysicalBytes >> 20) MiB cannot hold the \(ram >> 20) MiB of RAM nodes (plus 16 MiB below RAM)")
        }
        guard addressSpaceSize >= AddressSpace.pmdSize else {
            throw .init("addressSpaceSize: at least 2 MiB (got \(addressSpaceSize) bytes)")
        }
        guard addressSpaceSize <= KernelConfiguration.maxAddressSpaceSize else {
            throw .init("addressSpaceSize: at most \(KernelConfiguration.maxAddressSpaceSize >> 30) GiB, an address space ending below 128 TiB (got \(addressSpaceSize) bytes)")
        }
        guard (1...CPUSet.maxCPUs).contains(cpus) else {
            throw .init("cpus: 1...\(CPUSet.maxCPUs) CPUs (got \(cpus))")
        }
        guard hugetlbPages >= 0 else { throw .init("hugetlbPages: must not be negative (got \(hugetlbPages))") }
        guard traceEventsPerCPU >= 0 else { throw .init("traceEventsPerCPU: must not be negative (got \(traceEventsPerCPU))") }
    }
}

/// A `KernelConfiguration` the machine cannot boot with.
public struct KernelConfigurationError: Error, Sendable, Equatable, CustomStringConvertible {
    /// Which setting is wrong and what it must be.
    public let message: String
    init(_ message: String) { self.message = message }
    /// `invalid KernelConfiguration: ` and the message.
    public var description: String { "invalid KernelConfiguration: \(message)" }
}

/// The emulated kernel: physical memory, device page maps, address spaces,
/// counters and the fault policy. Every test or run boots its own.
///
/// A kernel lives as long as anything refers to it: each ``AddressSpace``
/// keeps its kernel alive, while ``Page`` and ``Folio`` values do not (like a
/// `struct page *`). Its methods are safe to call from any thread; which
/// locks a call expects its caller to hold is part of each method's contract.
public final class Kernel: @unchecked Sendable {
    /// The settings the machine booted with.
    public let configuration: KernelConfiguration

    /// Bytes of page metadata (the emulator's `struct page`) per 4 KiB page.
    public static var metadataBytesPerPage: Int { PageMeta.size }

    // Flat pfn-indexed page metadata (64 bytes a page) and the physical regions.
    @usableFromInline let metaBase: UnsafeMutableRawPointer
    @usableFromInline let maxPfn: UInt64
    @usableFromInline let regionBase: UnsafeMutablePointer<UnsafeMutableRawPointer?>
    @usableFromInline let regionStart: UnsafeMutablePointer<UInt64>
    let regionPages: UnsafeMutablePointer<UInt64>
    /// Physical regions (RAM nodes plus device page maps) a machine can hold:
    /// the width of the region number in page metadata bounds it far above this.
    public static let maxRegions = 1024
    /// System RAM starts at 16 MiB so that pfn 0 never names a real page.
    static let firstRAMPfn: UInt64 = 0x1000
    let layoutLock = LockedValue<(regions: Int, nextPfn: UInt64)>((0, 0))
    /// Regions published so far (their start and size are written first):
    /// read lock-free by `isValid(pfn:)` on every migration entry.
    let publishedRegions = Atomic<Int>(0)
    private var mappings: [(UnsafeMutableRawPointer, Int)] = []

    /// System RAM nodes.
    public private(set) var nodes: [MemoryNode] = []
    /// Event counters, like `/proc/vmstat`.
    public let vmstat = VMStat()
    /// Phase timers of migrations (off until `phases.isEnabled = true`).
    public let phases: PhaseTimer
    /// The CPUs, each with its TLB.
    public let cpus: CPUSet
    /// The deferred TLB flush of system-memory migration (migrc / LUF):
    /// old frames held until a batched flush (Migrate/System).
    public let deferredTLB = DeferredTLBFlush()
    /// The folio lock's hashed wait queues (`folio_wait_table`).
    let folioWaitTable = FolioWaitTable()
    /// The shared zero page (mapped read-only on read faults of anonymous memory).
    public private(set) var zeroPage: Folio! = nil
    /// The huge zero page (a 2 MiB zero folio mapped by a PMD on read faults).
    public private(set) var hugeZeroPage: Folio! = nil
    /// The hugetlb pool that MAP_HUGETLB mappings fault their 2 MiB pages
    /// from (``AddressSpace/mmapHugeTLB(address:length:protection:)``),
    /// sized at boot by ``KernelConfiguration/hugetlbPages``.
    ///
    /// The corresponding kernel object is `default_hstate`.
    public let hugetlb = HugeTLBPool()

    private let policyWord: Atomic<UInt8>
    let diagnosticLog = LockedValue<[Diagnostic]>([])
    let diagnosticCount = Atomic<Int>(0)
    let addressSpaces = WeakRegistry<AddressSpace>()
    /// Test hooks on address-space exits and rmap visits.
    let mmHooks = MMLifetimeHooks()
    /// `exit_mmap()`s running now (``MMStruct/mmput()``): the audit waits for them.
    let exitsRunning = Atomic<Int>(0)
    /// Live files by id: a page-cache folio names its file by id, and the
    /// file rmap walk looks it up here.
    let files = WeakRegistry<File>()
    /// The fork family of every address-space id, held weakly (see `anonFamily(of:)`).
    let anonFamilies = LockedValue<[UInt32: WeakAnonFamily]>([:])
    let pageMaps = LockedValue<[DevicePageMap]>([])
    /// Page-map indices handed out so far (an index is reserved before its
    /// region is added, so racing registrations never share one).
    let pageMapIndices = Atomic<Int>(0)
    /// Device page maps by index (meta.pgmap - 1); read lock-free on fault paths.
    @usableFromInline let pageMapTable: UnsafeMutablePointer<Unmanaged<DevicePageMap>?>
    /// Device page maps a machine can hold (each is a physical region too).
    public static let maxPageMaps = 1024
    /// System RAM nodes by physical region, unretained (`nodes` keeps them):
    /// how a freed folio finds its node without reference counting.
    let nodeByRegion: UnsafeMutablePointer<Unmanaged<MemoryNode>?>
    /// `nodes` by id, unretained, and their number: what allocation reads per
    /// page (reading the `nodes` array would cost an exclusivity check and a retain).
    let nodeByID: UnsafeMutablePointer<Unmanaged<MemoryNode>?>
    let nodeCount: Int

    /// Boots a machine, or reports that the host refused the memory it
    /// needs (there is no form that stops the process instead: a refusal
    /// is the host's answer, not a programming error): the CPUs' TLBs, the page metadata of
    /// ``KernelConfiguration/maxPhysicalBytes``, every RAM node, and the
    /// page tables of one address space of
    /// ``KernelConfiguration/addressSpaceSize`` (reserved and given back
    /// at once: a machine that cannot hold one process is no use). All of
    /// it is address space reserved lazily (`MAP_NORESERVE`); what runs
    /// into a refusal is a limit on address space (`ulimit -v`), not the
    /// host's free memory. Nothing is left reserved when it throws.
    ///
    /// A configuration that ``KernelConfiguration/validate()`` refuses is a
    /// programming error and stops the process with its message.
    ///
    /// - Throws: ``HostMemoryRefusal``, naming how much was asked and for what.
    public init(booting configuration: KernelConfiguration = KernelConfiguration()) throws(HostMemoryRefusal) {
        do { try configuration.validate() } catch { fatalError("SVMEmu: \(error)") }
        maxPfn = configuration.maxPhysicalBytes >> PageGeometry.pageShift
        // The large reservations first, before anything that would have to be given back.
        let metaBytes = Int(maxPfn) << PageMeta.shift
        metaBase = try HostMemory.reserve(bytes: metaBytes, for: "page metadata (\(ByteSize.describe(Int(configuration.maxPhysicalBytes))) of physical address space)")
        // Host huge pages where the host allows, as Linux maps its struct
        // page array (vmemmap) with 2 MiB pages: a pass over the 512 pages
        // of a 2 MiB folio is one host TLB entry, not eight.
        HostMemory.adviseHugePages(metaBase, bytes: metaBytes)
        do {
            cpus = try CPUSet(count: configuration.cpus, checksStaleEntries: configuration.checksStaleTLBEntries, vmstat: vmstat)
            try Kernel.probeAddressSpace(configuration)
        } catch {
            HostMemory.release(metaBase, bytes: metaBytes)
            throw error
        }
        self.configuration = configuration
        phases = PhaseTimer(traceCapacity: configuration.traceEventsPerCPU, cpus: cpus)
        regionBase = .allocate(capacity: Kernel.maxRegions)
        regionBase.initialize(repeating: nil, count: Kernel.maxRegions)
        regionStart = .allocate(capacity: Kernel.maxRegions)
        regionStart.initialize(repeating: 0, count: Kernel.maxRegions)
        regionPages = .allocate(capacity: Kernel.maxRegions)
        regionPages.initialize(repeating: 0, count: Kernel.maxRegions)
        pageMapTable = .allocate(capacity: Kernel.maxPageMaps)
        pageMapTable.initialize(repeating: nil, count: Kernel.maxPageMaps)
        nodeByRegion = .allocate(capacity: Kernel.maxRegions)
        nodeByRegion.initialize(repeating: nil, count: Kernel.maxRegions)
        nodeCount = configuration.nodeSizes.count
        nodeByID = .allocate(capacity: max(1, nodeCount))
        nodeByID.initialize(repeating: nil, count: max(1, nodeCount))
        policyWord = Atomic(Kernel.encode(configuration.deviceFaultPolicy))
        layoutLock.withLock { $0.nextPfn = Kernel.firstRAMPfn }
        var nodes: [MemoryNode] = []
        for (id, size) in configuration.nodeSizes.enumerated() {
            let pages = UInt64(size >> PageGeometry.pmdShift) << PageGeometry.pmdOrder
            // validate() checked the node count and sizes against the
            // limits: a failure is the host's refusal (the deinit gives back
            // what was reserved).
            guard let (start, region, base) = try? addRegion(pages: pages) else {
                self.nodes = nodes
                throw HostMemoryRefusal(bytes: Int(pages) << PageGeometry.pageShift, purpose: "RAM node \(id)",
                                        errno: .noMemory)
            }
            if configuration.populatesRAM { HostMemory.populate(base, bytes: Int(pages) << PageGeometry.pageShift) }
            nodes.append(MemoryNode(id: id, region: region, startPfn: start, pageCount: pages, bytes: base))
        }
        self.nodes = nodes
        cpus.kernel = self
        for node in nodes {
            node.kernelRef = .passUnretained(self)
            nodeByRegion[Int(node.region)] = .passUnretained(node)
            nodeByID[node.id] = .passUnretained(node)
        }
        zeroPage = nodes[0].allocate(order: 0)!
        zeroPage.zeroBytes()
        zeroPage.meta.setFlags(PageFlags.reserved.rawValue | PageFlags.uptodate.rawValue)
        hugeZeroPage = nodes[0].allocate(order: PageGeometry.pmdOrder)!
        hugeZeroPage.zeroBytes()
        hugeZeroPage.meta.setFlags(PageFlags.reserved.rawValue | PageFlags.uptodate.rawValue)
        deferredTLB.kernel = self
        hugetlb.kernelRef = .passUnretained(self)
        hugetlb.setPageCount(configuration.hugetlbPages)
    }

    /// Reserves and gives back the page tables of one address space of
    /// `configuration` (as `AddressSpace.init` reserves them).
    ///
    /// - Throws: ``HostMemoryRefusal`` for the first part the host refuses.
    static func probeAddressSpace(_ configuration: KernelConfiguration) throws(HostMemoryRefusal) {
        try PageTableReservation(addressSpaceSize: configuration.addressSpaceSize).release()
    }

    deinit {
        for (p, n) in mappings { HostMemory.release(p, bytes: n) }
        HostMemory.release(metaBase, bytes: Int(maxPfn) << PageMeta.shift)
        regionBase.deallocate()
        regionStart.deallocate()
        regionPages.deallocate()
        nodeByRegion.deallocate()
        nodeByID.deallocate()
        for i in 0..<Kernel.maxPageMaps { pageMapTable[i]?.release() }
        pageMapTable.deallocate()
    }

    /// The device-private fault policy in force (`do_swap_page()` behaviour).
    ///
    /// May be changed at any time; a fault reads it once when it finds a
    /// device-private entry, and ``Kernel/migrateVMASetup(_:)`` reads it to
    /// know whether the fault path holds the fault page's lock.
    public var deviceFaultPolicy: DeviceFaultPolicy {
        get { Kernel.decode(policyWord.load(ordering: .relaxed)) }
        set { policyWord.store(Kernel.encode(newValue), ordering: .relaxed) }
    }
    private static func encode(_ p: DeviceFaultPolicy) -> UInt8 {
        switch p { case .legacy: 0; case .trylock: 1; case .trylockWait: 2 }
    }
    private static func decode(_ v: UInt8) -> DeviceFaultPolicy {
        switch v { case 0: .legacy; case 1: .trylock; default: .trylockWait }
    }

    // MARK: physical layout

    /// Host memory backed the way emulated RAM and VRAM frames are: lazily
    /// touched and, where the host allows it, on host huge pages (one host TLB
    /// entry and one host fault per 2 MiB instead of 512, which is most of the
    /// cost of copying a 2 MiB folio otherwise). Benchmarks use it for their
    /// memcpy baseline so both sides copy between the same kind of memory.
    /// Release with `releaseFrames(_:bytes:)`. Stops the process when the
    /// host refuses (a benchmark checks its memory before it runs).
    public static func reserveFrames(bytes: Int) -> UnsafeMutableRawPointer {
        guard let p = tryReserveFrames(bytes: bytes) else {
            contractViolation("\(HostMemoryRefusal(bytes: bytes, purpose: "a benchmark's buffer", errno: .noMemory))")
        }
        return p
    }

    /// `reserveFrames(bytes:)`, or nil when the host refuses the memory.
    static func tryReserveFrames(bytes: Int) -> UnsafeMutableRawPointer? {
        guard let p = HostMemory.reserve(bytes: bytes) else { return nil }
        HostMemory.adviseHugePages(p, bytes: bytes)
        return p
    }

    /// Returns memory from `reserveFrames(bytes:)` to the host.
    public static func releaseFrames(_ p: UnsafeMutableRawPointer, bytes: Int) {
        HostMemory.release(p, bytes: bytes)
    }

    /// Adds a physical region of `pages` pages (2 MiB aligned in pfn space) with
    /// its own byte storage. Returns its first pfn, region index and bytes.
    ///
    /// - Throws: `.noSpace` when the machine already holds ``maxRegions``
    ///   regions, `.noMemory` when the region would end beyond
    ///   `KernelConfiguration.maxPhysicalBytes` or the host refuses the
    ///   reservation; a diagnostic names the limit. Nothing is changed then.
    func addRegion(pages: UInt64) throws(Errno) -> (UInt64, UInt16, UnsafeMutableRawPointer) {
        let byteCount = Int(pages) << PageGeometry.pageShift
        guard let bytes = Kernel.tryReserveFrames(bytes: byteCount) else {
            warn("physical layout: the host refused \(pages >> 8) MiB of address space for a region", kind: .machineLimit)
            throw .noMemory
        }
        let start: UInt64, region: Int
        do {
            (start, region) = try layoutLock.withLock { (layout) throws(Errno) -> (UInt64, Int) in
                let start = (layout.nextPfn + PageGeometry.pmdPages64 - 1) & ~(PageGeometry.pmdPages64 - 1)
                guard layout.regions < Kernel.maxRegions else { throw .noSpace }
                guard start + pages <= maxPfn else { throw .noMemory }
                layout.regions += 1
                layout.nextPfn = start + pages
                return (start, layout.regions - 1)
            }
        } catch {
            HostMemory.release(bytes, bytes: byteCount)
            warn(error == .noSpace
                 ? "physical layout: too many physical regions (RAM nodes plus device page maps, at most \(Kernel.maxRegions))"
                 : "physical layout: device memory would end beyond KernelConfiguration.maxPhysicalBytes (\(configuration.maxPhysicalBytes >> 20) MiB)", kind: .machineLimit)
            throw error
        }
        regionStart[region] = start
        regionPages[region] = pages
        regionBase[region] = bytes
        for pfn in start..<(start + pages) { metaPtr(pfn).region = UInt16(region) }
        // Regions are numbered in order under the layout lock and published in
        // that order, which also serialises the bookkeeping below.
        while publishedRegions.load(ordering: .acquiring) != region {}
        mappings.append((bytes, byteCount))
        publishedRegions.store(region + 1, ordering: .releasing)
        return (start, UInt16(region), bytes)
    }

    @inlinable func metaPtr(_ pfn: UInt64) -> MetaPtr {
        MetaPtr(metaBase + Int(pfn << UInt64(PageMeta.shift)))
    }

    /// The bytes of a page frame.
    @inlinable func bytes(ofPfn pfn: UInt64) -> UnsafeMutableRawPointer {
        let r = Int(metaPtr(pfn).region)
        return regionBase[r].unsafelyUnwrapped + Int((pfn - regionStart[r]) << PageGeometry.pageShift)
    }

    /// Whether `pfn` names a page frame of this machine (RAM or device memory).
    ///
    /// Lock-free; a device page map registered concurrently may not be seen yet.
    ///
    /// The corresponding kernel function is `pfn_valid()`.
    public func isValid(pfn: UInt64) -> Bool {
        // Regions are published in ascending pfn order: binary search.
        var lo = 0, hi = publishedRegions.load(ordering: .acquiring)
        while lo < hi {
            let mid = (lo + hi) >> 1
            if pfn < regionStart[mid] { hi = mid }
            else if pfn >= regionStart[mid] + regionPages[mid] { lo = mid + 1 }
            else { return true }
        }
        return false
    }

    /// The page with this pfn, without validation, for drivers walking their
    /// own page tables.
    ///
    /// `pfn` must name a page of this machine (checked in debug builds); use
    /// ``Kernel/page(pfn:)`` for a pfn that may not. Holding the returned
    /// ``Page`` holds no reference.
    ///
    /// The corresponding kernel function is `pfn_to_page()`.
    @inlinable public func pfnToPage(_ pfn: UInt64) -> Page {
        assert(isValid(pfn: pfn), "pfn_to_page: pfn 0x\(String(pfn, radix: 16)) is not a page of this machine")
        return Page(pfn: pfn, kernel: self)
    }

    /// The page with this pfn, or nil for a pfn outside every RAM node and
    /// device page map.
    ///
    /// Holding the returned ``Page`` holds no reference.
    ///
    /// The corresponding kernel function is `pfn_to_page()` (after
    /// `pfn_valid()`).
    public func page(pfn: UInt64) -> Page? {
        isValid(pfn: pfn) ? Page(pfn: pfn, kernel: self) : nil
    }

    // MARK: scheduling

    /// `might_sleep()`: the caller is at a point where the kernel may sleep
    /// (a driver's `lock_page()` on a folio only it can see, say). Under the
    /// deterministic scheduler's CPU model with voluntary preemption
    /// (CONFIG_PREEMPT_VOLUNTARY: `might_resched()`), a pending reschedule
    /// of the calling emulated thread is taken here; otherwise nothing.
    /// Call it with no spinning lock held.
    ///
    /// The corresponding kernel function is `might_sleep()`.
    @inlinable public func mightSleep() {
        DeterministicScheduler.mightSleepPoint()
    }

    // MARK: diagnostics

    /// Records a broken API rule (the emulator's WARN_ON): the caller's step is
    /// refused by the code that calls this; nothing is corrupted.
    ///
    /// Takes no lock a caller could hold; safe from any context. The record
    /// is kept in ``Kernel/diagnostics`` (the first 10,000) and printed to
    /// standard error when ``KernelConfiguration/printDiagnostics`` is set.
    ///
    /// - Parameters:
    ///   - rule: the rule broken, short and stable (tests match on it).
    ///   - detail: which page, address or argument it concerned.
    ///   - kind: what kind of rule it is (tests match on it).
    public func warn(_ rule: String, _ detail: @autoclosure () -> String = "", kind: DiagnosticKind = .apiMisuse) {
        let d = Diagnostic(rule: rule, detail: detail(), kind: kind)
        diagnosticCount.add(1, ordering: .relaxed)
        diagnosticLog.withLock { if $0.count < 10_000 { $0.append(d) } }
        if configuration.printDiagnostics {
            system_write_stderr("svmemu: \(d)\n")
        }
    }

    /// Every diagnostic recorded so far.
    public var diagnostics: [Diagnostic] { diagnosticLog.withLock { $0 } }
    /// Removes and returns the diagnostics recorded so far.
    public func takeDiagnostics() -> [Diagnostic] { diagnosticLog.withLock { let d = $0; $0.removeAll(); return d } }
    /// The diagnostics of kind `kind` recorded so far.
    public func diagnostics(of kind: DiagnosticKind) -> [Diagnostic] { diagnostics.filter { $0.kind == kind } }
    /// Removes and returns the diagnostics of kind `kind`, leaving the others.
    public func takeDiagnostics(of kind: DiagnosticKind) -> [Diagnostic] {
        diagnosticLog.withLock { log in
            let taken = log.filter { $0.kind == kind }
            log.removeAll { $0.kind == kind }
            return taken
        }
    }
}
