#!/usr/bin/env bash
# The whole test suite: installs what it needs (QEMU 10, guest build inputs), builds the
# test guest, then runs every test of the workspace against real QEMU (TCG): the unit and
# property tests plain `cargo test` runs, and the tiers it leaves out (`#[ignore = "tier
# qemu: ..."]`, `#[ignore = "tier vm: ..."]`). The two hand-run writers of committed
# fixtures (write_golden, write_seed_corpus) are not tests of the code and stay out.
# Usage: bash scripts/test.sh [extra cargo test args, e.g. -p tern --test e2e]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "scripts/test.sh: run as root (installs packages, starts VMs)" >&2; exit 1; fi
bash scripts/setup.sh
bash guest/build.sh >/dev/null
export CARGO_TERM_COLOR=never
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--workspace)
cargo test --no-fail-fast "${args[@]}" -- --include-ignored \
    --skip write_golden --skip write_seed_corpus 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# One closing line for the whole suite (cargo ends with per-crate doc-test summaries).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$rc"
