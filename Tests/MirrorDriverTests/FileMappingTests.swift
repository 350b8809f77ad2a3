import Foundation
import Synchronization
import Testing
import SVMEmu
import MirrorDriver
import TestSupport

/// A file of `pages` pages whose 64-bit word at byte offset `o` holds
/// `fileWord(o)`, written with pwrite.
private func patternFile(_ kernel: Kernel, pages: Int) throws -> File {
    let file = File(kernel: kernel)
    let words = (0..<(pages * pageSize / 8)).map { fileWord($0 * 8) }
    let n = try words.withUnsafeBytes { try file.pwrite(from: $0, offset: 0) }
    #expect(n == pages * pageSize)
    return file
}

private func fileWord(_ offset: Int) -> UInt64 { 0xF11E_0000_0000_0000 | UInt64(offset) }

/// Every cached page of `file` in `0 ..< pages`: referenced by the cache
/// alone (no mapping, no leftover reference).
private func onlyCacheReferences(_ file: File, pages: Int) -> Bool {
    (0..<pages).allSatisfy { i in
        guard let f = file.cachedFolio(at: UInt64(i)) else { return false }
        return f.refCount == 1 && f.mapCount == 0
    }
}

@Suite("file-backed mappings and the page cache")
struct FileMappingTests {

    @Test("a CPU writer through a MAP_PRIVATE file mapping races migrations to the device and back: no write is lost, unwritten pages keep the file's bytes, the file never changes")
    func privateFileWriterRacesMigration() throws {
        try withMachine { kernel, mm, device in
            let pages = 16
            let file = try patternFile(kernel, pages: pages)
            let a = try mm.mmap(length: pages * pageSize, protection: .readWrite, shared: false, file: file)

            // The writer stores 1, 2, 3, ... into one word of each even page (the
            // first store copies the page: do_cow_fault); odd pages stay mapped
            // from the page cache, which migrate_vma collects, cannot move, and
            // restores through the file's rmap; a reader checks them meanwhile.
            let rounds = 100
            let stop = Atomic<Int>(0)
            let lastWritten = SharedCounter()
            let migrations = Atomic<Int>(0)
            let issues = ThreadIssues()
            let ok = runThreads(3, timeout: 60, keepAlive: [kernel, mm, device, file]) { t in
                switch t {
                case 0:
                    // The race needs a writer: on a loaded host it may start
                    // after all the rounds would have run.
                    guard eventually(within: 30, { lastWritten.current > 0 }) else {
                        issues.record("the writer never completed a pass")
                        stop.store(1, ordering: .releasing)
                        return
                    }
                    for _ in 0..<rounds {
                        _ = try? device.migrateToDevice(a, pages: pages)
                        _ = try? device.migrateToSystem(a, pages: pages)
                        migrations.add(1, ordering: .relaxed)
                    }
                    stop.store(1, ordering: .releasing)
                case 1:
                    var v: UInt64 = 0
                    while stop.load(ordering: .acquiring) == 0 {
                        v += 1
                        for p in stride(from: 0, to: pages, by: 2) {
                            guard (try? mm.store64(a + UInt64(p * pageSize), v)) != nil else {
                                issues.record("store failed on page \(p)")
                                return
                            }
                        }
                        lastWritten.value.store(Int(v), ordering: .releasing)
                    }
                default:
                    while stop.load(ordering: .acquiring) == 0 {
                        for p in stride(from: 1, to: pages, by: 2) {
                            let o = p * pageSize + 64
                            guard let w = try? mm.load64(a + UInt64(o)) else { issues.record("load failed on page \(p)"); return }
                            if w != fileWord(o) { issues.record("page \(p) read 0x\(String(w, radix: 16))") }
                        }
                    }
                }
            }
            try #require(ok)
            #expect(issues.all.isEmpty, "\(issues.all)")
            #expect(migrations.load(ordering: .acquiring) == rounds)
            let v = UInt64(lastWritten.current)
            for p in 0..<pages {
                let base = p * pageSize
                if p % 2 == 0 {
                    let w = try mm.load64(a + UInt64(base))
                    #expect(w == v, "page \(p): read \(w), last written \(v), entry \(mm.entry(at: a + UInt64(base)).entry)")
                }
                // The rest of every page is the file's: copied at the COW, or the cache's own.
                for o in stride(from: base + 8, to: base + pageSize, by: 512) {
                    #expect(try mm.load64(a + UInt64(o)) == fileWord(o), "page \(p) offset \(o)")
                }
            }
            // The private stores never reached the file.
            var word: UInt64 = 0
            for p in stride(from: 0, to: pages, by: 2) {
                #expect(try withUnsafeMutableBytes(of: &word) { try file.pread(into: $0, offset: Int64(p * pageSize)) } == 8)
                #expect(word == fileWord(p * pageSize))
            }
            // Only the copies moved: every odd page is still the cache's folio.
            for p in stride(from: 1, to: pages, by: 2) {
                #expect(mm.entry(at: a + UInt64(p * pageSize)).entry.pfn == file.cachedFolio(at: UInt64(p))?.pfn)
            }
            try mm.munmap(a, length: pages * pageSize)
            #expect(onlyCacheReferences(file, pages: pages))
            #expect(device.devicePagesInUse == 0)
            #expect(kernel.vmstat[.tlbStaleAccesses] == 0)
            #expect(kernel.diagnostics.isEmpty, "\(kernel.diagnostics)")
        }
    }

    @Test("pread, pwrite, ftruncate and mmap refuse bad input with typed errors and leave the file as it was")
    func badInputLeavesStateIntact() throws {
        try withMachine { kernel, mm, _ in
            let file = try patternFile(kernel, pages: 2)
            let size = file.size
            let cached = file.cachedPageCount
            var buf = [UInt8](repeating: 0x5A, count: 16)
            try buf.withUnsafeMutableBytes { b throws in
                #expect(throws: Errno.invalidArgument) { try file.pread(into: b, offset: -1) }
                #expect(throws: Errno.invalidArgument) { try file.pread(into: b, offset: Int64.max - 4) }
                #expect(throws: Errno.invalidArgument) { try file.pwrite(from: UnsafeRawBufferPointer(b), offset: -4096) }
                #expect(throws: Errno.invalidArgument) { try file.pwrite(from: UnsafeRawBufferPointer(b), offset: Int64.max) }
                #expect(throws: Errno.fileTooLarge) { try file.pwrite(from: UnsafeRawBufferPointer(b), offset: File.maxSize) }
                // At or past the end a read is empty, not an error.
                #expect(try file.pread(into: b, offset: size) == 0)
                #expect(try file.pread(into: b, offset: size + 12_345) == 0)
            }
            #expect(buf.allSatisfy { $0 == 0x5A })
            #expect(throws: Errno.invalidArgument) { try file.truncate(to: -1) }
            #expect(throws: Errno.fileTooLarge) { try file.truncate(to: File.maxSize + 1) }
            #expect(throws: Errno.invalidArgument) { try mm.mmap(length: pageSize, shared: true, file: file, offset: 100) }
            #expect(throws: Errno.invalidArgument) { try mm.mmap(length: pageSize, shared: true, file: file, offset: -4096) }
            #expect(throws: Errno.invalidArgument) { try mm.mmap(length: 0, shared: true, file: file) }
            #expect(mm.mappings.isEmpty)
            #expect(file.size == size)
            #expect(file.cachedPageCount == cached)
            var word: UInt64 = 0
            #expect(try withUnsafeMutableBytes(of: &word) { try file.pread(into: $0, offset: 4096 + 8) } == 8)
            #expect(word == fileWord(4096 + 8))

            // A touch past the end of the file is SIGBUS; the entry stays none.
            let a = try mm.mmap(length: 4 * pageSize, protection: .readWrite, shared: true, file: file)
            #expect(throws: Errno.ioError) { _ = try mm.load(a + 2 * UInt64(pageSize)) }
            #expect(throws: Errno.ioError) { try mm.store(a + 3 * UInt64(pageSize), 1) }
            #expect(mm.entry(at: a + 2 * UInt64(pageSize)).entry.isNone)
            #expect(file.cachedPageCount == cached)
            try mm.munmap(a, length: 4 * pageSize)
            #expect(onlyCacheReferences(file, pages: 2))
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("munmap, MADV_DONTNEED, fork and exit of file mappings give every reference back: the cache keeps one per page, copies are freed")
    func zapLeavesNoReference() throws {
        try withMachine { kernel, mm, _ in
            let pages = 8
            let freeAtStart = kernel.freePages
            var file: File? = try patternFile(kernel, pages: pages)
            let cacheFree = kernel.freePages
            #expect(cacheFree == freeAtStart - UInt64(pages))
            let length = pages * pageSize
            let shared = try mm.mmap(length: length, protection: .readWrite, shared: true, file: file!)
            let priv = try mm.mmap(length: length, protection: .readWrite, shared: false, file: file!)
            // Shared: read all, write the first half (the cache folios are
            // written in place). Private: read all, write the second half
            // (four copies).
            for p in 0..<pages {
                _ = try mm.load(shared + UInt64(p * pageSize))
                _ = try mm.load(priv + UInt64(p * pageSize))
            }
            for p in 0..<(pages / 2) { try mm.store64(shared + UInt64(p * pageSize), 7) }
            for p in (pages / 2)..<pages { try mm.store64(priv + UInt64(p * pageSize), 9) }
            #expect(kernel.freePages == cacheFree - UInt64(pages / 2))
            let f0 = try #require(file!.cachedFolio(at: 0))
            #expect(f0.refCount == 3 && f0.mapCount == 2)  // cache + two mappings
            #expect(f0.isDirty)

            // A child shares both; its exit gives its references back.
            var child: AddressSpace? = try mm.fork()
            #expect(f0.refCount == 5 && f0.mapCount == 4)
            try child!.store64(shared + 8, 42)  // shared: seen by the parent and the file
            #expect(try mm.load64(shared + 8) == 42)
            child = nil
            #expect(f0.refCount == 3 && f0.mapCount == 2)

            try mm.madvise(priv, length: length, advice: .dontNeed)
            #expect(kernel.freePages == cacheFree)
            #expect(f0.refCount == 2 && f0.mapCount == 1)
            // The private view faults the file again: the shared stores show.
            #expect(try mm.load64(priv + 8) == 42)
            try mm.munmap(shared, length: length)
            try mm.munmap(priv, length: length)
            #expect(onlyCacheReferences(file!, pages: pages))
            #expect(kernel.freePages == cacheFree)

            // Truncating to nothing, or dropping the file, frees the cache.
            try file!.truncate(to: Int64(pageSize))
            #expect(kernel.freePages == cacheFree + UInt64(pages - 1))
            file = nil
            #expect(kernel.freePages == freeAtStart)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("ftruncate of a mapped file unmaps the pages past the new end; touching them is SIGBUS, the rest stays")
    func truncateUnmapsMappedPages() throws {
        try withMachine { kernel, mm, _ in
            let pages = 4
            let file = try patternFile(kernel, pages: pages)
            let a = try mm.mmap(length: pages * pageSize, protection: .read, shared: true, file: file)
            for p in 0..<pages { _ = try mm.load(a + UInt64(p * pageSize)) }
            let last = try #require(file.cachedFolio(at: 3))
            #expect(last.mapCount == 1)
            try file.truncate(to: Int64(2 * pageSize + 100))
            #expect(mm.entry(at: a + 3 * UInt64(pageSize)).entry.isNone)
            #expect(throws: Errno.ioError) { _ = try mm.load(a + 3 * UInt64(pageSize)) }
            // The partial page keeps its head and reads zero past the end.
            #expect(try mm.load64(a + 2 * UInt64(pageSize) + 8) == fileWord(2 * pageSize + 8))
            #expect(try mm.load64(a + 2 * UInt64(pageSize) + 200) == 0)
            #expect(try mm.load64(a + 8) == fileWord(8))
            try mm.munmap(a, length: pages * pageSize)
            #expect(onlyCacheReferences(file, pages: 3))
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("migrate_vma of a MAP_SHARED file mapping collects the page-cache folios, refuses to move them to the device, and maps them back")
    func sharedFileMappingStaysInSystemMemory() throws {
        try withMachine { kernel, mm, device in
            let pages = 8
            let file = try patternFile(kernel, pages: pages)
            let a = try mm.mmap(length: pages * pageSize, protection: .readWrite, shared: true, file: file)
            for p in 0..<pages { try mm.store64(a + UInt64(p * pageSize), UInt64(p)) }
            // By hand: collect takes every page-cache folio (it has a
            // mapping) and leaves migration entries; no holes in a file VMA.
            mm.mmapReadLock()
            var args = MigrateVMA(vma: mm.vma(containing: a), start: a, end: a + UInt64(pages * pageSize), flags: .system)
            try kernel.migrateVMASetup(&args)
            #expect(args.cpages == pages)
            for p in 0..<pages {
                #expect(args.src[p].isMigrating && args.src[p].pfn == file.cachedFolio(at: UInt64(p))?.pfn)
                #expect(mm.entry(at: a + UInt64(p * pageSize)).entry.kind == .migration)
            }
            kernel.migrateVMAPages(&args)
            kernel.migrateVMAFinalize(&args)
            mm.mmapReadUnlock()
            // The driver: the device destination needs an anonymous source.
            #expect(throws: Errno.noEntry) { try device.migrateToDevice(a, pages: pages) }
            for p in 0..<pages {
                let folio = try #require(file.cachedFolio(at: UInt64(p)))
                #expect(mm.entry(at: a + UInt64(p * pageSize)).entry.pfn == folio.pfn)
                #expect(folio.refCount == 2 && folio.mapCount == 1)
                #expect(try mm.load64(a + UInt64(p * pageSize)) == UInt64(p))
            }
            #expect(device.devicePagesInUse == 0)
            try mm.munmap(a, length: pages * pageSize)
            #expect(onlyCacheReferences(file, pages: pages))
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("migrate_vma in a MAP_PRIVATE file mapping: holes give 0, page-cache pages are collected but stay, the anonymous copies move to the device")
    func privateFileMappingMigratesOnlyCopies() throws {
        try withMachine { kernel, mm, device in
            let pages = 8
            let file = try patternFile(kernel, pages: pages)
            let a = try mm.mmap(length: pages * pageSize, protection: .readWrite, shared: false, file: file)
            for p in 0..<4 { try mm.store64(a + UInt64(p * pageSize), UInt64(100 + p)) }
            for p in 4..<6 { _ = try mm.load(a + UInt64(p * pageSize)) }

            mm.mmapReadLock()
            var args = MigrateVMA(vma: mm.vma(containing: a), start: a, end: a + UInt64(pages * pageSize), flags: .system)
            try kernel.migrateVMASetup(&args)
            #expect(args.cpages == 6)
            #expect(args.src[0..<6].allSatisfy { $0.isMigrating && $0.pfn != 0 })
            #expect(args.src[6..<8].allSatisfy { $0 == .empty })
            kernel.migrateVMAPages(&args)
            kernel.migrateVMAFinalize(&args)
            mm.mmapReadUnlock()

            #expect(throws: Errno.noEntry) { try device.migrateToDevice(a, pages: pages) }
            #expect(device.devicePagesInUse == 4)
            for p in 0..<pages {
                let e = mm.entry(at: a + UInt64(p * pageSize)).entry
                switch p {
                case 0..<4: #expect(e.kind == .devicePrivate)
                case 4..<6: #expect(e.kind == .present && e.pfn == file.cachedFolio(at: UInt64(p))?.pfn)
                default: #expect(e.isNone)
                }
            }
            // Back from the device on a CPU read; the file is untouched.
            #expect(try mm.load64(a + 8) == fileWord(8))
            #expect(try mm.load64(a) == 100)
            try mm.munmap(a, length: pages * pageSize)
            #expect(device.devicePagesInUse == 0)
            #expect(onlyCacheReferences(file, pages: pages))
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("pins of file pages: a shared mapping and a short pin of a private one pin the page-cache folio; a FOLL_LONGTERM pin in a private writable mapping unshares it first")
    func pinsOfFilePages() throws {
        try withMachine { kernel, mm, _ in
            let file = try patternFile(kernel, pages: 2)
            let cache0 = try #require(file.cachedFolio(at: 0))
            let shared = try mm.mmap(length: 2 * pageSize, protection: .readWrite, shared: true, file: file)
            let priv = try mm.mmap(length: 2 * pageSize, protection: .readWrite, shared: false, file: file)
            _ = try mm.load(priv)
            _ = try mm.load(priv + UInt64(pageSize))

            let p1 = try mm.pinUserPagesFast(shared, count: 1, flags: .longterm)
            #expect(p1.first?.folio == cache0)
            let p2 = try mm.pinUserPagesFast(priv, count: 1)
            #expect(p2.first?.folio == cache0)
            #expect(cache0.isMaybeDMAPinned)
            // gup_must_unshare(): the private mapping gets its own copy to pin.
            let p3 = try mm.pinUserPagesFast(priv + UInt64(pageSize), count: 1, flags: .longterm)
            let copy = try #require(p3.first?.folio)
            #expect(copy.isAnon && copy != file.cachedFolio(at: 1))
            #expect(mm.entry(at: priv + UInt64(pageSize)).entry.pfn == copy.pfn)
            #expect(try mm.load64(priv + UInt64(pageSize) + 8) == fileWord(pageSize + 8))
            for p in p1 + p2 + p3 { kernel.unpinUserPage(p) }
            #expect(!cache0.isMaybeDMAPinned)
            try mm.munmap(shared, length: 2 * pageSize)
            try mm.munmap(priv, length: 2 * pageSize)
            #expect(onlyCacheReferences(file, pages: 2))
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    @Test("vm_insert_page refuses anonymous pages, addresses outside the VMA and occupied entries; a private mixed map copies on write")
    func insertPageRules() throws {
        try withMachine { kernel, mm, device in
            let anon = try mm.mmap(length: pageSize)
            try mm.store(anon, 1)
            let anonPage = try #require(kernel.page(pfn: mm.entry(at: anon).entry.pfn))
            var seen: [Errno] = []
            let a = try mm.mmap(length: 2 * pageSize, protection: .readWrite, shared: false) { vma throws(Errno) in
                guard let folio = kernel.allocateFolio(order: 0, zeroed: true) else { throw .noMemory }
                defer { folio.put() }
                for (page, address) in [(anonPage, vma.start), (folio.page(0), vma.end), (folio.page(0), vma.start),
                                        (folio.page(0), vma.start)] {
                    do throws(Errno) { try mm.insertPage(page, at: address, in: vma) } catch { seen.append(error) }
                }
            }
            #expect(seen == [.invalidArgument, .badAddress, .busy])
            let vma = try #require(mm.mappings.first { $0.contains(a) })
            #expect(vma.flags.contains(.mixedMap))
            // migrate_vma_setup refuses VM_MIXEDMAP (VM_SPECIAL).
            #expect(throws: Errno.invalidArgument) { try device.migrateToDevice(a, pages: 1) }
            let inserted = mm.entry(at: a).entry
            #expect(inserted.kind == .present && !inserted.isWrite)
            try mm.store(a, 5)
            #expect(mm.entry(at: a).entry.pfn != inserted.pfn)
            #expect(kernel.page(pfn: inserted.pfn)?.folio.refCount == 0)  // the copy replaced the only mapping
            try mm.munmap(a, length: 2 * pageSize)
            #expect(kernel.diagnostics.isEmpty)
        }
    }
}
