import Foundation
import Synchronization
import Testing
@testable import SVMEmu
import MirrorDriver
import HMMSelftests
import TestSupport

/// The hmm-tests cases that fork (anon_write_child, anon_write_child_shared,
/// hmm_cow_in_device), and a fork that lands in the middle of a migration.
/// A child process is a second `AddressSpace` made by `fork()`; "the child
/// exits" is the child address space going away.
/// The time limit only catches a hang: under ThreadSanitizer on a small host
/// these cases wait their turn behind the THP cases for over a minute.
@Suite("hmm-tests fork", .timeLimit(.minutes(10)))
struct HMMForkTests {

    /// fork() while the device evicts the buffer (HMM_DMIRROR_RELEASE, which
    /// holds no mmap lock): the fork copies the migration entries, and the
    /// eviction's remove_migration_ptes maps the system pages into both
    /// processes. Afterwards each side's writes stay its own.
    @Test func fork_during_eviction() throws {
        let npages = 64
        try withGatedMachine(npages: npages, seed: 1) { kernel, parent, device, engine, buffer in
            let size = npages << pageShift
            #expect(hmmCommand(device, .migrateToDevice, buffer, npages) == 0)
            #expect(buffer.cpages == npages)

            engine.arm()
            let evictor = WorkerThread()
            evictor.start { device.commandRelease() }
            #expect(eventually { engine.isHolding })
            // The eviction holds the pages unmapped behind migration entries.
            #expect(parent.entry(at: buffer.ptr).entry.kind == .migration)
            let child = try parent.fork()
            #expect(child.entry(at: buffer.ptr).entry.kind == .migration)
            engine.open()
            #expect(evictor.wait())

            for i in 0..<npages {
                let a = buffer.ptr + UInt64(i << pageShift)
                let p = parent.entry(at: a).entry, c = child.entry(at: a).entry
                #expect(p.kind == .present && c.kind == .present && p.pfn == c.pfn && !p.isWrite && !c.isWrite)
            }
            #expect(try parent.verifyPattern(buffer.ptr, length: size, seed: 1) == nil)
            #expect(try child.verifyPattern(buffer.ptr, length: size, seed: 1) == nil)
            // Copy-on-write from here: the parent's new bytes stay its own.
            try parent.fillPattern(buffer.ptr, length: size, seed: 2)
            #expect(try child.verifyPattern(buffer.ptr, length: size, seed: 1) == nil)
            try child.fillPattern(buffer.ptr, length: size, seed: 3)
            #expect(try parent.verifyPattern(buffer.ptr, length: size, seed: 2) == nil)
            #expect(try child.verifyPattern(buffer.ptr, length: size, seed: 3) == nil)
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    /// A child exits while an eviction of the pages it shares with its
    /// parent is between its unmap and its remap, and the device folios'
    /// rmap names the child (the parent's migration to the device remapped
    /// the parent first, then the child). From the moment the child's
    /// teardown starts its address space can no longer be looked up, yet
    /// its fork family (the anon_vma) still maps the folios: the eviction's
    /// remove_migration_ptes must find the parent's migration entries
    /// through the family. It used to find nothing until the child had
    /// gone entirely, which left the parent with migration entries naming
    /// freed device pages (CPU accesses faulting forever; the soak with
    /// fork + migrate found it). Here the child's teardown is held in its
    /// mmap lock while the eviction finishes.
    @Test func child_exit_during_eviction() throws {
        let npages = 16
        try withGatedMachine(npages: npages, seed: 7) { kernel, parent, device, engine, buffer in
            let size = npages << pageShift

            var child: AddressSpace? = try parent.fork()
            // The parent migrates the shared pages: both now map device pages.
            #expect(hmmCommand(device, .migrateToDevice, buffer, npages) == 0)
            #expect(buffer.cpages == npages)
            for i in 0..<npages {
                let a = buffer.ptr + UInt64(i << pageShift)
                let p = parent.entry(at: a).entry, c = child!.entry(at: a).entry
                #expect(p.kind == .devicePrivate && c.kind == .devicePrivate && p.pfn == c.pfn)
            }

            engine.arm()
            let evictor = WorkerThread()
            evictor.start { device.commandRelease() }
            #expect(eventually { engine.isHolding })
            #expect(parent.entry(at: buffer.ptr).entry.kind == .migration)
            #expect(child!.entry(at: buffer.ptr).entry.kind == .migration)

            // A reader of the child's mm holds its teardown (exit_mmap) in the
            // mmap lock; once the child can no longer be looked up, the
            // eviction finishes, then the teardown goes on.
            let holder = WorkerThread()
            let box = ExitingAddressSpace(child!)
            holder.start {
                box.mmapLock.downRead()
                box.locked.store(true, ordering: .releasing)
                _ = eventually(within: 10) { box.gone }
                engine.open()
                box.evicted.store(evictor.wait(), ordering: .releasing)
                box.mmapLock.upRead()
            }
            #expect(eventually { box.isLocked })
            child = nil  // the child exits; its teardown waits for the reader
            #expect(holder.wait())
            #expect(box.didEvict)

            // Every page is back in system memory in the parent, with its bytes.
            var allPresent = true
            for i in 0..<npages {
                let e = parent.entry(at: buffer.ptr + UInt64(i << pageShift)).entry
                if e.kind != .present { allPresent = false }
                #expect(e.kind == .present, "page \(i): \(e.kind)")
            }
            let audit = kernel.audit()
            #expect(audit.isClean, "\(audit)")
            if allPresent {  // a leftover migration entry would fault forever
                #expect(try parent.verifyPattern(buffer.ptr, length: size, seed: 7) == nil)
                try parent.fillPattern(buffer.ptr, length: size, seed: 8)
                #expect(try parent.verifyPattern(buffer.ptr, length: size, seed: 8) == nil)
            }
            #expect(kernel.diagnostics.isEmpty)
        }
    }

    /// fork, then one process moves the buffer it shares with the other
    /// elsewhere (mremap MREMAP_MAYMOVE | MREMAP_FIXED): the folios keep
    /// their index and the moved VMA its vm_pgoff, so every rmap walk finds
    /// the mover's mapping at the new address and the other's at the old
    /// one. The parent's device migrates the pages (migrate_vma: its
    /// try_to_migrate must reach the child's mapping), evicts them
    /// (migrate_device_range: no VMA, the rmap alone finds both), the
    /// parent moves them to node 1 (move_pages with MPOL_MF_MOVE_ALL), the
    /// device takes them again and a CPU read in the child faults them back
    /// (migrate_to_ram from the child's VMA must reach the parent's).
    /// After each step both map the same frame and read the bytes the
    /// parent wrote, and the audit is clean; then copy-on-write separates
    /// them.
    /// The rmap used to record one address for the whole fork family (the
    /// mover's new one, or the old one when the child moved): the walks
    /// missed the other process's mapping and no page migrated.
    @Test(arguments: Mover.allCases) func mremap_after_fork(_ mover: Mover) throws {
        let npages = 16
        try withGatedMachine(npages: npages, seed: 11, nodes: 2) { kernel, parent, device, _, buffer in
            let size = npages << pageShift
            let old = buffer.ptr
            let bytes = try loadInts(parent, old, count: size / 4)
            let child = try parent.fork()
            let moving = mover == .parent ? parent : child
            let target = try moving.mmap(length: 2 * size)  // a free range; MREMAP_FIXED replaces it
            #expect(try moving.mremap(old, oldLength: size, newLength: size, flags: [.mayMove, .fixed], newAddress: target) == target)
            let parentAt = mover == .parent ? target : old
            let childAt = mover == .child ? target : old
            #expect(moving.entry(at: old).entry.isNone)

            /// Both processes map one frame per page, with entries of `kind`,
            /// and the machine is consistent.
            func expectShared(_ kind: PageTableEntry.Kind, _ step: String) {
                for i in 0..<npages {
                    let off = UInt64(i << pageShift)
                    let p = parent.entry(at: parentAt + off).entry, c = child.entry(at: childAt + off).entry
                    #expect(p.kind == kind && c.kind == kind && p.pfn == c.pfn, "\(step), page \(i): parent \(p), child \(c)")
                }
                let audit = kernel.audit()
                #expect(audit.isClean, "\(step): \(audit)")
            }
            /// Both read the bytes the parent had (CPU loads: device pages fault back).
            func expectBytes(_ step: String) throws {
                #expect(try loadInts(parent, parentAt, count: size / 4) == bytes, "\(step): the parent's bytes")
                #expect(try loadInts(child, childAt, count: size / 4) == bytes, "\(step): the child's bytes")
            }
            expectShared(.present, "after mremap")

            buffer.ptr = parentAt
            #expect(hmmCommand(device, .migrateToDevice, buffer, npages) == 0)
            #expect(buffer.cpages == npages)
            expectShared(.devicePrivate, "migrated to the device")

            device.commandRelease()
            expectShared(.present, "evicted")
            try expectBytes("evicted")

            let addresses = (0..<npages).map { parentAt + UInt64($0 << pageShift) }
            var status: [PageStatus] = []
            #expect(try parent.movePages(addresses, nodes: Array(repeating: 1, count: npages), status: &status, flags: .moveAll) == 0)
            #expect(status == Array(repeating: .node(1), count: npages))
            _ = try child.movePages((0..<npages).map { childAt + UInt64($0 << pageShift) }, nodes: nil, status: &status)
            #expect(status == Array(repeating: .node(1), count: npages), "the child's pages moved with the parent's")
            expectShared(.present, "moved to node 1")
            try expectBytes("moved to node 1")

            #expect(hmmCommand(device, .migrateToDevice, buffer, npages) == 0)
            #expect(buffer.cpages == npages)
            expectShared(.devicePrivate, "migrated to the device again")
            #expect(try loadInts(child, childAt, count: size / 4) == bytes, "the child faults the pages back")
            expectShared(.present, "faulted back by the child")
            try expectBytes("faulted back by the child")

            // Copy-on-write from here: each side's writes stay its own.
            try parent.fillPattern(parentAt, length: size, seed: 12)
            #expect(try loadInts(child, childAt, count: size / 4) == bytes)
            try child.fillPattern(childAt, length: size, seed: 13)
            #expect(try parent.verifyPattern(parentAt, length: size, seed: 12) == nil)
            let audit = kernel.audit()
            #expect(audit.isClean, "\(audit)")
            #expect(kernel.diagnostics.isEmpty, "\(kernel.diagnostics)")
        }
    }

    /// Which process moves the shared buffer in `mremap_after_fork`.
    enum Mover: String, CaseIterable, Sendable, CustomStringConvertible {
        case parent, child
        var description: String { rawValue }
    }

    /// A machine whose device copies through a gated engine (an eviction
    /// can be held between its unmap and its remap), with `npages` pages of
    /// the parent's memory mapped and filled with `seed`'s pattern on node 0
    /// of `nodes` RAM nodes; the device goes before the address space,
    /// both before the kernel.
    private func withGatedMachine(npages: Int, seed: UInt64, nodes: Int = 1,
                                  _ body: (Kernel, AddressSpace, MirrorDevice, GatedCopyEngine, HMMBuffer) throws -> Void) throws {
        let engine = GatedCopyEngine()
        // A TestMachine without its mirror device: this one copies through the gate.
        let machine = try TestMachine(TestMachineOptions(nodeSizes: Array(repeating: 64 << 20, count: nodes)))
        let kernel = machine.kernel
        var device: MirrorDevice? = try MirrorDevice(kernel: kernel, mm: machine.mm, name: "hmm_dmirror0", vramBytes: 64 << 20,
                                                 chunkBytes: 32 << 20, copyEngine: engine)
        // No local reference to the address space: teardown releases the last one.
        defer { device = nil; machine.tearDown() }
        let size = npages << pageShift
        let buffer = HMMBuffer(size: size)
        buffer.ptr = try machine.mm.mmap(length: size, protection: .readWrite)
        try machine.mm.fillPattern(buffer.ptr, length: size, seed: seed)
        try body(kernel, machine.mm, device!, engine, buffer)
    }

}

/// An address space seen from a thread that must not keep it alive, nor
/// touch it once its deinit may run (a reference taken then, even for a
/// call, outlives the deinit and traps): the thread holds the address
/// space's mmap lock object itself; `gone` says whether its last reference
/// has gone.
final class ExitingAddressSpace: @unchecked Sendable {
    let mmapLock: KernelRWSemaphore
    weak var live: AddressSpace?
    let locked = Atomic<Bool>(false)
    let evicted = Atomic<Bool>(false)
    init(_ mm: AddressSpace) { mmapLock = mm.mmapLock; live = mm }
    var gone: Bool { live == nil }
    var isLocked: Bool { locked.load(ordering: .acquiring) }
    var didEvict: Bool { evicted.load(ordering: .acquiring) }
}

/// A copy engine that, once armed, holds its next copy until opened: a
/// migration stopped between its unmap and its remap.
final class GatedCopyEngine: CopyEngine, @unchecked Sendable {
    let name = "gated"
    private let armed = Atomic<Bool>(false)
    private let holding = Atomic<Bool>(false)
    private let gate = Atomic<Bool>(false)

    func arm() { armed.store(true, ordering: .releasing) }
    func open() { gate.store(true, ordering: .releasing) }
    var isHolding: Bool { holding.load(ordering: .acquiring) }

    func copy(to destination: UnsafeMutableRawPointer, from source: UnsafeRawPointer, bytes: Int) {
        if armed.load(ordering: .acquiring) {
            holding.store(true, ordering: .releasing)
            let deadline = Date().addingTimeInterval(10)
            while !gate.load(ordering: .acquiring) && Date() < deadline { usleep(100) }
        }
        memcpy(destination, source, bytes)
    }
    func wait() {}
}
