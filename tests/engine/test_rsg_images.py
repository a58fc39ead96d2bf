"""The last consistent image a secondary keeps during a replay
(LU@consistent-LU): the group's own, every volume of one point, kept
across restarts while the node is inconsistent, released only by the
group (its replay's end, its promotion, its deletion), and apart from the
protected image an admin or a peer keeps (LU@protected-LU)."""

import contextlib
import copy
import errno
import threading

import pytest

from target import copier, errors, operations, sessions
from target import session_orchestration
from target import replication as R
from tests.support.rsgmodel import wait_for
from tests.support.twonodes import (SIZES, VOLS, break_a_replay, converge,
                                    image_released, replay_broken_off)


def _frozen(node, name, size):
    s = node.t.sessions.get(name)
    assert s is not None and s.marked, (name, sorted(node.t.sessions))
    buf = bytearray(size)
    s.read_frozen(buf, 0)
    return bytes(buf[:4096])


def _restart(node):
    node.close()
    node.start()


def test_broken_replay_rolls_back_to_one_point_across_a_restart(
        two_nodes, monkeypatch):
    a, b = two_nodes
    break_a_replay(a, b, monkeypatch)
    _restart(b)
    sg = b.rsg
    assert not sg.consistent and sg.protected
    assert sg.status()["images"] == ["v1@consistent-v1", "v2@consistent-v2"]
    exports = [name for name, _ in b.t.exports()]
    assert "v1@consistent-v1" in exports and "v1@protected-v1" in exports
    with pytest.raises(R.ReplicaUnavailable) as e:
        sg.check_readable(b.t.lus["v2"])
    assert "v2@consistent-v2" in str(e.value), str(e.value)
    with pytest.raises(R.RsgBusy) as e:
        b.t.rsg_promote("g")
    assert "v1@consistent-v1, v2@consistent-v2" in str(e.value) and \
        "lu rollback" in str(e.value), str(e.value)
    for vol, size in zip(VOLS, SIZES):
        assert _frozen(b, "consistent-" + vol, size) == b"\x02" * 4096
        res = b.t.image_rollback(vol)
        assert res["image"] == "{0}@consistent-{0}".format(vol), res
    with sg.lock:
        got = [b.read_below_guard(v)[:4096] for v in range(len(VOLS))]
    assert got == [b"\x02" * 4096] * 2
    assert not [n for n in b.t.sessions if n.startswith("consistent-")]
    # The admin's image is there still, of its own point.
    assert _frozen(b, "protected-v1", 1 << 20) == b"\x01" * 4096
    # Every volume back at the group's point: consistent there again.
    assert sg.consistent, sg.status()
    b.t.rsg_promote("g")
    assert [b.read_top(v)[:4096] for v in range(len(VOLS))] == \
        [b"\x02" * 4096] * 2
    assert b.t.image_status("v1")["protected"]


def test_promote_force_releases_only_the_groups_images(two_nodes,
                                                       monkeypatch):
    a, b = two_nodes
    break_a_replay(a, b, monkeypatch)
    b.t.rsg_promote("g", force=True)
    assert not [n for n in b.t.sessions if n.startswith("consistent-")]
    assert _frozen(b, "protected-v1", 1 << 20) == b"\x01" * 4096
    _restart(b)
    assert not [n for n in b.t.sessions if n.startswith("consistent-")]
    assert _frozen(b, "protected-v1", 1 << 20) == b"\x01" * 4096


def test_rsg_delete_releases_only_the_groups_images(two_nodes, monkeypatch):
    a, b = two_nodes
    break_a_replay(a, b, monkeypatch)
    b.t.rsg_delete("g")
    assert not [n for n in b.t.sessions if n.startswith("consistent-")]
    assert _frozen(b, "protected-v1", 1 << 20) == b"\x01" * 4096


def test_a_completed_replay_leaves_no_image_after_a_crash(two_nodes,
                                                          monkeypatch):
    """A crash between the record saying consistent and the release: the
    restart releases the images (the replay completed), and only them."""
    a, b = two_nodes
    break_a_replay(a, b, monkeypatch)
    b.rsg.consistent, b.rsg.reason = True, None
    b.rsg.persist()
    _restart(b)
    assert not b.rsg.protected and b.rsg.status()["images"] == []
    assert not [n for n in b.t.sessions if n.startswith("consistent-")]
    assert _frozen(b, "protected-v1", 1 << 20) == b"\x01" * 4096
    a.t.rsg_attach("g", b.addr)
    converge(a, b)
    assert b.t.image_status("v1")["protected"]


def test_the_replay_ends_before_the_image_is_released(two_nodes,
                                                     monkeypatch):
    """The secondary answers the replay's end (RACK) once it is consistent
    and recorded so; the release of its last consistent image (sessions
    deleted, their files synced) comes after, not on the replay's path:
    the primary's link replicates while the release runs."""
    a, b = two_nodes
    break_a_replay(a, b, monkeypatch)
    link = a.rsg.links[0]
    during = []
    release = R.SecondaryGroup.release_images

    def watched(self):
        # Whether the primary ended its replay before this release did.
        try:
            wait_for(lambda: link.state == R.REPLICATING, 5)
        except AssertionError:
            pass
        during.append((self.consistent, link.state))
        release(self)
    monkeypatch.setattr(R.SecondaryGroup, "release_images", watched)
    a.t.rsg_attach("g", b.addr)
    converge(a, b)
    image_released(b)
    assert during == [(True, R.REPLICATING)], during
    assert not [n for n in b.t.sessions if n.startswith("consistent-")]


def test_a_new_replay_replaces_a_stale_image(two_nodes, monkeypatch):
    """Images left protected on a consistent node (a release that failed)
    are replaced by the next replay's, of its own point."""
    a, b = two_nodes
    break_a_replay(a, b, monkeypatch)
    monkeypatch.setattr(R.SecondaryGroup, "release_images", lambda self: None)
    a.t.rsg_attach("g", b.addr)
    converge(a, b)
    assert b.rsg.protected                  # its release failed
    monkeypatch.undo()
    a.t.rsg_detach("g", b.addr)
    wait_for(lambda: b.rsg.connected_since is None)
    a.t.lus["v1"].write(b"\x04" * 4096, 0)
    gate = threading.Event()
    ended = threading.Event()
    end_replay = R.SecondaryGroup._end_replay

    def hold(self, seq, theirs):
        ended.set()
        gate.wait(10)
        end_replay(self, seq, theirs)
    monkeypatch.setattr(R.SecondaryGroup, "_end_replay", hold)
    a.t.rsg_attach("g", b.addr)
    try:
        assert ended.wait(10)
        assert [_frozen(b, "consistent-" + v, s) for v, s in
                zip(VOLS, SIZES)] == [b"\x03" * 4096] * 2
    finally:
        gate.set()
    converge(a, b)
    # Released once the replay has ended (the primary does not wait).
    image_released(b)
    assert not [n for n in b.t.sessions if n.startswith("consistent-")]


def test_no_user_session_takes_or_touches_the_groups_image(two_nodes,
                                                           monkeypatch):
    a, b = two_nodes
    with pytest.raises(errors.InvalidArgument) as e:
        a.t.session_ops.session_create("v1", "consistent-v1",
                                       dests=["nbd+unix:///x?socket=/nx"])
    assert "reserved" in str(e.value)
    break_a_replay(a, b, monkeypatch)
    ops = operations.bind(b.t)
    for op in ("session_delete", "session_unmark", "session_mark"):
        with pytest.raises(errors.InvalidArgument,
                           match="last consistent image of LU v1"):
            ops[op](name="consistent-v1")
    assert b.t.sessions["consistent-v1"].marked
    # The admin's image on its own: a release of it leaves the group's.
    b.t.image_release("v1")
    assert _frozen(b, "consistent-v1", 1 << 20) == b"\x02" * 4096
    with pytest.raises(errors.InvalidArgument):
        b.t.image_rollback("v1", image="protected")
    with pytest.raises(errors.InvalidArgument):
        b.t.image_rollback("v1", image="other")
    assert isinstance(b.t.sessions["consistent-v1"], sessions.Session)


def test_lu_delete_tells_what_keeps_the_lu(two_nodes, monkeypatch):
    """What `lu delete` says to do about the images kept of a volume is
    what works: the group's deletion, then a rollback (a user's `session
    delete` is refused on them)."""
    a, b = two_nodes
    break_a_replay(a, b, monkeypatch)
    with pytest.raises(errors.Error) as e:
        b.t.lu_delete("v1")
    assert "replicated group g" in str(e.value), str(e.value)
    b.t.rsg_delete("g")
    with pytest.raises(errors.Error) as e:
        b.t.lu_delete("v1")
    assert "v1@protected-v1" in str(e.value) and \
        "clonectl lu rollback v1" in str(e.value), str(e.value)
    b.t.image_rollback("v1")
    b.t.lu_delete("v1")
    assert "v1" not in b.t.lus


@contextlib.contextmanager
def a_rollback_held(node, monkeypatch):
    """The node's rollback of v1, run in a thread, held in its first copy
    while the block runs; yields the dict whose "rollback" is its result
    (or its exception) after the block."""
    copying, go = threading.Event(), threading.Event()
    copy = copier.Copier.copy

    def held(self, runs):
        copying.set()
        go.wait(5)
        return copy(self, runs)
    monkeypatch.setattr(copier.Copier, "copy", held)
    out = {}

    def rollback():
        try:
            out["rollback"] = node.t.image_rollback("v1")
        except Exception as e:
            out["rollback"] = e
    t = threading.Thread(target=rollback)
    t.start()
    try:
        assert copying.wait(5)
        monkeypatch.setattr(copier.Copier, "copy", copy)
        yield out
    finally:
        go.set()
        t.join(20)


@pytest.mark.parametrize("other", ["promote", "delete", "rollback"])
def test_what_releases_an_image_waits_for_a_rollback_to_it(
        two_nodes, monkeypatch, other):
    """A rollback reads the image it puts back until its end: a promotion
    (--force), a deletion of the group or a second rollback of the volume
    that comes meanwhile is refused, not run beside it (before, it released
    the image under the rollback: a KeyError, the volume left half rolled
    back)."""
    a, b = two_nodes
    break_a_replay(a, b, monkeypatch)
    call = {"promote": lambda: b.t.rsg_promote("g", force=True),
            "delete": lambda: b.t.rsg_delete("g"),
            "rollback": lambda: b.t.image_rollback("v1")}[other]
    with a_rollback_held(b, monkeypatch) as out:
        with pytest.raises(errors.Error, match="a rollback of (v1|it to "
                           "v1@consistent-v1) is running"):
            call()
    assert out["rollback"]["image"] == "v1@consistent-v1", out
    with b.rsg.lock:
        assert b.read_below_guard(0)[:4096] == b"\x02" * 4096
    assert b.rsg.role == R.SECONDARY and b.rsg.status()["images"] == \
        ["v2@consistent-v2"]


def test_a_replay_after_a_partial_rollback_keeps_no_half_point(
        two_nodes, monkeypatch):
    """v1 rolled back to its image (released), then the primary's next
    replay, broken off too, writes v1 again: v2's image alone is no point
    the group had, so what the status and the refused promotion advise
    must not make one of it (before: "roll v2 back to it, then promote
    with --force", which gave v1 the new replay's data beside v2's old)."""
    a, b = two_nodes
    break_a_replay(a, b, monkeypatch)
    b.t.image_rollback("v1")
    for vol in VOLS:
        a.t.lus[vol].write(b"\x05" * 4096, 0)
    replay_broken_off(a, b, monkeypatch)
    with pytest.raises(R.RsgBusy) as e:
        b.t.rsg_promote("g")
    # What the admin is told: roll back every image listed, then --force.
    for export in b.rsg.status()["images"]:
        b.t.image_rollback(export.partition("@")[0])
    b.t.rsg_promote("g", force=True)
    got = [b.read_top(v)[:4096] for v in range(len(VOLS))]
    assert got[0] == got[1], (str(e.value), got)
    assert "no consistent image of it is kept" in str(e.value), str(e.value)
    assert not [n for n in b.t.sessions if n.startswith("consistent-")]


def test_an_image_that_cannot_be_kept_is_said_in_the_status(two_nodes,
                                                            monkeypatch):
    """A replay does not start without the last consistent image; when the
    image cannot be made (a full state directory) the secondary's status
    says why (before, only an info line of its log did: the primary's link
    said "connection lost" and retried forever)."""
    a, b = two_nodes
    a.t.lus["v1"].write(b"\x01" * 4096, 0)
    converge(a, b)
    a.t.rsg_detach("g", b.addr)
    wait_for(lambda: b.rsg.connected_since is None)
    a.t.lus["v1"].write(b"\x02" * 4096, 0)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(session_orchestration.SessionOrchestration,
                        "create_session", full)
    a.t.rsg_attach("g", b.addr)
    wait_for(lambda: b.rsg.status()["error"], 10, "the secondary's error",
             lambda: (b.rsg.status(), a.rsg.links[0].error))
    assert "could not be kept" in b.rsg.status()["error"] and \
        "No space left" in b.rsg.status()["error"]
    assert b.rsg.consistent and not b.rsg.protected
    monkeypatch.undo()
    converge(a, b)


def test_a_stale_image_of_a_consistent_secondary_is_no_rollback_point(
        two_nodes, monkeypatch):
    """Images left on a secondary that is consistent again (its release at
    the replay's end failed) are of an older point: `lu rollback` does not
    put one back as the last consistent image, nor does the status list
    it (before, v1 went back to \\x02 beside v2's \\x03 on a node recorded
    consistent, readable and promotable)."""
    a, b = two_nodes
    break_a_replay(a, b, monkeypatch)
    monkeypatch.setattr(R.SecondaryGroup, "release_images", lambda self: None)
    a.t.rsg_attach("g", b.addr)
    converge(a, b)
    assert b.rsg.protected and "consistent-v1" in b.t.sessions
    assert b.rsg.status()["images"] == []
    a.t.rsg_detach("g", b.addr)
    wait_for(lambda: b.rsg.connected_since is None)
    with pytest.raises(errors.InvalidArgument, match="no last consistent"):
        b.t.image_rollback("v1", image="consistent")
    with pytest.raises(errors.InvalidArgument, match="no protected image"):
        b.t.image_rollback("v2")
    assert b.rsg.consistent
    assert [b.read_top(v)[:4096] for v in range(len(VOLS))] == \
        [b"\x03" * 4096] * 2


def _break_another_replay(a, b, monkeypatch, byte):
    for vol in VOLS:
        a.t.lus[vol].write(byte * 4096, 0)
        a.t.lus[vol].write(byte * 4096, 128 << 10)
    replay_broken_off(a, b, monkeypatch)


def test_two_broken_replays_roll_back_to_the_first_point(two_nodes,
                                                         monkeypatch):
    """Broken off, restarted, written on the primary, broken off again:
    every volume rolls back to the point before the first replay."""
    a, b = two_nodes
    break_a_replay(a, b, monkeypatch)
    _restart(b)
    _break_another_replay(a, b, monkeypatch, b"\x05")
    assert b.rsg.status()["images"] == ["v1@consistent-v1",
                                        "v2@consistent-v2"]
    with b.rsg.lock:
        assert b.read_below_guard(1)[128 << 10:(128 << 10) + 4] == b"\x05" * 4
    for vol in VOLS:
        b.t.image_rollback(vol)
    with b.rsg.lock:
        got = [b.read_below_guard(v) for v in range(len(VOLS))]
    for data in got:
        assert data[:4096] == b"\x02" * 4096
        assert data[128 << 10:(128 << 10) + 4096] == bytes(4096)


def test_a_release_waits_for_a_rollback_to_the_image(two_nodes, monkeypatch):
    """A peer's or an admin's release of an LU's protected image while a
    rollback to it runs (here on a primary: no local change guards it) is
    refused (before, it dropped the save area under the rollback: a
    KeyError, the LU half rolled back)."""
    a, b = two_nodes
    lu = a.t.lus["v1"]
    lu.write(b"\x01" * 8192, 0)
    a.t.image_protect("v1")
    lu.write(b"\x02" * 8192, 0)
    with a_rollback_held(a, monkeypatch) as out:
        with pytest.raises(errors.Error, match="a rollback .* is running"):
            a.t.image_release("v1")
    assert out["rollback"]["image"] == "v1@protected-v1", out
    buf = bytearray(8192)
    lu.read(buf, 0)
    assert bytes(buf) == b"\x01" * 8192
    assert not a.t.image_status("v1")["protected"]


def test_images_half_marked_by_a_killed_replay_start_are_released(
        two_nodes, monkeypatch):
    """The node dies while marking the images (v1's marked, v2's made, the
    group record not saved yet): the restart finds the node consistent and
    releases both, and the next replay keeps images of its own point."""
    a, b = two_nodes
    for vol in VOLS:
        a.t.lus[vol].write(b"\x01" * 4096, 0)
    converge(a, b)
    a.t.rsg_detach("g", b.addr)
    wait_for(lambda: b.rsg.connected_since is None)
    for vol in VOLS:
        a.t.lus[vol].write(b"\x02" * 4096, 0)
    mark = sessions.Session.mark
    killed = threading.Event()

    def die(self, *args, **kwargs):
        if self.name == "consistent-v2":
            killed.set()
            raise OSError(errno.EIO, "killed here")
        return mark(self, *args, **kwargs)
    monkeypatch.setattr(sessions.Session, "mark", die)
    # What a kill leaves: no clean-up of the images just made.
    monkeypatch.setattr(session_orchestration.SessionOrchestration,
                        "consistent_release", lambda self, lus: None)
    a.t.rsg_attach("g", b.addr)
    assert killed.wait(10)
    a.t.rsg_detach("g", b.addr)
    wait_for(lambda: b.rsg.connected_since is None)
    assert b.t.sessions["consistent-v1"].marked
    assert "consistent-v2" in b.t.sessions
    monkeypatch.undo()
    _restart(b)
    assert b.rsg.consistent and not b.rsg.protected
    assert not [n for n in b.t.sessions if n.startswith("consistent-")]
    a.t.rsg_attach("g", b.addr)
    converge(a, b)
    assert [b.read_top(v)[:4096] for v in range(len(VOLS))] == \
        [b"\x02" * 4096] * 2


def test_a_rollback_releases_the_image_it_put_back_only(two_nodes,
                                                       monkeypatch):
    """A rollback to the group's image whose group became consistent
    before the release (a primary came back and a replay completed once
    the rollback's copy ended) releases that image or nothing, never the
    admin's LU@protected-LU (before, it asked again which image the LU
    has, got none of the group's, and released the admin's)."""
    a, b = two_nodes
    break_a_replay(a, b, monkeypatch)       # v1 protected by an admin too
    roll_back = b.t.session_ops._roll_back

    def then_consistent(source, session):
        out = roll_back(source, session)
        b.rsg.consistent = True             # as a completed replay leaves it
        return out
    monkeypatch.setattr(b.t.session_ops, "_roll_back", then_consistent)
    res = b.t.image_rollback("v1")
    assert res["image"] == "v1@consistent-v1", res
    assert b.t.image_status("v1")["protected"], \
        "the rollback to the group's image released the admin's"


def test_no_rollback_starts_while_its_image_is_released(two_nodes,
                                                       monkeypatch):
    """A rollback that comes while the image it would read is being
    released is refused (before, it passed the check the release had
    made and read a save area being deleted)."""
    a, b = two_nodes
    lu = a.t.lus["v1"]
    lu.write(b"\x01" * 8192, 0)
    a.t.image_protect("v1")
    lu.write(b"\x02" * 8192, 0)
    session = a.t.sessions["protected-v1"]
    unmark = type(session).unmark
    seen = {}

    def rollback_first(self, *args, **kwargs):
        if self is session and "rollback" not in seen:
            seen["rollback"] = None
            try:
                seen["rollback"] = a.t.image_rollback("v1")
            except errors.Error as e:
                seen["rollback"] = e
        return unmark(self, *args, **kwargs)
    monkeypatch.setattr(type(session), "unmark", rollback_first)
    a.t.image_release("v1")
    assert isinstance(seen["rollback"], errors.Error) and \
        "is being released" in str(seen["rollback"]), seen
    buf = bytearray(8192)
    lu.read(buf, 0)
    assert bytes(buf) == b"\x02" * 8192


def test_every_volume_rolled_back_makes_the_group_consistent_at_its_point(
        two_nodes, monkeypatch):
    """A replay broken off (the primary gone): once every volume of the
    secondary is rolled back to the group's last consistent image, the
    node holds that point again: consistent, at the update it had, so it
    is promoted without --force, and the primary that comes back copies
    only the regions changed since that point, not the volumes."""
    a, b = two_nodes
    break_a_replay(a, b, monkeypatch)
    sg = b.rsg
    point = sg.applied_seq
    b.t.image_rollback("v1")
    assert not sg.consistent, "one volume back is no point of the group"
    b.t.image_rollback("v2")
    assert sg.consistent and sg.applied_seq == point, sg.status()
    assert sg.status()["error"] is None, sg.status()
    _restart(b)
    assert b.rsg.consistent and b.rsg.applied_seq == point
    link = a.rsg.links[0]
    sent = link.sent_bytes
    a.t.rsg_attach("g", b.addr)
    converge(a, b)
    for v in range(len(VOLS)):
        assert b.read_below_guard(v) == a.read_below_guard(v)
    # The regions rolled back (the image's extents, 64K: one per volume
    # here), not the volumes (1.5 MiB).
    assert link.sent_bytes - sent < 4 * (64 << 10), \
        "{} bytes sent to a secondary back at its last consistent " \
        "point".format(link.sent_bytes - sent)


def test_a_refused_local_change_keeps_the_volume_at_the_point(
        two_nodes, monkeypatch):
    """A volume rolled back to the group's last consistent image holds
    the point.  A later change of it (here a rollback to an admin's
    image) whose record cannot be saved is refused, and the volume holds
    the point still: rolling back the other volume makes the group
    consistent at it."""
    a, b = two_nodes
    break_a_replay(a, b, monkeypatch)
    sg = b.rsg
    point = sg.applied_seq
    b.t.image_rollback("v1")
    diverged = copy.deepcopy(sg.diverged)
    save = sg.files.save

    def full(record):
        raise OSError(errno.ENOSPC, "injected")
    monkeypatch.setattr(sg.files, "save", full)
    with pytest.raises(OSError):
        b.t.image_rollback("v1", image="protected")
    monkeypatch.setattr(sg.files, "save", save)
    b.t.image_rollback("v2")
    assert sg.consistent and sg.applied_seq == point, sg.status()
    assert sg.diverged["runs"] == diverged["runs"] + [[1, 0, 65536]]


def fails_once(monkeypatch, method, when=lambda group: True):
    """SecondaryGroup.method raises EIO the first time it is called on a
    group for which when(group) holds; returns a list that holds True
    once it has."""
    real = getattr(R.SecondaryGroup, method)
    failed = []

    def once(self, *args, **kwargs):
        if not failed and when(self):
            failed.append(True)
            raise OSError(errno.EIO, "injected")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(R.SecondaryGroup, method, once)
    return failed


def test_a_release_that_fails_at_a_replays_end_is_done_again(two_nodes,
                                                              monkeypatch):
    """The release of the last consistent image at a replay's end fails
    once (a save area or record that cannot be saved): the node must not
    keep that image (copying on first write every update it applies, its
    save area filling) while it replicates on, consistent."""
    a, b = two_nodes
    break_a_replay(a, b, monkeypatch)
    failed = fails_once(monkeypatch, "release_images")
    a.t.rsg_attach("g", b.addr)
    converge(a, b)
    assert failed
    a.t.lus["v1"].write(b"\x06" * 4096, 0)
    converge(a, b)
    try:
        image_released(b, 5)
    except AssertionError:
        pass
    assert (b.rsg.consistent, b.rsg.protected,
            sorted(n for n in b.t.sessions if n.startswith("consistent-"))) \
        == (True, False, []), b.rsg.status()


def test_a_rollback_puts_back_what_a_primary_changed_before_it_began(
        two_nodes, monkeypatch):
    """A primary's batch lands on the secondary's volume (saving its old
    data into the last consistent image) after the rollback looked at the
    image but before the rollback kept primaries away: the rollback must
    put that block back too, or the volume is not at the group's point
    although the group says it is."""
    a, b = two_nodes
    break_a_replay(a, b, monkeypatch)
    lu = b.t.lus["v1"]
    before = b.read_below_guard(0)[64 << 10:68 << 10]
    volume_change = b.t.rsg_ops.volume_change

    def after_a_batch(*args, **kwargs):
        # What a primary's session that came and went just now wrote.
        lu.stack.below("guard").write(b"\x07" * 4096, 64 << 10)
        return volume_change(*args, **kwargs)
    monkeypatch.setattr(b.t.rsg_ops, "volume_change", after_a_batch)
    b.t.image_rollback("v1")
    with b.rsg.lock:
        got = b.read_below_guard(0)
    assert (got[:4096], got[64 << 10:68 << 10]) == (b"\x02" * 4096, before)


def test_a_rollback_is_refused_when_a_replay_completed_before_it_began(
        two_nodes, monkeypatch):
    """The primary came back and its replay completed after the rollback
    looked at the image but before it kept primaries away: the group is
    consistent at a later point than the image, so rolling one volume
    back would leave it older than the others with nothing saying so."""
    a, b = two_nodes
    break_a_replay(a, b, monkeypatch)
    volume_change = b.t.rsg_ops.volume_change

    def after_a_replay(*args, **kwargs):
        a.t.rsg_attach("g", b.addr)
        converge(a, b)
        a.t.rsg_detach("g", b.addr)
        wait_for(lambda: b.rsg.connected_since is None)
        return volume_change(*args, **kwargs)
    monkeypatch.setattr(b.t.rsg_ops, "volume_change", after_a_replay)
    with pytest.raises(errors.Error, match="no longer kept"):
        b.t.image_rollback("v1")
    assert b.rsg.consistent, b.rsg.status()
    with b.rsg.lock:
        got = [b.read_below_guard(v)[:4096] for v in range(len(VOLS))]
    assert got == [b"\x03" * 4096] * 2


def test_an_image_a_completed_replay_made_obsolete_is_never_rolled_back_to(
        two_nodes, monkeypatch):
    """A replay completed but the release of the image it kept failed,
    then an update's apply failed: the node is inconsistent again with
    images of a point older than what it applied since.  Rolling back to
    them (and reapplying the staged update at the next start) would claim
    a state the primary never had; they are no longer offered."""
    a, b = two_nodes
    break_a_replay(a, b, monkeypatch)

    def fails(self):
        raise OSError(errno.EIO, "release injected")
    monkeypatch.setattr(R.SecondaryGroup, "release_images", fails)
    a.t.rsg_attach("g", b.addr)
    converge(a, b)
    assert b.rsg.protected and b.rsg.consistent, b.rsg.status()
    apply_entries = R.SecondaryGroup._apply_entries

    def apply_fails(self, entries):
        raise OSError(errno.EIO, "apply injected")
    monkeypatch.setattr(R.SecondaryGroup, "_apply_entries", apply_fails)
    a.t.lus["v1"].write(b"\x05" * 4096, 0)
    wait_for(lambda: not b.rsg.consistent, 10, "the apply's failure",
             b.rsg.status)
    a.t.rsg_detach("g", b.addr)
    wait_for(lambda: b.rsg.connected_since is None)
    monkeypatch.setattr(R.SecondaryGroup, "_apply_entries", apply_entries)
    for vol in VOLS:
        with pytest.raises(errors.InvalidArgument, match="no last consistent"):
            b.t.image_rollback(vol, image="consistent")
    assert b.rsg.status()["images"] == [], b.rsg.status()


def test_a_release_whose_record_fails_is_recorded_again(two_nodes,
                                                         monkeypatch):
    """The images are released at a replay's end but the record saying so
    cannot be saved once: the release counts as done only once recorded,
    so it is tried again as the primary replicates on, and the error it
    reported goes with it."""
    a, b = two_nodes
    break_a_replay(a, b, monkeypatch)
    failed = fails_once(monkeypatch, "persist",
                        when=lambda g: not g.protected and g.consistent)
    a.t.rsg_attach("g", b.addr)
    converge(a, b)
    wait_for(lambda: failed, 20, "the release's record", b.rsg.status)
    a.t.lus["v1"].write(b"\x06" * 4096, 0)
    converge(a, b)
    wait_for(lambda: b.rsg.status().get("error") is None, 5,
             "the release recorded", b.rsg.status)
    record = b.rsg.files.load()
    assert (b.rsg.protected, record["protected"], record["image_point"]) \
        == (False, False, None), b.rsg.status()


def test_a_local_change_beside_a_connected_primary_is_refused_at_once(
        two_nodes, monkeypatch):
    """Right after a replay ended, with the primary connected and silent
    (no BEAT or CMIT comes), a promotion on the secondary is refused (its
    primary replicates) without waiting for a frame from the primary."""
    a, b = two_nodes
    break_a_replay(a, b, monkeypatch)
    # An idle primary speaks once per PERSIST_INTERVAL: never, here.
    monkeypatch.setattr(R.link, "PERSIST_INTERVAL", 3600.0)
    a.t.rsg_attach("g", b.addr)
    converge(a, b)
    image_released(b)
    answer = []

    def promote():
        try:
            b.t.rsg_promote("g")
            answer.append("promoted")
        except R.RsgBusy:
            answer.append("refused")
    t = threading.Thread(target=promote, daemon=True)
    t.start()
    # Not a time bound: only a promotion waiting for a frame that never
    # comes stays here past it.
    t.join(20)
    assert answer == ["refused"], answer or "still waiting for a frame"


def test_a_release_that_keeps_failing_unexpectedly_leaves_replication_on(
        two_nodes, monkeypatch):
    """The release of the last consistent image fails every time, with an
    error no one expected (a bug): the node still applies the primary's
    updates and says what fails, rather than ending every session at its
    start (the primary reconnecting for ever, the status silent)."""
    a, b = two_nodes
    break_a_replay(a, b, monkeypatch)

    def never(self):
        raise RuntimeError("injected")
    monkeypatch.setattr(R.SecondaryGroup, "release_images", never)
    a.t.rsg_attach("g", b.addr)
    converge(a, b)
    a.t.lus["v1"].write(b"\x06" * 4096, 0)
    converge(a, b)
    assert "injected" in (b.rsg.status().get("error") or ""), \
        b.rsg.status()


def test_an_image_kept_without_its_point_is_named_to_no_primary(
        two_nodes, monkeypatch):
    """A node protected and inconsistent whose record holds no image point
    (a record older than the point): RBOK names no image rather than
    failing the replay's start."""
    a, b = two_nodes
    break_a_replay(a, b, monkeypatch)
    b.rsg.image_point = None
    assert b.rsg._image_kept() == {}
