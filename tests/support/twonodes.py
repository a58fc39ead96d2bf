"""Two in-process nodes A and B of one replicated group "g" of the volumes
v1 (1 MiB) and v2 (256 KiB), A primary and linked (async) to B: the
`two_nodes` fixture, the `Node` it is made of (an rsgnodes.Node with
reads at each level of a volume's stack and its clone group), and
`converge`, which waits until B holds everything A logged, and
`break_a_replay`, which leaves B inconsistent after a broken replay.  Used by the
composition model and the tests of a secondary's consistent image."""

import errno
import os
import threading

import pytest

from tests.support import rsgnodes
from tests.support.rsgmodel import fast_timing, restore_timing, wait_for
from target import replication as R

VOLS = ["v1", "v2"]
SIZES = [1 << 20, 256 << 10]


class Node(rsgnodes.Node):
    """One clonectl target (state dir, replication port)."""

    def __init__(self, name, root, tok):
        super().__init__(os.path.join(root, name), zip(VOLS, SIZES), tok)
        self.name = name
        self.start_seq = None

    @property
    def rsg(self):
        return self.t.rsgs.get("g")

    def loaded(self):
        g = self.rsg
        # The first number a change can get after the restart, before a
        # resumed engine takes any.
        self.start_seq = g.next_seq if g is not None and \
            g.role == R.PRIMARY else None

    def read_top(self, vol):
        """A host read (the top of the stack)."""
        lu = self.t.lus[VOLS[vol]]
        buf = bytearray(lu.size)
        lu.read(buf, 0)
        return bytes(buf)

    def read_below_guard(self, vol):
        """What a host would read from a secondary's volume, without its
        guard (callers hold the apply lock)."""
        lu = self.t.lus[VOLS[vol]]
        buf = bytearray(lu.size)
        lu.stack.below("guard").readinto(buf, 0)
        return bytes(buf)

    def read_base(self, vol):
        lu = self.t.lus[VOLS[vol]]
        buf = bytearray(lu.size)
        lu.backend.readinto(buf, 0)
        return bytes(buf)

    def group(self):
        return self.t.groups.get(VOLS[0])

    def clone_image(self, name):
        c = self.group().clones[name]
        buf = bytearray(SIZES[0])
        c.backend.readinto(buf, 0)
        return bytes(buf)


@pytest.fixture
def two_nodes(tmp_path):
    saved = fast_timing()
    tok = rsgnodes.write_token(str(tmp_path / "tok"))
    a, b = Node("A", str(tmp_path), tok), Node("B", str(tmp_path), tok)
    a.start()
    b.start()
    a.t.rsg_create("g", VOLS, "1M", granularity="4K")
    a.t.rsg_link("g", b.addr, "async", tok)
    try:
        yield a, b
    finally:
        for n in (a, b):
            if n.t is not None:
                n.close()
        restore_timing(saved)


def converge(a, b):
    wait_for(lambda: b.rsg is not None and b.rsg.consistent and
             a.rsg.links[0].state == R.REPLICATING and
             b.rsg.applied_seq == a.rsg.next_seq - 1, 20, "convergence",
             lambda: (a.rsg.status(), b.rsg and b.rsg.status()))


def write_and_detach(a, b):
    """A host write reaches B, consistent; then A's link is detached."""
    a.t.lus["v1"].write(b"\x01" * 4096, 0)
    converge(a, b)
    a.t.rsg_detach("g", b.addr)
    wait_for(lambda: b.rsg.connected_since is None)


def image_released(b, timeout=20.0):
    """Wait until B has released its last consistent image: it does so
    after answering the replay's end, so converge() may return first."""
    wait_for(lambda: not b.rsg.protected, timeout, "the image's release",
             b.rsg.status)


def replay_broken_off(a, b, monkeypatch, start=None, **attach):
    """A attaches (with the rsg_attach options `attach`), or start() is
    called to begin a replay some other way, and A's replay to B breaks
    off at its end (B's _end_replay fails); A detached again, B's
    _end_replay is restored."""
    broken = threading.Event()
    end_replay = R.SecondaryGroup._end_replay

    def break_off(self, seq, theirs):
        broken.set()
        raise OSError(errno.EIO, "the replay is broken off here")
    monkeypatch.setattr(R.SecondaryGroup, "_end_replay", break_off)
    if start is None:
        a.t.rsg_attach("g", b.addr, **attach)
    else:
        start()
    assert broken.wait(10)
    a.t.rsg_detach("g", b.addr)
    wait_for(lambda: b.rsg.connected_since is None)
    monkeypatch.setattr(R.SecondaryGroup, "_end_replay", end_replay)


def break_a_replay(a, b, monkeypatch):
    """B consistent at \\x02 (v1 protected by an admin at \\x01 before);
    then a replay of \\x03 broken off at its end: B inconsistent."""
    for vol in VOLS:
        a.t.lus[vol].write(b"\x01" * 4096, 0)
    converge(a, b)
    b.t.image_protect("v1")
    for vol in VOLS:
        a.t.lus[vol].write(b"\x02" * 4096, 0)
    converge(a, b)
    a.t.rsg_detach("g", b.addr)
    for vol in VOLS:
        a.t.lus[vol].write(b"\x03" * 4096, 0)
    replay_broken_off(a, b, monkeypatch)
    assert not b.rsg.consistent and b.rsg.protected, b.rsg.status()
