import Testing
@testable import SVMEmu

/// The machine's physical layout has limits (regions, page maps, physical
/// bytes); reaching one is an error with a diagnostic that names it, never a trap.
@Suite("Physical layout limits")
struct PhysicalLayoutTests {

    static let ops = DevicePageMapOperations(folioFree: { _ in }, migrateToRAM: { _ in .sigbus })

    @Test("device memory beyond maxPhysicalBytes fails with ENOMEM, names the limit, and the machine still works")
    func beyondMaxPhysicalBytes() throws {
        var config = KernelConfiguration()
        config.nodeSizes = [64 << 20]
        config.maxPhysicalBytes = 256 << 20
        let kernel = try Kernel(booting: config)
        let owner = DeviceOwner.unique()
        #expect(throws: Errno.noMemory) {
            try kernel.memremapPages(type: .private, owner: owner, bytes: 512 << 20, operations: Self.ops)
        }
        #expect(kernel.diagnostics(of: .machineLimit).contains { $0.rule.contains("maxPhysicalBytes") })
        // What fits still registers, and its pages are valid.
        let map = try kernel.memremapPages(type: .private, owner: owner, bytes: 64 << 20, operations: Self.ops)
        #expect(kernel.isValid(pfn: map.startPfn) && kernel.isValid(pfn: map.startPfn + map.pageCount - 1))
        #expect(!kernel.isValid(pfn: map.startPfn + map.pageCount))
    }

    @Test("more device page maps than the machine holds: ENOSPC with a diagnostic, no trap")
    func tooManyPageMaps() throws {
        var config = KernelConfiguration()
        config.nodeSizes = [4 << 20]
        config.maxPhysicalBytes = 8 << 30
        let kernel = try Kernel(booting: config)
        let owner = DeviceOwner.unique()
        var maps: [DevicePageMap] = []
        var failure: Errno? = nil
        for _ in 0...Kernel.maxPageMaps {
            do { maps.append(try kernel.memremapPages(type: .private, owner: owner, bytes: PageGeometry.pmdSize64, operations: Self.ops)) }
            catch { failure = error; break }
        }
        #expect(failure == .noSpace)
        // Far more than the 64 a 2 MiB storm of 1,010 pages outgrew.
        #expect(maps.count >= Kernel.maxRegions - config.nodeSizes.count - 2)
        #expect(kernel.diagnostics(of: .machineLimit).contains { $0.rule.contains("at most") })
        // Every registered map is found by its pfns (binary search over the regions).
        for m in maps.prefix(1000) where kernel.pageMap(containing: m.startPfn + 1) !== m {
            Issue.record("page map at pfn \(m.startPfn) not found")
            break
        }
        #expect(maps.allSatisfy { kernel.isValid(pfn: $0.startPfn) })
    }

    @Test("a configuration the machine cannot boot with is refused by validate() with the setting's name")
    func configurationValidated() throws {
        var c = KernelConfiguration()
        #expect(throws: Never.self) { try c.validate() }
        c.nodeSizes = []
        #expect { try c.validate() } throws: { ($0 as? KernelConfigurationError)?.message.contains("nodeSizes") == true }
        c.nodeSizes = [1 << 20]
        #expect { try c.validate() } throws: { ($0 as? KernelConfigurationError)?.message.contains("2 MiB") == true }
        c.nodeSizes = [2 << 30]
        c.maxPhysicalBytes = 1 << 30
        #expect { try c.validate() } throws: { ($0 as? KernelConfigurationError)?.message.contains("maxPhysicalBytes") == true }
        c.maxPhysicalBytes = 512 << 30
        c.addressSpaceSize = KernelConfiguration.maxAddressSpaceSize
        #expect(throws: Never.self) { try c.validate() }
        c.addressSpaceSize += 1 << 30
        #expect { try c.validate() } throws: { ($0 as? KernelConfigurationError)?.message.contains("addressSpaceSize") == true }
    }

    @Test("folio_alloc of an order other than 0 or 9 returns nil with a diagnostic")
    func badOrder() throws {
        let kernel = try makeKernel()
        #expect(kernel.allocateFolio(order: 3) == nil)
        #expect(kernel.diagnostics(of: .apiMisuse).contains { $0.rule.contains("order must be 0 or 9") })
    }
}
