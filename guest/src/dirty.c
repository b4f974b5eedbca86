// tern-dirty MIB RATE: busy-loop memory dirtier with a memory checker. Never sleeps.
// Fills MIB MiB with pseudo-random bytes (not zero, not trivially compressible), then
// forever: writes the pass counter into the first 8 bytes of every 4 KiB page, at RATE MiB/s
// (0 = as fast as possible; paced by busy-waiting on the clock), and after each pass checks
// that every page holds the counter. A migration that lost a dirty page shows up as
// "TERN-CORRUPT ...". Every ~2 s: "tern-dirty pass P t=S rate=R MiB/s corrupt_total=C".
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
  size_t mib = argc > 1 ? strtoul(argv[1], 0, 0) : 64;
  double rate = argc > 2 ? atof(argv[2]) : 0;
  size_t n = mib << 20, pages = n / 4096;
  uint8_t *p = NULL;
  if (!n || posix_memalign((void **)&p, 4096, n)) { printf("tern-dirty: cannot allocate %zu MiB\n", mib); return 1; }
  mlockall(MCL_CURRENT | MCL_FUTURE);
  uint64_t s = 0x9E3779B97F4A7C15ull;
  for (size_t i = 0; i < n; i += 8) { s ^= s >> 12; s ^= s << 25; s ^= s >> 27; uint64_t w = s * 0x2545F4914F6CDD1Dull; memcpy(p + i, &w, 8); }
  for (size_t i = 0; i < pages; i++) memset(p + i * 4096, 0, 8);
  printf("TERN-READY workload=dirty mib=%zu rate=%g\n", mib, rate); fflush(stdout);
  double t0 = now(), last = t0, done_mib = 0; uint64_t pass = 0, lastpass = 0, corrupt_total = 0;
  const size_t chunk = 64; // pages per paced step (256 KiB)
  for (;;) {
    pass++;
    for (size_t i = 0; i < pages; i += chunk) {
      size_t e = i + chunk < pages ? i + chunk : pages;
      for (size_t j = i; j < e; j++) memcpy(p + j * 4096, &pass, 8);
      if (rate > 0) {
        done_mib += (double)(e - i) * 4096 / (1 << 20);
        while (now() - t0 < done_mib / rate) { /* busy-wait: no short sleeps */ }
      }
    }
    size_t bad = 0, first = 0; uint64_t got = 0;
    for (size_t j = 0; j < pages; j++) {
      uint64_t v; memcpy(&v, p + j * 4096, 8);
      if (v != pass) { if (!bad) { first = j; got = v; } bad++; memcpy(p + j * 4096, &pass, 8); }
    }
    if (bad) { corrupt_total += bad; printf("TERN-CORRUPT pass %llu: %zu pages differ (first page %zu: got %llu want %llu)\n", (unsigned long long)pass, bad, first, (unsigned long long)got, (unsigned long long)pass); fflush(stdout); }
    double t = now();
    if (t - last >= 2.0) {
      printf("tern-dirty pass %llu t=%.1f rate=%.1f MiB/s corrupt_total=%llu\n", (unsigned long long)pass, t - t0, (double)(pass - lastpass) * mib / (t - last), (unsigned long long)corrupt_total);
      fflush(stdout); last = t; lastpass = pass;
    }
  }
}
