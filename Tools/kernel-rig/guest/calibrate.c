// SPDX-License-Identifier: GPL-2.0
/*
 * rig-calibrate: the primitives of a machine profile, measured inside the
 * kernel rig's guest (Linux 6.12.117, QEMU TCG, 2 vCPUs). Each figure is the
 * median of many repetitions of a batch; the JSON goes to stdout between
 * RIG-CALIBRATION-BEGIN and RIG-CALIBRATION-END. Tools/kernel-rig/rigresults.py
 * takes the median over boots and writes Data/profiles/qemu-tcg-2.json.
 *
 * The keys are the machine profile's (SVMEmu MachineProfile, `svmemu
 * calibrate --json` measures the same on the host): tlbHit, pageTableWalk,
 * faultEntryExit, syscall, futexWake, futexWait, wakeLatency, contextSwitch,
 * spinRound, lockUncontended, unlock, yield, ipiSendToReceipt, ipiRoundTrip,
 * localFlush (nanoseconds), memcpy (GB/s by working set), scheduler, and
 * stalls (how often and how long a busy vCPU stops running its thread for
 * reasons outside the guest kernel: the host descheduling QEMU's vCPU
 * thread, TCG's own pauses). The stall probe is svmemu calibrate's own
 * (Sources/CSVMSupport/svm_stall_probe.h, built with -I that folder).
 *
 * Needs 2 CPUs (pins threads to CPU 0 and 1) and about 400 MiB of memory.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/klog.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "svm_stall_probe.h"

#define PAGE 4096UL
#define MAX_REPS 64

static int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void pin(int cpu)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (pthread_setaffinity_np(pthread_self(), sizeof(set), &set) != 0) {
		fprintf(stderr, "rig-calibrate: cannot pin to CPU %d\n", cpu);
		exit(1);
	}
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

static double median(double *v, int n)
{
	qsort(v, n, sizeof(*v), cmp_double);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static long futex(atomic_int *word, int op, int val)
{
	return syscall(SYS_futex, word, op, val, NULL, NULL, 0);
}

/* ---------------------------------------------------------------- clock */

static double clock_overhead;	/* ns of one now_ns() pair, subtracted from single-call timings */

static void measure_clock(void)
{
	double v[MAX_REPS];

	for (int r = 0; r < 31; r++) {
		int64_t best = INT64_MAX;

		for (int i = 0; i < 200; i++) {
			int64_t a = now_ns(), b = now_ns();

			if (b - a < best)
				best = b - a;
		}
		v[r] = (double)best;
	}
	clock_overhead = median(v, 31);
}

/* ---------------------------------------------------------------- TLB */

/*
 * A dependent pointer chase over `pages` pages, one pointer per page at a
 * 4 KiB stride (plus a line offset that walks the cache sets), in a random
 * cyclic order. Returns ns per load.
 */
static double chase(size_t pages, long steps, int reps)
{
	char *buf = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	size_t *order = malloc(pages * sizeof(*order));
	double v[MAX_REPS];

	if (buf == MAP_FAILED || !order) {
		perror("rig-calibrate: chase buffer");
		exit(1);
	}
	madvise(buf, pages * PAGE, MADV_NOHUGEPAGE);
	for (size_t i = 0; i < pages; i++)
		order[i] = i;
	srandom(12345);
	for (size_t i = pages - 1; i > 0; i--) {
		size_t j = (size_t)random() % (i + 1), t = order[i];

		order[i] = order[j];
		order[j] = t;
	}
#define SLOT(i) ((void **)(buf + order[i] * PAGE + (order[i] % 64) * 64))
	for (size_t i = 0; i < pages; i++)
		*SLOT(i) = (void *)SLOT((i + 1) % pages);
	void **p = SLOT(0);
#undef SLOT
	for (long i = 0; i < (long)pages * 2; i++)	/* warm */
		p = (void **)*p;
	for (int r = 0; r < reps; r++) {
		int64_t t0 = now_ns();

		for (long i = 0; i < steps; i++)
			p = (void **)*p;
		v[r] = (double)(now_ns() - t0) / steps;
	}
	if (p == NULL)
		puts("");	/* keep the chase */
	munmap(buf, pages * PAGE);
	free(order);
	return median(v, reps);
}

/* ---------------------------------------------------------------- faults */

/* A read of fresh anonymous memory: a minor fault that maps the zero page. */
static double zero_page_fault(void)
{
	const size_t pages = 2048;
	double v[MAX_REPS];
	int reps = 15;

	for (int r = 0; r < reps; r++) {
		volatile char *buf = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
					  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		char sink = 0;

		if (buf == MAP_FAILED) {
			perror("rig-calibrate: fault buffer");
			exit(1);
		}
		madvise((void *)buf, pages * PAGE, MADV_NOHUGEPAGE);
		int64_t t0 = now_ns();

		for (size_t i = 0; i < pages; i++)
			sink += buf[i * PAGE];
		v[r] = (double)(now_ns() - t0) / pages;
		munmap((void *)buf, pages * PAGE);
		if (sink)
			puts("");
	}
	return median(v, reps);
}

/* ---------------------------------------------------------------- syscalls */

enum op { OP_GETPPID, OP_FUTEX_WAKE, OP_FUTEX_WAIT_EAGAIN, OP_YIELD };

static double per_call(enum op op, long calls, int reps)
{
	atomic_int word = 0;
	double v[MAX_REPS];

	for (int r = 0; r < reps; r++) {
		int64_t t0 = now_ns();

		for (long i = 0; i < calls; i++) {
			switch (op) {
			case OP_GETPPID: syscall(SYS_getppid); break;
			case OP_FUTEX_WAKE: futex(&word, FUTEX_WAKE_PRIVATE, 1); break;
			case OP_FUTEX_WAIT_EAGAIN: futex(&word, FUTEX_WAIT_PRIVATE, 1); break;
			case OP_YIELD: sched_yield(); break;
			}
		}
		v[r] = (double)(now_ns() - t0) / calls;
	}
	return median(v, reps);
}

/* ---------------------------------------------------------------- wake-up */

static struct {
	atomic_int word;	/* the futex */
	atomic_int state;	/* 0 idle, 1 the waiter is about to wait, 2 woken and measured */
	atomic_llong woke_at;
	atomic_llong sent_at;
	atomic_int stop;
} wk;

static void *wake_waiter(void *arg)
{
	(void)arg;
	pin(1);
	while (!atomic_load(&wk.stop)) {
		atomic_store(&wk.word, 0);
		atomic_store(&wk.state, 1);
		while (atomic_load(&wk.word) == 0 && !atomic_load(&wk.stop))
			futex(&wk.word, FUTEX_WAIT_PRIVATE, 0);
		atomic_store(&wk.woke_at, now_ns());
		atomic_store(&wk.state, 2);
		while (atomic_load(&wk.state) == 2 && !atomic_load(&wk.stop))
			;
	}
	return NULL;
}

/* FUTEX_WAKE on CPU 0 to the woken thread running on CPU 1 (asleep, CPU idle). */
static double wake_latency(void)
{
	const int rounds = 101;
	double v[128];
	pthread_t t;

	pin(0);
	memset(&wk, 0, sizeof(wk));
	pthread_create(&t, NULL, wake_waiter, NULL);
	for (int r = 0; r < rounds; r++) {
		struct timespec settle = { 0, 2 * 1000 * 1000 };

		while (atomic_load(&wk.state) != 1)
			;
		nanosleep(&settle, NULL);	/* the waiter is asleep in futex_wait, CPU 1 idle */
		int64_t t0 = now_ns();

		atomic_store(&wk.word, 1);
		futex(&wk.word, FUTEX_WAKE_PRIVATE, 1);
		while (atomic_load(&wk.state) != 2)
			;
		v[r] = (double)(atomic_load(&wk.woke_at) - t0);
		atomic_store(&wk.state, 0);
	}
	atomic_store(&wk.stop, 1);
	atomic_store(&wk.word, 1);
	futex(&wk.word, FUTEX_WAKE_PRIVATE, 1);
	atomic_store(&wk.state, 0);
	pthread_join(t, NULL);
	return median(v, rounds);
}

/* ---------------------------------------------------------------- timer wake-up */

/*
 * A sleeper's own timer waking it on an idle CPU: a thread pinned to CPU 1
 * (nothing else runs there; CPU 0's thread waits in pthread_join) sets its
 * timer slack to 1 ns (PR_SET_TIMERSLACK: the hrtimer's range is [t, t + 1
 * ns], as usleep_range()'s is [min, max] with the timer armed for max when
 * no other interrupt comes), sleeps in clock_nanosleep(TIMER_ABSTIME) until
 * `micros` after it read the clock, and reads the clock when it runs: the
 * overshoot is the expiry to the sleeper running (the hrtimer interrupt
 * bringing the halted vCPU out of its idle loop, the wake-up, the switch).
 * Each round starts 2 ms after the last (the CPU idle, as in wake_latency()).
 * Sorted overshoots go to out[rounds].
 */
static struct {
	long micros;
	int rounds;
	double *out;
} tw;

static void *timer_waiter(void *arg)
{
	(void)arg;
	pin(1);
	prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
	for (int r = 0; r < tw.rounds; r++) {
		struct timespec settle = { 0, 2 * 1000 * 1000 }, until;
		int64_t expiry;

		nanosleep(&settle, NULL);
		expiry = now_ns() + tw.micros * 1000;
		until.tv_sec = expiry / 1000000000;
		until.tv_nsec = expiry % 1000000000;
		while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL) == EINTR)
			;
		tw.out[r] = (double)(now_ns() - expiry);
	}
	return NULL;
}

static void timer_wake_latency(long micros, int rounds, double *sorted)
{
	pthread_t t;

	tw.micros = micros;
	tw.rounds = rounds;
	tw.out = sorted;
	pin(0);
	pthread_create(&t, NULL, timer_waiter, NULL);
	pthread_join(t, NULL);
	qsort(sorted, rounds, sizeof(double), cmp_double);
}

/* rig-calibrate -W: the timer wake-up alone (and the futex wake-up beside it), one RIG-TIMERWAKE line. */
static int timer_wake_only(void)
{
	double v[401], w40[401], w400[401];
	const int n = 401;

	for (int i = 0; i < 3; i++)
		v[i] = wake_latency();
	timer_wake_latency(40, n, w40);
	timer_wake_latency(400, n, w400);
	printf("RIG-TIMERWAKE {\"rounds\": %d, \"timer40us\": {\"p10\": %.0f, \"p50\": %.0f, \"p90\": %.0f, \"p99\": %.0f}, "
	       "\"timer400us\": {\"p10\": %.0f, \"p50\": %.0f, \"p90\": %.0f, \"p99\": %.0f}, "
	       "\"futexWakeMedians\": [%.0f, %.0f, %.0f]}\n",
	       n, w40[n / 10], w40[n / 2], w40[n * 9 / 10], w40[n * 99 / 100],
	       w400[n / 10], w400[n / 2], w400[n * 9 / 10], w400[n * 99 / 100], v[0], v[1], v[2]);
	return 0;
}

/* ---------------------------------------------------------------- context switch */

static atomic_int turn;
static long pingpong_rounds;

static void *pong(void *arg)
{
	(void)arg;
	pin(0);
	for (long i = 0; i < pingpong_rounds; i++) {
		while (atomic_load(&turn) == 0)
			futex(&turn, FUTEX_WAIT_PRIVATE, 0);
		atomic_store(&turn, 0);
		futex(&turn, FUTEX_WAKE_PRIVATE, 1);
	}
	return NULL;
}

/* Two threads on CPU 0 hand a futex back and forth: ns per switch. */
static double context_switch(void)
{
	double v[MAX_REPS];
	int reps = 9;

	pin(0);
	pingpong_rounds = 2000;
	for (int r = 0; r < reps; r++) {
		pthread_t t;

		atomic_store(&turn, 0);
		pthread_create(&t, NULL, pong, NULL);
		int64_t t0 = now_ns();

		for (long i = 0; i < pingpong_rounds; i++) {
			atomic_store(&turn, 1);
			futex(&turn, FUTEX_WAKE_PRIVATE, 1);
			while (atomic_load(&turn) == 1)
				futex(&turn, FUTEX_WAIT_PRIVATE, 1);
		}
		v[r] = (double)(now_ns() - t0) / (2.0 * pingpong_rounds);
		pthread_join(t, NULL);
	}
	return median(v, reps);
}

/* ---------------------------------------------------------------- spin */

static _Alignas(64) atomic_long spin_line;
static atomic_int spin_stop;

static void *spin_writer(void *arg)
{
	(void)arg;
	pin(1);
	while (!atomic_load_explicit(&spin_stop, memory_order_relaxed))
		atomic_fetch_add_explicit(&spin_line, 1, memory_order_relaxed);
	return NULL;
}

/* One round of an optimistic spin: load the word, cmpxchg it, while CPU 1 keeps writing it. */
static double spin_round(void)
{
	const long rounds = 20000;
	double v[MAX_REPS];
	int reps = 9;
	pthread_t t;

	pin(0);
	atomic_store(&spin_stop, 0);
	pthread_create(&t, NULL, spin_writer, NULL);
	for (int r = 0; r < reps; r++) {
		int64_t t0 = now_ns();

		for (long i = 0; i < rounds; i++) {
			long seen = atomic_load_explicit(&spin_line, memory_order_relaxed);

			atomic_compare_exchange_strong(&spin_line, &seen, seen);
		}
		v[r] = (double)(now_ns() - t0) / rounds;
	}
	atomic_store(&spin_stop, 1);
	pthread_join(t, NULL);
	return median(v, reps);
}

/* ---------------------------------------------------------------- mutex */

static void mutex_costs(double *lock_ns, double *unlock_ns)
{
	enum { K = 256 };
	static pthread_mutex_t m[K];
	double lv[MAX_REPS], uv[MAX_REPS];
	int reps = 41;

	for (int i = 0; i < K; i++)
		pthread_mutex_init(&m[i], NULL);
	for (int r = 0; r < reps; r++) {
		int64_t t0 = now_ns();

		for (int i = 0; i < K; i++)
			pthread_mutex_lock(&m[i]);
		int64_t t1 = now_ns();

		for (int i = 0; i < K; i++)
			pthread_mutex_unlock(&m[i]);
		int64_t t2 = now_ns();

		lv[r] = (double)(t1 - t0) / K;
		uv[r] = (double)(t2 - t1) / K;
	}
	*lock_ns = median(lv, reps);
	*unlock_ns = median(uv, reps);
}

/* ---------------------------------------------------------------- TLB shootdown */

static atomic_int spinner_stop;
static atomic_int spinner_running;

static void *spinner(void *arg)
{
	(void)arg;
	pin(1);
	atomic_store(&spinner_running, 1);
	while (!atomic_load_explicit(&spinner_stop, memory_order_relaxed))
		;
	return NULL;
}

enum change { CHANGE_MPROTECT, CHANGE_MADVISE };

/*
 * One change of one present, writable page: mprotect(PROT_READ) or
 * madvise(MADV_DONTNEED), timed alone (the page is made writable and present
 * again outside the timing). With `remote`, a second thread of the process
 * spins on CPU 1, so the change must shoot down CPU 1's TLB.
 */
static double page_change(enum change how, int remote)
{
	const int calls = 301;
	double v[512];
	pthread_t t;
	volatile char *page = mmap(NULL, PAGE, PROT_READ | PROT_WRITE,
				   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (page == MAP_FAILED) {
		perror("rig-calibrate: page");
		exit(1);
	}
	pin(0);
	if (remote) {
		atomic_store(&spinner_stop, 0);
		atomic_store(&spinner_running, 0);
		pthread_create(&t, NULL, spinner, NULL);
		while (!atomic_load(&spinner_running))
			;
	}
	for (int i = 0; i < calls; i++) {
		page[0] = (char)i;	/* present and writable */
		int64_t t0 = now_ns();

		if (how == CHANGE_MPROTECT)
			mprotect((void *)page, PAGE, PROT_READ);
		else
			madvise((void *)page, PAGE, MADV_DONTNEED);
		v[i] = (double)(now_ns() - t0) - clock_overhead;
		if (how == CHANGE_MPROTECT)
			mprotect((void *)page, PAGE, PROT_READ | PROT_WRITE);
	}
	if (remote) {
		atomic_store(&spinner_stop, 1);
		pthread_join(t, NULL);
	}
	munmap((void *)page, PAGE);
	return median(v, calls);
}

/* ---------------------------------------------------------------- memcpy */

static double memcpy_gbps(size_t bytes)
{
	char *src = malloc(bytes), *dst = malloc(bytes);
	long iters = (long)((64UL << 20) / bytes);
	double v[MAX_REPS];
	int reps = 7;

	if (!src || !dst) {
		perror("rig-calibrate: memcpy buffers");
		exit(1);
	}
	if (iters < 2)
		iters = 2;
	memset(src, 1, bytes);
	memset(dst, 2, bytes);
	for (int r = 0; r < reps; r++) {
		int64_t t0 = now_ns();

		for (long i = 0; i < iters; i++) {
			memcpy(dst, src, bytes);
			__asm__ volatile("" : : "r"(dst) : "memory");
		}
		v[r] = (double)bytes * iters / (double)(now_ns() - t0);	/* bytes/ns = GB/s */
	}
	free(src);
	free(dst);
	return median(v, reps);
}

/* ---------------------------------------------------------------- scheduler */

static long read_long(const char *path)
{
	FILE *f = fopen(path, "r");
	long v = -1;

	if (f) {
		if (fscanf(f, "%ld", &v) != 1)
			v = -1;
		fclose(f);
	}
	return v;
}

/*
 * The preemption mode: /sys/kernel/debug/sched/preempt ("none (voluntary)
 * full": the one in parentheses) where it exists (CONFIG_SCHED_DEBUG), else
 * the boot message of PREEMPT_DYNAMIC, "Dynamic Preempt: voluntary".
 * Returns where it was read.
 */
static const char *preemption(char *out, size_t n)
{
	char text[128] = "";
	FILE *f = fopen("/sys/kernel/debug/sched/preempt", "r");

	snprintf(out, n, "unknown");
	if (f) {
		if (fgets(text, sizeof(text), f)) {
			char *a = strchr(text, '('), *b = a ? strchr(a, ')') : NULL;

			if (a && b) {
				*b = 0;
				snprintf(out, n, "%s", a + 1);
			}
		}
		fclose(f);
		return "/sys/kernel/debug/sched/preempt";
	}
	static char log[1 << 17];
	int len = klogctl(3 /* SYSLOG_ACTION_READ_ALL */, log, sizeof(log) - 1);

	if (len > 0) {
		log[len] = 0;
		char *m = strstr(log, "Dynamic Preempt: ");

		if (m) {
			m += strlen("Dynamic Preempt: ");
			size_t k = strcspn(m, "\n");

			snprintf(out, n, "%.*s", (int)k, m);
			return "the boot message 'Dynamic Preempt: ...' (CONFIG_SCHED_DEBUG is off, no debugfs file)";
		}
	}
	return "not found";
}

/*
 * EEVDF's base slice: /sys/kernel/debug/sched/base_slice_ns where it exists
 * (CONFIG_SCHED_DEBUG); else 6.12's rule (kernel/sched/fair.c): 0.7 ms times
 * 1 + ilog2(min(online CPUs, 8)) under the default logarithmic scaling.
 */
static long base_slice(long ncpu, const char **source)
{
	long v = read_long("/sys/kernel/debug/sched/base_slice_ns");

	if (v > 0) {
		*source = "/sys/kernel/debug/sched/base_slice_ns";
		return v;
	}
	long cpus = ncpu < 8 ? ncpu : 8, log2 = 0;

	while ((1L << (log2 + 1)) <= cpus)
		log2++;
	*source = "computed, not read (CONFIG_SCHED_DEBUG is off, as in the reference config, so there is no debugfs file): 6.12's sysctl_sched_base_slice = 700000 ns x (1 + ilog2(min(online CPUs, 8))), kernel/sched/fair.c";
	return 700000L * (1 + log2);
}

static long cmdline_hz(void)
{
	char line[4096] = "", *p;
	FILE *f = fopen("/proc/cmdline", "r");

	if (f) {
		if (!fgets(line, sizeof(line), f))
			line[0] = 0;
		fclose(f);
	}
	p = strstr(line, "righz=");
	return p ? strtol(p + 6, NULL, 10) : -1;
}

/* ---------------------------------------------------------------- main */

/* One stall probe over `n` pinned CPUs (5 rounds of 2 s), as one JSON object. */
static void print_stalls(const char *sep, const char *key, const int *cpus, int n, uint64_t tick)
{
	svm_stall_result st;
	int rc = svm_stall_measure(cpus, n, 5, 2000000000ULL, tick, &st);

	if (rc) {
		fprintf(stderr, "rig-calibrate: stalls not measured (%s)\n", strerror(-rc));
		memset(&st, 0, sizeof(st));
	}
	printf("%s\"%s\": {\"busyCPUs\": %d, \"ratePerSecond\": %.2f, \"meanNanos\": %.1f, \"p50Nanos\": %.1f, "
	       "\"p90Nanos\": %.1f, \"p99Nanos\": %.1f, \"maxNanos\": %.1f, \"thresholdNanos\": %.1f, "
	       "\"tickGapsPerSecond\": %.2f, \"tickGapP50Nanos\": %.1f, \"stalledShare\": %.4f, "
	       "\"sharedShare\": %.4f, \"sharedStallsShare\": %.4f, \"longSharedShare\": %.4f}",
	       sep, key, n, st.ratePerSecond, st.meanNanos, st.p50Nanos, st.p90Nanos,
	       st.p99Nanos, st.maxNanos, st.thresholdNanos, st.tickGapsPerSecond, st.tickGapP50Nanos,
	       st.stalledShare, st.sharedShare, st.sharedStallsShare, st.longSharedShare);
}

/*
 * rig-calibrate -S: the stall probe alone, first with vCPU 0 spinning and
 * vCPU 1 idle, then with both spinning (as the full calibration does), one
 * RIG-STALLS line. Under TCG a stall is the host taking a vCPU thread's
 * core: with one vCPU idle, the host's own work has a core to run on.
 */
static int stalls_only(void)
{
	long hz = cmdline_hz();
	uint64_t tick = hz > 0 ? 1000000000ULL / (uint64_t)hz : 1000000ULL;
	int one[1] = { 0 }, both[2] = { 0, 1 };

	fprintf(stderr, "rig-calibrate: stalls (5 x 2 s on vCPU 0 alone, then on both)\n");
	printf("RIG-STALLS {");
	print_stalls("", "oneBusy", one, 1, tick);
	print_stalls(", ", "bothBusy", both, 2, tick);
	printf("}\n");
	fflush(stdout);
	return 0;
}

int main(int argc, char **argv)
{
	double hit, miss, fault, sys, wake, waitv, wlat, cs, spin, lock, unlock, yield;
	double local_mp, remote_mp, local_md, remote_md;
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);

	if (ncpu < 2) {
		fprintf(stderr, "rig-calibrate: needs 2 CPUs, has %ld\n", ncpu);
		return 1;
	}
	if (argc > 1 && strcmp(argv[1], "-W") == 0)
		return timer_wake_only();
	if (argc > 1 && strcmp(argv[1], "-S") == 0)
		return stalls_only();
	pin(0);
	fprintf(stderr, "rig-calibrate: clock\n");
	measure_clock();
	fprintf(stderr, "rig-calibrate: pointer chases\n");
	hit = chase(16, 1L << 20, 15);
	miss = chase(65536, 1L << 20, 9);
	fprintf(stderr, "rig-calibrate: faults\n");
	fault = zero_page_fault();
	fprintf(stderr, "rig-calibrate: syscalls\n");
	sys = per_call(OP_GETPPID, 20000, 21);
	wake = per_call(OP_FUTEX_WAKE, 20000, 21);
	waitv = per_call(OP_FUTEX_WAIT_EAGAIN, 20000, 21);
	yield = per_call(OP_YIELD, 20000, 21);
	fprintf(stderr, "rig-calibrate: wake-up, context switch, spin, mutex\n");
	wlat = wake_latency();
	cs = context_switch();
	spin = spin_round();
	mutex_costs(&lock, &unlock);
	fprintf(stderr, "rig-calibrate: TLB shootdown\n");
	local_mp = page_change(CHANGE_MPROTECT, 0);
	remote_mp = page_change(CHANGE_MPROTECT, 1);
	local_md = page_change(CHANGE_MADVISE, 0);
	remote_md = page_change(CHANGE_MADVISE, 1);
	fprintf(stderr, "rig-calibrate: memcpy\n");

	size_t sizes[] = { 4096, 16384, 65536, 262144, 1UL << 20, 4UL << 20, 16UL << 20, 64UL << 20 };
	double gbps[8];

	for (int i = 0; i < 8; i++)
		gbps[i] = memcpy_gbps(sizes[i]);

	char preempt[32];
	const char *slice_source;
	long slice = base_slice(ncpu, &slice_source);
	long hz = cmdline_hz();
	const char *preempt_source = preemption(preempt, sizeof(preempt));
	uint64_t tick = hz > 0 ? 1000000000ULL / (uint64_t)hz : 1000000ULL;

	fprintf(stderr, "rig-calibrate: stalls (5 x 2 s on both CPUs)\n");
	int stall_cpus[2] = { 0, 1 };
	svm_stall_result st;
	int stall_rc = svm_stall_measure(stall_cpus, 2, 5, 2000000000ULL, tick, &st);

	if (stall_rc) {
		fprintf(stderr, "rig-calibrate: stalls not measured (%s)\n", strerror(-stall_rc));
		memset(&st, 0, sizeof(st));
	}

	double rtt = remote_mp - local_mp;

	printf("RIG-CALIBRATION-BEGIN\n{\n");
	printf("  \"cpus\": %ld,\n  \"costs\": {\n", ncpu);
	printf("    \"tlbHit\": %.1f,\n", hit);
	printf("    \"pageTableWalk\": %.1f,\n", miss - hit);
	printf("    \"faultEntryExit\": %.1f,\n", fault - hit);
	printf("    \"syscall\": %.1f,\n", sys);
	printf("    \"futexWake\": %.1f,\n", wake);
	printf("    \"futexWait\": %.1f,\n", waitv);
	printf("    \"wakeLatency\": %.1f,\n", wlat);
	printf("    \"contextSwitch\": %.1f,\n", cs);
	printf("    \"spinRound\": %.1f,\n", spin);
	printf("    \"lockUncontended\": %.1f,\n", lock);
	printf("    \"unlock\": %.1f,\n", unlock);
	printf("    \"yield\": %.1f,\n", yield);
	printf("    \"ipiSendToReceipt\": %.1f,\n", rtt / 2);
	printf("    \"ipiRoundTrip\": %.1f,\n", rtt);
	printf("    \"localFlush\": %.1f\n  },\n", local_mp);
	printf("  \"memcpy\": [");
	for (int i = 0; i < 8; i++)
		printf("%s\n    {\"workingSetBytes\": %zu, \"gbPerSecond\": %.3f}", i ? "," : "", sizes[i], gbps[i]);
	printf("\n  ],\n");
	printf("  \"scheduler\": {\"baseSliceNanos\": %ld, \"tickNanos\": %ld, \"preemption\": \"%s\"},\n",
	       slice, hz > 0 ? 1000000000L / hz : -1, preempt);
	printf("  \"stalls\": {\"ratePerSecond\": %.2f, \"meanNanos\": %.1f, \"p50Nanos\": %.1f, \"p90Nanos\": %.1f, "
	       "\"p99Nanos\": %.1f, \"maxNanos\": %.1f, \"thresholdNanos\": %.1f, \"tickGapsPerSecond\": %.2f, "
	       "\"tickGapP50Nanos\": %.1f},\n",
	       st.ratePerSecond, st.meanNanos, st.p50Nanos, st.p90Nanos, st.p99Nanos, st.maxNanos, st.thresholdNanos,
	       st.tickGapsPerSecond, st.tickGapP50Nanos);
	printf("  \"raw\": {\"clockPairNanos\": %.1f, \"chaseSmallNanos\": %.1f, \"chaseLargeNanos\": %.1f, "
	       "\"zeroPageReadNanos\": %.1f, \"mprotectLocalNanos\": %.1f, \"mprotectRemoteNanos\": %.1f, "
	       "\"madviseLocalNanos\": %.1f, \"madviseRemoteNanos\": %.1f, "
	       "\"stallLoopNanos\": %.1f, \"stallCount\": %llu, \"stallTickGaps\": %llu, \"stallPreemptionsPerSecond\": %.2f, "
	       "\"stallSeconds\": %.2f, \"stallDropped\": %llu},\n",
	       clock_overhead, hit, miss, fault, local_mp, remote_mp, local_md, remote_md,
	       st.loopNanos, (unsigned long long)st.stalls, (unsigned long long)st.tickGaps, st.preemptionsPerSecond,
	       st.seconds, (unsigned long long)st.dropped);
	printf("  \"methods\": {\n");
	printf("    \"tlbHit\": \"Dependent pointer chase over 16 pages at a 4 KiB stride (one pointer per page, a different cache line in each, random cyclic order): ns per load, median of 15 runs of 2^20 loads. All in the TLB and L1.\",\n");
	printf("    \"pageTableWalk\": \"The same chase over 65536 pages (256 MiB, 4 KiB pages, MADV_NOHUGEPAGE) minus tlbHit: a TLB-missing read, its cache misses included. Median of 9 runs of 2^20 loads.\",\n");
	printf("    \"faultEntryExit\": \"First read of each page of a fresh 2048-page anonymous mapping (a minor fault that maps the zero page) minus tlbHit, per page; median of 15 mappings.\",\n");
	printf("    \"syscall\": \"syscall(SYS_getppid) in a loop of 20000; median of 21 loops.\",\n");
	printf("    \"futexWake\": \"FUTEX_WAKE_PRIVATE on a word nobody waits on, loop of 20000; median of 21 loops.\",\n");
	printf("    \"futexWait\": \"FUTEX_WAIT_PRIVATE with a value that does not match (returns EAGAIN at once), loop of 20000; median of 21 loops.\",\n");
	printf("    \"wakeLatency\": \"A thread pinned to CPU 1 sleeps in FUTEX_WAIT (CPU 1 idle for 2 ms); CPU 0 stores the word and calls FUTEX_WAKE: from just before the store to the woken thread's first clock read on CPU 1. Median of 101 wake-ups.\",\n");
	printf("    \"contextSwitch\": \"Two threads pinned to CPU 0 hand a futex word back and forth (each hand-off: a store, FUTEX_WAKE, the other thread returns from FUTEX_WAIT): total time / number of switches, 4000 switches a run, median of 9 runs. Includes one FUTEX_WAKE with a waiter and the return from one FUTEX_WAIT per switch.\",\n");
	printf("    \"spinRound\": \"A thread on CPU 0 loops load + cmpxchg (the same value back) on a 64-byte line that a thread on CPU 1 increments without pause: ns per round, 20000 rounds a run, median of 9 runs.\",\n");
	printf("    \"lockUncontended\": \"pthread_mutex_lock of 256 unlocked mutexes in a row (glibc, uncontended fast path): ns per lock, median of 41 runs.\",\n");
	printf("    \"unlock\": \"pthread_mutex_unlock of the same 256 mutexes right after: ns per unlock, median of 41 runs.\",\n");
	printf("    \"yield\": \"sched_yield() with nothing else runnable on the CPU, loop of 20000; median of 21 loops.\",\n");
	printf("    \"ipiRoundTrip\": \"mprotect(PROT_READ) of one present writable page, timed alone (clock pair subtracted), while a second thread of the process spins on CPU 1, minus the same with one thread (localFlush): the shootdown's IPI round trip as the initiator sees it. Median of 301 calls each.\",\n");
	printf("    \"ipiSendToReceipt\": \"Half of ipiRoundTrip (the initiator waits for the receiver's flush and acknowledgement; send and return are taken as equal).\",\n");
	printf("    \"localFlush\": \"mprotect(PROT_READ) of one present writable page in a single-threaded process (syscall, PTE change and the local INVLPG), timed alone with the clock pair subtracted; median of 301 calls.\",\n");
	printf("    \"memcpy\": \"memcpy between two buffers of the working set's size, repeated to 64 MiB a run (at least twice): bytes / ns, median of 7 runs. glibc (static) picks its copy loop by size and CPUID; the low figures from 16 KiB to 256 KiB are most likely its rep movsb range, which TCG executes slowly.\",\n");
	printf("    \"stalls\": \"On vCPU 0 and 1 (at the same time) one pinned thread each reads CLOCK_MONOTONIC in a loop, 5 rounds of 2 s, and notes every gap between two reads above thresholdNanos (5 x the median loop, at least 2 us). Not stalls: gaps in which the thread's involuntary context switches went up (getrusage RUSAGE_THREAD: the guest kernel ran another task there), and the guest tick's gaps: a gap in which the vCPU's local timer interrupt count went up (/proc/interrupts LOC, read after each gap; by the tick's phase, %llu ns period, where it cannot be read), no longer than a quarter tick and than 4 x the median of such short timer gaps, is the tick's (tickGapsPerSecond, tickGapP50Nanos); the bookkeeping after a gap and the reads until 16 in a row are under the threshold are not covered. Every other gap is a stall (the host descheduling a vCPU thread, TCG's pauses): rate per second per vCPU, mean, nearest-rank percentiles and the longest over both vCPUs. Same probe as svmemu calibrate (Sources/CSVMSupport/svm_stall_probe.h).\",\n",
	       (unsigned long long)tick);
	printf("    \"scheduler\": \"baseSliceNanos: %s. tickNanos: 1e9 / CONFIG_HZ of the rig's .config (passed as righz=). preemption: read from %s.\"\n", slice_source, preempt_source);
	printf("  }\n}\nRIG-CALIBRATION-END\n");
	printf("rig-calibrate: madvise(MADV_DONTNEED) of one page: %.1f ns alone, %.1f ns with a thread on CPU 1 (difference %.1f)\n",
	       local_md, remote_md, remote_md - local_md);
	fflush(stdout);
	return 0;
}
