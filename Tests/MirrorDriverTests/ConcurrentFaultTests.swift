import Foundation
import Synchronization
import Testing
import TestSupport
import SVMEmu
import MirrorDriver

/// CPU threads touching migrated pages at once, under each device-private
/// fault policy, with MirrorDevice's default (no exclusive driver lock): every
/// page comes back exactly once, and no reference, folio lock or device page
/// is left behind. (With the exclusive driver lock the legacy policy
/// livelocks; that is the stress harness's subject, not this suite's.)
@Suite("concurrent CPU faults on migrated pages")
struct ConcurrentFaultTests {

    @Test("eight threads read 64 migrated pages in clashing orders", arguments: DeviceFaultPolicy.allCases)
    func eightReaders(policy: DeviceFaultPolicy) throws {
        try withMachine(policy: policy) { kernel, mm, device in
            let n = 64, threads = 8
            let base = try mm.mmap(length: n * pageSize)
            try mm.fillPattern(base, length: n * pageSize, seed: 51)
            let freeBefore = kernel.freePages
            try device.migrateToDevice(base, pages: n)
            let issues = ThreadIssues()
            let gaveUp = SharedCounter()
            let deadline = Date().addingTimeInterval(4)
            let finished = runThreads(threads, timeout: 8, keepAlive: [kernel, mm, device]) { t in
                // Thread t starts at page 8t and walks every page, so each page
                // is faulted by several threads at about the same time.
                for k in 0..<n {
                    let i = (k + t * 8) % n
                    let a = base + UInt64(i * pageSize)
                    var ok = false
                    while !ok && Date() < deadline {
                        do {
                            // Bounded: a livelocked fault gives up and is retried here.
                            if let w = try mm.withPageBytes(at: a + 64, write: false, faultLimit: 10_000, { $0.load(as: UInt64.self) }) {
                                ok = true
                                let again = try? mm.verifyPattern(a + 64, length: 8, seed: 51)
                                if again != nil { issues.record("page \(i): wrong bytes \(w)") }
                            }
                        } catch {
                            issues.record("page \(i): \(error)")
                            return
                        }
                    }
                    if !ok { gaveUp.add(); return }
                }
            }
            try #require(finished, "reader threads did not stop within 8 s")
            #expect(issues.all.isEmpty, "\(issues.all.prefix(5))")
            if gaveUp.current > 0 {
                // Only the legacy policy may be this slow: report, then finish single-threaded.
                #expect(policy == .legacy, "\(gaveUp.current) readers gave up under \(policy)")
            }
            #expect(try mm.verifyPattern(base, length: n * pageSize, seed: 51) == nil)
            for i in 0..<n { #expect(mm.entry(at: base + UInt64(i * pageSize)).entry.kind == .present) }
            #expect(device.devicePagesInUse == 0)
            noLeaks(kernel, mm, base, pages: n)
            #expect(kernel.freePages == freeBefore)
            #expect(kernel.diagnostics.isEmpty)
            if policy != .legacy {
                // Only the trylock winner calls migrate_to_ram, and it always migrates.
                #expect(device.migrateToRAMCalls == n)
            }
        }
    }

    @Test("readers and writers on one page, each policy", arguments: DeviceFaultPolicy.allCases)
    func onePageStorm(policy: DeviceFaultPolicy) throws {
        try withMachine(policy: policy) { kernel, mm, device in
            let base = try mm.mmap(length: 4 * pageSize)
            try mm.fillPattern(base, length: 4 * pageSize, seed: 52)
            let freeBefore = kernel.freePages
            let issues = ThreadIssues()
            let deadline = Date().addingTimeInterval(3)
            // Repeatedly: migrate one page to VRAM, then let 4 threads hit it.
            for round in 0..<20 {
                try device.migrateToDevice(base, pages: 4)
                let finished = runThreads(4, timeout: 5, keepAlive: [kernel, mm, device]) { t in
                    let a = base + UInt64((round + t / 2) % 4 * pageSize)
                    while Date() < deadline {
                        do {
                            // Odd threads write back the word they read: bytes must not change.
                            let w = t % 2 == 1
                            let r = try mm.withPageBytes(at: a, write: w, faultLimit: 10_000) { p in
                                if w { p.storeBytes(of: p.load(as: UInt64.self), as: UInt64.self) }
                                return true
                            }
                            if r != nil { return }
                        } catch {
                            issues.record("\(error)")
                            return
                        }
                    }
                }
                try #require(finished)
                if Date() >= deadline { break }
            }
            #expect(issues.all.isEmpty)
            #expect(try mm.verifyPattern(base, length: 4 * pageSize, seed: 52) == nil)
            #expect(try device.migrateToSystem(base, pages: 4) >= 0)
            #expect(device.devicePagesInUse == 0)
            noLeaks(kernel, mm, base, pages: 4)
            #expect(kernel.freePages == freeBefore)
            #expect(kernel.diagnostics.isEmpty)
        }
    }
}
