import Testing
import SVMEmu
import MirrorDriver

@Suite("RAM to VRAM and back")
struct RoundTripTests {
    @Test("written pages go to VRAM, come back on CPU touch, bytes intact")
    func roundTripOnCPUFault() throws {
        let (kernel, mm, device) = bootMachine()
        let pages = 64
        let base = try mm.mmap(length: pages * 4096)
        try mm.fillPattern(base, length: pages * 4096, seed: 7)
        let freeBefore = kernel.freePages
        let moved = try device.migrateToDevice(base, pages: pages)
        #expect(moved == pages)
        #expect(device.devicePagesInUse == UInt64(pages))
        #expect(mm.entry(at: base).entry.kind == .devicePrivate)
        // The system pages went back to the allocator.
        #expect(kernel.freePages == freeBefore + UInt64(pages))
        // The GPU sees the same bytes in VRAM.
        let gpuBytes = try device.read(base, count: 4096)
        let cpuExpected: [UInt8] = try {
            let scratch = AddressSpace(kernel: kernel)
            let a = try scratch.mmap(address: base, length: 4096)
            try scratch.fillPattern(a, length: 4096, seed: 7)
            return try scratch.read(a, count: 4096)
        }()
        #expect(gpuBytes == cpuExpected)
        // A CPU read faults every page back.
        #expect(try mm.verifyPattern(base, length: pages * 4096, seed: 7) == nil)
        #expect(mm.entry(at: base).entry.kind == .present)
        #expect(device.migrateToRAMCalls == pages)
        #expect(device.devicePagesInUse == 0)
        #expect(kernel.diagnostics.isEmpty)
    }

    @Test("round trips hand out RAM and VRAM frames in address order (first-in, first-out free lists)")
    func framesStayAscendingOverRoundTrips() throws {
        let (kernel, mm, device) = bootMachine()
        let pages = 64
        let base = try mm.mmap(length: pages * 4096)
        try mm.fillPattern(base, length: pages * 4096, seed: 5)
        func pfns() -> [UInt64] { (0..<pages).map { mm.entry(at: base + UInt64($0 * 4096)).entry.pfn } }
        func ascending(_ p: [UInt64]) -> Bool { zip(p, p.dropFirst()).allSatisfy { $0 < $1 } }
        for round in 0..<3 {
            #expect(try device.migrateToDevice(base, pages: pages) == pages)
            let vram = pfns()
            #expect(ascending(vram), "round \(round): VRAM frames \(vram.prefix(4))...")
            #expect(try device.migrateToSystem(base, pages: pages) == pages)
            let ram = pfns()
            #expect(mm.entry(at: base).entry.kind == .present)
            #expect(ascending(ram), "round \(round): RAM frames \(ram.prefix(4))...")
            #expect(try mm.verifyPattern(base, length: pages * 4096, seed: 5) == nil)
        }
        #expect(device.devicePagesInUse == 0)
        #expect(kernel.diagnostics.isEmpty)
    }
}

