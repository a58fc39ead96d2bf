"""Holes survive every copy: clone sync, reverse sync, restore and a session
transfer of a Source with holes leave the destination byte-equal to it AND
with holes where the Source has holes (or zeroes written as data), never
zeroes written as data.  Checked on the backing files (st_blocks,
SEEK_DATA/SEEK_HOLE) and, for clone exports and LUs, through the running
target (`nbdinfo --map`: what clients that skip holes see).
"""

import json
import os
import shutil
import subprocess

import pytest

from tests.support.clonelib import MiB, read_range

pytest.importorskip("nbd")

SIZE = 16 * MiB
# (offset, length) of random data in the Source; everything else reads as
# zero, [ZEROED) being zeroes written as data (allocated, not a hole).
DATA = ((1 * MiB, 1 * MiB), (9 * MiB + 4096, 100 * 1024))
ZEROED = (4 * MiB, 2 * MiB)
DATA_BYTES = sum(n for _, n in DATA)
# Filesystem blocks around the data, and maps: the allocation may exceed
# the data by a little, never by the size of the holes.
SLACK = 256 * 1024


def write_source(path):
    """The Source's content: data runs, an allocated zero run, holes."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, length in DATA:
            os.pwrite(fd, os.urandom(length), offset)
        os.pwrite(fd, bytes(ZEROED[1]), ZEROED[0])
        os.fsync(fd)
    finally:
        os.close(fd)


def allocated(path):
    return os.stat(path).st_blocks * 512


def data_runs(path):
    """[(offset, end)] of the file's data (SEEK_DATA/SEEK_HOLE)."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


def assert_sparse_like_source(path, what):
    """path holds data only around the Source's data runs."""
    assert allocated(path) <= DATA_BYTES + SLACK, \
        "{}: {} bytes allocated for {} bytes of data".format(
            what, allocated(path), DATA_BYTES)
    for start, end in data_runs(path):
        assert any(start < o + n + SLACK and o - SLACK < end
                   for o, n in DATA), \
            "{}: data at [{}, {}) where the Source has a hole (data runs " \
            "{})".format(what, start, end, data_runs(path))


def nbd_map(uri):
    """`nbdinfo --map --json`: [(offset, length, is_hole)]."""
    proc = subprocess.run(["nbdinfo", "--map", "--json", uri],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [(e["offset"], e["length"], bool(e["type"] & 1))
            for e in json.loads(proc.stdout)]


def assert_map_shows_holes(uri, what):
    extents = nbd_map(uri)
    assert sum(n for _, n, _ in extents) == SIZE, extents
    data = sum(n for _, n, hole in extents if not hole)
    assert data <= DATA_BYTES + SLACK, \
        "{}: the map shows {} bytes of data for {}: {}".format(
            what, data, DATA_BYTES, extents)
    # The zeroed run and the space between the data runs are holes.
    for offset in (0, ZEROED[0], ZEROED[0] + ZEROED[1] - 1, 12 * MiB):
        assert any(o <= offset < o + n and hole for o, n, hole in extents), \
            "{}: no hole at {} in the map {}".format(what, offset, extents)


def sparse_env(clone_env):
    env = clone_env.setup(size=SIZE, fill=False, serve=False)
    write_source(env.img(env.SOURCE))
    env.start_server()
    return env


def test_sync_leaves_holes_where_the_source_has_them(clone_env):
    env = sparse_env(clone_env)
    env.sync_wait("c1")
    src, clone = env.img(env.SOURCE), env.img("c1")
    assert read_range(clone, 0, SIZE) == read_range(src, 0, SIZE)
    assert_sparse_like_source(clone, "clone after sync")
    env.cli("clone", "fracture", "c1")
    assert_map_shows_holes(env.uri("c1"), "clone export")


def test_restore_and_reverse_sync_bring_the_holes_back(clone_env, tmp_path):
    env = sparse_env(clone_env)
    env.sync_wait("c1")
    env.cli("clone", "fracture", "c1")
    keep = tmp_path / "clone.raw"
    shutil.copyfile(env.img("c1"), keep)
    src = env.img(env.SOURCE)

    # Hosts fill the whole Source with data; the restore must punch the
    # clone's holes into it again, not write zeroes as data.
    env.write_export(env.SOURCE, 0, os.urandom(SIZE))
    assert allocated(src) >= SIZE
    env.cli("clone", "restore", "c1", "--wait", timeout=120)
    assert read_range(src, 0, SIZE) == keep.read_bytes()
    assert_sparse_like_source(src, "Source after restore")
    assert_map_shows_holes(env.uri(env.SOURCE), "Source after restore")

    env.write_export(env.SOURCE, 0, os.urandom(SIZE))
    assert allocated(src) >= SIZE
    env.cli("clone", "reverse-sync", "c1", "--wait", timeout=120)
    assert read_range(src, 0, SIZE) == keep.read_bytes()
    assert_sparse_like_source(src, "Source after reverse sync")


def test_session_transfer_leaves_holes_on_the_destination(session_env):
    env = session_env.setup(size=SIZE, fill=False, serve=False)
    write_source(env.img(env.SOURCE))
    env.cli("lu", "create", "dst", "--size", str(SIZE))
    env.start_server()
    # The destination holds data everywhere before the transfer.
    env.write_export("dst", 0, os.urandom(SIZE))
    dst = env.img("dst")
    assert allocated(dst) >= SIZE
    env.create("s1", env.uri("dst"))
    st = env.update()
    assert st["destinations"][0]["state"] == "consistent", st
    assert read_range(dst, 0, SIZE) == read_range(env.img(env.SOURCE), 0, SIZE)
    assert_sparse_like_source(dst, "session destination")
    last = st["last_transfer"]
    assert last["bytes_sent"] <= DATA_BYTES + SLACK, last
    assert_map_shows_holes(env.uri("dst"), "session destination")
