"""Online verify of a replication link (Link.start_verify): the primary
compares extent checksums of its volumes with the secondary's, asked
through the ordered stream, while hosts write; differences planted in the
secondary's volume file are marked in the link's DCM and replayed, and
host writes never show as a difference."""

import os
import random
import threading
import time

import pytest

from target import replication as R
from tests.support import rsgnodes
from tests.support.rsgmodel import (fast_timing, first_diff, restore_timing,
                                    wait_for)
from tests.support.rsgnodes import read_image

GRAN = 4096
VOLS = ["v1", "v2"]
SIZES = [1 << 20, 512 << 10]


class Pair(rsgnodes.Pair):
    """A primary Target (A) replicating group g to a secondary (B), in
    process, over 127.0.0.1."""

    def __init__(self, root, mode="async"):
        super().__init__(root, dict(zip(VOLS, SIZES)))
        self.create_group("1M", "4K")
        self.link_up(mode)
        self.lock = threading.Lock()

    def write(self, vol, off, data):
        with self.lock:
            self.ta.lus[VOLS[vol]].write(data, off)


@pytest.fixture
def cluster_factory():
    saved = fast_timing()
    with rsgnodes.made(Pair, "rsg-verify-") as make:
        yield make
    restore_timing(saved)


def _plant(c, vol, extents):
    """Flip a byte of each extent in the secondary's volume file."""
    path = c.tb.lus[VOLS[vol]].file
    fd = os.open(path, os.O_RDWR)
    try:
        for e in extents:
            off = e * GRAN + 17
            old = os.pread(fd, 1, off)
            os.pwrite(fd, bytes([old[0] ^ 0x5A]), off)
    finally:
        os.close(fd)


class Writer:
    """Host writes into extents [first, last) of volume vol until
    stopped."""

    def __init__(self, c, vol, first, last):
        self.c, self.vol, self.first, self.last = c, vol, first, last
        self.stop = threading.Event()
        self.count = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        rng = random.Random(3)
        while not self.stop.is_set():
            e = rng.randrange(self.first, self.last)
            self.c.write(self.vol, e * GRAN + rng.randrange(0, GRAN - 512),
                         rng.randbytes(512))
            self.count += 1
            time.sleep(0.001)   # within what the SRL and the link carry

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)


def _verify(c, rate=None, timeout=30):
    with c.g.cond:
        job = c.link.start_verify(rate=rate)
    wait_for(lambda: not job.running, timeout, "the verify", c.status)
    return job.to_dict()


def _fill(c):
    rng = random.Random(1)
    for vol, size in enumerate(SIZES):
        c.write(vol, 0, rng.randbytes(size))
    c.wait_converged()


def test_planted_differences_are_found_marked_and_replayed(cluster_factory):
    c = cluster_factory()
    _fill(c)
    _plant(c, 0, [5, 200])
    _plant(c, 1, [7])
    replays = c.link.replays
    with Writer(c, 0, 20, 60) as w:
        v = _verify(c)
        assert w.count > 0
    assert v["extents_differing"] == 3, v
    assert v["differing"] == [["v1", 5 * GRAN], ["v1", 200 * GRAN],
                              ["v2", 7 * GRAN]]
    assert v["extents_compared"] == sum(s // GRAN for s in SIZES)
    assert not v["stopped"], v
    # Marked in the DCM and replayed: the secondary is repaired.
    wait_for(lambda: c.link.replays == replays + 1, 10, "the replay",
             c.status)
    c.wait_converged()
    prim = [read_image(c.ta, n) for n in VOLS]
    sec = [read_image(c.tb, n) for n in VOLS]
    assert prim == sec, first_diff(prim, sec, VOLS)


def test_heavy_writes_give_no_false_difference(cluster_factory):
    c = cluster_factory(mode="sync")
    _fill(c)
    replays = c.link.replays
    with Writer(c, 0, 0, SIZES[0] // GRAN), Writer(c, 1, 0, SIZES[1] // GRAN):
        for _ in range(2):
            v = _verify(c)
            assert v["extents_differing"] == 0, v
    assert c.link.replays == replays
    assert c.link.dcm.count() == 0
    assert c.link.state == R.REPLICATING


def test_rate_and_stop(cluster_factory):
    c = cluster_factory()
    _fill(c)
    _plant(c, 0, [3])       # in the first region
    _plant(c, 1, [100])     # in the second: not reached before the stop
    total = sum(SIZES)
    replays = c.link.replays
    with c.g.cond:
        # The first region (v1, 1 MiB) at once, then a wait of ~5 s.
        job = c.link.start_verify(rate=total // 8)
    time.sleep(1.0)
    v = job.to_dict()
    assert v["running"] and v["bytes_done"] == SIZES[0], v
    with c.g.cond:
        c.link.stop_verify()
    wait_for(lambda: not job.running, 10, "the stop", c.status)
    v = job.to_dict()
    assert v["stopped"] and v["differing"] == [["v1", 3 * GRAN]], v
    # What it found is replayed; the rest is as it was.
    wait_for(lambda: c.link.replays == replays + 1, 10, "the replay",
             c.status)
    c.wait_converged()
    assert read_image(c.ta, "v1") == read_image(c.tb, "v1")
    assert read_image(c.ta, "v2") != read_image(c.tb, "v2")
    # A full verify afterwards finds the other one.
    v = _verify(c)
    assert v["differing"] == [["v2", 100 * GRAN]]
    wait_for(lambda: c.link.replays == replays + 2, 10, "the replay",
             c.status)
    c.wait_converged()
    assert [read_image(c.ta, n) for n in VOLS] == \
        [read_image(c.tb, n) for n in VOLS]


def test_updates_before_a_region_reach_the_secondary_before_its_request(
        cluster_factory, monkeypatch):
    """A host write lands just before a region is read: its update must
    reach the secondary before the region's request, or the secondary
    answers for an older state and the write shows as a difference (taking
    the sending of the updates out of Link.verify_region makes this
    fail)."""
    c = cluster_factory()
    _fill(c)
    real = R.verify.LinkVerify.next_region
    writes = []

    def write_first(job):
        region = real(job)
        if region is not None and len(writes) < 4:
            vol, offset, _ = region
            data = bytes([len(writes) + 1]) * 512
            writes.append(region)
            c.write(vol, offset + 1000, data)
        return region
    monkeypatch.setattr(R.verify.LinkVerify, "next_region", write_first)
    v = _verify(c)
    assert len(writes) == 2     # v1's and v2's regions
    assert v["extents_differing"] == 0, v
    c.wait_converged()
    assert c.link.dcm.count() == 0


def test_verify_refusals(cluster_factory):
    c = cluster_factory()
    c.wait_converged()
    assert c.link.secondary_verifies    # said so in its handshake reply
    c.link.secondary_verifies = False   # as an older secondary
    with c.g.cond, pytest.raises(R.link.VerifyRefused,
                                 match="without online verify"):
        c.link.start_verify()
    c.link.secondary_verifies = True
    with c.g.cond:
        job = c.link.start_verify(rate=1)   # crawls after its first region
        with pytest.raises(R.link.VerifyRefused, match="a verify is running"):
            c.link.start_verify()
    c.g.detach_link(c.link)
    wait_for(lambda: not job.running, 10, "the end of the verify",
             c.status)
    assert job.stopped and "left replicating" in job.error
    with c.g.cond, pytest.raises(R.link.VerifyRefused,
                                 match="not replicating"):
        c.link.start_verify()
