"""Starting, stopping, supervising and killing `clonectl serve`."""

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from tests.support.cli import MiB, run_clonectl, snapshot_tree, status_json
from tests.support.processes import pid_alive, wait_pid_gone
from tests.support.servers import read_file_range

from target.inventory import StateDir

nbd = pytest.importorskip("nbd")


def _socket_answers(path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def _wait(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail("timed out after {} s waiting for {}".format(timeout, what))


# ---------------------------------------------------------------- foreground

def test_sigterm_stops_cleanly(clonectl, server_factory, state_dir):
    clonectl("lu", "create", "a", "--size", "1M")
    srv = server_factory()
    sock, nbdkit_pid = srv.socket, srv.nbdkit_pid
    assert pid_alive(nbdkit_pid)
    assert _socket_answers(sock)
    status, obeyed, left = srv.stop()
    assert obeyed and left == []
    assert status == 0, srv.log()
    assert "stopped" in srv.log()
    assert not os.path.exists(sock), "the NBD socket must be removed"
    assert not (state_dir / "run" / "serve.json").exists()
    assert not os.path.exists(srv.info["control_socket"])
    assert status_json(state_dir)["server"] is None


def test_sigint_stops_cleanly(clonectl, server_factory, state_dir):
    clonectl("lu", "create", "a", "--size", "1M")
    srv = server_factory()
    srv.proc.send_signal(signal.SIGINT)
    assert srv.proc.wait(30) == 0, srv.log()
    assert wait_pid_gone(srv.nbdkit_pid, 10)
    assert not os.path.exists(srv.socket)


def test_serve_without_lus_then_create(server, nbd_connect, state_dir):
    assert status_json(state_dir)["lus"] == []
    with pytest.raises(nbd.Error):
        nbd_connect(server.socket, "first")
    run_clonectl(state_dir, "lu", "create", "first", "--size", "1M")
    assert nbd_connect(server.socket, "first").get_size() == MiB


def test_long_socket_path_is_mapped(clonectl, server_factory, tmp_path,
                                    nbd_connect):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    wanted = deep / "nbd.sock"
    assert len(str(wanted)) > 107
    clonectl("lu", "create", "a", "--size", "1M")
    srv = server_factory(socket=wanted)
    assert srv.socket != str(wanted)
    assert len(srv.socket.encode()) <= 107
    assert nbd_connect(srv.socket, "a").get_size() == MiB
    assert srv.info["uri"] == "nbd+unix:///EXPORT?socket=" + srv.socket


# ---------------------------------------------------------------- delete

def test_delete_refused_while_served(clonectl, server_factory, state_dir,
                                     nbd_connect):
    clonectl("lu", "create", "a", "--size", "1M")
    srv = server_factory()
    h = nbd_connect(srv.socket, "a")
    h.pwrite(b"still here", 0)
    h.flush()
    before = (state_dir / "state.json").read_bytes()
    proc = clonectl("lu", "delete", "a", check=False)
    assert proc.returncode == 1
    assert "cannot be deleted" in proc.stderr
    assert "host connection" in proc.stderr
    assert (state_dir / "state.json").read_bytes() == before
    assert (state_dir / "lus" / "a.img").exists()
    assert h.pread(10, 0) == b"still here"
    h.shutdown()
    # Once the host is gone it is deleted while the server runs on.
    clonectl("lu", "delete", "a")
    assert srv.running(), srv.log()
    assert not (state_dir / "lus" / "a.img").exists()
    assert json.loads((state_dir / "state.json").read_text())["lus"] == {}


# ---------------------------------------------------------------- detach

@pytest.fixture
def detached(clonectl, state_dir, tmp_path, process_guard):
    """Start `serve --detach --pidfile`; the daemon is killed at teardown
    if the test did not stop it."""
    started = []

    def start(*extra):
        sock = tmp_path / "det.sock"
        pidfile = tmp_path / "serve.pid"
        proc = clonectl("serve", "--socket", sock, "--detach", "--pidfile",
                        pidfile, *extra, timeout=60)
        info = status_json(state_dir)["server"]
        assert info is not None, proc.stderr
        process_guard.add(info["pid"])
        process_guard.add(info["nbdkit_pid"])
        started.append(info)
        return proc, info, sock, pidfile

    yield start
    for info in started:
        if pid_alive(info["pid"]):
            run_clonectl(state_dir, "stop", check=False)


def test_detach_pidfile_and_stop(clonectl, detached, state_dir, nbd_connect):
    clonectl("lu", "create", "a", "--size", "1M")
    proc, info, sock, pidfile = detached()
    assert "serving on {}".format(sock) in proc.stdout
    # It returned only once clients can connect.
    h = nbd_connect(info["socket"], "a")
    h.pwrite(b"detached", 0)
    h.flush()
    pid = int(pidfile.read_text().strip())
    assert pid == info["pid"]
    assert pid_alive(pid) and pid_alive(info["nbdkit_pid"])
    assert "pid {}".format(pid) in proc.stdout
    h.shutdown()
    out = clonectl("stop").stdout
    assert "stopped server pid {}".format(pid) in out
    assert wait_pid_gone(pid, 10)
    assert wait_pid_gone(info["nbdkit_pid"], 10)
    assert not pidfile.exists()
    assert not sock.exists()
    assert not os.path.exists(info["control_socket"])
    assert status_json(state_dir)["server"] is None
    assert read_file_range(state_dir / "lus" / "a.img", 0, 8) == b"detached"
    proc = clonectl("stop", check=False)
    assert proc.returncode == 0 and "no server runs" in proc.stdout


@pytest.mark.parametrize("mode", [[], ["--detach"]],
                         ids=["foreground", "detach"])
def test_second_serve_refused(clonectl, detached, state_dir, tmp_path,
                              nbd_connect, mode):
    clonectl("lu", "create", "a", "--size", "1M")
    _, info, sock, _ = detached()
    proc = clonectl("serve", "--socket", tmp_path / "second.sock", *mode,
                    check=False, timeout=60)
    assert proc.returncode == 1
    assert "already runs" in proc.stderr, proc.stderr
    assert str(state_dir) in proc.stderr
    assert "pid {}".format(info["pid"]) in proc.stderr
    assert not (tmp_path / "second.sock").exists()
    assert pid_alive(info["pid"]) and pid_alive(info["nbdkit_pid"])
    # The running server still serves its clients.
    assert nbd_connect(str(sock), "a").get_size() == MiB


def test_refused_second_serve_leaves_running_server_intact(
        clonectl, detached, state_dir, nbd_connect):
    clonectl("lu", "create", "a", "--size", "1M")
    _, info, sock, pidfile = detached()
    before = snapshot_tree(state_dir / "run")
    before.pop("serve.log")
    proc = clonectl("serve", "--socket", sock, check=False, timeout=60)
    assert proc.returncode == 1 and "already runs" in proc.stderr
    after = snapshot_tree(state_dir / "run")
    after.pop("serve.log")
    assert after == before
    assert sock.exists()
    assert status_json(state_dir)["server"] is not None
    assert nbd_connect(str(sock), "a").get_size() == MiB
    proc = clonectl("lu", "delete", "a", check=False)
    assert proc.returncode == 1, "delete must still be refused"


def test_serve_on_socket_of_another_server(clonectl, detached, tmp_path,
                                           nbd_connect):
    clonectl("lu", "create", "a", "--size", "1M")
    _, info, sock, _ = detached()
    other = tmp_path / "other-state"
    run_clonectl(other, "lu", "create", "b", "--size", "1M")
    proc = run_clonectl(other, "serve", "--socket", sock, check=False,
                        timeout=60)
    assert proc.returncode == 1
    assert "in use by another server" in proc.stderr
    assert sock.exists(), "the first server's socket was removed"
    assert nbd_connect(str(sock), "a").get_size() == MiB


def _not_a_socket(kind, state_dir, tmp_path):
    """A path holding something other than a socket, and its content."""
    if kind == "file":
        path = tmp_path / "precious"
        path.write_bytes(b"not a socket\n" * 100)
    elif kind == "state.json":
        path = state_dir / "state.json"
    elif kind == "image":
        path = state_dir / "lus" / "a.img"
        path.write_bytes(b"\x5a" * MiB)
    elif kind == "directory":
        path = tmp_path / "dir"
        path.mkdir()
        (path / "inside").write_bytes(b"kept")
    else:
        (tmp_path / "target").write_bytes(b"pointed to")
        path = tmp_path / "link"
        path.symlink_to(tmp_path / "target")
    return path


@pytest.mark.parametrize("kind", ["file", "state.json", "image", "directory",
                                  "symlink"])
@pytest.mark.parametrize("detach", [False, True])
def test_serve_socket_path_that_is_not_a_socket_is_left_alone(
        clonectl, state_dir, tmp_path, kind, detach, process_guard):
    clonectl("lu", "create", "a", "--size", "1M")
    path = _not_a_socket(kind, state_dir, tmp_path)
    before = snapshot_tree(tmp_path)
    # A server that starts anyway serves until killed: a short timeout.
    proc = clonectl("serve", "--socket", path,
                    *(["--detach"] if detach else []), check=False,
                    timeout=20)
    info = status_json(state_dir)["server"]
    if info is not None:
        process_guard.add(info["pid"])
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "is not a socket" in proc.stderr and str(path) in proc.stderr, \
        proc.stderr
    assert "Traceback" not in proc.stderr
    after = snapshot_tree(tmp_path)
    for snap in (before, after):
        snap.pop("state/run/serve.log", None)
    assert after == before
    assert status_json(state_dir)["server"] is None


def test_control_socket_path_that_is_not_a_socket_is_left_alone(
        clonectl, state_dir, tmp_path):
    """The control socket's path is derived, not given, but the same rule
    holds: only a stale socket there is replaced."""
    clonectl("lu", "create", "a", "--size", "1M")
    control_path = StateDir(str(state_dir)).control_socket
    with open(control_path, "wb") as f:
        f.write(b"precious")
    proc = clonectl("serve", "--socket", tmp_path / "s.sock", check=False,
                    timeout=20)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "is not a socket" in proc.stderr, proc.stderr
    with open(control_path, "rb") as f:
        assert f.read() == b"precious"
    assert not (tmp_path / "s.sock").exists()
    os.unlink(control_path)


def test_stale_socket_is_replaced(clonectl, server_factory, tmp_path,
                                  nbd_connect):
    clonectl("lu", "create", "a", "--size", "1M")
    sock = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(sock))   # bound, never listening: nothing answers
    assert sock.is_socket()
    srv = server_factory(socket=sock)
    assert nbd_connect(srv.socket, "a").get_size() == MiB


# ---------------------------------------------------------------- kill -9

def test_kill_manager_takes_nbdkit_along(clonectl, server_factory, state_dir,
                                         nbd_connect, tmp_path):
    clonectl("lu", "create", "a", "--size", "1M")
    sock = tmp_path / "k.sock"
    srv = server_factory(socket=sock)
    h = nbd_connect(srv.socket, "a")
    h.pwrite(b"before kill", 0, nbd.CMD_FLAG_FUA)
    h.shutdown()
    nbdkit_pid = srv.nbdkit_pid
    srv.proc.kill()
    srv.proc.wait(10)
    assert wait_pid_gone(nbdkit_pid, 15), "nbdkit outlived its manager"
    # The server is gone for the CLI (its lock died with it)...
    assert status_json(state_dir)["server"] is None
    # ...and a new server on the same socket path starts (stale socket).
    srv2 = server_factory(socket=sock)
    assert srv2.socket == srv.socket
    h2 = nbd_connect(srv2.socket, "a")
    assert h2.pread(11, 0) == b"before kill"


def test_kill_nbdkit_is_restarted(clonectl, server_factory, state_dir,
                                  nbd_connect):
    clonectl("lu", "create", "a", "--size", "8M")
    srv = server_factory()
    h = nbd_connect(srv.socket, "a")
    data = os.urandom(MiB)
    h.pwrite(data, 3 * MiB + 7)
    h.flush()
    h.pwrite(b"fua", 100, nbd.CMD_FLAG_FUA)
    old = srv.nbdkit_pid
    os.kill(old, signal.SIGKILL)
    assert wait_pid_gone(old, 10)

    def restarted():
        info = status_json(state_dir)["server"]
        return info if info and info["nbdkit_pid"] != old and \
            pid_alive(info["nbdkit_pid"]) else None

    info = _wait(restarted, 30, "nbdkit to be restarted")
    srv.refresh()
    assert info["pid"] == srv.pid, "the manager itself survived"
    assert srv.running()
    with pytest.raises(nbd.Error):
        h.pread(512, 0)  # the old connection died with nbdkit
    h2 = nbd_connect(srv.socket, "a")
    assert h2.pread(MiB, 3 * MiB + 7) == data
    assert h2.pread(3, 100) == b"fua"
    h2.pwrite(b"after", 0)
    assert h2.pread(5, 0) == b"after"
    assert "restarting" in srv.log()
    h2.shutdown()
    # And it still stops cleanly (teardown checks nbdkit is gone too).
    status, obeyed, left = srv.stop()
    assert (status, obeyed, left) == (0, True, [])


def test_restart_leaves_a_socket_path_that_is_no_longer_a_socket(
        clonectl, server_factory, state_dir):
    """nbdkit died and something else now sits at the socket path: the
    manager gives up rather than remove it."""
    clonectl("lu", "create", "a", "--size", "1M")
    srv = server_factory()
    os.unlink(srv.socket)
    with open(srv.socket, "wb") as f:
        f.write(b"precious")
    old = srv.nbdkit_pid
    os.kill(old, signal.SIGKILL)
    assert srv.proc.wait(30) == 1, srv.log()
    assert "is not a socket" in srv.log()
    with open(srv.socket, "rb") as f:
        assert f.read() == b"precious"
    assert status_json(state_dir)["server"] is None
    os.unlink(srv.socket)


# ---------------------------------------------------------------- clients

@pytest.mark.slow
def test_stop_with_connected_client(clonectl, server_factory, state_dir,
                                    nbd_connect):
    clonectl("lu", "create", "a", "--size", "1M")
    srv = server_factory()
    h = nbd_connect(srv.socket, "a")
    h.pwrite(b"flushed", 0)
    h.flush()
    srv.proc.send_signal(signal.SIGTERM)
    try:
        srv.proc.wait(25)
    except subprocess.TimeoutExpired:
        pytest.fail("the server did not stop within 25 s of SIGTERM while "
                    "a client was connected")
    assert wait_pid_gone(srv.nbdkit_pid, 5)
    assert read_file_range(state_dir / "lus" / "a.img", 0, 7) == b"flushed"


def test_kill_manager_with_connected_client(clonectl, server_factory,
                                            state_dir, nbd_connect, tmp_path):
    clonectl("lu", "create", "a", "--size", "1M")
    sock = tmp_path / "k.sock"
    srv = server_factory(socket=sock)
    h = nbd_connect(srv.socket, "a")
    h.pwrite(b"acked", 0, nbd.CMD_FLAG_FUA)
    nbdkit_pid = srv.nbdkit_pid
    srv.proc.kill()
    srv.proc.wait(10)
    try:
        assert wait_pid_gone(nbdkit_pid, 10), \
            "nbdkit outlived its manager by 10 s"
        srv2 = server_factory(socket=sock, timeout=20)
        assert nbd_connect(srv2.socket, "a").pread(5, 0) == b"acked"
    finally:
        h.shutdown()  # lets a lingering nbdkit exit


# ---------------------------------------------------------------- more serving

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_tcp_port(clonectl, state_dir, process_guard, nbd_connect):
    clonectl("lu", "create", "a", "--size", "1M")
    port = _free_port()
    proc = clonectl("serve", "--port", port, "--detach", timeout=60)
    info = status_json(state_dir)["server"]
    process_guard.add(info["pid"])
    process_guard.add(info["nbdkit_pid"])
    try:
        assert "127.0.0.1:{}".format(port) in proc.stdout
        assert info["socket"] is None and info["port"] == port
        assert info["bind"] == "127.0.0.1"
        uri = "nbd://127.0.0.1:{}/a".format(port)
        assert info["uri"] == "nbd://127.0.0.1:{}/EXPORT".format(port)
        h = nbd_connect(uri)
        h.pwrite(b"tcp", 0)
        assert h.pread(3, 0) == b"tcp"
        h.shutdown()
        text = clonectl("status").stdout
        assert "127.0.0.1:{}".format(port) in text
    finally:
        clonectl("stop", check=False)
    assert wait_pid_gone(info["pid"], 10)
    assert read_file_range(state_dir / "lus" / "a.img", 0, 3) == b"tcp"


@pytest.mark.parametrize("mode", [[], ["--detach"]],
                         ids=["foreground", "detach"])
def test_serve_fails_to_listen(clonectl, state_dir, tmp_path, mode):
    clonectl("lu", "create", "a", "--size", "1M")
    bad = tmp_path / "no-such-dir" / "x.sock"
    proc = clonectl("serve", "--socket", bad, *mode, check=False, timeout=60)
    assert proc.returncode == 1
    assert "did not start" in proc.stderr
    assert str(bad) in proc.stderr, "nbdkit's reason is shown"
    assert "Traceback" not in proc.stderr
    assert status_json(state_dir)["server"] is None
    assert not (state_dir / "run" / "serve.json").exists()
    assert not (state_dir / "run" / "nbdkit.pid").exists()


def test_detach_failure_message_not_doubled(clonectl, tmp_path):
    clonectl("lu", "create", "a", "--size", "1M")
    proc = clonectl("serve", "--socket", tmp_path / "nodir" / "x.sock",
                    "--detach", check=False, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.count("did not start") == 1, proc.stderr


def test_status_text_while_serving(clonectl, server_factory, nbd_connect,
                                   state_dir):
    clonectl("lu", "create", "a", "--size", "1M")
    clonectl("lu", "create", "r", "--size", "2M", "--read-only")
    srv = server_factory()
    nbd_connect(srv.socket, "a")
    lines = clonectl("status").stdout.splitlines()
    assert lines[0].startswith("server: pid {}, listening on {}, started "
                               .format(srv.pid, srv.socket)), lines[0]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["a"][1:5] == ["1MiB", "rw", "yes", "1"]
    assert rows["r"][1:5] == ["2MiB", "ro", "yes", "0"]
    listed = json.loads(clonectl("lu", "list", "--json").stdout)
    assert [(r["name"], r["served"], r["connections"]) for r in listed] == \
        [("a", True, 1), ("r", True, 0)]
    assert listed[0]["uri"] == srv.uri("a")
