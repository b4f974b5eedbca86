#!/bin/bash
# Move the "VM" (frrlab-vm, MAC 52:54:00:aa:bb:01) from host $1 to host $2 (a|b).
# mode cold: delete old port first, then attach new one (default)
# mode hot : attach on new host (new VM netns), send GARP, then delete old port (live-migration like)
FROM=${1:-a}; TO=${2:-b}; MODE=${3:-cold}
OUT=/tmp/frr-lab/move-$FROM-$TO-$MODE; mkdir -p $OUT; rm -f $OUT/*
MAC=52:54:00:aa:bb:01
( ip netns exec frrlab-c bridge monitor fdb 2>&1 & echo $! > $OUT/mon.pid; wait ) | while IFS= read -r l; do echo "$EPOCHREALTIME $l"; done > $OUT/c-fdb-monitor.txt & MON=$!
ip netns exec frrlab-c ping -D -O -i 0.01 198.19.0.2 > $OUT/c-ping.txt 2>&1 & PING=$!
sleep 2
ts() { echo "$(date +%s.%N) $*" >> $OUT/events.txt; }
attach() {  # $1 host, $2 vm netns
  ip netns list | grep -q "^$2\b" || { ip netns add $2; ip netns exec $2 ip link set lo up; }
  ip link add vm-port netns frrlab-$1 type veth peer name eth0 netns $2
  ip -n $2 link set eth0 address $MAC
  ip -n $2 addr add 198.19.0.2/24 dev eth0
  ip -n frrlab-$1 link set vm-port master tern-lab
  ip -n frrlab-$1 link set vm-port up
  ip -n $2 link set eth0 up
  ts "attached on $1"
  ip netns exec $2 arping -q -U -c1 -I eth0 198.19.0.2 &
  ts "garp sent from $2"
}
if [ $MODE = cold ]; then
  ts "start"; ip -n frrlab-$FROM link del vm-port; ts "deleted on $FROM"
  ip netns exec frrlab-vm sysctl -qw net.ipv4.icmp_echo_ignore_all=0 2>/dev/null || true
  attach $TO frrlab-vm
else
  # new VM instance in a separate netns; old one keeps existing until deleted
  NEWVM=frrlab-vm2; OLDVM=frrlab-vm
  ip -n frrlab-vm2 link show eth0 >/dev/null 2>&1 && { NEWVM=frrlab-vm; OLDVM=frrlab-vm2; }
  # old VM is "paused": stops answering pings (its MAC stays in the old host's FDB)
  ip netns exec $OLDVM sysctl -qw net.ipv4.icmp_echo_ignore_all=1
  ip netns list | grep -q "^$NEWVM\b" && ip netns exec $NEWVM sysctl -qw net.ipv4.icmp_echo_ignore_all=0
  ts "start"; attach $TO $NEWVM
  sleep 0.5
  ip -n frrlab-$FROM link del vm-port; ts "deleted on $FROM"
fi
sleep 5
kill $PING; kill $(cat $OUT/mon.pid) 2>/dev/null
bridge -n frrlab-c fdb show dev tvx-lab > $OUT/c-fdb-after.txt
cat $OUT/events.txt
