/*
 * bencher-noise: the reference workloads of `runner noise` (src/bencher_runner/noise.py).
 *
 * One static binary, run on the bare host and inside the sandbox alike, so both measure the same
 * machine code. Each mode does a fixed amount of work and prints one line "MODE NANOSECONDS"
 * (CLOCK_MONOTONIC around the work only):
 *   cpu      a dependent integer loop (xorshift), no memory traffic beyond registers
 *   mem      copies a buffer larger than the caches back and forth (memory bandwidth)
 *   syscall  getppid() in a loop (the cost of entering and leaving the kernel)
 *   all      the three in that order
 * An optional second argument scales the work (default 1).
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define CPU_LOOPS 10000000ULL
#define MEM_BYTES (16u << 20)
#define MEM_PASSES 8u
#define SYSCALLS 100000UL

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static volatile uint64_t sink;

static void cpu(unsigned long scale)
{
	uint64_t x = 88172645463325252ULL;
	for (uint64_t i = 0; i < CPU_LOOPS * scale; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
	}
	sink = x;
}

static void mem(unsigned long scale)
{
	char *a = malloc(MEM_BYTES), *b = malloc(MEM_BYTES);
	if (!a || !b) {
		fprintf(stderr, "bencher-noise: cannot allocate 2 x %u MiB\n", MEM_BYTES >> 20);
		exit(2);
	}
	memset(a, 1, MEM_BYTES);
	memset(b, 2, MEM_BYTES);
	for (unsigned long i = 0; i < MEM_PASSES * scale; i++) {
		memcpy(i % 2 ? a : b, i % 2 ? b : a, MEM_BYTES);
	}
	sink = (uint64_t)a[MEM_BYTES / 2] + (uint64_t)b[MEM_BYTES / 3];
	free(a);
	free(b);
}

static void sys(unsigned long scale)
{
	uint64_t sum = 0;
	for (unsigned long i = 0; i < SYSCALLS * scale; i++)
		sum += (uint64_t)syscall(SYS_getppid);
	sink = sum;
}

static void timed(const char *name, void (*fn)(unsigned long), unsigned long scale)
{
	uint64_t t0 = now_ns();
	fn(scale);
	printf("%s %llu\n", name, (unsigned long long)(now_ns() - t0));
	fflush(stdout);
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "all";
	unsigned long scale = argc > 2 ? strtoul(argv[2], NULL, 10) : 1;
	int all = strcmp(mode, "all") == 0, done = 0;
	if (scale == 0)
		scale = 1;
	if (all || strcmp(mode, "cpu") == 0)
		timed("cpu", cpu, scale), done = 1;
	if (all || strcmp(mode, "mem") == 0)
		timed("mem", mem, scale), done = 1;
	if (all || strcmp(mode, "syscall") == 0)
		timed("syscall", sys, scale), done = 1;
	if (!done) {
		fprintf(stderr, "usage: bencher-noise [cpu|mem|syscall|all] [SCALE]\n");
		return 2;
	}
	return 0;
}
