import Foundation
import Testing
@testable import SVMEmu

@Suite("Bad input: typed errors and nothing changed")
struct BadInputTests {

    /// A machine with two mappings (16 pages, a hole of 16 pages, 16 pages), all
    /// written, and `body` checking one bad call against it.
    func withPopulatedMachine(_ body: (Kernel, AddressSpace, _ first: UInt64, _ hole: UInt64, _ second: UInt64) throws -> Void) throws {
        try withMachine { kernel, mm in
            let first = try mm.mmap(length: 48 * pageSize)
            let hole = first + UInt64(16 * pageSize)
            let second = first + UInt64(32 * pageSize)
            try mm.munmap(hole, length: 16 * pageSize)
            try stampPages(mm, first, pages: 16)
            try stampPages(mm, second, pages: 16)
            #expect(mm.mappings.count == 2)
            try body(kernel, mm, first, hole, second)
        }
    }

    func expectUnchanged(_ before: StateSnapshot, _ kernel: Kernel, _ mm: AddressSpace,
                         _ first: UInt64, _ second: UInt64, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let after = StateSnapshot(kernel, mm)
        #expect(after.vmas == before.vmas, "VMAs changed", sourceLocation: sourceLocation)
        #expect(after.freePages == before.freePages, "free pages changed", sourceLocation: sourceLocation)
        let changed = after.vmstat.filter { before.vmstat[$0.key] != $0.value }
        #expect(changed.isEmpty, "vmstat changed: \(changed) (was \(changed.keys.map { before.vmstat[$0] ?? 0 }))", sourceLocation: sourceLocation)
        #expect(try stampsIntact(mm, first, pages: 16), "bytes of the first mapping changed", sourceLocation: sourceLocation)
        #expect(try stampsIntact(mm, second, pages: 16), "bytes of the second mapping changed", sourceLocation: sourceLocation)
        #expect(kernel.diagnostics.isEmpty, sourceLocation: sourceLocation)
    }

    @Test("munmap of an unaligned address or a zero length fails with EINVAL and changes nothing")
    func munmapInvalidArguments() throws {
        try withPopulatedMachine { kernel, mm, first, _, second throws in
            let before = StateSnapshot(kernel, mm)
            #expect(throws: Errno.invalidArgument) { try mm.munmap(first + 1, length: pageSize) }
            #expect(throws: Errno.invalidArgument) { try mm.munmap(first + 2048, length: 4 * pageSize) }
            #expect(throws: Errno.invalidArgument) { try mm.munmap(first, length: 0) }
            #expect(throws: Errno.invalidArgument) { try mm.munmap(first, length: -PageGeometry.pageSize) }
            #expect(throws: Errno.invalidArgument) { try mm.munmap(mm.endAddress - PageGeometry.pageSize64, length: 2 * pageSize) }
            #expect(throws: Errno.invalidArgument) { try mm.munmap(UInt64.max & PageGeometry.pageMask, length: 2 * pageSize) }
            try expectUnchanged(before, kernel, mm, first, second)
        }
    }

    @Test("munmap of a range with nothing mapped succeeds (as in the kernel) and changes nothing")
    func munmapOfHoleSucceeds() throws {
        try withPopulatedMachine { kernel, mm, first, hole, second throws in
            let before = StateSnapshot(kernel, mm)
            try mm.munmap(hole, length: 16 * pageSize)
            try mm.munmap(hole + UInt64(4 * pageSize), length: pageSize)
            try mm.munmap(second + UInt64(64 * pageSize), length: 100 * pageSize)
            try expectUnchanged(before, kernel, mm, first, second)
        }
    }

    @Test("loads and stores outside any VMA fail with EFAULT and change nothing")
    func accessOutsideVMA() throws {
        try withPopulatedMachine { kernel, mm, first, hole, second throws in
            let before = StateSnapshot(kernel, mm)
            #expect(throws: Errno.badAddress) { _ = try mm.load(hole) }
            #expect(throws: Errno.badAddress) { try mm.store(hole + UInt64(5 * pageSize) + 7, 1) }
            #expect(throws: Errno.badAddress) { _ = try mm.load(second + UInt64(16 * pageSize)) }
            #expect(throws: Errno.badAddress) { _ = try mm.load(first - 1) }
            #expect(throws: Errno.badAddress) { _ = try mm.load(0) }
            #expect(throws: Errno.badAddress) { _ = try mm.load(mm.endAddress) }
            #expect(throws: Errno.badAddress) { try mm.fillPattern(hole, length: pageSize, seed: 1) }
            #expect(mm.entry(at: hole).entry.isNone)
            try expectUnchanged(before, kernel, mm, first, second)
        }
    }

    @Test("a copy running from a VMA into a hole fails with EFAULT and writes only the mapped part")
    func writeAcrossIntoHole() throws {
        try withPopulatedMachine { kernel, mm, first, hole, second throws in
            let start = hole - 8
            #expect(throws: Errno.badAddress) { try mm.write(start, bytes: [UInt8](repeating: 0xCC, count: 16)) }
            // copy_to_user semantics: the bytes before the fault are written.
            #expect(try mm.read(start, count: 8) == [UInt8](repeating: 0xCC, count: 8))
            #expect(mm.entry(at: hole).entry.isNone)
            #expect(mm.mappings.count == 2)
            #expect(try stampsIntact(mm, first, pages: 16))
            #expect(try stampsIntact(mm, second, pages: 16))
        }
    }

    @Test("mprotect and madvise of an unmapped or partly unmapped range fail with ENOMEM and change nothing")
    func mprotectMadviseUnmapped() throws {
        try withPopulatedMachine { kernel, mm, first, hole, second throws in
            let before = StateSnapshot(kernel, mm)
            #expect(throws: Errno.noMemory) { try mm.mprotect(hole, length: pageSize, protection: .read) }
            // From the middle of the first mapping into the hole: no split, no change.
            #expect(throws: Errno.noMemory) { try mm.mprotect(first + UInt64(8 * pageSize), length: 16 * pageSize, protection: .read) }
            #expect(throws: Errno.noMemory) { try mm.mprotect(first, length: 48 * pageSize, protection: .none) }
            for advice in MadviseAdvice.allCases {
                #expect(throws: Errno.noMemory) { try mm.madvise(hole, length: 2 * pageSize, advice: advice) }
                #expect(throws: Errno.noMemory) { try mm.madvise(first + UInt64(8 * pageSize), length: 16 * pageSize, advice: advice) }
            }
            try expectUnchanged(before, kernel, mm, first, second)
            // The first mapping is still writable everywhere.
            try mm.store(first + UInt64(15 * pageSize), 1)
            #expect(try mm.load(first + UInt64(15 * pageSize)) == 1)
        }
    }

    @Test("mmap, mprotect and madvise with invalid arguments fail with EINVAL and change nothing")
    func otherInvalidArguments() throws {
        try withPopulatedMachine { kernel, mm, first, hole, second throws in
            let before = StateSnapshot(kernel, mm)
            #expect(throws: Errno.invalidArgument) { try mm.mmap(length: 0) }
            #expect(throws: Errno.invalidArgument) { try mm.mmap(address: hole + 1, length: pageSize) }
            #expect(throws: Errno.invalidArgument) { try mm.mmap(address: mm.endAddress - PageGeometry.pageSize64, length: 2 * pageSize) }
            #expect(throws: Errno.invalidArgument) { try mm.mprotect(first + 1, length: pageSize, protection: .read) }
            #expect(throws: Errno.invalidArgument) { try mm.madvise(first + 100, length: pageSize, advice: .dontNeed) }
            #expect(throws: Errno.invalidArgument) { try mm.mprotect(first, length: -1, protection: .read) }
            // Zero length at an aligned address is a successful no-op.
            try mm.mprotect(first, length: 0, protection: .none)
            try mm.madvise(first, length: 0, advice: .dontNeed)
            try expectUnchanged(before, kernel, mm, first, second)
        }
    }

    @Test("a MAP_FIXED mmap over written pages replaces them with zero pages")
    func mapFixedReplaces() throws {
        try withPopulatedMachine { kernel, mm, first, _, second throws in
            let free0 = kernel.freePages
            let a = try mm.mmap(address: first + UInt64(4 * pageSize), length: 4 * pageSize)
            #expect(a == first + UInt64(4 * pageSize))
            #expect(mm.mappings.count == 4)
            #expect(kernel.freePages == free0 + 4)
            #expect(try allZero(mm, a, length: 4 * pageSize))
            #expect(try stampsIntact(mm, first, pages: 4))
            #expect(try stampsIntact(mm, first + UInt64(8 * pageSize), pages: 8))
            #expect(try stampsIntact(mm, second, pages: 16))
        }
    }
}
