"""scripts/powerfs.py, the power-loss disk of the torture: what a power cut
(kill -9 of the file system process) keeps and loses.  If these fail, the
power-loss torture proves nothing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import torture  # noqa: E402

sys.path.pop(0)

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or os.geteuid() != 0,
    reason="mounts a FUSE file system: needs /dev/fuse and root")


class Disk(torture.PowerFS):
    """The torture's disk, with Paths for the tests."""

    def __init__(self, tmp_path, **options):
        super().__init__(str(tmp_path), log=subprocess.DEVNULL, **options)
        self.start()
        self.backing, self.mount = Path(self.backing), Path(self.mount)


@pytest.fixture
def disk(tmp_path):
    d = Disk(tmp_path, seed=0, writeback=0)
    yield d
    d.stop()


def test_unsynced_writes_are_lost_synced_ones_kept(disk):
    fd = os.open(disk.mount / "f", os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, b"a" * 10000, 0)
    os.fdatasync(fd)
    os.pwrite(fd, b"b" * 5000, 100)          # torn over two pages, unsynced
    # Until the cut, programs see their writes.
    assert os.pread(fd, 5100, 0) == b"a" * 100 + b"b" * 5000
    os.close(fd)                              # close is no durability point
    with open(disk.mount / "f", "rb") as f:
        assert f.read(5100) == b"a" * 100 + b"b" * 5000
    disk.cut()
    assert (disk.backing / "f").read_bytes() == b"a" * 10000


def test_rename_of_an_unsynced_file_keeps_no_data(disk):
    (disk.mount / "tmp").write_bytes(b"new state")
    os.rename(disk.mount / "tmp", disk.mount / "state")
    assert (disk.mount / "state").read_bytes() == b"new state"
    disk.cut()
    # Metadata is durable at once, data only when synced.
    assert (disk.backing / "state").read_bytes() == bytes(9)


def test_ignore_fsync_loses_even_synced_writes(tmp_path):
    d = Disk(tmp_path, seed=0, writeback=0, ignore_fsync=True)
    try:
        fd = os.open(d.mount / "f", os.O_RDWR | os.O_CREAT, 0o644)
        os.pwrite(fd, b"x" * 4096, 0)
        os.fsync(fd)
        os.close(fd)
        d.cut()
        assert (d.backing / "f").read_bytes() == bytes(4096)
    finally:
        d.stop()


def test_early_writeback_keeps_some_unsynced_pages(tmp_path):
    d = Disk(tmp_path, seed=3, writeback=0.5)
    try:
        fd = os.open(d.mount / "f", os.O_RDWR | os.O_CREAT, 0o644)
        for page in range(64):
            os.pwrite(fd, bytes([page + 1]) * 4096, page * 4096)
        os.close(fd)
        d.cut()
        data = (d.backing / "f").read_bytes()
        kept = [p for p in range(64) if data[p * 4096] == p + 1]
        # Each page is either its write or nothing: never anything else.
        for p in range(64):
            assert data[p * 4096:(p + 1) * 4096] in (
                bytes([p + 1]) * 4096, bytes(4096))
        assert 0 < len(kept) < 64, kept
    finally:
        d.stop()
