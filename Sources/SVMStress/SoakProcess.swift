import MirrorDriver
import SVMEmu

// The process thread's address-space changes, each through the public
// system-call API, each moving the shadow model with it.
extension SoakState {

    /// A range for a change: 1-8 pages of the small region, or in a THP
    /// region the whole 2 MiB (half the time) or 1-64 pages of it.
    func pickRange(_ r: UInt64) -> Range<Int> {
        if hugeRegions > 0 && r & 1 == 1 {
            let first = smallPages + Int((r >> 1) % UInt64(hugeRegions)) * PageGeometry.pmdPages
            if r & 2 == 0 { return first..<(first + PageGeometry.pmdPages) }
            let n = 1 + Int((r >> 8) % 64)
            let off = Int((r >> 20) % UInt64(PageGeometry.pmdPages - n + 1))
            return (first + off)..<(first + off + n)
        }
        let n = min(smallPages, 1 + Int((r >> 8) % 8))
        let off = Int((r >> 20) % UInt64(smallPages - n + 1))
        return off..<(off + n)
    }

    /// A change of `pages` starts: accesses that overlap it are judged by `kind`.
    func begin(_ pages: Range<Int>, _ kind: UInt8) {
        for p in pages { busy[p] = kind; gen[p] &+= 1 }
    }
    /// The change of `pages` is over and the shadow follows it.
    func end(_ pages: Range<Int>) {
        for p in pages { busy[p] = 0; gen[p] &+= 1 }
    }

    func span(_ pages: Range<Int>) -> (UInt64, Int) {
        (address(ofPage: pages.lowerBound), pages.count << PageGeometry.pageShift)
    }

    /// A call the model says cannot fail failed.
    func unexpected(_ what: String, _ error: Errno) {
        accessErrors += 1
        note("operation \(operations): \(what) failed: \(error)")
    }

    /// munmap, then mmap of the hole (MADV_HUGEPAGE again in a THP region):
    /// the range reads as zeroes.
    func munmapAndRemap(_ r: UInt64) {
        let range = pickRange(r)
        let (a, len) = span(range)
        begin(range, SoakState.zeroing)
        defer { end(range) }
        do { try mm.munmap(a, length: len) } catch { return unexpected("munmap", error) }
        zeroShadow(range)
        for p in range { readOnly[p] = false }
        do {
            try mm.mmap(address: a, length: len)
            if range.lowerBound >= smallPages { try mm.madvise(a, length: len, advice: .hugePage) }
        } catch { return unexpected("mmap of the hole", error) }
        munmaps += 1
    }

    func zeroShadow(_ range: Range<Int>) {
        for p in range {
            let w0 = p * SoakState.wordsPerPage
            for i in 0..<SoakState.wordsPerPage { shadow[w0 + i] = 0 }
        }
    }

    /// mprotect read-only (a third of the time) or read-write: writes to a
    /// read-only page must fail with `.permissionDenied`.
    func protect(_ r: UInt64) {
        let range = pickRange(r)
        let (a, len) = span(range)
        let ro = (r >> 40) % 3 == 0
        begin(range, SoakState.reshaping)
        defer { end(range) }
        do { try mm.mprotect(a, length: len, protection: ro ? .read : .readWrite) } catch { return unexpected("mprotect", error) }
        for p in range { readOnly[p] = ro }
        mprotects += 1
    }

    /// MADV_DONTNEED (half the time: the range reads as zeroes), or
    /// MADV_HUGEPAGE or MADV_COLLAPSE of a whole THP region (data kept;
    /// a collapse may refuse with `.tryAgain` or `.noMemory`).
    func advise(_ r: UInt64) {
        let choice = (r >> 40) % 4
        if choice >= 2 && hugeRegions > 0 {
            let a = huge + ((r >> 1) % UInt64(hugeRegions)) << PageGeometry.pmdShift
            do { try mm.madvise(a, length: PageGeometry.pmdSize, advice: choice == 2 ? .hugePage : .collapse) } catch {
                if choice == 2 || !(error == .tryAgain || error == .noMemory || error == .invalidArgument) {
                    return unexpected("madvise", error)
                }
            }
            madvises += 1
            return
        }
        let range = pickRange(r)
        let (a, len) = span(range)
        begin(range, SoakState.zeroing)
        defer { end(range) }
        do { try mm.madvise(a, length: len, advice: .dontNeed) } catch { return unexpected("MADV_DONTNEED", error) }
        zeroShadow(range)
        madvises += 1
    }

    /// mremap of a range to the scratch area and back (MREMAP_FIXED): the
    /// data follows. A range across VMAs is refused (`.badAddress`) and stays.
    func remapAndBack(_ r: UInt64) {
        let range = pickRange(r)
        let (a, len) = span(range)
        let offset = a & ~PageGeometry.pmdMask
        let target = offset + UInt64(len) <= PageGeometry.pmdSize64 ? scratch + offset : scratch
        begin(range, SoakState.reshaping)
        defer { end(range) }
        do { try mm.mremap(a, oldLength: len, newLength: len, flags: [.mayMove, .fixed], newAddress: target) } catch {
            if error != .badAddress { unexpected("mremap away", error) }
            return
        }
        do { try mm.mremap(target, oldLength: len, newLength: len, flags: [.mayMove, .fixed], newAddress: a) } catch {
            return unexpected("mremap back", error)
        }
        mremaps += 1
    }

    /// Swaps two ranges of the same length in the same region (the small
    /// one, or the THP regions) with three MREMAP_FIXED moves: the first to
    /// the scratch area, the second into the first's place, then the first
    /// into the second's. The data and the protection follow; each range's
    /// VMA now keeps the other's `vm_pgoff`, so the folios a forked child
    /// still maps at their old addresses are found there, and the parent's
    /// at their new ones, by every later rmap walk. A first range across
    /// VMAs is refused (`.badAddress`) and nothing changes; a second one
    /// sends the first back. Without a second range that fits, the first
    /// moves away and back (`remapAndBack`).
    func swapRanges(_ r: UInt64) {
        let range = pickRange(r)
        guard let other = partner(of: range, r) else { return remapAndBack(r) }
        let (a, len) = span(range)
        let (b, _) = span(other)
        let offset = a & ~PageGeometry.pmdMask
        let target = offset + UInt64(len) <= PageGeometry.pmdSize64 ? scratch + offset : scratch
        let move = { (from: UInt64, to: UInt64) throws(Errno) in
            _ = try self.mm.mremap(from, oldLength: len, newLength: len, flags: [.mayMove, .fixed], newAddress: to)
        }
        for (p, q) in zip(range, other) { partner[p] = q; partner[q] = p }
        begin(range, SoakState.swapping)
        begin(other, SoakState.swapping)
        for p in range { swaps[p] &+= 1 }
        for p in other { swaps[p] &+= 1 }
        defer {
            for p in range { swaps[p] &+= 1 }
            for p in other { swaps[p] &+= 1 }
            end(range)
            end(other)
        }
        do { try move(a, target) } catch {
            if error != .badAddress { unexpected("mremap away", error) }
            return
        }
        do { try move(b, a) } catch {
            if error != .badAddress { unexpected("mremap into the first range", error) }
            do { try move(target, a) } catch { unexpected("mremap back", error) }
            mremaps += 1
            return
        }
        do { try move(target, b) } catch { return unexpected("mremap into the second range", error) }
        for (p, q) in zip(range, other) { swapModel(p, q) }
        mremaps += 1
    }

    /// A range of `range`'s length in the same region, not overlapping it,
    /// or nil.
    private func partner(of range: Range<Int>, _ r: UInt64) -> Range<Int>? {
        let n = range.count
        let huge = range.lowerBound >= smallPages
        let first = huge ? smallPages : 0
        let regions = huge ? hugeRegions : 1
        let regionPages = huge ? PageGeometry.pmdPages : smallPages
        guard n <= regionPages else { return nil }
        for attempt in 0..<UInt64(4) {
            let x = (r >> 45) &+ attempt &* 0x9E37_79B9
            let region = Int(x % UInt64(regions))
            let off = Int((x >> 8) % UInt64(regionPages - n + 1))
            let start = first + region * regionPages + off
            let candidate = start..<(start + n)
            if !candidate.overlaps(range) { return candidate }
        }
        return nil
    }

    /// Pages `p` and `q` traded places: their shadows, read-only states
    /// and unknown words follow. A GPU word is unknown on both sides when
    /// it was on either: a GPU store that overlapped the swap may have
    /// landed in either page.
    private func swapModel(_ p: Int, _ q: Int) {
        swap(&readOnly[p], &readOnly[q])
        let wp = p * SoakState.wordsPerPage, wq = q * SoakState.wordsPerPage
        for i in 0..<SoakState.wordsPerPage {
            swap(&shadow[wp + i], &shadow[wq + i])
            if i & 7 == 7 {
                let u = unknown[wp + i] || unknown[wq + i]
                unknown[wp + i] = u
                unknown[wq + i] = u
            } else {
                swap(&unknown[wp + i], &unknown[wq + i])
            }
        }
    }

    /// Without a child, fork one (it gets a copy of the shadow); with one,
    /// access it (checked against its own shadow) or now and then release it.
    func forkOrChild(_ r: UInt64, _ value: UInt64) {
        guard let c = child else {
            let all = 0..<pages
            begin(all, SoakState.forking)
            defer { end(all) }
            do { child = try mm.fork() } catch { return unexpected("fork", error) }
            childShadow.update(from: shadow, count: words)
            childUnknown.update(from: unknown, count: words)
            childReadOnly.update(from: readOnly, count: pages)
            forks += 1
            return
        }
        if (r >> 40) % 64 == 0 { child = nil; return }   // exit_mmap on this thread
        let w = Int((r >> 8) % UInt64(words))
        let write = r & 1 == 1
        let p = w / SoakState.wordsPerPage
        let (model, unknown, ro) = (childShadow, childUnknown, childReadOnly[p])
        do {
            let bad: Int = try c.withPageBytes(at: address(ofWord: w), write: write) { b in
                if write {
                    b.storeBytes(of: value, as: UInt64.self)
                    model[w] = value
                    unknown[w] = false
                    return ro ? -1 : 0
                }
                let v = b.load(as: UInt64.self)
                return unknown[w] || v == model[w] ? 0 : Soak.differingBytes(v, model[w])
            }
            childAccesses += 1
            if bad == -1 { unexpected("child write to read-only 0x\(String(address(ofWord: w), radix: 16)) did not", .notPermitted) }
            else if bad > 0 {
                corrupted += bad
                note("operation \(operations): child read of 0x\(String(address(ofWord: w), radix: 16)) differs in \(bad) bytes")
            }
        } catch {
            childAccesses += 1
            if write && ro && error == .permissionDenied { writesRefused += 1 } else { unexpected("child access", error) }
        }
    }

    /// move_pages of 1-16 random pages to random nodes, or (one time in
    /// sixteen) migrate_pages of everything from one node to the other.
    func movePages(_ r: UInt64, _ rng: inout SplitMix64) {
        if (r >> 40) % 16 == 0 {
            let from = Int(r & 1)
            _ = try? mm.migratePages(from: [from], to: [1 - from])
            return
        }
        let k = 1 + Int((r >> 8) % 16)
        var addresses: [UInt64] = [], nodes: [Int] = []
        for _ in 0..<k {
            let x = rng.next()
            addresses.append(address(ofPage: Int((x >> 8) % UInt64(pages))))
            nodes.append(Int(x & 1))
        }
        var status: [PageStatus] = []
        _ = try? mm.movePages(addresses, nodes: nodes, status: &status)
        for (i, s) in status.enumerated() where s == .node(nodes[i]) { pagesMoved += 1 }
    }
}
