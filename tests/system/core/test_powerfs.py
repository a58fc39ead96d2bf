"""scripts/powerfs.py, the power-loss disk of the torture: what a power cut
(kill -9 of the file system process) keeps and loses.  If these fail, the
power-loss torture proves nothing."""

import os
import subprocess
from pathlib import Path

import pytest

from target.fsutil import fsync_dir
from tests.support import scripts

torture = scripts.load("torture")

pytestmark = scripts.needs_powerfs


class Disk(torture.PowerFS):
    """The torture's disk, with Paths for the tests."""

    def __init__(self, tmp_path, **options):
        super().__init__(str(tmp_path), log=subprocess.DEVNULL, **options)
        self.start()
        self.backing, self.mount = Path(self.backing), Path(self.mount)


def _mounted(tmp_path, unsynced_entries):
    d = Disk(tmp_path, seed=0, writeback=0,
             unsynced_entries=unsynced_entries)
    yield d
    d.stop()


@pytest.fixture
def disk(tmp_path):
    # Directory entries survive: these tests are about data.
    yield from _mounted(tmp_path, "keep")


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
    d = Disk(tmp_path, seed=0, writeback=0, ignore_fsync=True,
             unsynced_entries="keep")
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
    d = Disk(tmp_path, seed=3, writeback=0.5, unsynced_entries="keep")
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


# Directory entries: durable once their directory is fsynced.  Undone at the
# next boot, so these tests cut and start again.

def write_synced(path, data):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.fixture
def strict_disk(tmp_path):
    """A disk that loses every directory operation not synced."""
    yield from _mounted(tmp_path, "lose")


def test_a_synced_file_without_its_directory_synced_is_lost(strict_disk):
    d = strict_disk
    (d.mount / "sub").mkdir()
    fsync_dir(d.mount)
    write_synced(d.mount / "sub" / "kept", b"k" * 100)
    fsync_dir(d.mount / "sub")
    write_synced(d.mount / "sub" / "lost", b"l" * 100)
    d.power_cycle()
    assert sorted(os.listdir(d.mount / "sub")) == ["kept"]
    assert (d.mount / "sub" / "kept").read_bytes() == b"k" * 100


def test_rename_over_a_file_is_undone_without_a_directory_fsync(strict_disk):
    d = strict_disk
    write_synced(d.mount / "state", b"old")
    fsync_dir(d.mount)
    # The temporary-file-and-rename update, without the directory fsync.
    write_synced(d.mount / "state.tmp", b"new")
    os.rename(d.mount / "state.tmp", d.mount / "state")
    assert (d.mount / "state").read_bytes() == b"new"
    d.power_cycle()
    assert sorted(os.listdir(d.mount)) == ["state"]
    assert (d.mount / "state").read_bytes() == b"old"
    # With it, the new file stays.
    write_synced(d.mount / "state.tmp", b"new")
    os.rename(d.mount / "state.tmp", d.mount / "state")
    fsync_dir(d.mount)
    d.power_cycle()
    assert sorted(os.listdir(d.mount)) == ["state"]
    assert (d.mount / "state").read_bytes() == b"new"


def test_an_unsynced_unlink_brings_the_file_back(strict_disk):
    d = strict_disk
    write_synced(d.mount / "f", b"data")
    (d.mount / "dir").mkdir()
    fsync_dir(d.mount)
    os.unlink(d.mount / "f")
    os.rmdir(d.mount / "dir")
    d.power_cycle()
    assert (d.mount / "f").read_bytes() == b"data"
    assert (d.mount / "dir").is_dir()


def test_syncing_an_entry_makes_its_new_parent_durable(strict_disk):
    d = strict_disk
    (d.mount / "a").mkdir()
    (d.mount / "a" / "b").mkdir()
    write_synced(d.mount / "a" / "b" / "f", b"f")
    fsync_dir(d.mount / "a" / "b")
    write_synced(d.mount / "g", b"g")
    d.power_cycle()
    assert (d.mount / "a" / "b" / "f").read_bytes() == b"f"
    assert not (d.mount / "g").exists()


def test_random_prefix_of_unsynced_entries_survives(tmp_path):
    """A journalling file system commits in order: what survives is a
    prefix of the unsynced operations, never a later one without an
    earlier one."""
    prefixes = set()
    for seed in range(6):
        d = Disk(tmp_path / str(seed), seed=seed, writeback=0)
        try:
            for i in range(8):
                (d.mount / "f{}".format(i)).write_bytes(b"")
            d.power_cycle()
            names = sorted(os.listdir(d.mount), key=lambda n: int(n[1:]))
            assert names == ["f{}".format(i) for i in range(len(names))]
            prefixes.add(len(names))
        finally:
            d.stop()
    assert len(prefixes) > 1, prefixes


def test_ignore_dir_fsync_loses_synced_entries(tmp_path):
    d = Disk(tmp_path, seed=0, writeback=0, unsynced_entries="lose",
             ignore_dir_fsync=True)
    try:
        write_synced(d.mount / "f", b"f")
        fsync_dir(d.mount)
        d.power_cycle()
        assert os.listdir(d.mount) == []
    finally:
        d.stop()
