"""clonectl as a service: systemd notification (Type=notify), SIGHUP
reload, the configuration file of `serve`, and the log (timestamped lines,
one per operation with its figures, no false errors, one line per refused
client)."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.cli import (CLONECTL, MiB, run_clonectl, snapshot_tree,
                               status_json)
from tests.support.sockets import free_port

from target import server as target_server

nbd = pytest.importorskip("nbd")

ROOT = Path(__file__).resolve().parents[3]
UNIT = ROOT / "packaging" / "clonectl.service"
LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z "
                  r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


def serve_log(state_dir):
    path = Path(state_dir) / "run" / "serve.log"
    return path.read_text(errors="replace") if path.exists() else ""


def wait_log(state_dir, pattern, timeout=10.0):
    """The first match of pattern in run/serve.log, waiting for it (the
    plugin's lines reach the log through the manager)."""
    deadline = time.monotonic() + timeout
    while True:
        m = re.search(pattern, serve_log(state_dir), re.MULTILINE)
        if m:
            return m
        if time.monotonic() > deadline:
            pytest.fail("no {!r} in serve.log:\n{}".format(
                pattern, serve_log(state_dir)[-3000:]))
        time.sleep(0.05)


# ---------------------------------------------------------------- notify

class NotifySocket:
    """What systemd listens on for a Type=notify service."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path if not self.path.startswith("@")
                       else "\0" + self.path[1:])

    def receive(self, timeout=30.0):
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def close(self):
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    ns = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", ns.path)
    yield ns
    ns.close()


def handshake_answers(path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        return target_server.nbd_handshake_answers(s)


def test_ready_is_notified_once_nbd_answers_and_stopping_on_sigterm(
        clonectl, state_dir, tmp_path, notify_socket, process_guard):
    clonectl("lu", "create", "a", "--size", "1M")
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(
        [CLONECTL, "--state-dir", str(state_dir), "serve", "--socket",
         str(sock)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    process_guard.add(proc.pid)
    try:
        msg = notify_socket.receive()
        # Already when READY=1 arrives: the export list is reachable.
        assert handshake_answers(str(sock))
        h = nbd.NBD()
        h.set_export_name("a")
        h.connect_unix(str(sock))
        assert h.get_size() == MiB
        h.shutdown()
        assert msg.get("READY") == "1", msg
        assert "STATUS" in msg and str(sock) in msg["STATUS"], msg
        proc.send_signal(signal.SIGTERM)
        msg = notify_socket.receive()
        assert msg.get("STOPPING") == "1", msg
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_notify_reaches_an_abstract_socket(monkeypatch):
    name = "@clonectl-test-{}".format(os.getpid())
    ns = NotifySocket(name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", name)
        assert target_server.sd_notify("READY=1", "STATUS=x")
        assert ns.receive(5) == {"READY": "1", "STATUS": "x"}
    finally:
        ns.close()
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not target_server.sd_notify("READY=1")


def test_sighup_reloads_without_dropping_clients(
        clonectl, state_dir, tmp_path, notify_socket, server_factory):
    clonectl("lu", "create", "a", "--size", "1M")
    conf = tmp_path / "clonectl.toml"
    conf.write_text("max-connections = 50\n")
    srv = server_factory(extra_args=["--config", str(conf)])
    assert notify_socket.receive()["READY"] == "1"
    h = nbd.NBD()
    h.set_export_name("a")
    h.connect_unix(srv.socket)
    h.pwrite(b"x" * 512, 0)
    # An LU added to the inventory behind the server's back (as a restored
    # state directory would be) is exported after the reload.
    shutil.copy(state_dir / "lus" / "a.img", tmp_path / "b.img")
    doc = json.loads((state_dir / "state.json").read_text())
    record = dict(doc["lus"]["a"], file=str(tmp_path / "b.img"))
    record.pop("clones", None)
    doc["lus"]["b"] = record
    (state_dir / "state.json").write_text(json.dumps(doc))
    conf.write_text("max-connections = 60\nthreads = 4\n")
    os.kill(srv.pid, signal.SIGHUP)
    msg = notify_socket.receive()
    assert msg.get("RELOADING") == "1" and "MONOTONIC_USEC" in msg, msg
    assert notify_socket.receive().get("READY") == "1"
    # The client is still served; the new LU is exported.
    assert h.pread(512, 0) == b"x" * 512
    h.shutdown()
    h2 = nbd.NBD()
    h2.set_export_name("b")
    h2.connect_unix(srv.socket)
    assert h2.get_size() == MiB
    h2.shutdown()
    assert srv.running()
    out = srv.log()
    assert "max-connections applied to new connections" in out, out
    assert "threads changed; restart the server to apply" in out, out
    assert status_json(state_dir)["server"]["max_connections"] == 60


def test_sighup_applies_a_new_allow_list_to_new_clients(
        clonectl, state_dir, tmp_path, notify_socket, server_factory):
    clonectl("lu", "create", "a", "--size", "1M")
    conf = tmp_path / "clonectl.toml"
    conf.write_text('allow = ["127.0.0.2"]\n')
    port = free_port()
    srv = server_factory(extra_args=["--config", str(conf),
                                     "--port", str(port)])
    assert notify_socket.receive()["READY"] == "1"
    h = _client_from("127.0.0.2", port)
    h.pwrite(b"y" * 512, 0)
    with pytest.raises(nbd.Error):
        _client_from("127.0.0.3", port)
    conf.write_text('allow = ["127.0.0.2", "127.0.0.3"]\n')
    os.kill(srv.pid, signal.SIGHUP)
    assert notify_socket.receive().get("RELOADING") == "1"
    assert notify_socket.receive().get("READY") == "1"
    h3 = _client_from("127.0.0.3", port)
    assert h3.pread(512, 0) == b"y" * 512
    h3.shutdown()
    assert h.pread(512, 0) == b"y" * 512      # still connected
    h.shutdown()
    assert status_json(state_dir)["server"]["allow"] == ["127.0.0.2",
                                                         "127.0.0.3"]
    # Back to the old list: 127.0.0.3 is refused again.
    conf.write_text('allow = ["127.0.0.2"]\n')
    os.kill(srv.pid, signal.SIGHUP)
    assert notify_socket.receive().get("RELOADING") == "1"
    assert notify_socket.receive().get("READY") == "1"
    with pytest.raises(nbd.Error):
        _client_from("127.0.0.3", port)
    assert srv.running()


def test_unit_file_passes_systemd_analyze_verify():
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install "
                    "systemd)")
    text = UNIT.read_text()
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID",
                 "KillMode=mixed"):
        assert line in text.splitlines(), line
    proc = subprocess.run(["systemd-analyze", "verify", str(UNIT)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "clonectl.service" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------- config

def test_config_file_values_are_used_and_flags_win(clonectl, state_dir,
                                                   tmp_path, server_factory):
    clonectl("lu", "create", "a", "--size", "1M")
    conf = tmp_path / "clonectl.toml"
    conf.write_text('max-connections = 7\n'
                    'max-connections-per-address = 3\n'
                    'socket = "{}"\n'.format(tmp_path / "from-file.sock"))
    srv = server_factory(extra_args=["--config", str(conf)])
    info = status_json(state_dir)["server"]
    assert info["max_connections"] == 7, info
    assert info["max_connections_per_address"] == 3, info
    # --socket (given by the fixture) wins over the file's socket.
    assert info["socket"] == str(tmp_path / "nbd1.sock"), info
    assert not (tmp_path / "from-file.sock").exists()
    srv.stop()
    srv = server_factory(extra_args=["--config", str(conf),
                                     "--max-connections", "9"])
    info = status_json(state_dir)["server"]
    assert info["max_connections"] == 9, info
    assert info["max_connections_per_address"] == 3, info


def test_config_file_from_the_environment(clonectl, state_dir, tmp_path):
    clonectl("lu", "create", "a", "--size", "1M")
    conf = tmp_path / "clonectl.toml"
    conf.write_text('socket = "{}"\n'.format(tmp_path / "env.sock"))
    proc = run_clonectl(state_dir, "serve", "--detach",
                        env={"CLONECTL_CONFIG": str(conf)})
    try:
        assert str(tmp_path / "env.sock") in proc.stdout, proc.stdout
        assert status_json(state_dir)["server"]["socket"] == \
            str(tmp_path / "env.sock")
    finally:
        run_clonectl(state_dir, "stop")


@pytest.mark.parametrize("text,words", [
    ("max-conections = 5\n", ["unknown key 'max-conections'"]),
    ('port = "10809"\n', ["port must be an integer"]),
    ("port = 70000\n", ["port:", "70000"]),
    ('allow = "10.0.0.0/8"\n', ["allow must be a list of strings"]),
    ('tls-verify-peer = "yes"\n', ["tls-verify-peer must be true or false"]),
    ('thread-model = "fast"\n', ["thread-model:", "fast"]),
    ("port = \n", ["not valid TOML"]),
])
def test_config_file_refuses_unknown_keys_and_wrong_types(
        clonectl, state_dir, tmp_path, text, words):
    clonectl("lu", "create", "a", "--size", "1M")
    conf = tmp_path / "bad.toml"
    conf.write_text(text)
    before = snapshot_tree(state_dir)
    proc = clonectl("serve", "--config", conf, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(conf) in proc.stderr, proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr
    assert snapshot_tree(state_dir) == before


def test_serve_help_documents_the_config_keys():
    out = subprocess.run([CLONECTL, "serve", "--help"], capture_output=True,
                         text=True, timeout=30).stdout
    flat = " ".join(out.split())
    assert "--config FILE" in flat
    assert "CLONECTL_CONFIG" in flat
    for key in ("port,", "allow-export,", "tls-psk,", "replication-port,",
                "max-connections-per-address,", "thread-model,"):
        assert key in flat.replace("- ", "-"), key


# ---------------------------------------------------------------- logs

def test_fresh_start_logs_no_error_and_every_line_is_stamped(
        clonectl, state_dir, server_factory):
    clonectl("lu", "create", "a", "--size", "1M")
    srv = server_factory()
    srv.stop()
    text = serve_log(state_dir)
    assert "starting nbdkit" in text
    # The foreground manager's own lines are there too.
    assert re.search(r"INFO clonectl\.serve: serving on \S+ \(pid {}\)"
                     .format(srv.pid), text), text
    assert "INFO clonectl.serve: stopped" in text, text
    # (The paths hold the test's name, which has "error" in it.)
    assert not re.search(r" (ERROR|WARNING) |error:|traceback", text,
                         re.IGNORECASE), text
    for line in text.splitlines():
        assert LINE.match(line), line


def test_operations_are_logged_with_their_figures(clonectl, state_dir,
                                                  server_factory):
    clonectl("lu", "create", "db1", "--size", "4M")
    server_factory()
    clonectl("clone", "add", "db1", "c1")
    clonectl("clone", "sync", "c1", "--wait")
    wait_log(state_dir, r"INFO clonectl\.clones: sync of clone c1 \(db1\) "
             r"started: 64 extents of 65536 bytes to copy$")
    m = wait_log(state_dir, r"^\S+Z INFO clonectl\.clones: sync of clone c1 "
                 r"\(db1\) completed: (\d+) bytes in [\d.]+ s, (\d+) extents$")
    assert (int(m.group(1)), int(m.group(2))) == (4 * MiB, 64)
    clonectl("clone", "fracture", "c1")
    wait_log(state_dir, r"INFO clonectl\.clones: clone c1 \(db1\) fractured: "
             r"0 extents differ from the source$")
    clonectl("clone", "restore", "c1", "--full", "--wait")
    wait_log(state_dir, r"INFO clonectl\.clones: restore of clone c1 \(db1\) "
             r"started: 64 extents")
    m = wait_log(state_dir, r"INFO clonectl\.clones: restore of clone c1 "
                 r"\(db1\) completed: (\d+) bytes in [\d.]+ s, 64 extents$")
    assert int(m.group(1)) == 4 * MiB


def _client_from(source, port):
    h = nbd.NBD()
    # libnbd cannot choose its source address: connect a socket bound to
    # source and hand it over.
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    h.set_export_name("a")
    h.connect_socket(s.detach())
    return h


@pytest.mark.parametrize("options,refusal", [
    (["--allow", "127.0.0.2"], "client 127.0.0.3 is not in the --allow list"),
    (["--allow-export", "a=127.0.0.2"],
     "client 127.0.0.3 may not open export 'a'"),
    (["--max-connections", "1"],
     "connection from 127.0.0.3 refused: 1 connections, the most allowed"),
])
def test_a_refused_client_is_one_line(clonectl, state_dir, server_factory,
                                      options, refusal):
    clonectl("lu", "create", "a", "--size", "1M")
    port = free_port()
    srv = server_factory(extra_args=["--port", str(port)] + options)
    h = _client_from("127.0.0.2", port)
    assert h.get_size() == MiB
    before = serve_log(state_dir).splitlines()
    with pytest.raises(nbd.Error):
        _client_from("127.0.0.3", port)
    wait_log(state_dir, re.escape(refusal))
    time.sleep(0.5)      # the rest of the message, if any
    new = serve_log(state_dir).splitlines()[len(before):]
    assert len(new) == 1, "\n".join(new)
    assert LINE.match(new[0]) and "Traceback" not in new[0], new[0]
    h.shutdown()
    assert srv.running()
