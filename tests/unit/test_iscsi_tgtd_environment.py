"""The environment the iSCSI gateway starts tgtd with: glibc malloc
tunables that keep freed command buffers (target/iscsi.py), read back by
glibc's own loader, with an operator's GLIBC_TUNABLES still winning."""

import os
import subprocess

import pytest

from target import iscsi

LOADER = "/lib64/ld-linux-x86-64.so.2"


def tunables(env):
    """{tunable: value} as glibc parses env (ld.so --list-tunables)."""
    out = subprocess.run([LOADER, "--list-tunables"], env=env,
                         capture_output=True, text=True, check=True).stdout
    values = {}
    for line in out.splitlines():
        name, sep, rest = line.partition(": ")
        if sep:
            values[name] = int(rest.split()[0], 0)
    return values


needs_loader = pytest.mark.skipif(not os.access(LOADER, os.X_OK),
                                  reason="no glibc loader at " + LOADER)


@needs_loader
def test_tgtd_keeps_up_to_64_mib_of_freed_heap():
    env = iscsi.tgtd_environment({"PATH": os.environ["PATH"]})
    got = tunables(env)
    assert got["glibc.malloc.trim_threshold"] == 64 << 20
    assert got["glibc.malloc.mmap_threshold"] == 4 << 20
    assert env["PATH"] == os.environ["PATH"]


@needs_loader
def test_an_operators_glibc_tunables_override_the_gateways():
    env = iscsi.tgtd_environment({
        "PATH": os.environ["PATH"],
        "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=4096"})
    got = tunables(env)
    assert got["glibc.malloc.trim_threshold"] == 4096
    assert got["glibc.malloc.mmap_threshold"] == 4 << 20
