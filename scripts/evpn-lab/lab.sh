#!/bin/bash
# Build the 3-host + router lab in frrlab-* namespaces. Idempotent.
set -e
for ns in $(ip netns list | awk '{print $1}' | grep '^frrlab-'); do ip netns del "$ns"; done
sleep 0.3
ip netns add frrlab-r
ip netns exec frrlab-r ip link set lo up
ip netns exec frrlab-r sysctl -qw net.ipv4.ip_forward=1
i=0
for h in a b c; do
  i=$((i+1))
  ns=frrlab-$h
  ip netns add $ns
  ip netns exec $ns ip link set lo up
  ip link add eth0 netns $ns type veth peer name r-$h netns frrlab-r
  ip -n $ns addr add 198.18.$i.1/24 dev eth0
  ip -n $ns link set eth0 up
  ip -n frrlab-r addr add 198.18.$i.254/24 dev r-$h
  ip -n frrlab-r link set r-$h up
  ip -n $ns route add default via 198.18.$i.254
  # overlay bridge + vxlan (no flood-and-learn)
  ip -n $ns link add tern-lab type bridge
  ip netns exec $ns sysctl -qw net.ipv6.conf.tern-lab.disable_ipv6=1
  ip -n $ns link add tvx-lab type vxlan id 100 local 198.18.$i.1 dstport 4789 nolearning
  ip netns exec $ns sysctl -qw net.ipv6.conf.tvx-lab.disable_ipv6=1 || true
  ip -n $ns link set tvx-lab master tern-lab
  ip -n $ns link set tvx-lab type bridge_slave neigh_suppress on learning off
  ip -n $ns link set tvx-lab up
  ip -n $ns link set tern-lab up
done
# Client on C: address on the bridge itself
ip -n frrlab-c addr add 198.19.0.1/24 dev tern-lab
# "VM" namespace, attached to host A's bridge
ip netns add frrlab-vm
ip netns exec frrlab-vm ip link set lo up
ip link add vm-port netns frrlab-a type veth peer name eth0 netns frrlab-vm
ip -n frrlab-vm link set eth0 address 52:54:00:aa:bb:01
ip -n frrlab-vm addr add 198.19.0.2/24 dev eth0
ip -n frrlab-vm link set eth0 up
ip -n frrlab-a link set vm-port master tern-lab
ip -n frrlab-a link set vm-port up
echo lab up
