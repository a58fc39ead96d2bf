"""Shared fixtures: the clonectl CLI, servers that always stop, NBD handles.

Every server a test starts is stopped by PID at teardown, whatever the test
did (SIGTERM, then SIGKILL).  Nothing here kills processes by name.
"""

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from target import procutil

REPO = Path(__file__).resolve().parents[1]
_VENV_CLONECTL = REPO / ".venv" / "bin" / "clonectl"
CLONECTL = str(_VENV_CLONECTL if _VENV_CLONECTL.exists()
               else Path(sys.prefix) / "bin" / "clonectl")

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0

MiB = 1 << 20


# ---------------------------------------------------------------- asserts

_BYTES = (bytes, bytearray, memoryview)
_BIG = 256


def _first_difference(left, right):
    n = min(len(left), len(right))
    step = 4096
    for start in range(0, n, step):
        if left[start:start + step] != right[start:start + step]:
            for i in range(start, min(n, start + step)):
                if left[i] != right[i]:
                    return i
    return n


def pytest_assertrepr_compare(config, op, left, right):
    """A short explanation for == of large byte strings (or lists of them):
    pytest's own diffs them with difflib, which took more than 300 s on
    two 64 KiB images in CI (tests/engine/test_powerloss.py) and turned a
    twin that caught its fault into a timeout."""
    if op != "==":
        return None
    if isinstance(left, _BYTES) and isinstance(right, _BYTES):
        if max(len(left), len(right)) <= _BIG:
            return None
        left, right = bytes(left), bytes(right)
        at = _first_difference(left, right)
        return ["byte strings differ (lengths {} and {}), first at offset "
                "{}".format(len(left), len(right), at),
                "left[{0}:{1}] = {2!r}".format(at, at + 16, left[at:at + 16]),
                "right[{0}:{1}] = {2!r}".format(at, at + 16,
                                                right[at:at + 16])]
    if isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)) \
            and any(isinstance(x, _BYTES) and len(x) > _BIG
                    for x in list(left) + list(right)):
        out = ["sequences of byte strings differ (lengths {} and {})".format(
            len(left), len(right))]
        for i, (a, b) in enumerate(zip(left, right)):
            if a != b:
                if isinstance(a, _BYTES) and isinstance(b, _BYTES):
                    out.append("item {}: first difference at offset {}".format(
                        i, _first_difference(bytes(a), bytes(b))))
                else:
                    out.append("item {} differs".format(i))
        return out
    return None


# ---------------------------------------------------------------- processes

def pid_alive(pid):
    """True if pid exists and is not a zombie (orphans are not reaped here:
    PID 1 of this machine does not reap, so a dead daemon lingers as Z)."""
    try:
        with open("/proc/{}/stat".format(pid)) as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # Field 3, after the parenthesised command name (which may hold spaces).
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_pid_gone(pid, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


def terminate_pid(pid, timeout=STOP_TIMEOUT):
    """SIGTERM pid, wait, SIGKILL if needed; return True if it obeyed TERM."""
    if not pid_alive(pid):
        return True
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    if wait_pid_gone(pid, timeout):
        return True
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    wait_pid_gone(pid, 10)
    return False


# In the child before exec: SIGTERM it if the test run itself dies (killed
# pytest, timeout), so that no server outlives the run.
_die_with_parent = functools.partial(procutil.die_with_parent, signal.SIGTERM)


class ProcessGuard:
    """PIDs that a test caused to exist (daemons, nbdkit children) and that
    must be gone at teardown."""

    def __init__(self):
        self.pids = []

    def add(self, pid):
        if pid and pid not in self.pids:
            self.pids.append(pid)

    def cleanup(self):
        survivors = []
        for pid in self.pids:
            if pid_alive(pid):
                survivors.append(pid)
                terminate_pid(pid)
        return survivors


@pytest.fixture
def process_guard():
    guard = ProcessGuard()
    yield guard
    guard.cleanup()


# ---------------------------------------------------------------- models

def tolerate_timing_in_generation(case, attempts=3):
    """A hypothesis state machine's TestCase whose rules see timing (a link
    that has reconnected, an engine that has finished) may draw differently
    when hypothesis replays a prefix, and hypothesis then stops with
    FlakyStrategyDefinition: a fault of the search, not of the code under
    test.  Run the search again then (a fresh one); an invariant that
    fails still fails at once."""
    from hypothesis.errors import FlakyStrategyDefinition

    class Tolerant(case):
        def runTest(self):
            for attempt in range(attempts):
                try:
                    return super().runTest()
                except FlakyStrategyDefinition:
                    if attempt == attempts - 1:
                        raise
    Tolerant.__name__ = case.__name__
    Tolerant.__qualname__ = case.__qualname__
    return Tolerant


# ---------------------------------------------------------------- sockets

def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_by_server(sock, timeout):
    """True if the other end closed sock (EOF or reset) within timeout;
    whatever it sent before is read and dropped."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def closed_while_trickling(sock, data, timeout, interval=0.2):
    """Send data a byte every interval (a slow client) until the other end
    closes sock; return how many seconds that took, or None if it did not
    close it within timeout."""
    stop = threading.Event()

    def trickle():
        try:
            for byte in data:
                if stop.wait(interval):
                    return
                sock.send(bytes([byte]))
        except OSError:
            pass
    th = threading.Thread(target=trickle, daemon=True)
    t0 = time.monotonic()
    th.start()
    try:
        if not closed_by_server(sock, timeout):
            return None
        return time.monotonic() - t0
    finally:
        stop.set()
        th.join()


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


def proc_status(pid, field):
    """A number from /proc/PID/status (VmRSS in KiB, Threads, ...)."""
    with open("/proc/{}/status".format(pid)) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError("no {} for pid {}".format(field, pid))


@pytest.fixture
def stop_at_teardown():
    """stop_at_teardown(obj) returns obj, whose stop() is called at
    teardown (in-process servers of a test)."""
    made = []

    def add(obj):
        made.append(obj)
        return obj
    yield add
    for obj in reversed(made):
        obj.stop()


# ---------------------------------------------------------------- the CLI

def run_clonectl(state_dir, *args, check=True, timeout=60, env=None,
                 input=None):
    """Run `clonectl --state-dir STATE_DIR ARGS...`; return CompletedProcess.

    With check, a non-zero exit fails the test showing stdout and stderr.
    """
    cmd = [CLONECTL]
    if state_dir is not None:
        cmd += ["--state-dir", str(state_dir)]
    cmd += [str(a) for a in args]
    full_env = dict(os.environ)
    full_env.pop("CLONECTL_STATE", None)
    if env:
        full_env.update(env)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=full_env, input=input,
                          stdin=None if input is not None else subprocess.DEVNULL)
    if check and proc.returncode != 0:
        pytest.fail("{} exited with {}\nstdout:\n{}\nstderr:\n{}".format(
            " ".join(cmd), proc.returncode, proc.stdout, proc.stderr))
    return proc


def status_json(state_dir):
    """`status --json`; exit status 3 (no server) and 4 (degraded) print
    the status too."""
    proc = run_clonectl(state_dir, "status", "--json", check=False)
    assert proc.returncode in (0, 3, 4), proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def state_dir(tmp_path):
    """A fresh, not yet existing state directory."""
    return tmp_path / "state"


@pytest.fixture
def clonectl(state_dir):
    """clonectl(*args, check=True, state_dir=<the state_dir fixture>)."""
    def run(*args, check=True, state_dir=state_dir, **kwargs):
        return run_clonectl(state_dir, *args, check=check, **kwargs)
    return run


def snapshot_tree(root):
    """{relative path: bytes or '<dir>'} of everything under root, to prove
    that a refused command changed nothing.  Runtime lock files are
    included: a refused command must not create or remove them either."""
    root = Path(root)
    result = {}
    if not root.exists():
        return result
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            result[rel] = "<link {}>".format(os.readlink(path))
        elif path.is_dir():
            result[rel] = "<dir>"
        elif path.is_socket():
            result[rel] = "<socket>"
        else:
            result[rel] = path.read_bytes()
    return result


# ---------------------------------------------------------------- servers

class Server:
    """A foreground `clonectl serve` started by a test."""

    def __init__(self, state_dir, socket, log_path, guard, extra_args=(),
                 prefix=()):
        # prefix: a command that execs the manager, e.g. ip netns exec NS.
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
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=self._log,
                                     start_new_session=True, env=env,
                                     preexec_fn=_die_with_parent)
        self.guard.add(self.proc.pid)
        serve_json = self.state_dir / "run" / "serve.json"
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail("clonectl serve exited with {} before serving:\n{}"
                            .format(self.proc.returncode, self.log()))
            if serve_json.exists():
                info = status_json(self.state_dir)["server"]
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

    problems = _stop_servers(servers)
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


def _stop_servers(servers):
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
        problems = _stop_servers([srv])
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


# ---------------------------------------------------------------- NBD clients

@pytest.fixture
def nbd_connect(server_factory):
    """nbd_connect(socket_or_uri, export="", meta=False, strict=True) -> handle.

    Handles are shut down and released at teardown, before the servers of
    server_factory are stopped (it is set up first, so torn down last):
    nbdkit does not exit on SIGTERM while an idle client stays connected."""
    nbd = pytest.importorskip("nbd")
    handles = []

    def connect(target, export="", meta=False, strict=True):
        h = nbd.NBD()
        handles.append(h)
        if meta:
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        if not strict:
            h.set_strict_mode(0)
        if str(target).startswith("nbd"):
            h.connect_uri(str(target))
        else:
            h.set_export_name(export)
            h.connect_unix(str(target))
        return h

    yield connect

    for h in handles:
        try:
            h.shutdown()
        except Exception:
            pass
    handles.clear()  # the last reference: libnbd frees the handle


def read_file_range(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)
