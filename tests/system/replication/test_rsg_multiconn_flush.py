"""multi-conn on a replicated primary with a sync link: the plugin tells
hosts that a flush on any connection makes the writes completed on all of
them durable (a Linux host with `nbd-client -C N`, or qemu, flushes on one
connection only).  Both nodes' state directories live on
scripts/powerfs.py (every write not fsynced is lost at a power cut).
Writes acknowledged on one connection, a flush on another, then a power
cut of the secondary or of the primary: the flushed writes must be on the
node that lost its power, writes acknowledged after the flush are lost in
part there (the disk really forgets), and once caught up the secondary
equals the primary."""

import random
import time

import pytest

from tests.support import scripts
from tests.support.powernodes import BLOCK, Link, MiB, lost_blocks, \
    powerfs_target, torture, write_then_flush_elsewhere

pytestmark = scripts.needs_powerfs

SIZE = 16 * MiB


@pytest.fixture
def nodes(tmp_path):
    link = Link(tmp_path)
    disk_p, p = powerfs_target(tmp_path, link.log, 21, "p")
    disk_s, s = powerfs_target(tmp_path, link.log, 22, "s", link.serve_args)
    disks = {"primary": (disk_p, p), "secondary": (disk_s, s)}
    for t in (p, s):
        assert t.cli("lu", "create", "src", "--size",
                     str(SIZE)).returncode == 0
    try:
        s.start(connect=False)
        p.start()
        assert p.cli("rsg", "create", "g", "--volume", "src", "--srl-size",
                     "8M").returncode == 0
        assert p.cli("rsg", "link", "g", *link.link_args,
                     "--mode", "sync").returncode == 0
        _wait_caught_up(p, s, "the first sync")
        yield disks
    finally:
        for disk, t in disks.values():
            t.stop()
            disk.stop()


def _wait_caught_up(p, s, what, timeout=90):
    deadline = time.monotonic() + timeout
    while not torture.caught_up(*torture.replication_status(p, s)):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.mark.parametrize("cut", ["secondary", "primary"])
def test_a_flush_on_one_connection_makes_sync_writes_of_another_durable(
        nodes, cut):
    (_, p), (_, s) = nodes["primary"], nodes["secondary"]
    disk, node = nodes[cut]
    rng = random.Random(5)
    # Fewer than a link's CAPL batches between two CMITs of its own, and
    # the cut well within its interval: only the flush makes them durable
    # on the secondary.
    blocks = rng.sample(range(SIZE // BLOCK), 32)
    flushed, unflushed = blocks[:16], blocks[16:]
    writer, flusher = p.connect(), p.connect()
    new = {b: rng.randbytes(BLOCK) for b in blocks}
    write_then_flush_elsewhere(writer, flusher, new, flushed, unflushed)
    writer.shutdown()
    flusher.shutdown()
    node.power_cut(disk)

    image = node.read_file("src")
    lost = lost_blocks(image, new, flushed)
    assert not lost, "{} of 16 sync writes flushed on another connection " \
        "are not on the {} after its power cut (first {})".format(
            len(lost), cut, lost[:4])
    assert lost_blocks(image, new, unflushed), \
        "the cut lost no unflushed write: the test proves nothing"
    node.start(connect=node is p)
    _wait_caught_up(p, s, "caught up after the power cut")
    assert p.read_all("src", SIZE) == s.read_all("src", SIZE)
