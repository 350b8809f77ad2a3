import CSVMSupport
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

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
    /// System RAM per NUMA node, in bytes (rounded down to 2 MiB). Two nodes by default.
    public var nodeSizes: [Int] = [2 << 30, 2 << 30]
    public var transparentHugepage: TransparentHugepageMode = .madvise
    /// The device-private fault policy; can also be changed at run time.
    public var deviceFaultPolicy: DeviceFaultPolicy = .trylock
    /// Virtual address space of each address space (mm), in bytes.
    public var addressSpaceSize: UInt64 = 256 << 30
    /// The most physical memory (system RAM plus device memory) the machine can hold.
    public var maxPhysicalBytes: UInt64 = 512 << 30
    /// Print each driver-misuse diagnostic to standard error as it happens.
    public var printDiagnostics: Bool = false
    /// Trace events kept per CPU for a timeline (0: no trace).
    public var traceEventsPerCPU: Int = 0
    public init() {}
}

/// The emulated kernel: physical memory, device page maps, address spaces,
/// counters and the fault policy. Every test or run boots its own.
public final class Kernel: @unchecked Sendable {
    public let configuration: KernelConfiguration

    /// Bytes of page metadata (the emulator's `struct page`) per 4 KiB page.
    public static var metadataBytesPerPage: Int { PageMeta.size }

    // Flat pfn-indexed page metadata (64 bytes a page) and the physical regions.
    @usableFromInline let metaBase: UnsafeMutableRawPointer
    @usableFromInline let maxPfn: UInt64
    @usableFromInline let regionBase: UnsafeMutablePointer<UnsafeMutableRawPointer?>
    @usableFromInline let regionStart: UnsafeMutablePointer<UInt64>
    let regionPages: UnsafeMutablePointer<UInt64>
    static let maxRegions = 64
    let layoutLock = Mutex<(regions: Int, nextPfn: UInt64)>((0, 0))
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
    /// The shared zero page (mapped read-only on read faults of anonymous memory).
    public private(set) var zeroPage: Folio! = nil
    /// The huge zero page (a 2 MiB zero folio mapped by a PMD on read faults).
    public private(set) var hugeZeroPage: Folio! = nil

    private let policyWord: Atomic<UInt8>
    let diagnosticLog = Mutex<[Diagnostic]>([])
    let diagnosticCount = Atomic<Int>(0)
    let addressSpaces = Mutex<(next: UInt32, live: [UInt32: WeakAddressSpace])>((1, [:]))
    let pageMaps = Mutex<[DevicePageMap]>([])
    /// Device page maps by index (meta.pgmap - 1); read lock-free on fault paths.
    @usableFromInline let pageMapTable: UnsafeMutablePointer<Unmanaged<DevicePageMap>?>
    static let maxPageMaps = 64
    /// System RAM nodes by physical region, unretained (`nodes` keeps them):
    /// how a freed folio finds its node without reference counting.
    let nodeByRegion: UnsafeMutablePointer<Unmanaged<MemoryNode>?>
    /// `nodes` by id, unretained, and their number: what allocation reads per
    /// page (reading the `nodes` array would cost an exclusivity check and a retain).
    let nodeByID: UnsafeMutablePointer<Unmanaged<MemoryNode>?>
    let nodeCount: Int

    public init(_ configuration: KernelConfiguration = KernelConfiguration()) {
        self.configuration = configuration
        phases = PhaseTimer(traceCapacity: configuration.traceEventsPerCPU)
        maxPfn = configuration.maxPhysicalBytes >> 12
        metaBase = Kernel.reserve(bytes: Int(maxPfn) << PageMeta.shift)
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
        // System RAM starts at 16 MiB so that pfn 0 never names a real page.
        layoutLock.withLock { $0.nextPfn = 0x1000 }
        var nodes: [MemoryNode] = []
        for (id, size) in configuration.nodeSizes.enumerated() {
            let pages = UInt64(size >> 21) << 9
            precondition(pages > 0, "KernelConfiguration: node \(id) needs at least 2 MiB")
            let (start, region, base) = addRegion(pages: pages)
            nodes.append(MemoryNode(id: id, region: region, startPfn: start, pageCount: pages, bytes: base))
        }
        self.nodes = nodes
        for node in nodes {
            node.kernelRef = .passUnretained(self)
            nodeByRegion[Int(node.region)] = .passUnretained(node)
            nodeByID[node.id] = .passUnretained(node)
        }
        zeroPage = nodes[0].allocate(order: 0)!
        zeroPage.bytes.initializeMemory(as: UInt8.self, repeating: 0, count: 4096)
        zeroPage.meta.setFlags(PageFlags.reserved.rawValue | PageFlags.uptodate.rawValue)
        hugeZeroPage = nodes[0].allocate(order: 9)!
        hugeZeroPage.bytes.initializeMemory(as: UInt8.self, repeating: 0, count: 2 << 20)
        hugeZeroPage.meta.setFlags(PageFlags.reserved.rawValue | PageFlags.uptodate.rawValue)
    }

    deinit {
        for (p, n) in mappings { munmap(p, n) }
        munmap(metaBase, Int(maxPfn) << PageMeta.shift)
        regionBase.deallocate()
        regionStart.deallocate()
        regionPages.deallocate()
        nodeByRegion.deallocate()
        nodeByID.deallocate()
        for i in 0..<Kernel.maxPageMaps { pageMapTable[i]?.release() }
        pageMapTable.deallocate()
    }

    /// The device-private fault policy in force (`do_swap_page()` behaviour).
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

    /// A lazily touched anonymous mapping; pages cost nothing until written.
    static func reserve(bytes: Int) -> UnsafeMutableRawPointer {
        let p = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let p, p != MAP_FAILED else {
            fatalError("SVMEmu: cannot reserve \(bytes >> 20) MiB of address space for emulated memory (errno \(errno))")
        }
        return p
    }

    /// Host memory backed the way emulated RAM and VRAM frames are: lazily
    /// touched and, where the host allows it, on host huge pages (one host TLB
    /// entry and one host fault per 2 MiB instead of 512, which is most of the
    /// cost of copying a 2 MiB folio otherwise). Benchmarks use it for their
    /// memcpy baseline so both sides copy between the same kind of memory.
    /// Release with `releaseFrames(_:bytes:)`.
    public static func reserveFrames(bytes: Int) -> UnsafeMutableRawPointer {
        let p = reserve(bytes: bytes)
        _ = madvise(p, bytes, MADV_HUGEPAGE)
        return p
    }

    /// Returns memory from `reserveFrames(bytes:)` to the host.
    public static func releaseFrames(_ p: UnsafeMutableRawPointer, bytes: Int) {
        munmap(p, bytes)
    }

    /// Adds a physical region of `pages` pages (2 MiB aligned in pfn space) with
    /// its own byte storage. Returns its first pfn, region index and bytes.
    func addRegion(pages: UInt64) -> (UInt64, UInt8, UnsafeMutableRawPointer) {
        let bytes = Kernel.reserveFrames(bytes: Int(pages) << 12)
        let (start, region): (UInt64, Int) = layoutLock.withLock { layout in
            let start = (layout.nextPfn + 511) & ~511
            precondition(layout.regions < Kernel.maxRegions, "SVMEmu: too many physical regions (max \(Kernel.maxRegions))")
            precondition(start + pages <= maxPfn,
                         "SVMEmu: physical memory exceeds KernelConfiguration.maxPhysicalBytes (\(configuration.maxPhysicalBytes >> 30) GiB)")
            let region = layout.regions
            layout.regions += 1
            layout.nextPfn = start + pages
            return (start, region)
        }
        regionStart[region] = start
        regionPages[region] = pages
        regionBase[region] = bytes
        mappings.append((bytes, Int(pages) << 12))
        for pfn in start..<(start + pages) { metaPtr(pfn).region = UInt8(region) }
        // Regions are added in order under the layout lock; publish this one.
        while publishedRegions.load(ordering: .acquiring) != region {}
        publishedRegions.store(region + 1, ordering: .releasing)
        return (start, UInt8(region), bytes)
    }

    @inlinable func metaPtr(_ pfn: UInt64) -> MetaPtr {
        MetaPtr(metaBase + Int(pfn << UInt64(PageMeta.shift)))
    }

    /// The bytes of a page frame.
    @inlinable func bytes(ofPfn pfn: UInt64) -> UnsafeMutableRawPointer {
        let r = Int(metaPtr(pfn).region)
        return regionBase[r].unsafelyUnwrapped + Int((pfn - regionStart[r]) << 12)
    }

    /// Whether `pfn` names a page frame of this machine (RAM or device memory).
    public func isValid(pfn: UInt64) -> Bool {
        let count = publishedRegions.load(ordering: .acquiring)
        for r in 0..<count where pfn >= regionStart[r] && pfn < regionStart[r] + regionPages[r] {
            return true
        }
        return false
    }

    /// `pfn_to_page()` without validation, for drivers walking their own page
    /// tables: `pfn` must name a page of this machine (checked in debug builds).
    @inlinable public func pfnToPage(_ pfn: UInt64) -> Page {
        assert(isValid(pfn: pfn), "pfn_to_page: pfn 0x\(String(pfn, radix: 16)) is not a page of this machine")
        return Page(pfn: pfn, kernel: self)
    }

    /// The page with this pfn (`pfn_to_page()`). Returns nil for a pfn outside
    /// every region.
    public func page(pfn: UInt64) -> Page? {
        isValid(pfn: pfn) ? Page(pfn: pfn, kernel: self) : nil
    }

    // MARK: diagnostics

    /// Records a broken API rule (the emulator's WARN_ON): the caller's step is
    /// refused by the code that calls this; nothing is corrupted.
    public func warn(_ rule: String, _ detail: @autoclosure () -> String = "") {
        let d = Diagnostic(rule: rule, detail: detail())
        diagnosticCount.add(1, ordering: .relaxed)
        diagnosticLog.withLock { if $0.count < 10_000 { $0.append(d) } }
        if configuration.printDiagnostics {
            var err = "svmemu: \(d)\n"
            err.withUTF8 { _ = Glibc.write(2, $0.baseAddress, $0.count) }
        }
    }

    /// Every diagnostic recorded so far.
    public var diagnostics: [Diagnostic] { diagnosticLog.withLock { $0 } }
    /// Removes and returns the diagnostics recorded so far.
    public func takeDiagnostics() -> [Diagnostic] { diagnosticLog.withLock { let d = $0; $0.removeAll(); return d } }

    // MARK: address spaces (for the reverse map)

    func reserveAddressSpaceID() -> UInt32 {
        addressSpaces.withLock { s in
            let id = s.next
            s.next += 1
            return id
        }
    }
    func register(_ mm: AddressSpace) { addressSpaces.withLock { $0.live[mm.id] = WeakAddressSpace(mm) } }
    func unregister(_ id: UInt32) { addressSpaces.withLock { _ = $0.live.removeValue(forKey: id) } }
    func addressSpace(id: UInt32) -> AddressSpace? { addressSpaces.withLock { $0.live[id]?.value } }
}

struct WeakAddressSpace {
    weak var value: AddressSpace?
    init(_ v: AddressSpace) { value = v }
}
