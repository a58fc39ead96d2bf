"""Plugin: `clonectl serve` processes started by tests, always stopped.

Every server a test starts is stopped by PID at teardown, whatever the test
did (SIGTERM, then SIGKILL); a server that ignores SIGTERM or leaves nbdkit
behind fails the test.

Fixtures: `server_factory` (start any number of servers), `server` (one
with no LUs), `served_lu` (a 64M LU "disk" on its own server),
`shared_server` and `fresh_lu` (one server per module, a new LU per test).
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from target.inventory import StateDir
from target.server import read_serve_info
from tests.support.cli import CLONECTL, MiB, run_clonectl, status_json
from tests.support.processes import (STOP_TIMEOUT, ProcessGuard,
                                     die_with_parent, terminate_pid,
                                     wait_pid_gone)

START_TIMEOUT = 30.0


def serve_log_has(state_dir, text, timeout=30.0):
    """True once the server's run/serve.log holds text: nbdkit's output
    reaches it through the manager (a limiter of repeated lines), a moment
    after the event."""
    log = Path(state_dir) / "run" / "serve.log"
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class Server:
    """A foreground `clonectl serve` started by a test."""

    def __init__(self, state_dir, socket, log_path, guard, extra_args=(),
                 where=None, prefix=()):
        # where: a namespace of scripts/netns.py the manager runs in;
        # prefix: a command that execs the manager (prlimit ... --).
        self.where = where
        self.prefix = list(prefix)
        self.state_dir = Path(state_dir)
        self.requested_socket = str(socket)
        self.log_path = Path(log_path)
        self.guard = guard
        self.extra_args = list(extra_args)
        self.proc = None
        self.info = None
        self.socket = None

    # Start and stop.

    def start(self, timeout=START_TIMEOUT):
        cmd = self.prefix + [CLONECTL, "--state-dir", str(self.state_dir),
                             "serve"]
        if "--port" not in self.extra_args:  # TCP servers have no socket
            cmd += ["--socket", self.requested_socket]
        cmd += self.extra_args
        env = dict(os.environ)
        env.pop("CLONECTL_STATE", None)
        self._log = open(self.log_path, "ab")
        popen = self.where.popen if self.where else subprocess.Popen
        self.proc = popen(cmd, stdin=subprocess.DEVNULL,
                          stdout=self._log, stderr=self._log,
                          start_new_session=True, env=env,
                          preexec_fn=die_with_parent)
        self.guard.add(self.proc.pid)
        # What `clonectl status` shows as "server", read as it does: the
        # manager writes it once nbdkit answers on both sockets (a CLI
        # call per start would cost 0.3 s).
        state = StateDir(self.state_dir)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail("clonectl serve exited with {} before serving:\n{}"
                            .format(self.proc.returncode, self.log()))
            info = read_serve_info(state)
            if info is not None and info.get("pid") == self.proc.pid:
                self._set_info(info)
                return self
            if time.monotonic() > deadline:
                pytest.fail("clonectl serve did not serve within {} s:\n{}"
                            .format(timeout, self.log()))
            time.sleep(0.05)

    def refresh(self):
        """Re-read the server's record (the nbdkit pid changes on restart)."""
        info = status_json(self.state_dir)["server"]
        assert info is not None, "server vanished from status:\n" + self.log()
        return self._set_info(info)

    def _set_info(self, info):
        self.info = info
        self.socket = info["socket"]
        self.guard.add(info["nbdkit_pid"])
        return info

    @property
    def pid(self):
        return self.proc.pid

    @property
    def nbdkit_pid(self):
        return self.info["nbdkit_pid"]

    def uri(self, export=""):
        return "nbd+unix:///{}?socket={}".format(export, self.socket)

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=STOP_TIMEOUT):
        """SIGTERM the manager by PID; SIGKILL if it does not exit.  Return
        (exit status, obeyed SIGTERM, nbdkit pids still alive)."""
        if self.proc is None:
            return None
        obeyed = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                obeyed = False
                self.proc.kill()
                self.proc.wait(10)
        nbdkit_left = []
        if self.info:
            pid = self.info["nbdkit_pid"]
            if not wait_pid_gone(pid, 10):
                nbdkit_left.append(pid)
                terminate_pid(pid, 5)
        self._log.close()
        return self.proc.returncode, obeyed, nbdkit_left

    def log(self):
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        serve_log = self.state_dir / "run" / "serve.log"
        if serve_log.exists():
            text += "\n--- run/serve.log:\n" + serve_log.read_text(
                errors="replace")[-6000:]
        return text


@pytest.fixture
def server_factory(tmp_path, state_dir, process_guard):
    """start(state_dir=..., socket=..., extra_args=()) -> a serving Server.

    Every server is stopped at teardown; a server that ignores SIGTERM or
    leaves nbdkit behind fails the test."""
    servers = []
    counter = [0]

    def start(state_dir=state_dir, socket=None, extra_args=(), **kwargs):
        counter[0] += 1
        if socket is None:
            socket = tmp_path / "nbd{}.sock".format(counter[0])
        srv = Server(state_dir, socket,
                     tmp_path / "serve{}.out".format(counter[0]),
                     process_guard, extra_args)
        servers.append(srv)
        return srv.start(**kwargs)

    yield start

    problems = stop_servers(servers)
    if problems:
        pytest.fail("; ".join(problems))


@pytest.fixture
def server(server_factory, clonectl):
    """A server on the state_dir fixture with no LUs yet."""
    clonectl("lu", "list")  # creates nothing; proves the CLI works
    return server_factory()


LU_NAME = "disk"
LU_SIZE = 64 * MiB


class ServedLU:
    """An LU served by a running server: .server .name .size .file .uri"""

    def __init__(self, server, name, size, file):
        self.server = server
        self.name = name
        self.size = size
        self.file = Path(file)
        self.uri = server.uri(name)
        self.state_dir = server.state_dir


def stop_servers(servers):
    problems = []
    for srv in servers:
        result = srv.stop()
        if result is None:
            continue
        status, obeyed, nbdkit_left = result
        if not obeyed:
            problems.append("server pid {} ignored SIGTERM".format(srv.pid))
        if nbdkit_left:
            problems.append("nbdkit pid(s) {} outlived server pid {}".format(
                nbdkit_left, srv.pid))
    return problems


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One server for a whole module (starting one costs ~1 s); tests get
    their own LU on it from `fresh_lu`.  Use only for tests that do not
    stop, kill or restart the server."""
    base = tmp_path_factory.mktemp("shared")
    guard = ProcessGuard()
    srv = Server(base / "state", base / "nbd.sock", base / "serve.out", guard)
    run_clonectl(srv.state_dir, "lu", "create", "warmup", "--size", "1M")
    try:
        srv.start()
        yield srv
    finally:
        problems = stop_servers([srv])
        guard.cleanup()
        assert not problems, problems


@pytest.fixture
def fresh_lu(shared_server, request):
    """A new, empty 64M LU on the module's shared server."""
    fresh_lu.counter += 1
    name = "t{}".format(fresh_lu.counter)
    run_clonectl(shared_server.state_dir, "lu", "create", name, "--size",
                 "64M")
    assert shared_server.running(), shared_server.log()
    return ServedLU(shared_server, name, LU_SIZE,
                    shared_server.state_dir / "lus" / (name + ".img"))


fresh_lu.counter = 0


@pytest.fixture
def served_lu(clonectl, server_factory, state_dir):
    """A 64M LU named "disk" served by a running server.

    Returns an object with .server, .name, .size, .file (the backing file)."""
    clonectl("lu", "create", LU_NAME, "--size", "64M")
    srv = server_factory()
    lu = ServedLU(srv, LU_NAME, LU_SIZE,
                  Path(state_dir) / "lus" / (LU_NAME + ".img"))
    assert lu.file.exists()
    return lu


def read_file_range(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)
