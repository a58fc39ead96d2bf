"""The guest test can fail: a target that silently drops one write, a
read-only export and a stalled server each end the boot with FAIL or
TIMEOUT and a message saying where."""

import os
import signal
import subprocess
import time

import pytest

from tests.support import guestlib
from tests.support.guestlib import LU_SIZE
from tests.support.processes import terminate_pid

pytestmark = [pytest.mark.guest, pytest.mark.timeout(600)]

MiB = 1 << 20
# Inside the 8 MiB that host-check.sh's fio verify job writes and reads.
DROP_AT = 5 * MiB + 4096

# clonectl's own nbdkit plugin, with the first write that covers DROP_AT
# acknowledged but never stored.  nbdkit's python plugin gives a script no
# __file__, so the real plugin's path is filled in when this is written out.
LOSSY_PLUGIN = '''\
import builtins
import sys
import nbdkit

_PLUGIN = {plugin!r}
with builtins.open(_PLUGIN) as _source:
    exec(compile(_source.read(), _PLUGIN, "exec"))

_clonectl_config = config
_clonectl_pwrite = pwrite
_drop = {{"at": None, "done": False}}


def config(key, value):
    if key == "drop_at":
        _drop["at"] = int(value)
    else:
        _clonectl_config(key, value)


def pwrite(h, buf, offset, flags):
    at = _drop["at"]
    if at is not None and not _drop["done"] and offset <= at < offset + len(buf):
        _drop["done"] = True
        sys.stderr.write("LOSSY: dropped write of {{}} bytes at {{}}\\n".format(
            len(buf), offset))
        sys.stderr.flush()
        return
    _clonectl_pwrite(h, buf, offset, flags)
'''


@pytest.fixture
def lossy_target(clonectl, state_dir, tmp_path, process_guard):
    """nbdkit serving LU "src" through the lossy plugin on a Unix socket;
    yields (socket path, log path).  Stopped by PID."""
    clonectl("lu", "create", "src", "--size", LU_SIZE)
    plugin = tmp_path / "lossy_plugin.py"
    plugin.write_text(LOSSY_PLUGIN.format(
        plugin=str(guestlib.REPO / "plugins" / "clonectl_plugin.py")))
    sock = tmp_path / "lossy.sock"
    log = tmp_path / "lossy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["nbdkit", "--foreground", "--unix", str(sock), "python",
             str(plugin), "statedir=" + str(state_dir),
             "pythonpath=" + str(guestlib.REPO),
             "drop_at={}".format(DROP_AT)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    process_guard.add(proc.pid)
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    yield sock, log
    terminate_pid(proc.pid)
    proc.wait(10)


def test_a_dropped_write_fails_fio_verify(guest, lossy_target, tmp_path,  # noqa: F811
                                         process_guard):
    sock, log = lossy_target
    result = guestlib.boot(guest, tmp_path, "check-disk", "lossy",
                           disks=[guestlib.NbdDisk(sock, "src")],
                           guard=process_guard)
    print(result)
    assert "LOSSY: dropped write" in log.read_text(), log.read_text()
    assert result.status == "FAIL", result.explain()
    assert "CLONECTL-CHECK FAIL fio-verify" in result.message, result.explain()
    assert "verify: " in result.message, result.explain()


def test_a_read_only_export_fails_on_dev_nbd0(guest, clonectl,  # noqa: F811
                                             server_factory, tmp_path,
                                             process_guard):
    clonectl("lu", "create", "golden", "--size", LU_SIZE, "--read-only")
    port = guestlib.free_tcp_port()
    server_factory(extra_args=["--port", str(port), "--bind", "127.0.0.1"])
    result = guestlib.boot(guest, tmp_path, "check-nbd", "readonly",
                           nbd_port=port, export="golden",
                           guard=process_guard)
    print(result)
    assert result.status == "FAIL", result.explain()
    assert "CLONECTL-CHECK FAIL fio-verify" in result.message, result.explain()
    assert "Operation not permitted" in result.message, result.explain()


def test_a_read_only_export_cannot_back_a_writable_vm_disk(
        guest, clonectl, server_factory, tmp_path, process_guard):  # noqa: F811
    clonectl("lu", "create", "golden", "--size", LU_SIZE, "--read-only")
    srv = server_factory()
    result = guestlib.boot(guest, tmp_path, "check-disk", "readonlydisk",
                           disks=[guestlib.NbdDisk(srv.socket, "golden")],
                           guard=process_guard)
    print(result, result.lines[-1:])
    assert result.status == "EXIT", result.explain()
    assert "read-only" in result.console.lower() \
        or "read only" in result.console.lower(), result.explain()


STALL_IDLE_TIMEOUT = 20.0


def test_a_stalled_server_times_out_at_the_step_it_stalled(
        guest, clonectl, server_factory, tmp_path, process_guard):  # noqa: F811
    clonectl("lu", "create", "src", "--size", LU_SIZE)
    srv = server_factory()
    vm = guestlib.GuestVM(guest, tmp_path, "check-disk", "stall",
                          disks=[guestlib.NbdDisk(srv.socket, "src")],
                          guard=process_guard)
    stopped = False
    try:
        with vm:
            reached = vm.wait(r"CLONECTL-CHECK STEP fio-verify|"
                              r"CLONECTL-GUEST (PASS|FAIL)")
            assert reached.status == "MATCH" and "STEP" in reached.message, \
                reached.explain()
            os.kill(srv.nbdkit_pid, signal.SIGSTOP)
            stopped = True
            result = vm.wait(idle_timeout=STALL_IDLE_TIMEOUT)
    finally:
        if stopped:
            os.kill(srv.nbdkit_pid, signal.SIGCONT)
    print(result)
    assert result.status == "TIMEOUT", result.explain()
    assert "no console output for 20 s" in result.message, result.message
    assert "STEP fio-verify" in result.message, result.message
