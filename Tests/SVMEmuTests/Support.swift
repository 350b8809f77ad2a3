import Foundation
import Synchronization
import Testing
@testable import SVMEmu

// Shared helpers of the memory-core tests: a small machine per test, bounded
// thread runs, and snapshots of the state a failed call must leave alone.

let pageSize = 4096
let hugeSize = 2 << 20

/// A machine for one test: two 64 MiB nodes, the given THP mode.
func makeKernel(thp: TransparentHugepageMode = .madvise) -> Kernel {
    var config = KernelConfiguration()
    config.nodeSizes = [64 << 20, 64 << 20]
    config.maxPhysicalBytes = 1 << 30
    config.addressSpaceSize = 4 << 30
    config.transparentHugepage = thp
    return Kernel(config)
}

/// Boots a kernel with one address space and runs `body`. The address space
/// is released before the kernel (it refers to the kernel unowned).
func withMachine<R>(thp: TransparentHugepageMode = .madvise,
                    _ body: (Kernel, AddressSpace) throws -> R) rethrows -> R {
    let kernel = makeKernel(thp: thp)
    var mm: AddressSpace? = AddressSpace(kernel: kernel)
    defer {
        mm = nil
        withExtendedLifetime(kernel) {}
    }
    return try body(kernel, mm!)
}

/// A flag or counter threads can share.
final class SharedCounter: Sendable {
    let value = Atomic<Int>(0)
    func add(_ n: Int = 1) { value.add(n, ordering: .relaxed) }
    var current: Int { value.load(ordering: .acquiring) }
}

/// Problems seen on other threads, reported by the test thread.
final class ThreadIssues: Sendable {
    private let list = Mutex<[String]>([])
    func record(_ s: String) { list.withLock { $0.append(s) } }
    var all: [String] { list.withLock { $0 } }
}

/// Starts `count` real threads running `body(index)`; they start together
/// (a spin barrier) and the call waits at most `timeout` seconds for all of
/// them. Returns false when one did not finish in time: the objects in
/// `keepAlive` are then leaked on purpose so that a stuck thread never touches
/// freed emulated memory, and the caller fails the test instead of hanging.
///
/// `body` (and what it captures, typically the address space) is released
/// before this returns: a `Thread` drops its block only when it is itself
/// deallocated, which may be after the caller has released the kernel.
func runThreads(_ count: Int, timeout: Double = 30, keepAlive: [AnyObject],
                _ body: @escaping @Sendable (Int) -> Void) -> Bool {
    let done = DispatchSemaphore(value: 0)
    let ready = SharedCounter()
    let box = BodyBox(body)
    for i in 0..<count {
        let t = Thread {
            ready.add()
            let start = Date()
            while ready.current < count && Date().timeIntervalSince(start) < 5 { sched_yield() }
            do {
                let b = box.body
                b?(i)
            }
            done.signal()
        }
        t.stackSize = 1 << 20
        t.start()
    }
    let deadline = DispatchTime.now() + timeout
    for _ in 0..<count where done.wait(timeout: deadline) == .timedOut {
        for o in keepAlive { _ = Unmanaged.passRetained(o) }
        return false
    }
    box.clear()
    return true
}

/// Holds a thread body so that it can be released independently of the threads.
final class BodyBox: Sendable {
    private let stored: Mutex<(@Sendable (Int) -> Void)?>
    init(_ body: @escaping @Sendable (Int) -> Void) { stored = Mutex(body) }
    var body: (@Sendable (Int) -> Void)? { stored.withLock { $0 } }
    func clear() { stored.withLock { $0 = nil } }
}

/// Runs `body` on one new thread and waits for it at most `timeout` seconds.
func onAnotherThread(timeout: Double = 10, keepAlive: [AnyObject], _ body: @escaping @Sendable () -> Void) -> Bool {
    runThreads(1, timeout: timeout, keepAlive: keepAlive) { _ in body() }
}

/// Polls `condition` until it holds or `seconds` pass.
func eventually(within seconds: Double = 5, _ condition: () -> Bool) -> Bool {
    let start = Date()
    while !condition() {
        if Date().timeIntervalSince(start) > seconds { return false }
        usleep(200)
    }
    return true
}

/// What a failed call must not change: the VMAs and every counter.
struct StateSnapshot: Equatable {
    var vmas: [String]
    var vmstat: [String: UInt64]
    var freePages: UInt64

    init(_ kernel: Kernel, _ mm: AddressSpace) {
        vmas = mm.mappings.map(\.description)
        vmstat = kernel.vmstat.snapshot()
        freePages = kernel.freePages
    }
}

/// A byte unique to (address, seed), for pattern checks of single bytes.
func patternByte(_ address: UInt64, _ seed: UInt8) -> UInt8 {
    UInt8(truncatingIfNeeded: (address >> 12) &* 31 &+ (address & 4095) &* 7) &+ seed
}

/// Writes one distinct byte at offset `offset` of every page of the range.
func stampPages(_ mm: AddressSpace, _ start: UInt64, pages: Int, offset: UInt64 = 123, seed: UInt8 = 1) throws {
    for i in 0..<pages {
        let a = start + UInt64(i * pageSize) + offset
        try mm.store(a, patternByte(a, seed))
    }
}

/// Whether every page of the range still holds the byte `stampPages` wrote.
func stampsIntact(_ mm: AddressSpace, _ start: UInt64, pages: Int, offset: UInt64 = 123, seed: UInt8 = 1) throws -> Bool {
    for i in 0..<pages {
        let a = start + UInt64(i * pageSize) + offset
        if try mm.load(a) != patternByte(a, seed) { return false }
    }
    return true
}

/// The page mapped at `address` (PTE or inside a PMD mapping), or nil.
func mappedPage(_ kernel: Kernel, _ mm: AddressSpace, _ address: UInt64) -> Page? {
    let (level, e) = mm.entry(at: address)
    guard e.kind == .present else { return nil }
    let pfn = level == .pmd ? e.pfn + ((address & UInt64(hugeSize - 1)) >> 12) : e.pfn
    return kernel.page(pfn: pfn)
}

/// Whether every byte of the range reads as zero.
func allZero(_ mm: AddressSpace, _ start: UInt64, length: Int) throws -> Bool {
    let bytes = try mm.read(start, count: length)
    return bytes.allSatisfy { $0 == 0 }
}

func delta(_ before: [String: UInt64], _ kernel: Kernel, _ item: VMStatItem) -> Int64 {
    Int64(kernel.vmstat[item]) - Int64(before[item.name] ?? 0)
}
