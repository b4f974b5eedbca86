#!/bin/bash
# Start/stop one zebra+bgpd pair per host namespace, everything under /tmp/frr-lab/run/<h>.
# usage: frr.sh start|stop ; vtysh access: vty.sh <a|b|c> -c '...'
set -e
BASE=/tmp/frr-lab/run
declare -A IP=([a]=198.18.1.1 [b]=198.18.2.1 [c]=198.18.3.1)
stop() {
  for h in a b c; do
    for d in bgpd zebra; do
      p=$BASE/$h/$d.pid
      [ -f $p ] && kill "$(cat $p)" 2>/dev/null || true
    done
  done
  sleep 1
}
start() {
  for h in a b c; do
    d=$BASE/$h; mkdir -p $d; chown frr:frr $d; chmod 755 $d
    me=${IP[$h]}
    cat > $d/zebra.conf <<Z
hostname $h
log file $d/zebra.log
${NHT-ip nht resolve-via-default}
Z
    {
    echo "hostname $h"
    echo "log file $d/bgpd.log"
    echo "router bgp 65000"
    echo " bgp router-id $me"
    echo " no bgp default ipv4-unicast"
    echo " timers bgp 3 9"
    for p in a b c; do [ $p = $h ] && continue
      echo " neighbor ${IP[$p]} remote-as 65000"
      echo " neighbor ${IP[$p]} update-source $me"
    done
    echo " address-family l2vpn evpn"
    for p in a b c; do [ $p = $h ] && continue
      echo "  neighbor ${IP[$p]} activate"
    done
    echo "  advertise-all-vni"
    echo " exit-address-family"
    } > $d/bgpd.conf
    chown frr:frr $d/*.conf
    ns=frrlab-$h
    ip netns exec $ns /usr/lib/frr/zebra -d -f $d/zebra.conf -i $d/zebra.pid \
        -z $d/zserv.api --vty_socket $d -A 127.0.0.1 --log file:$d/zebra.out
    sleep 1
    ip netns exec $ns /usr/lib/frr/bgpd -d -f $d/bgpd.conf -i $d/bgpd.pid \
        -z $d/zserv.api --vty_socket $d -A 127.0.0.1 --log file:$d/bgpd.out
  done
}
case "$1" in start) stop; start;; stop) stop;; *) echo "usage: $0 start|stop"; exit 1;; esac
