#!/bin/sh
# The target side's independent check of an LU's backing file (or device)
# after scripts/guest/host-check.sh ran on a host that attached it: no trust
# in what the host printed, only in the bytes the target stored.
#
#   target-check.sh IMAGE TOKEN
#
# e2fsck -fn must be clean, every file of the filesystem's clonectl/MANIFEST
# (read with debugfs, no mount) must have its recorded md5, and the last MiB
# must start with the marker line for TOKEN.  Prints "CLONECTL-TARGET
# MANIFEST md5 path" for each file read and ends with "CLONECTL-TARGET PASS"
# or "CLONECTL-TARGET FAIL step: reason" (exit 1).  Used by the guest tests
# and by the Vagrant target VM.
set -u
export PATH="$PATH:/usr/sbin:/sbin"
step=start
say() { echo "CLONECTL-TARGET $*"; }
fail() { say "FAIL $step: $*"; exit 1; }

[ $# -eq 2 ] || { echo "usage: $0 IMAGE TOKEN" >&2; exit 2; }
image=$1 token=$2
if [ -b "$image" ]; then
    size=$(blockdev --getsize64 "$image")
else
    size=$(stat -c %s "$image")
fi
[ -n "$size" ] && [ "$size" -gt 1048576 ] || fail "cannot size $image"

step=e2fsck
out=$(e2fsck -fn "$image" 2>&1) || { echo "$out" | tail -n 25;
                                     fail "e2fsck -fn found problems"; }

step=manifest
manifest=$(debugfs -R "cat /clonectl/MANIFEST" "$image" 2>/dev/null)
[ -n "$manifest" ] || fail "no clonectl/MANIFEST in the filesystem"
nfiles=0
# A here-document, not a pipe: fail must end this shell, not a subshell.
while read -r sum path; do
    got=$(debugfs -R "cat /$path" "$image" 2>/dev/null | md5sum | cut -d' ' -f1)
    [ "$got" = "$sum" ] || fail "$path has md5 $got, MANIFEST says $sum"
    say "MANIFEST $got $path"
    nfiles=$((nfiles + 1))
done <<END
$manifest
END
[ "$nfiles" -gt 0 ] || fail "MANIFEST lists no files"

step=marker
want=$(printf 'CLONECTL-MARKER %s' "$token")
got=$(dd if="$image" bs=4096 skip=$((size / 4096 - 256)) count=1 \
      2>/dev/null | head -n 1 | tr -d '\0')
[ "$got" = "$want" ] || fail "last MiB starts with '$got', want '$want'"
say PASS
