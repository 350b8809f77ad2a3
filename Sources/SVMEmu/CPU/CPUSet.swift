import CSVMSupport
import Synchronization

/// The emulated machine's CPUs: a fixed number of slots
/// (``KernelConfiguration/cpus``), each with its own TLB.
///
/// A thread runs on one CPU of a machine: it takes a free slot the first time
/// it touches that machine's memory and gives it back when it exits (or when
/// it moves on to another machine). Two live threads never share a CPU; when
/// every slot is taken, a newcomer waits for one to be given back (and the
/// machine records a diagnostic), as a task waits for a CPU on a run queue.
///
/// A CPU that has no thread keeps its TLB and the address space it last ran
/// (a CPU in lazy-TLB mode): flushes do not wait for it, and whoever runs on
/// it next catches up from the address space's flush generation.
public final class CPUSet: @unchecked Sendable {
    /// The most CPUs a machine can have: one bit each in `mm_cpumask()`.
    public static let maxCPUs = 64

    /// CPUs in this machine.
    public let count: Int

    /// Per-CPU words (`CPUWord` offsets), `CPUWord.stride` words a CPU: the
    /// first cache line is read by flushers, the second only by the CPU itself.
    @usableFromInline let words: UnsafeMutablePointer<UInt64>
    /// Per-CPU TLBs, `TLB.entriesPerCPU` entries a CPU, reached only by the
    /// thread running on the CPU.
    @usableFromInline let tlbs: UnsafeMutablePointer<TLBEntry>
    /// The address space each CPU has loaded (retained), or nil.
    let loaded: UnsafeMutablePointer<Unmanaged<TLBContext>?>
    /// Free slots, one bit a CPU.
    let freeMask: Atomic<UInt64>
    /// Bumped and woken whenever a slot is given back (a futex word).
    let slotReleases: UnsafeMutablePointer<UInt32>
    /// The machine's counters (the IPIs a CPU receives are counted by it).
    @usableFromInline let vmstat: VMStat
    /// Without `membarrier()` the CPU side of the shootdown handshake fences
    /// on every access; with it, a compiler barrier is enough.
    @usableFromInline let fenceOnAccess: Bool
    /// Whether accesses through a TLB entry are checked against the page tables.
    @usableFromInline let checksStaleEntries: Bool
    /// For diagnostics only; a CPU set outlives its machine while threads still hold slots.
    weak var kernel: Kernel?

    /// - Throws: ``HostMemoryRefusal`` when the host refuses the TLBs' memory.
    init(count: Int, checksStaleEntries: Bool, vmstat: VMStat) throws(HostMemoryRefusal) {
        self.count = count
        self.vmstat = vmstat
        self.checksStaleEntries = checksStaleEntries
        // First: a refusal leaves nothing allocated behind.
        tlbs = try HostMemory.reserve(bytes: count * TLB.entriesPerCPU * MemoryLayout<TLBEntry>.stride, for: "the CPUs' TLBs")
            .assumingMemoryBound(to: TLBEntry.self)
        fenceOnAccess = !svm_membarrier_available()
        words = .allocate(capacity: count * CPUWord.stride)
        words.initialize(repeating: 0, count: count * CPUWord.stride)
        for i in 0..<count { words[i * CPUWord.stride + CPUWord.epoch] = 1 }
        loaded = .allocate(capacity: count)
        loaded.initialize(repeating: nil, count: count)
        freeMask = Atomic(count == 64 ? ~0 : (UInt64(1) << UInt64(count)) - 1)
        slotReleases = .allocate(capacity: 1)
        slotReleases.initialize(to: 0)
    }

    deinit {
        for i in 0..<count { loaded[i]?.release() }
        loaded.deallocate()
        words.deallocate()
        HostMemory.release(tlbs, bytes: count * TLB.entriesPerCPU * MemoryLayout<TLBEntry>.stride)
        slotReleases.deallocate()
    }

    /// The CPU the calling thread runs on, taking a free one first if it has none.
    @inlinable @inline(__always)
    func current() -> CPU {
        let i = svm_bound_cpu(Unmanaged.passUnretained(self).toOpaque())
        return cpu(i >= 0 ? Int(i) : bindCurrentThread())
    }

    /// The CPU the calling thread runs on, or nil when it has none here.
    func currentIfBound() -> CPU? {
        let i = svm_bound_cpu(Unmanaged.passUnretained(self).toOpaque())
        return i >= 0 ? cpu(Int(i)) : nil
    }

    @inlinable @inline(__always)
    func cpu(_ index: Int) -> CPU {
        CPU(index: index, words: words + index * CPUWord.stride, tlb: tlbs + index * TLB.entriesPerCPU)
    }

    /// Takes a free slot for the calling thread (leaving another machine's first).
    @usableFromInline
    func bindCurrentThread() -> Int {
        if let other = svm_bound_cpu_owner() {
            let index = Int(svm_bound_cpu(other))
            svm_clear_cpu_binding()
            Unmanaged<CPUSet>.fromOpaque(other).takeRetainedValue().giveBack(index)
        }
        if _slowPath(svm_det_active()), let c = DeterministicScheduler.modelCPU(), c < count {
            // The scheduler's CPU model put this thread on CPU c: its slot
            // was given back by the thread that ran there before.
            let bit = UInt64(1) << UInt64(c)
            if freeMask.bitwiseAnd(~bit, ordering: .acquiringAndReleasing).oldValue & bit != 0 {
                UnsafeAtomic(words + c * CPUWord.stride + CPUWord.bound).store(1, ordering: .releasing)
                bind(c)
                return c
            }
            kernel?.warn("the scheduler's CPU model runs a thread on a CPU another thread did not give back", "cpu \(c)")
        }
        var warned = false
        while true {
            let seen = UnsafeAtomic(slotReleases).load(ordering: .acquiring)
            var mask = freeMask.load(ordering: .acquiring)
            while mask != 0 {
                let bit = mask.trailingZeroBitCount
                let (exchanged, now) = freeMask.compareExchange(expected: mask, desired: mask & ~(UInt64(1) << UInt64(bit)),
                                                                ordering: .acquiringAndReleasing)
                if exchanged {
                    UnsafeAtomic(words + bit * CPUWord.stride + CPUWord.bound).store(1, ordering: .releasing)
                    bind(bit)
                    return bit
                }
                mask = now
            }
            if !warned {
                warned = true
                kernel?.warn("more threads than CPUs: a thread waits for a free CPU (KernelConfiguration.cpus)",
                             "\(count) CPUs, all taken", kind: .machineLimit)
            }
            _ = svm_futex_wait(slotReleases, seen, 10_000_000)
        }
    }

    /// Records the calling thread's slot `index` (with a reference to the
    /// set, which the unbinding at thread exit drops).
    private func bind(_ index: Int) {
        svm_bind_cpu(Unmanaged.passRetained(self).toOpaque(), Int32(index), words + index * CPUWord.stride,
                     tlbs + index * TLB.entriesPerCPU, cpuSetUnbind)
    }

    /// Gives CPU `index` back (its thread exited or moved to another machine).
    /// The CPU keeps its TLB and loaded address space (lazy TLB).
    func giveBack(_ index: Int) {
        UnsafeAtomic(words + index * CPUWord.stride + CPUWord.bound).store(0, ordering: .releasing)
        freeMask.bitwiseOr(UInt64(1) << UInt64(index), ordering: .releasing)
        _ = UnsafeAtomic(UnsafeMutableRawPointer(slotReleases).assumingMemoryBound(to: Int32.self)).wrappingAdd(1, ordering: .acquiringAndReleasing).newValue
        _ = svm_futex_wake(slotReleases, Int32.max)
    }

    /// A context switch of the scheduler's CPU model: the calling thread
    /// leaves the CPU it is bound to (of whichever machine), which keeps its
    /// TLB and loaded address space, as a CPU does between two threads. No
    /// wake-up: under the model nobody waits for a slot.
    static func unbindCallingThreadForSwitch() {
        guard let owner = svm_bound_cpu_owner() else { return }
        let index = Int(svm_bound_cpu(owner))
        svm_clear_cpu_binding()
        let set = Unmanaged<CPUSet>.fromOpaque(owner).takeRetainedValue()
        UnsafeAtomic(set.words + index * CPUWord.stride + CPUWord.bound).store(0, ordering: .releasing)
        set.freeMask.bitwiseOr(UInt64(1) << UInt64(index), ordering: .releasing)
    }

    /// Whether the calling thread is inside an emulated access (between
    /// two instruction boundaries) of the CPU it is bound to.
    static func callingThreadInsideAccess() -> Bool {
        guard let owner = svm_bound_cpu_owner() else { return false }
        let set = Unmanaged<CPUSet>.fromOpaque(owner).takeUnretainedValue()
        let index = Int(svm_bound_cpu(owner))
        return UnsafeAtomic(set.words + index * CPUWord.stride + CPUWord.seq).load(ordering: .relaxed) & 1 != 0
    }

    /// Gives the calling thread's CPU back now rather than at thread exit.
    public func leave() {
        let me = Unmanaged.passUnretained(self).toOpaque()
        let i = svm_bound_cpu(me)
        guard i >= 0 else { return }
        svm_clear_cpu_binding()
        giveBack(Int(i))
        Unmanaged<CPUSet>.fromOpaque(me).release()
    }

    /// The index of the calling thread's CPU, taking one if needed.
    public var currentIndex: Int { current().index }

    /// CPUs a thread runs on now.
    public var boundCount: Int { count - freeMask.load(ordering: .acquiring).nonzeroBitCount }

    /// IPIs sent and not yet taken by their CPU (a snapshot).
    public var pendingIPIs: Int {
        (0..<count).reduce(0) { $0 + (UnsafeAtomic(words + $1 * CPUWord.stride + CPUWord.inboxGen).load(ordering: .acquiring) != 0 ? 1 : 0) }
    }

    /// TLB misses (page walks) of every CPU so far: each CPU counts its own.
    public var tlbMisses: UInt64 {
        (0..<count).reduce(0) { $0 + UnsafeAtomic(words + $1 * CPUWord.stride + CPUWord.misses).load(ordering: .relaxed) }
    }
}

/// Runs at thread exit (or when a thread moves to another machine): the slot goes back.
private let cpuSetUnbind: svm_cpu_unbind_fn = { owner, index in
    guard let owner else { return }
    Unmanaged<CPUSet>.fromOpaque(owner).takeRetainedValue().giveBack(Int(index))
}

/// What the access path needs of a machine's CPUs, as plain values an
/// address space keeps (no reference counting on the way to a TLB hit).
@usableFromInline
struct CPUAccess {
    /// The CPU set, unretained: the binding key of the calling thread.
    @usableFromInline let owner: UnsafeMutableRawPointer
    /// The key the access fast path looks the calling thread's CPU up by:
    /// `owner`, or, where every access must take the full path (TLB entries
    /// checked against the page tables, or a fence on every access), a key
    /// no thread is bound by. One compare then decides both.
    @usableFromInline let fastOwner: UnsafeRawPointer
    @usableFromInline let words: UnsafeMutablePointer<UInt64>
    @usableFromInline let tlbs: UnsafeMutablePointer<TLBEntry>
    @usableFromInline let fenceOnAccess: Bool
    @usableFromInline let checksStaleEntries: Bool

    init(_ set: CPUSet) {
        owner = Unmanaged.passUnretained(set).toOpaque()
        words = set.words
        tlbs = set.tlbs
        fenceOnAccess = set.fenceOnAccess
        checksStaleEntries = set.checksStaleEntries
        fastOwner = fenceOnAccess || checksStaleEntries ? UnsafeRawPointer(bitPattern: 8)! : UnsafeRawPointer(owner)
    }

    /// The CPU the calling thread runs on, taking a free one first if it has none.
    @inlinable @inline(__always)
    func current(_ mm: AddressSpace) -> CPU {
        var i = Int(svm_bound_cpu(owner))
        if i < 0 { i = mm.kernel.cpus.bindCurrentThread() }
        return CPU(index: i, words: words + i * CPUWord.stride, tlb: tlbs + i * TLB.entriesPerCPU)
    }
}

/// Word offsets of a CPU's state in `CPUSet.words`.
@usableFromInline
enum CPUWord {
    /// Access sequence: odd while the CPU is inside an access (between two
    /// instruction boundaries). Written by the CPU, read by flushers.
    @usableFromInline static let seq = 0
    /// The id of the address space loaded (CR3), 0 for none.
    @usableFromInline static let loadedMM = 1
    /// Whether a thread runs on the CPU.
    @usableFromInline static let bound = 2
    /// The IPI inbox: a lock word, then the flush asked for (mm id, the
    /// flush generation, start, end); gen 0 means empty.
    @usableFromInline static let inboxLock = 3
    @usableFromInline static let inboxMM = 4
    @usableFromInline static let inboxGen = 5
    @usableFromInline static let inboxStart = 6
    @usableFromInline static let inboxEnd = 7
    /// A 32-bit futex word: nonzero while a flusher sleeps until this CPU
    /// leaves its access (the CPU wakes it from `handleIPI`).
    @usableFromInline static let flusherSleeping = 8
    // Second cache line: the CPU's own.
    /// The flush generation of the loaded address space this TLB is up to date with.
    @usableFromInline static let localGen = 16
    /// The TLB's current epoch: a full flush starts a new one.
    @usableFromInline static let epoch = 17
    /// Page walks this CPU made (its TLB misses).
    @usableFromInline static let misses = 19
    @usableFromInline static let stride = 32
}
