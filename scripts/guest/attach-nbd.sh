#!/bin/sh
# Attach a clonectl export as a kernel NBD device, or detach it.
#
#   attach-nbd.sh attach SERVER PORT EXPORT [DEVICE]   (default /dev/nbd0)
#   attach-nbd.sh detach [DEVICE]
#
# Used by the test guest's init (tests/guest, SERVER 10.0.2.2 = the host
# under QEMU user networking) and by the Vagrant host VM.  Needs the nbd
# module loaded and nbd-client (3.x: netlink setup, returns once attached).
set -u
case ${1:-} in
attach)
    [ $# -ge 4 ] || { echo "usage: $0 attach SERVER PORT EXPORT [DEVICE]" >&2; exit 2; }
    server=$2 port=$3 export_name=$4 dev=${5:-/dev/nbd0}
    # -t: a request the server does not answer in 60 s fails with EIO
    # instead of hanging the host forever.
    nbd-client "$server" "$port" "$dev" -N "$export_name" -b 4096 -t 60 \
        || { echo "CLONECTL-ATTACH FAIL nbd-client $server:$port $export_name" >&2; exit 1; }
    name=${dev#/dev/}
    i=0
    while [ "$(cat /sys/block/$name/size 2>/dev/null || echo 0)" = 0 ]; do
        i=$((i + 1))
        [ $i -le 100 ] || { echo "CLONECTL-ATTACH FAIL $dev has no size" >&2; exit 1; }
        sleep 0.1
    done
    echo "CLONECTL-ATTACH $dev = $server:$port/$export_name"
    ;;
detach)
    nbd-client -d "${2:-/dev/nbd0}"
    ;;
*)
    echo "usage: $0 attach SERVER PORT EXPORT [DEVICE] | detach [DEVICE]" >&2
    exit 2 ;;
esac
