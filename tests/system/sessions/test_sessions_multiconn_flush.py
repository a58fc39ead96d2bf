"""multi-conn with a marked session: the plugin tells hosts that a flush
on any connection makes the writes completed on all of them durable (a
Linux host with `nbd-client -C N`, or qemu, then flushes on one
connection only).  The Source lives on scripts/powerfs.py (every write not
fsynced is lost at a power cut): first writes to a freshly marked,
exported Source acknowledged on one connection, a flush on another, a
power cut.  After the restart the flushed writes are on the Source and the
frozen image still shows the data of the mark (their copies on first
write were durable before the writes); writes acknowledged after the
flush are lost in part, so the disk really forgets."""

import os
import random
import subprocess

import pytest

from tests.support import scripts
from tests.support.powernodes import BLOCK, MiB, lost_blocks, \
    powerfs_target, write_then_flush_elsewhere
from tests.support.rsgmodel import wait_for

pytestmark = scripts.needs_powerfs

SIZE = 4 * MiB
EXTENT = 64 * 1024


@pytest.fixture
def source(tmp_path):
    log = open(tmp_path / "serve.log", "ab")
    disk, t = powerfs_target(tmp_path, log, 7, "src")
    try:
        assert t.cli("lu", "create", "src", "--size",
                     str(SIZE)).returncode == 0
        assert t.cli("lu", "create", "dst", "--size",
                     str(SIZE)).returncode == 0
        old = random.Random(1).randbytes(SIZE)
        with open(os.path.join(t.state_dir, "lus", "src.img"), "r+b") as f:
            f.write(old)
            os.fsync(f.fileno())
        subprocess.run(["sync", "-f", t.state_dir], check=True)
        t.start()
        assert t.cli("session", "create", "src", "s", "--dest",
                     "nbd+unix:///dst?socket=" + t.socket).returncode == 0
        assert t.cli("session", "mark", "s", "--export").returncode == 0
        yield disk, t, old
    finally:
        t.stop()
        disk.stop()
        log.close()


def test_a_flush_on_one_connection_makes_first_writes_of_another_durable(
        source):
    disk, t, old = source
    rng = random.Random(2)
    # One 4 KiB write in each of 32 extents: each a copy on first write.
    blocks = [x * EXTENT // BLOCK + rng.randrange(EXTENT // BLOCK)
              for x in rng.sample(range(SIZE // EXTENT), 32)]
    flushed, unflushed = blocks[:16], blocks[16:]
    writer, flusher = t.connect("src"), t.connect("src")
    new = {b: rng.randbytes(BLOCK) for b in blocks}
    write_then_flush_elsewhere(writer, flusher, new, flushed, unflushed)
    # The unflushed ones may still be queued (deferred first writes).
    wait_for(lambda: t.cli_json("session", "status", "s")["cofw_count"]
             == 32, 10, "every write to have saved its extent")
    t.power_cut(disk)

    image = t.read_file("src")
    lost = lost_blocks(image, new, flushed)
    assert not lost, "{} of 16 writes flushed on another connection are " \
        "not on the Source after the power cut (first {})".format(
            len(lost), lost[:4])
    assert lost_blocks(image, new, unflushed), \
        "the cut lost no unflushed write: the test proves nothing"
    t.start()
    st = t.cli_json("session", "status", "s")
    assert st["marked"], st
    assert t.read_all("src@s", SIZE) == old, \
        "the frozen image lost the mark's data of extents written after it"
