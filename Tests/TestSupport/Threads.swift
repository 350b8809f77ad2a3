// Bounded thread runs for the test suites: every wait has a limit, and a run
// that does not finish fails its test instead of hanging it.

import Foundation
import Synchronization

/// A flag or counter threads can share.
public final class SharedCounter: Sendable {
    public let value = Atomic<Int>(0)
    public init() {}
    public func add(_ n: Int = 1) { value.add(n, ordering: .relaxed) }
    public var current: Int { value.load(ordering: .acquiring) }
}

/// Problems seen on other threads, reported by the test thread. Guarded by a
/// pthread mutex (NSLock), which ThreadSanitizer sees.
public final class ThreadIssues: @unchecked Sendable {
    private let lock = NSLock()
    private var list: [String] = []
    public init() {}
    public func record(_ s: String) { lock.withLock { list.append(s) } }
    public var all: [String] { lock.withLock { list } }
}

/// Holds a thread body so that it can be released independently of the threads.
final class BodyBox: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: (@Sendable (Int) -> Void)?
    init(_ body: @escaping @Sendable (Int) -> Void) { stored = body }
    var body: (@Sendable (Int) -> Void)? { lock.withLock { stored } }
    func clear() { lock.withLock { stored = nil } }
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
public func runThreads(_ count: Int, timeout: Double = 10, keepAlive: [AnyObject],
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

/// Runs `body` on one new thread and waits for it at most `timeout` seconds.
public func onAnotherThread(timeout: Double = 10, keepAlive: [AnyObject], _ body: @escaping @Sendable () -> Void) -> Bool {
    runThreads(1, timeout: timeout, keepAlive: keepAlive) { _ in body() }
}

/// Runs `body` on one new thread and returns what it returned (false when
/// the thread did not finish within `timeout` seconds). For a lock a test
/// holds "elsewhere": taken on the test thread, lock-order validation would
/// count it among the test thread's locks and record dependencies no real
/// holder makes.
public func onAnotherThread(timeout: Double = 10, _ body: @escaping @Sendable () -> Bool) -> Bool {
    let result = SharedCounter()
    guard runThreads(1, timeout: timeout, keepAlive: [], { _ in if body() { result.add() } }) else { return false }
    return result.current == 1
}

/// Polls `condition` until it holds or `seconds` pass.
public func eventually(within seconds: Double = 5, _ condition: () -> Bool) -> Bool {
    let start = Date()
    while !condition() {
        if Date().timeIntervalSince(start) > seconds { return false }
        usleep(200)
    }
    return true
}

/// A thread that stays alive and runs the closures it is given, one at a
/// time: an emulated CPU a test drives step by step (the CPU keeps its TLB
/// between steps because the thread keeps its CPU). Every wait is bounded.
public final class WorkerThread: @unchecked Sendable {
    private let lock = NSLock()
    private var queue: [@Sendable () -> Void] = []
    private var stopping = false
    private let work = DispatchSemaphore(value: 0)
    private let finished = DispatchSemaphore(value: 0)
    private let exited = DispatchSemaphore(value: 0)

    public init() {
        let t = Thread { [self] in
            while true {
                work.wait()
                let job: (@Sendable () -> Void)? = lock.withLock { queue.isEmpty ? nil : queue.removeFirst() }
                guard let job else { break }
                job()
                finished.signal()
            }
            exited.signal()
        }
        t.stackSize = 1 << 20
        t.start()
    }

    /// Starts `body` on the thread and returns at once; `wait` waits for it.
    public func start(_ body: @escaping @Sendable () -> Void) {
        lock.withLock { queue.append(body) }
        work.signal()
    }

    /// Waits at most `timeout` seconds for the oldest started body to finish.
    public func wait(timeout: Double = 10) -> Bool {
        finished.wait(timeout: .now() + timeout) == .success
    }

    /// Runs `body` on the thread and waits for it (at most `timeout` seconds).
    public func run(timeout: Double = 10, _ body: @escaping @Sendable () -> Void) -> Bool {
        start(body)
        return wait(timeout: timeout)
    }

    /// Ends the thread (its CPU goes back to its machine) and waits for it.
    public func stop(timeout: Double = 10) -> Bool {
        lock.withLock { stopping = true }
        work.signal()
        return exited.wait(timeout: .now() + timeout) == .success
    }
}
