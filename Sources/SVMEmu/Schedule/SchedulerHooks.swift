import Synchronization
import CSVMSupport

/// The scheduler's deadlock report and its hooks: what the emulator's
/// futexes and locks (through the C hooks) and its hot paths (out of line,
/// only when `svm_det_active()` said a scheduler runs) call on the running
/// emulated thread.
extension DeterministicScheduler {
    // MARK: deadlocks

    /// Records the deadlock (or the end of the run); ``endRun(from:)`` follows.
    func deadlocked(_ me: EmulatedThread) {
        if threads.allSatisfy({ $0.state == .finished }) {
            ending = .completed
        } else {
            ending = .deadlock(waitForReport())
        }
    }

    /// The waits of every blocked thread and the cycle among them, if one.
    func waitForReport() -> DeadlockReport {
        var waits: [DeadlockReport.Wait] = []
        for t in threads where t.state == .blocked && t.deadline == nil {
            guard let w = t.waitWord else { continue }
            let key = t.waitsForLock ?? UnsafeRawPointer(w)
            let holder = owners[key].map { threads[$0].name }
            let held = t.held.map { describe($0.lock) }
            waits.append(.init(thread: t.name, waitsFor: describe(key), heldBy: holder, holds: held,
                               clock: t.clock))
        }
        // Follow thread -> holder of its lock until a thread repeats.
        var cycle: [DeadlockReport.Wait] = []
        for start in waits {
            var seen: [String] = []
            var at: DeadlockReport.Wait? = start
            while let w = at, !seen.contains(w.thread) {
                seen.append(w.thread)
                at = w.heldBy.flatMap { h in waits.first { $0.thread == h } }
            }
            if let w = at, let i = seen.firstIndex(of: w.thread) {
                cycle = seen[i...].compactMap { n in waits.first { $0.thread == n } }
                break
            }
        }
        return DeadlockReport(waits: waits, cycle: cycle, step: step)
    }

    /// A lock's name: the one given with ``name(_:_:)``, else its lock-order
    /// class and where its holder took it, else its address.
    func describe(_ lock: UnsafeRawPointer) -> String {
        if let i = lockNameIndex[lock] { return lockNames[i] }
        if let classed = LockOrder.describe(held: lock, in: threads.compactMap(\.lockRecord)) { return classed }
        return "lock@0x" + String(UInt(bitPattern: lock), radix: 16)
    }

    // MARK: hooks (called on the running emulated thread)

    func futexWait(_ me: EmulatedThread, _ word: UnsafeMutablePointer<UInt32>, _ expected: UInt32,
                   _ timeout: UInt64) -> Int32 {
        if UnsafeAtomic(word).load(ordering: .acquiring) != expected {
            me.pendingLockWait = nil
            point(me, cost: configuration.costs.futex, "futex wait (value changed)")
            return EAGAIN
        }
        me.state = .blocked
        me.waitWord = word
        me.deadline = timeout > 0 ? me.clock &+ timeout : nil
        me.timedOut = false
        me.waitsForLock = me.pendingLockWait
        me.pendingLockWait = nil
        blockSequence &+= 1
        me.blockSequence = blockSequence
        step &+= 1
        reschedule(me, "futex wait")
        return me.timedOut ? ETIMEDOUT : 0
    }

    func futexWake(_ me: EmulatedThread, _ word: UnsafeMutablePointer<UInt32>, _ count: Int32) -> Int32 {
        var woken: Int32 = 0
        while woken < count {
            var first: EmulatedThread? = nil
            for t in threads where t.state == .blocked && t.waitWord == word {
                if first == nil || t.blockSequence < first!.blockSequence { first = t }
            }
            guard let t = first else { break }
            t.state = .runnable
            t.waitWord = nil
            t.deadline = nil
            t.timedOut = false
            t.waitsForLock = nil
            if !cpus.isEmpty && !t.observer {
                placeWoken(t, by: me)
            } else {
                t.clock = max(t.clock, me.clock &+ configuration.costs.wake)
            }
            woken += 1
        }
        me.clock &+= configuration.costs.futex
        return woken
    }

    /// A lock event of `me` (`SVM_DET_SLEEPING` or'ed in for a sleeping
    /// lock). A release drops the lock from the releasing thread's list when
    /// it holds it (a shared holder of an rwsem releases its own hold), else
    /// from the recorded owner's (a folio lock is released by whoever
    /// finishes the work); the owner recorded for deadlock reports moves to
    /// another holder while one remains.
    func lockEvent(_ me: EmulatedThread, _ lock: UnsafeRawPointer, _ event: Int32) {
        switch event & ~Int32(SVM_DET_SLEEPING) {
        case Int32(SVM_DET_BEFORE_ACQUIRE):
            point(me, cost: configuration.costs.lock, "acquire")
        case Int32(SVM_DET_ACQUIRED):
            owners.set(lock, me.index)
            me.held.append((lock, event & Int32(SVM_DET_SLEEPING) != 0))
        default:
            let owner = owners[lock]
            if let i = me.held.lastIndex(where: { $0.lock == lock }) {
                me.held.remove(at: i)
            } else if let o = owner, let i = threads[o].held.lastIndex(where: { $0.lock == lock }) {
                threads[o].held.remove(at: i)
            }
            if let o = owner, !threads[o].held.contains(where: { $0.lock == lock }) {
                _ = owners.remove(lock)
                // Only a sleeping lock (an rwsem's readers) has other holders.
                if event & Int32(SVM_DET_SLEEPING) != 0,
                   let other = threads.first(where: { t in t.held.contains { $0.lock == lock } }) {
                    owners.set(lock, other.index)
                }
            }
            point(me, cost: configuration.costs.unlock, "release", release: true)
        }
    }

    // MARK: the C hooks

    static let installHooks: Void = {
        svm_det_install({ word, expected, timeout in
            guard let word, let raw = svm_det_current() else { return -1 }
            return Unmanaged<EmulatedThread>.fromOpaque(raw)._withUnsafeGuaranteedRef { t in
                t.scheduler.futexWait(t, word, expected, timeout)
            }
        }, { word, count in
            guard let word, let raw = svm_det_current() else { return -1 }
            return Unmanaged<EmulatedThread>.fromOpaque(raw)._withUnsafeGuaranteedRef { t in
                t.scheduler.futexWake(t, word, count)
            }
        }, { lock, event in
            guard let lock else { return }
            DeterministicScheduler.withCurrent { t in t.scheduler.lockEvent(t, lock, event) }
        })
    }()
}

/// The hooks of the Swift side of the emulator: each is called only when
/// `svm_det_active()` said a scheduler runs, out of line.
extension DeterministicScheduler {
    /// The scheduling points the emulator's hot paths take through
    /// ``schedulingPoint(_:)``, each with its cost (``VirtualCosts``).
    @usableFromInline enum PointKind {
        /// The start of a CPU access (``VirtualCosts/access``).
        case access
        /// The entry of a fault (``VirtualCosts/fault``).
        case fault
        /// A spin-wait round (``VirtualCosts/yield``).
        case yield
    }

    /// A scheduling point of `kind` on the calling thread, if it is emulated.
    @usableFromInline @inline(never)
    static func schedulingPoint(_ kind: PointKind) {
        withCurrent { t in
            let s = t.scheduler, costs = s.configuration.costs
            switch kind {
            case .access: s.point(t, cost: costs.access, "access")
            case .fault:
                // Into the fault handler: kernel mode until faultReturned().
                t.inKernel &+= 1
                s.point(t, cost: costs.fault, "fault")
            case .yield: s.point(t, cost: costs.yield, "yield")
            }
        }
    }

    /// Runs `body` with the calling emulated thread, if it is one (lent, not
    /// retained: its scheduler holds it for the run).
    @inline(__always)
    static func withCurrent(_ body: (EmulatedThread) -> Void) {
        guard let raw = svm_det_current() else { return }
        Unmanaged<EmulatedThread>.fromOpaque(raw)._withUnsafeGuaranteedRef(body)
    }

    /// Advances the calling emulated thread's clock by `nanos` (a modelled
    /// delay); returns false when the caller is not an emulated thread.
    @usableFromInline @inline(never)
    static func sleep(nanos: UInt64) -> Bool {
        guard let t = current else { return false }
        let s = t.scheduler
        if !s.cpus.isEmpty && !t.observer && nanos > 0 {
            // A sleep blocks until its timer: the CPU goes to another thread.
            s.step &+= 1
            t.state = .blocked
            t.waitWord = nil
            t.deadline = t.clock &+ nanos
            t.timedOut = false
            s.reschedule(t, "sleep")
            return true
        }
        t.asleepUntil = t.clock &+ nanos
        t.clock &+= nanos
        s.point(t, cost: 0, "sleep")
        return true
    }

    /// `usleep_range()` of the calling emulated thread: with the CPU model,
    /// a sleep that ends at the first scheduler tick at or after
    /// `minNanos` (the tick's interrupt runs the timer past its soft
    /// expiry), else at `maxNanos`; the tick counts only for a sleep of at
    /// most one tick period, which keeps the tick running on an idle CPU.
    /// Returns false when the caller is not an emulated thread or there is
    /// no CPU model (the caller sleeps the maximum).
    @usableFromInline @inline(never)
    static func sleepRange(minNanos: UInt64, maxNanos: UInt64) -> Bool {
        guard let t = current, !t.scheduler.cpus.isEmpty, !t.observer else { return false }
        let tick = t.scheduler.configuration.tickNanos
        let soft = t.clock &+ minNanos, hard = t.clock &+ maxNanos
        var expiry = hard
        // The tick goes on through the sleep when the timer is due within one
        // tick period (an idle CPU keeps it then); a longer sleep may see it
        // stopped while the CPU idles, so it ends at its hard expiry here.
        if tick > 0 && maxNanos <= tick {
            let firstTick = (soft &+ tick &- 1) / tick &* tick
            if firstTick < hard { expiry = firstTick }
        }
        return sleep(nanos: expiry &- t.clock)
    }

    /// Advances the calling emulated thread's clock by `nanos` of busy
    /// waiting: it keeps its CPU. Returns false when the caller is not an
    /// emulated thread.
    @usableFromInline @inline(never)
    static func spin(nanos: UInt64) -> Bool {
        guard let t = current else { return false }
        t.clock &+= nanos
        t.scheduler.point(t, cost: 0, "spin")
        return true
    }

    /// A CPU copy of `bytes` by the calling thread, if it is emulated: a
    /// scheduling point costing ``VirtualCosts/copyPerKiB`` per KiB.
    @usableFromInline @inline(never)
    static func copied(bytes: Int) {
        withCurrent { t in
            t.scheduler.point(t, cost: t.scheduler.configuration.costs.copyPerKiB &* UInt64(bytes) / 1024, "copy")
        }
    }

    /// The calling emulated thread's virtual clock (with a fixed origin of one
    /// second, so that differences never go below zero), or nil.
    @usableFromInline @inline(never)
    static func virtualNanos() -> UInt64? {
        guard let t = current else { return nil }
        return 1_000_000_000 &+ t.clock
    }

    /// A lock event of the folio lock (or another lock the scheduler does not see in C).
    @usableFromInline @inline(never)
    static func lockEvent(_ lock: UnsafeRawPointer, _ event: Int32) {
        withCurrent { t in t.scheduler.lockEvent(t, lock, event) }
    }
}

/// What a deadlocked run left: who waits for which lock, who holds it.
public struct DeadlockReport: Sendable, Equatable, CustomStringConvertible {
    /// One thread's indefinite wait.
    public struct Wait: Sendable, Equatable {
        /// The waiting thread.
        public let thread: String
        /// The lock (or futex word) it waits for.
        public let waitsFor: String
        /// The thread that took that lock, if the scheduler saw it taken.
        public let heldBy: String?
        /// The locks the waiting thread holds.
        public let holds: [String]
        /// Its virtual clock, in nanoseconds.
        public let clock: UInt64
    }
    /// Every indefinite wait.
    public let waits: [Wait]
    /// The wait-for cycle (each waits for a lock the next holds), empty when
    /// the waits form none (a lost wake-up, a lock nobody holds).
    public let cycle: [Wait]
    /// The step at which no thread could run.
    public let step: UInt64

    public var description: String {
        let shown = cycle.isEmpty ? waits : cycle
        let lines = shown.map { w in
            "\(w.thread) holds [\(w.holds.joined(separator: ", "))] and waits for \(w.waitsFor)"
                + (w.heldBy.map { " (held by \($0))" } ?? "")
        }
        return (cycle.isEmpty ? "deadlock (no cycle among the waits): " : "deadlock, wait-for cycle: ")
            + lines.joined(separator: "; ") + " at step \(step)"
    }
}

/// A seeded generator (SplitMix64): the same sequence for the same state on
/// every host. The scheduler's choices and the soak's operations come from it.
public struct SplitMix64: Sendable {
    /// The generator's state; the next value is a function of it alone.
    public var state: UInt64
    /// A generator starting at `state`.
    public init(state: UInt64) { self.state = state }
    /// The next value of the sequence.
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

extension DeterministicScheduler {
    /// The calling emulated thread's scheduler's wake-up latency
    /// (``VirtualCosts/wake``), or 0 on any other thread: what a thread that
    /// woke others sleeps to leave together with them.
    public static var wakeLatency: UInt64 {
        guard svm_det_active(), let t = current else { return 0 }
        return t.scheduler.configuration.costs.wake
    }

    /// Names `lock` in the deadlock reports of the calling emulated thread's scheduler.
    @usableFromInline @inline(never)
    static func nameLock(_ lock: UnsafeRawPointer, _ name: String) {
        withCurrent { t in
            if t.scheduler.lockNameIndex[lock] == nil { t.scheduler.name(lock, name) }
        }
    }
}
