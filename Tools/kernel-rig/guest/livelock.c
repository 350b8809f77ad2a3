// SPDX-License-Identifier: GPL-2.0
/*
 * rig-livelock: the kernel rig's livelock case (Tools/kernel-rig).
 *
 * N pages of private anonymous memory are moved to test_hmm's device-private
 * memory (HMM_DMIRROR_MIGRATE_TO_DEV). Then T threads walk the pages
 * together: for each page they meet at a pthread barrier and all read the
 * page's first word, so every one of them faults on the same device-private
 * entry at the same moment and the kernel calls the driver's migrate_to_ram
 * (test_hmm's dmirror_devmem_fault) from several threads at once. The
 * test_hmm knob patch counts the calls (fault_calls) and the pages actually
 * migrated (fault_migrated), and can serialise the driver's work under a
 * mutex (fault_mutex) with a sleep inside it (fault_delay_us).
 *
 * A watchdog on the main thread declares LIVELOCK when no page completes for
 * -w seconds (migrate_to_ram keeps being called, no page comes back).
 *
 * usage: rig-livelock -t THREADS [-m 0|1] [-d DELAY_US] [-n PAGES] [-w SECONDS] [-D DEV] [-T] [-P]
 *   -m/-d set /sys/module/test_hmm/parameters/fault_mutex and fault_delay_us
 *   (needs the knob patch; without it, only -m 0 -d 0 runs).
 *   -T also prints one "RIG-TRACE {json}" line after the result: how the
 *   threads left the barrier and read each page (for comparing the timing
 *   with the emulator's; see print_trace()). Without -T the output is as before.
 *   -P turns tracing on (/sys/kernel/tracing/tracing_on) just before the
 *   threads start and off once they are done, so that kprobe events the
 *   guest's init set (rigmode=probe) record the reads' faults only, not the
 *   setup's (`rig.sh probe`).
 * Output: human lines, then one line "RIG-RESULT {json}" that
 * Tools/kernel-rig/rigresults.py reads. Exit 0 completes, 3 livelock,
 * 4 wrong data, 1 setup error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <lib/test_hmm_uapi.h>

#define PARAMS "/sys/module/test_hmm/parameters/"

struct options {
	int threads;
	int mutex;
	unsigned int delay_us;
	unsigned long pages;
	int watchdog_s;
	const char *device;
	int trace;
	int probe;
};

static struct options opt = { 8, 0, 0, 512, 30, "/dev/hmm_dmirror0", 0, 0 };
static char *area;
static size_t page_bytes;
static pthread_barrier_t gate;
static int64_t *entered;	/* [page * threads + t] ns when t left the barrier */
static int64_t *returned;	/* [page * threads + t] ns when t's read returned */
static atomic_ulong pages_done;
static atomic_long wrong_values;

static int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static long param_read(const char *name)
{
	char path[128], text[64];
	long value = -1;
	FILE *f;

	snprintf(path, sizeof(path), PARAMS "%s", name);
	f = fopen(path, "r");
	if (!f)
		return -1;
	if (fgets(text, sizeof(text), f))
		value = text[0] == 'Y' ? 1 : text[0] == 'N' ? 0 : strtol(text, NULL, 10);
	fclose(f);
	return value;
}

static int param_write(const char *name, long value)
{
	char path[128];
	FILE *f;
	int ok;

	snprintf(path, sizeof(path), PARAMS "%s", name);
	f = fopen(path, "w");
	if (!f)
		return -1;
	ok = fprintf(f, "%ld\n", value) > 0;
	return fclose(f) == 0 && ok ? 0 : -1;
}

/* -P: tracing_on, so the kprobe events record the reads only. */
static void tracing(int on)
{
	FILE *f;

	if (!opt.probe)
		return;
	f = fopen("/sys/kernel/tracing/tracing_on", "w");
	if (!f) {
		perror("rig-livelock: /sys/kernel/tracing/tracing_on");
		return;
	}
	fprintf(f, "%d\n", on);
	fclose(f);
}

static void *reader(void *arg)
{
	long t = (long)arg;

	for (unsigned long p = 0; p < opt.pages; p++) {
		volatile const uint32_t *word = (const uint32_t *)(area + p * page_bytes);
		uint32_t seen;

		pthread_barrier_wait(&gate);
		entered[p * opt.threads + t] = now_ns();
		seen = *word;		/* device-private entry: fault, migrate_to_ram */
		returned[p * opt.threads + t] = now_ns();
		if (seen != (uint32_t)(p * 2654435761u))
			atomic_fetch_add(&wrong_values, 1);
		if (pthread_barrier_wait(&gate) == PTHREAD_BARRIER_SERIAL_THREAD)
			atomic_store(&pages_done, p + 1);
	}
	return NULL;
}

static int cmp_i64(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;

	return (x > y) - (x < y);
}

/* Nearest-rank quantile q (0..1) of n sorted values. */
static int64_t quantile(const int64_t *sorted, unsigned long n, double q)
{
	unsigned long i = (unsigned long)(q * (double)n);

	return n ? sorted[i < n ? i : n - 1] : 0;
}

static void print_quantiles(const char *name, int64_t *values, unsigned long n)
{
	qsort(values, n, sizeof(*values), cmp_i64);
	printf(",\"%s\":{\"p10\":%lld,\"p50\":%lld,\"p90\":%lld,\"max\":%lld}", name,
	       (long long)quantile(values, n, 0.1), (long long)quantile(values, n, 0.5),
	       (long long)quantile(values, n, 0.9), (long long)(n ? values[n - 1] : 0));
}

/*
 * -T: for the first `done` pages (all completed), in ns on CLOCK_MONOTONIC:
 * exitGap = the second thread out of the barrier minus the first (a second
 * faulter can only overlap the first one's migration when this is short),
 * exitSpread = the last out minus the first, leaderRead = how long the first
 * thread out took to read the page (its fault and migrate_to_ram, the
 * driver's sleep included), fastestRead / slowestRead over the threads; the
 * quantiles over all pages, and exitGap and leaderRead per page for the first
 * 64. For a livelock, also each thread's exit from the stalled page's barrier
 * relative to the first (-1: not out). Reads the threads' timestamps without
 * stopping them: only completed pages, and the stalled page's exits.
 */
static void print_trace(unsigned long done)
{
	unsigned long n = done < opt.pages ? done : opt.pages, shown = n < 64 ? n : 64;
	int64_t *gap = calloc(n + 1, sizeof(*gap)), *spread = calloc(n + 1, sizeof(*spread));
	int64_t *lead = calloc(n + 1, sizeof(*lead)), *fast = calloc(n + 1, sizeof(*fast));
	int64_t *slow = calloc(n + 1, sizeof(*slow));

	if (!gap || !spread || !lead || !fast || !slow)
		return;
	for (unsigned long p = 0; p < n; p++) {
		int64_t first = INT64_MAX, second = INT64_MAX, last = 0, lo = INT64_MAX, hi = 0;
		int leader = 0;

		for (int t = 0; t < opt.threads; t++) {
			int64_t e = entered[p * opt.threads + t], r = returned[p * opt.threads + t] - e;

			if (e < first) {
				second = first;
				first = e;
				leader = t;
			} else if (e < second) {
				second = e;
			}
			last = e > last ? e : last;
			lo = r < lo ? r : lo;
			hi = r > hi ? r : hi;
		}
		gap[p] = opt.threads > 1 ? second - first : 0;
		spread[p] = last - first;
		lead[p] = returned[p * opt.threads + leader] - first;
		fast[p] = lo;
		slow[p] = hi;
	}
	printf("RIG-TRACE {\"threads\":%d,\"mutex\":%d,\"sleepMicros\":%u,\"pagesTraced\":%lu",
	       opt.threads, opt.mutex, opt.delay_us, n);
	printf(",\"firstPages\":[");
	for (unsigned long p = 0; p < shown; p++)
		printf("%s{\"exitGap\":%lld,\"leaderRead\":%lld}", p ? "," : "",
		       (long long)gap[p], (long long)lead[p]);
	printf("]");
	print_quantiles("exitGap", gap, n);
	print_quantiles("exitSpread", spread, n);
	print_quantiles("leaderRead", lead, n);
	print_quantiles("fastestRead", fast, n);
	print_quantiles("slowestRead", slow, n);
	if (done < opt.pages) {
		int64_t first = INT64_MAX;

		for (int t = 0; t < opt.threads; t++) {
			int64_t e = entered[done * opt.threads + t];

			if (e && e < first)
				first = e;
		}
		printf(",\"stalledPageExits\":[");
		for (int t = 0; t < opt.threads; t++) {
			int64_t e = entered[done * opt.threads + t];

			printf("%s%lld", t ? "," : "", (long long)(e ? e - first : -1));
		}
		printf("]");
	}
	printf("}\n");
	fflush(stdout);
	free(gap);
	free(spread);
	free(lead);
	free(fast);
	free(slow);
}

static void print_result(const char *outcome, double seconds, long calls, long migrated,
			 const int64_t *span_sorted, unsigned long stalled_page, double calls_per_s)
{
	printf("RIG-RESULT {\"threads\":%d,\"mutex\":%d,\"sleepMicros\":%u,\"pages\":%lu,"
	       "\"outcome\":\"%s\"", opt.threads, opt.mutex, opt.delay_us, opt.pages, outcome);
	if (span_sorted) {
		printf(",\"seconds\":%.4f,\"calls\":%ld,\"migrated\":%ld,\"callsPerPage\":%.2f,"
		       "\"medianPageMicros\":%.1f,\"worstPageMicros\":%.1f",
		       seconds, calls, migrated, (double)calls / opt.pages,
		       span_sorted[opt.pages / 2] / 1e3, span_sorted[opt.pages - 1] / 1e3);
	} else {
		printf(",\"watchdogSeconds\":%d,\"stalledPage\":%lu,\"calls\":%ld,\"migrated\":%ld,"
		       "\"callsPerSecond\":%.1f", opt.watchdog_s, stalled_page, calls, migrated, calls_per_s);
	}
	printf(",\"wrongValues\":%ld}\n", atomic_load(&wrong_values));
	fflush(stdout);
}

int main(int argc, char **argv)
{
	struct hmm_dmirror_cmd cmd;
	unsigned char *mirror;
	pthread_t *tids;
	int fd, c;

	while ((c = getopt(argc, argv, "t:m:d:n:w:D:TP")) != -1) {
		switch (c) {
		case 't': opt.threads = atoi(optarg); break;
		case 'm': opt.mutex = atoi(optarg); break;
		case 'd': opt.delay_us = strtoul(optarg, NULL, 10); break;
		case 'n': opt.pages = strtoul(optarg, NULL, 10); break;
		case 'w': opt.watchdog_s = atoi(optarg); break;
		case 'D': opt.device = optarg; break;
		case 'T': opt.trace = 1; break;
		case 'P': opt.probe = 1; break;
		default:
			fprintf(stderr, "usage: %s -t THREADS [-m 0|1] [-d DELAY_US] [-n PAGES] [-w SECONDS] [-D DEV] [-T] [-P]\n", argv[0]);
			return 1;
		}
	}
	if (opt.threads < 1 || opt.pages < 1 || opt.watchdog_s < 1 || (opt.mutex != 0 && opt.mutex != 1)) {
		fprintf(stderr, "rig-livelock: -t, -n, -w must be positive, -m 0 or 1\n");
		return 1;
	}
	page_bytes = (size_t)sysconf(_SC_PAGESIZE);

	/* The knobs: absent on an unpatched test_hmm, where only 0/0 can run. */
	if (param_write("fault_mutex", opt.mutex) || param_write("fault_delay_us", opt.delay_us)) {
		if (opt.mutex || opt.delay_us) {
			fprintf(stderr, "rig-livelock: test_hmm has no fault_mutex/fault_delay_us (knob patch missing)\n");
			return 1;
		}
	}

	fd = open(opt.device, O_RDWR);
	if (fd < 0) {
		perror(opt.device);
		return 1;
	}
	area = mmap(NULL, opt.pages * page_bytes, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	mirror = malloc(opt.pages * page_bytes);
	if (area == MAP_FAILED || !mirror) {
		perror("rig-livelock: memory");
		return 1;
	}
	madvise(area, opt.pages * page_bytes, MADV_NOHUGEPAGE);
	for (unsigned long p = 0; p < opt.pages; p++) {
		memset(area + p * page_bytes, 0x5a, page_bytes);
		*(uint32_t *)(area + p * page_bytes) = (uint32_t)(p * 2654435761u);
	}

	memset(&cmd, 0, sizeof(cmd));
	cmd.addr = (uintptr_t)area;
	cmd.ptr = (uintptr_t)mirror;
	cmd.npages = opt.pages;
	while (ioctl(fd, HMM_DMIRROR_MIGRATE_TO_DEV, &cmd) != 0) {
		if (errno != EINTR) {
			perror("rig-livelock: HMM_DMIRROR_MIGRATE_TO_DEV");
			return 1;
		}
	}
	/* How many pages are device-private now (the snapshot's view). */
	memset(&cmd, 0, sizeof(cmd));
	cmd.addr = (uintptr_t)area;
	cmd.ptr = (uintptr_t)mirror;
	cmd.npages = opt.pages;
	if (ioctl(fd, HMM_DMIRROR_SNAPSHOT, &cmd) == 0) {
		unsigned long device = 0;

		for (unsigned long p = 0; p < opt.pages; p++)
			device += (mirror[p] & HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL) != 0;
		printf("rig-livelock: %lu of %lu pages device-private\n", device, opt.pages);
		if (device != opt.pages) {
			fprintf(stderr, "rig-livelock: not every page moved to the device\n");
			return 1;
		}
	}

	entered = calloc(opt.pages * opt.threads, sizeof(*entered));
	returned = calloc(opt.pages * opt.threads, sizeof(*returned));
	tids = calloc(opt.threads, sizeof(*tids));
	if (!entered || !returned || !tids) {
		perror("rig-livelock: memory");
		return 1;
	}
	pthread_barrier_init(&gate, NULL, opt.threads);
	param_write("fault_calls", 0);
	param_write("fault_migrated", 0);

	tracing(1);
	int64_t start = now_ns();
	for (long t = 0; t < opt.threads; t++)
		if (pthread_create(&tids[t], NULL, reader, (void *)t) != 0) {
			perror("rig-livelock: pthread_create");
			return 1;
		}

	/* Watchdog: a page must complete at least every watchdog_s seconds. */
	unsigned long seen = 0;
	int64_t last_progress = now_ns();
	long calls_at_progress = param_read("fault_calls");
	for (;;) {
		struct timespec tick = { 0, 20 * 1000 * 1000 };
		unsigned long done;

		nanosleep(&tick, NULL);
		done = atomic_load(&pages_done);
		if (done >= opt.pages)
			break;
		if (done != seen) {
			seen = done;
			last_progress = now_ns();
			calls_at_progress = param_read("fault_calls");
			continue;
		}
		double stalled = (now_ns() - last_progress) / 1e9;
		if (stalled >= opt.watchdog_s) {
			long calls = param_read("fault_calls");
			long migrated = param_read("fault_migrated");

			tracing(0);
			printf("rig-livelock: LIVELOCK: page %lu made no progress for %d s "
			       "(%ld migrate_to_ram calls in that time)\n",
			       done, opt.watchdog_s, calls - calls_at_progress);
			print_result("livelock", 0, calls, migrated, NULL, done,
				     (calls - calls_at_progress) / stalled);
			if (opt.trace)
				print_trace(done);
			param_write("fault_mutex", 0);
			param_write("fault_delay_us", 0);
			_exit(3);	/* the readers are stuck in the fault path: end them with the process */
		}
	}
	for (long t = 0; t < opt.threads; t++)
		pthread_join(tids[t], NULL);
	tracing(0);

	long calls = param_read("fault_calls");
	long migrated = param_read("fault_migrated");
	int64_t end = start, *span = calloc(opt.pages, sizeof(*span));
	for (unsigned long p = 0; p < opt.pages; p++) {
		int64_t first = INT64_MAX, last = 0;

		for (int t = 0; t < opt.threads; t++) {
			int64_t e = entered[p * opt.threads + t], r = returned[p * opt.threads + t];

			first = e < first ? e : first;
			last = r > last ? r : last;
		}
		span[p] = last - first;
		end = last > end ? last : end;
	}
	qsort(span, opt.pages, sizeof(*span), cmp_i64);
	printf("rig-livelock: %d threads, %lu pages, mutex %d, sleep %u us: %.4f s, "
	       "%ld migrate_to_ram calls (%.2f per page), %ld migrated, worst page %.1f us\n",
	       opt.threads, opt.pages, opt.mutex, opt.delay_us, (end - start) / 1e9, calls,
	       (double)calls / opt.pages, migrated, span[opt.pages - 1] / 1e3);
	print_result("completes", (end - start) / 1e9, calls, migrated, span, 0, 0);
	if (opt.trace)
		print_trace(opt.pages);
	param_write("fault_mutex", 0);
	param_write("fault_delay_us", 0);
	return atomic_load(&wrong_values) ? 4 : 0;
}
