"""`clonectl clone verify` through the CLI and a running server: planted
differences (bytes changed in the clone's backing file behind the target's
back) are found while a host writes, marked (and nothing else), and
repaired by the next sync; heavy host writes give no false difference;
--rate is honoured; a stopped verify leaves the maps valid."""

import os
import threading
import time

import pytest

from tests.support.clonelib import MiB, differing_extents

pytest.importorskip("nbd")

GRAN = 64 << 10


def _plant(env, extents):
    """Flip a byte in each extent of the clone's backing file."""
    fd = os.open(env.img("c1"), os.O_RDWR)
    try:
        for e in extents:
            offset = e * GRAN + 123
            old = os.pread(fd, 1, offset)
            os.pwrite(fd, bytes([old[0] ^ 0xFF]), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


class Writer:
    """A host writing 4 KiB blocks into extents [first, last) of the
    Source over NBD until stopped."""

    def __init__(self, env, first, last):
        self.h = env.connect("src")
        self.first, self.last = first, last
        self.stopped = threading.Event()
        self.count = 0
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        n = 0
        try:
            while not self.stopped.is_set():
                e = self.first + n % (self.last - self.first)
                self.h.pwrite(bytes([n % 251 + 1]) * 4096,
                              e * GRAN + (n * 4096) % GRAN)
                n += 1
                self.count = n
        except Exception as e:     # reported by stop()
            self.error = e

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.thread.join(30)
        self.h.flush()
        self.h.shutdown()
        assert self.error is None, self.error


def _dirty(env):
    runs = env.cli_json("clone", "map", "c1")["runs"]
    return {off // GRAN + i for off, length, kind in runs if kind == "dirty"
            for i in range((length + GRAN - 1) // GRAN)}


def test_planted_differences_found_marked_and_repaired_under_writes(
        clone_env):
    env = clone_env.setup(size=32 * MiB, granularity="64K")
    env.sync_wait("c1")
    env.cli("clone", "fracture", "c1")
    planted = [40, 300, 511]
    _plant(env, planted)
    with Writer(env, 0, 8) as w:      # the writer never touches them
        proc = env.cli("clone", "verify", "c1", "--wait")
        assert w.count > 0
    assert "3 differ" in proc.stdout, proc.stdout
    v = env.status("c1")["verify"]
    assert v["extents_differing"] == 3, v
    assert v["differing_offsets"] == [e * GRAN for e in planted]
    assert not v["running"] and not v["stopped"] and v["finished"]
    # Marked: the planted extents and those the host wrote, nothing else.
    assert _dirty(env) == set(planted) | set(range(8))
    text = env.cli("clone", "status", "c1").stdout
    # Every extent but those the host wrote (known to differ: not compared).
    assert "verify finished: {} extents compared, 3 differ, 0 skipped".format(
        v["extents_compared"]) in text, text
    assert 504 <= v["extents_compared"] < 512, v
    assert "differing at {}, {}, {}".format(*(e * GRAN for e in planted)) \
        in text, text
    assert all(len(line) <= 80 for line in text.splitlines()), text
    # The result is kept over a restart of the server.
    env.server.stop()
    env.start_server()
    assert env.status("c1")["verify"] == v
    env.sync_wait("c1")
    assert differing_extents(env.img("src"), env.img("c1"), env.size,
                             GRAN) == set()


def test_synchronized_clone_resyncs_exactly_the_planted(clone_env):
    env = clone_env.setup(size=16 * MiB, granularity="64K")
    env.sync_wait("c1")
    planted = [5, 100]
    _plant(env, planted)
    # Mirrored throughout, never a difference.  Its extents are in other
    # 1 MiB chunks than the planted ones: a chunk a host writes through
    # every re-check is skipped, not compared (and never reported).
    with Writer(env, 32, 80):
        env.cli("clone", "verify", "c1", "--wait")
        st = env.wait_done("c1")
    v = st["verify"]
    assert v["extents_differing"] == 2, v
    assert v["differing_offsets"] == [5 * GRAN, 100 * GRAN]
    assert v["extents_compared"] + v["extents_skipped"] == 256, v
    assert v["extents_skipped"] <= 48, v    # only the writer's chunks
    # The resync that followed copied exactly the two extents.
    assert st["operation"]["operation"] == "sync"
    assert st["operation"]["bytes_total"] == 2 * GRAN, st["operation"]
    assert differing_extents(env.img("src"), env.img("c1"), env.size,
                             GRAN) == set()


def test_heavy_writes_give_no_false_difference(clone_env):
    env = clone_env.setup(size=8 * MiB, granularity="64K")
    env.sync_wait("c1")
    # Two connections whose blocks overlap: overlapping writes are ordered
    # the same on both legs, so nothing may differ.
    with Writer(env, 0, 96), Writer(env, 32, 128):
        for _ in range(3):
            env.cli("clone", "verify", "c1", "--wait")
            st = env.status("c1")
            assert st["verify"]["extents_differing"] == 0, st["verify"]
            assert st["state"] == "synchronized" and \
                st["extents_dirty"] == 0, st


def test_rate_is_honoured_and_stop_leaves_maps_valid(clone_env):
    env = clone_env.setup(size=32 * MiB, granularity="64K")
    env.sync_wait("c1")
    env.cli("clone", "fracture", "c1")
    _plant(env, [2, 500])
    started = time.monotonic()
    env.cli("clone", "verify", "c1", "--rate", "4M")
    time.sleep(2.0)
    st = env.status("c1")
    v = st["verify"]
    elapsed = time.monotonic() - started
    assert v["running"], v
    # About 4 MiB/s: a chunk (1 MiB) of slack either way.
    assert 2 * MiB <= v["bytes_done"] <= 4 * MiB * elapsed + MiB, v
    proc = env.cli("clone", "verify", "c1", "--stop")
    assert "stopped" in proc.stdout
    v = env.status("c1")["verify"]
    assert v["stopped"] and not v["running"], v
    assert v["extents_compared"] < 512
    # What it found is marked, nothing else; extent 500 was not reached.
    assert _dirty(env) == {2}
    # The group is free again: a full verify finds the other one too.
    env.cli("clone", "verify", "c1", "--wait")
    assert _dirty(env) == {2, 500}
    env.sync_wait("c1")
    assert differing_extents(env.img("src"), env.img("c1"), env.size,
                             GRAN) == set()


def test_verify_refusals(clone_env):
    env = clone_env.setup(size=1 * MiB, fill=False)
    env.refused("clone", "verify", "c1",
                match="needs a synchronized or fractured clone")
    env.refused("clone", "verify", "nope", match="no clone named 'nope'")
    env.cli("clone", "sync", "c1", "--rate", "64K")
    env.refused("clone", "verify", "c1", match="syncing")
