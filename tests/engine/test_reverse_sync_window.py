"""Writes to a fractured clone's export around the start of its reverse
sync.

A reverse sync copies the clone's differing extents into the Source, so
every other clone of the Source (a sibling) must have those extents
dirty: otherwise a sibling synchronized later skips them and differs from
the Source under clean bits.  The siblings get the clone's bits before
the switch to reverse-syncing, but the export stays writable until that
switch (its hosts, and the iSCSI gateway's mount, which does not refuse
the start), so a write in between adds bits the siblings must get too.
After the switch the export is no longer writable: a write that was
admitted before and waited behind the switch's quiesce must be refused,
not land on a clone the engine is copying from.
"""

import threading

import pytest

from target import clones, errors

from tests.support.clonegroup import EXTENTS, GRAN, SIZE, Harness


@pytest.fixture
def h(tmp_path):
    h = Harness(tmp_path)
    h.lu.write(bytes([1]) * SIZE, 0)
    h.sync("c1")
    h.sync("c2")
    h.group.fracture("c1")
    h.group.fracture("c2")
    h.group.clones["c1"].export.write(bytes([2]) * GRAN, 0)
    return h


def _start_with_a_write_in_the_window(h, monkeypatch):
    """Start c1's reverse sync (not run); c1's export writes extent 9 in
    its start's commit, which runs between the siblings' bits and the
    switch, the export still writable.  Returns the engine."""
    real_commit = clones.CloneGroup.commit
    written = []

    def commit(group):
        if not written:
            written.append(9)
            group.clones["c1"].export.write(bytes([3]) * GRAN, 9 * GRAN)
        real_commit(group)
    monkeypatch.setattr(clones.CloneGroup, "commit", commit)
    engine = h.group.start_reverse_sync("c1", run=False)
    monkeypatch.setattr(clones.CloneGroup, "commit", real_commit)
    assert written
    return engine


def test_a_clone_write_before_the_switch_dirties_the_siblings(
        h, monkeypatch):
    h.run(_start_with_a_write_in_the_window(h, monkeypatch))
    assert h.extent(h.mem_src, 9) == bytes([3]) * GRAN
    c2 = h.group.clones["c2"]
    assert c2.delta[9], "the sibling's map misses an extent the reverse " \
        "sync copied into the Source"
    h.sync("c2")
    assert all(h.extent(h.mem_src, e) == h.extent(h.mem["c2"], e)
               for e in range(EXTENTS))


def test_a_clone_write_waiting_behind_the_switch_is_refused(h):
    group = h.group
    c1 = group.clones["c1"]
    with group.cond:
        group.quiesce += 1          # a switch in progress
    outcome = []

    def write():
        try:
            c1.export.write(bytes([4]) * GRAN, 5 * GRAN)
            outcome.append("written")
        except errors.Error as e:
            outcome.append(e)
    writer = threading.Thread(target=write)
    writer.start()
    writer.join(0.3)
    assert writer.is_alive(), "the write did not wait for the switch"
    with group.cond:
        group.transition(c1, "reverse-sync")
        group.quiesce -= 1
        group.cond.notify_all()
    writer.join(5)
    assert outcome and isinstance(outcome[0], errors.ReadOnly), \
        "a write admitted before the switch landed on a reverse-syncing " \
        "clone: {}".format(outcome)
    assert h.extent(h.mem["c1"], 5) == bytes([1]) * GRAN


def test_the_siblings_bits_of_the_switch_survive_a_crash(h, monkeypatch):
    """The bits the switch adds are made durable (the activity map)
    before the reverse-syncing state is: a crash before the next commit
    must not lose them while the resumed reverse sync copies the extent
    into the Source."""
    _start_with_a_write_in_the_window(h, monkeypatch)
    assert h.group.clones["c2"].delta[9]
    assert h.states["c1"] == clones.REVERSE_SYNCING
    h.crash()                                   # kill -9 before a commit
    assert h.group.resume(run=False) is h.group.clones["c1"]
    h.run(h.group.engine)
    assert h.extent(h.mem_src, 9) == bytes([3]) * GRAN
    c2 = h.group.clones["c2"]
    assert c2.delta[9], "after the crash the sibling's map misses extent " \
        "9, which the resumed reverse sync copied into the Source"
