import CSVMSupport
import Synchronization

/// Lock-order validation, lockdep's idea: every classed lock a thread takes
/// while it holds another adds the dependency "held, then taken" between
/// their classes, recorded across all runs of the process; a dependency that
/// closes a cycle is a ``Violation``, reported with the acquisition sites of
/// both orders even when no deadlock happened.
///
/// Classes: each ``KernelMutex`` and ``KernelRWSemaphore`` is the class of
/// its name; every folio lock is one class, "folio lock" (as all instances
/// of a lock share a `lock_class_key`). The kernel's spinlocks (page-table,
/// PMD, zone locks) are not classed yet. A trylock records no dependency (it
/// cannot wait), but the lock it takes is held for the ones that follow; a
/// bounded wait (``Folio/lock(timeoutNanos:)``) counts as a trylock.
///
/// On for the emulated threads of a running ``DeterministicScheduler``, on a
/// real thread between its ``enable()`` and ``disable()``, and on every
/// thread after ``enableEverywhere()`` (the test machine calls it before any
/// test runs, so every test validates its locks, real threads and emulated
/// alike). Off, each lock site costs one load and one predictable branch.
public enum LockOrder {

    /// "`held`, then `taken`", as one thread first did it.
    public struct Dependency: Sendable, Equatable, CustomStringConvertible {
        /// The class of the lock that was held.
        public let held: String
        /// Where the held lock was taken (`file:line`, or the primitive).
        public let heldSite: String
        /// The class of the lock taken while holding it.
        public let taken: String
        /// Where it was taken.
        public let takenSite: String
        /// The thread that did it.
        public let thread: String
        public var description: String {
            "\(thread) took \(taken) at \(takenSite) while holding \(held) (taken at \(heldSite))"
        }
    }

    /// A cycle among the recorded dependencies: `cycle` is the path the new
    /// dependency `closing` completes (its first dependency starts at
    /// `closing.taken`, its last ends at `closing.held`).
    public struct Violation: Sendable, Equatable, CustomStringConvertible {
        /// The dependencies recorded earlier that lead from `closing.taken` back to `closing.held`.
        public let cycle: [Dependency]
        /// The dependency that closed the cycle.
        public let closing: Dependency
        public var description: String {
            let classes = [closing.held, closing.taken] + cycle.map(\.taken)
            return "lock order violation: " + classes.joined(separator: " -> ") + "\n  "
                + (cycle + [closing]).map(\.description).joined(separator: "\n  ")
        }
    }

    struct Graph {
        var edges: [String: [String: Dependency]] = [:]
        var violations: [Violation] = []
        /// The stack of the thread that holds each classed lock.
        var owners: [UnsafeRawPointer: HeldLocks] = [:]

        /// The dependencies of a path from `from` to `to`, or nil.
        func path(from: String, to: String) -> [Dependency]? {
            var seen: Set<String> = [from]
            var stack: [(String, [Dependency])] = [(from, [])]
            while let (node, trail) = stack.popLast() {
                for (next, dep) in (edges[node] ?? [:]).sorted(by: { $0.key < $1.key }) {
                    if next == to { return trail + [dep] }
                    if seen.insert(next).inserted { stack.append((next, trail + [dep])) }
                }
            }
            return nil
        }
    }

    final class HeldLocks: @unchecked Sendable {
        /// ``enable()`` calls not yet undone on this thread.
        var enabled = 0
        var entries: [(lock: UnsafeRawPointer, lockClass: String, site: String)] = []
    }

    /// The graph, guarded by `graphLock` (a host lock: no scheduling point
    /// is ever taken while it is held).
    nonisolated(unsafe) static var graphState = Graph()
    static let graphLock = Mutex<Void>(())

    /// What the sanitizer is told the lock orders (a futex Mutex is no lock to it).
    nonisolated(unsafe) static let graphToken = UnsafeMutableRawPointer.allocate(byteCount: 1, alignment: 1)

    static func withGraph<R>(_ body: (inout Graph) -> R) -> R {
        graphLock.withLock { _ in
            svm_tsan_acquire(graphToken)
            defer { svm_tsan_release(graphToken) }
            return body(&graphState)
        }
    }

    /// Turns validation on for the calling thread (nests: each call needs a
    /// ``disable()`` on the same thread). Threads of a running
    /// ``DeterministicScheduler`` are validated without it.
    public static func enable() {
        held().enabled += 1
        svm_lockdep_enable(1)
    }

    /// Turns validation on for every thread of the process, for good; each
    /// new violation is then also written to standard error as it is found
    /// (lockdep's splat). The test machine (Tests/CTestSupport) calls it
    /// before any test runs.
    public static func enableEverywhere() { svm_lockdep_enable_everywhere() }

    /// Whether ``enableEverywhere()`` was called.
    public static var isEnabledEverywhere: Bool { svm_lockdep_everywhere() }

    /// Undoes one ``enable()`` of the calling thread.
    public static func disable() {
        let h = held()
        guard h.enabled > 0 else {
            contractViolation("LockOrder.disable() without an enable() on this thread")
        }
        h.enabled -= 1
        svm_lockdep_enable(-1)
        if h.enabled == 0 && !svm_lockdep_everywhere() {
            // Locks still held are no longer followed: forget them, or their
            // release (not seen now) would leave them held for ever.
            withGraph { g in
                for e in h.entries where g.owners[e.lock] === h { g.owners[e.lock] = nil }
                h.entries.removeAll()
            }
        }
    }

    /// Whether the calling thread's locks are validated.
    public static var isEnabled: Bool { svm_lockdep_enabled() && validates(held()) }

    /// Whether the thread of `stack` is validated: it enabled validation, or
    /// it is an emulated thread of a running scheduler.
    static func validates(_ stack: HeldLocks) -> Bool {
        stack.enabled > 0 || svm_lockdep_everywhere() || (svm_det_active() && svm_det_current() != nil)
    }

    /// Every violation recorded so far, oldest first.
    public static var violations: [Violation] { withGraph { $0.violations } }

    /// The violations that involve the lock class `name`.
    ///
    /// - Parameter name: a lock class (a ``KernelMutex``'s name, "folio lock").
    /// - Returns: those violations, oldest first.
    public static func violations(involving name: String) -> [Violation] {
        violations.filter { v in v.closing.held == name || v.closing.taken == name }
    }

    static func held() -> HeldLocks {
        if let raw = svm_lockdep_thread() { return Unmanaged<HeldLocks>.fromOpaque(raw).takeUnretainedValue() }
        let h = HeldLocks()
        svm_lockdep_set_thread(Unmanaged.passRetained(h).toOpaque())
        return h
    }

    static var threadName: String {
        if svm_det_active(), let t = DeterministicScheduler.current { return t.name }
        return "host thread \(svm_thread_slot())"
    }

    /// The calling thread is about to wait for a lock of class `lockClass`
    /// at `site` (before the wait, as `lock_acquire()` is, so that the
    /// dependency is recorded even when the wait never ends).
    @usableFromInline @inline(never)
    static func acquiring(_ lockClass: String, site: String) {
        let mine = held()
        guard validates(mine) else { return }
        let thread = threadName
        withGraph { g in
            for h in mine.entries where h.lockClass != lockClass && g.edges[h.lockClass]?[lockClass] == nil {
                let dep = Dependency(held: h.lockClass, heldSite: h.site, taken: lockClass, takenSite: site,
                                     thread: thread)
                if let back = g.path(from: lockClass, to: h.lockClass) {
                    let v = Violation(cycle: back, closing: dep)
                    g.violations.append(v)
                    if svm_lockdep_everywhere() { system_write_stderr("svmemu: \(v)\n") }
                }
                g.edges[h.lockClass, default: [:]][lockClass] = dep
            }
        }
    }

    /// The calling thread took `lock` of class `lockClass` at `site` (a
    /// trylock without ``acquiring(_:site:)`` first, which records no dependency).
    @usableFromInline @inline(never)
    static func acquired(_ lock: UnsafeRawPointer, _ lockClass: String, site: String) {
        let mine = held()
        guard validates(mine) else { return }
        withGraph { g in
            mine.entries.append((lock, lockClass, site))
            g.owners[lock] = mine
        }
    }

    /// `lock` was released (by any validated thread: a folio lock may be
    /// released by another thread than the one that took it).
    @usableFromInline @inline(never)
    static func released(_ lock: UnsafeRawPointer) {
        guard validates(held()) else { return }
        withGraph { g in
            guard let owner = g.owners.removeValue(forKey: lock),
                  let i = owner.entries.lastIndex(where: { $0.lock == lock }) else { return }
            owner.entries.remove(at: i)
        }
    }

    /// A site as "file:line".
    @usableFromInline static func site(_ file: StaticString, _ line: UInt) -> String {
        let f = "\(file)"
        return (f.split(separator: "/").last.map(String.init) ?? f) + ":\(line)"
    }
}
