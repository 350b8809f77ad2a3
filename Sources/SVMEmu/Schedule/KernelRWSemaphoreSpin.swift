import CSVMSupport

// The rwsem's optimistic spinning (kernel/locking/rwsem.c with
// CONFIG_RWSEM_SPIN_ON_OWNER): a writer spins while the owner runs instead
// of sleeping at once. The rest of the semaphore is KernelRWSemaphore.swift
// (fast paths) and KernelRWSemaphoreSlowPath.swift.
extension KernelRWSemaphore {
    enum OwnerState { case null, writer, reader, nonSpinnable }

    /// `rwsem_owner_state()`.
    func ownerState(_ o: UInt64) -> OwnerState {
        if o & Self.nonSpinnable != 0 { return .nonSpinnable }
        if o & Self.readerOwned != 0 { return .reader }
        return o & ~Self.ownerFlags != 0 ? .writer : .null
    }

    /// `rwsem_can_spin_on_owner()`.
    func canSpinOnOwner() -> Bool {
        let det = svm_det_active()
        if det && DeterministicScheduler.needResched() { return false }
        let o = owner.load(ordering: .acquiring)
        if o & Self.nonSpinnable != 0 { return false }
        let task = UInt(o & ~Self.ownerFlags)
        if task != 0 && o & Self.readerOwned == 0 && det && !DeterministicScheduler.taskOnCPU(task) { return false }
        return true
    }

    /// `rwsem_spin_on_owner()`: while the same writer owns it and runs.
    func spinOnOwner() -> OwnerState {
        let det = svm_det_active()
        let o = owner.load(ordering: .acquiring)
        let state = ownerState(o)
        if state != .writer { return state }
        var rounds = 0
        while true {
            let now = owner.load(ordering: .acquiring)
            if now != o { return ownerState(now) }
            if det && !DeterministicScheduler.taskOnCPU(UInt(o & ~Self.ownerFlags)) { return .nonSpinnable }
            if !KernelMutex.spinRound(&rounds, det) { return .nonSpinnable }
        }
    }

    /// `rwsem_optimistic_spin()`: the one spinner (the OSQ) takes the lock
    /// when it frees, while a writer owner runs, or while readers own it
    /// until the reader-spin threshold passes (then it marks the lock
    /// non-spinnable).
    func optimisticSpin(_ me: UInt) -> Bool {
        let det = svm_det_active()
        var free: UInt64 = 0
        guard osq.compareExchange(&free, UInt64(me), successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring) else { return false }
        defer { osq.store(0, ordering: .releasing) }
        var previous = OwnerState.null
        var threshold: UInt64 = 0
        var loop = 0, rounds = 0
        while true {
            let state = spinOnOwner()
            if state == .nonSpinnable { return false }
            // rwsem_try_write_lock_unqueued()
            var c = count.load(ordering: .acquiring)
            while c & (Self.lockMask | Self.handoffFlag) == 0 {
                if count.compareExchange(&c, c | Self.writerLocked, successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring) {
                    owner.store(UInt64(me), ordering: .releasing)
                    return true
                }
            }
            if state == .reader {
                if previous != .reader {
                    if owner.load(ordering: .acquiring) & Self.nonSpinnable != 0 { return false }
                    let readers = min(count.load(ordering: .acquiring) >> 8, 30)
                    threshold = HostClock.nanos() &+ (20 + readers) * 1_000 / 2
                    loop = 0
                } else {
                    loop += 1
                    if loop & 0xf == 0 && HostClock.nanos() > threshold {
                        setNonSpinnable()
                        return false
                    }
                }
            }
            previous = state
            if !KernelMutex.spinRound(&rounds, det) { return false }
        }
    }
}
