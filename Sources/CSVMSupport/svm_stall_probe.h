// vCPU stalls: how often, and for how long, a CPU that is busy running a
// thread stops running it for reasons outside the kernel (the host
// descheduling a QEMU vCPU thread, TCG's own pauses; on a virtual machine,
// the hypervisor). One implementation for both calibrators: `svmemu
// calibrate` (svm_calibrate.c) and the kernel rig's guest program
// (Tools/kernel-rig/guest/calibrate.c, built with -I Sources/CSVMSupport),
// so that the two profiles' figures mean the same. Plain C11 + pthreads, no
// other header of the project. Docs/machine-profiles.md describes the method.
//
// On each CPU one thread, pinned there, reads CLOCK_MONOTONIC in a loop for
// `round_nanos`, `rounds` times (the threads run at the same time, interrupts
// and ticks as usual), and notes every gap between two consecutive reads
// longer than the threshold: 5 x the slowest CPU's median loop time, at least
// 2 µs. A gap is then one of three things:
//   - a preemption by the kernel: the thread's involuntary context switches
//     (getrusage(RUSAGE_THREAD).ru_nivcsw, read after each gap) went up: the
//     kernel ran another task there. Counted apart, not a stall.
//   - the kernel's tick: a gap in which the CPU's local timer interrupt
//     count went up (/proc/interrupts, LOC, read after each gap), no longer
//     than a quarter tick and than 4 x the median of such short timer gaps,
//     is the tick's (its handler, its softirqs); a longer one is a stall the
//     tick fell into. Without /proc/interrupts the tick is found by phase:
//     the tick is a periodic hrtimer on CLOCK_MONOTONIC, so the start times
//     modulo the tick of the gaps no longer than a quarter tick are binned
//     (100 bins a tick, per CPU); a bin holding more than 4 x the median
//     bin's count + 3 is the tick's, widened bin by bin while a neighbour
//     holds more than 2 x the median + 1, and the same bounds apply.
//     After each gap's bookkeeping the loop waits for 16 reads in a row
//     under the threshold (under TCG the loops right after a system call are
//     slower) before it notes gaps again; that time is not covered.
//   - a stall: every other gap.
// Figures: stalls per second per CPU (over the time the loops covered), the
// mean, p50/p90/p99 (nearest rank) and the longest stall over both CPUs, and
// the tick's gaps per second and median.
#ifndef SVM_STALL_PROBE_H
#define SVM_STALL_PROBE_H

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define SVM_STALL_MAX_CPUS 2
#define SVM_STALL_MAX_GAPS (1u << 18)
#define SVM_STALL_LOOP_SAMPLES 65536
#define SVM_STALL_BINS 100

typedef struct {
    double ratePerSecond;      // stalls per second per CPU
    double meanNanos, p50Nanos, p90Nanos, p99Nanos, maxNanos;
    double thresholdNanos;     // gaps above this were noted
    double loopNanos;          // the median clock read loop (the slowest CPU's)
    double tickGapsPerSecond;  // the tick's gaps per second per CPU (0: the tick's handler is under the threshold)
    double tickGapP50Nanos;
    double preemptionsPerSecond;   // gaps with a context switch to another task, per second per CPU
    double seconds;            // the time the loops covered, summed over the CPUs
    double stalledShare;       // the share of the covered time the CPUs spent stalled
    double sharedShare;        // with 2 CPUs: the share of the stalled time in which the other CPU was stalled too
    double sharedStallsShare;  // with 2 CPUs: the share of stalls that at least half overlap a stall of the other CPU
    double longSharedShare;    // with 2 CPUs: sharedShare of the stalls at least p99Nanos long
    uint64_t stalls, tickGaps, preemptions, dropped;
    int byTimerCount;          // CPUs whose tick gaps were found by the timer count (else by phase)
} svm_stall_result;

typedef struct {
    uint64_t start;     // the clock read before the gap
    uint64_t length;    // nanoseconds to the next read
    int preempted;
    int timer;          // local timer interrupts on the CPU since the last gap (-1: not known)
    int stall;          // classified a stall (set by svm_stall_measure)
} svm_stall_gap;

typedef struct svm_stall_shared svm_stall_shared;

typedef struct {
    svm_stall_shared *shared;
    int cpu;
    double loop;
    uint64_t covered;
    uint32_t count;
    uint64_t dropped;
    svm_stall_gap *gap;
    int rc;
} svm_stall_thread;

struct svm_stall_shared {
    int phase;          // 0 start, 1 the threshold is set: measure, -1 give up
    int measured;       // threads whose loop time is known
    int ncpu, rounds;
    uint64_t round_nanos;
    uint64_t threshold;
    svm_stall_thread t[SVM_STALL_MAX_CPUS];
};

static inline uint64_t svm_stall_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int svm_stall_cmp_u64(const void *x, const void *y) {
    uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
    return a < b ? -1 : a > b;
}

static long svm_stall_nivcsw(void) {
    struct rusage ru;
    return getrusage(RUSAGE_THREAD, &ru) == 0 ? ru.ru_nivcsw : -1;
}

/// The CPU's local timer interrupts (/proc/interrupts, the LOC line, the
/// column of `cpu`), or -1. `buf` is the caller's (16 KiB).
static long long svm_stall_timer_count(int fd, int cpu, char *buf, size_t size) {
    if (fd < 0) return -1;
    ssize_t n = pread(fd, buf, size - 1, 0);
    if (n <= 0) return -1;
    buf[n] = 0;
    // The header names the columns: "CPU0 CPU1 ..." (online CPUs only).
    int column = -1, k = 0;
    char *line_end = strchr(buf, '\n');
    for (char *p = buf; p && p < line_end; k++) {
        p = strstr(p, "CPU");
        if (!p || p > line_end) break;
        if (atoi(p + 3) == cpu) { column = k; break; }
        p += 3;
    }
    char *loc = strstr(buf, "\nLOC:");
    if (column < 0 || !loc) return -1;
    char *p = loc + 5, *end;
    long long v = -1;
    for (int c = 0; c <= column; c++) {
        v = strtoll(p, &end, 10);
        if (end == p) return -1;
        p = end;
    }
    return v;
}

static void *svm_stall_spin(void *arg) {
    svm_stall_thread *me = arg;
    svm_stall_shared *sh = me->shared;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(me->cpu, &set);
    me->rc = -pthread_setaffinity_np(pthread_self(), sizeof set, &set);
    // The loop's own time: the median of consecutive reads' differences.
    uint64_t *d = malloc(SVM_STALL_LOOP_SAMPLES * sizeof *d);
    if (d) {
        uint64_t last = svm_stall_now();
        for (int i = 0; i < SVM_STALL_LOOP_SAMPLES; i++) {
            uint64_t t = svm_stall_now();
            d[i] = t - last;
            last = t;
        }
        qsort(d, SVM_STALL_LOOP_SAMPLES, sizeof *d, svm_stall_cmp_u64);
        me->loop = (double)d[SVM_STALL_LOOP_SAMPLES / 2];
        free(d);
    } else if (!me->rc) {
        me->rc = -ENOMEM;
    }
    __atomic_fetch_add(&sh->measured, 1, __ATOMIC_ACQ_REL);
    int phase;
    while ((phase = __atomic_load_n(&sh->phase, __ATOMIC_ACQUIRE)) == 0) sched_yield();
    if (phase < 0) return NULL;
    uint64_t threshold = sh->threshold;
    int fd = open("/proc/interrupts", O_RDONLY);
    char *text = malloc(16384);
    if (!text && fd >= 0) { close(fd); fd = -1; }
    for (int r = 0; r < sh->rounds; r++) {
        long switches = svm_stall_nivcsw();
        long long timers = svm_stall_timer_count(fd, me->cpu, text, 16384);
        uint64_t begin = svm_stall_now(), end = begin + sh->round_nanos, last = begin;
        while (last < end) {
            uint64_t t = svm_stall_now();
            uint64_t gap = t - last;
            me->covered += gap;
            if (gap > threshold) {
                long now = svm_stall_nivcsw();
                long long timers_now = svm_stall_timer_count(fd, me->cpu, text, 16384);
                int timer = timers >= 0 && timers_now >= timers ? (int)(timers_now - timers) : -1;
                if (me->count < SVM_STALL_MAX_GAPS) {
                    me->gap[me->count++] = (svm_stall_gap){ last, gap, now != switches, timer, 0 };
                } else {
                    me->dropped++;
                }
                switches = now;
                timers = timers_now;
                // The bookkeeping is not a gap, nor are the slow reads right
                // after it (under TCG the first loops after a system call
                // run slower): wait for 16 reads in a row under the threshold.
                t = svm_stall_now();
                for (int calm = 0; calm < 16;) {
                    uint64_t u = svm_stall_now();
                    calm = u - t > threshold ? 0 : calm + 1;
                    t = u;
                }
            }
            last = t;
        }
    }
    if (fd >= 0) close(fd);
    free(text);
    return NULL;
}

/// The tick's window of phase bins on one CPU: lo..hi (inclusive, may wrap),
/// or -1 when no bin stands out.
static int svm_stall_tick_window(const svm_stall_thread *t, uint64_t tick, int *lo, int *hi) {
    uint32_t bins[SVM_STALL_BINS] = { 0 }, sorted[SVM_STALL_BINS];
    for (uint32_t i = 0; i < t->count; i++) {
        if (t->gap[i].preempted || t->gap[i].length > tick / 4) continue;
        bins[(t->gap[i].start % tick) * SVM_STALL_BINS / tick]++;
    }
    memcpy(sorted, bins, sizeof bins);
    for (int i = 1; i < SVM_STALL_BINS; i++) {   // insertion sort: 100 bins
        uint32_t v = sorted[i];
        int j = i - 1;
        while (j >= 0 && sorted[j] > v) { sorted[j + 1] = sorted[j]; j--; }
        sorted[j + 1] = v;
    }
    uint32_t background = sorted[SVM_STALL_BINS / 2];
    int peak = 0;
    for (int i = 1; i < SVM_STALL_BINS; i++) if (bins[i] > bins[peak]) peak = i;
    if (bins[peak] <= 4 * background + 3) return -1;
    int l = peak, h = peak;
    for (int k = 0; k < SVM_STALL_BINS / 4; k++) {
        int n = (l + SVM_STALL_BINS - 1) % SVM_STALL_BINS;
        if (bins[n] <= 2 * background + 1) break;
        l = n;
    }
    for (int k = 0; k < SVM_STALL_BINS / 4; k++) {
        int n = (h + 1) % SVM_STALL_BINS;
        if (bins[n] <= 2 * background + 1) break;
        h = n;
    }
    *lo = l;
    *hi = h;
    return 0;
}

static int svm_stall_in_window(int bin, int lo, int hi) {
    return lo <= hi ? (bin >= lo && bin <= hi) : (bin >= lo || bin <= hi);
}

static double svm_stall_rank(const uint64_t *sorted, uint64_t n, double q) {
    if (n == 0) return 0;
    uint64_t k = (uint64_t)(q * (double)n + 0.999999);   // nearest rank
    if (k < 1) k = 1;
    if (k > n) k = n;
    return (double)sorted[k - 1];
}

/// The overlap of one CPU's stalls `x` with the other's `y`: the stalled
/// time both share (counted once for each of the two), and how many of `x`'s
/// stalls lie at least half inside `y`'s. Gaps are in time order on each CPU.
static void svm_stall_overlap(const svm_stall_thread *x, const svm_stall_thread *y, uint64_t least,
                              double *shared, double *own, uint64_t *mostly) {
    uint32_t j = 0;
    for (uint32_t i = 0; i < x->count; i++) {
        const svm_stall_gap *a = &x->gap[i];
        if (!a->stall || a->length < least) continue;
        uint64_t a0 = a->start, a1 = a->start + a->length, inside = 0;
        while (j < y->count && y->gap[j].start + y->gap[j].length <= a0) j++;
        for (uint32_t k = j; k < y->count && y->gap[k].start < a1; k++) {
            const svm_stall_gap *b = &y->gap[k];
            if (!b->stall) continue;
            uint64_t lo = b->start > a0 ? b->start : a0, hi = b->start + b->length < a1 ? b->start + b->length : a1;
            if (hi > lo) inside += hi - lo;
        }
        *shared += (double)inside;
        *own += (double)a->length;
        if (2 * inside >= a->length) *mostly += 1;
    }
}

/// sharedShare, sharedStallsShare and longSharedShare of two CPUs'
/// classified gaps (`n`: their stalls).
static void svm_stall_shared_share(const svm_stall_thread *a, const svm_stall_thread *b, uint64_t n,
                                   svm_stall_result *out) {
    double shared = 0, own = 0, longShared = 0, longOwn = 0;
    uint64_t mostly = 0, longMostly = 0;
    svm_stall_overlap(a, b, 0, &shared, &own, &mostly);
    svm_stall_overlap(b, a, 0, &shared, &own, &mostly);
    out->sharedShare = own > 0 ? shared / own : 0;
    out->sharedStallsShare = n ? (double)mostly / (double)n : 0;
    uint64_t least = (uint64_t)out->p99Nanos;
    svm_stall_overlap(a, b, least, &longShared, &longOwn, &longMostly);
    svm_stall_overlap(b, a, least, &longShared, &longOwn, &longMostly);
    out->longSharedShare = longOwn > 0 ? longShared / longOwn : 0;
}

/// Measures stalls on `cpus[0..ncpu)` (1 or 2 CPUs): `rounds` rounds of
/// `round_nanos` each; `tick_nanos` is the kernel's tick (1 s / CONFIG_HZ).
/// Returns 0 or -errno.
static int svm_stall_measure(const int *cpus, int ncpu, int rounds, uint64_t round_nanos,
                             uint64_t tick_nanos, svm_stall_result *out) {
    memset(out, 0, sizeof *out);
    if (ncpu < 1 || ncpu > SVM_STALL_MAX_CPUS || rounds < 1 || round_nanos == 0 || tick_nanos == 0) return -EINVAL;
    svm_stall_shared *sh = calloc(1, sizeof *sh);
    if (!sh) return -ENOMEM;
    sh->ncpu = ncpu;
    sh->rounds = rounds;
    sh->round_nanos = round_nanos;
    int rc = 0, started = 0;
    pthread_t threads[SVM_STALL_MAX_CPUS];
    for (int i = 0; i < ncpu; i++) {
        sh->t[i] = (svm_stall_thread){ .shared = sh, .cpu = cpus[i] };
        sh->t[i].gap = malloc(SVM_STALL_MAX_GAPS * sizeof(svm_stall_gap));
        if (!sh->t[i].gap) rc = -ENOMEM;
    }
    if (rc) goto out;
    for (; started < ncpu; started++) {
        if ((rc = -pthread_create(&threads[started], NULL, svm_stall_spin, &sh->t[started]))) break;
    }
    if (started < ncpu) {   // the started ones give up
        __atomic_store_n(&sh->phase, -1, __ATOMIC_RELEASE);
        for (int i = 0; i < started; i++) pthread_join(threads[i], NULL);
        goto out;
    }
    while (__atomic_load_n(&sh->measured, __ATOMIC_ACQUIRE) < ncpu) {
        struct timespec pause = { 0, 1000000 };
        nanosleep(&pause, NULL);
    }
    double loop = 0;
    for (int i = 0; i < ncpu; i++) if (sh->t[i].loop > loop) loop = sh->t[i].loop;
    sh->threshold = (uint64_t)(5 * loop) > 2000 ? (uint64_t)(5 * loop) : 2000;
    __atomic_store_n(&sh->phase, 1, __ATOMIC_RELEASE);
    for (int i = 0; i < ncpu; i++) pthread_join(threads[i], NULL);
    for (int i = 0; i < ncpu; i++) if (sh->t[i].rc) rc = sh->t[i].rc;
    if (rc) goto out;

    // Classify, per CPU, then pool the stalls.
    uint64_t total = 0;
    for (int i = 0; i < ncpu; i++) total += sh->t[i].count;
    uint64_t *stalls = malloc((total + 1) * sizeof *stalls), *ticks = malloc((total + 1) * sizeof *ticks);
    if (!stalls || !ticks) { free(stalls); free(ticks); rc = -ENOMEM; goto out; }
    uint64_t ns = 0, nt = 0;
    double covered = 0;
    for (int i = 0; i < ncpu; i++) {
        svm_stall_thread *t = &sh->t[i];
        covered += (double)t->covered / 1e9;
        out->dropped += t->dropped;
        // The tick's gaps: by the local timer interrupt count when
        // /proc/interrupts is readable (a gap in which the count went up),
        // else by phase.
        int counted = t->count > 0;
        for (uint32_t g = 0; g < t->count; g++) if (t->gap[g].timer < 0) counted = 0;
        if (counted) out->byTimerCount += 1;
        int lo = 0, hi = 0, window = counted || svm_stall_tick_window(t, tick_nanos, &lo, &hi) == 0;
#define SVM_STALL_TICKISH(gp, bin) \
        (counted ? (gp)->timer > 0 : svm_stall_in_window((bin), lo, hi))
        uint64_t bound = UINT64_MAX, first = nt;
        if (window) {
            for (uint32_t g = 0; g < t->count; g++) {
                int bin = (int)((t->gap[g].start % tick_nanos) * SVM_STALL_BINS / tick_nanos);
                if (!t->gap[g].preempted && t->gap[g].length <= tick_nanos / 4 && SVM_STALL_TICKISH(&t->gap[g], bin))
                    ticks[nt++] = t->gap[g].length;
            }
            qsort(ticks + first, nt - first, sizeof *ticks, svm_stall_cmp_u64);
            bound = nt > first ? 4 * ticks[first + (nt - first) / 2] : 0;
            if (bound > tick_nanos / 4) bound = tick_nanos / 4;
            nt = first;
        }
        for (uint32_t g = 0; g < t->count; g++) {
            svm_stall_gap *gp = &t->gap[g];
            if (gp->preempted) { out->preemptions++; continue; }
            int bin = (int)((gp->start % tick_nanos) * SVM_STALL_BINS / tick_nanos);
            if (window && SVM_STALL_TICKISH(gp, bin) && gp->length <= bound) ticks[nt++] = gp->length;
            else { stalls[ns++] = gp->length; gp->stall = 1; }
        }
    }
    qsort(stalls, ns, sizeof *stalls, svm_stall_cmp_u64);
    qsort(ticks, nt, sizeof *ticks, svm_stall_cmp_u64);
    double sum = 0;
    for (uint64_t k = 0; k < ns; k++) sum += (double)stalls[k];
    out->stalls = ns;
    out->tickGaps = nt;
    out->seconds = covered;
    out->thresholdNanos = (double)sh->threshold;
    out->loopNanos = loop;
    out->ratePerSecond = covered > 0 ? (double)ns / covered : 0;
    out->tickGapsPerSecond = covered > 0 ? (double)nt / covered : 0;
    out->preemptionsPerSecond = covered > 0 ? (double)out->preemptions / covered : 0;
    out->meanNanos = ns ? sum / (double)ns : 0;
    out->p50Nanos = svm_stall_rank(stalls, ns, 0.50);
    out->p90Nanos = svm_stall_rank(stalls, ns, 0.90);
    out->p99Nanos = svm_stall_rank(stalls, ns, 0.99);
    out->maxNanos = ns ? (double)stalls[ns - 1] : 0;
    out->tickGapP50Nanos = svm_stall_rank(ticks, nt, 0.50);
    out->stalledShare = covered > 0 ? sum / 1e9 / covered : 0;
    if (ncpu == 2) svm_stall_shared_share(&sh->t[0], &sh->t[1], ns, out);
#undef SVM_STALL_TICKISH
    free(stalls);
    free(ticks);
out:
    for (int i = 0; i < ncpu; i++) free(sh->t[i].gap);
    free(sh);
    return rc;
}

#endif
