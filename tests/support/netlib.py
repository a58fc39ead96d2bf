"""Plugin: the `cluster` and `netlab` fixtures.

Multi-node replication harness: each `clonectl serve` in its own network
namespace, joined by veth pairs to a bridge in the root namespace, all made
(and always removed) by the network harness scripts/netns.py (`netlab` is
a bare netns.Lab of it).

    root ns:  bridge (10.A.B.1/24)
                |-- veth host end  <->  its peer in node i's netns (10.A.B.(10+i))

Every node serves NBD on its own address (port 10809) and listens for
primaries on its replication port (7000), so any node can become a primary
or a secondary.  Tests reach every node from the root namespace through the
bridge (libnbd over TCP); the CLI talks to a node over the Unix control
socket in its state directory, so it runs in the root namespace.

`Node.cut()` / `Node.restore()` set the node's bridge-side veth down/up
(the node is cut off from everyone), `Node.delay(ms)` adds netem delay on
both ends of its veth, `Cluster.cut_between(a, b)` drops the traffic
between two nodes only (blackhole routes), `Node.kill9()` SIGKILLs the
manager and its nbdkit by PID (from the server record).  Nothing is ever
killed by name.
"""

import json
import os
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.cli import CLONECTL
from tests.support.processes import ProcessGuard, wait_pid_gone
from tests.support.scripts import load
from tests.support.servers import Server

netns = load("netns")

NBD_PORT = 10809
REPL_PORT = 7000
BLOCK = 4096
POLL = 0.1
WAIT = 30.0


# ---------------------------------------------------------------- commands

def clonectl(state_dir, *args, check=True, timeout=60):
    cmd = [CLONECTL, "--state-dir", str(state_dir)] + [str(a) for a in args]
    env = dict(os.environ)
    env.pop("CLONECTL_STATE", None)
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError("{} exited with {}\nstdout:\n{}\nstderr:\n{}"
                             .format(" ".join(cmd), proc.returncode,
                                     proc.stdout, proc.stderr))
    return proc


def netns_available():
    why = netns.available()
    if why:
        return why
    try:
        import nbd  # noqa: F401
    except ImportError:
        return "no libnbd python bindings"
    return None


# ---------------------------------------------------------------- network

class Net:
    """A bridge in the root namespace; nodes hang off it."""

    def __init__(self, tag):
        self.lab = netns.Lab("clr")
        self.prefix = "10.{}.{}".format(180 + (tag >> 8) % 60, tag % 256)
        self.host_ip = self.prefix + ".1"
        self.bridge = None

    def create(self):
        self.bridge = self.lab.bridge(self.host_ip + "/24")

    def add_ns(self, i):
        """Node i's namespace, its veth (host end on the bridge) and
        address: (namespace, host end, node end, address)."""
        ip = "{}.{}".format(self.prefix, 10 + i)
        ns = self.lab.namespace()
        hdev, ndev = self.lab.veth(netns.HOST, ns, None, ip + "/24")
        hdev.set_master(self.bridge)
        return ns, hdev, ndev, ip

    @property
    def namespaces(self):
        return self.lab.namespaces

    def destroy(self):
        self.lab.close()


# ---------------------------------------------------------------- nodes

class Node:
    """One clonectl target in its own namespace."""

    def __init__(self, cluster, i, name):
        self.cluster = cluster
        self.name = name
        self.ns, self.hdev, self.ndev, self.ip = cluster.net.add_ns(i)
        self.state_dir = cluster.base / name / "state"
        self.state_dir.parent.mkdir(parents=True, exist_ok=True)
        self.out_path = cluster.base / name / "serve.out"
        self.token = cluster.token
        self.server = None
        self.info = None
        self.nbdkit_pid = None
        self.handles = []

    @property
    def addr(self):
        return "{}:{}".format(self.ip, REPL_PORT)

    def cli(self, *args, check=True, timeout=60):
        return clonectl(self.state_dir, *args, check=check, timeout=timeout)

    def lu_create(self, name, size):
        self.cli("lu", "create", name, "--size", size)

    # Processes.

    def start(self, timeout=WAIT):
        # The manager enters the namespace itself (setns before exec): the
        # PID is the manager's.  It publishes serve.json only once its NBD
        # port answers.
        self.server = Server(
            self.state_dir, None, self.out_path, self.cluster.guard,
            extra_args=["--port", str(NBD_PORT), "--bind", self.ip,
                        "--replication-port", str(REPL_PORT),
                        "--replication-bind", self.ip,
                        "--replication-token-file", str(self.token)],
            where=self.ns)
        self.server.start(timeout)
        self.info = self.server.info
        self.nbdkit_pid = self.server.nbdkit_pid
        return self

    @property
    def proc(self):
        return self.server.proc if self.server is not None else None

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def close_handles(self):
        for h in self.handles:
            try:
                h.shutdown()
            except Exception:
                pass
        self.handles.clear()

    def kill9(self):
        """SIGKILL the manager and its nbdkit, by PID, at once."""
        pids = [p for p in (self.proc.pid if self.proc else None,
                            self.nbdkit_pid) if p]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc:
            self.proc.wait(10)
        for pid in pids:
            wait_pid_gone(pid, 10)
        self.handles.clear()  # dead connections; not shut down cleanly
        self.server._log.close()

    def stop(self):
        """SIGTERM the manager by PID (SIGKILL after 30 s)."""
        self.close_handles()
        if self.server is not None:
            self.server.stop()

    # Network.

    def cut(self):
        self.hdev.down()

    def restore(self):
        self.hdev.up()

    def delay(self, ms, fallback_rate_mbit=50):
        """netem delay of ms on both ends of this node's veth (RTT 2*ms).
        Where the kernel has no netem (sch_netem), shape the traffic to
        and from the node with tbf at fallback_rate instead (a slow link,
        not a long one).  Return what was applied."""
        ends = (self.hdev, self.ndev)
        try:
            return [end.shape(delay_ms=ms) for end in ends][0]
        except netns.NoNetem:
            return [end.shape(rate_mbit=fallback_rate_mbit)
                    for end in ends][0]

    def undelay(self):
        for end in (self.hdev, self.ndev):
            end.clear()

    # NBD.

    def connect(self, export, retries=0):
        import nbd
        last = None
        for _ in range(retries + 1):
            h = nbd.NBD()
            try:
                h.set_export_name(export)
                h.connect_tcp(self.ip, str(NBD_PORT))
                self.handles.append(h)
                return h
            except nbd.Error as e:
                last = e
                time.sleep(0.2)
        raise last

    def read_all(self, export, size):
        """Read export fully over NBD (one connection), return bytes."""
        h = self.connect(export)
        try:
            got = h.get_size()
            assert got == size, "export {} of {} is {} bytes, not {}".format(
                export, self.name, got, size)
            out = bytearray()
            step = 1 << 20
            for off in range(0, size, step):
                out += h.pread(min(step, size - off), off)
            return bytes(out)
        finally:
            try:
                h.shutdown()
            except Exception:
                pass
            if h in self.handles:
                self.handles.remove(h)

    def lu_file(self, lu):
        return self.state_dir / "lus" / (lu + ".img")

    # Status.

    def rsg(self, group):
        proc = self.cli("rsg", "status", group, "--json", check=False)
        if proc.returncode != 0:
            return {"error": (proc.stdout + proc.stderr).strip()}
        return json.loads(proc.stdout)

    def link(self, group, secondary):
        st = self.rsg(group)
        for l in st.get("links") or []:
            if l["secondary"] == secondary.addr:
                return l
        return None

    def log_tail(self, n=3000):
        text = ""
        try:
            text = self.out_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            pass
        serve_log = self.state_dir / "run" / "serve.log"
        if serve_log.exists():
            text += "\n--- run/serve.log:\n" + serve_log.read_text(
                errors="replace")[-n:]
        return text


class Cluster:
    def __init__(self, base, tag):
        self.base = Path(base)
        self.guard = ProcessGuard()
        self.net = Net(tag)
        self.nodes = []
        self.token = self.base / "token"
        self.token.write_text("t0ken-" + "x" * 20 + "\n")
        os.chmod(self.token, 0o600)
        self.bad_token = self.base / "badtoken"
        self.bad_token.write_text("wrong-" + "y" * 20 + "\n")
        os.chmod(self.bad_token, 0o600)

    def node(self, name, lus=(), start=True):
        n = Node(self, len(self.nodes), name)
        self.nodes.append(n)
        for lu, size in lus:
            n.lu_create(lu, size)
        if start:
            n.start()
        return n

    def cut_between(self, a, b):
        """Cut the path between nodes a and b only (both stay reachable
        from the root namespace): a blackhole route to the other on each
        side, so packets between them are dropped silently."""
        a.ns.blackhole(b.ip)
        b.ns.blackhole(a.ip)

    def heal_between(self, a, b):
        a.ns.blackhole(b.ip, on=False)
        b.ns.blackhole(a.ip, on=False)

    def describe(self, group=None):
        parts = []
        for n in self.nodes:
            st = n.rsg(group) if group else None
            parts.append("=== {} ({}) rsg status: {}\n--- log tail:\n{}".format(
                n.name, n.addr, json.dumps(st, indent=1) if st else "-",
                n.log_tail(2000)))
        return "\n".join(parts)

    def wait(self, pred, what, group=None, timeout=WAIT):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = pred()
            if last:
                return last
            time.sleep(POLL)
        raise AssertionError("timed out after {} s waiting for {}\n{}".format(
            timeout, what, self.describe(group)))

    def teardown(self):
        problems = []
        for n in self.nodes:
            try:
                n.close_handles()
                if n.running():
                    n.stop()
            except Exception as e:
                problems.append("{}: {}".format(n.name, e))
        self.guard.cleanup()
        self.net.destroy()
        return problems


@pytest.fixture
def cluster(tmp_path):
    why = netns_available()
    if why:
        pytest.skip(why)
    c = Cluster(tmp_path, (os.getpid() + cluster.count) % 10000)
    cluster.count += 1
    try:
        c.net.create()
    except (OSError, netns.NetlinkError) as e:
        c.net.destroy()
        pytest.skip("cannot make a bridge: {}".format(e))
    try:
        yield c
    finally:
        made = [ns.name for ns in c.net.namespaces]
        c.teardown()
    left = set(made) & set(netns.names())
    assert not left, "namespaces left behind: {}".format(sorted(left))


cluster.count = 0


@pytest.fixture
def netlab():
    """A scripts/netns.py Lab: its namespaces, bridges and veth pairs are
    removed at teardown, also after a failing test."""
    why = netns.available()
    if why:
        pytest.skip(why)
    lab = netns.Lab("cltl")
    try:
        yield lab
    finally:
        made = [ns.name for ns in lab.namespaces]
        lab.close()
    left = set(made) & set(netns.names())
    assert not left, "namespaces left behind: {}".format(sorted(left))


# ---------------------------------------------------------------- waits

def wait_link(c, primary, group, secondary, states, timeout=WAIT,
              pred=None):
    """Wait until the link's state is in states (and pred(link) holds)."""
    if isinstance(states, str):
        states = (states,)

    def check():
        l = primary.link(group, secondary)
        if l and l["state"] in states and (pred is None or pred(l)):
            return l
        return None
    return c.wait(check, "link {} -> {} in {}".format(
        group, secondary.name, states), group, timeout)


def wait_caught_up(c, primary, group, secondary, timeout=WAIT):
    """Link replicating with no lag, and the secondary consistent and
    applied up to the primary's last update."""
    def check():
        p = primary.rsg(group)
        l = next((x for x in p.get("links") or []
                  if x["secondary"] == secondary.addr), None)
        if not l or l["state"] != "replicating" or l["lag_updates"]:
            return None
        s = secondary.rsg(group)
        if s.get("consistent") and s.get("applied_seq") == p["last_seq"]:
            return l
        return None
    return c.wait(check, "{} caught up on {}".format(secondary.name, group),
                  group, timeout)


def wait_secondary_settled(c, secondary, group, quiet=0.5, timeout=WAIT):
    """Secondary's applied_seq and consistency unchanged for `quiet` s
    (after a cut its TCP connection may still look open)."""
    state = {"seq": None, "since": None}

    def check():
        s = secondary.rsg(group)
        if "error" in s and "role" not in s:
            return None
        key = (s.get("applied_seq"), s.get("consistent"))
        now = time.monotonic()
        if key != state["seq"]:
            state["seq"], state["since"] = key, now
            return None
        return s if now - state["since"] >= quiet else None
    return c.wait(check, "{} settled".format(secondary.name), group, timeout)


# ---------------------------------------------------------------- workload

HEAD = struct.Struct("<8sQIQ")       # magic seq vol block
MAGIC = b"RSGSEQ01"


def make_block(seq, vol, blk):
    head = HEAD.pack(MAGIC, seq, vol, blk)
    fill = struct.pack("<Q", (seq * 0x9E3779B97F4A7C15 + blk) & (2**64 - 1))
    return (head + fill * (BLOCK // 8))[:BLOCK]


class WriteLog:
    """Sequence-numbered writes to 4 KiB blocks of several volumes: the
    model of every prefix."""

    def __init__(self, vols):
        self.vols = list(vols)          # [(name, size)]
        self.seq = 0                    # last issued
        self.acked = 0                  # last acknowledged to the host
        self.writes = []                # (seq, vol, blk) in ack order
        self.per_block = {}             # (vol, blk) -> [seqs]

    def record(self, vol, blk):
        """Called just BEFORE the write is issued (a write in flight may
        be on the secondary); set .acked after it returns."""
        self.seq += 1
        self.writes.append((self.seq, vol, blk))
        self.per_block.setdefault((vol, blk), []).append(self.seq)
        return self.seq

    def expected_seq(self, vol, blk, upto):
        import bisect
        seqs = self.per_block.get((vol, blk))
        if not seqs:
            return 0
        i = bisect.bisect_right(seqs, upto)
        return seqs[i - 1] if i else 0

    def image(self, vol, upto):
        name, size = self.vols[vol]
        out = bytearray(size)
        for (v, blk), seqs in self.per_block.items():
            if v != vol:
                continue
            s = self.expected_seq(v, blk, upto)
            if s:
                out[blk * BLOCK:(blk + 1) * BLOCK] = make_block(s, v, blk)
        return bytes(out)

    def check_prefix(self, images, allow_beyond=0):
        """images: [bytes per volume].  Return S (the max seq found) if
        they equal exactly the prefix of writes up to S; else raise
        AssertionError naming the first wrong block."""
        found = {}
        zero = bytes(BLOCK)
        for vol, img in enumerate(images):
            for blk in range(len(img) // BLOCK):
                b = img[blk * BLOCK:(blk + 1) * BLOCK]
                if b == zero:
                    found[(vol, blk)] = 0
                    continue
                magic, seq, v, bb = HEAD.unpack_from(b)
                if magic != MAGIC or v != vol or bb != blk or \
                        b != make_block(seq, vol, blk):
                    raise AssertionError(
                        "volume {} block {}: not a block of the workload "
                        "(garbage or torn): {!r}".format(vol, blk, b[:32]))
                found[(vol, blk)] = seq
        top = max(found.values()) if found else 0
        if top > self.seq + allow_beyond:
            raise AssertionError("secondary holds seq {} but only {} were "
                                 "written".format(top, self.seq))
        bad = []
        for (vol, blk), seq in found.items():
            want = self.expected_seq(vol, blk, top)
            if seq != want:
                bad.append((vol, blk, seq, want))
        if bad:
            bad.sort(key=lambda x: x[3])
            raise AssertionError(
                "secondary is not a prefix of the write order: max seq {} "
                "but {} block(s) differ from the prefix model, e.g. "
                "(vol, block, has seq, prefix wants seq) {}".format(
                    top, len(bad), bad[:8]))
        return top


class Writer:
    """A thread writing sequence-numbered blocks at random indices of the
    primary's volumes (one NBD connection per volume, one write at a time,
    so the order of acknowledgements is the order of sequence numbers)."""

    def __init__(self, node, wlog, seed, flush_every=0, interval=0.0,
                 blocks=None):
        import random
        import threading
        self.node = node
        self.wlog = wlog
        self.rnd = random.Random(seed)
        self.flush_every = flush_every
        self.interval = interval
        self.blocks = blocks            # restrict to the first N blocks
        self.handles = [node.connect(name) for name, _ in wlog.vols]
        self.error = None
        self._run = threading.Event()
        self._stop = False
        self._idle = threading.Event()
        self._idle.set()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        n = 0
        try:
            while not self._stop:
                if not self._run.is_set():
                    self._idle.set()
                    self._run.wait(0.1)
                    continue
                self._idle.clear()
                if not self._run.is_set() or self._stop:
                    continue
                vol = self.rnd.randrange(len(self.wlog.vols))
                nblk = self.wlog.vols[vol][1] // BLOCK
                if self.blocks:
                    nblk = min(nblk, self.blocks)
                blk = self.rnd.randrange(nblk)
                seq = self.wlog.record(vol, blk)
                self.handles[vol].pwrite(make_block(seq, vol, blk),
                                         blk * BLOCK)
                n += 1
                if self.flush_every and n % self.flush_every == 0:
                    self.handles[vol].flush()
                self.wlog.acked = seq
                if self.interval:
                    time.sleep(self.interval)
        except Exception as e:      # the primary died (kill -9) or a bug
            self.error = e
        finally:
            self._idle.set()

    def resume(self):
        self._run.set()

    def pause(self, timeout=30):
        """Stop issuing writes; return when none is in flight."""
        self._run.clear()
        self._idle.clear() if self.thread.is_alive() else None
        deadline = time.monotonic() + timeout
        while self.thread.is_alive() and not self._idle.is_set():
            if time.monotonic() > deadline:
                raise AssertionError("writer did not pause")
            time.sleep(0.01)
        if self.error:
            raise AssertionError("writer failed: {!r}".format(self.error))

    def write_n(self, n):
        """n writes from the calling thread (the writer must be paused)."""
        for _ in range(n):
            vol = self.rnd.randrange(len(self.wlog.vols))
            blk = self.rnd.randrange(self.wlog.vols[vol][1] // BLOCK)
            seq = self.wlog.record(vol, blk)
            self.handles[vol].pwrite(make_block(seq, vol, blk), blk * BLOCK)
            self.wlog.acked = seq

    def run_for(self, seconds):
        self.resume()
        time.sleep(seconds)

    def flush(self):
        for h in self.handles:
            h.flush()

    def stop(self):
        self._stop = True
        self._run.set()
        self.thread.join(30)
