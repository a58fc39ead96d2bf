"""In-process replication nodes for engine tests: Targets on state
directories of their own, linked over 127.0.0.1 TCP, no nbdkit.

Three small parts, each usable alone:
- `Node`: one Target on a state directory with the given volumes; start,
  close (a clean stop) and kill (a kill -9 at a quiet moment), listening
  for primaries on a port of its own that stays the same across restarts;
- `Pair`: a primary node `a` (root/A) and a secondary node `b` (root/B,
  listening) sharing one token file; `create_group` and `link_up` make and
  link the replicated group "g", and the pair tells whether the secondary
  caught up (`converged`);
- `made(cls, prefix)`: the body of a factory fixture, which builds pairs
  (or nodes) in temporary directories and closes and removes them all;
- `linked_pair(root, mode, srl, granularity)`: the body of a fixture, a
  pair with one volume, its group and a link, converged, fast timing.

A test module configures them (volumes, group, model) in a subclass;
tests/support/rsgpair.py (the DCM replay tests' pair) is one.

A kill -9 is simulated at a quiet moment: every thread is stopped, the
group's, clones' and sessions' files are closed without a save (a close of
the Target or of a group would persist their records), and the Target is
abandoned; what was written is in the page cache, as after a kill -9.  Not
simulated: a kill in the middle of a request or of a persist.
"""

import contextlib
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback

from tests.support.rsgmodel import fast_timing, restore_timing, wait_for
from tests.support.sockets import free_port
from target import clones, inventory
from target import replication as R
from target.target import Target

TOKEN = "replication-token-0123456789"
GROUP = "g"


def write_token(path, text=TOKEN):
    """A token file only its owner can read (the engine refuses others)."""
    with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(text)
    return path


def read_image(t, name):
    """The whole volume `name` of Target t, read below its stack."""
    lu = t.lus[name]
    buf = bytearray(lu.size)
    lu.backend.readinto(buf, 0)
    return bytes(buf)


def wake_accept(port):
    """A closed listener's accept thread holds its port until one more
    connection wakes it up."""
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
    except OSError:
        pass


class Node:
    """One Target on the state directory `dir`, made with the volumes
    `vols` ({name: size}); `t` is the running Target or None.  It listens
    for primaries on `port` once `listen` was called (a node made with
    listens=True does from its first start on), and again after each
    restart."""

    def __init__(self, dir, vols, tok, listens=True):
        self.dir = dir
        self.vols = dict(vols)
        self.tok = tok
        sd = inventory.StateDir(dir)
        sd.ensure()
        for name, size in self.vols.items():
            inventory.create_lu(sd, name, size=size)
        self.port = free_port() if listens else None
        self.t = None

    @property
    def addr(self):
        return None if self.port is None else "127.0.0.1:%d" % self.port

    def loaded(self):
        """Called when a new Target has read its state directory, before
        it starts anything (a subclass notes what it needs then)."""

    def start(self):
        self.t = Target(self.dir)
        self.loaded()
        self.t.start()
        if self.port is not None:
            self.listen()
        return self.t

    def listen(self):
        """Listen for primaries on self.port (a free one the first time).
        The port of a Target just closed or killed may take a moment to be
        free again."""
        if self.port is None:
            self.port = free_port()
        for _ in range(50):
            try:
                self.t.start_replication("127.0.0.1", self.port, self.tok)
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("cannot listen on port %d again" % self.port)

    def wake_accept(self):
        if self.port is not None:
            wake_accept(self.port)

    def close(self):
        """A clean stop."""
        if self.t is not None:
            t, self.t = self.t, None
            t.close()
            self.wake_accept()

    def kill(self):
        """kill -9 at a quiet moment (module notes): threads stop, nothing
        is persisted (no group record, no clone commit); what was written
        is in the page cache and stays."""
        t, self.t = self.t, None
        with t.lock:
            t.closing = True    # a dead process takes no new primary
        server = t.rsg_ops.replica_server
        if server is not None:
            server.stop()
        for g in list(t.rsgs.values()):
            if g.role == R.PRIMARY:
                for link in g.links:
                    link.stop()
                for link in g.links:
                    link.dcm.close()
                if g.since is not None:
                    g.since.close()
                g.al.close()
                g.srl.close()
            else:
                # Shuts the connection and saves nothing: nor does the
                # end of its session (a kill -9 does not run it).
                g._settle = lambda: None
                g.close()
        if server is not None:
            server.join()
            # A thread of the dead target that went on would change the
            # new one's state directory.
            alive = [th for th in server.connections if th.is_alive()]
            assert not alive, "a replication session outlived its " \
                "target:\n" + "".join(traceback.format_stack(
                    sys._current_frames()[alive[0].ident]))
        for group in t.groups.values():
            # The clones' legs of the writes before the quiet moment land
            # (they are part of those requests); later ones are refused.
            group.legs.close()
            if group.engine is not None:
                group.engine.stop(None)
                group.engine.join()
            group.activity_file.close()
            group.prm_file.close()
            for c in group.clones.values():
                c.backend.close()
        for s in t.sessions.values():
            s.tracking.close()
            s.save_area.backend.close()
        for lu in t.lus.values():
            lu.close()
        self.wake_accept()

    def read_image(self, name):
        return read_image(self.t, name)


def _target_of(node):
    """A pair's property: the Target of its node `node` (settable)."""
    return property(lambda pair: getattr(pair, node).t,
                    lambda pair, t: setattr(getattr(pair, node), "t", t))


class Pair:
    """A primary node `a` (state directory root/A) and a secondary node
    `b` (root/B, listening), both with the volumes `vols`; the secondary
    starts first.  `ta` and `tb` are their Targets (None while stopped;
    a test may set them to a Target it made on `A` or `B`)."""

    def __init__(self, root, vols):
        self.root = root
        self.tok = write_token(os.path.join(root, "tok"))
        self.a = Node(os.path.join(root, "A"), vols, self.tok, listens=False)
        self.b = Node(os.path.join(root, "B"), vols, self.tok)
        self.b.start()
        self.a.start()

    # Nodes.

    A = property(lambda self: self.a.dir)
    B = property(lambda self: self.b.dir)
    port = property(lambda self: self.b.port)
    addr = property(lambda self: self.b.addr)      # the secondary's

    ta = _target_of("a")
    tb = _target_of("b")

    @property
    def g(self):
        return self.ta.rsgs[GROUP]

    @property
    def link(self):
        return self.g.links[0]

    @property
    def sg(self):
        return self.tb.rsgs.get(GROUP) if self.tb is not None else None

    def create_group(self, srl, granularity):
        """The group of all the volumes on the primary."""
        self.ta.rsg_create(GROUP, list(self.a.vols), srl,
                           granularity=granularity)

    def link_up(self, mode="async", **kw):
        self.ta.rsg_link(GROUP, self.addr, mode, self.tok, **kw)

    def start_secondary(self):
        assert self.tb is None
        self.b.start()

    def stop_secondary(self):
        self.b.close()

    def restart_secondary(self):
        self.stop_secondary()
        self.start_secondary()

    def kill_primary(self):
        """kill -9 of the primary at a quiet moment, and a new Target on
        its state directory."""
        self.a.kill()
        self.a.start()

    def close(self):
        for node in (self.a, self.b):
            try:
                node.close()
            except Exception:
                pass

    # Checks.

    def status(self):
        try:
            return {"link": self.link.status(),
                    "secondary": self.sg.status() if self.sg else None,
                    "last_seq": self.g.next_seq - 1}
        except Exception as e:          # pragma: no cover
            return repr(e)

    def converged(self):
        """The link replicates and the secondary, consistent, applied
        every change the primary numbered."""
        link, sg = self.link, self.sg
        # Not lag_updates == 0: a lost ack keeps it at 1 until the next
        # write.
        return link.state == R.REPLICATING and sg is not None and \
            sg.consistent and sg.applied_seq == self.g.next_seq - 1

    def wait_converged(self, timeout=20.0):
        wait_for(self.converged, timeout, "convergence", self.status)


@contextlib.contextmanager
def made(cls, prefix):
    """make(**kw) -> cls(a new temporary directory, **kw); at the end,
    everything made is closed and its directory removed.  A factory
    fixture is `with made(Cls, "prefix-") as make: yield make`."""
    objs = []

    def make(**kw):
        obj = cls(tempfile.mkdtemp(prefix=prefix), **kw)
        objs.append(obj)
        return obj
    try:
        yield make
    finally:
        for obj in objs:
            obj.close()
            shutil.rmtree(obj.root, ignore_errors=True)


@contextlib.contextmanager
def linked_pair(root, mode, srl, granularity):
    """A Pair on root with one volume "v1" of 1 MiB, the group of it
    (srl, granularity) and a link of mode, converged, with fast timing
    (tests/support/rsgmodel.py); at the end the pair is closed and the
    timing restored.  A fixture is `with linked_pair(...) as p: yield p`."""
    saved = fast_timing()
    p = Pair(root, {"v1": 1 << 20})
    try:
        p.create_group(srl, granularity)
        p.link_up(mode)
        p.wait_converged()
        yield p
    finally:
        p.close()
        restore_timing(saved)


def resynced(t_primary, link, t_secondary, timeout=20.0):
    """Wait until link (of t_primary's group) has brought the group on
    t_secondary to the primary's last update."""
    def done():
        sg = t_secondary.rsgs.get(GROUP)
        g = t_primary.rsgs[GROUP]
        return link.state == R.REPLICATING and sg is not None and \
            sg.role == R.SECONDARY and sg.consistent and \
            sg.applied_seq == g.next_seq - 1 and link.dcm.count() == 0
    wait_for(done, timeout, "the resync",
             lambda: (link.status(), t_secondary.rsgs[GROUP].status()))


def hold_engines(monkeypatch):
    """Clone engines started from now on wait (their operation stays
    running, copies on demand go on) until the returned function is
    called with the group whose engine may go."""
    start = clones.SyncEngine.start
    monkeypatch.setattr(clones.SyncEngine, "start", lambda engine: None)

    def release(group):
        start(group.engine)
    return release
