"""Helpers for the end-to-end session tests: destinations served by real
NBD servers (qemu-nbd, nbdkit, a second `clonectl serve`) and a Source
served by `clonectl serve`.

Fixtures: `dests` (destination servers), `session_env` (a CloneEnv with
session helpers).

Every destination process is started in the foreground by the test, waited
for until it answers an NBD handshake, and stopped by its PID at teardown
(SIGTERM, then SIGKILL); its PID is also given to the root process_guard.
Nothing is killed by name.
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.clonelib import CloneEnv, MiB, qemu_img_compare
from tests.support.processes import die_with_parent

START_TIMEOUT = 20.0


# ---------------------------------------------------------------- destinations

class NbdProcess:
    """One NBD server process (qemu-nbd or nbdkit) run in the foreground."""

    def __init__(self, cmd, socket, export, log_path, guard, where=None):
        # where: a namespace of scripts/netns.py the server runs in.
        self.where = where
        self.cmd = [str(c) for c in cmd]
        self.socket = str(socket)
        self.export = export
        self.log_path = Path(log_path)
        self.guard = guard
        self.proc = None

    @property
    def uri(self):
        return "nbd+unix:///{}?socket={}".format(self.export, self.socket)

    @property
    def pid(self):
        return self.proc.pid

    def start(self, timeout=START_TIMEOUT):
        if os.path.exists(self.socket):
            os.unlink(self.socket)   # left by a killed server
        self._log = open(self.log_path, "ab")
        popen = self.where.popen if self.where else subprocess.Popen
        self.proc = popen(self.cmd, stdin=subprocess.DEVNULL,
                          stdout=self._log, stderr=self._log,
                          start_new_session=True, preexec_fn=die_with_parent)
        self.guard.add(self.proc.pid)
        nbd = pytest.importorskip("nbd")
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail("{} exited with {} before serving:\n{}".format(
                    self.cmd, self.proc.returncode, self.log()))
            if os.path.exists(self.socket):
                h = nbd.NBD()
                try:
                    h.connect_uri(self.uri)
                    h.shutdown()
                    return self
                except nbd.Error:
                    pass
                finally:
                    del h
            if time.monotonic() > deadline:
                pytest.fail("{} did not answer within {} s:\n{}".format(
                    self.cmd, timeout, self.log()))
            time.sleep(0.05)

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        """kill -9 by PID, and reap it."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if not self._log.closed:
            self._log.close()

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""


class Destinations:
    """Factory of destination servers; all stopped at teardown."""

    def __init__(self, tmp_path, guard):
        self.tmp_path = Path(tmp_path)
        self.guard = guard
        # Unix socket paths must stay short (108 bytes): not under tmp_path.
        self.sockdir = Path(tempfile.mkdtemp(prefix="sess-", dir="/tmp"))
        self.procs = []
        self.counter = 0

    def _next(self, stem):
        self.counter += 1
        return (self.sockdir / "{}{}.sock".format(stem, self.counter),
                self.tmp_path / "{}{}.log".format(stem, self.counter))

    @staticmethod
    def make_file(path, size):
        """A sparse destination file of size bytes (kept if it exists)."""
        path = Path(path)
        if not path.exists():
            with open(path, "wb") as f:
                f.truncate(size)
        return path

    def qemu_nbd(self, file, export="dest", readonly=False, socket=None):
        sock, log = self._next("qemu")
        sock = socket or sock
        cmd = ["qemu-nbd", "-f", "raw", "-t", "-k", sock, "-x", export]
        if readonly:
            cmd.append("-r")
        cmd.append(file)
        p = NbdProcess(cmd, sock, export, log, self.guard)
        self.procs.append(p)
        return p.start()

    def nbdkit(self, file, filters=(), params=(), socket=None):
        """nbdkit's file plugin on file, with filters (e.g. rate)."""
        sock, log = self._next("nbdkit")
        sock = socket or sock
        cmd = ["nbdkit", "-f", "-U", sock]
        cmd += ["--filter=" + f for f in filters]
        cmd += ["file", "file=" + str(file)] + list(params)
        p = NbdProcess(cmd, sock, "", log, self.guard)
        self.procs.append(p)
        return p.start()

    def restart(self, dest):
        """The same server command (same file, same socket) again."""
        p = NbdProcess(dest.cmd, dest.socket, dest.export,
                       dest.log_path, self.guard)
        self.procs.append(p)
        return p.start()

    def cleanup(self):
        for p in self.procs:
            p.stop()
        shutil.rmtree(self.sockdir, ignore_errors=True)


@pytest.fixture
def dests(tmp_path, process_guard):
    d = Destinations(tmp_path, process_guard)
    yield d
    d.cleanup()


# ---------------------------------------------------------------- the env

class SessionEnv(CloneEnv):
    """A state directory with a Source LU "src" (no clones) served by
    `clonectl serve`, plus session helpers."""

    def setup(self, size=64 * MiB, fill=True, serve=True):
        return super().setup(size=size, clones=(), fill=fill, serve=serve)

    def sstatus(self, name="s1"):
        return self.cli_json("session", "status", name)

    def slist(self):
        return self.cli_json("session", "list")

    def create(self, name, *uris, extra=()):
        args = ["session", "create", self.SOURCE, name]
        for u in uris:
            args += ["--dest", u]
        return self.cli(*args, *extra)

    def update(self, name="s1", timeout=180):
        proc = self.cli("session", "update", name, timeout=timeout)
        assert "transfer completed" in proc.stdout, proc.stdout
        return self.sstatus(name)

    def transfer_wait(self, name="s1", *extra, check=True, timeout=180):
        return self.cli("session", "transfer", name, "--wait", *extra,
                        check=check, timeout=timeout)

    def copy_export(self, export, path):
        """nbdcopy of one of the Source server's exports into path."""
        proc = subprocess.run(["nbdcopy", self.uri(export), str(path)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return Path(path)

    def copy_source_file(self, path):
        """A copy of the Source's backing file, now (the writes the test
        made went through the server, which writes the file directly)."""
        shutil.copyfile(self.img(self.SOURCE), path)
        return Path(path)

    def wait_transfer(self, name="s1", pred=None, timeout=60):
        """Poll the status until pred(status) (default: a transfer runs)."""
        pred = pred or (lambda st: st["transferring"])
        deadline = time.monotonic() + timeout
        while True:
            st = self.sstatus(name)
            if pred(st):
                return st
            if time.monotonic() > deadline:
                pytest.fail("session {} never got there: {}\n{}".format(
                    name, json.dumps(st, indent=1), self.server.log()))
            time.sleep(0.05)


def assert_same(a, b, what=""):
    same, out = qemu_img_compare(a, b)
    assert same, "{} differ{}: {}".format(
        (a, b), " (" + what + ")" if what else "", out)


def assert_differ(a, b, what=""):
    same, out = qemu_img_compare(a, b)
    assert not same, "{} are identical{}".format(
        (a, b), " (" + what + ")" if what else "")


@pytest.fixture
def session_env(state_dir, server_factory, nbd_connect):
    return SessionEnv(state_dir, server_factory, nbd_connect)

