#!/usr/bin/env bash
# tern's WAN lab: two hosts in network namespaces joined through a switch namespace.
#   wan.sh up PROFILE    (profiles: lan, wan-1g-20ms, wan-100m-50ms)     wan.sh down
#   tern-a 198.18.0.1/24 -- veth -- tern-sw (bridge) -- veth -- tern-b 198.18.0.2/24
# or three hosts in three IP subnets joined by a router (the overlay's lab):
#   wan.sh routed PROFILE
#   tern-a 198.18.1.1/24, tern-b 198.18.2.1/24, tern-c 198.18.3.1/24 -- tern-sw (router,
#   198.18.N.254 on port sw-a, sw-b, sw-c), every host's default route through it
# Bandwidth: tc tbf on the switch's port towards each host (A->B at sw-b, B->A at sw-a). Latency: this kernel has no
# netem, so the switch sends A<->B packets to NFQUEUE and nfq-delay releases them after
# half the RTT. Only addresses in 198.18.0.0/15, only inside our own namespaces.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
state="$root/.cache/wan"
mkdir -p "$state"

down() {
  if [ -f "$state/delay.pid" ]; then kill "$(cat "$state/delay.pid")" 2>/dev/null || true; rm -f "$state/delay.pid"; fi
  for n in tern-a tern-b tern-c tern-sw; do ip netns del "$n" 2>/dev/null || true; done
}

profile() {
  case "$1" in
    lan) rate=""; delay=0;;
    wan-1g-20ms) rate=1gbit; delay=10;;
    wan-100m-50ms) rate=100mbit; delay=25;;
    *) echo "wan.sh: unknown profile $1 (lan, wan-1g-20ms, wan-100m-50ms)" >&2; exit 2;;
  esac
}

need() {
  for p in iproute2 iptables iputils-ping libnetfilter-queue-dev gcc; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || { apt-get update -qq; apt-get install -y -qq "$p" >/dev/null; }
  done
}

# The bottleneck and the delay, both in the switch (or router) namespace, for the
# traffic between the hosts; $@: the iptables match of that traffic.
shape() {
  local ports=$1; shift
  if [ -n "$rate" ]; then
    # the bottleneck sits in the switch, as a WAN router does: a queue in the sender's own
    # qdisc is hidden from TCP's round trip (TCP Small Queues keeps each socket's share of
    # it to about a millisecond), so delay-based control would see no queueing there
    for p in $ports; do
      ip netns exec tern-sw tc qdisc replace dev "$p" root tbf rate "$rate" burst 256kb latency 50ms
    done
  fi
  if [ "$delay" != 0 ]; then
    bin="$state/nfq-delay"
    if [ ! -x "$bin" ] || [ "$here/wan/nfq-delay.c" -nt "$bin" ]; then
      gcc -O2 -o "$bin" "$here/wan/nfq-delay.c" -lnetfilter_queue -lnfnetlink
    fi
    while [ $# -gt 0 ]; do
      # shellcheck disable=SC2086
      ip netns exec tern-sw iptables -A FORWARD $1 -j NFQUEUE --queue-num 7
      shift
    done
    ip netns exec tern-sw "$bin" 7 "$delay" > "$state/delay.log" 2>&1 &
    echo $! > "$state/delay.pid"
  fi
}

routed() {
  profile "$1"
  down
  need
  ip netns add tern-sw
  ip -n tern-sw link set lo up
  i=1
  for h in a b c; do
    ip netns add "tern-$h"
    ip -n "tern-$h" link set lo up
    ip link add "$h-up" netns "tern-$h" type veth peer name "sw-$h" netns tern-sw
    ip -n tern-sw addr add "198.18.$i.254/24" dev "sw-$h"
    ip -n tern-sw link set "sw-$h" up
    ip -n "tern-$h" addr add "198.18.$i.1/24" dev "$h-up"
    ip -n "tern-$h" link set "$h-up" up
    ip -n "tern-$h" route add default via "198.18.$i.254"
    i=$((i + 1))
  done
  ip netns exec tern-sw sysctl -q -w net.ipv4.ip_forward=1
  shape "sw-a sw-b sw-c" "-s 198.18.0.0/15 -d 198.18.0.0/15"
  echo "wan: routed lab, profile $1 up (rate ${rate:-unlimited}, one-way delay ${delay} ms)"
}

up() {
  profile "$1"
  down
  need
  for n in tern-sw tern-a tern-b; do ip netns add "$n"; ip -n "$n" link set lo up; done
  ip -n tern-sw link add sw0 type bridge
  ip -n tern-sw link set sw0 up
  i=1
  for h in a b; do
    ip link add "$h-up" netns "tern-$h" type veth peer name "sw-$h" netns tern-sw
    ip -n tern-sw link set "sw-$h" master sw0
    ip -n tern-sw link set "sw-$h" up
    ip -n "tern-$h" addr add "198.18.0.$i/24" dev "$h-up"
    ip -n "tern-$h" link set "$h-up" up
    i=$((i + 1))
  done
  shape "sw-a sw-b" "-s 198.18.0.1 -d 198.18.0.2" "-s 198.18.0.2 -d 198.18.0.1"
  echo "wan: profile $1 up (rate ${rate:-unlimited}, one-way delay ${delay} ms)"
}

case "${1:-}" in
  up) up "${2:-wan-100m-50ms}";;
  routed) routed "${2:-wan-100m-50ms}";;
  down) down; echo "wan: down";;
  *) echo "usage: wan.sh up PROFILE | routed PROFILE | down" >&2; exit 2;;
esac
