import Testing
import SVMEmu
import MirrorDriver

/// A device that mirrors the zero page (a GPU read of memory nobody wrote)
/// must drop that mapping when the CPU replaces the zero page: the kernel
/// tells the MMU notifiers (`MMU_NOTIFY_CLEAR`) before `wp_page_copy()`
/// maps the new page and before `__split_huge_pmd()` turns the huge zero
/// page into small zero pages. Without the notification the device keeps
/// reading zeroes the CPU has overwritten.
@Suite("The device's mirror of the zero page")
struct ZeroPageMirrorTests {
    /// The device's entry at `a` names the frame the CPU maps there, or is absent.
    static func mirrorAgrees(_ mm: AddressSpace, _ device: MirrorDevice, _ a: UInt64) -> Bool {
        guard let m = device.deviceMapping(at: a) else { return true }
        return mm.deviceEntryAgrees(at: a, pfn: m.pfn, writable: m.writable)
    }

    @Test("a CPU write to a page the device mirrors as the zero page: the device reads the written byte")
    func writeAfterDeviceReadOfZeroPage() throws {
        try withMachine { kernel, mm, device in
            let a = try mm.mmap(length: 4 * pageSize)
            var byte: UInt8 = 0xFF
            try withUnsafeMutableBytes(of: &byte) { try device.read(a + 100, into: $0) }
            #expect(byte == 0)
            #expect(device.deviceMapping(at: a)?.pfn == kernel.zeroPage.pfn, "the device mirrors the zero page")
            try mm.store(a + 100, 0x5A)
            #expect(Self.mirrorAgrees(mm, device, a), "device \(String(describing: device.deviceMapping(at: a))), CPU \(mm.entry(at: a))")
            try withUnsafeMutableBytes(of: &byte) { try device.read(a + 100, into: $0) }
            #expect(byte == 0x5A)
        }
    }

    @Test("a CPU write splits the huge zero page the device mirrors: the device drops the 2 MiB of it and reads the written byte")
    func writeSplitsMirroredHugeZeroPage() throws {
        let (kernel, mm0, device0) = try bootMachine(thp: .always)
        var mm: AddressSpace? = mm0, device: MirrorDevice? = device0
        defer { device = nil; mm = nil; withExtendedLifetime(kernel) {} }
        let m = mm!, d = device!
        let a = try m.mmap(length: PageGeometry.pmdSize)
        var byte: UInt8 = 0xFF
        try withUnsafeMutableBytes(of: &byte) { try d.read(a + 0x3000, into: $0) }
        #expect(byte == 0)
        #expect(m.entry(at: a).level == .pmd, "a read maps the huge zero page")
        try m.store(a + 0x1000, 0x77)
        #expect(m.entry(at: a).level == .pte, "the write split the PMD")
        for i in 0..<8 {
            let p = a + UInt64(i) * PageGeometry.pageSize64
            #expect(Self.mirrorAgrees(m, d, p), "page \(i): device \(String(describing: d.deviceMapping(at: p))), CPU \(m.entry(at: p))")
        }
        try withUnsafeMutableBytes(of: &byte) { try d.read(a + 0x1000, into: $0) }
        #expect(byte == 0x77)
        #expect(kernel.audit().isClean)
    }
}
