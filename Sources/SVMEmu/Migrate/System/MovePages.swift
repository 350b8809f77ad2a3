import CSVMSupport

/// The per-page result of `movePages`: the node the page is on (or was
/// moved to), or why it was not moved.
public enum PageStatus: Sendable, Hashable, CustomStringConvertible {
    /// The page is on this node.
    case node(Int)
    /// `-ENOENT` (not present, or device memory), `-EFAULT` (no VMA, a
    /// special one, or the zero page or huge zero page, when moving and
    /// when querying), `-EACCES` (mapped more than once without `moveAll`),
    /// `-EBUSY` (could not be isolated: already isolated, e.g. another page of
    /// the same THP), `-ENOMEM`.
    case error(Errno)
    /// What the kernel stores in the status array: the node, or `-errno`.
    public var rawValue: Int32 {
        switch self {
        case .node(let n): Int32(n)
        case .error(let e): -e.rawValue
        }
    }
    public var description: String {
        switch self {
        case .node(let n): "node \(n)"
        case .error(let e): "-\(e.name)"
        }
    }
}

/// `move_pages(2)` flags.
public struct MovePagesFlags: OptionSet, Sendable, Hashable {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }
    /// MPOL_MF_MOVE: pages mapped only by this process.
    public static let move = MovePagesFlags(rawValue: 1 << 1)
    /// MPOL_MF_MOVE_ALL: also pages mapped more than once (CAP_SYS_NICE).
    public static let moveAll = MovePagesFlags(rawValue: 1 << 2)
}

extension AddressSpace {

    /// Moves the pages at `addresses` to `nodes` (one node per address), or
    /// with `nodes == nil` only reports the node each page is on.
    ///
    /// Pages are queued while consecutive entries name the same node; each
    /// run is migrated with `Kernel.migratePages` in `.sync` mode for reason
    /// `.syscall`, with `policy`'s algorithm, copier and deferral. A page
    /// already on its node, or one that cannot be found or isolated, gets
    /// its status at once and ends the run before it.
    ///
    /// Takes the mmap lock for reading per page while queueing, none while
    /// migrating; may sleep.
    ///
    /// - Parameters:
    ///   - addresses: page addresses (any address within the page).
    ///   - nodes: target node per address, or nil to query.
    ///   - status: one `PageStatus` per address. As in the kernel, a call
    ///     that stops early (an error thrown, pages left unmigrated) writes
    ///     only the statuses it reached and leaves the others as they were;
    ///     an array of another length than `addresses` is first replaced
    ///     by one of `-ENOENT`s.
    ///   - flags: `.move` or `.moveAll`.
    ///   - policy: the algorithm, copier and deferral of the migration.
    /// - Returns: the number of pages not migrated (0 when all moved or were
    ///   reported in `status`), as the system call returns it.
    /// - Throws: `.invalidArgument` for unknown flags or a `nodes` array of
    ///   another length; `.noDevice` (ENODEV) for a node that does not exist
    ///   (pages queued before it are migrated first); `.noMemory` when a
    ///   run stopped for lack of destinations.
    ///
    /// The corresponding kernel function is `kernel_move_pages()`.
    @discardableResult
    public func movePages(_ addresses: [UInt64], nodes: [Int]?, status: inout [PageStatus],
                          flags: MovePagesFlags = .move,
                          policy: MigratePagesPolicy = MigratePagesPolicy()) throws(Errno) -> Int {
        var stats = MigrateStats()
        return try movePages(addresses, nodes: nodes, status: &status, flags: flags, policy: policy, stats: &stats)
    }

    /// `movePages(_:nodes:status:flags:policy:)` that also adds the
    /// statistics of every `migratePages` run it made to `stats` (for
    /// benchmarks: flush time, copy time, lock waits, first-folio latency).
    ///
    /// - Parameters:
    ///   - addresses: page addresses (any address within the page).
    ///   - nodes: target node per address, or nil to query.
    ///   - status: filled with one `PageStatus` per address.
    ///   - flags: `.move` or `.moveAll`.
    ///   - policy: the algorithm, copier and deferral of the migration.
    ///   - stats: where the runs' statistics are added.
    /// - Returns: as `movePages(_:nodes:status:flags:policy:)`.
    /// - Throws: as `movePages(_:nodes:status:flags:policy:)`.
    ///
    /// The corresponding kernel function is `kernel_move_pages()`.
    @discardableResult
    public func movePages(_ addresses: [UInt64], nodes: [Int]?, status: inout [PageStatus],
                          flags: MovePagesFlags = .move, policy: MigratePagesPolicy,
                          stats: inout MigrateStats) throws(Errno) -> Int {
        guard flags.isSubset(of: [.move, .moveAll]) else { throw .invalidArgument }
        // The kernel writes the statuses it reaches and leaves the rest of
        // the user's array alone; an array of another length is first made
        // one status per address.
        if status.count != addresses.count {
            status = [PageStatus](repeating: .error(.noEntry), count: addresses.count)
        }
        guard let nodes else {
            withMmapReadLock {
                for (i, a) in addresses.enumerated() { status[i] = pageStatus(a) }
            }
            return 0
        }
        guard nodes.count == addresses.count else { throw .invalidArgument }
        return try doPagesMove(addresses, nodes, &status, flags.contains(.moveAll), policy, &stats)
    }

    /// `do_pages_move()`.
    private func doPagesMove(_ addresses: [UInt64], _ nodes: [Int], _ status: inout [PageStatus], _ moveAll: Bool,
                             _ policy: MigratePagesPolicy, _ stats: inout MigrateStats) throws(Errno) -> Int {
        var list: [Folio] = []
        var current = -1
        var start = 0
        // Migrates the queued run [start, i) to `current` and stores its status.
        func flushRun(_ i: Int) throws(Errno) -> Int {
            guard !list.isEmpty else { return 0 }
            let r = moveToNode(&list, current, policy)
            stats.merge(r.stats)
            if let e = r.error { throw e }
            if r.notMigrated > 0 { return r.notMigrated + addresses.count - i }
            for k in start..<i { status[k] = .node(current) }
            return 0
        }
        for i in addresses.indices {
            let node = nodes[i]
            guard node >= 0 && node < kernel.nodes.count else {
                _ = try flushRun(i)
                throw .noDevice
            }
            if current < 0 {
                current = node
                start = i
            } else if node != current {
                let left = try flushRun(i)
                if left > 0 { return left }
                start = i
                current = node
            }
            let queued = addPageForMigration(addresses[i], current, &list, moveAll)
            if case .node(-1) = queued {
                continue  // status set when the run moves
            }
            status[i] = queued
            let left = try flushRun(i)
            if left > 0 { return left - 1 }
            current = -1
        }
        return try flushRun(addresses.count)
    }

    /// `do_move_pages_to_node()`: MIGRATE_SYNC, MR_SYSCALL, destinations on
    /// `node` only (`alloc_migration_target()` with `__GFP_THISNODE`).
    func moveToNode(_ list: inout [Folio], _ node: Int, _ policy: MigratePagesPolicy) -> MigratePagesResult {
        let k = kernel
        let r = k.migratePages(&list, mode: .sync, reason: .syscall, policy: policy) { src in
            k.allocateMigrationTarget(for: src, node: node)
        }
        if !list.isEmpty { k.putbackMovableFolios(&list) }
        return r
    }

    /// `add_folio_for_migration()`: `.node(-1)` when queued, `.node(n)` when
    /// already on the target, else the error for the status array.
    private func addPageForMigration(_ address: UInt64, _ node: Int, _ list: inout [Folio], _ moveAll: Bool) -> PageStatus {
        mmapReadLock(); defer { mmapReadUnlock() }
        guard let vma = vma(containing: address), !vma.flags.contains(.special) else { return .error(.badAddress) }
        return withMappedFolio(address) { page, folio in
            if folio.isZoneDevice { return .error(.noEntry) }
            if kernel.nodeID(of: folio) == node { return .node(node) }
            if page.mapCount + folio.entireMapCount > 1 && !moveAll { return .error(.permissionDenied) }
            let isolated = folio.isLarge && folio.test(.hugetlb) ? kernel.isolateHugetlbFolio(folio) : kernel.isolateFolioLRU(folio)
            guard isolated else { return .error(.busy) }
            list.append(folio)
            return .node(-1)
        }
    }

    /// What `move_pages` with no nodes reports for one address (`do_pages_stat_array()`).
    private func pageStatus(_ address: UInt64) -> PageStatus {
        guard vma(containing: address) != nil else { return .error(.badAddress) }
        return withMappedFolio(address) { _, folio in
            if let n = kernel.nodeID(of: folio) { return .node(n) }
            return .error(.noEntry)
        }
    }

    /// `body` with the page mapped at `address` and its folio, holding a
    /// reference on the folio (`folio_walk_start()` and `folio_get()`) until
    /// `body` returns; or what `move_pages` reports for the address: EFAULT
    /// for a zero page (the zero pages never move and have no node to
    /// report), ENOENT where nothing is mapped.
    private func withMappedFolio(_ address: UInt64, _ body: (Page, Folio) -> PageStatus) -> PageStatus {
        switch walkPage(address) {
        case .page(let page):
            let folio = page.folio
            defer { folio.put() }
            return body(page, folio)
        case .zeroPage: return .error(.badAddress)
        case .nothing: return .error(.noEntry)
        }
    }

    /// `follow_page(FOLL_GET | FOLL_DUMP)`: the page mapped present at
    /// `address` with a reference taken, or nil (none, the zero pages, a
    /// migration or device-private entry). Caller holds the mmap lock.
    func followPage(_ address: UInt64) -> Page? {
        if case .page(let page) = walkPage(address) { return page }
        return nil
    }

    /// What `folio_walk_start(FW_ZEROPAGE)` finds at an address.
    enum WalkedPage {
        /// A page mapped present, with a reference the caller drops.
        case page(Page)
        /// The zero page or the huge zero page (no reference taken).
        case zeroPage
        /// No present page: none, a migration or device-private entry, or
        /// a folio being freed.
        case nothing
    }

    /// The page mapped present at `address`, looked up under its
    /// page-table lock, a reference taken; the zero pages are told apart
    /// from an absent page. Caller holds the mmap lock.
    func walkPage(_ address: UInt64) -> WalkedPage {
        guard covers(address) else { return .nothing }
        let pmd = loadPMD(address)
        if pmd.kind == .present {
            return withPMDLock(address) { () -> WalkedPage in
                let again = loadPMD(address)
                guard again.kind == .present else { return .nothing }
                if again.isSpecial { return .zeroPage }
                let page = Page(pfn: again.pfn + ((address >> PageGeometry.pageShift) & (PageGeometry.pmdPages64 - 1)), kernel: kernel)
                return page.folio.tryGet() ? .page(page) : .nothing
            }
        }
        guard pmd.kind == .table else { return .nothing }
        return withPTL(address) { () -> WalkedPage in
            let pte = loadPTE(address)
            guard loadPMD(address).kind == .table, pte.kind == .present else { return .nothing }
            if pte.isSpecial { return .zeroPage }
            let page = Page(pfn: pte.pfn, kernel: kernel)
            return page.folio.tryGet() ? .page(page) : .nothing
        }
    }

    /// Moves every page of this address space on node `from[i]` to node
    /// `to[i]` (pages mapped more than once stay, as with MPOL_MF_MOVE),
    /// each pair migrated in `.sync` mode for reason `.syscall`.
    ///
    /// - Returns: the pages that could not be moved.
    /// - Throws: `.invalidArgument` when the lists differ in length or name
    ///   a node twice as a source; `.noDevice` for a node that does not
    ///   exist; `.noMemory` when the target ran out of memory.
    ///
    /// The corresponding kernel function is `kernel_migrate_pages()`.
    @discardableResult
    public func migratePages(from: [Int], to: [Int], policy: MigratePagesPolicy = MigratePagesPolicy()) throws(Errno) -> Int {
        guard from.count == to.count, Set(from).count == from.count else { throw .invalidArgument }
        for n in from + to where n < 0 || n >= kernel.nodes.count { throw .noDevice }
        var left = 0
        for (source, dest) in zip(from, to) where source != dest {
            var list: [Folio] = []
            withMmapReadLock { queuePages(onNode: source, into: &list) }
            guard !list.isEmpty else { continue }
            let r = moveToNode(&list, dest, policy)
            if let e = r.error { throw e }
            left += r.notMigrated
        }
        return left
    }

    /// `queue_pages_range()` for migrate_pages(2): isolates every folio on
    /// `node` mapped once in this address space (hugetlb folios from the
    /// pool's active list, the rest from the LRU). Caller holds the mmap lock.
    private func queuePages(onNode node: Int, into list: inout [Folio]) {
        for vma in vmas where !vma.flags.contains(.special) {
            var a = vma.start
            while a < vma.end {
                let step: UInt64 = loadPMD(a).kind == .present ? AddressSpace.pmdSize - (a & ~AddressSpace.pmdMask) : PageGeometry.pageSize64
                defer { a += step }
                guard let page = followPage(a) else { continue }
                let folio = page.folio
                defer { folio.put() }
                guard kernel.nodeID(of: folio) == node, page.mapCount + folio.entireMapCount == 1 else { continue }
                // queue_folios_hugetlb() / queue_folios_pte_range().
                let isolated = folio.isLarge && folio.test(.hugetlb) ? kernel.isolateHugetlbFolio(folio) : kernel.isolateFolioLRU(folio)
                if isolated { list.append(folio) }
            }
        }
    }
}
