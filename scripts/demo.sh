#!/usr/bin/env bash
# tern's demo: two "hosts" (network namespaces) joined by an emulated WAN, a running VM
# on host A migrated live to host B through tern, with progress and a final report, and
# back again (the return trip sends references for what did not change).
#   bash scripts/demo.sh [PROFILE]     PROFILE: wan-100m-50ms (default), wan-1g-20ms, lan
# Installs what it needs (QEMU 10, the guest, build tools); run as root on Debian 12.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
profile=${1:-wan-100m-50ms}
[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (it creates network namespaces and VMs)" >&2; exit 1; }

bash scripts/setup.sh
guest=$(bash guest/build.sh | tail -2)
kernel=$(echo "$guest" | sed -n 's/^kernel=//p')
initrd=$(echo "$guest" | sed -n 's/^initrd=//p')
echo "building tern (release)..."
cargo build --release -q -p tern
tern="$root/target/release/tern"

work=$(mktemp -d /tmp/tern-demo.XXXXXX)
pids=()
cleanup() {
  # VMs outlive their agents (an agent restart must not kill them): stop them first
  for h in a b; do
    for n in $("$tern" --agent "unix:$work/$h.sock" vm list --json 2>/dev/null | sed -n 's/.*"name": "\(.*\)".*/\1/p'); do
      "$tern" --agent "unix:$work/$h.sock" vm stop "$n" >/dev/null 2>&1 || true
    done
  done
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  bash "$root/scripts/wan.sh" down >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

bash scripts/wan.sh up "$profile"
echo "RTT A->B: $(ip netns exec tern-a ping -c 3 -q 198.18.0.2 | tail -1)"

# One cluster: a CA, and a certificate per host naming the address peers dial it by.
# Agents talk mutual TLS only; the CA's cluster key keys the content hashes of both.
"$tern" ca init --dir "$work/ca" >/dev/null
for h in a b; do
  ip=$([ $h = a ] && echo 198.18.0.1 || echo 198.18.0.2)
  "$tern" cert issue "$ip" --dns "host-$h" --ca "$work/ca" --out "$work/tls-$h" >/dev/null
  ip netns exec "tern-$h" "$tern" agent --name "host-$h" --state-dir "$work/$h" \
    --api "unix:$work/$h.sock" --listen "$ip:7700" --tls-dir "$work/tls-$h" \
    --boot-dir "$root/.cache/guest" \
    > "$work/agent-$h.log" 2>&1 &
  pids+=($!)
done
echo "cluster CA and agent certificates in $work (mutual TLS between the agents)"
A="$tern --agent unix:$work/a.sock"
B="$tern --agent unix:$work/b.sock"
for i in $(seq 100); do $A vm list >/dev/null 2>&1 && $B vm list >/dev/null 2>&1 && break; sleep 0.1; done

# The VM's disk: a qcow2 overlay on a base image ("the OS image": ext4 with 24 MiB of
# files). Host B holds the same base image in its image library, so the disk is rebuilt
# there from what B has plus the blocks that differ.
mkdir -p "$work/base-files"
for i in $(seq 0 23); do head -c 1M /dev/urandom > "$work/base-files/blob$i"; done
truncate -s 128M "$work/base.raw"
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 -d "$work/base-files" "$work/base.raw"
qemu-img convert -q -f raw -O qcow2 "$work/base.raw" "$work/base.qcow2"
rm -rf "$work/base.raw" "$work/base-files"
cp "$work/base.qcow2" "$work/library-base.qcow2"
qemu-img create -q -f qcow2 -F qcow2 -b "$work/base.qcow2" "$work/demo-disk.qcow2"
echo; echo "== host B: importing the base image into its image library (chunk index)"
$B image import "$work/library-base.qcow2"

cat > "$work/demo.toml" <<SPEC
name = "demo"
memory_mib = 384
vcpus = 1
accel = "tcg"
kernel = "$kernel"
initrd = "$initrd"
append = "console=ttyS0 panic=-1 tern.workload=realistic tern.mib=160 tern.seed=1 tern.dirty=16 tern.rate=2 tern.disk=1 tern.disk_rate=256"
[[disk]]
path = "$work/demo-disk.qcow2"
format = "qcow2"
SPEC
echo; echo "== host A: starting VM 'demo' (384 MiB; 160 MiB of files and processes; rewriting text in 16 MiB at 2 MiB/s;"
echo "   a 128 MiB disk, an overlay on the base image, that the guest rewrites files on at 256 KiB/s)"
$A vm start "$work/demo.toml"
console=$($A vm list --json | sed -n 's/.*"console_log": "\(.*\)".*/\1/p')
for i in $(seq 600); do grep -q TERN-READY "$console" 2>/dev/null && break; sleep 0.1; done
grep -q TERN-READY "$console" || { echo "the guest did not boot"; tail "$console"; exit 1; }
$A vm list

echo; echo "== migrating demo: host A -> host B over $profile"
$A migrate demo --to 198.18.0.2:7700

echo; echo "== host B now runs it:"
$B vm list
dconsole=$($B vm list --json | sed -n 's/.*"console_log": "\(.*\)".*/\1/p')
before=$(grep -c "tern-realistic pass" "$dconsole" || true)
for i in $(seq 100); do [ "$(grep -c "tern-realistic pass" "$dconsole" || true)" -gt "$before" ] && break; sleep 0.1; done
echo "destination guest console (last lines):"
tail -n 2 "$dconsole"

echo; echo "== and back: host B -> host A (host A still holds what it sent, and the disk it had)"
$B migrate demo --to 198.18.0.1:7700
$A vm list
