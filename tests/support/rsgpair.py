"""The DCM replay tests' pair of nodes (tests/support/rsgnodes.py): Pair
(a volume `v` of random data on the primary, a blank one on the secondary),
the `pair` fixture that closes them, and Gate, which holds a replay's
sender half way."""

import os
import socket
import threading
import zlib

import pytest

from tests.support import rsgnodes
from tests.support.rsgmodel import wait_for
from tests.support.rsgnodes import read_image
from target import replication as R

MiB = 1 << 20
SIZE = 64 * MiB


class Pair(rsgnodes.Pair):
    """Primary A with one volume `v` of random data, secondary B with a
    blank one, and the group of `v`; link_up() links it (the replay starts
    at once)."""

    def __init__(self, root, size=SIZE, rate=None):
        super().__init__(root, {"v": size})
        self.data = os.urandom(size)
        self.ta.lus["v"].write(self.data, 0)
        self.create_group("8M", "64K")
        self.rate = rate

    def write(self, off, data):
        self.ta.lus["v"].write(data, off)

    def replicating(self):
        return self.converged() and self.link.dcm.count() == 0

    def check_identical(self):
        wait_for(self.replicating, 60, "replicating", self.status)
        a, b = read_image(self.ta, "v"), read_image(self.tb, "v")
        assert a == b, "secondary differs from the primary"


@pytest.fixture
def pair():
    with rsgnodes.made(Pair, "rsg-replay-") as make:
        yield make


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


class FakePrimary:
    """A primary of the test's own: the real one is detached and the
    secondary serves frames written here over a socket."""
    def __init__(self, p):
        p.link_up()
        p.check_identical()
        p.ta.rsg_detach("g", p.addr)
        self.sg = sg = p.sg
        wait_for(lambda: sg.connected_since is None, 10, "the real "
                 "primary's session to end", sg.status)
        self.connect()

    def connect(self):
        sg = self.sg
        # TCP, as between nodes: a socket pair's buffer holds less than
        # a primary keeps in flight.
        with socket.create_server(("127.0.0.1", 0)) as listener:
            self.sock = socket.create_connection(listener.getsockname())
            theirs, _ = listener.accept()
        self.sock.settimeout(30)
        self.theirs = theirs

        def serve():
            try:
                sg.serve(theirs, {"history": sg.history, "last_seq": max(
                    sg.applied_seq, sg.last_seq)}, "127.0.0.1")
            except ConnectionError:     # the test's end closed it
                pass
        sg.connection = theirs          # what a close shuts down
        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def send(self, kind, payload=b""):
        R.wire.send_frame(self.sock, kind, payload)

    def recv(self):
        return R.wire.recv_frame(self.sock)

    def answers(self):
        """The kinds of every frame the secondary sends from now until it
        closes the connection or stays silent for a second."""
        self.sock.settimeout(1)
        kinds = []
        try:
            while True:
                kinds.append(self.recv()[0])
        except (OSError, ConnectionError):
            return kinds

    def begin(self):
        R.wire.send_json(self.sock, b"RBEG", {"extents": 1})
        assert self.recv()[0] == b"RBOK"

    def data(self, off, data):
        self.send(b"RDAT", R.wire.DATA.pack(0, R.WRITE, off, len(data),
                                            zlib.crc32(data)) + data)

    def zero(self, off, length):
        self.send(b"RDAT", R.wire.DATA.pack(0, R.ZERO, off, length, 0))

    def end(self):
        self.send(b"REND", R.wire.SEQ.pack(self.sg.applied_seq))
        assert self.recv()[0] == b"RACK"

    def close(self):
        self.sock.close()
        self.thread.join(30)
        self.theirs.close()
        assert not self.thread.is_alive()
