#!/bin/bash
# usage: vty.sh <a|b|c> [vtysh args]
h=$1; shift
exec ip netns exec frrlab-$h vtysh --vty_socket /tmp/frr-lab/run/$h "$@"
