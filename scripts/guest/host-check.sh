#!/bin/sh
# What a Linux host does with a clonectl export attached as a block device
# (/dev/nbd0 through nbd-client, or a VM's virtio disk backed by QEMU's NBD
# client).  Run by the test guest's init (tests/guest) and by the Vagrant
# host VM (vagrant/), so what the tests prove is what users run.
#
#   host-check.sh full DEVICE TOKEN     fio --verify, ext4 round trip, marker
#   host-check.sh verify DEVICE         mount read-only, check MANIFEST, fsck
#   host-check.sh rewrite DEVICE        overwrite the files in place (same
#                                       blocks; MANIFEST keeps the old sums)
#
# Prints "CLONECTL-CHECK STEP name" before each step, "CLONECTL-CHECK
# MANIFEST md5 path" for each file written, and ends with "CLONECTL-CHECK
# PASS" or "CLONECTL-CHECK FAIL step: reason" (exit 1).  POSIX sh: runs
# under busybox ash (guest) and dash/bash (Vagrant).  The target side checks
# the backing file with scripts/guest/target-check.sh.
set -u

here=$(cd "$(dirname "$0")" && pwd)
fio_dir=${CLONECTL_FIO_DIR:-$here/../fio}
mnt=${CLONECTL_MNT:-/mnt/clonectl-check}
# Small by default: under QEMU TCG every I/O costs ~20x more CPU, and the
# 2-core CI machine is shared (8M verify: ~7 s quiet, ~25 s loaded, for
# /dev/nbd0).  Vagrant passes bigger sizes.
fio_size=${CLONECTL_FIO_SIZE:-8M}
fio_runtime=${CLONECTL_FIO_RUNTIME:-1}
step=start
MiB=1048576

say() { echo "CLONECTL-CHECK $*"; }
fail() {
    say "FAIL $step: $*"
    cd /
    umount "$mnt" 2>/dev/null
    exit 1
}
begin() { step=$1; say "STEP $1"; }
# Run a command; on failure show its last output lines and fail the step
# with its first error line (fio prints verify errors early, stats last).
run() {
    out=$("$@" 2>&1) || {
        rc=$?
        echo "$out" | tail -n 25
        errors=$(echo "$out" | grep -E \
            'bad magic|verify failed|verify: |^fio: |err= *[1-9]|rror|denied' \
            | grep -v '(g=[0-9]')
        echo "$errors" | head -n 5
        fail "$1 exited with $rc${errors:+: $(echo "$errors" | head -n 1)}"
    }
}

drop_caches() {
    sync
    echo 3 > /proc/sys/vm/drop_caches || fail "cannot drop caches"
}

device_size() {
    blockdev --getsize64 "$1" 2>/dev/null || fail "cannot size $1"
}

marker_text() { printf 'CLONECTL-MARKER %s\n' "$1"; }

full() {
    dev=$1 token=$2
    [ -b "$dev" ] || fail "$dev is not a block device"
    size=$(device_size "$dev")
    [ "$size" -ge $((32 * MiB)) ] || fail "$dev has $size bytes, need 32 MiB"
    echo "device $dev: $size bytes"

    # The job files read these (fio expands ${VAR} in job files).
    export FIO_ENGINE="${FIO_ENGINE:-libaio}" FIO_DEV="$dev" \
        FIO_SIZE="$fio_size" FIO_RUNTIME="$fio_runtime"
    begin fio-verify
    run fio "$fio_dir/verify.fio"
    begin fio-randrw-4k
    run fio "$fio_dir/randrw-4k.fio"
    begin fio-seq-1m
    run fio "$fio_dir/seq-1m.fio"

    # The filesystem leaves the last MiB alone: the marker goes there.
    begin mkfs
    fs_blocks=$(( (size - MiB) / 4096 ))
    run mkfs.ext4 -F -q -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 \
        -L clonectl "$dev" "$fs_blocks"
    begin mount
    mkdir -p "$mnt"
    run mount -t ext4 "$dev" "$mnt"
    begin write-files
    mkdir -p "$mnt/clonectl" || fail "mkdir"
    i=0
    for kib in 4 60 256 1024 3000 4096; do
        i=$((i + 1))
        dd if=/dev/urandom of="$mnt/clonectl/file$i" bs=1024 count=$kib \
            2>/dev/null || fail "writing file$i"
    done
    echo "written by host-check.sh, token $token" > "$mnt/clonectl/README"
    (cd "$mnt" && md5sum clonectl/file* clonectl/README) \
        > "$mnt/clonectl/MANIFEST.tmp" || fail "md5sum"
    mv "$mnt/clonectl/MANIFEST.tmp" "$mnt/clonectl/MANIFEST"
    begin sync-remount
    drop_caches
    run umount "$mnt"
    drop_caches
    run mount -t ext4 "$dev" "$mnt"
    begin checksum
    (cd "$mnt" && md5sum -c clonectl/MANIFEST >/dev/null 2>&1) \
        || fail "files differ from MANIFEST after remount: $(cd "$mnt" \
                 && md5sum -c clonectl/MANIFEST 2>&1 | grep -v ': OK$')"
    manifest=$(cat "$mnt/clonectl/MANIFEST")
    run umount "$mnt"
    begin e2fsck
    run e2fsck -fn "$dev"

    begin marker
    marker_text "$token" | dd of="$dev" bs=4096 seek=$((size / 4096 - 256)) \
        conv=sync,notrunc 2>/dev/null || fail "writing the marker"
    drop_caches
    got=$(dd if="$dev" bs=4096 skip=$((size / 4096 - 256)) count=1 \
          2>/dev/null | head -n 1)
    [ "$got" = "$(marker_text "$token")" ] \
        || fail "marker reads back as '$got'"

    echo "$manifest" | while read -r sum path; do
        say "MANIFEST $sum $path"
    done
    say PASS
}

verify() {
    dev=$1
    begin mount-ro
    mkdir -p "$mnt"
    # noload: a read-only device must not see a journal replay attempt.
    run mount -t ext4 -o ro,noload "$dev" "$mnt"
    begin checksum
    [ -f "$mnt/clonectl/MANIFEST" ] || fail "no clonectl/MANIFEST on $dev"
    (cd "$mnt" && md5sum -c clonectl/MANIFEST >/dev/null 2>&1) \
        || fail "files differ from MANIFEST: $(cd "$mnt" \
                 && md5sum -c clonectl/MANIFEST 2>&1 | grep -v ': OK$')"
    run umount "$mnt"
    begin e2fsck
    run e2fsck -fn "$dev"
    say PASS
}

rewrite() {
    dev=$1
    begin rewrite
    mkdir -p "$mnt"
    run mount -t ext4 "$dev" "$mnt"
    # In place (conv=notrunc, same size): the same blocks get new data.
    for f in "$mnt"/clonectl/file*; do
        kib=$(( $(stat -c %s "$f") / 1024 ))
        dd if=/dev/urandom of="$f" bs=1024 count=$kib conv=notrunc \
            2>/dev/null || fail "rewriting $f"
    done
    drop_caches
    run umount "$mnt"
    say PASS
}

case ${1:-} in
    full) [ $# -eq 3 ] || { echo "usage: $0 full DEVICE TOKEN" >&2; exit 2; }
          full "$2" "$3" ;;
    verify|rewrite)
          [ $# -eq 2 ] || { echo "usage: $0 $1 DEVICE" >&2; exit 2; }
          "$1" "$2" ;;
    *) echo "usage: $0 full|verify|rewrite DEVICE [TOKEN]" >&2; exit 2 ;;
esac
