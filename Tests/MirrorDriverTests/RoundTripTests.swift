import Testing
import SVMEmu
import MirrorDriver

@Suite("RAM to VRAM and back")
struct RoundTripTests {
    @Test("written pages go to VRAM, come back on CPU touch, bytes intact")
    func roundTripOnCPUFault() throws {
        let (kernel, mm, device) = try bootMachine()
        let pages = 64
        let base = try mm.mmap(length: pages * PageGeometry.pageSize)
        try mm.fillPattern(base, length: pages * PageGeometry.pageSize, seed: 7)
        let freeBefore = kernel.freePages
        let moved = try device.migrateToDevice(base, pages: pages)
        #expect(moved == pages)
        #expect(device.devicePagesInUse == UInt64(pages))
        #expect(mm.entry(at: base).entry.kind == .devicePrivate)
        // The system pages went back to the allocator.
        #expect(kernel.freePages == freeBefore + UInt64(pages))
        // The GPU sees the same bytes in VRAM.
        let gpuBytes = try device.read(base, count: PageGeometry.pageSize)
        let cpuExpected: [UInt8] = try {
            let scratch = try AddressSpace(kernel: kernel)
            let a = try scratch.mmap(address: base, length: PageGeometry.pageSize)
            try scratch.fillPattern(a, length: PageGeometry.pageSize, seed: 7)
            return try scratch.read(a, count: PageGeometry.pageSize)
        }()
        #expect(gpuBytes == cpuExpected)
        // A CPU read faults every page back.
        #expect(try mm.verifyPattern(base, length: pages * PageGeometry.pageSize, seed: 7) == nil)
        #expect(mm.entry(at: base).entry.kind == .present)
        #expect(device.migrateToRAMCalls == pages)
        #expect(device.devicePagesInUse == 0)
        #expect(kernel.diagnostics.isEmpty)
    }

    @Test("round trips hand out RAM and VRAM frames in address order (first-in, first-out free lists)")
    func framesStayAscendingOverRoundTrips() throws {
        let (kernel, mm, device) = try bootMachine()
        let pages = 64
        let base = try mm.mmap(length: pages * PageGeometry.pageSize)
        try mm.fillPattern(base, length: pages * PageGeometry.pageSize, seed: 5)
        func pfns() -> [UInt64] { (0..<pages).map { mm.entry(at: base + UInt64($0 * PageGeometry.pageSize)).entry.pfn } }
        func ascending(_ p: [UInt64]) -> Bool { zip(p, p.dropFirst()).allSatisfy { $0 < $1 } }
        for round in 0..<3 {
            #expect(try device.migrateToDevice(base, pages: pages) == pages)
            let vram = pfns()
            #expect(ascending(vram), "round \(round): VRAM frames \(vram.prefix(4))...")
            #expect(try device.migrateToSystem(base, pages: pages) == pages)
            let ram = pfns()
            #expect(mm.entry(at: base).entry.kind == .present)
            #expect(ascending(ram), "round \(round): RAM frames \(ram.prefix(4))...")
            #expect(try mm.verifyPattern(base, length: pages * PageGeometry.pageSize, seed: 5) == nil)
        }
        #expect(device.devicePagesInUse == 0)
        #expect(kernel.diagnostics.isEmpty)
    }

    @Test("a GPU fault with gpuFaultPages 512 migrates the 2 MiB window around it, clipped to its VMA")
    func gpuFaultWindow() throws {
        let (kernel, mm, device) = try bootMachine()
        var s = device.settings
        s.gpuFaultPolicy = .migrate
        s.gpuFaultPages = PageGeometry.pmdPages
        device.settings = s
        let length = 3 << 20
        let base = try mm.mmap(length: length)
        try mm.fillPattern(base, length: length, seed: 9)
        let vma = try #require(mm.vma(containing: base))
        let target = base + UInt64(length - PageGeometry.pageSize)
        let w = target & PageGeometry.pmdMask
        let lo = max(w, vma.start), hi = min(w + PageGeometry.pmdSize64, vma.end)
        #expect(try device.read(target, count: PageGeometry.pageSize) == expectedPattern(kernel, target, length: PageGeometry.pageSize, seed: 9))
        #expect(device.faults == 1, "one GPU fault for the whole window")
        var inVRAM = 0, outside = 0
        for i in 0..<(length >> PageGeometry.pageShift) {
            let a = base + UInt64(i << PageGeometry.pageShift)
            guard mm.entry(at: a).entry.kind == .devicePrivate else { continue }
            if a >= lo && a < hi { inVRAM += 1 } else { outside += 1 }
        }
        #expect(inVRAM == Int((hi - lo) >> PageGeometry.pageShift) && outside == 0, "\(inVRAM) pages of the window in VRAM, \(outside) outside it")
        // Reading the rest of the window takes no more faults.
        #expect(try device.read(lo, count: PageGeometry.pageSize) == expectedPattern(kernel, lo, length: PageGeometry.pageSize, seed: 9))
        #expect(device.faults == 1)
        #expect(try mm.verifyPattern(base, length: length, seed: 9) == nil)
        #expect(kernel.diagnostics.isEmpty)
    }
}

