"""Crash torture: random host I/O, random clone operations, kill -9, check.

Drives a real `clonectl serve` (a fresh state directory with one Source LU
"src" and clones c1, c2) in rounds.  In each round several libnbd clients
write at random into the Source (each in its own region, so that the order
of writes to a block is known), with FUA now and then and flushes; the
driver meanwhile runs random operations from OPERATIONS (sync, fracture,
reverse sync, protected restore, kill -9 of nbdkit or of the manager, and
with --power-loss a power cut).  At
the end of a round the writers stop, the target recovers (the manager
restarts nbdkit, or the driver serves again after killing the manager), the
running operation is left to finish, and the invariants are checked against
the reference model:

1. what a host reads from the Source is, block by block, the last
   acknowledged write; after a crash: the last write made durable (FUA, or
   acknowledged before a flush that returned) or any write issued after
   it;
2. a fractured or restoring clone holds exactly the bytes it had when it
   was fractured: a protected restore never writes it;
3. a clone whose sync (or reverse sync) completed is byte-for-byte equal
   to its Source: the maps covered every divergence, crashes included;
4. an incremental session "s" ships the Source to a destination LU "dst"
   (served by the same target): while marked, its frozen export src@s
   reads exactly as the Source did at the mark, kill -9s included; a
   destination recorded consistent after a completed transfer holds
   exactly the point in time of that transfer's mark.

Everything is seeded: the writers' data and choices and the driver's
choices and kill moments come from one seed; a failing run prints the
command that replays it.  Thread timing is not reproducible, so a replay
makes the same choices but may interleave them differently.

Power loss (--power-loss): the state directory lives on scripts/powerfs.py,
a FUSE file system that keeps every write since the file's last fsync or
fdatasync in its own memory and writes a random subset of them back early;
the "power-cut" operation kill -9s it together with the manager and nbdkit,
so the disk keeps what was made durable plus an arbitrary part of the rest
(directory entries included: those not yet synced by a directory fsync
survive as a prefix, or not at all),
then mounts it again and restarts the target.  The model's crash rule is
the same as for kill -9 (durable, or any later write), but now unsynced
writes to maps, save areas, clones and the Source really are lost.  The run
directory (sockets, serve.json, logs) is a symlink out of that file system:
it holds nothing that must survive a crash.

Replication (--replication async|sync): the Source is the volume of a
replication group "g" whose link goes to a second `clonectl serve` (the
secondary, its own state directory) through a TCP relay in this process,
so that "cut-link" can drop every connection and refuse new ones for a
while; "kill-secondary" kill -9s the secondary and starts it again.  The
primary's crashes and power cuts and the clone operations (restores and
reverse syncs switch the link to its change map and replay) go on as
before.  After each round: a secondary that reports itself inconsistent
must refuse reads; then, once the link has caught up (replicating, no lag,
the secondary applied the primary's last update), the secondary's volume
must equal the Source byte for byte (nothing lost in the log,
the change map or the replay).

Seams (other ways into the same bytes): "cli-race" kill -9s the manager
and runs `lu delete` of an LU of its own and `clone list` while the new
server starts (each must go through the server or refuse, never act
beside it: afterwards every LU the server serves still has its file);
with --replication the secondary has a clone "r1" of its volume that is
synced and fractured there ("secondary-clone"), and
"secondary-restore" detaches the link, restores the secondary's volume from
r1 and attaches again at once (the primary must wait for the restore, then
copy back what it changed).  After each round, on the caught-up secondary,
a synchronized r1 must equal the volume (replicated writes reach clones of
a secondary) and a fractured or restoring r1 must be unchanged.

Deliberately ignored: writes to the fractured clones' exports (the clone
model is "frozen at fracture"), trims and zeroes, operations the target
refuses (they are counted, and must be answered with a message, never a
traceback).
Host I/O pauses, flushed, around the operations that change what the
Source shows (fracture, reverse sync, restore) so that the model knows the
exact point-in-time; it runs during the engines they start.

To add an operation: write a method `op_NAME(self, rng)` returning "ok",
"refused" or "crashed" and add a row to OPERATIONS with its weight.
"""

import argparse
import datetime
import functools
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import nbd

from target import procutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLONECTL = os.path.join(REPO, ".venv", "bin", "clonectl")
if not os.path.exists(CLONECTL):
    CLONECTL = os.path.join(os.path.dirname(sys.executable), "clonectl")

BLOCK = 4096
MiB = 1 << 20
CLONES = ("c1", "c2")
# Operations on the Source's clones (none with --no-clones).
CLONE_OPERATIONS = ("sync", "fracture", "reverse-sync", "restore")
SOURCE = "src"
RACE_LU = "race"         # deleted and created while a server starts
SECONDARY_CLONE = "r1"   # with --replication: a clone of the secondary's
                         # volume, fed by the replicated writes
GROUP = "g"


class Violation(Exception):
    """An invariant does not hold."""


def _now_iso():
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def digest(data):
    return hashlib.blake2b(data, digest_size=8).digest()


def block_digests(data):
    return [digest(data[i:i + BLOCK]) for i in range(0, len(data), BLOCK)]


def pid_alive(pid):
    try:
        with open("/proc/{}/stat".format(pid)) as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


# In the server's child before exec: SIGTERM it if the torture dies, so
# that no server outlives the run.
_die_with_parent = functools.partial(procutil.die_with_parent, signal.SIGTERM)


# ---------------------------------------------------------------- the model

class SourceModel:
    """What each block of the Source must hold.

    shown[b]: the last acknowledged write (what a read returns if nothing
    crashed); durable[b]: the last write made durable; later[b]: writes
    issued after it (acknowledged or in flight) -- after a crash the block
    holds durable[b] or one of later[b].
    """

    def __init__(self, digests):
        self.lock = threading.Lock()
        self.shown = list(digests)
        self.durable = list(digests)
        self.later = [set() for _ in digests]

    def issued(self, b, h):
        with self.lock:
            self.later[b].add(h)

    def acked(self, b, h, durable):
        with self.lock:
            self.shown[b] = h
            if durable:
                self.durable[b] = h
                self.later[b] = set()

    def flushed(self, blocks):
        with self.lock:
            for b in blocks:
                self.durable[b] = self.shown[b]
                self.later[b] = set()

    def replace(self, digests):
        """The Source now shows other data (a restore started), durably."""
        with self.lock:
            self.shown = list(digests)
            self.durable = list(digests)
            self.later = [set() for _ in digests]

    def maybe_replace(self, digests):
        """A restore may or may not have started (cut by a crash)."""
        with self.lock:
            for b, h in enumerate(digests):
                self.later[b].add(h)

    def check(self, actual, crashed):
        bad = []
        with self.lock:
            for b, h in enumerate(actual):
                ok = h == self.shown[b] if not crashed else \
                    h == self.durable[b] or h in self.later[b] \
                    or h == self.shown[b]
                if not ok:
                    bad.append(b)
            if bad:
                return bad
            self.shown = list(actual)
            self.durable = list(actual)
            self.later = [set() for _ in actual]
        return bad


# ---------------------------------------------------------------- the target

class PowerFS:
    """The disk of a --power-loss run: scripts/powerfs.py mounting BACKING
    at MOUNT; cut() is the power cut, start() the next boot."""

    def __init__(self, workdir, seed, log, ignore_fsync=False, name="disk",
                 writeback=None, ignore_dir_fsync=False,
                 unsynced_entries=None):
        self.ignore_fsync = ignore_fsync
        self.ignore_dir_fsync = ignore_dir_fsync
        self.writeback = writeback
        self.unsynced_entries = unsynced_entries
        self.backing = os.path.join(workdir, name)
        self.mount = os.path.join(workdir, name + ".mnt")
        os.makedirs(self.backing)
        os.makedirs(self.mount)
        self.seed, self.log = seed, log
        self.boots = 0
        self.proc = None

    def start(self, timeout=30):
        self.boots += 1
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(REPO, "scripts", "powerfs.py"),
             self.backing, self.mount,
             "--seed", str(self.seed * 1000 + self.boots)] +
            (["--unsafe-ignore-fsync"] if self.ignore_fsync else []) +
            (["--unsafe-ignore-dir-fsync"] if self.ignore_dir_fsync else []) +
            (["--writeback", str(self.writeback)]
             if self.writeback is not None else []) +
            (["--unsynced-entries", self.unsynced_entries]
             if self.unsynced_entries is not None else []),
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
            start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.mount):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                code = self.proc.poll()
                # By PID: no file system process outlives a failed start.
                self.proc.kill()
                self.proc.wait(10)
                self.proc = None
                raise Violation("powerfs did not mount (exit {})".format(
                    code))
            time.sleep(0.02)

    def cut(self):
        """Everything not yet written back is lost."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.proc = None
        self._unmount()

    def power_cycle(self):
        """A power cut and the next boot (for a disk nothing else runs on)."""
        self.cut()
        self.start()

    def _unmount(self):
        # Lazy: processes of the dead target may still hold files open.
        subprocess.run(["fusermount3", "-u", "-z", self.mount],
                       capture_output=True)

    def stop(self):
        if self.proc is not None:
            self._unmount()
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None


class Relay(threading.Thread):
    """A TCP relay from a local port to the secondary's replication port;
    cut(seconds) drops every connection and refuses new ones meanwhile (a
    link cut: the primary sees resets and failed connects)."""

    def __init__(self, to_port):
        super().__init__(daemon=True)
        self.to_port = to_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.pairs = []
        self.refuse_until = 0.0

    def run(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if time.monotonic() < self.refuse_until:
                conn.close()
                continue
            try:
                up = socket.create_connection(("127.0.0.1", self.to_port), 5)
            except OSError:
                conn.close()   # the secondary is down
                continue
            with self.lock:
                self.pairs.append((conn, up))
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(a, b),
                                 daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            shutdown_socket(sock)

    def cut(self, seconds):
        with self.lock:
            self.refuse_until = time.monotonic() + seconds
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for sock in pair:
                shutdown_socket(sock)
                sock.close()

    def heal(self):
        self.refuse_until = 0.0

    def stop(self):
        self.cut(0)
        self.listener.close()


def shutdown_socket(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replication_status(primary, secondary, group=GROUP):
    """(the primary's group status, its first link, the secondary's status
    or {} if it does not answer)."""
    p = primary.cli_json("rsg", "status", group)
    link = (p.get("links") or [None])[0]
    proc = secondary.cli("rsg", "status", group, "--json")
    s = json.loads(proc.stdout) if proc.returncode == 0 else {}
    return p, link, s


def caught_up(p, link, s):
    """The link replicates with no lag and the secondary, consistent, has
    applied the primary's last update."""
    return bool(link) and link["state"] == "replicating" and \
        not link["lag_updates"] and bool(s.get("consistent")) and \
        s.get("applied_seq") == p["last_seq"]


class Target:
    """A `clonectl serve` on a Unix socket, started and killed by PID."""

    def __init__(self, state_dir, socket, log, serve_args=()):
        self.state_dir = state_dir
        self.socket = socket
        self.log = log
        self.serve_args = list(serve_args)
        self.proc = None

    def cli(self, *args, timeout=120):
        proc = subprocess.run([CLONECTL, "--state-dir", self.state_dir] +
                              list(args), capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout)
        # `status` also says "no server runs" (3) and "degraded" (4).
        codes = (0, 1, 3, 4) if args[:1] == ("status",) else (0, 1)
        if "Traceback" in proc.stderr or proc.returncode not in codes:
            raise Violation("clonectl {} exited {} with:\n{}{}".format(
                " ".join(args), proc.returncode, proc.stdout, proc.stderr))
        if proc.returncode == 1 and \
                not proc.stderr.startswith("clonectl: error:"):
            raise Violation("clonectl {}: unclear error {!r}".format(
                " ".join(args), proc.stderr))
        return proc

    def cli_json(self, *args):
        proc = self.cli(*args, "--json")
        if proc.returncode and not (args[:1] == ("status",) and
                                    proc.returncode in (3, 4)):
            raise Violation("clonectl {} failed: {}".format(
                " ".join(args), proc.stderr))
        return json.loads(proc.stdout)

    def info(self):
        return self.cli_json("status")["server"]

    def start(self, timeout=60, connect=True):
        self.spawn()
        self.wait_serving(timeout, connect)

    def spawn(self):
        """Start `clonectl serve` and return at once (it is starting)."""
        self.proc = subprocess.Popen(
            [CLONECTL, "--state-dir", self.state_dir, "serve", "--socket",
             self.socket] + self.serve_args, stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log, start_new_session=True,
            preexec_fn=_die_with_parent)

    def serving(self):
        """True once this target's manager has published and answers."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        info = self.info()
        return bool(info) and info.get("pid") == self.proc.pid

    def wait_serving(self, timeout=60, connect=True):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Violation("clonectl serve exited with {}".format(
                    self.proc.returncode))
            info = self.info()
            if info and info.get("pid") == self.proc.pid and \
                    pid_alive(info["nbdkit_pid"]):
                if not connect:
                    return info
                try:
                    h = self.connect()
                    h.shutdown()
                    return info
                except nbd.Error:
                    pass
            time.sleep(0.1)
        raise Violation("the target did not serve within {} s".format(timeout))

    def connect(self, export=SOURCE):
        h = nbd.NBD()
        h.set_export_name(export)
        h.connect_unix(self.socket)
        return h

    def kill_nbdkit(self):
        info = self.info()
        os.kill(info["nbdkit_pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while pid_alive(info["nbdkit_pid"]):
            if time.monotonic() > deadline:
                raise Violation("nbdkit survived kill -9")
            time.sleep(0.02)

    def kill_manager(self, before_kill=None):
        nbdkit = self.info()["nbdkit_pid"]
        if before_kill is not None:
            before_kill()
        self.proc.send_signal(signal.SIGKILL)
        if before_kill is not None:
            os.kill(nbdkit, signal.SIGKILL)
        self.proc.wait(30)
        deadline = time.monotonic() + 30
        while pid_alive(nbdkit):
            if time.monotonic() > deadline:
                raise Violation("nbdkit outlived its manager")
            time.sleep(0.02)
        self.proc = None

    def power_cut(self, disk):
        """Cut the power of disk (a PowerFS) and of this target, then boot
        the disk again; the target stays down."""
        # The disk goes first: nothing the dying processes still write
        # reaches it.
        self.kill_manager(before_kill=disk.cut)
        disk.start()

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def read_all(self, export, size):
        h = self.connect(export)
        try:
            out = bytearray()
            for pos in range(0, size, 4 * MiB):
                out += h.pread(min(4 * MiB, size - pos), pos)
            return bytes(out)
        finally:
            h.shutdown()

    def read_file(self, name):
        with open(os.path.join(self.state_dir, "lus", name + ".img"),
                  "rb") as f:
            return f.read()


# ---------------------------------------------------------------- writers

class Writer(threading.Thread):
    """One NBD client writing random data into its own block range."""

    def __init__(self, target, model, first, last, seed, counters):
        super().__init__(daemon=True)
        self.target, self.model = target, model
        self.first, self.last = first, last
        self.rng = random.Random(seed)
        self.counters = counters
        self.stop = threading.Event()
        self.pause = threading.Event()
        self.paused = threading.Event()
        self.acked_since_flush = set()
        self.error = None

    def run(self):
        try:
            h = self.target.connect()
        except nbd.Error as e:
            self.error = e
            self.paused.set()
            return
        try:
            while not self.stop.is_set():
                if self.pause.is_set():
                    self._flush(h)
                    self.paused.set()
                    while self.pause.is_set() and not self.stop.is_set():
                        time.sleep(0.005)
                    self.paused.clear()
                    continue
                self._one(h)
        except nbd.Error as e:
            self.error = e  # the target was killed: in-flight stays in later
        finally:
            self.paused.set()
            try:
                h.shutdown()
            except nbd.Error:
                pass

    def _flush(self, h):
        h.flush()
        self.model.flushed(self.acked_since_flush)
        self.acked_since_flush = set()
        self.counters["flushes"] += 1

    def _one(self, h):
        r = self.rng
        if r.random() < 0.1:
            self._flush(h)
            return
        nblocks = r.choice((1, 1, 2, 4, 16, 32))
        b0 = r.randrange(self.first, max(self.first + 1,
                                         self.last - nblocks + 1))
        nblocks = min(nblocks, self.last - b0)
        data = r.randbytes(nblocks * BLOCK)
        digests = block_digests(data)
        fua = r.random() < 0.15
        for i, d in enumerate(digests):
            self.model.issued(b0 + i, d)
        h.pwrite(data, b0 * BLOCK, nbd.CMD_FLAG_FUA if fua else 0)
        for i, d in enumerate(digests):
            self.model.acked(b0 + i, d, fua)
        if not fua:
            self.acked_since_flush.update(range(b0, b0 + nblocks))
        self.counters["writes"] += 1


# ---------------------------------------------------------------- the driver

class Torture:

    def __init__(self, args, workdir):
        self.args = args
        self.rng = random.Random(args.seed)
        self.size = args.size
        self.blocks = self.size // BLOCK
        self.log = open(os.path.join(workdir, "serve.log"), "ab")
        self.powerfs = None
        if args.power_loss:
            self.powerfs = PowerFS(
                workdir, args.seed, self.log, args.unsafe_ignore_fsync,
                ignore_dir_fsync=args.unsafe_ignore_dir_fsync)
            self.state_dir = os.path.join(self.powerfs.mount, "state")
        else:
            self.state_dir = os.path.join(workdir, "state")
        self.run_dir = os.path.join(workdir, "run")
        self.target = Target(self.state_dir,
                             os.path.join(workdir, "nbd.sock"), self.log)
        self.secondary = self.relay = None
        self.secondary_disk = None
        if args.replication:
            self.token = os.path.join(workdir, "token")
            self.replication_port = free_port()
            secondary_dir = os.path.join(workdir, "secondary")
            if args.power_loss:
                # Its own disk, cut on its own.
                self.secondary_disk = PowerFS(workdir, args.seed + 1,
                                              self.log, name="secondary-disk")
                secondary_dir = os.path.join(self.secondary_disk.mount,
                                             "state")
            self.secondary = Target(
                secondary_dir,
                os.path.join(workdir, "secondary.sock"),
                open(os.path.join(workdir, "secondary.log"), "ab"),
                ["--replication-port", str(self.replication_port),
                 "--replication-token-file", self.token])
        self.counters = {"rounds": 0, "crashes": 0, "power_cuts": 0,
                         "operations": 0,
                         "refused": 0, "writes": 0, "flushes": 0,
                         "checks": 0, "session_checks": 0,
                         "secondary_kills": 0, "secondary_power_cuts": 0,
                         "replica_checks": 0,
                         "inconsistent_refused": 0,
                         "cli_races": 0, "secondary_clone_checks": 0,
                         "secondary_restores": 0}
        self.frozen = {}  # clone -> block digests while fractured
        # The secondary's clone of its volume, while fractured: its blocks.
        self.secondary_frozen = None
        # Session: (time of a mark attempt, Source digests at that moment).
        self.marks = []
        self.crashed = False
        self.writers = []
        # Operations that need an option weigh nothing without it; they
        # come last in OPERATIONS, so the other choices stay the same.
        self.clones = () if args.no_clones else CLONES
        needs = {"power-cut": args.power_loss,
                 "cut-link": args.replication,
                 "kill-secondary": args.replication,
                 "secondary-clone": args.replication,
                 "secondary-restore": args.replication,
                 **{op: self.clones for op in CLONE_OPERATIONS}}
        self.weights = [o[1] if needs.get(o[0], True) else 0
                        for o in OPERATIONS]
        self.nbdkit_kills = []  # times, since the manager started

    # Set-up.

    def setup(self):
        t = self.target
        if self.powerfs is not None:
            self.powerfs.start()
        os.makedirs(self.state_dir)
        os.makedirs(self.run_dir)
        os.symlink(self.run_dir, os.path.join(self.state_dir, "run"))
        self._ok(t.cli("lu", "create", SOURCE, "--size", str(self.size)))
        data = self.rng.randbytes(self.size)
        with open(os.path.join(self.state_dir, "lus", SOURCE + ".img"),
                  "r+b") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        for c in self.clones:
            self._ok(t.cli("clone", "add", SOURCE, c, "--granularity",
                           self.args.granularity))
        self._ok(t.cli("lu", "create", "dst", "--size", str(self.size)))
        self._ok(t.cli("lu", "create", RACE_LU, "--size", "1M"))
        self.model = SourceModel(block_digests(data))
        if self.secondary is not None:
            self.setup_secondary()
        t.start()
        if self.secondary is not None:
            self._ok(t.cli("rsg", "create", GROUP, "--volume", SOURCE,
                           "--srl-size", self.args.srl_size))
            self._ok(t.cli("rsg", "link", GROUP, "--secondary",
                           "127.0.0.1:{}".format(self.relay.port), "--mode",
                           self.args.replication, "--token-file",
                           self.token))
        self._ok(t.cli("session", "create", SOURCE, "s", "--dest",
                       "nbd+unix:///dst?socket=" + t.socket,
                       "--granularity", self.args.granularity))

    def setup_secondary(self):
        with open(os.open(self.token, os.O_WRONLY | os.O_CREAT, 0o600),
                  "w") as f:
            f.write("torture-" + self.rng.randbytes(16).hex() + "\n")
        sec = self.secondary
        if self.secondary_disk is not None:
            self.secondary_disk.start()
        os.makedirs(sec.state_dir)
        if self.secondary_disk is not None:
            run = os.path.join(os.path.dirname(self.run_dir), "secondary-run")
            os.makedirs(run)
            os.symlink(run, os.path.join(sec.state_dir, "run"))
        self._ok(sec.cli("lu", "create", SOURCE, "--size", str(self.size)))
        self._ok(sec.cli("clone", "add", SOURCE, SECONDARY_CLONE,
                         "--granularity", self.args.granularity))
        sec.start(connect=False)
        self.relay = Relay(self.replication_port)
        self.relay.start()

    def _ok(self, proc):
        if proc.returncode:
            raise Violation("setup step failed: " + proc.stderr)
        return proc

    def states(self):
        return {c["name"]: c for c in
                self.target.cli_json("clone", "list")}

    # Writers.

    def start_writers(self):
        n = self.args.clients
        per = self.blocks // n
        self.writers = [Writer(self.target, self.model, i * per,
                               (i + 1) * per, self.rng.randrange(1 << 62),
                               self.counters) for i in range(n)]
        for w in self.writers:
            w.start()

    def stop_writers(self):
        for w in self.writers:
            w.stop.set()
        for w in self.writers:
            w.join(60)
            if w.is_alive():
                raise Violation("a writer hung")
        self.writers = []

    def pause_writers(self):
        """Writers flush and wait; returns False if one died (a crash)."""
        for w in self.writers:
            w.pause.set()
        for w in self.writers:
            if not w.paused.wait(60):
                raise Violation("a writer did not pause")
        return all(w.error is None for w in self.writers)

    def resume_writers(self):
        for w in self.writers:
            w.pause.clear()

    # Operations: each returns "ok", "refused" or "crashed".

    def _clone_cmd(self, *args):
        proc = self.target.cli("clone", *args)
        return "ok" if proc.returncode == 0 else "refused"

    def _pick(self, rng, states):
        """A clone, mostly one the operation accepts (refusals are tested
        too, but rarely reach anything)."""
        now = self.states()
        fit = [c for c in self.clones if now[c]["state"] in states]
        if fit and rng.random() < 0.85:
            return rng.choice(fit)
        return rng.choice(self.clones)

    def _rate(self, rng):
        """A copy rate that makes engines run long enough to be killed
        and collide with host writes, or none (full speed)."""
        if rng.random() < 0.3:
            return []
        return ["--rate", str(rng.choice((2, 4, 8, 16)) * MiB)]

    def op_sync(self, rng):
        c = self._pick(rng, ("out-of-sync", "fractured"))
        result = self._clone_cmd("sync", c, *self._rate(rng))
        if result == "ok":
            self.frozen.pop(c, None)
        return result

    def _with_writers_paused(self, func):
        if not self.pause_writers():
            self.resume_writers()
            return "crashed"
        try:
            return func()
        finally:
            self.resume_writers()

    def op_fracture(self, rng):
        return self.op_fracture_of(self._pick(rng, ("synchronized",)))

    def _restore(self, rng, kind):
        c = self._pick(rng, ("fractured",))
        if c not in self.frozen:
            return self._clone_cmd(kind, c)  # refused: not fractured
        if rng.random() < 0.7:
            # Siblings still mirrored make the target refuse: split them.
            for other in self.clones:
                if other != c and self.states()[other]["state"] in (
                        "synchronized", "syncing"):
                    self.op_fracture_of(other)

        def restore():
            # Slow enough to be killed and to meet host I/O; --full makes
            # every extent pending (a fresh fracture differs in few).
            args = [kind, c, "--rate", str(rng.choice((2, 4, 8)) * MiB)]
            if kind == "restore" and rng.random() < 0.6:
                args.append("--full")
            proc = self.target.cli("clone", *args)
            if proc.returncode == 0:
                self.model.replace(self.frozen[c])
                if kind == "reverse-sync":
                    self.frozen.pop(c)
                return "ok"
            if self._target_down():
                self.model.maybe_replace(self.frozen[c])
                return "crashed"
            return "refused"
        return self._with_writers_paused(restore)

    def op_reverse_sync(self, rng):
        return self._restore(rng, "reverse-sync")

    def op_restore(self, rng):
        return self._restore(rng, "restore")

    def op_fracture_of(self, c):
        def fracture():
            result = self._clone_cmd("fracture", c)
            if result == "ok":
                with self.model.lock:
                    self.frozen[c] = list(self.model.shown)
            return result
        return self._with_writers_paused(fracture)

    def session(self):
        return self.target.cli_json("session", "status", "s")

    def op_mark(self, rng):
        """Mark with writers paused and flushed, so the point in time is
        what the Source holds right then."""
        def mark():
            if self.session()["marked"]:
                return self._session_cmd("mark", "s")   # refused
            frozen = block_digests(self.target.read_all(SOURCE, self.size))
            self.marks.append((time.time(), frozen))
            return self._session_cmd("mark", "s", "--export")
        return self._with_writers_paused(mark)

    def _session_cmd(self, *args):
        proc = self.target.cli("session", *args)
        if proc.returncode == 0:
            return "ok"
        return "crashed" if self._target_down() else "refused"

    def op_transfer(self, rng):
        """Transfer (marking first if needed, as `session update` does;
        update itself waits, the transfer here runs during what follows)."""
        if not self.session()["marked"]:
            result = self.op_mark(rng)
            if result != "ok":
                return result
        return self._session_cmd("transfer", "s", "--timeout", "10")

    def op_unmark(self, rng):
        return self._session_cmd("unmark", "s", "--force")

    def op_kill_nbdkit(self, rng):
        # The manager gives up after 6 deaths of nbdkit within 60 s (a
        # crash loop guard, by design): past 4, kill the manager instead.
        now = time.monotonic()
        self.nbdkit_kills = [t for t in self.nbdkit_kills if now - t < 65]
        if len(self.nbdkit_kills) >= 4:
            return self.op_kill_manager(rng)
        time.sleep(rng.random() * 0.5)
        self.nbdkit_kills.append(time.monotonic())
        self.target.kill_nbdkit()
        self.crashed = True
        return "crashed"

    def op_kill_manager(self, rng):
        time.sleep(rng.random() * 0.5)
        self.target.kill_manager()
        self.nbdkit_kills = []
        self.crashed = True
        return "crashed"

    def op_power_cut(self, rng):
        time.sleep(rng.random() * 0.5)
        self.target.power_cut(self.powerfs)
        self.counters["power_cuts"] += 1
        self.nbdkit_kills = []
        self.crashed = True
        return "crashed"

    def op_cut_link(self, rng):
        """Drop the replication connections; refuse new ones for a while
        (the rest of the round runs against the cut link)."""
        self.relay.cut(rng.choice((0.2, 1.0, 3.0)))
        return "ok"

    def op_kill_secondary(self, rng):
        """kill -9 of the secondary, or with --power-loss now and then a
        power cut of its disk."""
        time.sleep(rng.random() * 0.5)
        if self.secondary_disk is not None and rng.random() < 0.5:
            self.secondary.power_cut(self.secondary_disk)
            self.counters["secondary_power_cuts"] += 1
        else:
            self.secondary.kill_manager()
        time.sleep(rng.random())
        self.secondary.start(connect=False)
        self.counters["secondary_kills"] += 1
        return "ok"

    # Seams: other ways into the same bytes.

    def op_cli_race(self, rng):
        """kill -9 of the manager, then CLI commands racing the new
        server's start-up: each goes through the server or refuses; none
        may act on the state directory on its own beside it (a delete of
        a served LU, recovery in a second process)."""
        result = self.op_kill_manager(rng)
        t = self.target
        t.spawn()
        deadline = time.monotonic() + 60
        while not t.serving():
            if t.proc.poll() is not None or time.monotonic() > deadline:
                return result   # wait_serving (in round) says why
            # Each answers through the server or refuses (cli() checks).
            t.cli("lu", "delete", RACE_LU)
            t.cli("clone", "list", "--json")
            self.counters["cli_races"] += 1
        t.wait_serving()
        inventory = {lu["name"]: lu for lu in t.cli_json("status")["lus"]}
        for lu in inventory.values():
            if lu["served"] and not os.path.exists(lu["file"]):
                raise Violation("LU {} is served but its file {} is gone: a "
                                "command acted on the state directory beside "
                                "the starting server".format(lu["name"],
                                                             lu["file"]))
        if RACE_LU not in inventory:
            try:
                t.connect(RACE_LU).shutdown()
            except nbd.Error:
                pass
            else:
                raise Violation("LU {} is served but no longer in the "
                                "inventory: it was deleted beside the "
                                "starting server".format(RACE_LU))
            t.cli("lu", "create", RACE_LU, "--size", "1M")   # next time
        return result

    def _secondary_clone(self):
        return {c["name"]: c for c in
                self.secondary.cli_json("clone", "list")}[SECONDARY_CLONE]

    def op_secondary_clone(self, rng):
        """Sync the secondary's clone, or fracture it once synchronized."""
        sec = self.secondary
        if self._secondary_clone()["state"] == "synchronized" and \
                rng.random() < 0.8:
            if sec.cli("clone", "fracture", SECONDARY_CLONE).returncode:
                return "refused"
            # Whatever the volume held at the fracture; nothing may change
            # it from now on (a restore of the volume reads it, never
            # writes it).
            self.secondary_frozen = block_digests(
                sec.read_file(SECONDARY_CLONE))
            return "ok"
        if sec.cli("clone", "sync", SECONDARY_CLONE,
                   *self._rate(rng)).returncode:
            return "refused"
        self.secondary_frozen = None
        return "ok"

    def op_secondary_restore(self, rng):
        """A protected restore on the secondary while its link is
        detached; the primary attaches again at once and is refused until
        the restore ends, then copies back the regions it changed."""
        if self.secondary_frozen is None:
            return "refused"
        t, address = self.target, "127.0.0.1:{}".format(self.relay.port)
        if t.cli("rsg", "detach", GROUP, "--secondary", address).returncode:
            return "crashed" if self._target_down() else "refused"
        try:
            deadline = time.monotonic() + 15
            while self.secondary.cli_json("rsg", "status",
                                          GROUP).get("connected"):
                if time.monotonic() > deadline:
                    return "refused"
                time.sleep(0.1)
            proc = self.secondary.cli(
                "clone", "restore", SECONDARY_CLONE, "--rate",
                str(rng.choice((2, 4, 8)) * MiB))
            if proc.returncode:
                return "refused"
            self.counters["secondary_restores"] += 1
            return "ok"
        finally:
            if t.cli("rsg", "attach", GROUP, "--secondary",
                     address).returncode and not self._target_down():
                raise Violation("`rsg attach` after a secondary restore "
                                "failed")

    def check_secondary_clone(self, timeout=120):
        """On the caught-up secondary: a synchronized clone equals the
        volume (replicated writes reach it), a fractured or restoring one
        is unchanged since its fracture."""
        deadline = time.monotonic() + timeout
        while True:
            st = self._secondary_clone()
            if not (st.get("operation") or {}).get("running"):
                break
            if time.monotonic() > deadline:
                raise Violation("the secondary's clone operation did not "
                                "finish: {}".format(st))
            time.sleep(0.1)
        sec = self.secondary
        if st["state"] == "synchronized":
            if sec.read_file(SECONDARY_CLONE) != sec.read_file(SOURCE):
                raise Violation("the secondary's synchronized clone differs "
                                "from its volume: a replicated write did "
                                "not reach it")
        elif st["state"] in ("fractured", "restoring"):
            if self.secondary_frozen is None:
                raise Violation("the secondary's clone is {} but the model "
                                "never saw it fractured".format(st["state"]))
            got = block_digests(sec.read_file(SECONDARY_CLONE))
            diff = [b for b in range(self.blocks)
                    if got[b] != self.secondary_frozen[b]]
            if diff:
                raise Violation("the secondary's {} clone changed at blocks "
                                "{}".format(st["state"], diff[:20]))
        else:
            self.secondary_frozen = None
        self.counters["secondary_clone_checks"] += 1

    def op_pause(self, rng):
        time.sleep(rng.random() * 0.3)
        return "ok"

    def _target_down(self):
        return self.target.proc is None or not self.target.info()

    # Rounds.

    def round(self):
        rng = self.rng
        self.crashed = False
        self.trace = []
        self.start_writers()
        try:
            for _ in range(rng.randint(1, self.args.ops_per_round)):
                name = rng.choices([o[0] for o in OPERATIONS],
                                   self.weights)[0]
                result = getattr(self, "op_" + name.replace("-", "_"))(rng)
                self.trace.append((name, result))
                time.sleep(rng.random() * 0.3)
                self.counters["operations"] += 1
                if result == "refused":
                    self.counters["refused"] += 1
                if result == "crashed":
                    break
        finally:
            self.stop_writers()
        if self.crashed:
            self.counters["crashes"] += 1
            if self.target.proc is None:
                self.target.start()
            else:
                self.target.wait_serving()
        self.settle()
        self.check()
        self.counters["rounds"] += 1

    def settle(self, timeout=120):
        """Wait until no clone operation or transfer runs."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.states()
            running = [n for n, s in states.items()
                       if (s.get("operation") or {}).get("running")]
            if self.session()["transferring"]:
                running.append("session s")
            if not running:
                return states
            if time.monotonic() > deadline:
                raise Violation("operations did not finish: {}".format(
                    states))
            time.sleep(0.1)

    def check(self):
        t = self.target
        states = self.states()
        for c, st in states.items():
            if st["state"] in ("syncing", "reverse-syncing"):
                raise Violation("clone {} is {} with no operation running "
                                "(error: {})".format(c, st["state"],
                                                     st.get("error")))
        actual = block_digests(t.read_all(SOURCE, self.size))
        bad = self.model.check(actual, self.crashed)
        if bad:
            raise Violation("the Source lost acknowledged writes at blocks "
                            "{} (crash in this round: {})".format(
                                bad[:20], self.crashed))
        src_file = t.read_file(SOURCE)
        for c, st in states.items():
            if st["state"] in ("fractured", "restoring"):
                if c not in self.frozen:
                    raise Violation("clone {} is {} but the model never "
                                    "saw it fractured".format(c, st["state"]))
                got = block_digests(t.read_file(c))
                diff = [b for b in range(self.blocks)
                        if got[b] != self.frozen[c][b]]
                if diff:
                    raise Violation("{} clone {} changed at blocks {}".format(
                        st["state"], c, diff[:20]))
            else:
                self.frozen.pop(c, None)
            if st["state"] == "synchronized":
                if t.read_file(c) != src_file:
                    raise Violation("synchronized clone {} differs from "
                                    "its Source: the maps missed a "
                                    "divergence".format(c))
        self.check_session()
        if self.secondary is not None:
            self.check_replication()
        self.counters["checks"] += 1

    def _mark_before(self, when):
        """The Source at the last mark attempt before `when` (an ISO 8601
        time, as status prints it)."""
        when = datetime.datetime.fromisoformat(
            when.replace("Z", "+00:00")).timestamp()
        earlier = [m for m in self.marks if m[0] <= when]
        if not earlier:
            raise Violation("session state at {} but no mark was made "
                            "before".format(when))
        return earlier[-1][1]

    def check_session(self):
        t = self.target
        st = self.session()
        if st["marked"]:
            frozen = self._mark_before(st["mark_time"] or _now_iso())
            got = block_digests(t.read_all("src@s", self.size))
            diff = [b for b in range(self.blocks) if got[b] != frozen[b]]
            if diff:
                raise Violation("the frozen export src@s is not the Source "
                                "at the mark, blocks {}".format(diff[:20]))
        dest = st["destinations"][0]
        last = st["last_transfer"] or {}
        if dest["consistency"] == "consistent":
            frozen = self._mark_before(dest["last_success"])
            got = block_digests(t.read_file("dst"))
            diff = [b for b in range(self.blocks) if got[b] != frozen[b]]
            if diff:
                raise Violation("destination recorded consistent after "
                                "the transfer of {} differs from the "
                                "Source at that mark, blocks {}".format(
                                    last.get("finished"), diff[:20]))
            self.counters["session_checks"] += 1

    def replication_status(self):
        return replication_status(self.target, self.secondary)

    def check_replication(self, timeout=120):
        """A secondary that says it is inconsistent refuses reads; once
        caught up it equals the Source."""
        self.relay.heal()
        _, link, s = self.replication_status()
        if s and not s.get("consistent"):
            try:
                self.secondary.read_all(SOURCE, self.size)
            except nbd.Error:
                self.counters["inconsistent_refused"] += 1
            else:
                _, _, again = self.replication_status()
                if not again.get("consistent"):
                    raise Violation("the secondary reports itself "
                                    "inconsistent ({}) but serves reads"
                                    .format(s.get("reason")))
        deadline = time.monotonic() + timeout
        while True:
            p, link, s = self.replication_status()
            # "failed" alone is retried; a stopped link or a split brain
            # is not.
            if link and (link["stopped_error"] or
                         link["state"] == "diverged"):
                raise Violation("replication link {}: {}".format(
                    link["state"], link["stopped_error"] or link["error"]))
            if caught_up(p, link, s):
                break
            if time.monotonic() > deadline:
                raise Violation("the secondary did not catch up in {} s: "
                                "link {}, secondary {}".format(
                                    timeout, link, s))
            time.sleep(0.1)
        primary = self.target.read_all(SOURCE, self.size)
        replica = self.secondary.read_all(SOURCE, self.size)
        if primary != replica:
            diff = [b for b in range(self.blocks)
                    if primary[b * BLOCK:(b + 1) * BLOCK] !=
                    replica[b * BLOCK:(b + 1) * BLOCK]]
            raise Violation("the caught-up secondary differs from the "
                            "Source at blocks {} (link {})".format(
                                diff[:20], link))
        self.counters["replica_checks"] += 1
        self.check_secondary_clone()

    def run(self):
        start = time.monotonic()
        self.setup()
        a = self.args
        while True:
            if a.rounds is not None and self.counters["rounds"] >= a.rounds:
                break
            if a.rounds is None and time.monotonic() - start >= a.time:
                break
            self.round()
            if a.verbose:
                print("round {rounds}: crashes {crashes}, operations "
                      "{operations}".format(**self.counters), self.trace,
                      flush=True)
        self.stop()
        return time.monotonic() - start

    def stop(self):
        for w in self.writers:
            w.stop.set()
        self.target.stop()
        if self.secondary is not None:
            self.secondary.stop()
            if self.relay is not None:
                self.relay.stop()
            if self.secondary_disk is not None:
                self.secondary_disk.stop()
        if self.powerfs is not None:
            self.powerfs.stop()


# (name, weight).
OPERATIONS = [
    ("mark", 2),
    ("transfer", 2),
    ("unmark", 1),
    ("sync", 4),
    ("fracture", 3),
    ("reverse-sync", 1),
    ("restore", 2),
    ("kill-nbdkit", 2),
    ("kill-manager", 1),
    ("pause", 3),
    ("power-cut", 2),   # --power-loss only
    ("cut-link", 2),    # --replication only
    ("kill-secondary", 1),   # --replication only
    ("cli-race", 1),
    ("secondary-clone", 3),  # --replication only
    ("secondary-restore", 1),    # --replication only
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="scripts/torture",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Crash torture of clonectl: random host I/O, clone and "
                    "session operations, kill -9 (and power cuts, link cuts), "
                    "checked against a model.",
        epilog="""after each round: what a host reads is the last acknowledged write (after a
crash: the last durable one or a later one); fractured and restoring clones
are unchanged since their fracture; synchronized clones equal their Source;
a marked session's frozen export reads as the Source at the mark; a
destination recorded consistent holds that mark; with --replication, an
inconsistent secondary refuses reads, a caught-up one equals the Source,
and the secondary's clone r1 equals its volume while synchronized and is
unchanged while fractured; CLI commands racing a server's start-up never
act beside it.

examples:
  scripts/torture --time 600                        ten minutes, random seed
  scripts/torture --power-loss --time 600           with power cuts (FUSE, root)
  scripts/torture --replication sync --power-loss   replicated, with cuts
  scripts/torture --seed 4 --rounds 30              replay a failing run

exit status: 0 when every check held, 1 on a violation (the replay command
and the work directory are printed; the directory is kept).""")
    p.add_argument("--seed", type=int, default=None,
                   help="seed (default: random, printed)")
    p.add_argument("--time", type=float, default=60.0,
                   help="run for this many seconds (default 60)")
    p.add_argument("--rounds", type=int, default=None,
                   help="run this many rounds instead of --time")
    p.add_argument("--size", type=int, default=8 * MiB,
                   help="Source size in bytes (default 8 MiB)")
    p.add_argument("--granularity", default="64K",
                   help="clone and session granularity (default 64K)")
    p.add_argument("--clients", type=int, default=3,
                   help="NBD clients writing at once, each in its own "
                        "region (default 3)")
    p.add_argument("--no-clones", action="store_true",
                   help="no clones on the Source (and no clone "
                        "operations): the sessions are then its only "
                        "layer, whose first writes are acknowledged once "
                        "queued")
    p.add_argument("--ops-per-round", type=int, default=6,
                   help="at most this many operations a round (default 6)")
    p.add_argument("--power-loss", action="store_true",
                   help="keep the state directory on scripts/powerfs.py and "
                        "add power cuts: unsynced writes are lost")
    p.add_argument("--unsafe-ignore-fsync", action="store_true",
                   help="with --power-loss: the disk ignores fsync and "
                        "fdatasync (the twin run: must fail)")
    p.add_argument("--unsafe-ignore-dir-fsync", action="store_true",
                   help="with --power-loss: the disk ignores fsync of "
                        "directories, so new, renamed and removed files may "
                        "come back as they were (the twin run: must fail)")
    p.add_argument("--replication", choices=("async", "sync"),
                   help="replicate the Source to a second target over a "
                        "relay that the run cuts, and kill -9 that too")
    p.add_argument("--srl-size", default="1M",
                   help="with --replication: the log's size (default 1M, "
                        "small enough to overflow to the change map)")
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="print each round's operations and results")
    args = p.parse_args(argv)
    for unsafe in ("unsafe_ignore_fsync", "unsafe_ignore_dir_fsync"):
        if getattr(args, unsafe) and not args.power_loss:
            p.error("--{} needs --power-loss".format(unsafe.replace("_", "-")))
    if args.seed is None:
        args.seed = random.randrange(1 << 31)
    return args


def replay_command(args):
    how = "--rounds {}".format(args.rounds) if args.rounds is not None \
        else "--time {:g}".format(args.time)
    return "scripts/torture --seed {} {} --size {} --granularity {} " \
           "--clients {} --ops-per-round {}{}".format(
               args.seed, how, args.size, args.granularity, args.clients,
               args.ops_per_round,
               (" --power-loss" if args.power_loss else "") +
               (" --unsafe-ignore-fsync" if args.unsafe_ignore_fsync
                else "") +
               (" --unsafe-ignore-dir-fsync"
                if args.unsafe_ignore_dir_fsync else "") +
               (" --replication {} --srl-size {}".format(
                   args.replication, args.srl_size)
                if args.replication else ""))


def main(argv=None):
    args = parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="clonectl-torture-")
    print("torture: seed {} (work directory {})".format(args.seed, workdir),
          flush=True)
    t = Torture(args, workdir)
    status = 0
    started = time.monotonic()
    try:
        t.run()
    except Violation as e:
        status = 1
        print("torture: INVARIANT VIOLATED: {}".format(e), flush=True)
        print("torture: replay with: {}".format(replay_command(args)))
        print("torture: server log in {}".format(
            os.path.join(workdir, "serve.log")))
        args.keep = True
    finally:
        t.stop()
    c = t.counters
    replication = ""
    if args.replication:
        replication = "secondary-kills {} (power cuts {}) replica-checks " \
            "{} (inconsistent and refusing {}) secondary-clone-checks {} " \
            "secondary-restores {} ".format(
                c["secondary_kills"], c["secondary_power_cuts"],
                c["replica_checks"], c["inconsistent_refused"],
                c["secondary_clone_checks"], c["secondary_restores"])
    print("torture: seed {} rounds {} crashes {} power-cuts {} "
          "operations {} (refused {}) "
          "writes {} flushes {} checks {} (consistent destination {}) "
          "cli-races {} {}in {:.1f} s: {}".format(
              args.seed, c["rounds"], c["crashes"], c["power_cuts"],
              c["operations"],
              c["refused"], c["writes"], c["flushes"], c["checks"],
              c["session_checks"], c["cli_races"], replication,
              time.monotonic() - started, "FAILED" if status else "ok"),
          flush=True)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
