"""A power cut of a sync link's secondary (its state directory on
scripts/powerfs.py, which loses every write not fsynced).  The secondary
acknowledges sync writes once applied and makes them durable when the
primary's host flushes: after the cut, every write flushed before it must
be in the secondary's volume file; the secondary comes back inconsistent
(it cannot tell which unflushed writes reached its disk) and, once the
primary has sent their regions again (not the volume), equals it."""

import os
import random
import time

import pytest

from tests.support import scripts
from tests.support.powernodes import (BLOCK, Link, MiB, powerfs_target,
                                      torture)

pytestmark = scripts.needs_powerfs

SIZE = 16 * MiB


@pytest.fixture
def nodes(tmp_path):
    link = Link(tmp_path)
    disk, s = powerfs_target(tmp_path, link.log, 11, "s", link.serve_args)
    p = torture.Target(str(tmp_path / "p"), str(tmp_path / "p.sock"),
                       link.log)
    os.makedirs(p.state_dir)
    for t in (p, s):
        assert t.cli("lu", "create", "src", "--size",
                     str(SIZE)).returncode == 0
    s.start(connect=False)
    p.start()
    try:
        assert p.cli("rsg", "create", "g", "--volume", "src", "--srl-size",
                     "8M").returncode == 0
        assert p.cli("rsg", "link", "g", *link.link_args,
                     "--mode", "sync").returncode == 0
        _wait(lambda: torture.caught_up(*torture.replication_status(p, s)),
              "the first sync")
        yield disk, p, s
    finally:
        for t in (p, s):
            t.stop()
        disk.stop()


def _wait(pred, what, timeout=90):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _link(p):
    return p.cli_json("rsg", "status", "g")["links"][0]


def test_flushed_sync_writes_survive_a_power_cut_of_the_secondary(nodes):
    disk, p, s = nodes
    rng = random.Random(5)
    # Fewer than a link's CAPL batches between two CMITs of its own, and
    # the cut well within its interval: only the flush makes them durable.
    blocks = rng.sample(range(SIZE // BLOCK), 32)
    flushed, unflushed = blocks[:16], blocks[16:]
    sent = _link(p)["bytes_sent"]
    h = p.connect()
    data = {}
    for b in flushed:
        data[b] = rng.randbytes(BLOCK)
        h.pwrite(data[b], b * BLOCK)
    h.flush()
    for b in unflushed:
        h.pwrite(rng.randbytes(BLOCK), b * BLOCK)
    h.shutdown()
    s.power_cut(disk)
    image = s.read_file("src")
    lost = [b for b in flushed if image[b * BLOCK:(b + 1) * BLOCK] != data[b]]
    assert not lost, "{} of 16 flushed sync writes are not on the " \
        "secondary after its power cut (first {})".format(len(lost), lost[:4])
    s.start(connect=False)
    _wait(lambda: torture.caught_up(*torture.replication_status(p, s)),
          "caught up after the power cut")
    assert p.read_all("src", SIZE) == s.read_all("src", SIZE)
    # The regions of the writes not durable there, not the volume.
    resent = _link(p)["bytes_sent"] - sent
    assert resent < 2 * MiB, resent
