"""Several clones of one Source, fracture under load, odd sizes, a clone
whose backing fills up."""

import os
import subprocess
import time

import pytest

from tests.support.clonelib import (differing_extents, GRANULARITY, KiB, MiB,
                                    qemu_img_compare, read_range)

pytest.importorskip("nbd")


def _fractured_c1_with_changes(env):
    for c in ("c1", "c2"):
        env.sync_wait(c)
    env.cli("clone", "fracture", "c1")
    data = os.urandom(MiB)
    env.write_export("c1", 2 * MiB, data)
    return data


def test_reverse_sync_refused_while_a_sibling_is_mirrored(clone_env):
    """Restoring the Source from c1 would silently change it under c2, a
    synchronized mirror of it: refused until c2 is fractured."""
    env = clone_env.setup(size=8 * MiB, clones=("c1", "c2"))
    _fractured_c1_with_changes(env)
    src = read_range(env.img("src"), 0, env.size)
    c1 = env.status("c1")
    env.refused("clone", "reverse-sync", "c1",
                match=["c2", "synchronized", "fracture"])
    assert env.status("c1")["state"] == "fractured"
    assert env.status("c1")["extents_dirty"] == c1["extents_dirty"]
    st = env.status("c2")
    assert st["state"] == "synchronized" and st["extents_dirty"] == 0, st
    assert read_range(env.img("src"), 0, env.size) == src
    env.assert_identical("src", "c2")


def test_reverse_sync_marks_fractured_sibling_dirty(clone_env):
    env = clone_env.setup(size=8 * MiB, clones=("c1", "c2"))
    data = _fractured_c1_with_changes(env)
    env.cli("clone", "fracture", "c2")
    assert env.status("c2")["extents_dirty"] == 0
    env.cli("clone", "reverse-sync", "c1", "--wait")
    assert read_range(env.img("src"), 2 * MiB, MiB) == data
    env.assert_identical("src", "c1")
    # The restore changed 1 MiB of the Source: c2 now differs there, and
    # its incremental sync must bring exactly those extents over.
    st = env.status("c2")
    assert st["extents_dirty"] == MiB // GRANULARITY, st
    env.sync_wait("c2")
    assert env.status("c2")["operation"]["bytes_copied"] == MiB
    env.assert_identical("src", "c2")


def test_fracture_under_write_load_is_consistent(clone_env):
    """No write is half-mirrored at the fracture: every extent where the
    fractured clone differs from the Source is in its Delta Map, so the
    incremental sync makes them identical again."""
    env = clone_env.setup(size=32 * MiB)
    env.sync_wait("c1")
    load = subprocess.Popen(
        ["fio", "--name=load", "--ioengine=nbd", "--uri=" + env.uri("src"),
         "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=32M",
         "--time_based", "--runtime=3", "--randrepeat=0",
         "--output-format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        env.cli("clone", "fracture", "c1")
        out, err = load.communicate(timeout=60)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    assert load.returncode == 0, out + err  # no host write failed
    st = env.status("c1")
    assert st["state"] == "fractured"
    differ = differing_extents(env.img("src"), env.img("c1"), env.size)
    assert differ, "fio wrote nothing after the fracture?"
    assert len(differ) <= st["extents_dirty"], (len(differ), st)
    env.sync_wait("c1")
    op = env.status("c1")["operation"]
    assert op["bytes_copied"] == st["extents_dirty"] * GRANULARITY
    env.assert_identical("src", "c1")


def test_odd_size_with_partial_last_extent(clone_env):
    """An LU that is not a whole number of extents: the tail is copied both
    ways and is readable through the redirected read path."""
    size = 5 * MiB + 512
    env = clone_env.setup(size=size, granularity="1M")
    st = env.sync_wait("c1")
    assert st["extents_total"] == 6
    env.assert_identical("src", "c1")
    env.cli("clone", "fracture", "c1")
    tail = os.urandom(512)
    env.write_export("c1", size - 512, tail)
    head = os.urandom(4 * KiB)
    env.write_export("c1", 0, head)
    st = env.status("c1")
    assert st["extents_dirty"] == 2, st
    env.cli("clone", "reverse-sync", "c1", "--wait")
    assert read_range(env.img("src"), size - 512, 512) == tail
    assert read_range(env.img("src"), 0, 4 * KiB) == head
    env.assert_identical("src", "c1")
    assert os.path.getsize(env.img("src")) == size


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that size; unmounted at teardown
    (after the servers: request it before clone_env)."""
    mounts = []

    def mount(size):
        mnt = tmp_path / "tmpfs{}".format(len(mounts))
        mnt.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o",
                               "size={}".format(size), "tmpfs", str(mnt)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip("cannot mount a tmpfs here: " + proc.stderr.strip())
        mounts.append(mnt)
        return mnt

    yield mount
    for mnt in mounts:
        for args in (["umount", str(mnt)], ["umount", "-l", str(mnt)]):
            if subprocess.run(args, capture_output=True).returncode == 0:
                break


def test_sync_to_full_clone_fails_cleanly_then_resumes(tmpfs, clone_env,
                                                       nbd_connect):
    """The clone's filesystem fills up mid-sync: the sync fails with a
    message, the clone is out-of-sync, the Source keeps serving; with room
    again the sync completes."""
    small_tmpfs = tmpfs("2M")
    env = clone_env.setup(size=8 * MiB, clones=(), serve=False)
    backing = small_tmpfs / "c1.img"
    subprocess.run(["truncate", "-s", "8M", str(backing)], check=True)
    env.cli("clone", "add", "src", "c1", "--file", backing)
    env.start_server()
    src_data = read_range(env.img("src"), 0, env.size)

    proc = env.cli("clone", "sync", "c1", "--wait", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "no space" in proc.stderr.lower(), proc.stderr
    st = env.status("c1")
    assert st["state"] == "out-of-sync", st
    assert "no space" in (st["error"] or "").lower(), st
    assert 0 < st["extents_dirty"] < st["extents_total"], st
    assert not st["operation"]["running"]

    # The Source is unaffected: reads and writes work.
    h = nbd_connect(env.server.socket, "src")
    assert h.pread(MiB, 0) == src_data[:MiB]
    h.pwrite(b"\x33" * 4096, 7 * MiB)
    h.flush()
    assert read_range(env.img("src"), 7 * MiB, 4096) == b"\x33" * 4096
    h.shutdown()

    subprocess.run(["mount", "-o", "remount,size=16M", str(small_tmpfs)],
                   check=True)
    env.sync_wait("c1")
    same, out = qemu_img_compare(env.img("src"), backing)
    assert same, out


def test_zero_and_trim_are_mirrored_and_tracked(clone_env, nbd_connect):
    """Zero, trim and FUA writes reach a synchronized clone; on a fractured
    clone's export they set its bits like writes do."""
    nbd = pytest.importorskip("nbd")
    env = clone_env.setup(size=8 * MiB)
    env.sync_wait("c1")
    h = nbd_connect(env.server.socket, "src")
    h.zero(MiB, 1 * MiB)
    h.trim(MiB, 3 * MiB)
    h.zero(64 * KiB, 5 * MiB, nbd.CMD_FLAG_FUA)
    h.pwrite(b"\x5f" * 4096, 6 * MiB, nbd.CMD_FLAG_FUA)
    h.flush()
    assert h.pread(MiB, 1 * MiB) == bytes(MiB)
    h.shutdown()
    st = env.status("c1")
    assert st["state"] == "synchronized" and st["extents_dirty"] == 0, st
    env.assert_identical("src", "c1")
    assert read_range(env.img("c1"), 1 * MiB, MiB) == bytes(MiB)
    assert read_range(env.img("c1"), 6 * MiB, 4096) == b"\x5f" * 4096

    env.cli("clone", "fracture", "c1")
    c = nbd_connect(env.server.socket, "c1")
    c.trim(128 * KiB, 7 * MiB)
    c.zero(64 * KiB, 0)
    c.flush()
    c.shutdown()
    assert env.status("c1")["extents_dirty"] == 3
    assert read_range(env.img("c1"), 0, 64 * KiB) == bytes(64 * KiB)
    env.sync_wait("c1")
    assert env.status("c1")["operation"]["bytes_copied"] == 3 * GRANULARITY
    env.assert_identical("src", "c1")


def test_failed_source_write_during_reverse_sync_is_tracked(tmpfs, clone_env,
                                                            nbd_connect):
    nbd = pytest.importorskip("nbd")
    fs = tmpfs("16M")
    source = fs / "src.img"
    subprocess.run(["truncate", "-s", "8M", str(source)], check=True)
    env = clone_env
    env.size = 8 * MiB
    env.cli("lu", "create", "src", "--file", source)
    env.cli("clone", "add", "src", "c1")
    env.start_server()
    env.sync_wait("c1")
    env.cli("clone", "fracture", "c1")
    env.write_export("c1", 0, b"\xab" * (4 * MiB))
    # The Source's filesystem is full: the restore cannot write it.
    vfs = os.statvfs(fs)
    subprocess.run(["fallocate", "-l", str(vfs.f_bavail * vfs.f_frsize),
                    str(fs / "filler")], check=True)
    assert os.statvfs(fs).f_bavail == 0
    proc = env.cli("clone", "reverse-sync", "c1", "--wait", check=False)
    assert proc.returncode == 1 and "no space" in proc.stderr.lower(), \
        proc.stderr
    st = env.status("c1")
    assert st["state"] == "reverse-syncing" and "space" in st["error"], st

    # A host write to an extent that is in sync fails on the Source.
    h = nbd_connect(env.server.socket, "src")
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"\xcd" * 4096, 6 * MiB)
    assert e.value.errno == "ENOSPC"
    h.shutdown()

    os.unlink(fs / "filler")
    env.cli("clone", "reverse-sync", "c1", "--wait")
    assert read_range(source, 0, 4 * MiB) == b"\xab" * (4 * MiB)
    st = env.status("c1")
    assert st["state"] == "synchronized" and st["extents_dirty"] == 0, st
    # Synchronized must mean identical, whatever the failed write left.
    same, out = qemu_img_compare(source, env.img("c1"))
    assert same, out
