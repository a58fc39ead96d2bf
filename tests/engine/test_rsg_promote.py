"""`rsg promote` against a primary that connects while it runs.

The promotion checks that no primary is connected, then builds the new
primary's record from the secondary's state and closes the secondary.  A
primary accepted in between would apply batches the new record does not
account for (or after it), so a promotion is a local change: primaries
are refused from its check to its end.
"""

import errno
import os
import threading
import time

import pytest

from tests.support.rsgmodel import fast_timing, restore_timing, wait_for
from tests.support.rsgpair import pair  # noqa: F401
from tests.support.twonodes import write_and_detach
from target import replication as R
from target.replication import primary

KiB = 1 << 10


def test_a_primary_connecting_during_a_promotion_is_refused(pair,  # noqa: F811
                                                            monkeypatch):
    saved = fast_timing()
    try:
        p = pair(size=4 << 20)
        p.link_up()
        wait_for(p.replicating, 30, "the first replay")
        p.ta.rsg_detach("g", p.addr)
        seen = {}
        orig = R.new_generation

        def during_the_promotion():
            # Inside rsg_promote, after its checks: the old primary comes
            # back and writes.
            p.ta.rsg_attach("g", p.addr)
            end = time.monotonic() + 5
            while time.monotonic() < end and p.link.state != R.REPLICATING \
                    and not p.link.error:
                time.sleep(0.02)
            seen["state"], seen["error"] = p.link.state, p.link.error
            p.write(0, b"\xab" * (64 * KiB))
            time.sleep(0.5)
            seen["applied"] = p.sg.applied_seq
            return orig()

        before = p.sg.applied_seq
        monkeypatch.setattr(R, "new_generation", during_the_promotion)
        p.tb.rsg_promote("g")
        assert seen["state"] != R.REPLICATING, \
            "a primary was accepted while the secondary was being promoted"
        assert "promotion" in (seen["error"] or ""), seen
        assert seen["applied"] == before, \
            "the secondary applied updates after its promotion's checks"
        b = p.tb.rsgs["g"]
        assert b.role == R.PRIMARY
        buf = bytearray(64 * KiB)
        p.tb.lus["v"].backend.readinto(buf, 0)
        assert bytes(buf) != b"\xab" * (64 * KiB)
    finally:
        restore_timing(saved)


def test_two_promotions_at_once_make_one_primary(two_nodes, monkeypatch):
    """Two `rsg promote` of one group at once (the control socket serves
    requests side by side): the second is refused, and does not close the
    first one's new primary again (its SRL removed under it, the group gone
    from the target, its layer left in the volumes' stacks)."""
    a, b = two_nodes
    write_and_detach(a, b)
    inside, go = threading.Event(), threading.Event()
    orig = R.new_generation

    def held():
        inside.set()
        go.wait(5)
        return orig()
    monkeypatch.setattr(R, "new_generation", held)
    out = {}

    def first():
        out["first"] = b.t.rsg_promote("g")
    t = threading.Thread(target=first)
    t.start()
    assert inside.wait(5)
    try:
        with pytest.raises(R.RsgBusy, match="a promotion of group g is "
                           "running"):
            b.t.rsg_promote("g")
    finally:
        go.set()
        t.join(20)
    g = b.t.rsgs.get("g")
    assert g is not None and g.role == R.PRIMARY
    assert g.history[-1][0] == out["first"]["generation"]
    assert all(b.t.lus[v].rsg is g for v in ("v1", "v2"))
    assert os.path.exists(g.files.srl) and os.path.exists(g.files.since())
    assert g.files.load()["generation"] == out["first"]["generation"]


def test_a_deletion_during_a_demotion(two_nodes, monkeypatch):
    """`rsg delete` of a group whose demotion is running: whichever comes
    second finds the group it read closed and does nothing (before, the
    demotion closed the deleted group again and saved its record anew)."""
    a, b = two_nodes
    lu = a.t.lus["v1"]
    flush = lu.flush
    out = {}

    def meanwhile():
        # The demotion's first step, before it closes the group.
        if "delete" not in out:
            out["delete"] = a.t.rsg_delete("g")
        return flush()
    monkeypatch.setattr(lu, "flush", meanwhile)
    with pytest.raises(R.RsgBusy, match="another promotion, demotion or "
                       "deletion of it ran meanwhile"):
        a.t.rsg_demote("g")
    assert out["delete"] == {"name": "g"}
    assert "g" not in a.t.rsgs and not a.t.state_dir.group_files("g") \
        .on_disk()
    assert all(a.t.lus[v].rsg is None for v in ("v1", "v2"))


def test_a_promotion_whose_primary_cannot_open_holds_the_volumes(
        two_nodes, monkeypatch):
    """The record says primary, but its SRL cannot be made (a full state
    directory): the volumes are held like those of a group that failed to
    load (before, they were served writable with no group on them: host
    writes reached no log or since map, and a later resync missed them)."""
    a, b = two_nodes
    write_and_detach(a, b)
    srl = primary.Srl

    def full(path, size=None):
        if size is not None:
            raise OSError(errno.ENOSPC, "No space left on device")
        return srl(path, size)
    monkeypatch.setattr(primary, "Srl", full)
    with pytest.raises(R.ReplicationError, match="could not be opened"):
        b.t.rsg_promote("g")
    assert b.t.state_dir.group_files("g").load()["role"] == R.PRIMARY
    assert [n for n, _ in b.t.exports()] == []
    assert all(b.t.lus[v].held for v in ("v1", "v2"))
    assert [st["loaded"] for st in b.t.rsg_list()] == [False]
    monkeypatch.undo()
    b.close()
    b.start()
    assert b.rsg.role == R.PRIMARY
    assert sorted(n for n, _ in b.t.exports()) == ["v1", "v2"]


def test_a_deletion_whose_files_stay_holds_the_volumes(two_nodes,
                                                       monkeypatch):
    """`rsg delete` of a loaded group closes it, then removes its files;
    if they cannot be removed (an I/O error), the group is left like one
    that failed to load: its volumes are held until a deletion succeeds.
    (Before, its volumes were served with no group on them while its
    record stayed: the next start loaded the group again, unaware of the
    writes made meanwhile, and its secondaries never got them.)"""
    from target import fsutil
    a, b = two_nodes
    write_and_detach(a, b)

    def failing(directory):
        raise OSError(errno.EIO, "Input/output error")
    # The files unlinked, their removal not durable: the record may come
    # back after a power cut.
    monkeypatch.setattr(fsutil, "fsync_dir", failing)
    with pytest.raises(OSError):
        a.t.rsg_delete("g")
    assert [n for n, _ in a.t.exports()] == []
    assert all(a.t.lus[v].held for v in ("v1", "v2"))
    [row] = a.t.rsg_list()
    assert row["loaded"] is False and "delet" in row["error"], row
    monkeypatch.undo()
    a.t.rsg_delete("g")
    assert a.t.rsg_list() == []
    assert sorted(n for n, _ in a.t.exports()) == ["v1", "v2"]
    assert not a.t.state_dir.group_files("g").on_disk()
