"""A primary and a secondary Target in one process, linked over
127.0.0.1 TCP, for the DCM replay tests: Pair (a volume `v` of random data
on the primary, a blank one on the secondary, kill and restart of either),
the `pair` fixture that closes them, and Gate, which holds a replay's
sender half way."""

import os
import shutil
import socket
import tempfile
import threading
import time

import pytest

from tests.support.rsgmodel import wait_for
from tests.support.sockets import free_port
from target import inventory
from target import replication as R
from target.target import Target

MiB = 1 << 20
SIZE = 64 * MiB
TOKEN = "replication-token-0123456789"


def read_image(t):
    lu = t.lus["v"]
    buf = bytearray(lu.size)
    lu.backend.readinto(buf, 0)
    return bytes(buf)


class Pair:
    """Primary A with one volume `v` of random data, secondary B with a
    blank one, linked (the replay starts at once)."""

    def __init__(self, root, size=SIZE, rate=None):
        self.root = root
        self.A = os.path.join(root, "A")
        self.B = os.path.join(root, "B")
        self.tok = os.path.join(root, "tok")
        with open(self.tok, "w") as f:
            f.write(TOKEN)
        os.chmod(self.tok, 0o600)
        for sd in (self.A, self.B):
            st = inventory.StateDir(sd)
            st.ensure()
            inventory.create_lu(st, "v", size=size)
        self.port = free_port()
        self.addr = "127.0.0.1:%d" % self.port
        self.tb = None
        self.start_secondary()
        self.ta = Target(self.A)
        self.ta.start()
        self.data = os.urandom(size)
        self.ta.lus["v"].write(self.data, 0)
        self.ta.rsg_create("g", ["v"], "8M", granularity="64K")
        self.rate = rate

    def link_up(self, **kw):
        self.ta.rsg_link("g", self.addr, "async", self.tok, **kw)

    @property
    def link(self):
        return self.ta.rsgs["g"].links[0]

    @property
    def sg(self):
        return self.tb.rsgs.get("g")

    def start_secondary(self):
        self.tb = Target(self.B)
        self.tb.start()
        for _ in range(50):
            try:
                self.tb.start_replication("127.0.0.1", self.port, self.tok)
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("cannot listen on port %d again" % self.port)

    def restart_secondary(self):
        self.tb.close()
        self.tb = None
        try:
            socket.create_connection(("127.0.0.1", self.port), 1).close()
        except OSError:
            pass
        self.start_secondary()

    def kill_primary(self):
        """kill -9 (test_rsg_engine.Cluster.crash_primary): the link
        threads stop without persisting, no close; a new Target on the
        same state directory."""
        ta = self.ta
        for g in ta.rsgs.values():
            for link in g.links:
                link.stop()
            for link in g.links:
                link.dcm.close()
            g.srl.close()
        for lu in ta.lus.values():
            lu.close()
        self.ta = Target(self.A)
        self.ta.start()

    def write(self, off, data):
        self.ta.lus["v"].write(data, off)

    def replicating(self):
        link, sg = self.link, self.sg
        return link.state == R.REPLICATING and sg is not None and \
            sg.consistent and link.dcm.count() == 0 and \
            sg.applied_seq == self.ta.rsgs["g"].next_seq - 1

    def check_identical(self):
        wait_for(self.replicating, 60, "replicating", lambda: (
            self.link.status(), self.sg and self.sg.status()))
        a, b = read_image(self.ta), read_image(self.tb)
        assert a == b, "secondary differs from the primary"

    def close(self):
        for t in (self.ta, self.tb):
            if t is not None:
                try:
                    t.close()
                except Exception:
                    pass


@pytest.fixture
def pair():
    made = []

    def make(**kw):
        p = Pair(tempfile.mkdtemp(prefix="rsg-replay-"), **kw)
        made.append(p)
        return p
    yield make
    for p in made:
        p.close()
        shutil.rmtree(p.root, ignore_errors=True)


class Gate:
    """Counts the replay data the link sends (RDAT frames) and holds the
    sender once `stop_at` bytes went, until release(); a held sender whose
    link stops (a kill) or fails (a lost secondary) gets a lost
    connection."""

    def __init__(self, monkeypatch, stop_at):
        self.stop_at = stop_at
        self.sent = 0
        self.held = threading.Event()
        self.open = threading.Event()
        self.link = None
        orig = R.link.send_frames

        def send_frames(sock, frames):
            for kind, head, data in frames:
                if kind == b"RDAT" and data is not None:
                    self._before(len(data))
            return orig(sock, frames)
        monkeypatch.setattr(R.link, "send_frames", send_frames)

    def _before(self, n):
        if self.stop_at is not None and self.sent + n > self.stop_at:
            self.held.set()
            while not self.open.wait(0.05):
                link = self.link
                if link is not None and (link.stopping or
                                         link.state != R.DCM_REPLAY):
                    raise ConnectionError("held replay cut")
        self.sent += n

    def release(self):
        """Count from zero, hold no more."""
        self.stop_at = None
        self.sent = 0
        self.open.set()
