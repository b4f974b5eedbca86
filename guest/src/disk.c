// tern-disk DIR SEED RATE_KIBPS FILES FILE_KIB: a disk workload for storage-migration
// tests. Keeps FILES files DIR/fNNN of FILE_KIB KiB each and rewrites them in rotation at
// about RATE_KIBPS KiB/s (0: as fast as it can): each write goes to DIR/fNNN.tmp with
// O_DIRECT, is fsync'ed, renamed over DIR/fNNN, and the directory fsync'ed; so data blocks,
// the allocator, directory entries and the journal all keep changing.
//
// Content of 4 KiB block B of file F at write sequence number K (K counts writes from 1 over
// all files): bytes 0..8 "TERNDSK1", 8..16 seed, 16..24 F, 24..32 K, 32..40 B (u64 LE), then
// xorshift64* words seeded with seed ^ F*C1 ^ K*C2 ^ B*C3.
//
// Verification reads with O_DIRECT, so it reads the disk, not the page cache: after each
// write the file written FILES/2 writes ago, and every file once per rotation. A mismatch
// prints "TERN-DISK-CORRUPT file=F block=B want_seq=K got=..." (and the workload goes on).
// Prints "TERN-DISK-READY files=N kib=K seed=S" once every file exists, then about once a
// second "TERN-DISK ok seq=K full=P verified=V bad=E": K the last write, P full verification
// passes, V files verified, E mismatches seen ("bad" instead of "ok" once E > 0).
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BLK 4096

static uint64_t seed;
static unsigned nfiles;
static size_t file_bytes;
static const char *dir;
static uint8_t *buf, *ref;
static uint64_t *seq_of;
static unsigned long verified, bad;

static void fill(uint8_t *b, uint64_t f, uint64_t k, uint64_t blk) {
  memcpy(b, "TERNDSK1", 8); memcpy(b + 8, &seed, 8); memcpy(b + 16, &f, 8);
  memcpy(b + 24, &k, 8); memcpy(b + 32, &blk, 8);
  uint64_t s = seed ^ (f * 0x9E3779B97F4A7C15ull) ^ (k * 0xD1B54A32D192ED03ull) ^ (blk * 0x8CB92BA72F3D8DD7ull);
  if (!s) s = 1;
  for (int i = 40; i < BLK; i += 8) {
    s ^= s >> 12; s ^= s << 25; s ^= s >> 27;
    uint64_t w = s * 0x2545F4914F6CDD1Dull; memcpy(b + i, &w, 8);
  }
}

static double now(void) {
  struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static void fail(const char *what, const char *path) {
  printf("TERN-DISK-ERROR %s %s: %s\n", what, path, strerror(errno)); fflush(stdout);
  exit(1);
}

static void write_file(unsigned f, uint64_t k) {
  char tmp[512], path[512];
  snprintf(tmp, sizeof tmp, "%s/f%03u.tmp", dir, f);
  snprintf(path, sizeof path, "%s/f%03u", dir, f);
  for (size_t b = 0; b < file_bytes / BLK; b++) fill(buf + b * BLK, f, k, b);
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_DIRECT, 0644);
  if (fd < 0) fail("open", tmp);
  if (write(fd, buf, file_bytes) != (ssize_t)file_bytes) fail("write", tmp);
  if (fsync(fd)) fail("fsync", tmp);
  close(fd);
  if (rename(tmp, path)) fail("rename", path);
  int d = open(dir, O_RDONLY | O_DIRECTORY);
  if (d < 0 || fsync(d)) fail("fsync", dir);
  close(d);
  seq_of[f] = k;
}

static void verify_file(unsigned f) {
  char path[512];
  snprintf(path, sizeof path, "%s/f%03u", dir, f);
  int fd = open(path, O_RDONLY | O_DIRECT);
  if (fd < 0) fail("open", path);
  ssize_t n = read(fd, buf, file_bytes);
  ssize_t more = n == (ssize_t)file_bytes ? read(fd, ref, BLK) : 0;
  close(fd);
  verified++;
  if (n != (ssize_t)file_bytes || more != 0) {
    bad++;
    printf("TERN-DISK-CORRUPT file=%u size: read %zd then %zd, want %zu\n", f, n, more, file_bytes);
    fflush(stdout);
    return;
  }
  for (size_t b = 0; b < file_bytes / BLK; b++) {
    fill(ref, f, seq_of[f], b);
    if (memcmp(ref, buf + b * BLK, BLK)) {
      uint64_t gf, gk, gb;
      memcpy(&gf, buf + b * BLK + 16, 8); memcpy(&gk, buf + b * BLK + 24, 8); memcpy(&gb, buf + b * BLK + 32, 8);
      bad++;
      printf("TERN-DISK-CORRUPT file=%u block=%zu want_seq=%llu got=%.8s file=%llu seq=%llu block=%llu\n", f, b,
             (unsigned long long)seq_of[f], (char *)buf + b * BLK, (unsigned long long)gf,
             (unsigned long long)gk, (unsigned long long)gb);
      fflush(stdout);
      return;
    }
  }
}

int main(int argc, char **argv) {
  if (argc < 6) { printf("usage: tern-disk DIR SEED RATE_KIBPS FILES FILE_KIB\n"); return 2; }
  dir = argv[1];
  seed = strtoull(argv[2], 0, 0);
  double rate = strtod(argv[3], 0) * 1024;
  nfiles = strtoul(argv[4], 0, 0);
  file_bytes = (size_t)strtoul(argv[5], 0, 0) * 1024;
  if (!nfiles || nfiles > 999 || !file_bytes || file_bytes % BLK) { printf("tern-disk: bad arguments\n"); return 2; }
  if (posix_memalign((void **)&buf, BLK, file_bytes) || posix_memalign((void **)&ref, BLK, BLK)) return 1;
  seq_of = calloc(nfiles, sizeof *seq_of);
  uint64_t k = 0;
  for (unsigned f = 0; f < nfiles; f++) write_file(f, ++k);
  printf("TERN-DISK-READY files=%u kib=%zu seed=%llu\n", nfiles, file_bytes / 1024, (unsigned long long)seed);
  fflush(stdout);
  unsigned long full = 0;
  double t0 = now(), last = t0;
  uint64_t k0 = k;
  for (;;) {
    unsigned f = k % nfiles;
    write_file(f, ++k);
    verify_file((f + nfiles / 2) % nfiles);
    if (k % nfiles == 0) {
      for (unsigned g = 0; g < nfiles; g++) verify_file(g);
      full++;
    }
    double t = now();
    if (t - last >= 1.0) {
      printf("TERN-DISK %s seq=%llu full=%lu verified=%lu bad=%lu\n", bad ? "bad" : "ok", (unsigned long long)k, full,
             verified, bad);
      fflush(stdout);
      last = t;
    }
    if (rate > 0) {
      double due = t0 + (double)(k - k0) * file_bytes / rate;
      if (due > t) usleep((useconds_t)((due - t) * 1e6));
      else if (t - due > 1.0) { t0 = t; k0 = k; }  // paused (e.g. a migration): no burst after
    }
  }
}
