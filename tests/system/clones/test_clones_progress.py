"""--wait and `clonectl wait` show this job's progress, briefly when the
output is not a terminal."""

import re
import subprocess
import time

import pytest

from tests.support.clonelib import MiB

pytest.importorskip("nbd")

PERCENT = re.compile(r"(\d+\.\d)%")


def test_incremental_sync_wait_counts_this_job(clone_env):
    # 16 extents of 1 MiB; the engine copies one per step, then waits as
    # long as --rate says: 4 changed extents take about 3 s.
    env = clone_env.setup(size=16 * MiB, granularity="1M")
    env.sync_wait("c1")
    env.cli("clone", "fracture", "c1")
    env.write_export("src", 4 * MiB, b"n" * 4 * MiB)
    proc = env.cli("clone", "sync", "c1", "--rate", "1M", "--wait")
    lines = proc.stdout.splitlines()
    assert re.fullmatch(r"c1: sync started, \d+ extents to copy", lines[0]), \
        lines
    shown = [line for line in lines if PERCENT.search(line)]
    assert 1 <= len(shown) <= 3, lines
    first = float(PERCENT.search(shown[0]).group(1))
    assert first <= 50.0, shown     # not 75% "in sync" of the whole clone
    assert "of 4MiB" in shown[0], shown
    assert "100.0%" in shown[-1] and "synchronized" in shown[-1], shown
    assert all(len(line) <= 80 for line in lines), lines


def test_wait_follows_a_running_restore(clone_env):
    env = clone_env.setup(size=8 * MiB, granularity="1M")
    env.sync_wait("c1")
    env.cli("clone", "fracture", "c1")
    env.write_export("c1", 0, b"r" * 4 * MiB)
    env.cli("clone", "restore", "c1", "--rate", "1M")
    assert env.status("c1")["state"] == "restoring"
    started = time.monotonic()
    proc = env.cli("wait", "c1", timeout=60)
    took = time.monotonic() - started
    st = env.status("c1")
    assert st["state"] == "fractured" and "restore" not in st, st
    assert not st["operation"]["running"], st
    assert took >= 1.0, "returned before the restore could end"
    last = proc.stdout.splitlines()[-1]
    assert "restore" in last and "100.0%" in last and "of 4MiB" in last
    assert env.read_export("src", 0, 4 * MiB) == b"r" * 4 * MiB
    # Once ended, it reports the result at once.
    assert "100.0%" in env.cli("wait", "c1").stdout


def test_wait_refusals(clone_env):
    env = clone_env.setup(size=1 * MiB, fill=False)
    env.refused("wait", "nope", match="no clone or session named 'nope'")
    env.refused("wait", "c1", match="has run no sync")
    env.server.stop()
    env.refused("wait", "c1", match="no server")


def test_clone_status_lines_fit_80_columns(clonectl, server, tmp_path):
    """`clone status` printed one line of up to about 150 columns."""
    clonectl("lu", "create", "a-source-with-a-long-name", "--size", "4M")
    clonectl("clone", "add", "a-source-with-a-long-name",
             "a-clone-with-a-rather-long-name-too")
    clonectl("clone", "sync", "a-clone-with-a-rather-long-name-too",
             "--wait")
    out = clonectl("clone", "status",
                   "a-clone-with-a-rather-long-name-too").stdout
    assert "synchronized" in out, out
    assert max(len(line) for line in out.splitlines()) <= 80, out
