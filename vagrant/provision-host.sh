#!/bin/sh
# Vagrant host VM: attach the target's LU as /dev/nbd0 with the kernel's nbd
# driver and run the same check the test guest runs (tests/guest/init.sh,
# run check-nbd), then detach.
#   provision-host.sh SERVER PORT EXPORT TOKEN
set -eu
server=$1 port=$2 export_name=$3 token=$4
export DEBIAN_FRONTEND=noninteractive
missing=""
for p in nbd-client fio e2fsprogs util-linux; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" \
        || missing="$missing $p"
done
if [ -n "$missing" ]; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $missing
fi
modprobe nbd nbds_max=4
scripts=/clonectl/scripts/guest
sh $scripts/attach-nbd.sh attach "$server" "$port" "$export_name" /dev/nbd0
status=0
sh $scripts/host-check.sh full /dev/nbd0 "$token" || status=$?
sh $scripts/attach-nbd.sh detach /dev/nbd0
exit $status
