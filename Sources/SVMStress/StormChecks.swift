// What a storm checks: the bytes before and after, the picture of a stalled
// page, what teardown left behind.
import Foundation
import SVMEmu

extension StormRun {

    /// Checksums of `basePages` 4 KiB pages from `base`, read through the CPU
    /// access path (no fault expected: the pages were just written).
    static func checksums(_ mm: AddressSpace, _ base: UInt64, basePages: Int) throws(Errno) -> [UInt64] {
        var sums = [UInt64](repeating: 0, count: basePages)
        for i in 0..<basePages {
            sums[i] = try mm.withPageBytes(at: base + UInt64(i) << PageGeometry.pageShift, write: false) { checksum($0) }
        }
        return sums
    }

    static func checksum(_ p: UnsafeMutableRawPointer) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for w in 0..<PageGeometry.pageSize / 8 {
            h = (h ^ p.load(fromByteOffset: w << 3, as: UInt64.self)) &* 0x0000_0100_0000_01b3
        }
        return h
    }

    /// Reads every 4 KiB back (at most `limit` faults each) and compares it
    /// with the checksum taken before the storm.
    func verifyChecksums(limit: Int = 2000) -> (Bool, [String]) {
        var problems: [String] = []
        var stuck = 0
        for (i, expected) in checksums.enumerated() {
            let address = base + UInt64(i) << PageGeometry.pageShift
            let page = i / basePages
            do {
                guard let sum = try mm.withPageBytes(at: address, write: false, faultLimit: limit, { StormRun.checksum($0) }) else {
                    problems.append("data: page \(page) (0x\(String(address, radix: 16))) did not come back to RAM in \(limit) faults after the storm")
                    stuck += 1
                    if stuck >= 3 { problems.append("data: check abandoned"); break }
                    continue
                }
                if sum != expected {
                    problems.append("data: page \(page) (0x\(String(address, radix: 16))) differs from the bytes written before the storm")
                    if problems.count >= 8 { break }
                }
            } catch {
                problems.append("data: reading page \(page) after the storm failed: \(error)")
                break
            }
        }
        return (problems.isEmpty, problems)
    }

    /// Samples the stalled page and the threads a few times over ~20 ms and
    /// keeps the sample with the most references beyond the page's mappings.
    func sampleStall(page: Int, quietNanos: UInt64, calls0: Int) -> StallReport {
        let address = address(ofPage: page)
        var best: StallReport? = nil
        for _ in 0..<20 {
            let e = mm.entry(at: address).entry
            var ref: Int? = nil, map: Int? = nil, locked: Bool? = nil
            if e.kind == .present || e.kind == .devicePrivate || e.kind == .migration {
                let folio = kernel.pfnToPage(e.pfn).folio
                ref = folio.refCount
                map = folio.mapCount
                locked = folio.isLocked
            }
            var accessing = 0, atBarrier = 0
            for s in slots {
                switch s.state.load(ordering: .relaxed) {
                case WorkerSlot.accessing: accessing += 1
                case WorkerSlot.atBarrier: atBarrier += 1
                default: break
                }
            }
            let probes = drivers.compactMap(\.driverLockProbe)
            let waiting = probes.isEmpty ? nil : probes.reduce(0) { $0 + $1.waiting }
            let holding = probes.isEmpty ? nil : probes.reduce(0) { $0 + $1.holding }
            let extra = ref.flatMap { r in map.map { r - $0 } }
            let sample = StallReport(
                page: page, address: address, secondsWithoutProgress: Double(quietNanos) / 1e9,
                entryKind: "\(e.kind)", refCount: ref, mapCount: map, referencesBeyondMappings: extra,
                folioLocked: locked, threadsAccessing: accessing, threadsAtBarrier: atBarrier,
                driverLockWaiting: waiting, driverLockHolding: holding,
                migrateToRAMCallsOnPage: totalCalls - pageStartCalls.load(ordering: .relaxed),
                faultRetriesOnPage: totalRetries - pageStartRetries.load(ordering: .relaxed), summary: "")
            if best == nil || (extra ?? -1, waiting ?? 0) > (best!.referencesBeyondMappings ?? -1, best!.driverLockWaiting ?? 0) {
                best = sample
            }
            HostClock.sleep(nanos: 1_000_000)
        }
        var r = best!
        r.summary = StallReport.describe(r)
        return r
    }

    /// What teardown left behind: threads that did not leave, driver locks
    /// still held, pages whose folio is locked or holds references no mapping
    /// explains, leftover migration entries, kernel warnings.
    func teardownIssues(threadsLeft: Int) -> [String] {
        var issues: [String] = []
        if threadsLeft < workers {
            issues.append("\(workers - threadsLeft) of \(workers) storm threads did not leave within \(settings.joinTimeoutSeconds) s")
            return issues  // the pages are still in use: nothing more can be judged
        }
        for (i, d) in drivers.enumerated() {
            if let p = d.driverLockProbe, p.waiting + p.holding > 0 {
                issues.append("driver \(i): lock still held (\(p.holding)) or waited for (\(p.waiting))")
            }
        }
        var pageIssues = 0
        for p in 0..<settings.pages {
            let address = address(ofPage: p)
            let e = mm.entry(at: address).entry
            var problem: String? = nil
            switch e.kind {
            case .present, .devicePrivate, .deviceExclusive:
                if e.kind == .present && e.isSpecial { break }  // the zero page
                let folio = kernel.pfnToPage(e.pfn).folio
                if folio.isLocked {
                    problem = "page \(p): folio still locked (\(folio))"
                } else if folio.refCount != folio.mapCount {
                    problem = "page \(p): \(folio.refCount - folio.mapCount) reference(s) left beyond its \(folio.mapCount) mapping(s) (\(folio))"
                }
            case .migration:
                problem = "page \(p): left with a migration entry"
            case .none, .table:
                problem = "page \(p): no longer mapped (\(e))"
            }
            if let problem {
                pageIssues += 1
                if pageIssues <= 8 { issues.append(problem) }
            }
        }
        if pageIssues > 8 { issues.append("... and \(pageIssues - 8) more pages") }
        let warnings = kernel.diagnostics
        if !warnings.isEmpty {
            issues.append("\(warnings.count) kernel warning(s), first: \(warnings[0])")
        }
        return issues
    }
}

extension StallReport {
    /// The stall in one or two sentences.
    static func describe(_ r: StallReport) -> String {
        var s = "page \(r.page) (0x\(String(r.address, radix: 16)), \(r.entryKind)) made no progress for "
            + (r.secondsWithoutProgress < 1 ? String(format: "%.1f ms", r.secondsWithoutProgress * 1000)
                : String(format: "%.1f s", r.secondsWithoutProgress))
            + " after \(r.migrateToRAMCallsOnPage) migrateToRAM calls and \(r.faultRetriesOnPage) fault retries on it; "
            + "\(r.threadsAccessing) thread(s) faulting on it"
        if r.threadsAtBarrier > 0 { s += ", \(r.threadsAtBarrier) done and waiting at the barrier" }
        s += "."
        if let w = r.driverLockWaiting, let h = r.driverLockHolding, w + h > 0 {
            s += " \(w) thread(s) inside migrateToRAM were waiting for the driver lock (\(h) holding it),"
                + " each holding the page reference the fault path took before calling migrateToRAM."
        }
        if let extra = r.referencesBeyondMappings, let map = r.mapCount, let ref = r.refCount {
            s += " The folio had \(ref) references for \(map) mapping(s): \(extra) beyond them"
            if extra > 2 {
                s += ", so the lock holder's reference check (migrate_vma_check_page) fails and the page is restored instead of migrated."
            } else {
                s += "."
            }
        }
        return s
    }
}
