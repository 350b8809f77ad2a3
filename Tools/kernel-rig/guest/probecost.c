// SPDX-License-Identifier: GPL-2.0
/*
 * rig-probecost: what one kprobe event costs inside the kernel rig's guest
 * (Tools/kernel-rig, `rig.sh probe`). Times a loop of getppid() (a syscall
 * that does nothing; glibc does not cache it) and prints the median
 * nanoseconds per call over ROUNDS rounds of CALLS calls, as one line
 *
 *   RIG-PROBECOST {"label":"LABEL","calls":N,"rounds":R,"p10":..,"p50":..,"p90":..}
 *
 * The guest's init runs it three times: with no probe, with a kprobe event
 * on __x64_sys_getppid, and with a kretprobe event on it (tracing on, the
 * events recorded into the trace buffer as in the fault trace). The
 * difference to the first run is one probe hit's cost, which the host
 * subtracts from each fault interval once per probe hit inside it.
 *
 * usage: rig-probecost LABEL [CALLS] [ROUNDS]
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
	const char *label = argc > 1 ? argv[1] : "none";
	long calls = argc > 2 ? strtol(argv[2], NULL, 10) : 20000;
	int rounds = argc > 3 ? atoi(argv[3]) : 15;
	double per[64];

	if (calls < 1 || rounds < 1 || rounds > 64) {
		fprintf(stderr, "usage: rig-probecost LABEL [CALLS] [ROUNDS<=64]\n");
		return 1;
	}
	for (long i = 0; i < 1000; i++)		/* warm the translation and the caches */
		syscall(SYS_getppid);
	for (int r = 0; r < rounds; r++) {
		int64_t t0 = now_ns();

		for (long i = 0; i < calls; i++)
			syscall(SYS_getppid);
		per[r] = (double)(now_ns() - t0) / (double)calls;
	}
	qsort(per, rounds, sizeof(per[0]), cmp_double);
	printf("RIG-PROBECOST {\"label\":\"%s\",\"calls\":%ld,\"rounds\":%d,"
	       "\"p10\":%.1f,\"p50\":%.1f,\"p90\":%.1f}\n", label, calls, rounds,
	       per[rounds / 10], per[rounds / 2], per[(rounds * 9) / 10]);
	return 0;
}
