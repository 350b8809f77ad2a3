// CPUs kept busy in an address space, so that its TLB flushes have someone to
// interrupt: the overhead breakdown's --busy-cpus and bench memory's
// shootdown measure on them.
import SVMEmu
import Synchronization

/// CPUs that keep running an address space: each thread reads a page of its
/// own in a loop (so it is inside an access most of the time) until stopped.
/// A TLB flush of that address space then sends each an IPI and waits for it.
final class BusyCPUs: @unchecked Sendable {
    private let stopFlag = Atomic<Int>(0)
    private let running = Atomic<Int>(0)
    private let count: Int
    private let threads: HarnessThreads

    /// Maps the pages (on the calling thread) and spawns the readers as
    /// helpers of `threads`.
    init(_ mm: AddressSpace, count: Int, threads: HarnessThreads) throws(Errno) {
        self.count = count
        self.threads = threads
        guard count > 0 else { return }
        let base = try mm.mmap(length: count * PageGeometry.pageSize)
        for i in 0..<count { try mm.store(base + UInt64(i * PageGeometry.pageSize), 1) }
        for i in 0..<count {
            let page = base + UInt64(i * PageGeometry.pageSize)
            threads.spawn("busy\(i)") { [self] in
                _ = try? mm.load(page)
                running.add(1, ordering: .releasing)
                while stopFlag.load(ordering: .acquiring) == 0 { _ = try? mm.load(page) }
            }
        }
    }

    /// Waits until each has run in the address space once (bounded: 5 s).
    func waitUntilRunning() {
        let deadline = HostClock.nanos() + 5_000_000_000
        while running.load(ordering: .acquiring) < count && HostClock.nanos() < deadline { HostThread.yield() }
    }

    /// Stops the threads and waits for them (bounded: 5 s).
    func stop() {
        stopFlag.store(1, ordering: .releasing)
        _ = threads.waitForHelpers(timeoutNanos: 5_000_000_000)
    }
}

