import CSVMSupport
import Testing
import TestSupport
@testable import SVMEmu

/// The deterministic scheduler's engine: emulated threads are fibers on one
/// host thread, and what a host thread keeps per thread travels with each.
@Suite("Deterministic engine (fibers)")
struct FiberEngineTests {

    @Test("each emulated thread keeps its own CPU, host slot and record across switches; the caller's stay as they were")
    func perThreadStateTravelsWithEachFiber() throws {
        let kernel = try makeKernel()
        let mm = try AddressSpace(kernel: kernel)
        let base = try mm.mmap(length: 4 * PageGeometry.pageSize)
        try mm.store(base, 1)                       // the caller takes a CPU
        let callerCPU = kernel.cpus.currentIndex
        let callerSlot = svm_thread_slot()
        final class Seen: @unchecked Sendable {
            var cpus: [[Int]] = [[], [], []], slots: [[Int32]] = [[], [], []], names: [[String]] = [[], [], []]
        }
        let seen = Seen()
        let s = DeterministicScheduler(.init(seed: 4))
        for i in 0..<3 {
            s.spawn("t\(i)") {
                for _ in 0..<20 {
                    _ = try? mm.load(base + UInt64(i * PageGeometry.pageSize))   // takes a CPU, a scheduling point
                    seen.names[i].append(DeterministicScheduler.current?.name ?? "none")
                    seen.cpus[i].append(kernel.cpus.currentIndex)
                    seen.slots[i].append(svm_thread_slot())
                    HostThread.yield()
                }
            }
        }
        #expect(s.run() == .completed)
        #expect(s.steps > 60, "the threads switched at their points")
        for i in 0..<3 {
            #expect(seen.names[i] == Array(repeating: "t\(i)", count: 20))
            #expect(Set(seen.cpus[i]).count == 1, "t\(i) stays on one CPU: \(seen.cpus[i])")
            #expect(Set(seen.slots[i]).count == 1, "t\(i) keeps one host slot")
        }
        let cpus = seen.cpus.map { $0[0] }
        #expect(Set(cpus).count == 3 && !cpus.contains(callerCPU), "one CPU each, none the caller's: \(cpus)")
        #expect(Set(seen.slots.map { $0[0] }).count == 3)
        #expect(kernel.cpus.currentIndex == callerCPU, "the caller keeps its CPU")
        #expect(svm_thread_slot() == callerSlot)
        #expect(svm_det_current() == nil)
        withExtendedLifetime(mm) {}
    }

    @Test("a lock held across a switch is in its holder's lock-order stack only")
    func lockOrderStacksArePerFiber() throws {
        let a = KernelMutex("fiber test lock a")
        final class Seen: @unchecked Sendable { var other: String? = "unset" }
        let seen = Seen()
        var c = DeterministicScheduler.Configuration(seed: 2)
        c.preemptions = 0
        let s = DeterministicScheduler(c)
        s.spawn("holder") {
            a.withLock { HostClock.sleep(nanos: 10_000) }   // the other runs while this holds a
        }
        s.spawn("other") {
            HostClock.sleep(nanos: 1_000)
            seen.other = LockOrder.heldLocksDescription()
        }
        #expect(s.run() == .completed)
        #expect(seen.other == nil, "the other thread holds nothing: \(seen.other ?? "")")
    }

    /// A modify access to a class property that the test keeps open across
    /// scheduling points (not inlined, so that it is checked dynamically).
    final class Shared: @unchecked Sendable { var value = 0 }
    @inline(never) static func modify(_ x: inout Int, while body: () -> Void) { body(); x += 1 }

    @Test("Swift's exclusivity checks are per fiber: a modify open in one thread is not another's conflict")
    func exclusivityAccessSetsArePerFiber() throws {
        let shared = Shared()
        var c = DeterministicScheduler.Configuration(seed: 8)
        c.preemptions = 0
        let s = DeterministicScheduler(c)
        final class Seen: @unchecked Sendable { var reads = 0 }
        let seen = Seen()
        s.spawn("modifier") {
            Self.modify(&shared.value) {
                for _ in 0..<10 { HostThread.yield() }   // the reader runs inside this access
            }
        }
        s.spawn("reader") {
            for _ in 0..<10 {
                seen.reads += shared.value &* 0 + 1   // a read of the property on another emulated thread
                HostThread.yield()
            }
        }
        #expect(s.run() == .completed)
        #expect(shared.value == 1 && seen.reads == 10)
    }

    @Test("a run that never ends returns at its host timeout, and the host thread is free for the next run")
    func hostTimeoutAbandonsTheRun() throws {
        var c = DeterministicScheduler.Configuration(seed: 1)
        c.hostTimeoutSeconds = 0.2
        let s = DeterministicScheduler(c)
        s.spawn("spinner") { while true { HostThread.yield() } }
        let start = HostClock.hostNanos()
        #expect(s.run() == .hostTimeout)
        #expect(HostClock.hostNanos() - start < 5_000_000_000)
        let next = DeterministicScheduler(.init(seed: 1))
        next.spawn("t") { HostThread.yield() }
        #expect(next.run() == .completed)
    }

    /// `n` frames of recursion (with a scheduling point at the bottom); returns `n`.
    @inline(never) static func depth(_ n: Int) -> Int {
        if n == 0 { HostThread.yield(); return 0 }
        var pad = (n, n &+ 1, n &+ 2, n &+ 3)
        return withUnsafeMutableBytes(of: &pad) { $0.count } &+ depth(n - 1) &- 31
    }

    @Test("deep recursion fits a fiber's stack; sixty-four threads run to the end")
    func deepStacksAndManyThreads() throws {
        let s = DeterministicScheduler(.init(seed: 6))
        final class Sums: @unchecked Sendable { var v = [Int](repeating: -1, count: 64) }
        let sums = Sums()
        for i in 0..<64 {
            s.spawn("t\(i)") { sums.v[i] = Self.depth(i == 0 ? 10_000 : 100) }
        }
        #expect(s.run() == .completed)
        #expect(sums.v[0] == 10_000 && sums.v[1...].allSatisfy { $0 == 100 })
    }

    @Test("the lock-word table behaves like a dictionary under inserts, overwrites and removals")
    func pointerTableMatchesADictionary() throws {
        let table = PointerTable()
        var reference: [UInt: Int] = [:]
        var rng = SplitMix64(state: 77)
        for step in 0..<50_000 {
            // Few distinct keys, aligned like lock words, so that runs collide and wrap.
            let key = UInt(rng.next() % 300 + 1) &* 64
            let lock = UnsafeRawPointer(bitPattern: key)!
            switch rng.next() % 3 {
            case 0:
                table.set(lock, step)
                reference[key] = step
            case 1:
                #expect(table.remove(lock) == reference.removeValue(forKey: key))
            default:
                #expect(table[lock] == reference[key])
            }
        }
        for (key, value) in reference { #expect(table[UnsafeRawPointer(bitPattern: key)!] == value) }
    }
}
