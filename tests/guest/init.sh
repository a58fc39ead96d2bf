#!/bin/busybox sh
# PID 1 of the test guest (tests/support/guestlib.py packs it as /init).
#
# Kernel command line: clonectl.run=RUN clonectl.token=T [clonectl.port=N
# clonectl.export=NAME].  RUN is one of
#   check-disk     scripts/guest/host-check.sh full /dev/vda (QEMU NBD disk)
#   check-nbd      attach-nbd.sh 10.0.2.2 PORT EXPORT, then host-check.sh
#                  full /dev/nbd0, then detach
#   verify-disk    host-check.sh verify /dev/vda (read-only disk)
#   restore        /dev/vda = Source, /dev/vdb = its fractured clone
#                  (read-only): verify the clone; rewrite the Source's
#                  files; mount the Source read-only; see it differ; print
#                  "CLONECTL-GUEST WAIT restore"; read a line from the
#                  console (the host starts the restore, then sends "go");
#                  drop caches; the mounted Source must now show the
#                  clone's files; then e2fsck.
# The last line is "CLONECTL-GUEST PASS RUN" or "CLONECTL-GUEST FAIL RUN:
# reason"; then the guest powers off (QEMU runs with -no-reboot, so a
# panic ends it too).
/bin/busybox mkdir -p /proc /sys /dev /bin /mnt
/bin/busybox --install -s /bin 2>/dev/null
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

scripts=/clonectl/scripts/guest
export CLONECTL_FIO_DIR=/clonectl/scripts/fio
run=unset token=unset port=10809 export_name=""
for word in $(cat /proc/cmdline); do
    case $word in
        clonectl.run=*) run=${word#*=} ;;
        clonectl.token=*) token=${word#*=} ;;
        clonectl.port=*) port=${word#*=} ;;
        clonectl.export=*) export_name=${word#*=} ;;
    esac
done

finish() {
    echo "CLONECTL-GUEST $*"
    sync
    poweroff -f
    sleep 5
    echo o > /proc/sysrq-trigger
}
fail() { finish "FAIL $run: $*"; }

for m in $(cat /etc/modules-load-order); do
    case $m in
        nbd.ko) insmod /lib/modules/$m nbds_max=1 ;;
        *) insmod /lib/modules/$m ;;
    esac || fail "insmod $m"
done
echo "CLONECTL-GUEST BOOTED $run"

network_up() {
    ip link set lo up && ip link set eth0 up \
        && ip addr add 10.0.2.15/24 dev eth0 \
        && ip route add default via 10.0.2.2 || fail "network setup"
}

wait_block() {
    i=0
    while [ ! -b "$1" ]; do
        i=$((i + 1)); [ $i -le 100 ] || fail "no $1"; sleep 0.1
    done
}

case $run in
check-disk)
    wait_block /dev/vda
    sh $scripts/host-check.sh full /dev/vda "$token" || fail "host-check"
    ;;
check-nbd)
    network_up
    sh $scripts/attach-nbd.sh attach 10.0.2.2 "$port" "$export_name" \
        || fail "attach"
    sh $scripts/host-check.sh full /dev/nbd0 "$token" || fail "host-check"
    sh $scripts/attach-nbd.sh detach /dev/nbd0 || fail "detach"
    ;;
verify-disk)
    wait_block /dev/vda
    sh $scripts/host-check.sh verify /dev/vda || fail "verify"
    ;;
restore)
    wait_block /dev/vda; wait_block /dev/vdb
    sh $scripts/host-check.sh verify /dev/vdb || fail "clone verify"
    sh $scripts/host-check.sh rewrite /dev/vda || fail "rewrite"
    mkdir -p /mnt/source
    mount -t ext4 -o ro /dev/vda /mnt/source || fail "mount Source ro"
    # The test must be able to fail: before the restore the Source's
    # files are the rewritten ones.
    (cd /mnt/source && md5sum -c clonectl/MANIFEST >/dev/null 2>&1) \
        && fail "Source still matches MANIFEST after rewrite"
    echo "CLONECTL-GUEST WAIT restore"
    read -r reply < /dev/console
    [ "$reply" = go ] || fail "host answered '$reply', not go"
    sync; echo 3 > /proc/sys/vm/drop_caches
    (cd /mnt/source && md5sum -c clonectl/MANIFEST) \
        || fail "mounted Source does not show the clone's files"
    umount /mnt/source || fail "umount Source"
    e2fsck -fn /dev/vda || fail "e2fsck of the restored Source"
    ;;
*)
    fail "unknown clonectl.run"
    ;;
esac
finish "PASS $run"
