import Foundation
import Testing
import TestSupport
@testable import SVMEmu

// move_pages / migrate_pages of page-cache folios (filemap_migrate_folio):
// the file rmap unmaps every mapping, the cache entry switches to the new
// folio, the bytes, references and map counts are checked afterwards.

/// A file of `pages` pages whose 64-bit word at byte offset `o` holds
/// `cacheWord(o)`, written with pwrite.
private func patternFile(_ kernel: Kernel, pages: Int) throws -> File {
    let file = File(kernel: kernel)
    let words = (0..<(pages * pageSize / 8)).map { cacheWord($0 * 8) }
    let n = try words.withUnsafeBytes { try file.pwrite(from: $0, offset: 0) }
    #expect(n == pages * pageSize)
    return file
}

private func cacheWord(_ offset: Int) -> UInt64 { 0xCAC4_0000_0000_0000 | UInt64(offset) }

/// The word the CPU stores at offset 8 of page `p` through the shared mapping.
private func storedWord(_ p: Int) -> UInt64 { 0x5707_0000_0000_0000 | UInt64(p) }

/// Whether every word of the file reads as expected through `pread`: the
/// pattern, except offset 8 of each page in `stored`.
private func preadIntact(_ file: File, pages: Int, stored: Set<Int> = []) throws -> Bool {
    var words = [UInt64](repeating: 0, count: pages * pageSize / 8)
    let n = try words.withUnsafeMutableBytes { try file.pread(into: $0, offset: 0) }
    guard n == pages * pageSize else { return false }
    return words.indices.allSatisfy { i in
        let o = i * 8
        if o % pageSize == 8 && stored.contains(o / pageSize) { return words[i] == storedWord(o / pageSize) }
        return words[i] == cacheWord(o)
    }
}

private func addresses(_ a: UInt64, pages: Int) -> [UInt64] { (0..<pages).map { a + UInt64($0 * pageSize) } }

@Suite("migrate_pages and move_pages of page-cache folios")
struct MigratePageCacheTests {

    @Test("move_pages of a MAP_SHARED file mapping moves its page-cache folios to node 1: bytes through the mapping and pread, the cache's new folios, the old frames freed, a second (private) mapping's entries name the new pages")
    func sharedFileMappingMoves() throws {
        try withMachine(thp: .never) { kernel, mm in
            let pages = 16
            let file = try patternFile(kernel, pages: pages)
            let a = try mm.mmap(length: pages * pageSize, protection: .readWrite, shared: true, file: file)
            // Even pages written through the mapping (dirty), odd ones read.
            let stored = Set(stride(from: 0, to: pages, by: 2))
            for p in 0..<pages {
                let addr = a + UInt64(p * pageSize + 8)
                if stored.contains(p) { try mm.store64(addr, storedWord(p)) } else { _ = try mm.load64(addr) }
            }
            // A second process maps the file privately and reads every page:
            // it maps the same page-cache folios, read-only.
            let other = try AddressSpace(kernel: kernel)
            let b = try other.mmap(length: pages * pageSize, protection: .readWrite, shared: false, file: file)
            for p in 0..<pages { _ = try other.load64(b + UInt64(p * pageSize)) }
            let old = (0..<pages).map { file.cachedFolio(at: UInt64($0))! }
            #expect(old.allSatisfy { kernel.nodeID(of: $0) == 0 && $0.refCount == 3 && $0.mapCount == 2 })

            // Mapped twice: MPOL_MF_MOVE refuses, MPOL_MF_MOVE_ALL moves.
            var status: [PageStatus] = []
            #expect(try mm.movePages([a], nodes: [1], status: &status) == 0)
            #expect(status == [.error(.permissionDenied)])
            let free0 = kernel.nodes[0].freePages, free1 = kernel.nodes[1].freePages
            let success = kernel.vmstat[.pgmigrateSuccess]
            let left = try mm.movePages(addresses(a, pages: pages), nodes: Array(repeating: 1, count: pages), status: &status,
                                        flags: .moveAll)
            #expect(left == 0)
            #expect(status == Array(repeating: .node(1), count: pages))
            #expect(kernel.vmstat[.pgmigrateSuccess] - success == UInt64(pages))

            for p in 0..<pages {
                let new = try #require(file.cachedFolio(at: UInt64(p)))
                #expect(new.pfn != old[p].pfn)
                #expect(kernel.nodeID(of: new) == 1)
                // The cache's reference and one per mapping; both entries name it.
                #expect(new.refCount == 3 && new.mapCount == 2, "\(new)")
                #expect(new.flags.isSuperset(of: [.pageCache, .lru, .uptodate]) && !new.isLocked)
                // pwrite dirtied every page (there is no writeback): the bit moved.
                #expect(new.isDirty)
                #expect(mm.entry(at: a + UInt64(p * pageSize)).entry.pfn == new.pfn)
                #expect(other.entry(at: b + UInt64(p * pageSize)).entry.pfn == new.pfn)
                // The old frame went back to node 0's free lists.
                #expect(old[p].refCount == 0 && old[p].flags.contains(.buddy))
            }
            #expect(kernel.nodes[0].freePages - free0 == UInt64(pages))
            #expect(free1 - kernel.nodes[1].freePages == UInt64(pages))
            #expect(file.cachedPageCount == pages)

            // Every byte, through both mappings and through pread.
            for p in 0..<pages {
                let o = p * pageSize
                #expect(try mm.load64(a + UInt64(o + 8)) == (stored.contains(p) ? storedWord(p) : cacheWord(o + 8)))
                #expect(try other.load64(b + UInt64(o + 16)) == cacheWord(o + 16))
            }
            #expect(try preadIntact(file, pages: pages, stored: stored))
            // The shared mapping still writes the file's page, now the new one.
            try mm.store64(a + 24, 0xAB)
            var word: UInt64 = 0
            _ = try withUnsafeMutableBytes(of: &word) { try file.pread(into: $0, offset: 24) }
            #expect(word == 0xAB)
            try mm.store64(a + 24, cacheWord(24))
            #expect(kernel.audit().isClean, "\(kernel.audit())")

            // Mapped once again, migrate_pages(2) takes them back to node 0.
            try other.munmap(b, length: pages * pageSize)
            #expect(try mm.migratePages(from: [1], to: [0]) == 0)
            #expect((0..<pages).allSatisfy { kernel.nodeID(of: file.cachedFolio(at: UInt64($0))!) == 0 })
            #expect(try preadIntact(file, pages: pages, stored: stored))
            #expect(kernel.audit().isClean, "\(kernel.audit())")
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("a page-cache folio someone else holds (a reference, a GUP pin) is retried with -EAGAIN until the passes run out, then left where it was; once released it moves",
          arguments: ["folio_get", "pin_user_pages"])
    func extraReferenceKeepsFolio(_ holder: String) throws {
        try withMachine(thp: .never) { kernel, mm in
            let file = try patternFile(kernel, pages: 2)
            let a = try mm.mmap(length: 2 * pageSize, protection: .readWrite, shared: true, file: file)
            _ = try mm.load64(a)
            let folio = try #require(file.cachedFolio(at: 0))
            var pinned: [Page] = []
            if holder == "folio_get" { folio.get() } else { pinned = try mm.pinUserPagesFast(a, count: 1) }
            let held = holder == "folio_get" ? 1 : Folio.pinCountingBias
            let refs = folio.refCount
            #expect(refs == 2 + held)
            let fail = kernel.vmstat[.pgmigrateFail]

            // move_pages: the migration fails; the syscall returns the count
            // and, as the kernel since v4.17, stores no status for the run.
            var status: [PageStatus] = []
            #expect(try mm.movePages([a], nodes: [1], status: &status) == 1)
            #expect(status != [.node(1)])
            #expect(kernel.vmstat[.pgmigrateFail] - fail == 1)
            // Nothing changed: the same folio in the cache and the PTE, its
            // references, its bytes, and no migration entry left behind.
            #expect(file.cachedFolio(at: 0) == folio)
            #expect(mm.entry(at: a).entry.kind == .present && mm.entry(at: a).entry.pfn == folio.pfn)
            #expect(folio.refCount == refs && folio.mapCount == 1 && !folio.isLocked)
            #expect(folio.flags.contains(.lru))
            #expect(kernel.nodeID(of: folio) == 0)
            #expect(try preadIntact(file, pages: 2))
            #expect(kernel.audit(heldReferences: [folio.pfn: held]).isClean, "\(kernel.audit(heldReferences: [folio.pfn: held]))")

            // The kernel-internal call shows the reason: -EAGAIN in every
            // pass (3 ASYNC, then 7 SYNC), never a permanent failure.
            var list: [Folio] = []
            mm.withMmapReadLock {
                if let page = mm.followPage(a) {
                    if kernel.isolateFolioLRU(page.folio) { list.append(page.folio) }
                    page.folio.put()
                }
            }
            #expect(list.count == 1)
            let r = kernel.migratePages(&list, mode: .sync, reason: .syscall) { kernel.allocateFolio(order: $0.order, node: 1) }
            #expect(r.notMigrated == 1 && r.stats.failedPages == 1 && r.error == nil)
            kernel.putbackMovableFolios(&list)
            #expect(file.cachedFolio(at: 0) == folio && folio.refCount == refs)

            if holder == "folio_get" { folio.put() } else { for p in pinned { kernel.unpinUserPage(p) } }
            #expect(try mm.movePages([a], nodes: [1], status: &status) == 0)
            #expect(status == [.node(1)])
            #expect(file.cachedFolio(at: 0) != folio)
            #expect(try preadIntact(file, pages: 2))
            #expect(kernel.audit().isClean, "\(kernel.audit())")
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("a dirty page-cache folio moves with its dirty bit; one under writeback is -EBUSY in ASYNC and SYNC_LIGHT, and SYNC waits for the writeback to end")
    func dirtyAndWriteback() throws {
        try withMachine(thp: .never) { kernel, mm in
            let file = try patternFile(kernel, pages: 2)
            let a = try mm.mmap(length: 2 * pageSize, protection: .read, shared: true, file: file)
            _ = try mm.load64(a)
            _ = try mm.load64(a + UInt64(pageSize))
            // pwrite dirtied both pages; the read-only mapping leaves them dirty.
            let folio = try #require(file.cachedFolio(at: 1))
            #expect(folio.isDirty)
            func isolate(_ f: Folio) -> [Folio] { kernel.isolateFolioLRU(f) ? [f] : [] }

            #expect(folio.tryLock())
            folio.startWriteback()
            folio.unlock()
            for mode in [MigrateMode.async, .syncLight] {
                var list = isolate(folio)
                let r = kernel.migratePages(&list, mode: mode, reason: .syscall) { kernel.allocateFolio(order: $0.order, node: 1) }
                #expect(r.notMigrated == 1 && r.stats.failedPages == 1, "\(mode)")
                kernel.putbackMovableFolios(&list)
                #expect(file.cachedFolio(at: 1) == folio)
            }
            let ended = SharedCounter()
            Thread { usleep(20_000); folio.endWriteback(); ended.add() }.start()
            var list = isolate(folio)
            let r = kernel.migratePages(&list, mode: .sync, reason: .syscall) { kernel.allocateFolio(order: $0.order, node: 1) }
            #expect(eventually(within: 10) { ended.current == 1 })
            #expect(r.notMigrated == 0 && list.isEmpty)
            let new = try #require(file.cachedFolio(at: 1))
            #expect(new != folio && kernel.nodeID(of: new) == 1)
            #expect(new.isDirty)
            #expect(mm.entry(at: a + UInt64(pageSize)).entry.pfn == new.pfn)
            #expect(try preadIntact(file, pages: 2))
            #expect(kernel.audit().isClean, "\(kernel.audit())")
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("a CPU writer through a MAP_SHARED mapping and a pread reader race move_pages back and forth: no store is lost, pread never sees a torn page")
    func writerRacesMigration() throws {
        try withMachine(thp: .never) { kernel, mm in
            let pages = 32
            let file = try patternFile(kernel, pages: pages)
            let a = try mm.mmap(length: pages * pageSize, protection: .readWrite, shared: true, file: file)
            for p in 0..<pages { _ = try mm.load64(a + UInt64(p * pageSize)) }
            let stop = SharedCounter(), bad = SharedCounter(), last = SharedCounter()
            let ok = runThreads(3, timeout: 90, keepAlive: [kernel, mm, file]) { t in
                switch t {
                case 0:
                    // The race needs the writer: on a loaded host it may
                    // start after all the rounds would have run.
                    guard eventually(within: 30, { last.current > 0 }) else {
                        bad.add()
                        stop.add()
                        return
                    }
                    var st: [PageStatus] = []
                    for round in 0..<8 {
                        _ = try? mm.movePages(addresses(a, pages: pages), nodes: Array(repeating: (round + 1) & 1, count: pages), status: &st)
                    }
                    stop.add()
                case 1:
                    // Stores v into word 2 of every page, v = 1, 2, 3, ...
                    var v: UInt64 = 0
                    while stop.current == 0 {
                        v += 1
                        for p in 0..<pages where (try? mm.store64(a + UInt64(p * pageSize + 16), v)) == nil { bad.add() }
                        last.value.store(Int(v), ordering: .releasing)
                    }
                default:
                    // pread sees the pattern everywhere but word 2 of each page.
                    var buf = [UInt64](repeating: 0, count: pageSize / 8)
                    while stop.current == 0 {
                        for p in 0..<pages {
                            _ = try? buf.withUnsafeMutableBytes { try file.pread(into: $0, offset: Int64(p * pageSize)) }
                            if buf[1] != cacheWord(p * pageSize + 8) || buf[3] != cacheWord(p * pageSize + 24) { bad.add() }
                        }
                    }
                }
            }
            #expect(ok)
            #expect(bad.current == 0)
            // The last pass of stores is in every page, through the file.
            let v = UInt64(last.current)
            for p in 0..<pages {
                var w: UInt64 = 0
                _ = try withUnsafeMutableBytes(of: &w) { try file.pread(into: $0, offset: Int64(p * pageSize + 16)) }
                #expect(w == v || w == v + 1, "page \(p): \(w), last pass \(v)")
            }
            #expect(kernel.audit().isClean, "\(kernel.audit())")
            #expect(kernel.diagnostics.isEmpty)
        }
    }
}
