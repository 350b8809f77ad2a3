import CSVMSupport
import Synchronization

/// Lock-order validation, lockdep's idea: every classed lock a thread takes
/// while it holds another adds the dependency "held, then taken" between
/// their classes, recorded across all runs of the process; a dependency that
/// closes a cycle is a ``Violation``, reported with the acquisition sites of
/// both orders even when no deadlock happened.
///
/// Classes (as all instances of a lock share a `lock_class_key`):
/// - each ``KernelMutex`` and ``KernelRWSemaphore`` is the class of its
///   name; every address space's mmap lock is the class "mmap lock";
/// - every folio lock is the class "folio lock";
/// - the kernel's spinlocks: "page-table lock" (the split PTE locks), "PMD
///   lock", "zone lock", "hugetlb fault mutex", and the emulated machine's
///   own: "CPU call-function queue lock", "copy-engine ring lock", "folio
///   copier queue lock".
///
/// Two locks of one class nest without a report (`spin_lock_nested()`: fork
/// and mremap hold two page-table locks). A trylock records no dependency
/// (it cannot wait), but the lock it takes is held for the ones that follow;
/// a bounded wait (``Folio/lock(timeoutNanos:)``) is a trylock and a sleep. A
/// reader of a ``KernelRWSemaphore`` holds it on its own thread, as every
/// other reader does on theirs.
///
/// Only a folio lock may be released by another thread than the one that
/// took it (the kernel's page lock is released by whoever finishes the
/// work); every other class is released by its holder.
///
/// On for the emulated threads of a running ``DeterministicScheduler``, on a
/// real thread between its ``enable()`` and ``disable()``, and on every
/// thread after ``enableEverywhere()`` (the test machine calls it before any
/// test runs, so every test validates its locks, real threads and emulated
/// alike). Off, each lock site costs one load and one predictable branch;
/// on, a lock whose dependencies are all known costs a walk of the calling
/// thread's held locks and no shared lock (a folio lock takes one).
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

    /// The classes of the lock-order graph (`held` to `taken`), the
    /// violations found, and who holds each folio lock. Guarded by `graphLock`.
    struct Graph {
        var edges: [LockClass: [LockClass: Dependency]] = [:]
        var violations: [Violation] = []
        /// The thread that holds each folio lock (any thread may release it).
        var folioOwners: [UnsafeRawPointer: HeldLocks] = [:]
        /// Class names after the built-in ones, by id.
        var names: [String] = LockClass.builtinNames
        var ids: [String: LockClass] = Dictionary(
            uniqueKeysWithValues: LockClass.builtinNames.enumerated().map { ($1, LockClass(id: UInt16($0))) })

        func name(_ c: LockClass) -> String { names[Int(c.id)] }

        /// The dependencies of a path from `from` to `to`, or nil.
        func path(from: LockClass, to: LockClass) -> [Dependency]? {
            var seen: Set<LockClass> = [from]
            var stack: [(LockClass, [Dependency])] = [(from, [])]
            while let (node, trail) = stack.popLast() {
                // By name, so that the path reported does not depend on which class registered first.
                for (next, dep) in (edges[node] ?? [:]).sorted(by: { $0.value.taken < $1.value.taken }) {
                    if next == to { return trail + [dep] }
                    if seen.insert(next).inserted { stack.append((next, trail + [dep])) }
                }
            }
            return nil
        }
    }

    /// One thread's held locks. `stack` is the thread's own (only it reads
    /// or writes it); `folioLocks` is guarded by `graphLock`, because another
    /// thread may release one, and `folioCount` mirrors its length for a
    /// read without that lock.
    final class HeldLocks: @unchecked Sendable {
        struct Entry {
            var lock: UnsafeRawPointer
            var lockClass: LockClass
            var site: LockSite
        }
        // Only the owning thread touches `enabled` and `stack`, and
        // `folioLocks` changes under `graphLock`: no dynamic exclusivity
        // check is needed (it cost a fifth of lockdep's time in a soak).
        /// ``enable()`` calls not yet undone on this thread.
        @exclusivity(unchecked) var enabled = 0
        @exclusivity(unchecked) var stack: [Entry] = []
        @exclusivity(unchecked) var folioLocks: [Entry] = []
        let folioCount: UnsafeMutablePointer<Int32>

        init() {
            stack.reserveCapacity(32)
            folioCount = .allocate(capacity: 1)
            folioCount.initialize(to: 0)
        }
        deinit { folioCount.deallocate() }
    }

    /// The graph, guarded by `graphLock` (a host lock: no scheduling point
    /// is ever taken while it is held).
    nonisolated(unsafe) static var graphState = Graph()
    static let graphLock = Mutex<Void>(())

    /// What the sanitizer is told the lock orders (a futex Mutex is no lock to it).
    nonisolated(unsafe) static let graphToken = UnsafeMutableRawPointer.allocate(byteCount: 1, alignment: 1)

    /// One bit per known dependency between classes below `fastClasses`
    /// (row: held, column: taken), set under `graphLock` once the
    /// dependency is in the graph and read without it: a lock whose
    /// dependencies are all known takes no shared lock.
    static let fastClasses = 256
    nonisolated(unsafe) static let knownBits: UnsafeMutablePointer<UInt64> = {
        let n = fastClasses * fastClasses / 64
        let p = UnsafeMutablePointer<UInt64>.allocate(capacity: n)
        p.initialize(repeating: 0, count: n)
        return p
    }()

    static func isKnown(_ held: LockClass, _ taken: LockClass) -> Bool {
        let h = Int(held.id), t = Int(taken.id)
        guard h < fastClasses, t < fastClasses else { return false }
        let bit = h * fastClasses + t
        return UnsafeAtomic(knownBits + bit >> 6).load(ordering: .relaxed) & (1 << UInt64(bit & 63)) != 0
    }

    static func markKnown(_ held: LockClass, _ taken: LockClass) {
        let h = Int(held.id), t = Int(taken.id)
        guard h < fastClasses, t < fastClasses else { return }
        let bit = h * fastClasses + t
        let w = knownBits + bit >> 6
        UnsafeAtomic(w).store(UnsafeAtomic(w).load(ordering: .relaxed) | 1 << UInt64(bit & 63), ordering: .releasing)  // under graphLock: one writer
    }

    static func withGraph<R>(_ body: (inout Graph) -> R) -> R {
        graphLock.withLock { _ in
            svm_tsan_acquire(graphToken)
            defer { svm_tsan_release(graphToken) }
            return body(&graphState)
        }
    }

    /// The class named `name` (registered on first use): the class of a
    /// ``KernelMutex`` or ``KernelRWSemaphore``.
    static func lockClass(named name: String) -> LockClass {
        withGraph { g in
            if let c = g.ids[name] { return c }
            guard g.names.count <= Int(UInt16.max) else {
                contractViolation("LockOrder: more than \(UInt16.max) lock classes (one per KernelMutex name)")
            }
            let c = LockClass(id: UInt16(g.names.count))
            g.names.append(name)
            g.ids[name] = c
            return c
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
            h.stack.removeAll(keepingCapacity: true)
            withGraph { g in
                for e in h.folioLocks where g.folioOwners[e.lock] === h { g.folioOwners[e.lock] = nil }
                h.folioLocks.removeAll()
                UnsafeAtomic(h.folioCount).store(0, ordering: .releasing)
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

    /// The locks the calling thread holds, described ("class (taken at
    /// site)", innermost last), or nil when it holds none or its locks are
    /// not validated: for the "no locks held here" checks
    /// (`debug_check_no_locks_held()`, `might_sleep()` in `mmput()`).
    static func heldLocksDescription() -> String? {
        guard svm_lockdep_enabled() else { return nil }
        let mine = held()
        guard validates(mine), !mine.stack.isEmpty || UnsafeAtomic(mine.folioCount).load(ordering: .acquiring) > 0 else { return nil }
        return withGraph { g in
            (mine.folioLocks + mine.stack).map { "\(g.name($0.lockClass)) (taken at \($0.site))" }.joined(separator: ", ")
        }
    }

    /// Whether the calling thread holds the non-folio lock `lock`, or nil
    /// when its locks are not validated (then no one knows): the exact half
    /// of `lockdep_assert_held()`. Walks the thread's own held locks only.
    @usableFromInline @inline(never)
    static func holds(_ lock: UnsafeRawPointer) -> Bool? {
        heldRecord()._withUnsafeGuaranteedRef { mine in
            guard validates(mine) else { return nil }
            return mine.stack.contains { $0.lock == lock }
        }
    }

    /// Every violation recorded so far, oldest first.
    public static var violations: [Violation] { withGraph { $0.violations } }

    /// Every dependency recorded so far, one per pair of classes (as the
    /// first thread made it), sorted by held class, then taken class: the
    /// order in which the process's locks nest (`/proc/lockdep`).
    public static var dependencies: [Dependency] {
        withGraph { g in
            g.edges.values.flatMap(\.values).sorted { ($0.held, $0.taken) < ($1.held, $1.taken) }
        }
    }

    /// The violations that involve the lock class `name`.
    ///
    /// - Parameter name: a lock class (a ``KernelMutex``'s name, "folio lock").
    /// - Returns: those violations, oldest first.
    public static func violations(involving name: String) -> [Violation] {
        violations.filter { v in v.closing.held == name || v.closing.taken == name }
    }

    /// "class (taken at site)" of `lock` when one of `records` holds it, else nil.
    /// The records' threads must not run meanwhile (a scheduler's parked threads).
    static func describe(held lock: UnsafeRawPointer, in records: [HeldLocks]) -> String? {
        withGraph { g in
            for r in records {
                if let e = (r.stack + r.folioLocks).last(where: { $0.lock == lock }) {
                    return "\(g.name(e.lockClass)) (taken at \(e.site))"
                }
            }
            return nil
        }
    }

    static func held() -> HeldLocks { heldRecord().takeUnretainedValue() }

    /// The calling thread's record, unretained (its thread-local keeps it
    /// alive): the hot paths borrow it with `_withUnsafeGuaranteedRef`, no
    /// retain and release per lock event.
    @inline(__always)
    static func heldRecord() -> Unmanaged<HeldLocks> {
        if let raw = svm_lockdep_thread() { return Unmanaged<HeldLocks>.fromOpaque(raw) }
        let h = HeldLocks()
        let record = Unmanaged.passRetained(h)
        svm_lockdep_set_thread(record.toOpaque())
        return record
    }

    static var threadName: String {
        if svm_det_active(), let t = DeterministicScheduler.current { return t.name }
        return "host thread \(svm_thread_slot())"
    }

    /// The calling thread is about to wait for a lock of class `lockClass`
    /// at `site` (before the wait, as `lock_acquire()` is, so that the
    /// dependency is recorded even when the wait never ends).
    @usableFromInline @inline(never)
    static func acquiring(_ lockClass: LockClass, site: LockSite) {
        heldRecord()._withUnsafeGuaranteedRef { mine in acquiring(lockClass, site: site, mine) }
    }

    private static func acquiring(_ lockClass: LockClass, site: LockSite, _ mine: HeldLocks) {
        guard validates(mine) else { return }
        for h in mine.stack where h.lockClass != lockClass && !isKnown(h.lockClass, lockClass) {
            record(held: h.lockClass, at: h.site, taken: lockClass, at: site)
        }
        if lockClass != .folio && UnsafeAtomic(mine.folioCount).load(ordering: .acquiring) > 0 && !isKnown(.folio, lockClass) {
            let first = withGraph { _ in mine.folioLocks.first?.site }
            if let first { record(held: .folio, at: first, taken: lockClass, at: site) }
        }
    }

    /// Adds the dependency "`held`, then `taken`" unless known, reporting a
    /// cycle it closes.
    static func record(held: LockClass, at heldSite: LockSite, taken: LockClass, at site: LockSite) {
        let thread = threadName
        withGraph { g in
            defer { markKnown(held, taken) }
            guard g.edges[held]?[taken] == nil else { return }
            let dep = Dependency(held: g.name(held), heldSite: heldSite.description, taken: g.name(taken),
                                 takenSite: site.description, thread: thread)
            if let back = g.path(from: taken, to: held) {
                let v = Violation(cycle: back, closing: dep)
                g.violations.append(v)
                if svm_det_active(), let t = DeterministicScheduler.current { t.scheduler.violationsFound.append(v) }
                if svm_lockdep_everywhere() { system_write_stderr("svmemu: \(v)\n") }
            }
            g.edges[held, default: [:]][taken] = dep
        }
    }

    /// The calling thread took `lock` of class `lockClass` at `site` (a
    /// trylock without ``acquiring(_:site:)`` first, which records no dependency).
    @usableFromInline @inline(never)
    static func acquired(_ lock: UnsafeRawPointer, _ lockClass: LockClass, site: LockSite) {
        heldRecord()._withUnsafeGuaranteedRef { mine in acquired(lock, lockClass, site: site, mine) }
    }

    private static func acquired(_ lock: UnsafeRawPointer, _ lockClass: LockClass, site: LockSite, _ mine: HeldLocks) {
        guard validates(mine) else { return }
        let entry = HeldLocks.Entry(lock: lock, lockClass: lockClass, site: site)
        guard lockClass == .folio else { return mine.stack.append(entry) }
        withGraph { g in
            if let previous = g.folioOwners[lock] { forget(lock, of: previous) }
            mine.folioLocks.append(entry)
            UnsafeAtomic(mine.folioCount).wrappingAdd(1, ordering: .acquiringAndReleasing)
            g.folioOwners[lock] = mine
        }
    }

    /// The calling thread released `lock`, which it took (every class but
    /// the folio lock).
    @usableFromInline @inline(never)
    static func released(_ lock: UnsafeRawPointer) {
        heldRecord()._withUnsafeGuaranteedRef { mine in
            guard let i = mine.stack.lastIndex(where: { $0.lock == lock }) else { return }
            mine.stack.remove(at: i)
        }
    }

    /// The folio lock `lock` was released, by any thread (or its folio freed).
    @usableFromInline @inline(never)
    static func releasedFolio(_ lock: UnsafeRawPointer) {
        withGraph { g in
            if let owner = g.folioOwners.removeValue(forKey: lock) { forget(lock, of: owner) }
        }
    }

    /// Drops `owner`'s record of folio lock `lock`; caller holds `graphLock`.
    private static func forget(_ lock: UnsafeRawPointer, of owner: HeldLocks) {
        // migrate_vma holds a batch of folio locks (its sources, then its
        // destinations) and releases them pair by pair: a plain loop over
        // the buffer, from the end, keeps releasing n of them cheap even
        // where it is quadratic (no closure or iterator per entry).
        let i = owner.folioLocks.withUnsafeBufferPointer { b -> Int in
            var k = b.count - 1
            while k >= 0 && b[k].lock != lock { k -= 1 }
            return k
        }
        guard i >= 0 else { return }
        owner.folioLocks.remove(at: i)
        UnsafeAtomic(owner.folioCount).wrappingAdd(-1, ordering: .acquiringAndReleasing)
    }

    /// A site as "file:line".
    static func site(_ file: StaticString, _ line: UInt) -> String {
        let f = "\(file)"
        return (f.split(separator: "/").last.map(String.init) ?? f) + ":\(line)"
    }
}

/// A lock class: every lock of one kind shares it, as locks initialised at
/// one place share a `lock_class_key`. The built-in classes have fixed ids;
/// a ``KernelMutex``'s name gets one on first use.
@usableFromInline
struct LockClass: Hashable, Sendable {
    @usableFromInline let id: UInt16
    @inlinable init(id: UInt16) { self.id = id }

    /// Every folio lock (`PG_locked`).
    @usableFromInline static let folio = LockClass(id: 0)
    /// The split PTE-table locks (`pte_lockptr()`).
    @usableFromInline static let pageTable = LockClass(id: 1)
    /// The PMD locks (`pmd_lockptr()`).
    @usableFromInline static let pmd = LockClass(id: 2)
    /// Each node's zone lock (`zone->lock`).
    @usableFromInline static let zone = LockClass(id: 3)
    /// hugetlb's fault mutex table (`hugetlb_fault_mutex_table`).
    @usableFromInline static let hugetlbFault = LockClass(id: 4)
    /// An emulated CPU's queue of cross-CPU calls (`call_single_queue`).
    @usableFromInline static let callQueue = LockClass(id: 5)
    /// A device copy engine's ring.
    @usableFromInline static let copyRing = LockClass(id: 6)
    /// The multi-threaded folio copier's work queue.
    @usableFromInline static let copierQueue = LockClass(id: 7)
    /// Every address space's mmap lock (`mm->mmap_lock`).
    @usableFromInline static let mmap = LockClass(id: 8)
    /// Every fork family's rmap lock (`anon_vma->root->rwsem`).
    @usableFromInline static let anonVMA = LockClass(id: 9)
    /// Every file's mapping-tree lock (`mapping->i_mmap_rwsem`).
    @usableFromInline static let iMmap = LockClass(id: 10)

    static let builtinNames = [
        "folio lock", "page-table lock", "PMD lock", "zone lock", "hugetlb fault mutex",
        "CPU call-function queue lock", "copy-engine ring lock", "folio copier queue lock", "mmap lock",
        "anon_vma lock", "i_mmap lock",
    ]
}

/// Where a lock was taken: `file:line`, and whether by a trylock. Made
/// without allocating; turned into text only when a dependency is new.
@usableFromInline
struct LockSite: CustomStringConvertible {
    @usableFromInline let file: StaticString
    @usableFromInline let line: UInt
    /// The trylock primitive, or "" for a lock that waits.
    @usableFromInline let trylock: StaticString

    @inlinable init(_ file: StaticString, _ line: UInt, trylock: StaticString = "") {
        self.file = file
        self.line = line
        self.trylock = trylock
    }

    @usableFromInline var description: String {
        let at = LockOrder.site(file, line)
        return trylock.utf8CodeUnitCount == 0 ? at : "\(at) (\(trylock))"
    }
}
