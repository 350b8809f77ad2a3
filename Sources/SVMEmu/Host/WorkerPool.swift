import Synchronization
import CSVMSupport

/// A fixed set of host worker threads, the one way the copy stacks start
/// and stop theirs (``CopyWorkerPool`` under `LinkCopyEngine`, and
/// `MultiThreadCopier`'s batch workers): `count` threads each running
/// `body(index)` until it returns, and a join of them all.
struct HostWorkerThreads {
    private var handles: [HostThreadHandle] = []

    /// No threads.
    init() {}

    /// Starts `count` threads running `body(first)`, `body(first + 1)`, ...
    /// A host that refuses a thread stops the process, naming `user`: a copy
    /// stack without its workers would wait for them for ever.
    init(count: Int, first: Int = 0, for user: String, _ body: @escaping (Int) -> Void) {
        handles.reserveCapacity(count)
        for index in first..<(first + count) {
            guard let h = HostThreadHandle.spawn({ body(index) }) else {
                contractViolation("\(user): the host refused a copy worker thread")
            }
            handles.append(h)
        }
    }

    /// Whether no thread was started.
    var isEmpty: Bool { handles.isEmpty }

    /// Waits for every thread to end (their bodies must have been told to return).
    mutating func join() {
        for h in handles { h.join() }
        handles.removeAll()
    }
}

/// The copy worker pool: a fixed ring of copy jobs under a futex mutex,
/// workers sleeping on a futex sequence word, and a per-submitter
/// outstanding count that the last finished part wakes. `LinkCopyEngine`
/// splits its large copies across one.
///
/// Nothing is allocated per job; a full ring runs the job on the submitter.
final class CopyWorkerPool: @unchecked Sendable {
    struct Job {
        var destination: UnsafeMutableRawPointer
        var source: UnsafeRawPointer
        var bytes: Int
        /// The submitter's outstanding-part count (a futex word it waits on).
        var pending: UnsafeMutablePointer<UInt32>
    }
    static let capacity = 1024
    // words[0]: the ring lock, words[16]: sequence (own cache line).
    private let words: UnsafeMutablePointer<UInt32>
    private let ring: UnsafeMutablePointer<Job>
    private var head = 0, tail = 0
    private var stopping = false
    /// Protects the above: the ring's slots, `head`, `tail` and `stopping`.
    private var ringLock: SpinLockRef { SpinLockRef(words, .copyRing) }
    private var workers = HostWorkerThreads()

    init(workers count: Int) {
        words = .allocate(capacity: 32)
        words.initialize(repeating: 0, count: 32)
        ring = .allocate(capacity: CopyWorkerPool.capacity)
        // Each worker holds the pool until it returns (after shutdown()).
        workers = HostWorkerThreads(count: count, for: "LinkCopyEngine") { [self] _ in work() }
    }

    deinit {
        words.deallocate()
        ring.deallocate()
    }

    /// Workers sleep on it; bumped at every job queued and at shutdown.
    private var sequence: FutexWord { FutexWord(words + 16) }

    /// Queues `job` and counts it on its submitter's outstanding word; runs it
    /// on the caller when the ring is full.
    func submit(_ job: Job) {
        UnsafeAtomic<UInt32>(job.pending).wrappingAdd(1, ordering: .acquiringAndReleasing)
        let queued = ringLock.withLock { () -> Bool in
            if tail - head == CopyWorkerPool.capacity { return false }
            ring[tail % CopyWorkerPool.capacity] = job
            tail += 1
            sequence.store(sequence.load(ordering: .acquiring) &+ 1, ordering: .releasing)
            return true
        }
        guard queued else {
            CopyWorkerPool.run(job)
            return
        }
        sequence.wake(1)
    }

    private func work() {
        while true {
            let next = ringLock.withLock { () -> WorkerNext in
                if head != tail {
                    let job = ring[head % CopyWorkerPool.capacity]
                    head += 1
                    return .run(job)
                }
                return stopping ? .stop : .sleep(seen: sequence.load(ordering: .acquiring))
            }
            switch next {
            case .run(let job):
                CopyWorkerPool.run(job)
            case .stop:
                return
            case .sleep(let seen):
                sequence.wait(expected: seen)
            }
        }
    }

    /// What a worker found under the ring lock: a job, the pool stopping, or
    /// an empty ring at sequence `seen`.
    private enum WorkerNext {
        case run(Job)
        case stop
        case sleep(seen: UInt32)
    }

    static func run(_ job: Job) {
        svm_memcpy(job.destination, job.source, job.bytes)
        // Releasing: the submitter that sees the count reach 0 sees the bytes.
        let left = UnsafeAtomic<UInt32>(job.pending).wrappingSubtract(1, ordering: .acquiringAndReleasing).newValue
        if left == 0 { FutexWord(job.pending).wake(FutexWord.everyone) }
    }

    /// Waits until `*word` is 0: spins briefly, then sleeps on the futex.
    static func waitForZero(_ word: UnsafeMutablePointer<UInt32>) {
        let futex = FutexWord(word)
        var spins = 0
        while true {
            let v = futex.load(ordering: .acquiring)
            if v == 0 { return }
            if spins < 4000 {
                spins += 1
                svm_cpu_relax()
            } else {
                futex.wait(expected: v)
            }
        }
    }

    /// Stops and joins the workers once the ring is drained.
    func shutdown() {
        ringLock.withLock {
            stopping = true
            sequence.store(sequence.load(ordering: .acquiring) &+ 1, ordering: .releasing)
        }
        sequence.wake(FutexWord.everyone)
        workers.join()
    }
}
