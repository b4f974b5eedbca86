#!/bin/bash
# stop the lab's FRR daemons (by pidfile) and delete all frrlab-* namespaces
"$(dirname "$0")"/frr.sh stop
for ns in $(ip netns list | awk '{print $1}' | grep '^frrlab-'); do ip netns del "$ns"; done
