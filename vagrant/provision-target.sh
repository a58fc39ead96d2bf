#!/bin/sh
# Vagrant target VM: install clonectl from /clonectl, create the LU and
# serve it on the private network.  Idempotent (vagrant provision again).
#   provision-target.sh LU_NAME LU_SIZE PORT
set -eu
lu=$1 size=$2 port=$3
export CLONECTL_STATE=/var/lib/clonectl
cd /clonectl
scripts/setup
clonectl=/clonectl/.venv/bin/clonectl
$clonectl lu list | grep -q "^$lu " || $clonectl lu create "$lu" --size "$size"
if $clonectl status --json | grep -q '"server": null'; then
    $clonectl serve --port "$port" --bind 0.0.0.0 --detach
fi
$clonectl status
