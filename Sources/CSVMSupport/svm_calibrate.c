// The microbenchmarks of `svmemu calibrate` (svm_calibrate.h). Not a hot path
// of the emulator: nothing here runs during an emulated run.
#define _GNU_SOURCE
#include "svm_calibrate.h"
#include "svm_support.h"
#include "svm_stall_probe.h"

#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/futex.h>

#define CAL_PAGE 4096
#define CAL_LINE 64

static inline uint64_t cal_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline long cal_futex(uint32_t *word, int op, uint32_t value) {
    return syscall(SYS_futex, word, op, value, NULL, NULL, 0);
}

static int cal_pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return -pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

int svm_cal_cpus(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) != 0) return -errno;
    return CPU_COUNT(&set);
}

void svm_cal_first_cpus(int *a, int *b) {
    cpu_set_t set;
    *a = *b = -1;
    if (sched_getaffinity(0, sizeof set, &set) != 0) return;
    for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) {
        if (!CPU_ISSET(cpu, &set)) continue;
        if (*a < 0) *a = cpu; else { *b = cpu; return; }
    }
}

/// Runs `body` pinned to `cpu`, the caller's affinity restored after.
typedef struct { cpu_set_t saved; int ok; } cal_affinity;
static int cal_affinity_enter(cal_affinity *a, int cpu) {
    a->ok = pthread_getaffinity_np(pthread_self(), sizeof a->saved, &a->saved) == 0;
    return cal_pin(cpu);
}
static void cal_affinity_leave(cal_affinity *a) {
    if (a->ok) pthread_setaffinity_np(pthread_self(), sizeof a->saved, &a->saved);
}

// ---- pointer chases ----

static uint64_t cal_rng = 0x9e3779b97f4a7c15ull;
static uint64_t cal_next(void) {
    cal_rng ^= cal_rng << 13; cal_rng ^= cal_rng >> 7; cal_rng ^= cal_rng << 17;
    return cal_rng;
}

/// Links `count` slots (addresses in `slots`) into one random cycle.
static void cal_link(void **slots[], size_t count) {
    for (size_t i = count - 1; i > 0; i--) {
        size_t j = cal_next() % (i + 1);
        void **t = slots[i]; slots[i] = slots[j]; slots[j] = t;
    }
    for (size_t i = 0; i < count; i++) *slots[i] = (void *)slots[(i + 1) % count];
}

static double cal_chase(void **start, size_t loads) {
    void **p = start;
    for (size_t i = 0; i < loads / 8; i++) {   // warm
        p = (void **)*p;
    }
    uint64_t t0 = cal_now();
    for (size_t i = 0; i < loads; i++) p = (void **)*p;
    uint64_t t1 = cal_now();
    svm_escape(p);
    return (double)(t1 - t0) / (double)loads;
}

static void *cal_map(size_t bytes) {
    void *m = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return NULL;
    madvise(m, bytes, MADV_NOHUGEPAGE);
    return m;
}

int svm_cal_tlb_hit(double *out, int samples) {
    char *page = cal_map(CAL_PAGE);
    if (!page) return -ENOMEM;
    void **slots[CAL_PAGE / CAL_LINE];
    for (size_t i = 0; i < CAL_PAGE / CAL_LINE; i++) slots[i] = (void **)(page + i * CAL_LINE);
    cal_link(slots, CAL_PAGE / CAL_LINE);
    for (int s = 0; s < samples; s++) out[s] = cal_chase(slots[0], 1 << 20);
    munmap(page, CAL_PAGE);
    return 0;
}

int svm_cal_page_walk(double *walk, double *packed, int samples, int pages) {
    size_t n = (size_t)pages;
    char *spread = cal_map(n * CAL_PAGE);
    char *dense = cal_map(n * CAL_LINE);
    void ***slots = malloc(n * sizeof *slots);
    if (!spread || !dense || !slots) {
        if (spread) munmap(spread, n * CAL_PAGE);
        if (dense) munmap(dense, n * CAL_LINE);
        free(slots);
        return -ENOMEM;
    }
    // One line a page, at a line offset that walks through the page so the
    // lines spread over the cache's sets.
    for (size_t i = 0; i < n; i++) slots[i] = (void **)(spread + i * CAL_PAGE + (i % (CAL_PAGE / CAL_LINE)) * CAL_LINE);
    cal_link(slots, n);
    void **spreadStart = slots[0];
    for (size_t i = 0; i < n; i++) slots[i] = (void **)(dense + i * CAL_LINE);
    cal_link(slots, n);
    void **denseStart = slots[0];
    for (int s = 0; s < samples; s++) {
        walk[s] = cal_chase(spreadStart, n * 16);
        packed[s] = cal_chase(denseStart, n * 16);
    }
    munmap(spread, n * CAL_PAGE);
    munmap(dense, n * CAL_LINE);
    free(slots);
    return 0;
}

int svm_cal_minor_fault(double *out, int samples) {
    const size_t pages = 256;
    for (int s = 0; s < samples; s++) {
        volatile char *m = cal_map(pages * CAL_PAGE);
        if (!m) return -ENOMEM;
        char sink = 0;
        uint64_t t0 = cal_now();
        for (size_t i = 0; i < pages; i++) sink += m[i * CAL_PAGE];
        uint64_t t1 = cal_now();
        svm_escape(&sink);
        munmap((void *)m, pages * CAL_PAGE);
        out[s] = (double)(t1 - t0) / (double)pages;
    }
    return 0;
}

int svm_cal_syscall(double *out, int samples) {
    const int n = 20000;
    for (int s = 0; s < samples; s++) {
        uint64_t t0 = cal_now();
        for (int i = 0; i < n; i++) syscall(SYS_getppid);
        out[s] = (double)(cal_now() - t0) / n;
    }
    return 0;
}

int svm_cal_futex_wake(double *out, int samples) {
    const int n = 20000;
    uint32_t word = 0;
    for (int s = 0; s < samples; s++) {
        uint64_t t0 = cal_now();
        for (int i = 0; i < n; i++) cal_futex(&word, FUTEX_WAKE_PRIVATE, 1);
        out[s] = (double)(cal_now() - t0) / n;
    }
    return 0;
}

int svm_cal_futex_wait(double *out, int samples) {
    const int n = 20000;
    uint32_t word = 0;
    for (int s = 0; s < samples; s++) {
        uint64_t t0 = cal_now();
        for (int i = 0; i < n; i++) cal_futex(&word, FUTEX_WAIT_PRIVATE, 1);
        out[s] = (double)(cal_now() - t0) / n;
    }
    return 0;
}

int svm_cal_lock(double *lock, double *unlock, int samples) {
    const int n = 1000000;
    uint32_t word = 0;
    for (int s = 0; s < samples; s++) {
        uint64_t t0 = cal_now();
        for (int i = 0; i < n; i++) { svm_mutex_lock(&word); svm_mutex_unlock(&word); }
        uint64_t t1 = cal_now();
        for (int i = 0; i < n; i++) svm_mutex_unlock(&word);
        uint64_t t2 = cal_now();
        double pair = (double)(t1 - t0) / n, alone = (double)(t2 - t1) / n;
        unlock[s] = alone;
        lock[s] = pair > alone ? pair - alone : 0;
    }
    return 0;
}

int svm_cal_yield(double *out, int samples) {
    const int n = 20000;
    cal_affinity a;
    int rc = cal_affinity_enter(&a, sched_getcpu());
    for (int s = 0; s < samples && rc == 0; s++) {
        uint64_t t0 = cal_now();
        for (int i = 0; i < n; i++) sched_yield();
        out[s] = (double)(cal_now() - t0) / n;
    }
    cal_affinity_leave(&a);
    return rc;
}

// ---- two threads ----

typedef struct {
    int cpu;
    int samples;
    uint32_t word;        // the futex word the sleeper waits on
    uint32_t done;        // the sleeper finished its round
    uint32_t stop;
    uint32_t ready;
    uint64_t sent;        // when the waker called FUTEX_WAKE
    double *out;
    int rc;
} cal_pair;

static void *cal_sleeper(void *arg) {
    cal_pair *p = arg;
    p->rc = cal_pin(p->cpu);
    svm_store32(&p->ready, 1);
    for (int s = 0; s < p->samples; s++) {
        while (svm_load32(&p->word) == 0) cal_futex(&p->word, FUTEX_WAIT_PRIVATE, 0);
        uint64_t woke = cal_now();
        p->out[s] = (double)(woke - p->sent);
        svm_store32(&p->word, 0);
        svm_store32(&p->done, 1);
    }
    return NULL;
}

int svm_cal_wake_latency(double *out, int samples, int a, int b) {
    cal_affinity aff;
    int rc = cal_affinity_enter(&aff, a);
    if (rc) { cal_affinity_leave(&aff); return rc; }
    cal_pair p = { .cpu = b, .samples = samples, .out = out };
    pthread_t t;
    if ((rc = -pthread_create(&t, NULL, cal_sleeper, &p))) { cal_affinity_leave(&aff); return rc; }
    while (!svm_load32(&p.ready)) sched_yield();
    for (int s = 0; s < samples; s++) {
        // Long enough for the sleeper to be asleep in FUTEX_WAIT.
        struct timespec pause = { 0, 200000 };
        nanosleep(&pause, NULL);
        svm_store32(&p.done, 0);
        p.sent = cal_now();
        svm_store32(&p.word, 1);
        cal_futex(&p.word, FUTEX_WAKE_PRIVATE, 1);
        while (!svm_load32(&p.done)) svm_cpu_relax();
    }
    pthread_join(t, NULL);
    cal_affinity_leave(&aff);
    return p.rc;
}

typedef struct { int cpu; int rounds; uint32_t word; int rc; } cal_pingpong;

static void *cal_pong(void *arg) {
    cal_pingpong *p = arg;
    p->rc = cal_pin(p->cpu);
    for (int i = 0; i < p->rounds; i++) {
        while (svm_load32(&p->word) != 1) cal_futex(&p->word, FUTEX_WAIT_PRIVATE, 0);
        svm_store32(&p->word, 0);
        cal_futex(&p->word, FUTEX_WAKE_PRIVATE, 1);
    }
    return NULL;
}

int svm_cal_context_switch(double *out, int samples, int cpu) {
    const int rounds = 2000;
    cal_affinity aff;
    int rc = cal_affinity_enter(&aff, cpu);
    for (int s = 0; s < samples && rc == 0; s++) {
        cal_pingpong p = { .cpu = cpu, .rounds = rounds };
        pthread_t t;
        if ((rc = -pthread_create(&t, NULL, cal_pong, &p))) break;
        uint64_t t0 = cal_now();
        for (int i = 0; i < rounds; i++) {
            svm_store32(&p.word, 1);
            cal_futex(&p.word, FUTEX_WAKE_PRIVATE, 1);
            while (svm_load32(&p.word) != 0) cal_futex(&p.word, FUTEX_WAIT_PRIVATE, 1);
        }
        uint64_t t1 = cal_now();
        pthread_join(t, NULL);
        if (p.rc) rc = p.rc;
        out[s] = (double)(t1 - t0) / (2.0 * rounds);
    }
    cal_affinity_leave(&aff);
    return rc;
}

typedef struct { int cpu; uint64_t line[8] __attribute__((aligned(64))); uint32_t stop; uint32_t ready; int rc; } cal_writer;

static void *cal_write_line(void *arg) {
    cal_writer *w = arg;
    w->rc = cal_pin(w->cpu);
    svm_store32(&w->ready, 1);
    while (!svm_load32(&w->stop)) {
        __atomic_store_n(&w->line[0], __atomic_load_n(&w->line[0], __ATOMIC_RELAXED) + 1, __ATOMIC_RELAXED);
    }
    return NULL;
}

int svm_cal_spin_round(double *out, int samples, int a, int b) {
    const int rounds = 100000;
    cal_affinity aff;
    int rc = cal_affinity_enter(&aff, a);
    if (rc) { cal_affinity_leave(&aff); return rc; }
    cal_writer *w = aligned_alloc(64, sizeof *w);
    if (!w) { cal_affinity_leave(&aff); return -ENOMEM; }
    memset(w, 0, sizeof *w);
    w->cpu = b;
    pthread_t t;
    if ((rc = -pthread_create(&t, NULL, cal_write_line, w))) { free(w); cal_affinity_leave(&aff); return rc; }
    while (!svm_load32(&w->ready)) sched_yield();
    for (int s = 0; s < samples; s++) {
        uint64_t t0 = cal_now();
        for (int i = 0; i < rounds; i++) {
            uint64_t seen = __atomic_load_n(&w->line[0], __ATOMIC_RELAXED);
            // The owner check fails or succeeds; either way the line moves.
            __atomic_compare_exchange_n(&w->line[0], &seen, seen, false, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
            svm_cpu_relax();
        }
        out[s] = (double)(cal_now() - t0) / rounds;
    }
    svm_store32(&w->stop, 1);
    pthread_join(t, NULL);
    rc = w->rc;
    free(w);
    cal_affinity_leave(&aff);
    return rc;
}

// ---- TLB shootdown ----

#define CAL_GAPS 65536
typedef struct {
    int cpu;
    uint32_t stop, ready, recording, parked;
    uint32_t park;        // 1: sleep in FUTEX_WAIT until cleared
    uint64_t threshold;
    uint32_t gaps;
    uint64_t gap[CAL_GAPS];
    int rc;
} cal_spinner;

/// Spins in user mode reading the clock; while `recording`, notes every gap
/// longer than `threshold` (the CPU was away: an interrupt, an IPI). While
/// `park` is set it sleeps instead (its CPU then holds the process's address
/// space only lazily, and flushes skip it).
static void *cal_spin_clock(void *arg) {
    cal_spinner *sp = arg;
    sp->rc = cal_pin(sp->cpu);
    svm_store32(&sp->ready, 1);
    uint64_t last = cal_now();
    while (!svm_load32(&sp->stop)) {
        if (svm_load32_relaxed(&sp->park)) {
            svm_store32(&sp->parked, 1);
            while (svm_load32(&sp->park)) cal_futex(&sp->park, FUTEX_WAIT_PRIVATE, 1);
            svm_store32(&sp->parked, 0);
            last = cal_now();
            continue;
        }
        uint64_t t = cal_now();
        if (t - last > sp->threshold && svm_load32_relaxed(&sp->recording) && sp->gaps < CAL_GAPS) {
            sp->gap[sp->gaps++] = t - last;
        }
        last = t;
    }
    return NULL;
}

static double cal_mprotect_pair(char *page, int calls) {
    uint64_t t0 = cal_now();
    for (int i = 0; i < calls / 2; i++) {
        mprotect(page, CAL_PAGE, PROT_READ);
        mprotect(page, CAL_PAGE, PROT_READ | PROT_WRITE);
    }
    return (double)(cal_now() - t0) / (double)(calls / 2 * 2);
}

static int cal_cmp_u64(const void *x, const void *y) {
    uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
    return a < b ? -1 : a > b;
}

int svm_cal_shootdown(double *local, double *remote, double *handling, double *interrupted,
                      int samples, int a, int b) {
    const int calls = 2000;
    cal_affinity aff;
    int rc = cal_affinity_enter(&aff, a);
    if (rc) { cal_affinity_leave(&aff); return rc; }
    char *page = cal_map(CAL_PAGE);
    cal_spinner *sp = calloc(1, sizeof *sp);
    if (!page || !sp) { if (page) munmap(page, CAL_PAGE); free(sp); cal_affinity_leave(&aff); return -ENOMEM; }
    page[0] = 1;    // present and writable: every mprotect changes the entry
    sp->cpu = b;
    sp->threshold = 400;
    sp->park = 1;
    pthread_t t;
    if ((rc = -pthread_create(&t, NULL, cal_spin_clock, sp))) goto out;
    while (!svm_load32(&sp->ready)) sched_yield();
    // Local and remote repetitions alternate, so that a change in the host's
    // load falls on both.
    for (int s = 0; s < samples; s++) {
        // Local: the other thread asleep.
        svm_store32(&sp->park, 1);
        while (!svm_load32(&sp->parked)) sched_yield();
        struct timespec settle = { 0, 100000 };
        nanosleep(&settle, NULL);
        local[s] = cal_mprotect_pair(page, calls);
        // Remote: the other thread spinning on its CPU.
        svm_store32(&sp->park, 0);
        cal_futex(&sp->park, FUTEX_WAKE_PRIVATE, 1);
        while (svm_load32(&sp->parked)) svm_cpu_relax();
        nanosleep(&settle, NULL);
        sp->gaps = 0;
        svm_store32(&sp->recording, 1);
        remote[s] = cal_mprotect_pair(page, calls);
        svm_store32(&sp->recording, 0);
        nanosleep(&settle, NULL);     // the spinner may be between its check and its store
        uint32_t n = svm_load32(&sp->gaps);
        interrupted[s] = (double)n / (double)calls;
        if (n > 0) {
            qsort(sp->gap, n, sizeof sp->gap[0], cal_cmp_u64);
            handling[s] = (double)sp->gap[n / 2];
        } else {
            handling[s] = 0;
        }
    }
    svm_store32(&sp->stop, 1);
    svm_store32(&sp->park, 0);
    cal_futex(&sp->park, FUTEX_WAKE_PRIVATE, 1);
    pthread_join(t, NULL);
    rc = sp->rc;
out:
    munmap(page, CAL_PAGE);
    free(sp);
    cal_affinity_leave(&aff);
    return rc;
}

// ---- copy ----

int svm_cal_memcpy(double *out, int samples, size_t bytes) {
    char *src = cal_map(bytes), *dst = cal_map(bytes);
    if (!src || !dst) {
        if (src) munmap(src, bytes);
        if (dst) munmap(dst, bytes);
        return -ENOMEM;
    }
    memset(src, 0x5a, bytes);
    memset(dst, 0xa5, bytes);
    // At least 64 MiB a sample: small sets repeat, cache-warm.
    size_t reps = (64u << 20) / bytes;
    if (reps < 2) reps = 2;
    memcpy(dst, src, bytes);
    for (int s = 0; s < samples; s++) {
        uint64_t t0 = cal_now();
        for (size_t r = 0; r < reps; r++) {
            memcpy(dst, src, bytes);
            svm_escape(dst);
        }
        uint64_t t1 = cal_now();
        out[s] = (double)(bytes * reps) / (double)(t1 - t0);   // bytes per ns = GB/s
    }
    munmap(src, bytes);
    munmap(dst, bytes);
    return 0;
}

// ---- tick ----

static long long cal_loc(int cpu) {
    FILE *f = fopen("/proc/interrupts", "r");
    if (!f) return -1;
    char line[4096];
    long long value = -1;
    while (fgets(line, sizeof line, f)) {
        char *p = line;
        while (*p == ' ') p++;
        if (strncmp(p, "LOC:", 4) != 0) continue;
        p += 4;
        for (int c = 0; c <= cpu; c++) {
            char *end;
            long long v = strtoll(p, &end, 10);
            if (end == p) { value = -1; break; }
            value = v;
            p = end;
        }
        break;
    }
    fclose(f);
    return value;
}

double svm_cal_tick_hz(int cpu, int millis) {
    cal_affinity aff;
    if (cal_affinity_enter(&aff, cpu)) { cal_affinity_leave(&aff); return -1; }
    long long before = cal_loc(cpu);
    uint64_t t0 = cal_now(), end = t0 + (uint64_t)millis * 1000000ull;
    while (cal_now() < end) svm_cpu_relax();
    long long after = cal_loc(cpu);
    uint64_t t1 = cal_now();
    cal_affinity_leave(&aff);
    if (before < 0 || after < before) return -1;
    return (double)(after - before) * 1e9 / (double)(t1 - t0);
}

// ---- stalls ----

int svm_cal_stalls(svm_cal_stall_figures *out, int a, int b, int rounds,
                   unsigned long long roundNanos, unsigned long long tickNanos) {
    int cpus[2] = { a, b };
    svm_stall_result r;
    memset(out, 0, sizeof *out);
    int rc = svm_stall_measure(cpus, b >= 0 ? 2 : 1, rounds, roundNanos, tickNanos, &r);
    if (rc) return rc;
    *out = (svm_cal_stall_figures){
        .ratePerSecond = r.ratePerSecond, .meanNanos = r.meanNanos, .p50Nanos = r.p50Nanos,
        .p90Nanos = r.p90Nanos, .p99Nanos = r.p99Nanos, .maxNanos = r.maxNanos,
        .thresholdNanos = r.thresholdNanos, .loopNanos = r.loopNanos,
        .tickGapsPerSecond = r.tickGapsPerSecond, .tickGapP50Nanos = r.tickGapP50Nanos,
        .preemptionsPerSecond = r.preemptionsPerSecond, .seconds = r.seconds,
        .stalls = r.stalls, .tickGaps = r.tickGaps, .preemptions = r.preemptions, .dropped = r.dropped,
        .byTimerCount = r.byTimerCount,
        .stalledShare = r.stalledShare, .sharedShare = r.sharedShare, .longSharedShare = r.longSharedShare,
        .sharedStallsShare = r.sharedStallsShare,
    };
    return 0;
}

double svm_cal_stall_shared(const unsigned long long *a, int na, const unsigned long long *b, int nb,
                            unsigned long long least) {
    if (na < 0 || nb < 0 || na > (int)SVM_STALL_MAX_GAPS || nb > (int)SVM_STALL_MAX_GAPS) return -1;
    svm_stall_gap *ga = calloc((size_t)na + 1, sizeof *ga), *gb = calloc((size_t)nb + 1, sizeof *gb);
    if (!ga || !gb) { free(ga); free(gb); return -1; }
    for (int i = 0; i < na; i++) ga[i] = (svm_stall_gap){ a[2 * i], a[2 * i + 1], 0, -1, 1 };
    for (int i = 0; i < nb; i++) gb[i] = (svm_stall_gap){ b[2 * i], b[2 * i + 1], 0, -1, 1 };
    svm_stall_thread x = { .count = (uint32_t)na, .gap = ga }, y = { .count = (uint32_t)nb, .gap = gb };
    double shared = 0, own = 0;
    uint64_t mostly = 0;
    svm_stall_overlap(&x, &y, least, &shared, &own, &mostly);
    svm_stall_overlap(&y, &x, least, &shared, &own, &mostly);
    free(ga);
    free(gb);
    return own > 0 ? shared / own : 0;
}
