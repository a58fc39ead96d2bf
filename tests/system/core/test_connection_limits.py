"""Idle NBD connections cannot exhaust the server: connections are capped
(in total, and per client address), descriptors stay in reserve for the
engines, a connected host keeps writing and flushing, `clonectl status`
answers, and the log does not fill the state disk.

Raw sockets that connect and never complete the NBD handshake are the
idle clients: an admitted one receives nbdkit's greeting (NBDMAGIC), a
refused one is closed before it.
"""

import os
import socket
import subprocess
import time

import pytest

from tests.support.cli import CLONECTL, run_clonectl, status_json
from tests.support.processes import ProcessGuard
from tests.support.servers import serve_log_has, Server, stop_servers

MiB = 1 << 20
GREETING = b"NBDMAGIC"


def fd_count(pid):
    return len(os.listdir("/proc/{}/fd".format(pid)))


def idle_connect(family, address):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(address)
    return s


def greeted(sock, timeout=5.0):
    """True if the server sent its greeting, False if it closed the
    connection before."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(len(GREETING), socket.MSG_WAITALL)
    except (ConnectionResetError, BrokenPipeError):
        return False
    if not data:
        return False
    assert data == GREETING, data
    return True




def timed_status(state_dir):
    t0 = time.monotonic()
    proc = run_clonectl(state_dir, "status", "--json", timeout=30)
    return time.monotonic() - t0, proc


def write_and_flush(h, pattern):
    h.pwrite(pattern, 0)
    h.flush()
    assert h.pread(len(pattern), 0) == pattern


@pytest.fixture
def limited_server(tmp_path):
    """start(extra_args, prefix=()) -> a serving Server, stopped by PID."""
    guard = ProcessGuard()
    servers = []

    def start(extra_args=(), prefix=()):
        state = tmp_path / "state"
        run_clonectl(state, "lu", "create", "disk", "--size", str(4 * MiB))
        srv = Server(state, tmp_path / "nbd.sock", tmp_path / "serve.out",
                     guard, list(extra_args), prefix=prefix)
        servers.append(srv)
        return srv.start()
    yield start
    problems = stop_servers(servers)
    guard.cleanup()
    assert not problems, problems


def test_idle_connections_under_a_low_fd_limit_leave_the_server_working(
        limited_server, nbd_connect):
    """More idle connections than the server has descriptors."""
    srv = limited_server(prefix=["prlimit", "--nofile=256:256", "--"])
    h = nbd_connect(srv.socket, "disk")
    idle = []
    try:
        for _ in range(300):
            try:
                idle.append(idle_connect(socket.AF_UNIX, srv.socket))
            except OSError:
                break       # the backlog is full: also a refusal
        time.sleep(1.0)
        write_and_flush(h, b"\x5a" * 65536)
        took, proc = timed_status(srv.state_dir)
        assert took < 5.0, "status took {:.1f} s".format(took)
        fds = fd_count(srv.nbdkit_pid)
        admitted = sum(greeted(s, 0.5) for s in idle)
    finally:
        for s in idle:
            s.close()
    assert fds < 256 - 32, "nbdkit holds {} descriptors".format(fds)
    assert admitted < len(idle), "every idle connection was admitted"
    log = srv.state_dir / "run" / "serve.log"
    assert log.stat().st_size < 256 << 10, log.read_text()[-3000:]
    # A burst of connections can still run nbdkit out of descriptors for a
    # moment (refusing takes the GIL, accepting does not); the log keeps
    # only a few of its complaints.
    assert log.read_text().count("Too many open files") <= 10
    # Room again once the idle clients are gone.
    time.sleep(0.5)
    h2 = nbd_connect(srv.socket, "disk")
    assert h2.pread(65536, 0) == b"\x5a" * 65536


def test_max_connections_refuses_the_extra_ones(limited_server, nbd_connect):
    nbd = pytest.importorskip("nbd")
    srv = limited_server(["--max-connections", "8"])
    assert status_json(srv.state_dir)["server"]["max_connections"] == 8
    h = nbd_connect(srv.socket, "disk")
    idle = [idle_connect(socket.AF_UNIX, srv.socket) for _ in range(20)]
    try:
        admitted = [greeted(s) for s in idle]
        assert sum(admitted) == 7, admitted
        with pytest.raises(nbd.Error):
            nbd_connect(srv.socket, "disk")
        write_and_flush(h, b"\xa5" * 4096)
        took, _ = timed_status(srv.state_dir)
        assert took < 5.0
        assert fd_count(srv.nbdkit_pid) < 64
    finally:
        for s in idle:
            s.close()
    time.sleep(0.5)
    h2 = nbd_connect(srv.socket, "disk")
    assert h2.pread(4096, 0) == b"\xa5" * 4096
    assert serve_log_has(srv.state_dir, "--max-connections", timeout=5.0)


def _outside_address():
    """An IPv4 address of this host that is not loopback, or None."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True,
                             text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    for a in out:
        if "." in a and not a.startswith("127."):
            return a
    return None


def test_max_connections_per_address(limited_server, tmp_path):
    addr = _outside_address()
    if addr is None:
        pytest.skip("this host has no IPv4 address besides loopback")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = limited_server(["--port", str(port), "--bind", "0.0.0.0",
                          "--max-connections-per-address", "4"])
    outside = [idle_connect(socket.AF_INET, (addr, port)) for _ in range(6)]
    local = [idle_connect(socket.AF_INET, ("127.0.0.1", port))
             for _ in range(6)]
    try:
        # Which ones: the order of nbdkit's connection threads.
        assert sorted(greeted(s) for s in outside) == [False] * 2 + [True] * 4
        # Loopback clients (the iSCSI gateway, local tools) count only
        # against the total.
        assert all(greeted(s) for s in local)
    finally:
        for s in outside + local:
            s.close()
    assert serve_log_has(srv.state_dir, "connections from this address",
                         timeout=5.0)


def test_refusal_flood_does_not_fill_the_log(limited_server):
    srv = limited_server(["--max-connections", "1"])
    held = idle_connect(socket.AF_UNIX, srv.socket)
    try:
        assert greeted(held)
        for _ in range(1000):
            s = idle_connect(socket.AF_UNIX, srv.socket)
            greeted(s)
            s.close()
    finally:
        held.close()
    time.sleep(0.5)
    log = srv.state_dir / "run" / "serve.log"
    text = log.read_text()
    assert log.stat().st_size < 64 << 10, "{} bytes of log:\n{}".format(
        log.stat().st_size, text[-3000:])
    assert serve_log_has(srv.state_dir, "--max-connections", timeout=5.0)
    # What was left out is counted, at the latest when nbdkit stops.
    srv.stop()
    text = log.read_text()
    assert "repeats suppressed over" in text, text[-3000:]
    assert log.stat().st_size < 64 << 10


def test_serve_help_documents_the_limits():
    out = subprocess.run([CLONECTL, "serve", "--help"], capture_output=True,
                         text=True, timeout=30).stdout
    assert "--max-connections" in out and \
        "--max-connections-per-address" in out
