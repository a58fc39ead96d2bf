"""A power cut of the primary (its state directory on scripts/powerfs.py,
which loses every write not fsynced) while an async link has streamed
writes that were never flushed: the secondary holds updates the primary
lost.  The primary's activity log must send those regions again after the
restart, so that once caught up the secondary equals the primary.  Without
it (replication before the activity log) the secondary either keeps the
lost writes or, when the SRL tail was lost as well, skips the primary's
next updates as ones it already has: both fail here."""

import os
import time

import pytest

from tests.support import scripts
from tests.support.powernodes import (BLOCK, Link, MiB, powerfs_target,
                                      torture)

pytestmark = scripts.needs_powerfs

SIZE = 4 * MiB


def _differing_blocks(primary, secondary):
    """The blocks of src where the two nodes differ."""
    mine, theirs = primary.read_all("src", SIZE), \
        secondary.read_all("src", SIZE)
    return [b for b in range(SIZE // BLOCK)
            if mine[b * BLOCK:(b + 1) * BLOCK] !=
            theirs[b * BLOCK:(b + 1) * BLOCK]]


def _block(tag, b):
    unit = b"%s-%08d-" % (tag, b)
    return (unit * (BLOCK // len(unit) + 1))[:BLOCK]


@pytest.fixture
def pair(tmp_path):
    link = Link(tmp_path)
    disk, primary = powerfs_target(tmp_path, link.log, 1, "p")
    secondary = torture.Target(
        str(tmp_path / "secondary"), str(tmp_path / "s.sock"), link.log,
        link.serve_args)
    os.makedirs(secondary.state_dir)
    for t in (primary, secondary):
        assert t.cli("lu", "create", "src", "--size", str(SIZE)).returncode \
            == 0
    secondary.start(connect=False)
    primary.start()
    try:
        assert primary.cli("rsg", "create", "g", "--volume", "src",
                           "--srl-size", "1M").returncode == 0
        assert primary.cli("rsg", "link", "g", *link.link_args,
                           "--mode", "async").returncode == 0
        yield disk, primary, secondary
    finally:
        primary.stop()
        secondary.stop()
        disk.stop()


def _wait_caught_up(primary, secondary, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        p, link, s = torture.replication_status(primary, secondary)
        if torture.caught_up(p, link, s):
            return p, s
        assert time.monotonic() < deadline, \
            "not caught up: primary {} link {} secondary {}".format(
                p["last_seq"], link, s)
        time.sleep(0.1)


def _write_unflushed(primary):
    """64 blocks written to the primary's src and never flushed."""
    h = primary.connect()
    for b in range(64):
        h.pwrite(_block(b"lost", b), b * BLOCK)
    h.shutdown()


def test_power_cut_after_streamed_unflushed_writes(pair):
    disk, primary, secondary = pair
    _wait_caught_up(primary, secondary)
    _write_unflushed(primary)
    _, s = _wait_caught_up(primary, secondary)
    assert secondary.read_all("src", SIZE)[:BLOCK] == _block(b"lost", 0)

    primary.power_cut(disk)
    primary.start()
    after = primary.read_all("src", SIZE)
    lost = [b for b in range(64)
            if after[b * BLOCK:(b + 1) * BLOCK] != _block(b"lost", b)]
    assert lost, "the cut lost no unflushed write: the test proves nothing"

    h = primary.connect()
    for b in range(100, 110):
        h.pwrite(_block(b"new", b), b * BLOCK)
    h.flush()
    h.shutdown()
    p, s = _wait_caught_up(primary, secondary)
    differ = _differing_blocks(primary, secondary)
    assert not differ, "the caught-up secondary differs at blocks {} " \
        "({} unflushed writes lost by the cut)".format(differ[:10], len(lost))
    # Only the active regions were copied, not the whole volume again.
    assert p["links"][0]["replays"] >= 1
    assert p["activity_log_regions"] <= 1


@pytest.mark.parametrize("when", ["swept", "stopped"])
def test_power_cut_after_the_activity_log_let_go_of_unflushed_writes(
        pair, when):
    """The writes' regions have left the activity log (their SRL entries
    are durable): swept from it, and the clear reached the disk as the
    page cache may write it back early, or cleared by a clean stop; the
    volume's own pages did not reach the disk: the secondary holds writes
    the primary lost.  A region may leave the log only once the volume
    writes in it are durable too, so that after the cut the primary still
    sends it again."""
    disk, primary, secondary = pair
    _wait_caught_up(primary, secondary)
    _write_unflushed(primary)
    if when == "swept":
        deadline = time.monotonic() + 20
        while True:
            p, _ = _wait_caught_up(primary, secondary)
            if not p["activity_log_regions"]:
                break
            assert time.monotonic() < deadline, "the activity log keeps " \
                "{} region(s)".format(p["activity_log_regions"])
            time.sleep(0.2)
        # The page cache writes the log's clear back before the volume's.
        fd = os.open(os.path.join(primary.state_dir, "rsg", "g.al"),
                     os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        primary.power_cut(disk)
    else:
        _wait_caught_up(primary, secondary)
        primary.stop()
        disk.cut()
        disk.start()
    primary.start()
    after = primary.read_all("src", SIZE)
    lost = [b for b in range(64)
            if after[b * BLOCK:(b + 1) * BLOCK] != _block(b"lost", b)]
    h = primary.connect()
    h.pwrite(_block(b"new", 100), 100 * BLOCK)
    h.flush()
    h.shutdown()
    _wait_caught_up(primary, secondary)
    differ = _differing_blocks(primary, secondary)
    assert not differ, "the caught-up secondary differs at blocks {} " \
        "({} unflushed writes lost by the cut)".format(differ[:10], len(lost))
