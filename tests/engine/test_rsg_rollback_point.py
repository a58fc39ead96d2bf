"""A secondary whose every volume is rolled back to the group's last
consistent image is consistent at that point again (image_point): only
when every volume holds that point, whatever ran on the node between two
rollbacks, and a rollback counts across a crash.  Promoted, it fails back
to the old primary copying every region where the two differ and not the
volumes."""

import threading

import pytest

from target import session_orchestration
from target import replication as R
from target.lu import LUHeld
from tests.support.rsgmodel import wait_for
from tests.support.targets import hold_copies
from tests.support.twonodes import (SIZES, VOLS, break_a_replay, converge,
                                    replay_broken_off)


def _restart(node):
    node.close()
    node.start()


def _at_point(b):
    with b.rsg.lock:
        return [b.read_below_guard(v)[:4096] for v in range(len(VOLS))]


def test_a_volume_changed_after_its_rollback_is_no_longer_at_the_point(
        two_nodes, monkeypatch):
    """v1 rolled back to the consistent image, then to the admin's
    protected image (another point): v2's rollback must not make the
    group consistent at the consistent image's point."""
    a, b = two_nodes
    break_a_replay(a, b, monkeypatch)
    b.t.image_rollback("v1")
    b.t.image_rollback("v1", image=session_orchestration.PROTECTED)
    b.t.image_rollback("v2")
    got = _at_point(b)
    assert not b.rsg.consistent or got == [b"\x02" * 4096] * 2, (
        "consistent at update {} but the volumes hold {}".format(
            b.rsg.applied_seq, [g[:1] for g in got]))
    with pytest.raises(R.RsgBusy):
        b.t.rsg_promote("g")


def test_a_replay_between_a_rollback_and_its_count_loses_the_point(
        two_nodes, monkeypatch):
    """A primary connects once v1's rollback has copied (the rollback no
    longer refuses it) and before the rollback is counted: its replay
    writes v1 again, so v1 is no longer at the point, and v2's rollback
    must not make the group consistent there."""
    a, b = two_nodes
    break_a_replay(a, b, monkeypatch)
    roll_back = session_orchestration.SessionOrchestration._roll_back

    def then_a_replay(self, source, session):
        res = roll_back(self, source, session)
        if source.name == "v1":
            replay_broken_off(a, b, monkeypatch)
        return res
    monkeypatch.setattr(session_orchestration.SessionOrchestration,
                        "_roll_back", then_a_replay)
    b.t.image_rollback("v1")
    monkeypatch.setattr(session_orchestration.SessionOrchestration,
                        "_roll_back", roll_back)
    if b.t.session_ops.consistent_export(b.t.lus["v2"]):
        b.t.image_rollback("v2")
    got = _at_point(b)
    assert not b.rsg.consistent or got == [b"\x02" * 4096] * 2, (
        "consistent at update {} but the volumes hold {}".format(
            b.rsg.applied_seq, [g[:1] for g in got]))


def test_no_host_connects_to_a_volume_while_it_is_rolled_back(
        two_nodes, monkeypatch):
    """A secondary's rollback to its last consistent image withholds the
    volume as any rollback does: a host connecting meanwhile is refused
    with the reason, and served once the group holds its point again."""
    a, b = two_nodes
    break_a_replay(a, b, monkeypatch)
    copying, go = hold_copies(monkeypatch)
    errs = []

    def roll_back():
        try:
            b.t.image_rollback("v1")
        except Exception as e:      # noqa: the test reports it
            errs.append(e)
    thread = threading.Thread(target=roll_back)
    thread.start()
    try:
        assert copying.wait(30)
        with pytest.raises(LUHeld, match="being rolled back to "
                           "v1@consistent-v1"):
            b.t.connect("v1", True)
    finally:
        go.set()
        thread.join(30)
    assert not thread.is_alive() and errs == []
    b.t.image_rollback("v2")
    assert b.rsg.consistent, b.rsg.status()
    b.t.disconnect(b.t.connect("v1", True))


def test_a_crash_at_the_end_of_the_last_rollback_keeps_the_point(
        two_nodes, monkeypatch):
    """A crash once the last volume's rollback has copied and before it is
    counted: after the restart the group still gets to its point (its
    image was not released before the rollback was counted)."""
    a, b = two_nodes
    break_a_replay(a, b, monkeypatch)
    b.t.image_rollback("v1")
    counted = R.SecondaryGroup.volume_rolled_back

    def crash(self, lu):
        raise KeyboardInterrupt("the node stops here")
    monkeypatch.setattr(R.SecondaryGroup, "volume_rolled_back", crash)
    with pytest.raises(KeyboardInterrupt):
        b.t.image_rollback("v2")
    monkeypatch.setattr(R.SecondaryGroup, "volume_rolled_back", counted)
    _restart(b)
    if not b.rsg.consistent:
        b.t.image_rollback("v2")
    assert b.rsg.consistent, b.rsg.status()
    assert _at_point(b) == [b"\x02" * 4096] * 2


def test_failback_after_every_volume_rolled_back_copies_only_the_changes(
        two_nodes, monkeypatch):
    """B rolled back to its point and promoted; A demoted and linked from
    B: what differs is A's \\x03 blocks (one per volume) and B's writes
    since its promotion, not the volumes."""
    a, b = two_nodes
    break_a_replay(a, b, monkeypatch)
    for vol in VOLS:
        b.t.image_rollback(vol)
    assert b.rsg.consistent, b.rsg.status()
    b.t.rsg_promote("g")
    b.t.lus["v2"].write(b"\x05" * 4096, 128 << 10)
    a.t.rsg_demote("g")
    # A wrote \x03 after the point B holds: a split brain, B wins.
    link = _b_wins_the_split_brain(a, b)
    assert link.sent_bytes < 8 * (64 << 10), \
        "{} bytes sent to the old primary (the volumes are {})".format(
            link.sent_bytes, sum(SIZES))


def _a_replay_with_clears_and_stream(a, b, monkeypatch, byte, part=1):
    """A, detached, changes every block of the first 1/part of both
    volumes to byte; its replay clears from its DCM what B made durable
    (an RSYN every 64K) and streams A's writes into those parts made
    meanwhile; it breaks off at its end."""
    a.t.rsg_detach("g", b.addr)
    for vol, size in zip(VOLS, SIZES):
        for off in range(0, size // part, 64 << 10):
            a.t.lus[vol].write(bytes([byte]) * (64 << 10), off)
    monkeypatch.setattr(R.link, "REPLAY_SYNC_BYTES", 64 << 10)
    sync = R.SecondaryGroup.replay_sync
    n = [0]

    def sync_then_a_write(self, ident):
        sync(self, ident)
        n[0] += 1
        vol = n[0] % 2
        off = (n[0] * 17 * 4096 + 512 * n[0]) % (SIZES[vol] // part - 8192)
        a.t.lus[VOLS[vol]].write(bytes([byte + n[0]]) * 5000, off)
    monkeypatch.setattr(R.SecondaryGroup, "replay_sync", sync_then_a_write)
    replay_broken_off(a, b, monkeypatch)
    monkeypatch.setattr(R.SecondaryGroup, "replay_sync", sync)
    assert n[0] >= 2 and a.rsg.links[0].replay_cleared, n
    assert not b.rsg.consistent


def _fail_back(a, b, b_writes=True):
    """B, rolled back to its point, is promoted (and writes, b_writes);
    A is demoted and linked from B, a split brain that B wins: the link,
    once the two are byte-equal."""
    b.t.rsg_promote("g")
    if b_writes:
        b.t.lus["v2"].write(b"\x05" * 4096, 200 << 10)
        b.t.lus["v1"].write(b"\x05" * 8192, 900 << 10)
    a.t.rsg_demote("g")
    return _b_wins_the_split_brain(a, b)


def _b_wins_the_split_brain(a, b):
    """A, demoted, is linked from B: a split brain that B wins; the link,
    once the two are byte-equal."""
    b.t.rsg_link("g", a.addr, "async", a.tok)
    link = b.rsg.links[0]
    wait_for(lambda: link.split_brain, 10, "the split brain",
             lambda: (link.status(), a.rsg.status()))
    b.t.rsg_attach("g", a.addr, discard_secondary_changes=True)
    converge(b, a)
    with a.rsg.lock:
        for v in range(len(VOLS)):
            assert a.read_below_guard(v) == b.read_below_guard(v), VOLS[v]
    return link


@pytest.mark.parametrize("case", ["clears", "A restarted", "A killed",
                                  "B restarted", "B wrote nothing",
                                  "two replays", "rolled back twice"])
def test_failback_after_rollbacks_copies_a_superset_of_what_differs(
        two_nodes, monkeypatch, case):
    """A's replays to B broke off after B had made regions durable that A
    then cleared from its DCM, with A's writes streamed meanwhile; every
    volume of B rolled back to its point, B promoted: failing back to A
    copies what differs (the volumes are byte-equal after), and only the
    halves A changed with B's writes, not the volumes."""
    a, b = two_nodes
    for vol, size in zip(VOLS, SIZES):
        a.t.lus[vol].write(b"\x01" * size, 0)
    converge(a, b)
    _a_replay_with_clears_and_stream(a, b, monkeypatch, 0x20, part=2)
    link = a.rsg.links[0]
    # The regions B made durable are cleared: A's DCM alone misses them.
    assert link.dcm.count() < link.dcm.extents // 2, link.dcm.count()
    if case == "two replays":
        a.t.lus["v1"].write(b"\x31" * 4096, 300 << 10)
        _a_replay_with_clears_and_stream(a, b, monkeypatch, 0x40, part=2)
    if case == "A restarted":
        _restart(a)
    elif case == "A killed":
        a.kill()
        a.start()
    for vol in VOLS:
        b.t.image_rollback(vol)
    assert b.rsg.consistent, b.rsg.status()
    with b.rsg.lock:
        assert [b.read_below_guard(v) for v in range(len(VOLS))] == \
            [b"\x01" * s for s in SIZES]
    if case == "rolled back twice":
        # A replays over the point B rolled back to, broken off again:
        # B keeps a new image of that point and rolls back to it.
        a.t.lus["v2"].write(b"\x66" * 4096, 64 << 10)
        replay_broken_off(a, b, monkeypatch)
        for vol in VOLS:
            b.t.image_rollback(vol)
        assert b.rsg.consistent, b.rsg.status()
    if case == "B restarted":
        _restart(b)
    link = _fail_back(a, b, b_writes=case != "B wrote nothing")
    half = sum(SIZES) // 2
    assert link.sent_bytes <= half + (64 << 10), \
        "{} bytes sent to the old primary (the volumes are {})".format(
            link.sent_bytes, sum(SIZES))


def test_failback_after_some_volumes_rolled_back_copies_everything(
        two_nodes, monkeypatch):
    """Only v1 of B rolled back: B holds no point of the group, so its
    promotion is refused; promoted with --force, failing back to A copies
    every extent (nothing ties the volumes to a point A's maps know)."""
    a, b = two_nodes
    for vol, size in zip(VOLS, SIZES):
        a.t.lus[vol].write(b"\x01" * size, 0)
    converge(a, b)
    _a_replay_with_clears_and_stream(a, b, monkeypatch, 0x20, part=2)
    b.t.image_rollback("v1")
    assert not b.rsg.consistent
    with pytest.raises(R.RsgBusy):
        b.t.rsg_promote("g")
    b.t.rsg_promote("g", force=True)
    b.t.lus["v2"].write(b"\x05" * 4096, 200 << 10)
    a.t.rsg_demote("g")
    link = _b_wins_the_split_brain(a, b)
    assert link.sent_bytes >= sum(SIZES), link.sent_bytes


@pytest.mark.parametrize("case", ["plain", "restart between", "two replays",
                                  "primary between"])
def test_a_primary_copies_back_what_the_rollbacks_took(two_nodes,
                                                       monkeypatch, case):
    """B rolled back to its point after broken replays whose regions A
    cleared from its DCM (B had made them durable) and whose stream
    entries B acknowledged: A, attached again, makes B equal to it."""
    a, b = two_nodes
    for vol, size in zip(VOLS, SIZES):
        a.t.lus[vol].write(b"\x01" * size, 0)
    converge(a, b)
    _a_replay_with_clears_and_stream(a, b, monkeypatch, 0x20)
    if case == "two replays":
        _a_replay_with_clears_and_stream(a, b, monkeypatch, 0x40)
    b.t.image_rollback("v1")
    if case == "restart between":
        _restart(b)
    if case == "primary between":
        a.t.rsg_attach("g", b.addr)
        converge(a, b)
        a.t.rsg_detach("g", b.addr)
        wait_for(lambda: b.rsg.connected_since is None)
    else:
        b.t.image_rollback("v2")
        assert b.rsg.consistent, b.rsg.status()
        assert _at_point(b) == [b"\x01" * 4096] * 2
        with b.rsg.lock:
            assert [b.read_below_guard(v) for v in range(len(VOLS))] == \
                [b"\x01" * s for s in SIZES]
    a.t.lus["v2"].write(b"\x77" * 4096, 8192)
    a.t.rsg_attach("g", b.addr)
    converge(a, b)
    with b.rsg.lock:
        for v in range(len(VOLS)):
            assert b.read_below_guard(v) == a.read_below_guard(v), VOLS[v]


@pytest.mark.parametrize("then", ["B attaches again", "A promoted"])
def test_a_demoted_primary_rolled_back_keeps_what_it_had_diverged(
        two_nodes, monkeypatch, then):
    """A, demoted with a write no secondary had (diverged), gets B's
    replay (B won the split brain), broken off; A rolled back holds its
    own point again, diverged as before plus the rollbacks' regions:
    whichever side then wins, the two end equal."""
    a, b = two_nodes
    for vol, size in zip(VOLS, SIZES):
        a.t.lus[vol].write(b"\x01" * size, 0)
    converge(a, b)
    a.t.rsg_detach("g", b.addr)
    wait_for(lambda: b.rsg.connected_since is None)
    a.t.lus["v1"].write(b"\x0a" * 4096, 64 << 10)
    b.t.rsg_promote("g")
    b.t.lus["v1"].write(b"\x0b" * 4096, 128 << 10)
    b.t.lus["v2"].write(b"\x0b" * (64 << 10), 0)
    a.t.rsg_demote("g")
    with a.rsg.lock:
        before = [a.read_below_guard(v) for v in range(len(VOLS))]
    b.t.rsg_link("g", a.addr, "async", a.tok)
    wait_for(lambda: b.rsg.links[0].split_brain, 10, "the split brain")
    replay_broken_off(b, a, monkeypatch, discard_secondary_changes=True)
    assert not a.rsg.consistent and a.rsg.protected, a.rsg.status()
    for vol in VOLS:
        a.t.image_rollback(vol)
    assert a.rsg.consistent, a.rsg.status()
    with a.rsg.lock:
        assert [a.read_below_guard(v) for v in range(len(VOLS))] == before
    if then == "B attaches again":
        src, dst = b, a
        b.t.rsg_attach("g", a.addr)
    else:
        a.t.rsg_promote("g")
        b.t.rsg_demote("g")
        a.t.rsg_link("g", b.addr, "async", b.tok)
        src, dst = a, b
    link = src.rsg.links[0]
    wait_for(lambda: link.split_brain or dst.rsg.connected_since, 10,
             "the link's contact", lambda: (src.rsg.status(), dst.rsg.status()))
    if link.split_brain:
        src.t.rsg_attach("g", dst.addr, discard_secondary_changes=True)
    converge(src, dst)
    with dst.rsg.lock:
        for v in range(len(VOLS)):
            assert dst.read_below_guard(v) == src.read_below_guard(v), \
                VOLS[v]


@pytest.mark.parametrize("case", ["A demoted during the replay",
                                  "replay begun in the stream"])
def test_failback_after_other_broken_replays_ends_byte_equal(
        two_nodes, monkeypatch, case):
    """A demoted while its replay to B runs (after B made some of it
    durable and A cleared it), or a replay that a volume change on A began
    in the stream and that broke off at its end: B rolled back and
    promoted, failing back to A leaves the two byte-equal."""
    a, b = two_nodes
    for vol, size in zip(VOLS, SIZES):
        a.t.lus[vol].write(b"\x01" * size, 0)
    converge(a, b)
    monkeypatch.setattr(R.link, "REPLAY_SYNC_BYTES", 64 << 10)
    monkeypatch.setattr(R.link, "REPLAY_CHUNK", 64 << 10)
    if case == "A demoted during the replay":
        a.t.rsg_detach("g", b.addr)
        for vol, size in zip(VOLS, SIZES):
            a.t.lus[vol].write(b"\x20" * (size // 2), 0)
        sync = R.SecondaryGroup.replay_sync
        n, third, go = [0], threading.Event(), threading.Event()

        def held_at_the_third(self, ident):
            sync(self, ident)
            n[0] += 1
            if n[0] == 3:
                third.set()
                go.wait(10)
        monkeypatch.setattr(R.SecondaryGroup, "replay_sync",
                            held_at_the_third)
        a.t.rsg_attach("g", b.addr)
        assert third.wait(10)
        a.t.lus["v1"].write(b"\x44" * 4096, 4096)
        a.t.rsg_demote("g")
        go.set()
        wait_for(lambda: b.rsg.connected_since is None)
        monkeypatch.setattr(R.SecondaryGroup, "replay_sync", sync)
    else:
        a.t.image_protect("v1")
        a.t.lus["v1"].write(b"\x30" * (SIZES[0] // 2), 0)
        converge(a, b)
        # The rollback on A begins a replay within the stream.
        replay_broken_off(a, b, monkeypatch,
                          start=lambda: a.t.image_rollback("v1"))
    assert a.rsg is None or a.rsg.role == R.SECONDARY or \
        a.rsg.links[0].replay_image
    assert not b.rsg.consistent
    for vol in VOLS:
        b.t.image_rollback(vol)
    assert b.rsg.consistent, b.rsg.status()
    b.t.rsg_promote("g")
    b.t.lus["v1"].write(b"\x05" * 8192, 900 << 10)
    if a.rsg.role == R.PRIMARY:
        a.t.rsg_demote("g")
    assert a.rsg.diverged.get("image_maps"), a.rsg.diverged
    link = _b_wins_the_split_brain(a, b)
    assert link.sent_bytes < sum(SIZES), link.sent_bytes
