#!/usr/bin/env bash
# The whole test suite: installs what it needs (QEMU 10, guest build inputs), builds the
# test guest, then runs every test of the workspace against real QEMU (TCG).
# Usage: bash scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "scripts/test.sh: run as root (installs packages, starts VMs)" >&2; exit 1; fi
bash scripts/setup.sh
bash guest/build.sh >/dev/null
export CARGO_TERM_COLOR=never
cargo test --workspace --no-fail-fast "$@"
