#if canImport(Glibc)
import Glibc
#endif

// The CPU model's wake placement (`select_task_rq_fair()`,
// `select_idle_sibling()`): which CPU a woken thread takes, by
// ``DeterministicScheduler/Configuration/wakePlacement``, and the PELT
// utilisation SIS_UTIL's search width follows. The wake-up itself is
// CPUModel.swift's.
extension DeterministicScheduler {
    /// The idle CPU a wake-up of `t` takes, or -1 (`select_idle_sibling()`):
    /// the CPU it last ran on when idle; with ``WakePlacement/idleSibling``
    /// any other idle CPU next; with ``WakePlacement/sharedCache`` the
    /// kernel's search (``idleSiblingOfSharedCache(_:)``).
    func idleCPU(for t: EmulatedThread) -> Int {
        if cpus[t.lastCPU].running == nil { return t.lastCPU }
        switch configuration.wakePlacement {
        case .previousCPU: return -1
        case .idleSibling:
            for c in cpus.indices where cpus[c].running == nil { return c }
            return -1
        case .sharedCache: return idleSiblingOfSharedCache(t)
        }
    }

    /// ``WakePlacement/sharedCache``'s search once the last CPU is busy
    /// (`select_idle_sibling()` after its first test): the CPU the thread
    /// ran on before when idle, else `select_idle_cpu()` under SIS_UTIL.
    func idleSiblingOfSharedCache(_ t: EmulatedThread) -> Int {
        let prev = t.lastCPU, recent = t.recentUsedCPU
        t.recentUsedCPU = prev
        if recent >= 0, recent != prev, cpus[recent].running == nil { return recent }
        // select_idle_cpu(): nr = nr_idle_scan + 1, decremented before each CPU looked at.
        var nr = idleScan(at: t.clock) + 1
        guard nr > 1 else { return -1 }
        for k in 1...cpus.count {
            let c = (prev + k) % cpus.count
            nr -= 1
            if nr <= 0 { return -1 }
            if cpus[c].running == nil { return c }
        }
        return -1
    }

    /// SIS_UTIL's `nr_idle_scan` for the cache of every CPU at `now`
    /// (`update_idle_cpu_scan()`): the CPUs times 1 - (x * 117 / 100)^2,
    /// x the CPUs' mean utilisation over their capacity (1024), the MC
    /// domain's imbalance_pct 117; no scan from x = 100/117.
    func idleScan(at now: UInt64) -> Int {
        let n = cpus.count
        var sum = 0.0
        for c in cpus.indices { sum += utilisation(c, at: now) }
        let x = (sum / Double(n)).rounded(.down)
        let tmp = min(1024, (x * x * 117 * 117 / (10_000 * 1024)).rounded(.down))
        return Int((1024 - tmp) * Double(n) / 1024)
    }

    /// PELT's utilisation of CPU `c` at `now` (`util_avg`, 0-1024): its
    /// busy time decayed geometrically, halving every 32 periods of 1024 µs
    /// (a running average of the busy share); a stall is busy time, as the
    /// guest counts it.
    func utilisation(_ c: Int, at now: UInt64) -> Double {
        let cpu = cpus[c]
        guard now > cpu.utilStamp else { return cpu.util }
        let decay = Self.peltDecay(now - cpu.utilStamp)
        return cpu.util * decay + (cpu.utilBusy ? 1024 * (1 - decay) : 0)
    }

    /// Brings CPU `c`'s utilisation up to `now`, then notes whether it is
    /// busy from there (a thread got it, or it went idle).
    func noteUtilisation(_ c: Int, at now: UInt64, busy: Bool) {
        cpus[c].util = utilisation(c, at: now)
        cpus[c].utilStamp = max(cpus[c].utilStamp, now)
        cpus[c].utilBusy = busy
    }

    /// PELT's decay over `nanos`: y^(periods), y^32 = 1/2, a period 1024 µs.
    static func peltDecay(_ nanos: UInt64) -> Double {
        exp2(-Double(nanos) / (32 * 1_024_000))
    }

    /// The busy CPU whose run queue a wake-up of `t` joins: its last CPU
    /// (``WakePlacement/previousCPU``), or the CPU with the fewest queued,
    /// its last CPU on a tie.
    func busyTarget(for t: EmulatedThread) -> Int {
        var target = t.lastCPU
        guard configuration.wakePlacement == .idleSibling else { return target }
        for c in cpus.indices where cpus[c].queue.count < cpus[target].queue.count { target = c }
        return target
    }
}
