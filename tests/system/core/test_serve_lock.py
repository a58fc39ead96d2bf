"""While run/serve.lock is held (a server starting, serving or stopping, or
a command working on the directory), a command reaches the state directory
through the running server or not at all: never on its own beside it."""

import contextlib
import json
import fcntl
import os
import subprocess
import time

import pytest

from tests.support.cli import CLONECTL, MiB, snapshot_tree, status_json

from target.server import LOCK_PATIENCE


@contextlib.contextmanager
def serve_lock_held(state_dir):
    """Hold run/serve.lock as a server does from the moment it starts until
    it has removed serve.json at shut-down."""
    run = state_dir / "run"
    run.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(run / "serve.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _spawn(state_dir, *args, env=None):
    full_env = dict(os.environ)
    full_env.pop("CLONECTL_STATE", None)
    full_env.update(env or {})
    return subprocess.Popen([CLONECTL, "--state-dir", str(state_dir)] +
                            [str(a) for a in args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env=full_env)


def _finish(proc, timeout=60):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture
def inventory(clonectl, state_dir):
    """db1 with clone c1 (so a Target runs clone recovery), db2 without."""
    clonectl("lu", "create", "db1", "--size", "4M")
    clonectl("lu", "create", "db2", "--size", "1M")
    clonectl("clone", "add", "db1", "c1")
    assert (state_dir / "lus" / "db2.img").exists()


REFUSED = [
    ("lu", "delete", "db2"),
    ("lu", "create", "db3", "--size", "1M"),
    ("clone", "list"),
    ("clone", "status", "c1"),
    ("clone", "add", "db1", "c2"),
    ("clone", "remove", "c1"),
    ("session", "list"),
    ("rsg", "status"),
    ("rsg", "create", "g", "--volume", "db2", "--srl-size", "1M"),
]


def test_commands_refuse_while_a_server_starts_or_stops(
        inventory, state_dir, tmp_path):
    sock = tmp_path / "s.sock"
    with serve_lock_held(state_dir):
        before = snapshot_tree(state_dir)
        started = time.monotonic()
        procs = [(args, _spawn(state_dir, *args)) for args in
                 REFUSED + [("serve", "--socket", sock)]]
        results = [(args,) + _finish(p) for args, p in procs]
        after = snapshot_tree(state_dir)
        elapsed = time.monotonic() - started
    after.pop("run/serve.log", None)
    before.pop("run/serve.log", None)
    assert after.keys() == before.keys(), set(after) ^ set(before)
    for key in before:
        assert after[key] == before[key], "{} changed".format(key)
    assert (state_dir / "lus" / "db2.img").exists()
    assert not sock.exists()
    for args, rc, out, err in results:
        assert rc == 1, (args, out, err)
        assert "starting or stopping" in err, (args, err)
        assert str(state_dir) in err and "pid {}".format(os.getpid()) in err, \
            (args, err)
        assert "Traceback" not in err, (args, err)
    # They waited for the holder to publish or go away before refusing.
    assert elapsed >= LOCK_PATIENCE


def test_command_acts_once_the_lock_holder_is_gone(inventory, state_dir):
    with serve_lock_held(state_dir):
        delete = _spawn(state_dir, "lu", "delete", "db2")
        listing = _spawn(state_dir, "clone", "list", "--json")
        time.sleep(1.5)
        assert delete.poll() is None and listing.poll() is None, \
            (_finish(delete), _finish(listing))
        assert (state_dir / "lus" / "db2.img").exists()
    rc, out, err = _finish(delete)
    assert rc == 0, err
    assert not (state_dir / "lus" / "db2.img").exists()
    rc, out, err = _finish(listing)
    assert rc == 0, err
    assert '"c1"' in out


def test_serve_waits_for_a_command_holding_the_lock(
        clonectl, state_dir, tmp_path, process_guard, nbd_connect):
    clonectl("lu", "create", "a", "--size", "1M")
    sock = tmp_path / "s.sock"
    with serve_lock_held(state_dir):
        srv = _spawn(state_dir, "serve", "--socket", sock, "--detach")
        time.sleep(1.5)
        assert srv.poll() is None, _finish(srv)
        assert not sock.exists()
    rc, out, err = _finish(srv)
    assert rc == 0, err
    info = status_json(state_dir)["server"]
    process_guard.add(info["pid"])
    process_guard.add(info["nbdkit_pid"])
    assert nbd_connect(str(sock), "a").get_size() == MiB
    clonectl("stop")


def _slow_nbdkit(tmp_path):
    """A directory with an `nbdkit` that marks when the server spawned it and
    starts the real one 2 s later: the server holds run/serve.lock all that
    time, and has not yet written serve.json."""
    real = subprocess.run(["sh", "-c", "command -v nbdkit"], check=True,
                          capture_output=True, text=True).stdout.strip()
    bindir = tmp_path / "slowbin"
    bindir.mkdir()
    mark = tmp_path / "nbdkit-spawned"
    script = bindir / "nbdkit"
    script.write_text("#!/bin/sh\n: > '{}'\nsleep 2\nexec '{}' \"$@\"\n"
                      .format(mark, real))
    script.chmod(0o755)
    return bindir, mark


def _starting(state_dir, tmp_path, *args):
    """`clonectl serve ARGS` with the slow nbdkit, once it has spawned it
    (holding the lock, serve.json not written yet)."""
    bindir, mark = _slow_nbdkit(tmp_path)
    env = {"PATH": "{}:{}".format(bindir, os.environ["PATH"])}
    srv = _spawn(state_dir, "serve", *args, env=env)
    deadline = time.monotonic() + 30
    while not mark.exists():
        assert srv.poll() is None, _finish(srv)
        assert time.monotonic() < deadline, "nbdkit was not spawned"
        time.sleep(0.02)
    assert not (state_dir / "run" / "serve.json").exists()
    return srv


def test_commands_during_server_start_up_go_through_the_server(
        inventory, clonectl, state_dir, tmp_path, process_guard,
        nbd_connect):
    (state_dir / "lus" / "db2.img").write_bytes(b"\x5a" * MiB)
    sock = tmp_path / "s.sock"
    srv = _starting(state_dir, tmp_path, "--socket", sock, "--detach")
    delete = _spawn(state_dir, "lu", "delete", "db2")
    create = _spawn(state_dir, "lu", "create", "db3", "--size", "1M")
    listing = _spawn(state_dir, "clone", "list", "--json")
    rc, out, err = _finish(srv)
    assert rc == 0, err
    info = status_json(state_dir)["server"]
    process_guard.add(info["pid"])
    process_guard.add(info["nbdkit_pid"])
    try:
        rc, out, err = _finish(delete)
        # Through the server, which now runs: it stops exporting db2.
        assert rc == 0 and "deleted LU db2" in out, (out, err)
        assert not (state_dir / "lus" / "db2.img").exists()
        with pytest.raises(Exception):
            nbd_connect(str(sock), "db2")
        rc, out, err = _finish(create)
        assert rc == 0, err
        assert "exported as" in out, out
        assert nbd_connect(str(sock), "db3").get_size() == MiB
        rc, out, err = _finish(listing)
        assert rc == 0 and '"c1"' in out, (out, err)
    finally:
        subprocess.run([CLONECTL, "--state-dir", str(state_dir), "stop"],
                       timeout=60, capture_output=True)


def test_a_stop_during_start_up_stops_the_server(
        inventory, state_dir, tmp_path, process_guard):
    """`clonectl stop` while a server starts (it holds the lock and has not
    published serve.json yet) waits for it, then stops it: it said "no
    server runs" and the server went on to serve."""
    srv = _starting(state_dir, tmp_path, "--socket", tmp_path / "s.sock")
    process_guard.add(srv.pid)
    rc, out, err = _finish(_spawn(state_dir, "stop"))
    assert rc == 0 and "stopped server pid {}".format(srv.pid) in out, \
        (out, err)
    rc, _, err = _finish(srv)
    assert rc == 0, err
    assert status_json(state_dir)["server"] is None


def test_stale_serve_info_is_gone_while_a_new_server_starts(
        inventory, state_dir, tmp_path, process_guard):
    """serve.json left by a killed server names a pid that may belong to
    another process by now: while a new server starts, `stop` must not
    signal it (nor any command take it for the running server)."""
    bystander = subprocess.Popen(["sleep", "60"])
    process_guard.add(bystander.pid)
    run_dir = state_dir / "run"
    (run_dir / "serve.json").write_text(json.dumps(
        {"pid": bystander.pid, "nbdkit_pid": bystander.pid,
         "control_socket": str(run_dir / "control.sock"),
         "uri": "nbd+unix:///EXPORT?socket=/nonexistent"}))
    bindir, mark = _slow_nbdkit(tmp_path)
    env = {"PATH": "{}:{}".format(bindir, os.environ["PATH"])}
    srv = _spawn(state_dir, "serve", "--socket", tmp_path / "s.sock",
                 "--detach", env=env)
    deadline = time.monotonic() + 30
    while not mark.exists():
        assert srv.poll() is None, _finish(srv)
        assert time.monotonic() < deadline, "nbdkit was not spawned"
        time.sleep(0.02)
    stop = subprocess.run([CLONECTL, "--state-dir", str(state_dir), "stop"],
                          timeout=60, capture_output=True, text=True)
    try:
        assert bystander.poll() is None, (stop.stdout, stop.stderr)
    finally:
        rc, out, err = _finish(srv)
        info = status_json(state_dir)["server"]
        if info:
            process_guard.add(info["pid"])
            process_guard.add(info["nbdkit_pid"])
        subprocess.run([CLONECTL, "--state-dir", str(state_dir), "stop"],
                       timeout=60, capture_output=True)
