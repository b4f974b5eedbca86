#!/usr/bin/env bash
# tern's second demo: a VM keeps its address and its connections when it moves to another
# IP subnet over the emulated WAN. Three "hosts" (network namespaces) in three subnets
# behind one router (scripts/wan.sh routed: the profile's rate and delay between every
# two hosts): A 198.18.1.1, B 198.18.2.1, C 198.18.3.1. One overlay network, "lab"
# (VXLAN between the hosts; the agents tell each other where each VM's card is). The VM
# runs on A at 198.19.0.2; a client on C (198.19.0.1) pings it every 10 ms while it
# moves A -> B, then B -> A; after each move: what the client saw.
#   bash scripts/demo-segments.sh [PROFILE]     PROFILE: wan-100m-50ms (default), wan-1g-20ms, lan
# Installs what it needs (QEMU 10, the guest, build tools); run as root on Debian 12.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
profile=${1:-wan-100m-50ms}
[ "$(id -u)" = 0 ] || { echo "demo-segments.sh: run as root (it creates network namespaces and VMs)" >&2; exit 1; }

bash scripts/setup.sh
guest=$(bash guest/build.sh | tail -2)
kernel=$(echo "$guest" | sed -n 's/^kernel=//p')
initrd=$(echo "$guest" | sed -n 's/^initrd=//p')
echo "building tern (release)..."
cargo build --release -q -p tern
tern="$root/target/release/tern"

work=$(mktemp -d /tmp/tern-demo-segments.XXXXXX)
pids=()
pinger=""
cleanup() {
  [ -n "$pinger" ] && kill "$pinger" 2>/dev/null || true
  for h in a b c; do
    "$tern" --agent "unix:$work/$h.sock" vm stop web >/dev/null 2>&1 || true
  done
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  bash "$root/scripts/wan.sh" down >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

bash scripts/wan.sh routed "$profile"
echo "RTT C->A: $(ip netns exec tern-c ping -c 3 -q 198.18.1.1 | tail -1)"

"$tern" ca init --dir "$work/ca" >/dev/null
ip_of() { case $1 in a) echo 198.18.1.1;; b) echo 198.18.2.1;; c) echo 198.18.3.1;; esac; }
for h in a b c; do
  ip=$(ip_of $h)
  peers=()
  for o in a b c; do [ $o = $h ] || peers+=(--vxlan-peer "$(ip_of $o)"); done
  "$tern" cert issue "$ip" --dns "host-$h" --ca "$work/ca" --out "$work/tls-$h" >/dev/null
  ip netns exec "tern-$h" "$tern" agent --name "host-$h" --state-dir "$work/$h" \
    --api "unix:$work/$h.sock" --listen "$ip:7700" --tls-dir "$work/tls-$h" \
    --boot-dir "$root/.cache/guest" --vtep "$ip" "${peers[@]}" --network lab \
    > "$work/agent-$h.log" 2>&1 &
  pids+=($!)
done
A="$tern --agent unix:$work/a.sock"
B="$tern --agent unix:$work/b.sock"
C="$tern --agent unix:$work/c.sock"
for i in $(seq 100); do $A vm list >/dev/null 2>&1 && $B vm list >/dev/null 2>&1 && $C vm list >/dev/null 2>&1 && break; sleep 0.1; done
# the client: host C's own address on its bridge of network "lab"
ip -n tern-c addr add 198.19.0.1/24 dev tern-lab

cat > "$work/web.toml" <<SPEC
name = "web"
memory_mib = 128
vcpus = 1
accel = "tcg"
kernel = "$kernel"
initrd = "$initrd"
append = "console=ttyS0 panic=-1 tern.workload=dirty tern.mib=16 tern.rate=2 tern.echo=7 tern.ip=198.19.0.2/24"
[[nic]]
network = "lab"
SPEC
echo; echo "== host A: starting VM 'web' (128 MiB, a card on network 'lab', address 198.19.0.2)"
$A vm start "$work/web.toml"
console=$($A vm list --json | sed -n 's/.*"console_log": "\(.*\)".*/\1/p')
for i in $(seq 1200); do grep -q "tern-dirty pass 1" "$console" 2>/dev/null && break; sleep 0.1; done
grep -q "tern-dirty pass 1" "$console" || { echo "the guest did not boot"; tail "$console"; exit 1; }
$A vm list
ip netns exec tern-c ping -c 1 -w 20 -q 198.19.0.2 >/dev/null || { echo "the client on C does not reach the guest"; exit 1; }

# Pings every 10 ms from C during a move; then what the client saw.
move() {
  local from=$1 to=$2 cli=$3
  ip netns exec tern-c ping -n -D -i 0.01 198.19.0.2 > "$work/ping.log" 2>&1 &
  pinger=$!
  sleep 1
  echo; echo "== migrating web: host $from -> host $to over $profile, while the client on C pings it every 10 ms"
  $cli migrate web --to "$(ip_of "$(echo "$to" | tr 'AB' 'ab')"):7700"
  ip netns exec tern-c ping -c 1 -w 10 -q 198.19.0.2 >/dev/null || true
  sleep 1
  kill -INT "$pinger"; wait "$pinger" 2>/dev/null || true; pinger=""
  awk '
    /icmp_seq=/ { if ($0 ~ /DUP!/) { dup++; next }
                  t = substr($1, 2, length($1) - 2) + 0
                  if (n > 0 && t - last > gap) gap = t - last
                  last = t; n++ }
    /packets transmitted/ { sent = $1 }
    END { printf "   the client on C: %d pings, %d answered, %d duplicates, longest gap %.0f ms\n", sent, n, dup, gap * 1000 }
  ' "$work/ping.log"
}
move A B "$A"
echo "   where host C forwards the VM's card now: $(bridge -n tern-c fdb show dev tvx-lab | grep -v '^00:00:00:00:00:00' | grep dst | head -1)"
move B A "$B"
echo
echo "The report's downtime is the guest's pause; the client's longest gap adds the time until"
echo "frames reach the new host (frames still sent to the old one are passed on to it)."
