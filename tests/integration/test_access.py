"""Access: NBD over TCP with TLS (pre-shared keys) required, so a client
without the key gets nothing, not even the export list; the control socket
is the owner's only (tests/unit/test_control.py checks its mode)."""

import os
import socket
import stat
import subprocess
import time

import pytest

from conftest import CLONECTL, MiB, run_clonectl, status_json, terminate_pid

nbd = pytest.importorskip("nbd")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def psk_file(tmp_path):
    path = tmp_path / "keys.psk"
    path.write_text("alice:" + os.urandom(32).hex() + "\n")
    path.chmod(0o600)
    return path


def _tls_client(port, psk, user="alice"):
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_psk_file(str(psk))
    h.set_tls_username(user)
    h.set_export_name("a")
    h.connect_tcp("127.0.0.1", str(port))
    return h


class TcpServer:
    """`clonectl serve --port PORT --tls-psk FILE`, stopped by PID."""

    def __init__(self, state_dir, port, psk, log_path, guard):
        self.state_dir, self.port = state_dir, port
        env = dict(os.environ)
        env.pop("CLONECTL_STATE", None)
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [CLONECTL, "--state-dir", str(state_dir), "serve", "--port",
             str(port), "--tls-psk", str(psk)], stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=self._log, start_new_session=True,
            env=env)
        guard.add(self.proc.pid)
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, self.log()
            self.info = status_json(state_dir)["server"]
            if self.info and self.info.get("pid") == self.proc.pid:
                guard.add(self.info["nbdkit_pid"])
                return
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)

    def log(self):
        return self.log_path.read_text(errors="replace")

    def stop(self):
        terminate_pid(self.proc.pid)
        self.proc.wait(10)
        self._log.close()


@pytest.fixture
def tls_server(clonectl, state_dir, psk_file, process_guard, tmp_path):
    if not nbd.NBD().supports_tls():
        pytest.skip("libnbd without TLS")
    clonectl("lu", "create", "a", "--size", str(MiB))
    srv = TcpServer(state_dir, _free_port(), psk_file, tmp_path / "tls.out",
                    process_guard)
    yield srv
    srv.stop()


def test_tls_client_with_the_key_reads_and_writes(tls_server, psk_file):
    h = _tls_client(tls_server.port, psk_file)
    assert h.get_tls_negotiated()
    h.pwrite(b"secret" * 100, 4096)
    assert h.pread(600, 4096) == b"secret" * 100
    h.shutdown()


def test_client_without_tls_gets_nothing(tls_server):
    h = nbd.NBD()
    h.set_tls(nbd.TLS_DISABLE)
    h.set_export_name("a")
    with pytest.raises(nbd.Error):
        h.connect_tcp("127.0.0.1", str(tls_server.port))
    # Not even the list of exports.
    h = nbd.NBD()
    h.set_tls(nbd.TLS_DISABLE)
    h.set_opt_mode(True)
    try:
        h.connect_tcp("127.0.0.1", str(tls_server.port))
        with pytest.raises(nbd.Error):
            h.opt_list(lambda name, desc: 0)
    except nbd.Error:
        pass  # refused even earlier: fine


def test_client_with_a_wrong_key_gets_nothing(tls_server, tmp_path):
    wrong = tmp_path / "wrong.psk"
    wrong.write_text("alice:" + os.urandom(32).hex() + "\n")
    with pytest.raises(nbd.Error):
        _tls_client(tls_server.port, wrong)
    other_user = tmp_path / "bob.psk"
    other_user.write_text("bob:" + os.urandom(32).hex() + "\n")
    with pytest.raises(nbd.Error):
        _tls_client(tls_server.port, other_user, user="bob")


def test_tls_psk_file_must_exist_and_be_private(clonectl, state_dir, tmp_path,
                                                psk_file):
    clonectl("lu", "create", "a", "--size", str(MiB))
    proc = run_clonectl(state_dir, "serve", "--port", str(_free_port()),
                        "--tls-psk", str(tmp_path / "missing.psk"),
                        check=False)
    assert proc.returncode in (1, 2) and "missing.psk" in proc.stderr, \
        proc.stderr
    psk_file.chmod(0o644)
    proc = run_clonectl(state_dir, "serve", "--port", str(_free_port()),
                        "--tls-psk", str(psk_file), check=False)
    assert proc.returncode == 1, proc.stderr
    assert "readable by others" in proc.stderr, proc.stderr
    assert stat.S_IMODE(psk_file.stat().st_mode) == 0o644
    assert run_clonectl(state_dir, "status", "--json").stdout.count(
        '"server": null') == 1
