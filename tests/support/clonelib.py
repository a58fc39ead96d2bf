"""Plugin: the end-to-end clone tests' environment (`clone_env`): real
clients, a real server.

Everything goes through the public surface: the `clonectl` CLI (with
--json), NBD clients (libnbd, fio, qemu-io, nbdinfo, qemu-img) and the
backing files in STATE/lus/NAME.img.  Servers come from the root
``server_factory`` fixture, which stops them by PID at teardown.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.cli import MiB, run_clonectl, status_json
from tests.support.processes import pid_alive, wait_pid_gone
from tests.support.servers import read_file_range

KiB = 1 << 10
GRANULARITY = 64 * KiB  # the default


# ---------------------------------------------------------------- data

def read_range(path, offset, length):
    return read_file_range(path, offset, length)


def fill_file(path, size):
    """Overwrite path with size bytes of random data (allocated, not holes)."""
    with open(path, "r+b") as f:
        for off in range(0, size, 4 * MiB):
            f.write(os.urandom(min(4 * MiB, size - off)))
        f.flush()
        os.fsync(f.fileno())


def differing_extents(a, b, size, granularity=GRANULARITY):
    """Set of extent numbers where files a and b differ."""
    out = set()
    chunk = 4 * MiB
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for off in range(0, size, chunk):
            da, db = fa.read(chunk), fb.read(chunk)
            if da == db:
                continue
            for g in range(0, len(da), granularity):
                if da[g:g + granularity] != db[g:g + granularity]:
                    out.add((off + g) // granularity)
    return out


def extents_of(offset, length, granularity=GRANULARITY):
    return set(range(offset // granularity,
                     (offset + length + granularity - 1) // granularity))


# ---------------------------------------------------------------- clients

def qemu_img_compare(a, b):
    """(identical?, output) of `qemu-img compare -f raw -F raw a b`."""
    proc = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                           str(a), str(b)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


def fio(uri, size, rw="randwrite", bs="4k", iodepth=16, verify=True,
        offset=0, extra=(), timeout=180, check=True, cwd=None):
    """Run fio's nbd engine; return (CompletedProcess, first job or None).

    With verify, fio writes every block of [offset, offset+size) once with a
    crc32c header and reads it all back; with check, the run must succeed
    and the verify pass must have read back everything written.
    """
    cmd = ["fio", "--name=clones", "--ioengine=nbd", "--uri=" + uri,
           "--rw=" + rw, "--bs=" + bs, "--iodepth=" + str(iodepth),
           "--size=" + str(size), "--offset=" + str(offset),
           "--randrepeat=0", "--output-format=json"]
    if verify:
        cmd += ["--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
                "--verify_state_save=0"]
    cmd += list(extra)
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)
    job = None
    if "{" in proc.stdout:
        try:
            job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
        except ValueError:
            job = None
    if check:
        assert proc.returncode == 0 and job is not None, \
            "fio failed ({}):\n{}\n{}".format(proc.returncode,
                                              proc.stdout[-3000:],
                                              proc.stderr[-3000:])
        assert job["error"] == 0, job
        assert job["write"]["io_bytes"] == size, job["write"]
        if verify:
            # The verify pass read back every block and found it intact.
            assert job["read"]["io_bytes"] == size, job["read"]
    return proc, job


def fingerprint(env):
    """What a refused command must leave alone: the inventory, the backing
    files and maps that exist, and every clone's status (its dirty extents
    included).  The map files' bytes are not compared: a commit may rewrite
    them at any time with the same bits."""
    state = env.state_dir
    out = {"state.json": (state / "state.json").read_bytes()}
    out["maps"] = sorted(p.name for p in (state / "maps").iterdir()
                         if not p.name.startswith("."))
    out["lus"] = sorted(p.name for p in (state / "lus").iterdir())
    for c in env.clone_list():
        c = dict(c)
        c.pop("operation", None)  # rate and elapsed move with time
        out["status:" + c["name"]] = c
    return out


def nbd_exports(socket):
    """Export names listed by `nbdinfo --list --json`."""
    proc = subprocess.run(["nbdinfo", "--list", "--json",
                           "nbd+unix://?socket={}".format(socket)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return sorted(e["export-name"] for e in json.loads(proc.stdout)["exports"])


# ---------------------------------------------------------------- the env

class CloneEnv:
    """One state directory with a Source LU "src" and its clones, served by
    a `clonectl serve` on a Unix socket under tmp_path."""

    SOURCE = "src"

    def __init__(self, state_dir, server_factory, nbd_connect):
        self.state_dir = Path(state_dir)
        self._server_factory = server_factory
        self._nbd_connect = nbd_connect
        self.server = None
        self.size = None

    # CLI.

    def cli(self, *args, check=True, timeout=120):
        return run_clonectl(self.state_dir, *args, check=check,
                                 timeout=timeout)

    def cli_json(self, *args):
        return json.loads(self.cli(*args, "--json").stdout)

    def refused(self, *args, match):
        """Run a command that must be refused: exit 1, a message naming the
        reason on stderr (match: substrings, any case), no traceback."""
        proc = self.cli(*args, check=False)
        assert proc.returncode == 1, "expected exit 1 from {}, got {}:\n{}\n{}" \
            .format(args, proc.returncode, proc.stdout, proc.stderr)
        err = proc.stderr.lower()
        assert err.startswith("clonectl: error:"), proc.stderr
        assert "traceback" not in err, proc.stderr
        for m in ([match] if isinstance(match, str) else match):
            assert m.lower() in err, "{!r} not in {!r}".format(m, proc.stderr)
        return proc

    def status(self, name):
        return self.cli_json("clone", "status", name)

    def clone_list(self):
        return self.cli_json("clone", "list")

    # Set-up.

    def setup(self, size=64 * MiB, clones=("c1",), granularity=None,
              fill=True, serve=True):
        self.size = size
        self.cli("lu", "create", self.SOURCE, "--size", str(size))
        if fill:
            fill_file(self.img(self.SOURCE), size)
        for c in clones:
            args = ["clone", "add", self.SOURCE, c]
            if granularity:
                args += ["--granularity", granularity]
            self.cli(*args)
        if serve:
            self.start_server()
        return self

    def start_server(self):
        self.server = self._server_factory(state_dir=self.state_dir)
        return self.server

    def img(self, name):
        return self.state_dir / "lus" / (name + ".img")

    def uri(self, export):
        return self.server.uri(export)

    def connect(self, export):
        return self._nbd_connect(self.server.socket, export)

    def write_export(self, export, offset, data, flush=True):
        h = self.connect(export)
        view = memoryview(data)
        for pos in range(0, len(data), 4 * MiB):
            h.pwrite(view[pos:pos + 4 * MiB], offset + pos)
        if flush:
            h.flush()
        h.shutdown()

    def read_export(self, export, offset, length):
        h = self.connect(export)
        out = bytearray()
        for pos in range(0, length, 4 * MiB):
            out += h.pread(min(4 * MiB, length - pos), offset + pos)
        h.shutdown()
        return bytes(out)

    # Operations.

    def sync(self, name, *extra):
        self.cli("clone", "sync", name, *extra)

    def sync_wait(self, name):
        proc = self.cli("clone", "sync", name, "--wait")
        assert "synchronized" in proc.stdout.splitlines()[-1], proc.stdout
        st = self.status(name)
        assert st["state"] == "synchronized" and st["extents_dirty"] == 0, st
        return st

    def wait_done(self, name, state="synchronized", timeout=60):
        """Poll until no operation runs on clone name; it must be in state."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(name)
            op = st.get("operation") or {}
            if st["state"] == state and not op.get("running"):
                return st
            if st["state"] not in ("syncing", "reverse-syncing",
                                   "synchronized"):
                pytest.fail("clone {} ended {}: {}".format(name, st["state"],
                                                           st))
            if time.monotonic() > deadline:
                pytest.fail("clone {} not {} within {} s: {}\n{}".format(
                    name, state, timeout, st, self.server.log()))
            time.sleep(0.1)

    def wait_progress(self, name, done_fraction, timeout=30):
        """Poll until at least done_fraction of the extents are clean."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(name)
            total = st["extents_total"]
            if total - st["extents_dirty"] >= done_fraction * total:
                return st
            if time.monotonic() > deadline:
                pytest.fail("clone {} made no progress: {}".format(name, st))
            time.sleep(0.05)

    def assert_identical(self, a, b):
        same, out = qemu_img_compare(self.img(a), self.img(b))
        assert same, "{} and {} differ: {}".format(a, b, out)

    # Crashes.

    @property
    def nbdkit_pid(self):
        return self.server.info["nbdkit_pid"]

    def kill_nbdkit(self, timeout=30):
        """kill -9 nbdkit; wait until the manager has started a new one."""
        old = self.server.refresh()["nbdkit_pid"]
        os.kill(old, signal.SIGKILL)
        assert wait_pid_gone(old, 10), "nbdkit {} survived".format(old)
        deadline = time.monotonic() + timeout
        while True:
            info = status_json(self.state_dir)["server"]
            if info and info["nbdkit_pid"] != old and \
                    pid_alive(info["nbdkit_pid"]):
                break
            if time.monotonic() > deadline:
                pytest.fail("nbdkit was not restarted:\n" + self.server.log())
            time.sleep(0.1)
        self.server.refresh()
        assert self.server.running(), self.server.log()

    def kill_manager(self):
        """kill -9 the `clonectl serve` process; nbdkit must follow it."""
        nbdkit = self.server.refresh()["nbdkit_pid"]
        self.server.proc.send_signal(signal.SIGKILL)
        self.server.proc.wait(10)
        assert wait_pid_gone(nbdkit, 30), \
            "nbdkit {} outlived its manager".format(nbdkit)
        assert status_json(self.state_dir)["server"] is None


@pytest.fixture
def clone_env(state_dir, server_factory, nbd_connect):
    return CloneEnv(state_dir, server_factory, nbd_connect)
