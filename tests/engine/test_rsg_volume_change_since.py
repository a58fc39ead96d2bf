"""A volume change on a promoted node is in its since-promotion map.

A promoted node tells another node what it changed from its promotion on
through its since-promotion map: a demotion reports it as the node's
diverged regions, and a link to a node of the old line copies it (with
the link's DCM).  A protected restore, a reverse sync or a rollback
changes what hosts read of all its regions when it starts, while its
engine copies them below that view for a long while after; the copies
that land after a demotion pass no replication layer, and a link made
meanwhile starts with an empty DCM.  So the operation's whole region map
goes into the since map, durably, before it changes anything, as a host
write's extents would: otherwise the demoted node reports too few
diverged regions, or a new link says consistent without the restored
data, and the two nodes differ while both say they are in sync.
"""

import pytest

from tests.support import rsgnodes
from tests.support.rsgmodel import (fast_timing, first_diff, restore_timing,
                                    wait_for)
from tests.support.rsgnodes import hold_engines, read_image, resynced
from target import replication as R

GRAN = 4096
VOLS = ["v1", "v2"]
SIZES = [1 << 20, 512 << 10]


class _Pair(rsgnodes.Pair):
    """A primary A and a secondary B with the volumes VOLS, the group g
    (4 KiB extents) and its async link."""

    def __init__(self, root):
        super().__init__(root, dict(zip(VOLS, SIZES)))
        self.create_group("1M", "4K")
        self.link_up("async")

    def write(self, vol, off, data):
        self.ta.lus[VOLS[vol]].write(data, off)


@pytest.fixture
def pair():
    saved = fast_timing()
    try:
        with rsgnodes.made(_Pair, "rsg-since-") as make:
            yield make()
    finally:
        restore_timing(saved)


def _images(t):
    return [read_image(t, n) for n in VOLS]


def _diff(a, b):
    return first_diff(a, b, VOLS)


def _synced_clone(t, source, name):
    t.clone_add(source, name)
    t.clone_sync(name)
    wait_for(lambda: t.clone_status(name)["state"] == "synchronized",
             what="clone {} synchronized".format(name),
             info=lambda: t.clone_status(name))


def _promoted_with_snapshot(c):
    """B holds a fractured clone "snap" of v1 = 0x0a; both nodes then
    hold 0x0b; A's link is detached and B promoted (no links)."""
    c.write(0, 0, b"\x0a" * SIZES[0])
    c.wait_converged()
    _synced_clone(c.tb, VOLS[0], "snap")
    c.tb.clone_fracture("snap")
    c.write(0, 0, b"\x0b" * SIZES[0])
    c.wait_converged()
    c.ta.rsg_detach("g", c.addr)
    wait_for(lambda: c.sg.connected_since is None, what="primary gone")
    c.tb.rsg_promote("g")


def _since_on_disk(g):
    """The promoted group g's since map as its file holds it."""
    since = R.Dcm(g.files.since(), g.granularity, g.sizes)
    try:
        return bytes(since.bits)
    finally:
        since.close()


@pytest.mark.parametrize("operation", ["restore", "reverse-sync"])
def test_demote_of_promoted_node_during_volume_change_resyncs_it(
        pair, monkeypatch, operation):
    """B, promoted, restores v1 with its engine held and is demoted
    before it copied anything; the engine then copies every region on
    the secondary B has become.  A, linked to B again, must copy every
    region of the operation: once the link says it is in sync, the two
    nodes hold the same bytes."""
    c = pair
    _promoted_with_snapshot(c)
    release = hold_engines(monkeypatch)
    if operation == "restore":
        c.tb.clone_restore("snap")
    else:
        c.tb.clone_reverse_sync("snap")
    c.tb.rsg_demote("g")
    diverged = c.tb.rsgs["g"].diverged
    release(c.tb.groups[VOLS[0]])
    wait_for(lambda: not c.tb.clone_status("snap")["operation"]["running"],
             30, "the " + operation, lambda: c.tb.clone_status("snap"))
    assert read_image(c.tb, VOLS[0]) == b"\x0a" * SIZES[0]
    c.ta.rsg_attach("g", c.addr)
    resynced(c.ta, c.link, c.tb)
    assert _images(c.ta) == _images(c.tb), _diff(_images(c.ta),
                                                 _images(c.tb))
    # The demotion reported all of v1 (the engine had copied nothing).
    assert sum(n for vol, _, n in diverged["runs"] if vol == 0) == \
        SIZES[0], diverged


def test_link_made_during_a_restore_on_a_promoted_node_sends_it(
        pair, monkeypatch):
    """B, promoted, restores v1 (its engine held); A is demoted and B
    links to it.  Once A is consistent it holds what B's hosts read: the
    restored v1 as well as a write B's hosts made after the restore
    began, not the write over the old v1."""
    c = pair
    _promoted_with_snapshot(c)
    release = hold_engines(monkeypatch)
    try:
        c.tb.clone_restore("snap")
        c.tb.lus[VOLS[1]].write(b"\x0c" * GRAN, 0)
        c.ta.rsg_demote("g")
        c.a.listen()
        c.tb.rsg_link("g", c.a.addr, "async", c.tok)
        link = c.tb.rsgs["g"].links[0]
        resynced(c.tb, link, c.ta)
        top = bytearray(SIZES[0])
        c.tb.lus[VOLS[0]].read(top, 0)
        assert bytes(top) == b"\x0a" * SIZES[0]
        with c.ta.rsgs["g"].lock:
            a_v1 = read_image(c.ta, VOLS[0])
            a_v2 = read_image(c.ta, VOLS[1])
        assert a_v2[:GRAN] == b"\x0c" * GRAN
        assert a_v1 == bytes(top), _diff([a_v1], [bytes(top)])
    finally:
        release(c.tb.groups[VOLS[0]])


def test_volume_change_on_promoted_node_is_in_its_since_map_on_disk(pair):
    """Every restore, reverse sync and rollback on a primary begins with
    begin_volume_change: once it returns (before the operation changes
    anything) the region map is in the since map on disk, and a demotion
    would report it."""
    c = pair
    c.write(0, 0, b"\x0b" * SIZES[0])
    c.wait_converged()
    c.ta.rsg_detach("g", c.addr)
    wait_for(lambda: c.sg.connected_since is None, what="primary gone")
    c.tb.rsg_promote("g")
    g = c.tb.rsgs["g"]
    regions = bytearray(SIZES[1] // GRAN)
    regions[3:7] = b"\x01" * 4
    assert not any(_since_on_disk(g))
    begun = g.begin_volume_change(1, regions, GRAN, "a rollback")
    try:
        bits = _since_on_disk(g)
        assert list(R.Dcm.runs_of(bits, g.granularity, g.sizes)) == \
            [(1, 3 * GRAN, 4 * GRAN)]
        with g.cond:
            runs = g.changes_since_agreement()["runs"]
        assert runs == [[1, 3 * GRAN, 4 * GRAN]]
    finally:
        g.end_volume_change(begun)
