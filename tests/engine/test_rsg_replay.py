"""A DCM replay broken off resumes where the secondary's acknowledgements
left it (engine level: two in-process Targets over 127.0.0.1 TCP, as in
test_rsg_engine.py, whose crash_primary this file's kill follows).

One 64 MiB volume of random data is linked: the first contact marks every
extent and the replay copies all of it.  A gate in the link's sender stops
the replay once half the volume was sent; the primary is then killed (or
the secondary restarted) and the replay starts again.  What the second
run sends is counted: at most what the first run did not send plus what
was sent but not yet acknowledged (the syncs the link may have in flight,
R.link.REPLAY_SYNCS_AHEAD of R.link.REPLAY_SYNC_BYTES, plus the bytes since
the last one).  Before the fix the second run sent the whole volume.
"""

import os
import shutil
import socket
import tempfile
import threading
import time

import pytest

from tests.support.rsgmodel import fast_timing, restore_timing, wait_for
from tests.support.sockets import free_port
from target import inventory
from target import replication as R
from target.target import Target

MiB = 1 << 20
SIZE = 64 * MiB
TOKEN = "replication-token-0123456789"


@pytest.fixture(autouse=True)
def _fast():
    saved = fast_timing()
    yield
    restore_timing(saved)


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


def overlap():
    """What a replay may have sent that was not acknowledged yet."""
    return (R.link.REPLAY_SYNCS_AHEAD + 1) * R.link.REPLAY_SYNC_BYTES + \
        R.link.REPLAY_CHUNK


def _held_half_way(p, monkeypatch):
    gate = Gate(monkeypatch, SIZE // 2)
    p.link_up()
    gate.link = p.link
    assert gate.held.wait(60), p.link.status()
    first = gate.sent
    assert first >= SIZE // 2 - R.link.REPLAY_CHUNK
    # Host writes while the replay is held: into the half sent (their
    # entries are in the SRL, not sent) and into the half not sent.
    p.write(MiB, b"\x11" * 4096)
    p.write(SIZE - MiB, b"\x22" * 4096)
    return gate, first


def test_replay_resumes_after_primary_kill(pair, monkeypatch):
    p = pair()
    gate, first = _held_half_way(p, monkeypatch)
    # Let the acknowledgements of what went land (a kill at any moment
    # only loses more of them, bounded by the syncs in flight).
    time.sleep(0.3)
    p.kill_primary()
    gate.release()
    gate.link = p.link
    p.check_identical()
    second = gate.sent
    assert second <= SIZE - first + overlap(), \
        "second run sent {} MiB after {} MiB of {} MiB".format(
            second / MiB, first / MiB, SIZE / MiB)


def test_replay_resumes_after_secondary_restart(pair, monkeypatch):
    p = pair()
    gate, first = _held_half_way(p, monkeypatch)
    time.sleep(0.3)
    replays = p.link.replays
    # The secondary is killed: the held sender sees the link fail.
    p.restart_secondary()
    wait_for(lambda: p.link.replays > replays or gate.sent == 0, 30,
             "the link back", p.link.status)
    gate.release()
    p.check_identical()
    second = gate.sent
    assert second <= SIZE - first + overlap(), \
        "second run sent {} MiB after {} MiB of {} MiB".format(
            second / MiB, first / MiB, SIZE / MiB)


def test_rate_limited_replay_takes_size_over_rate_and_hosts_go_on(pair):
    size, rate = 4 * MiB, 8 * MiB
    p = pair(size=size)
    p.link_up(rate="8M")
    link = p.link
    assert link.status()["replay_rate_limit"] == rate
    # Host writes all along the replay: none waits for the throttle.
    took = []
    while not (link.replays and link.state == R.REPLICATING):
        t = time.monotonic()
        p.write(len(took) % 64 * 65536, os.urandom(4096))
        took.append(time.monotonic() - t)
        time.sleep(0.01)
        assert len(took) < 3000, link.status()
    p.check_identical()
    replay = link.status()["replay"]
    assert replay["bytes_done"] == replay["bytes_total"] == size
    assert replay["elapsed"] >= size / rate, replay
    assert len(took) >= 10 and max(took) < 0.2, (len(took), max(took))


def test_attach_changes_the_rate_of_a_running_replay(pair):
    p = pair(size=8 * MiB)
    p.link_up(rate="1M")
    link = p.link
    wait_for(lambda: link.state == R.DCM_REPLAY, 10, "the replay",
             link.status)
    p.ta.rsg_attach("g", p.addr, rate="0")
    assert link.status()["replay_rate_limit"] is None
    # 8 MiB at 1 MiB/s would take 8 s.
    wait_for(p.replicating, 4, "the replay unthrottled", link.status)
    p.check_identical()
    assert p.ta.rsgs["g"].record()[0]["links"][0]["replay_rate"] is None


def test_throttled_replay_keeps_the_connection_and_streams_entries(
        pair, monkeypatch):
    """A rate far below one chunk per idle timeout: the link keeps the
    connection alive while it waits (BEAT), and host writes made during
    the replay reach the secondary at once, not at the rate's pace."""
    monkeypatch.setattr(R.server, "IDLE_TIMEOUT", 1.0)
    p = pair(size=4 * MiB)
    p.link_up(rate="4K")
    link = p.link
    wait_for(lambda: link.state == R.DCM_REPLAY and p.sg is not None and
             p.sg.connected_since is not None, 10, "the replay", link.status)
    since = p.sg.connected_since
    g = p.ta.rsgs["g"]
    for i in range(5):
        p.write(i * 65536, b"\x33" * 4096)
        seq = g.next_seq - 1
        t = time.monotonic()
        wait_for(lambda: link.acked_seq >= seq, 5, "the entry acknowledged",
                 link.status)
        assert time.monotonic() - t < 0.5, link.status()
        time.sleep(0.5)
    assert p.sg.connected_since == since and link.replays == 1, (
        link.status(), p.sg.status())
    assert link.state == R.DCM_REPLAY
    assert 0 < link.replay_bytes[0] < 64 * 1024, link.status()
    p.ta.rsg_attach("g", p.addr, rate="0")
    p.check_identical()
