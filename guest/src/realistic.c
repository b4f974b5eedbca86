// tern-realistic: memory that looks like a real server's, and a heavy incompressible dirtier.
//   tern-realistic realistic MIB SEED [DIRTY RATE KIND DIR]
//     Fills MIB MiB: 13/16 as files in DIR (default /data, a tmpfs: page cache) -- 40% text
//     (English-like words from a built-in list, in lines), 30% copies of /bin/busybox and the
//     tern binaries with small seeded changes every few KiB (so some pages are duplicates
//     across files, some not), 30% structured records (JSON lines) -- and 3 child processes
//     holding MIB/16 MiB of structured records each, which then pause(). Same SEED =>
//     byte-identical content. Prints TERN-READY, then pause()s, unless DIRTY > 0: then it
//     mlocks DIRTY MiB of its own, fills it and dirties it forever at RATE MiB/s (0 = as fast
//     as possible; busy-wait pacing) in passes over its pages. KIND text (default): per page,
//     a random 64..512-byte span is rewritten with new words (small delta, stays compressible);
//     KIND random: the whole page gets fresh random bytes. Every ~2 s: "tern-realistic pass P
//     t=S rate=R MiB/s".
//   tern-realistic random MIB RATE [PACE]
//     Fills MIB MiB (mlocked) with random bytes (seeded from the clock: no two boots share a
//     page), then forever rewrites whole pages with fresh random bytes at RATE MiB/s. PACE
//     clock (default): busy-wait pacing, the rate holds whatever CPU the guest gets. PACE cpu:
//     each page costs a calibrated amount of CPU work so that RATE is what a full vCPU
//     reaches: a vCPU slowed by half dirties at half RATE (a CPU-bound workload). The first 8 bytes of each page hold tag(pass, page), checked
//     after each pass: a lost dirty page shows up as "TERN-CORRUPT ...". Every ~2 s: "tern-random
//     pass P t=S rate=R MiB/s corrupt_total=C".
//   tern-realistic fill MIB
//     Fills MIB MiB (mlocked) for data-path benchmarks of a paused guest: the first half
//     English-like text, the second half random bytes; every page distinct (its first 8
//     bytes hold a per-boot tag and its index: nothing to dedup, no two boots alike), built
//     from 1 MiB pools so that filling is memcpy-fast even under TCG. Prints TERN-READY and
//     pause()s.
//   tern-realistic --dump DIR MIB SEED
//     (host-side check) writes the realistic files and the 3 heaps (DIR/heap-N) and exits.
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
static uint64_t mix(uint64_t x) { // splitmix64: a seed -> an independent stream's state
  x += 0x9E3779B97F4A7C15ull; x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull; x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  x ^= x >> 31; return x ? x : 1;
}
static uint64_t stream(uint64_t seed, uint64_t k) { return mix(mix(seed) + k); } // stream k of a seed
static inline uint64_t rnd(uint64_t *s) { *s ^= *s >> 12; *s ^= *s << 25; *s ^= *s >> 27; return *s * 0x2545F4914F6CDD1Dull; }
static inline uint32_t below(uint64_t *s, uint32_t n) { return (uint32_t)(((rnd(s) >> 32) * n) >> 32); }
static void put_random(uint64_t *s, uint8_t *b, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) { uint64_t w = rnd(s); memcpy(b + i, &w, 8); }
  if (i < n) { uint64_t w = rnd(s); memcpy(b + i, &w, n - i); }
}

static const char *const words[] = {
  "the", "of", "and", "to", "a", "in", "is", "it", "you", "that", "he", "was", "for", "on", "are", "with",
  "as", "I", "his", "they", "be", "at", "one", "have", "this", "from", "or", "had", "by", "hot", "word", "but",
  "what", "some", "we", "can", "out", "other", "were", "all", "there", "when", "up", "use", "your", "how", "said", "an",
  "each", "she", "which", "do", "their", "time", "if", "will", "way", "about", "many", "then", "them", "write", "would", "like",
  "so", "these", "her", "long", "make", "thing", "see", "him", "two", "has", "look", "more", "day", "could", "go", "come",
  "did", "number", "sound", "no", "most", "people", "my", "over", "know", "water", "than", "call", "first", "who", "may", "down",
  "side", "been", "now", "find", "any", "new", "work", "part", "take", "get", "place", "made", "live", "where", "after", "back",
  "little", "only", "round", "man", "year", "came", "show", "every", "good", "me", "give", "our", "under", "name", "very", "through",
  "just", "form", "sentence", "great", "think", "say", "help", "low", "line", "differ", "turn", "cause", "much", "mean", "before", "move",
  "right", "boy", "old", "too", "same", "tell", "does", "set", "three", "want", "air", "well", "also", "play", "small", "end",
  "put", "home", "read", "hand", "port", "large", "spell", "add", "even", "land", "here", "must", "big", "high", "such", "follow",
  "act", "why", "ask", "men", "change", "went", "light", "kind", "off", "need", "house", "picture", "try", "us", "again", "animal",
  "point", "mother", "world", "near", "build", "self", "earth", "father", "head", "stand", "own", "page", "should", "country", "found", "answer",
  "school", "grow", "study", "still", "learn", "plant", "cover", "food", "sun", "four", "between", "state", "keep", "eye", "never", "last",
  "let", "thought", "city", "tree", "cross", "farm", "hard", "start", "might", "story", "saw", "far", "sea", "draw", "left", "late",
  "run", "while", "press", "close", "night", "real", "life", "few", "north", "open", "seem", "together", "next", "white", "children", "begin",
};
#define NWORDS (sizeof words / sizeof *words)

// English-like text: words (frequent ones more often), commas, sentences, lines of 50..90 chars.
static void put_text(uint64_t *s, char *b, size_t n) {
  size_t i = 0; int col = 0, linemax = 50 + below(s, 40), cap = 1; unsigned w = 0;
  while (i < n) {
    uint64_t x = rnd(s); unsigned u = (x >> 16) & 63;
    if ((x >> 48) & 7) w = (w * 2654435761u + ((x >> 51) & 3) * 40503u + 12345u) % NWORDS; // one of 4 usual successors
    else w = (unsigned)(((x & 255) * ((x >> 8) & 255) * NWORDS) >> 16); // any word, frequent ones more often
    char tok[24]; size_t l = strlen(words[w]);
    memcpy(tok, words[w], l);
    if (cap) { if (tok[0] >= 'a') tok[0] -= 32; cap = 0; }
    if (u < 4) { tok[l++] = '.'; cap = 1; } else if (u < 7) tok[l++] = ',';
    col += l + 1;
    if (col >= linemax) { tok[l++] = '\n'; col = 0; linemax = 50 + ((x >> 24) & 31) + ((x >> 32) & 7); if (cap && u == 0) tok[l++] = '\n'; }
    else tok[l++] = ' ';
    if (l > n - i) l = n - i;
    memcpy(b + i, tok, l); i += l;
  }
}

// Structured data: JSON lines of records with repeated field names and small integers.
static char *put_s(char *p, const char *s) { size_t l = strlen(s); memcpy(p, s, l); return p + l; }
static char *put_u(char *p, uint64_t v) { char t[20]; int k = 0; do t[k++] = '0' + v % 10; while (v /= 10); while (k) *p++ = t[--k]; return p; }
static char *ss(char *p, const char *a, const char *b) { return put_s(put_s(p, a), b); }
static char *su(char *p, const char *a, uint64_t v) { return put_u(put_s(p, a), v); }
static const char *const status[] = { "active", "pending", "shipped", "active", "closed", "active", "failed", "active" };
static const char *const region[] = { "eu-west-1", "eu-central-1", "us-east-1", "us-east-2", "ap-south-1", "eu-west-1", "us-east-1", "eu-west-1" };
static const char *const metric[] = { "latency_ms", "requests", "errors", "queue_depth", "cpu_pct", "mem_mib", "latency_ms", "requests" };
struct recs { uint64_t id, ts; int schema; };
static void put_struct(uint64_t *s, struct recs *r, char *b, size_t n) {
  size_t i = 0; char line[256];
  while (i < n) {
    uint64_t x = rnd(s), y = rnd(s), ts = 1700000000 + (r->ts += (x >> 2) & 7); char *p = line;
    r->id += 1 + (x & 3);
    if (r->schema == 0) {
      p = su(p, "{\"id\":", r->id); p = su(p, ",\"user\":\"user_", 10000 + (y & 65535));
      p = ss(p, "\",\"status\":\"", status[(x >> 20) & 7]); p = su(p, "\",\"qty\":", 1 + ((x >> 23) & 7));
      p = su(p, ",\"price\":", 100 * (1 + ((y >> 16) & 1023)) + 99); p = ss(p, ",\"currency\":\"EUR\",\"region\":\"", region[(x >> 32) & 7]);
      p = su(p, "\",\"sku\":\"SKU-", 10000 + ((y >> 26) & 65535)); p = su(p, "\",\"discount\":", (y >> 42) % 100);
      p = su(p, ",\"created\":", ts);
    } else if (r->schema == 1) {
      p = su(p, "{\"ts\":", ts); p = su(p, ",\"host\":\"web-", 10 + ((x >> 8) & 31));
      p = ss(p, "\",\"metric\":\"", metric[(x >> 13) & 7]); p = su(p, "\",\"value\":", y & 65535);
      p = su(p, ",\"p99\":", (y >> 16) & 4095); p = su(p, ",\"req\":", (y >> 28) & 0xffffff); p = su(p, ",\"cpu\":", (y >> 52) % 100);
      p = ss(p, ",\"ok\":", ((x >> 24) & 15) ? "true" : "false");
    } else {
      p = su(p, "{\"session\":", r->id); p = su(p, ",\"user_id\":", y & 0xfffff);
      p = su(p, ",\"ip\":\"10.", (y >> 20) & 255); p = su(p, ".", (y >> 28) & 255); p = su(p, ".", (y >> 36) & 255);
      p = su(p, "\",\"port\":", 1024 + ((x >> 40) & 0x7fff)); p = ss(p, ",\"state\":\"", status[(x >> 20) & 7]);
      p = su(p, "\",\"retries\":", ((x >> 23) & 7) == 7); p = su(p, ",\"flags\":", (x >> 26) & 3);
      p = su(p, ",\"seen\":", ts - ((y >> 44) & 65535)); p = put_s(p, ",\"ttl\":3600");
    }
    p = put_s(p, "}\n");
    size_t l = p - line; if (l > n - i) l = n - i;
    memcpy(b + i, line, l); i += l;
  }
}

static void die(const char *what) { perror(what); exit(1); }
static void write_all(int fd, const char *b, size_t n) {
  while (n) { ssize_t k = write(fd, b, n); if (k <= 0) die("tern-realistic: write"); b += k; n -= k; }
}
enum { TEXT, BIN, STRUCT };
// Writes `bytes` of one kind as files of varying size under dir/sub.
static void write_files(const char *dir, int kind, size_t bytes, uint64_t seed, char *buf, size_t bufsz) {
  static const char *const sub[] = { "log", "bin", "db" }, *const srcs[] = { "/bin/busybox", "/bin/tern-dirty", "/bin/tern-pattern", "/proc/self/exe" };
  uint64_t s = stream(seed, kind);
  char path[512]; snprintf(path, sizeof path, "%s/%s", dir, sub[kind]); mkdir(path, 0755);
  struct recs r = { 0, 0, 0 };
  char *bin[4]; size_t binlen[4]; int nbin = 0;
  if (kind == BIN) { // source binaries, read once; missing ones are skipped (/proc/self/exe is always there)
    for (int k = 0; k < 4; k++) {
      int fd = open(srcs[k], O_RDONLY); struct stat st;
      if (fd < 0 || fstat(fd, &st) || st.st_size <= 0) { if (fd >= 0) close(fd); continue; }
      bin[nbin] = malloc(st.st_size); binlen[nbin] = st.st_size;
      if (!bin[nbin] || read(fd, bin[nbin], st.st_size) != st.st_size) die("tern-realistic: read binary");
      close(fd); nbin++;
    }
  }
  for (unsigned f = 0; bytes; f++) {
    size_t size = kind == BIN ? binlen[f % nbin] : (256 << 10) + below(&s, 1792 << 10);
    if (size > bytes) size = bytes;
    snprintf(path, sizeof path, "%s/%s/%s-%04u%s", dir, sub[kind], kind == TEXT ? "app" : kind == BIN ? "copy" : "table", f,
             kind == TEXT ? ".log" : kind == STRUCT ? ".jsonl" : "");
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644); if (fd < 0) die(path);
    r.schema = f % 3;
    if (kind == BIN) { // a copy, with 1..4 bytes changed every 1..16 KiB
      const char *src = bin[f % nbin];
      for (size_t off = 0, next = 1 + below(&s, 16384); off < size; off += bufsz) {
        size_t l = size - off < bufsz ? size - off : bufsz;
        memcpy(buf, src + off, l);
        for (; next < off + l; next += 1 + below(&s, 16384))
          for (size_t k = 0, m = 1 + below(&s, 4); k < m && next + k < off + l; k++) buf[next + k - off] ^= 1 + below(&s, 255);
        write_all(fd, buf, l);
      }
    } else {
      for (size_t off = 0; off < size; off += bufsz) {
        size_t l = size - off < bufsz ? size - off : bufsz;
        if (kind == TEXT) put_text(&s, buf, l); else put_struct(&s, &r, buf, l);
        write_all(fd, buf, l);
      }
    }
    close(fd); bytes -= size;
  }
  for (int k = 0; k < nbin; k++) free(bin[k]);
}
static char *heap(size_t bytes, uint64_t seed, int child) {
  char *h = mmap(0, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (h == MAP_FAILED) die("tern-realistic: heap");
  uint64_t s = stream(seed, 10 + child); struct recs r = { 0, 0, child % 3 };
  put_struct(&s, &r, h, bytes);
  return h;
}

// Paced passes over `pages` pages; touch(page index) dirties one page. Never returns.
static volatile uint64_t work_sink; static uint64_t work_per_page; // PACE cpu: spins per page
static void spin(uint64_t n) { uint64_t s = 88172645463325252ull; for (uint64_t i = 0; i < n; i++) rnd(&s); work_sink = s; }
static void dirty_loop(const char *name, size_t pages, double rate, void (*touch)(size_t, uint64_t), size_t (*check)(uint64_t)) {
  double t0 = now(), last = t0, done_mib = 0; uint64_t pass = 0, touched = 0, corrupt_total = 0;
  const size_t chunk = 64; // pages per paced step (256 KiB)
  for (;;) {
    pass++;
    for (size_t i = 0; i < pages; i += chunk) {
      size_t e = i + chunk < pages ? i + chunk : pages;
      for (size_t j = i; j < e; j++) { touch(j, pass); if (work_per_page) spin(work_per_page); }
      touched += e - i;
      if (rate > 0 && !work_per_page) {
        done_mib += (double)(e - i) / 256;
        while (now() - t0 < done_mib / rate) { /* busy-wait: no short sleeps */ }
      }
      double t = now();
      if (t - last >= 2.0) {
        printf("tern-%s pass %llu t=%.1f rate=%.1f MiB/s", name, (unsigned long long)pass, t - t0, touched / 256.0 / (t - last));
        if (check) printf(" corrupt_total=%llu", (unsigned long long)corrupt_total);
        printf("\n"); fflush(stdout); last = t; touched = 0;
      }
    }
    if (check) corrupt_total += check(pass);
  }
}

static uint8_t *mem; static size_t npages; static uint64_t rs; static int text_kind;
static void touch_realistic(size_t j, uint64_t pass) {
  (void)pass;
  uint8_t *pg = mem + j * 4096;
  if (!text_kind) { put_random(&rs, pg, 4096); return; }
  size_t len = 64 + below(&rs, 449), off = below(&rs, 4096 - len + 1);
  put_text(&rs, (char *)pg + off, len);
}
static uint64_t tag(uint64_t pass, size_t j) { return mix(pass << 32 ^ j); }
static void touch_random(size_t j, uint64_t pass) {
  uint8_t *pg = mem + j * 4096; uint64_t t = tag(pass, j);
  put_random(&rs, pg + 8, 4088); memcpy(pg, &t, 8);
}
static size_t check_random(uint64_t pass) {
  size_t bad = 0, first = 0; uint64_t got = 0, want = 0;
  for (size_t j = 0; j < npages; j++) {
    uint64_t v, t = tag(pass, j); memcpy(&v, mem + j * 4096, 8);
    if (v != t) { if (!bad) { first = j; got = v; want = t; } bad++; }
  }
  if (bad) { printf("TERN-CORRUPT pass %llu: %zu pages differ (first page %zu: got %016llx want %016llx)\n", (unsigned long long)pass, bad, first, (unsigned long long)got, (unsigned long long)want); fflush(stdout); }
  return bad;
}
static uint8_t *alloc_locked(size_t bytes) {
  uint8_t *p = mmap(0, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) die("tern-realistic: allocate");
  mlockall(MCL_CURRENT | MCL_FUTURE);
  return p;
}

int main(int argc, char **argv) {
  const char *mode = argc > 1 ? argv[1] : "";
  if (!strcmp(mode, "random")) {
    size_t mib = argc > 2 ? strtoul(argv[2], 0, 0) : 64; double rate = argc > 3 ? atof(argv[3]) : 0;
    if (!mib) return 1;
    struct timespec t; clock_gettime(CLOCK_REALTIME, &t); // a different stream every boot: nothing to dedup
    npages = mib * 256; mem = alloc_locked(mib << 20); rs = mix(t.tv_sec ^ (uint64_t)t.tv_nsec << 32 ^ (uint64_t)(now() * 1e9));
    for (size_t j = 0; j < npages; j++) touch_random(j, 0);
    if (argc > 4 && !strcmp(argv[4], "cpu") && rate > 0) {
      // calibrate: the time a page takes, and a spin; then spins per page so that a full
      // vCPU makes RATE MiB/s
      double t = now(); size_t n = 0;
      while (now() - t < 0.5) { touch_random(n % npages, 0); n++; }
      double per_page = (now() - t) / n;
      t = now(); spin(1 << 20); double per_spin = (now() - t) / (1 << 20);
      double want = 1.0 / (rate * 256);
      work_per_page = want > per_page ? (uint64_t)((want - per_page) / per_spin) : 0;
      if (!work_per_page) work_per_page = 1;
      printf("tern-random: cpu-paced, %.1f us per page, %llu spins per page\n", per_page * 1e6, (unsigned long long)work_per_page);
    }
    printf("TERN-READY workload=random mib=%zu rate=%g\n", mib, rate); fflush(stdout);
    dirty_loop("random", npages, rate, touch_random, check_random);
  }
  if (!strcmp(mode, "fill")) {
    size_t mib = argc > 2 ? strtoul(argv[2], 0, 0) : 64;
    if (!mib) return 1;
    struct timespec t; clock_gettime(CLOCK_REALTIME, &t);
    uint64_t boot = mix(t.tv_sec ^ (uint64_t)t.tv_nsec << 32), s = boot;
    const size_t pool = 1 << 20; char *text = malloc(pool); uint8_t *rand = malloc(pool);
    if (!text || !rand) die("malloc");
    put_text(&s, text, pool); put_random(&s, rand, pool);
    npages = mib * 256; mem = alloc_locked(mib << 20);
    double t0 = now();
    for (size_t j = 0; j < npages; j++) {
      uint8_t *pg = mem + j * 4096; size_t at = (j * 4096 + j / 256 * 8) % (pool - 4096);
      memcpy(pg, j < npages / 2 ? (uint8_t *)text + at : rand + at, 4096);
      uint64_t id = boot ^ j; memcpy(pg, &id, 8);
    }
    printf("TERN-READY workload=fill mib=%zu secs=%.1f\n", mib, now() - t0); fflush(stdout);
    for (;;) pause();
  }
  int dump = !strcmp(mode, "--dump");
  if (!dump && strcmp(mode, "realistic")) {
    fprintf(stderr, "usage: tern-realistic realistic MIB SEED [DIRTY RATE KIND DIR] | random MIB RATE | fill MIB | --dump DIR MIB SEED\n");
    return 2;
  }
  int a = dump ? 3 : 2;
  size_t mib = argc > a ? strtoul(argv[a], 0, 0) : 64;
  uint64_t seed = argc > a + 1 ? strtoull(argv[a + 1], 0, 0) : 1;
  size_t dirty = !dump && argc > 4 ? strtoul(argv[4], 0, 0) : 0;
  double rate = !dump && argc > 5 ? atof(argv[5]) : 0;
  text_kind = !(!dump && argc > 6 && !strcmp(argv[6], "random"));
  const char *dir = dump ? argv[2] : argc > 7 ? argv[7] : "/data";
  if (!mib) return 1;
  if (dump) mkdir(dir, 0755);
  size_t total = mib << 20, hp = (total / 16) & ~(size_t)4095, files = total - 3 * hp;

  int ready[2]; if (pipe(ready)) die("pipe");
  for (int c = 0; c < 3 && !dump; c++) {
    pid_t pid = fork(); if (pid < 0) die("fork");
    if (pid == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      heap(hp, seed, c);
      if (write(ready[1], "r", 1) != 1) _exit(1);
      for (;;) pause();
    }
  }
  const size_t bufsz = 1 << 20; char *buf = malloc(bufsz); if (!buf) die("malloc");
  double t0 = now();
  write_files(dir, TEXT, files / 10 * 4, seed, buf, bufsz);
  write_files(dir, BIN, files / 10 * 3, seed, buf, bufsz);
  write_files(dir, STRUCT, files - files / 10 * 4 - files / 10 * 3, seed, buf, bufsz);
  free(buf);
  if (dump) {
    for (int c = 0; c < 3; c++) {
      char path[512]; snprintf(path, sizeof path, "%s/heap-%d", dir, c);
      char *h = heap(hp, seed, c); int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644); if (fd < 0) die(path);
      write_all(fd, h, hp); close(fd); munmap(h, hp);
    }
    printf("tern-realistic: dumped %zu MiB to %s in %.2f s\n", mib, dir, now() - t0);
    return 0;
  }
  char got[3];
  for (size_t n = 0; n < 3;) { ssize_t k = read(ready[0], got, 3 - n); if (k <= 0) die("tern-realistic: children"); n += k; }
  printf("TERN-READY workload=realistic mib=%zu seed=%llu\n", mib, (unsigned long long)seed); fflush(stdout);
  if (!dirty) for (;;) pause();
  npages = dirty * 256; mem = alloc_locked(dirty << 20); rs = stream(seed, 20);
  if (text_kind) put_text(&rs, (char *)mem, dirty << 20); else put_random(&rs, mem, dirty << 20);
  printf("tern-realistic dirtying mib=%zu rate=%g kind=%s\n", dirty, rate, text_kind ? "text" : "random"); fflush(stdout);
  dirty_loop("realistic", npages, rate, touch_realistic, NULL);
}
