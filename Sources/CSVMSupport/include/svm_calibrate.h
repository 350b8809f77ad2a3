// Microbenchmarks of this machine's primitives for `svmemu calibrate`: what a
// TLB hit, a page-table walk, a minor fault, a system call, a futex call, a
// wake-up, a context switch, a spin round, a lock, a yield, a TLB shootdown
// and a memcpy cost on the real hardware and kernel. Each function runs
// `samples` measurements and writes one figure per measurement into `out`
// (nanoseconds per operation, or GB/s for the copy); the caller takes the
// median. Timing is clock_gettime(CLOCK_MONOTONIC) around batches; the
// two-thread measurements pin their threads with sched_setaffinity and
// restore the caller's affinity. Each returns 0, or -errno when the host
// refused (a CPU that cannot be pinned, a mapping that failed).
#ifndef SVM_CALIBRATE_H
#define SVM_CALIBRATE_H

#include <stddef.h>

/// Host CPUs this process may run on (sched_getaffinity), or -errno.
int svm_cal_cpus(void);
/// The first two CPUs the process may run on (-1 for one it does not have).
void svm_cal_first_cpus(int *a, int *b);

/// A dependent load that hits the L1 data cache and the first-level TLB:
/// a random pointer chase over 64 lines of one 4 KiB page.
int svm_cal_tlb_hit(double *out, int samples);
/// A random pointer chase with one line in each of `pages` 4 KiB pages
/// (every load misses both TLB levels; the lines stay in L2), and the same
/// chase over as many lines packed together (TLB hits): two figures a sample,
/// `walk[i]` and `packed[i]`.
int svm_cal_page_walk(double *walk, double *packed, int samples, int pages);
/// The first read of each page of a fresh private anonymous mapping (a minor
/// fault that maps the zero page), per page, the read included.
int svm_cal_minor_fault(double *out, int samples);
/// getppid() through syscall(2) (glibc does not cache it).
int svm_cal_syscall(double *out, int samples);
/// FUTEX_WAKE of a word no thread waits on.
int svm_cal_futex_wake(double *out, int samples);
/// FUTEX_WAIT with a value that does not match (returns EAGAIN at once).
int svm_cal_futex_wait(double *out, int samples);
/// An uncontended lock and unlock of the futex mutex (svm_mutex_lock /
/// svm_mutex_unlock): two figures a sample, `lock[i]` and `unlock[i]`.
int svm_cal_lock(double *lock, double *unlock, int samples);
/// sched_yield() with the thread pinned to one CPU.
int svm_cal_yield(double *out, int samples);
/// FUTEX_WAKE on CPU `a` to the woken thread running on CPU `b` (which slept
/// in FUTEX_WAIT), one wake-up a sample.
int svm_cal_wake_latency(double *out, int samples, int a, int b);
/// Two threads pinned to CPU `cpu` hand a futex word back and forth; the
/// time per switch (each switch one FUTEX_WAKE and one blocking FUTEX_WAIT).
int svm_cal_context_switch(double *out, int samples, int cpu);
/// One round of a compare-and-exchange spin (load, cmpxchg, pause) on CPU `a`
/// on a cache line a thread on CPU `b` keeps writing.
int svm_cal_spin_round(double *out, int samples, int a, int b);
/// mprotect() of one present page to read-only and back, per call: with no
/// other thread (`local[i]`: the local flush) and with a second thread of the
/// process spinning on CPU `b` (`remote[i]`: a shootdown IPI each call);
/// `handling[i]`: the median interruption the spinning thread saw in its own
/// clock loop while the flushes ran (how long the IPI took it away), and
/// `interrupted[i]`: its interruptions per call (about 1 when each flush
/// reached it as an interrupt; about 0 when the hypervisor flushed for it).
/// Local and remote repetitions alternate (the other thread asleep, then
/// spinning).
int svm_cal_shootdown(double *local, double *remote, double *handling, double *interrupted,
                      int samples, int a, int b);
/// memcpy between two buffers of `bytes` each, repeated; GB/s a sample.
int svm_cal_memcpy(double *out, int samples, size_t bytes);
/// Local timer interrupts per second on CPU `cpu` while a thread keeps it busy
/// for `millis` (from /proc/interrupts, LOC): the kernel's tick rate.
double svm_cal_tick_hz(int cpu, int millis);

/// vCPU stalls (svm_stall_probe.h, shared with the kernel rig's guest
/// calibrator): what a thread spinning on a clock loop on each CPU saw.
typedef struct {
    /// Stalls per second per CPU, and their length: mean, p50/p90/p99 (nearest rank), longest (ns).
    double ratePerSecond, meanNanos, p50Nanos, p90Nanos, p99Nanos, maxNanos;
    /// Gaps longer than this were noted (5 x the median loop, at least 2 µs).
    double thresholdNanos;
    /// The median loop time (one clock read), the slower CPU's.
    double loopNanos;
    /// The kernel's tick gaps per second per CPU and their median (0 when under the threshold).
    double tickGapsPerSecond, tickGapP50Nanos;
    /// Gaps in which the kernel ran another task there, per second per CPU (not stalls).
    double preemptionsPerSecond;
    /// Seconds the loops covered, summed over the CPUs.
    double seconds;
    /// Counts: stalls, tick gaps, preemptions, gaps not stored (a full buffer).
    unsigned long long stalls, tickGaps, preemptions, dropped;
    /// CPUs whose tick was found by the timer interrupt count (else by phase).
    int byTimerCount;
    /// The share of the covered time the CPUs spent stalled; with two CPUs,
    /// the share of the stalled time in which the other CPU was stalled too
    /// (all stalls, and those at least p99Nanos long), and the share of
    /// stalls at least half inside one of the other CPU's.
    double stalledShare, sharedShare, longSharedShare, sharedStallsShare;
} svm_cal_stall_figures;

/// One clock-reading thread pinned to each of CPUs `a` and `b` (`b` < 0: `a`
/// only) for `rounds` rounds of `roundNanos`; gaps between consecutive reads
/// are split into the kernel's preemptions, its tick (by the local timer
/// interrupt count, else by the gap's phase in `tickNanos`) and stalls. Returns 0 or -errno.
int svm_cal_stalls(svm_cal_stall_figures *out, int a, int b, int rounds,
                   unsigned long long roundNanos, unsigned long long tickNanos);

/// The share of two CPUs' stalled time in which both were stalled, for the
/// stalls (start, length pairs in nanoseconds, in time order on each CPU)
/// `a[0..2*na)` and `b[0..2*nb)`, counting only stalls at least `least` ns
/// long: the computation behind svm_cal_stall_figures' sharedShare and
/// longSharedShare. Returns 0 with no such stall, -1 when na or nb is out of range.
double svm_cal_stall_shared(const unsigned long long *a, int na, const unsigned long long *b, int nb,
                            unsigned long long least);

#endif
