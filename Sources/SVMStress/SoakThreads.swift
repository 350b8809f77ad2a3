import MirrorDriver
import SVMEmu

/// One operation a soak thread can draw, with its weight.
enum SoakOp {
    case cpuAccess, gpuAccess, migrate, migrateHuge, evict
    case munmap, mprotect, madvise, mremap, fork, movePages
}

/// A thread's operations by weight: a draw picks one in proportion.
struct SoakOpTable {
    private var ops: [(limit: UInt64, op: SoakOp)] = []
    private var total: UInt64 = 0

    init(_ entries: [(UInt64, SoakOp, Bool)]) {
        for (w, op, on) in entries where on && w > 0 {
            total += w
            ops.append((total, op))
        }
        if ops.isEmpty { ops = [(1, .cpuAccess)]; total = 1 }
    }

    func pick(_ r: UInt64) -> SoakOp {
        let x = r % total
        for e in ops where x < e.limit { return e.op }
        return .cpuAccess
    }
}

// The three kinds of soak thread: CPUs, the GPU, the process.
extension SoakState {

    func cpuLoop(seed: UInt64) {
        var rng = SplitMix64(state: seed)
        while claim() { cpuAccess(rng.next(), rng.next()) }
        exit()
    }

    func gpuLoop(seed: UInt64) {
        var rng = SplitMix64(state: seed)
        let m = settings.mix
        let table = SoakOpTable([
            (350, .gpuAccess, m.contains(.gpu)), (600, .migrate, m.contains(.migrate)),
            (40, .migrateHuge, hugeRegions > 0), (1, .evict, m.contains(.evict)),
        ])
        while claim() {
            let r = rng.next()
            if settings.plantedLeak == .reference && !planted && operations >= settings.operations / 2 { plantLeak() }
            switch table.pick(r >> 40) {
            case .gpuAccess: gpuAccess(r, rng.next())
            case .migrate:
                // Half in the small region, half anywhere (splitting THPs).
                migrate(page: Int((r >> 8) % UInt64(r & 2 == 0 ? smallPages : pages)), toDevice: r & 1 == 0)
            case .migrateHuge: migrateHuge(region: Int((r >> 8) % UInt64(hugeRegions)), toDevice: r & 1 == 0)
            case .evict: evictions += driver.evictAll()
            default: cpuAccess(r, rng.next())
            }
        }
        exit()
    }

    func processLoop(seed: UInt64) {
        var rng = SplitMix64(state: seed)
        let m = settings.mix
        let table = SoakOpTable([
            (1000, .cpuAccess, true), (6, .munmap, m.contains(.munmap)), (12, .mprotect, m.contains(.mprotect)),
            (10, .madvise, m.contains(.madvise)), (6, .mremap, m.contains(.mremap)), (30, .fork, m.contains(.fork)),
            (10, .movePages, m.contains(.movePages)),
        ])
        while claim() {
            let r = rng.next()
            switch table.pick(r >> 40) {
            case .munmap: munmapAndRemap(r)
            case .mprotect: protect(r)
            case .madvise: advise(r)
            case .mremap: if (r >> 44) & 1 == 1 { swapRanges(r) } else { remapAndBack(r) }
            case .fork: forkOrChild(r, rng.next())
            case .movePages: movePages(r, &rng)
            default: cpuAccess(r, rng.next())
            }
        }
        exit()
    }

    // MARK: accesses

    /// A CPU load or store of one word, checked against the shadow inside
    /// the access (no scheduling point between the bytes and the shadow).
    func cpuAccess(_ r: UInt64, _ value: UInt64) {
        let w = Int((r >> 8) % UInt64(words))
        let write = r & 1 == 1 && w & 7 != 7   // every eighth word is the GPU's
        let p = w / SoakState.wordsPerPage
        let g0 = gen[p]
        let (shadow, unknown, busy, gen, readOnly) = (self.shadow, self.unknown, self.busy, self.gen, self.readOnly)
        let swapped = { (v: UInt64, w: Int) in self.swappedIn(v, word: w) }
        do {
            let outcome: Int? = try mm.withPageBytes(at: address(ofWord: w), write: write, faultLimit: SoakState.faultLimit) { b in
                let kind = busy[p]
                if write {
                    if kind == SoakState.zeroing || kind == SoakState.forking || kind == SoakState.swapping { return -2 }
                    let violation = readOnly[p] && kind == 0 && gen[p] == g0
                    b.storeBytes(of: value, as: UInt64.self)
                    shadow[w] = value
                    return violation ? -1 : 0
                }
                let v = b.load(as: UInt64.self)
                if unknown[w] || v == shadow[w] { return 0 }
                if kind == SoakState.zeroing && v == 0 || kind == SoakState.swapping && swapped(v, w) { return -2 }
                return Soak.differingBytes(v, shadow[w])
            }
            if write { writes += 1 } else { reads += 1 }
            guard let outcome else { return stuck("CPU", address(ofWord: w), write: write) }
            switch outcome {
            case -2: raced += 1
            case -1:
                accessErrors += 1
                note("operation \(operations): a write to read-only 0x\(String(address(ofWord: w), radix: 16)) succeeded")
            case 0: break
            default:
                corrupted += outcome
                note("operation \(operations): CPU read of 0x\(String(address(ofWord: w), radix: 16)) differs in \(outcome) bytes")
            }
        } catch {
            accessFailed(error, page: p, g0: g0, write: write, what: "CPU", address(ofWord: w))
        }
    }

    /// An access that faulted `faultLimit` times without progress: a
    /// livelock or an entry nothing will resolve. The soak stops.
    func stuck(_ what: String, _ address: UInt64, write: Bool) {
        accessErrors += 1
        stopped = true   // whatever holds it will hold every other access to it too
        let (level, e) = mm.entry(at: address)
        let folio = (e.kind == .present || e.kind == .devicePrivate || e.kind == .migration) ? kernel.page(pfn: e.pfn)?.folio : nil
        note("operation \(operations): a \(what) \(write ? "write" : "read") of 0x\(String(address, radix: 16)) faulted \(SoakState.faultLimit) times; \(level) entry \(e)\(folio.map { ", \($0), flags \($0.flags)" } ?? "")")
    }

    /// A failed access: legitimate when a change of its page overlapped it,
    /// or for a write to a read-only page (with the error the API names).
    func accessFailed(_ error: Errno, page p: Int, g0: UInt32, write: Bool, what: String, _ address: UInt64) {
        if gen[p] != g0 || busy[p] != 0 {
            raced += 1
        } else if write && readOnly[p] && (error == .permissionDenied || error == .notPermitted) {
            writesRefused += 1
        } else {
            accessErrors += 1
            note("operation \(operations): \(what) \(write ? "write" : "read") of 0x\(String(address, radix: 16)) failed: \(error)")
        }
    }

    /// A GPU load or store of one of the GPU's words through the device
    /// page table (a GPU fault on a miss).
    func gpuAccess(_ r: UInt64, _ value: UInt64) {
        var w = Int((r >> 8) % UInt64(words)) | 7
        if w >= words { w -= 8 }
        let write = r & 1 == 1
        let p = w / SoakState.wordsPerPage
        let g0 = gen[p], s0 = swaps[p]
        let a = address(ofWord: w)
        var v = value
        do throws(Errno) {
            if write {
                let wasUnknown = unknown[w]
                unknown[w] = true   // until the store is known to have landed
                do {
                    try withUnsafeBytes(of: &v) { (b) throws(Errno) in try driver.write(a, from: b) }
                } catch {
                    // A swap meanwhile moved the word's flag (see swapRanges).
                    if swaps[p] == s0 { unknown[w] = wasUnknown }
                    throw error
                }
                gpuWrites += 1
                if gen[p] != g0 || busy[p] != 0 { raced += 1; return }   // stays unknown
                if readOnly[p] {
                    accessErrors += 1
                    note("operation \(operations): a GPU write to read-only 0x\(String(a, radix: 16)) succeeded")
                }
                shadow[w] = value
                unknown[w] = false
            } else {
                try withUnsafeMutableBytes(of: &v) { (b) throws(Errno) in try driver.read(a, into: b) }
                gpuReads += 1
                guard !unknown[w], v != shadow[w] else { return }
                // A read that overlapped a change of its page: zero (a zap), the
                // old value, whatever a swap's two ends held (swaps moved), or,
                // inside one swap, the partner's word (the GPU faulted the
                // range in after mremap moved the partner there).
                if gen[p] != g0 || busy[p] != 0,
                   v == 0 || v == shadow[w] || swaps[p] != s0
                    || busy[p] == SoakState.swapping && swappedIn(v, word: w) { raced += 1; return }
                corrupted += Soak.differingBytes(v, shadow[w])
                note("operation \(operations): GPU read of 0x\(String(a, radix: 16)) gave 0x\(String(v, radix: 16)), shadow 0x\(String(shadow[w], radix: 16))")
            }
        } catch {
            accessFailed(error, page: p, g0: g0, write: write, what: "GPU", a)
        }
    }

    // MARK: migrations

    func migrate(page p: Int, toDevice: Bool) {
        let a = address(ofPage: p)
        if toDevice { self.toDevice += (try? driver.migrateToDevice(a, pages: 1)) ?? 0 }
        else { toSystem += (try? driver.migrateToSystem(a, pages: 1)) ?? 0 }
    }

    /// One 2 MiB region to device memory or back with SELECT_COMPOUND.
    func migrateHuge(region i: Int, toDevice: Bool) {
        let a = huge + UInt64(i) << PageGeometry.pmdShift
        let n = driver.migrateHuge(a, toDevice: toDevice)
        if toDevice { self.toDevice += n } else { toSystem += n }
        if n == PageGeometry.pmdPages { hugeMigrations += 1 }
    }

    /// The planted leak: one reference on a mapped folio that nothing drops.
    func plantLeak() {
        planted = true
        for p in 0..<pages {
            let e = mm.entry(at: address(ofPage: p)).entry
            guard e.kind == .present, !e.isSpecial, let page = kernel.page(pfn: e.pfn) else { continue }
            page.folio.get()
            return
        }
    }
}
