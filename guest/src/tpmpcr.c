// tern-tpmpcr extend PCR SEED: extends PCR (sha256 bank) of /dev/tpm0 once with a raw
// TPM2_PCR_Extend (password session, empty auth). The digest is 4 xorshift64* words seeded
// with SEED (1 if 0), little-endian, like tern-pattern's words. Prints
// "TERN-TPM extended pcr=P seed=S value=HEX" with the new value read back from
// /sys/class/tpm/tpm0/pcr-sha256/P, or "TERN-TPM error: ..." and exits 1.
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static uint8_t *be32(uint8_t *p, uint32_t v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v; return p + 4; }
static uint8_t *be16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = v; return p + 2; }
int main(int argc, char **argv) {
  if (argc != 4 || strcmp(argv[1], "extend")) { printf("usage: tern-tpmpcr extend PCR SEED\n"); return 2; }
  uint32_t pcr = strtoul(argv[2], 0, 0);
  uint64_t seed = strtoull(argv[3], 0, 0), s = seed ? seed : 1;
  uint8_t cmd[65], rsp[64], *p = cmd;
  p = be16(p, 0x8002); p = be32(p, sizeof cmd); p = be32(p, 0x182); // TPM_ST_SESSIONS, size, TPM2_CC_PCR_Extend
  p = be32(p, pcr);                                                 // pcrHandle
  p = be32(p, 9); p = be32(p, 0x40000009); p = be16(p, 0); *p++ = 0; p = be16(p, 0); // TPM_RS_PW, no nonce, no hmac
  p = be32(p, 1); p = be16(p, 0x000B);                              // TPML_DIGEST_VALUES: one, TPM_ALG_SHA256
  for (int k = 0; k < 4; k++) { s ^= s >> 12; s ^= s << 25; s ^= s >> 27; uint64_t w = s * 0x2545F4914F6CDD1Dull; memcpy(p, &w, 8); p += 8; }
  int fd = open("/dev/tpm0", O_RDWR);
  if (fd < 0) { printf("TERN-TPM error: cannot open /dev/tpm0\n"); return 1; }
  if (write(fd, cmd, sizeof cmd) != (ssize_t)sizeof cmd) { printf("TERN-TPM error: write to /dev/tpm0 failed\n"); return 1; }
  ssize_t n = read(fd, rsp, sizeof rsp);
  close(fd);
  if (n < 10) { printf("TERN-TPM error: short response (%zd bytes)\n", n); return 1; }
  uint32_t rc = (uint32_t)rsp[6] << 24 | rsp[7] << 16 | rsp[8] << 8 | rsp[9];
  if (rc) { printf("TERN-TPM error: TPM2_PCR_Extend returned 0x%x\n", rc); return 1; }
  char path[64], value[80] = "";
  snprintf(path, sizeof path, "/sys/class/tpm/tpm0/pcr-sha256/%u", pcr);
  FILE *f = fopen(path, "r");
  if (!f || !fgets(value, sizeof value, f)) { printf("TERN-TPM error: cannot read %s\n", path); return 1; }
  fclose(f);
  value[strcspn(value, "\n")] = 0;
  printf("TERN-TPM extended pcr=%u seed=%llu value=%s\n", pcr, (unsigned long long)seed, value);
  return 0;
}
