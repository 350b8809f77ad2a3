import Testing
import Synchronization
@testable import SVMEmu

/// A device's allocator hands out the pages of a freed 2 MiB device folio
/// again as 4 KiB pages (as a VRAM pool does). Each page must come out as a
/// folio of its own, whatever the large folio left in its metadata
/// ("mm/zone_device: Reinitialize large zone device private folios").
@Suite("Zone-device folios: a freed 2 MiB folio reused as 4 KiB pages")
struct ZoneDeviceFolioTests {
    final class Freed: @unchecked Sendable {
        let list = Mutex<[(pfn: UInt64, order: Int)]>([])
    }

    static func pageMap(_ kernel: Kernel, _ freed: Freed) throws -> DevicePageMap {
        let ops = DevicePageMapOperations(folioFree: { f in freed.list.withLock { $0.append((f.pfn, f.order)) } },
                                          migrateToRAM: { _ in .sigbus })
        return try kernel.memremapPages(type: .private, owner: .unique(), bytes: UInt64(PageGeometry.pmdSize), operations: ops)
    }

    @Test("a 2 MiB device folio freed, then its 512 pages handed out one by one in address order: no warning, each a 4 KiB folio")
    func largeFolioReusedAsSmallPages() throws {
        try withMachine { kernel, _ in
            let freed = Freed()
            let pgmap = try Self.pageMap(kernel, freed)
            let head = pgmap.page(at: 0)
            let big = try #require(kernel.zoneDevicePageInit(head, order: PageGeometry.pmdOrder))
            #expect(big.order == PageGeometry.pmdOrder && big.isLocked)
            big.unlock()
            big.put()
            #expect(freed.list.withLock { $0.map(\.pfn) } == [head.pfn])
            #expect(freed.list.withLock { $0.map(\.order) } == [PageGeometry.pmdOrder])

            var small: [Folio] = []
            for i in 0..<PageGeometry.pmdPages {
                let page = pgmap.page(at: UInt64(i))
                let f = kernel.zoneDevicePageInit(page, order: 0)
                #expect(f != nil, "page \(i) refused")
                guard let f else { continue }
                #expect(f.pfn == page.pfn && f.order == 0 && f.refCount == 1 && f.isLocked, "page \(i): \(f)")
                #expect(page.folio.pfn == page.pfn, "page \(i) still names a stale head")
                small.append(f)
            }
            #expect(kernel.diagnostics.isEmpty, "\(kernel.diagnostics)")
            for f in small { f.unlock(); f.put() }
            #expect(freed.list.withLock { $0.count } == 1 + PageGeometry.pmdPages)

            // All free again: the block makes a 2 MiB folio once more.
            let again = try #require(kernel.zoneDevicePageInit(head, order: PageGeometry.pmdOrder))
            #expect(again.order == PageGeometry.pmdOrder)
            #expect(kernel.diagnostics.isEmpty, "\(kernel.diagnostics)")
            again.unlock()
            again.put()
        }
    }

    @Test("a tail page of a live 2 MiB device folio is still refused (a driver bug), and nothing changes")
    func liveTailRefused() throws {
        try withMachine { kernel, _ in
            let pgmap = try Self.pageMap(kernel, Freed())
            let big = try #require(kernel.zoneDevicePageInit(pgmap.page(at: 0), order: PageGeometry.pmdOrder))
            #expect(kernel.zoneDevicePageInit(pgmap.page(at: 1), order: 0) == nil)
            #expect(kernel.diagnostics(of: .apiMisuse).contains { $0.rule.hasPrefix("zone_device_page_init: page is in use") })
            #expect(pgmap.page(at: 1).folio.pfn == big.pfn && big.order == PageGeometry.pmdOrder && big.refCount == 1)
            big.unlock()
            big.put()
        }
    }
}
