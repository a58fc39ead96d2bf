"""Clones end to end with real clients: fio --verify during sync and reverse
sync, the fractured clone's own export, incremental resync, redirected reads
during a reverse sync."""

import os
import subprocess

import pytest

from tests.support.clonelib import (extents_of, fio, GRANULARITY, KiB, MiB,
                                    nbd_exports, read_range)
from tests.support.tools import qemu_io

pytest.importorskip("nbd")


def test_fio_verify_through_source_during_sync(clone_env):
    env = clone_env.setup(size=64 * MiB)
    original_head = read_range(env.img("src"), 0, 32 * MiB)
    original_tail = read_range(env.img("src"), 32 * MiB, 32 * MiB)
    env.sync("c1", "--rate", "16M")
    before = env.status("c1")
    assert before["state"] == "syncing" and before["operation"]["running"]

    # fio writes (and verifies) the first half of the Source while the
    # engine copies it; every write is mirrored to the clone.
    fio(env.uri("src"), 32 * MiB)

    during = env.status("c1")
    assert during["state"] == "syncing" and during["extents_dirty"] > 0, \
        "the sync finished before fio: no overlap was tested"
    st = env.wait_done("c1")
    assert st["extents_dirty"] == 0
    env.assert_identical("src", "c1")
    assert read_range(env.img("src"), 32 * MiB, 32 * MiB) == original_tail
    assert read_range(env.img("src"), 0, 32 * MiB) != original_head


def test_fio_verify_through_source_during_reverse_sync(clone_env):
    env = clone_env.setup(size=64 * MiB)
    env.sync_wait("c1")
    env.cli("clone", "fracture", "c1")
    clone_data = os.urandom(64 * MiB)
    env.write_export("c1", 0, clone_data)
    assert env.status("c1")["extents_dirty"] == 64 * MiB // GRANULARITY

    env.cli("clone", "reverse-sync", "c1", "--rate", "16M")
    assert env.status("c1")["state"] == "reverse-syncing"
    # fio verifies what it wrote to the first half of the Source while
    # reads of extents not yet restored are served from the clone.
    fio(env.uri("src"), 32 * MiB)
    during = env.status("c1")
    assert during["state"] == "reverse-syncing" and \
        during["extents_dirty"] > 0, "the reverse sync finished before fio"

    st = env.wait_done("c1")
    assert st["extents_dirty"] == 0
    env.assert_identical("src", "c1")
    # Where fio did not write, the Source now holds the clone's data.
    assert read_range(env.img("src"), 32 * MiB, 32 * MiB) == \
        clone_data[32 * MiB:]


def test_fractured_clone_export_and_incremental_sync(clone_env, nbd_connect):
    env = clone_env.setup(size=64 * MiB)
    env.sync_wait("c1")
    assert nbd_exports(env.server.socket) == ["src"]
    env.cli("clone", "fracture", "c1")
    st = env.status("c1")
    assert st["state"] == "fractured" and st["extents_dirty"] == 0
    assert st["exported"]
    assert nbd_exports(env.server.socket) == ["c1", "src"]
    source_before = read_range(env.img("src"), 0, 64 * MiB)

    # A second client writes the clone, another one the Source.
    clone_writes = [(1 * MiB, 192 * KiB), (10 * MiB + 4 * KiB, 4 * KiB)]
    source_writes = [(20 * MiB, 128 * KiB), (1 * MiB + 64 * KiB, 4 * KiB),
                     (63 * MiB + 60 * KiB, 8 * KiB)]
    qemu_io(env.uri("c1"), *["write -P 0x5a {} {}".format(o, n)
                             for o, n in clone_writes])
    qemu_io(env.uri("src"), *["write -P 0xa5 {} {}".format(o, n)
                              for o, n in source_writes])
    # Each side sees its own writes only.
    qemu_io(env.uri("c1"), "read -P 0x5a {} {}".format(*clone_writes[0]))
    h = nbd_connect(env.server.socket, "src")
    assert h.pread(64 * KiB, 1 * MiB) == source_before[1 * MiB:
                                                      1 * MiB + 64 * KiB]
    h.shutdown()
    assert read_range(env.img("c1"), 20 * MiB, 128 * KiB) == \
        source_before[20 * MiB:20 * MiB + 128 * KiB]

    dirty = set()
    for o, n in clone_writes + source_writes:
        dirty |= extents_of(o, n)
    st = env.status("c1")
    assert st["extents_dirty"] == len(dirty), (st, sorted(dirty))
    assert st["bytes_dirty"] == len(dirty) * GRANULARITY

    env.sync_wait("c1")
    st = env.status("c1")
    op = st["operation"]
    assert op["operation"] == "sync" and op["collisions"] == 0
    # Incremental: only the dirty extents were copied.
    assert op["bytes_copied"] == len(dirty) * GRANULARITY, (op, len(dirty))
    env.assert_identical("src", "c1")
    # The Source wins: the clone's own writes are gone, the Source's kept.
    assert read_range(env.img("c1"), 1 * MiB, 64 * KiB) == \
        source_before[1 * MiB:1 * MiB + 64 * KiB]
    assert read_range(env.img("c1"), 20 * MiB, 128 * KiB) == \
        b"\xa5" * (128 * KiB)
    assert nbd_exports(env.server.socket) == ["src"]


def test_reverse_sync_serves_source_reads_from_clone(clone_env, nbd_connect):
    env = clone_env.setup(size=64 * MiB)
    env.sync_wait("c1")
    env.cli("clone", "fracture", "c1")
    region, length = 8 * MiB, 8 * MiB
    clone_data = os.urandom(length)
    env.write_export("c1", region, clone_data)
    # The Source also changes one extent of the region after the fracture:
    # the restore must bring back the clone's data there too.
    env.write_export("src", region + 4 * MiB, b"\x11" * GRANULARITY)
    source_outside = read_range(env.img("src"), 0, region)
    assert env.status("c1")["extents_dirty"] == length // GRANULARITY

    env.cli("clone", "reverse-sync", "c1", "--rate", "2M")
    h = nbd_connect(env.server.socket, "src")
    seen = h.pread(length, region)
    st = env.status("c1")
    assert st["state"] == "reverse-syncing" and st["extents_dirty"] > 0, \
        "the reverse sync finished before the read: nothing was redirected"
    assert seen == clone_data
    assert h.pread(region, 0) == source_outside
    # A host write during the reverse sync, to an extent not yet restored,
    # reaches both sides and is never overwritten by the restore.
    late = region + length - 2 * GRANULARITY + 512
    h.pwrite(b"\x77" * 4096, late)
    h.flush()
    assert h.pread(4096, late) == b"\x77" * 4096
    h.shutdown()

    env.wait_done("c1", timeout=60)
    env.assert_identical("src", "c1")
    expected = bytearray(clone_data)
    expected[late - region:late - region + 4096] = b"\x77" * 4096
    assert read_range(env.img("src"), region, length) == bytes(expected)
    assert read_range(env.img("src"), 0, region) == source_outside


def test_reverse_sync_block_status_agrees_with_reads(clone_env, nbd_connect,
                                                     tmp_path):
    """While reads of the Source are redirected to the clone, block status
    (base:allocation) must not report as zero what reads return as data:
    nbdcopy and qemu-img convert skip such extents."""
    nbd = pytest.importorskip("nbd")
    env = clone_env.setup(size=8 * MiB, fill=False)  # a sparse Source
    env.sync_wait("c1")
    env.cli("clone", "fracture", "c1")
    clone_data = os.urandom(5 * MiB)
    env.write_export("c1", 1 * MiB, clone_data)
    env.cli("clone", "reverse-sync", "c1", "--rate", "1M")

    h = nbd_connect(env.server.socket, "src", meta=True)
    entries = []

    def extent(metacontext, offset, e, err):
        if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
            entries.extend(zip(e[::2], e[1::2]))
        return 0

    h.block_status(env.size, 0, extent)
    seen = h.pread(env.size, 0)
    copy = tmp_path / "copy.raw"
    proc = subprocess.run(["nbdcopy", env.uri("src"), str(copy)],
                          capture_output=True, text=True, timeout=60)
    h.shutdown()
    st = env.status("c1")
    if not (st["state"] == "reverse-syncing" and st["extents_dirty"]):
        pytest.skip("the reverse sync ended before the checks")
    assert proc.returncode == 0, proc.stderr

    assert seen[1 * MiB:6 * MiB] == clone_data  # reads are redirected
    pos = 0
    for length, flags in entries:
        if flags & nbd.STATE_ZERO:
            assert seen[pos:pos + length] == bytes(length), \
                "extent {}+{} reported as zero reads data".format(pos, length)
        pos += length
    # A real client that trusts block status copies what reads show.
    assert copy.read_bytes()[1 * MiB:6 * MiB] == clone_data
    env.wait_done("c1", timeout=60)
    env.assert_identical("src", "c1")
