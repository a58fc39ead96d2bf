"""An NBD flush makes the writes acknowledged before it durable: the LU's
state directory lives on scripts/powerfs.py, which loses every write not
fsynced at a power cut (--writeback 0), so a flush that did nothing, or
synced the wrong file, loses the flushed block here.  The block written
after the flush is lost by the cut: the disk really forgets, and the test
can fail."""

import os
import subprocess

import pytest

from tests.support import scripts
from tests.support.cli import run_clonectl
from tests.support.servers import read_file_range

torture = scripts.load("torture")

pytestmark = scripts.needs_powerfs

BLOCK = 4096


@pytest.fixture
def disk(tmp_path):
    d = torture.PowerFS(str(tmp_path), 0, subprocess.DEVNULL, writeback=0)
    d.start()
    yield d
    d.stop()


@pytest.mark.parametrize("how", ["flush", "fua"])
def test_flushed_writes_survive_a_power_cut_unflushed_ones_do_not(
        disk, tmp_path, server_factory, nbd_connect, how):
    nbd = pytest.importorskip("nbd")
    state_dir = os.path.join(disk.mount, "state")
    os.makedirs(state_dir)
    # The runtime directory (sockets, locks, logs) is not on the disk.
    os.makedirs(tmp_path / "run")
    os.symlink(tmp_path / "run", os.path.join(state_dir, "run"))
    run_clonectl(state_dir, "lu", "create", "db", "--size", "1M")
    # The LU's file and its entry are durable before the test's writes.
    subprocess.run(["sync", "-f", state_dir], check=True)
    srv = server_factory(state_dir=state_dir)
    h = nbd_connect(srv.socket, "db")
    if how == "flush":
        h.pwrite(b"F" * BLOCK, 0)
        h.flush()
    else:
        h.pwrite(b"F" * BLOCK, 0, nbd.CMD_FLAG_FUA)
    h.pwrite(b"U" * BLOCK, 64 * BLOCK)             # never flushed
    assert h.pread(BLOCK, 64 * BLOCK) == b"U" * BLOCK
    disk.cut()
    srv.stop()
    disk.start()
    image = os.path.join(state_dir, "lus", "db.img")
    assert read_file_range(image, 0, BLOCK) == b"F" * BLOCK
    assert read_file_range(image, 64 * BLOCK, BLOCK) == bytes(BLOCK), \
        "the disk kept an unflushed write: this test proves nothing"
