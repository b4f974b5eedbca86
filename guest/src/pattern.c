// tern-pattern MIB SEED [RATE]: fills MIB MiB with pages whose content a test predicts
// (tern_testkit::guest::pattern_page): bytes 0..8 "TERNPAT1", 8..16 seed (u64 LE),
// 16..24 page index (u64 LE), 24..4096 xorshift64* words seeded with seed ^ (index *
// 0x9E3779B97F4A7C15) (1 if that is 0). Then re-verifies every second; with RATE > 0
// (MiB/s), between verifications it rewrites the pages in rotation at that rate with the
// same content (pages dirtied whose content a host that saw them before still holds).
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <time.h>
static void fill(uint8_t *pg, uint64_t seed, uint64_t idx) {
  memcpy(pg, "TERNPAT1", 8); memcpy(pg + 8, &seed, 8); memcpy(pg + 16, &idx, 8);
  uint64_t s = seed ^ (idx * 0x9E3779B97F4A7C15ull); if (!s) s = 1;
  for (int k = 0; k < 509; k++) { s ^= s >> 12; s ^= s << 25; s ^= s >> 27; uint64_t w = s * 0x2545F4914F6CDD1Dull; memcpy(pg + 24 + 8 * k, &w, 8); }
}
int main(int argc, char **argv) {
  size_t mib = argc > 1 ? strtoul(argv[1], 0, 0) : 16;
  uint64_t seed = argc > 2 ? strtoull(argv[2], 0, 0) : 1;
  double rate = argc > 3 ? atof(argv[3]) : 0;
  size_t pages = (mib << 20) / 4096;
  uint8_t *p = NULL, ref[4096];
  if (!pages || posix_memalign((void **)&p, 4096, pages * 4096)) { printf("tern-pattern: cannot allocate\n"); return 1; }
  mlockall(MCL_CURRENT | MCL_FUTURE);
  for (size_t i = 0; i < pages; i++) fill(p + i * 4096, seed, i);
  printf("TERN-READY workload=pattern mib=%zu seed=%llu pages=%zu\n", mib, (unsigned long long)seed, pages); fflush(stdout);
  size_t next = 0, per = (size_t)(rate * 256 / 100); // pages per 10 ms
  if (rate > 0 && !per) per = 1;
  for (unsigned long round = 1;; round++) {
    size_t bad = 0;
    for (size_t i = 0; i < pages; i++) { fill(ref, seed, i); if (memcmp(ref, p + i * 4096, 4096)) { if (!bad) printf("TERN-CORRUPT pattern page %zu\n", i); bad++; } }
    printf(bad ? "tern-pattern bad round %lu: %zu pages\n" : "tern-pattern ok round %lu\n", round, bad); fflush(stdout);
    if (!per) { sleep(1); continue; }
    struct timespec at; clock_gettime(CLOCK_MONOTONIC, &at);
    for (int slot = 0; slot < 100; slot++) {
      for (size_t k = 0; k < per; k++) { fill(p + next * 4096, seed, next); next = (next + 1) % pages; }
      at.tv_nsec += 10000000; if (at.tv_nsec >= 1000000000) { at.tv_sec++; at.tv_nsec -= 1000000000; }
      clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &at, NULL);
    }
  }
}
