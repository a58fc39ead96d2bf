"""Another program on the file an LU's bytes live in.

A write that reaches a served LU's (or clone's) file from outside the
target passes no layer: no clone's Delta Map, no session's tracking, no
replication log hears of it, and the clone, the destination or the
secondary stays different under a clean map.  So the target claims the
files it serves: with the byte-range locks QEMU takes on its images (a
qemu, qemu-nbd, qemu-io or `qemu-img convert` writing the file is
refused, as it is for the disk of a running VM), and a block device is
opened exclusively (it cannot be mounted while served, nor served while
mounted).  A file another program holds for writing is neither added
(`lu create --file`, `clone add --file`) nor served, and is served once
that program lets go and the server reloads.
"""

import os
import signal
import subprocess
import time

import pytest

from tests.support.cli import MiB, run_clonectl, status_json
from tests.support.servers import read_file_range
from tests.support.sessionlib import NbdProcess

pytestmark = pytest.mark.usefixtures("process_guard")

PATTERN = bytes([0x5a]) * 65536


def _qemu_io_write(path, byte=0xaa, length="64k"):
    """qemu-io writing path directly, as an admin's tool would."""
    return subprocess.run(
        ["qemu-io", "-f", "raw", "-c",
         "write -P {} 0 {}".format(byte, length), str(path)],
        capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL)


def _qemu_nbd(path, sock, log, guard):
    """qemu-nbd holding path for writing (QEMU's locks on it)."""
    return NbdProcess(["qemu-nbd", "-f", "raw", "-t", "-k", sock, "-x",
                       "vm", path], sock, "vm", log, guard).start()


def _refused_as_in_use(proc):
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "in use by another program" in proc.stderr, proc.stderr


def test_qemu_cannot_write_a_served_lus_file(served_lu, nbd_connect):
    h = nbd_connect(served_lu.server.socket, served_lu.name)
    h.pwrite(PATTERN, 0)
    h.flush()
    proc = _qemu_io_write(served_lu.file)
    assert proc.returncode != 0, \
        "qemu-io wrote the served LU's file behind the target"
    assert 'Failed to get "write" lock' in proc.stderr, proc.stderr
    assert read_file_range(served_lu.file, 0, len(PATTERN)) == PATTERN
    assert h.pread(len(PATTERN), 0) == PATTERN
    resize = subprocess.run(["qemu-img", "resize", "-f", "raw",
                             str(served_lu.file), "+1M"],
                            capture_output=True, text=True, timeout=60)
    assert resize.returncode != 0, "qemu-img resized the served LU's file"


def test_qemu_may_read_a_served_lus_file(served_lu, nbd_connect,
                                         process_guard, tmp_path):
    h = nbd_connect(served_lu.server.socket, served_lu.name)
    h.pwrite(PATTERN, 0)
    h.flush()
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                    str(served_lu.file), served_lu.uri], check=True,
                   capture_output=True, timeout=60)
    sock = "/tmp/claims-ro-{}.sock".format(os.getpid())
    reader = NbdProcess(["qemu-nbd", "-r", "-f", "raw", "-t", "-k", sock,
                         "-x", "ro", served_lu.file], sock, "ro",
                        tmp_path / "qemu-nbd-ro.log", process_guard).start()
    try:
        ro = nbd_connect("nbd+unix:///ro?socket=" + sock)
        assert ro.pread(len(PATTERN), 0) == PATTERN
    finally:
        reader.stop()


def test_qemu_cannot_write_a_clones_file(clonectl, served_lu, state_dir):
    clonectl("clone", "add", served_lu.name, "c1")
    clonectl("clone", "sync", "c1", "--wait")
    clone_file = os.path.join(state_dir, "lus", "c1.img")
    assert os.path.exists(clone_file)
    proc = _qemu_io_write(clone_file)
    assert proc.returncode != 0, \
        "qemu-io wrote a synchronized clone's file behind the target"
    assert 'Failed to get "write" lock' in proc.stderr, proc.stderr


def test_a_file_qemu_writes_is_neither_added_nor_served(
        tmp_path, clonectl, server_factory, process_guard, nbd_connect):
    image = tmp_path / "vm.img"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    sock = "/tmp/claims-{}.sock".format(os.getpid())
    srv = server_factory()
    clonectl("lu", "create", "src", "--size", "16M")
    qemu = _qemu_nbd(image, sock, tmp_path / "qemu-nbd.log", process_guard)
    try:
        _refused_as_in_use(clonectl("lu", "create", "vm", "--file", image,
                                    check=False))
        _refused_as_in_use(clonectl("clone", "add", "src", "c1", "--file",
                                    image, check=False))
    finally:
        qemu.stop()
    # Added while nobody holds it, then qemu-nbd takes it before the
    # target serves it: the LU is reported, not served.
    srv.stop()
    clonectl("lu", "create", "vm", "--file", image)
    qemu = _qemu_nbd(image, sock, tmp_path / "qemu-nbd2.log", process_guard)
    try:
        srv = server_factory()
        st = status_json(srv.state_dir)
        (lu,) = [x for x in st["lus"] if x["name"] == "vm"]
        assert "in use by another program" in (lu.get("error") or ""), lu
        qemu_h = nbd_connect("nbd+unix:///vm?socket=" + sock)
        qemu_h.pwrite(PATTERN, 0)
        qemu_h.flush()
    finally:
        qemu.stop()
    # qemu-nbd let go: a reload serves it.
    os.kill(srv.pid, signal.SIGHUP)
    deadline = time.monotonic() + 30
    while True:
        st = status_json(srv.state_dir)
        (lu,) = [x for x in st["lus"] if x["name"] == "vm"]
        if not lu.get("error"):
            break
        assert time.monotonic() < deadline, lu
        time.sleep(0.1)
    h = nbd_connect(srv.socket, "vm")
    assert h.pread(len(PATTERN), 0) == PATTERN


def test_two_state_directories_cannot_serve_one_file(
        tmp_path, server_factory):
    shared = tmp_path / "shared.img"
    with open(shared, "wb") as f:
        f.truncate(16 * MiB)
    a, b = tmp_path / "a", tmp_path / "b"
    run_clonectl(a, "lu", "create", "x", "--file", shared)
    server_factory(state_dir=a)
    _refused_as_in_use(run_clonectl(b, "lu", "create", "y", "--file",
                                    shared, check=False))


def test_a_block_device_is_claimed_exclusively(loop_device, clonectl,
                                               server_factory):
    # Held exclusively, as a mounted filesystem or device-mapper holds it.
    holder = os.open(loop_device, os.O_RDONLY | os.O_EXCL)
    try:
        _refused_as_in_use(clonectl("lu", "create", "blk", "--file",
                                    loop_device, check=False))
    finally:
        os.close(holder)
    clonectl("lu", "create", "blk", "--file", loop_device)
    server_factory()
    with pytest.raises(OSError) as e:
        os.close(os.open(loop_device, os.O_RDONLY | os.O_EXCL))
    assert e.value.errno == 16     # EBUSY: it could not be mounted either
