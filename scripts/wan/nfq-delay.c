// tern's WAN delay: holds packets queued by `iptables -j NFQUEUE --queue-num Q` for D ms,
// then accepts them (constant delay, FIFO, so one batch verdict per wake-up). This kernel
// has no netem; this is the userspace stand-in. Only packet metadata is copied.
// usage: nfq-delay QUEUE DELAY_MS        (SIGTERM: release what is held and exit)
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <arpa/inet.h>
#include <linux/netfilter.h>
#include <libnetfilter_queue/libnetfilter_queue.h>
#include <libnfnetlink/libnfnetlink.h>

#define CAP 65536
static struct { uint32_t id; uint64_t due; } q[CAP];
static size_t head, len;
static uint64_t delay_ns, seen, drops;
static volatile sig_atomic_t quit;

static uint64_t mono_ns(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return (uint64_t)t.tv_sec * 1000000000ull + t.tv_nsec; }
static void on_term(int s) { (void)s; quit = 1; }

static int on_packet(struct nfq_q_handle *qh, struct nfgenmsg *m, struct nfq_data *d, void *u) {
  (void)m; (void)u;
  uint32_t id = ntohl(nfq_get_msg_packet_hdr(d)->packet_id);
  seen++;
  if (len == CAP) { drops++; return nfq_set_verdict(qh, id, NF_DROP, 0, NULL); }
  size_t i = (head + len++) % CAP;
  q[i].id = id; q[i].due = mono_ns() + delay_ns;
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 3) { fprintf(stderr, "usage: %s QUEUE DELAY_MS\n", argv[0]); return 2; }
  delay_ns = (uint64_t)(atof(argv[2]) * 1e6);
  signal(SIGTERM, on_term); signal(SIGINT, on_term);
  struct nfq_handle *h = nfq_open();
  struct nfq_q_handle *qh = h ? nfq_create_queue(h, atoi(argv[1]), on_packet, NULL) : NULL;
  if (!qh) { perror("nfq-delay: cannot open the queue"); return 1; }
  nfq_set_mode(qh, NFQNL_COPY_META, 0);
  nfq_set_queue_maxlen(qh, CAP);
  nfq_set_queue_flags(qh, NFQA_CFG_F_GSO, NFQA_CFG_F_GSO);
  nfnl_rcvbufsiz(nfq_nfnlh(h), 16 << 20);
  int fd = nfq_fd(h);
  static char buf[1 << 16];
  while (!quit) {
    uint64_t now = mono_ns(); int any = 0; uint32_t upto = 0;
    while (len && q[head].due <= now) { upto = q[head].id; head = (head + 1) % CAP; len--; any = 1; }
    if (any) nfq_set_verdict_batch(qh, upto, NF_ACCEPT);
    uint64_t wait = len ? q[head].due - now : 200000000ull;
    struct timespec to = { (time_t)(wait / 1000000000ull), (long)(wait % 1000000000ull) };
    struct pollfd p = { fd, POLLIN, 0 };
    if (ppoll(&p, 1, &to, NULL) > 0) {
      ssize_t n;
      while ((n = recv(fd, buf, sizeof buf, MSG_DONTWAIT)) >= 0 || errno == ENOBUFS)
        if (n > 0) nfq_handle_packet(h, buf, (int)n);
    }
  }
  if (len) nfq_set_verdict_batch(qh, q[(head + len - 1) % CAP].id, NF_ACCEPT);
  fprintf(stderr, "nfq-delay: %llu packets, %llu dropped (queue full)\n", (unsigned long long)seen, (unsigned long long)drops);
  nfq_destroy_queue(qh); nfq_close(h);
  return 0;
}
