"""A primary whose group record cannot be saved (a full state directory)
loses nothing and stops nothing for good.

- A replay's start is recorded before the link stops marking changes in
  its DCM.  If that record is not saved, a clean stop keeps the activity
  log, so the next start still replays what was written meanwhile.
- A link whose failure cannot be recorded keeps retrying. Its thread does
  not end, which would leave replication off until an `rsg attach`.
- An admin's change of a group (`rsg set`, `rsg link`, `rsg unlink`) whose
  record cannot be saved is refused and is not in force either: the
  running group stays as its record says, so what the admin was told
  holds now and after a restart.
- A secondary whose record of a replay's end cannot be saved stays what
  its record says (inconsistent, its last consistent image kept) until a
  later replay's end is saved.
"""

import errno
import os
import threading

import pytest

from target import replication as R
from tests.support.rsgmodel import wait_for
from tests.support.twonodes import (converge, image_released,  # noqa: F401
                                    two_nodes, write_and_detach)


def record_saves_fail(monkeypatch, node, when=lambda record: True):
    """From the moment the returned list holds True, node's group record
    is not saved (ENOSPC) when when(record) says so."""
    full = []
    save = node.rsg.files.save

    def failing(record):
        if full and when(record):
            full.append(record)
            raise OSError(errno.ENOSPC, "injected")
        save(record)
    monkeypatch.setattr(node.rsg.files, "save", failing)
    return full


def unrecorded_replay_start(a, b, monkeypatch):
    """A writes into its link's DCM while detached, then attaches: the
    replay's start (the link joining the SRL) is made and not recorded,
    and from then on A's record is not saved.  Returns (full, join): the
    list to clear to let saves through, the real replay_join to put
    back."""
    converge(a, b)
    a.t.rsg_detach("g", b.addr)
    wait_for(lambda: b.rsg.connected_since is None)
    a.t.lus["v1"].write(b"\x02" * 4096, 0)          # into the DCM
    full = record_saves_fail(monkeypatch, a)
    join = R.PrimaryGroup.replay_join

    def joined_then_full(self, link):
        join(self, link)
        full.append(True)
    monkeypatch.setattr(R.PrimaryGroup, "replay_join", joined_then_full)
    a.t.rsg_attach("g", b.addr)
    link = a.rsg.links[0]
    wait_for(lambda: link.state == R.FAILED and link.holds == R.link.SRL_DCM,
             10, "the replay's start, not recorded", link.status)
    return full, join


def test_writes_after_an_unrecorded_replay_start_reach_the_secondary(
        two_nodes, monkeypatch):  # noqa: F811
    a, b = two_nodes
    full, join = unrecorded_replay_start(a, b, monkeypatch)
    # Logged in the SRL only: the DCM is static since the join.
    a.t.lus["v1"].write(b"\x03" * 4096, 8192)
    a.close()
    full.clear()
    monkeypatch.setattr(R.PrimaryGroup, "replay_join", join)
    a.start()
    converge(a, b)
    assert b.read_base(0)[:12288] == a.read_top(0)[:12288]


def test_writes_after_an_unrecorded_replay_start_survive_failed_saves(
        two_nodes, monkeypatch):  # noqa: F811
    """As above, but the secondary is away and the link retries for a while,
    each retry a save that fails, before the stop: the activity log must
    keep the write's region all along."""
    a, b = two_nodes
    full, join = unrecorded_replay_start(a, b, monkeypatch)
    b.close()
    a.t.lus["v1"].write(b"\x03" * 4096, 8192)
    saves = []
    save = a.rsg.files.save

    def counted(record):
        saves.append(True)
        save(record)
    monkeypatch.setattr(a.rsg.files, "save", counted)
    wait_for(lambda: len(saves) >= 3, 20, "three failed saves (retries)")
    a.close()
    full.clear()
    monkeypatch.setattr(R.PrimaryGroup, "replay_join", join)
    a.start()
    b.start()
    converge(a, b)
    assert b.read_base(0)[:12288] == a.read_top(0)[:12288]


def test_a_link_whose_failure_cannot_be_recorded_keeps_retrying(
        two_nodes, monkeypatch):  # noqa: F811
    a, b = two_nodes
    converge(a, b)
    full = record_saves_fail(monkeypatch, a)
    full.append(True)
    link = a.rsg.links[0]
    wait_for(lambda: link.state == R.FAILED, 10, "the link's failure",
             link.status)
    full.clear()
    a.t.lus["v1"].write(b"\x04" * 4096, 0)
    converge(a, b)
    assert b.read_base(0)[:4096] == b"\x04" * 4096


@pytest.mark.parametrize("side", ["primary", "secondary"])
def test_a_policy_change_that_cannot_be_recorded_is_not_in_force(
        two_nodes, monkeypatch, side):  # noqa: F811
    a, b = two_nodes
    converge(a, b)
    node = a if side == "primary" else b
    record_saves_fail(monkeypatch, node).append(True)
    with pytest.raises(OSError):
        node.t.rsg_set("g", after_split_brain="discard-zero-changes")
    assert node.rsg.status()["after_split_brain"] == "disconnect"
    if side == "primary":
        # What a diverged secondary would be told, and what decides.
        assert node.rsg.after_split_brain == "disconnect"
        assert node.rsg.hello()["after_split_brain"] == "disconnect"


def test_a_link_that_cannot_be_recorded_is_not_kept(
        two_nodes, monkeypatch):  # noqa: F811
    a, b = two_nodes
    converge(a, b)
    token = a.rsg.links[0].token_file
    a.t.rsg_unlink("g", b.addr)
    full = record_saves_fail(monkeypatch, a)
    full.append(True)
    with pytest.raises(OSError):
        a.t.rsg_link("g", b.addr, "async", token)
    assert a.rsg.links == []
    assert not os.path.exists(a.rsg.files.dcm(0))
    # The admin tries again once there is room, and it replicates.
    full.clear()
    a.t.rsg_link("g", b.addr, "async", token)
    a.t.lus["v1"].write(b"\x05" * 4096, 0)
    converge(a, b)
    assert b.read_base(0)[:4096] == b"\x05" * 4096


def test_an_unlink_that_cannot_be_recorded_keeps_the_link(
        two_nodes, monkeypatch):  # noqa: F811
    a, b = two_nodes
    converge(a, b)
    link = a.rsg.links[0]
    dcm = a.rsg.files.dcm(link.index)
    full = record_saves_fail(monkeypatch, a)
    full.append(True)
    with pytest.raises(OSError):
        a.t.rsg_unlink("g", b.addr)
    full.clear()
    # Still linked, as the record says: it replicates, and its change map
    # (which a restart needs to know what the secondary lacks) is kept.
    assert [l.secondary for l in a.rsg.links] == [b.addr]
    assert os.path.exists(dcm)
    a.t.lus["v1"].write(b"\x06" * 4096, 0)
    converge(a, b)
    assert b.read_base(0)[:4096] == b"\x06" * 4096
    a.close()
    a.start()
    assert a.rsg.problems == []
    converge(a, b)


def test_a_reservation_that_cannot_be_recorded_is_made_again(
        two_nodes, monkeypatch):  # noqa: F811
    """With no link holding the SRL, write numbers are reserved durably in
    blocks before they are handed out (so none is handed out twice across
    a crash).  A reservation whose record cannot be saved fails its write
    and reserves nothing: the next write reserves again."""
    a, b = two_nodes
    converge(a, b)
    a.t.rsg_detach("g", b.addr)
    g = a.rsg
    g.seq_bound = g.next_seq            # the next write must reserve
    full = record_saves_fail(monkeypatch, a)
    full.append(True)
    with pytest.raises(OSError):
        a.t.lus["v1"].write(b"\x07" * 4096, 0)
    full.clear()
    a.t.lus["v1"].write(b"\x08" * 4096, 0)
    seq = g.next_seq - 1
    assert g.files.load()["seq_bound"] > seq, "number {} handed out, " \
        "not reserved".format(seq)


def test_a_second_unlink_of_the_same_link_starts_nothing(
        two_nodes):  # noqa: F811
    """Two `rsg unlink` of one link at once: the second finds it removed
    and is refused; no thread of the removed link runs on."""
    a, b = two_nodes
    converge(a, b)
    link = a.rsg.links[0]
    a.t.rsg_unlink("g", b.addr)
    with pytest.raises(R.ReplicationError):
        a.rsg.remove_link(link)
    assert not link.thread.is_alive()


def test_a_failed_activity_log_sweep_does_not_hold_the_record_lock(
        two_nodes, monkeypatch):
    """A save of the record whose activity log sweep fails (its map file
    closed by a failed rewrite, EIO writing in place) fails that save,
    and the next save still runs: the lock that orders the records is not
    left held, or every later save (each flush's, each link's) would
    wait for ever."""
    a, b = two_nodes
    a.t.lus["v1"].write(b"\x01" * 4096, 0)
    converge(a, b)
    sweep = a.rsg.al.sweep
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error (injected)")
        sweep()
    monkeypatch.setattr(a.rsg.al, "sweep", failing)
    with pytest.raises(OSError, match="injected"):
        a.rsg.persist()
    done = threading.Event()
    saver = threading.Thread(target=lambda: (a.rsg.persist(), done.set()),
                             daemon=True)
    saver.start()
    assert done.wait(10), "the next save of the record never ran"


def test_a_replays_end_that_cannot_be_recorded_is_not_in_force(
        two_nodes, monkeypatch):  # noqa: F811
    a, b = two_nodes
    write_and_detach(a, b)
    a.t.lus["v1"].write(b"\x02" * 4096, 0)
    full = record_saves_fail(monkeypatch, b,
                             when=lambda record: record["consistent"])
    full.append(True)
    a.t.rsg_attach("g", b.addr)
    wait_for(lambda: len(full) > 1, 10, "the replay's end, not recorded",
             b.rsg.status)
    a.t.rsg_detach("g", b.addr)
    wait_for(lambda: b.rsg.connected_since is None)
    st = b.rsg.status()
    assert not b.rsg.consistent and b.rsg.protected, st
    assert "v1" in b.t.consistent_images, st
    full.clear()
    a.t.rsg_attach("g", b.addr)
    converge(a, b)
    image_released(b)
    assert b.read_base(0)[:4096] == b"\x02" * 4096
