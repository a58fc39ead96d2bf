"""A real Linux guest kernel uses clonectl exports: as a VM disk (QEMU's NBD
client) and as /dev/nbd0 (the kernel's nbd driver), then on a clone:
fracture and protected restore under a mounted filesystem; a marked
session's frozen export mounts clean.  See guestlib's
docstring for what is deliberately left out."""

import hashlib
import json
import shutil
import subprocess
import time

import pytest

from tests.support import guestlib
from tests.support.guestlib import LU_SIZE
from tests.support.cli import run_clonectl
from tests.support.processes import ProcessGuard
from tests.support.servers import Server, stop_servers

pytestmark = [pytest.mark.guest, pytest.mark.timeout(900)]

def file_md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def assert_target_agrees(image, token, result):
    """The backing file passes target-check.sh and holds exactly the files
    the guest wrote."""
    ok, out, on_target = guestlib.target_check(image, token)
    assert ok, "target-check of {} failed:\n{}".format(image, out)
    in_guest = result.manifest()
    assert in_guest, "the guest printed no MANIFEST:\n" + result.explain()
    assert on_target == in_guest


class CheckedSource:
    """An LU "src" on a server (Unix socket) that a disk-mode guest boot
    has written, and that boot's result."""

    def __init__(self, server, result, token):
        self.server = server
        self.result = result
        self.token = token
        self.image = server.state_dir / "lus" / "src.img"


@pytest.fixture(scope="module")
def checked_source(guest, tmp_path_factory):
    """One disk-mode boot shared by the disk-mode test and the clone
    scenario (a boot costs ~30 s under TCG)."""
    base = tmp_path_factory.mktemp("guest-disk")
    guard = ProcessGuard()
    srv = Server(base / "state", base / "nbd.sock", base / "serve.out", guard)
    run_clonectl(srv.state_dir, "lu", "create", "src", "--size", LU_SIZE)
    try:
        srv.start()
        token = "disk{}".format(int(time.time()))
        result = guestlib.boot(guest, base, "check-disk", token,
                               disks=[guestlib.NbdDisk(srv.socket, "src")],
                               guard=guard)
        yield CheckedSource(srv, result, token)
    finally:
        problems = stop_servers([srv])
        guard.cleanup()
        assert not problems, problems


def test_vm_disk_backed_by_qemu_nbd_client(checked_source, tmp_path):
    result = checked_source.result
    assert result.passed, result.explain()
    assert result.steps()[-1] == "marker", result.steps()
    assert_target_agrees(checked_source.image, checked_source.token, result)

    # The host-side check can fail: a copy with one file block or the
    # marker overwritten must be refused.
    bad_file = tmp_path / "bad-file.img"
    shutil.copy(checked_source.image, bad_file)
    blocks = subprocess.run(
        ["debugfs", "-R", "blocks /clonectl/file6", str(bad_file)],
        capture_output=True, text=True, check=True).stdout.split()
    with open(bad_file, "r+b") as f:
        f.seek(int(blocks[0]) * 4096)
        f.write(b"\xa5" * 4096)
    ok, out, _ = guestlib.target_check(bad_file, checked_source.token)
    assert not ok and "FAIL manifest: clonectl/file6" in out, out

    bad_marker = tmp_path / "bad-marker.img"
    shutil.copy(checked_source.image, bad_marker)
    with open(bad_marker, "r+b") as f:
        f.seek(-(1 << 20), 2)
        f.write(b"\0" * 4096)
    ok, out, _ = guestlib.target_check(bad_marker, checked_source.token)
    assert not ok and "FAIL marker" in out, out


def test_dev_nbd0_through_the_guest_kernel_nbd_driver(guest, clonectl,
                                                     server_factory,
                                                     process_guard, tmp_path,
                                                     state_dir):
    clonectl("lu", "create", "hostdisk", "--size", LU_SIZE)
    port = guestlib.free_tcp_port()
    server_factory(extra_args=["--port", str(port), "--bind", "127.0.0.1"])
    token = "nbd{}".format(int(time.time()))
    result = guestlib.boot(guest, tmp_path, "check-nbd", token,
                           nbd_port=port, export="hostdisk",
                           guard=process_guard)
    assert result.passed, result.explain()
    assert "CLONECTL-ATTACH /dev/nbd0 = 10.0.2.2:{}/hostdisk".format(port) \
        in result.console
    assert_target_agrees(state_dir / "lus" / "hostdisk.img", token, result)


def clone_status(state_dir, name):
    return json.loads(run_clonectl(state_dir, "clone", "status", name,
                                   "--json").stdout)


def test_clone_fracture_then_protected_restore_under_mounted_source(
        guest, checked_source, tmp_path):
    """The filesystem the disk-mode boot made on the Source survives sync +
    fracture; a second boot mounts the fractured clone (its own export,
    read-only) and finds it clean, rewrites the Source's files, mounts the
    Source read-only, and after the host starts a protected restore sees
    the clone's files on the still-mounted Source."""
    assert checked_source.result.passed, checked_source.result.explain()
    srv = checked_source.server
    state = srv.state_dir
    run_clonectl(state, "clone", "add", "src", "cl")
    run_clonectl(state, "clone", "sync", "cl", "--wait", timeout=120)
    run_clonectl(state, "clone", "fracture", "cl")
    clone_file = clone_status(state, "cl")["file"]
    clone_md5 = file_md5(clone_file)

    vm = guestlib.GuestVM(guest, tmp_path, "restore", "restore1",
                          disks=[guestlib.NbdDisk(srv.socket, "src"),
                                 guestlib.NbdDisk(srv.socket, "cl",
                                                  read_only=True)],
                          guard=srv.guard)
    with vm:
        waiting = vm.wait(r"CLONECTL-GUEST (WAIT restore|PASS|FAIL)")
        assert waiting.status == "MATCH" and "WAIT" in waiting.message, \
            waiting.explain()
        started = run_clonectl(state, "clone", "restore", "cl")
        assert "protected restore started" in started.stdout
        vm.send("go")
        result = vm.wait()
    assert result.passed, result.explain()
    steps = result.steps()
    assert steps[:3] == ["mount-ro", "checksum", "e2fsck"], steps

    deadline = time.monotonic() + 120
    while clone_status(state, "cl")["state"] != "fractured":
        assert time.monotonic() < deadline, clone_status(state, "cl")
        time.sleep(0.2)
    # The Source is the clone's point in time again, the clone untouched.
    assert_target_agrees(checked_source.image, checked_source.token,
                         checked_source.result)
    assert file_md5(clone_file) == clone_md5


def test_marked_session_frozen_export_mounts_clean(guest, checked_source,
                                                   tmp_path):
    """A session marked with --export freezes the Source: after the host
    overwrites the Source's filesystem, a guest still mounts the frozen
    export (read-only) and finds the files and e2fsck clean; the transfer
    then gives the destination exactly that filesystem."""
    assert checked_source.result.passed, checked_source.result.explain()
    srv = checked_source.server
    state = srv.state_dir
    copy = tmp_path / "src2.img"
    shutil.copy(checked_source.image, copy)
    run_clonectl(state, "lu", "create", "src2", "--file", copy)
    run_clonectl(state, "lu", "create", "dst2", "--size", LU_SIZE)
    run_clonectl(state, "session", "create", "src2", "s1", "--dest",
                 srv.uri("dst2"))
    run_clonectl(state, "session", "mark", "s1", "--export")
    # After the mark the Source's filesystem is destroyed.
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0xff 0 16M",
                    srv.uri("src2")], check=True, capture_output=True,
                   timeout=60)
    result = guestlib.boot(guest, tmp_path, "verify-disk",
                           checked_source.token,
                           disks=[guestlib.NbdDisk(srv.socket, "src2@s1",
                                                   read_only=True)],
                           guard=srv.guard)
    assert result.passed, result.explain()
    run_clonectl(state, "session", "transfer", "s1", "--wait", timeout=120)
    assert_target_agrees(state / "lus" / "dst2.img", checked_source.token,
                         checked_source.result)
