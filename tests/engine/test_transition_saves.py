"""A clone state change whose save fails changes nothing.

Each transition is saved first (the inventory, through the group's
persist callback) and taken second: with the save failing like a full
state directory does, the clone keeps its state in memory as on disk, and
what depends on the state (mirroring, the export, the read path, the
engine) stays as it was.
"""

import errno

import pytest

from target import clones, errors

from tests.support.clonegroup import GRAN, SIZE, FailingBackend, \
    FullHarness


@pytest.fixture
def h(tmp_path):
    return FullHarness(tmp_path)


def _refused(h, func):
    h.full = True
    try:
        with pytest.raises((errors.Error, OSError)) as info:
            func()
    finally:
        h.full = False
    assert info.value.errno == errno.ENOSPC
    assert "No space left on device" in str(info.value)
    return info.value


def test_fracture_not_saved_keeps_mirroring(h):
    h.lu.write(b"A" * SIZE, 0)
    h.sync("c1")
    c1 = h.group.clones["c1"]
    err = _refused(h, lambda: h.group.fracture("c1"))
    assert c1.state == h.states["c1"] == clones.SYNCHRONIZED
    assert "stays synchronized" in str(err)
    # Not exported: its writes are refused.
    with pytest.raises(errors.ReadOnly):
        c1.export.write(b"X" * GRAN, 0)
    # Source writes are still mirrored, and no bit is set for them.
    h.lu.write(b"B" * GRAN, 3 * GRAN)
    assert h.mem["c1"].data == h.mem_src.data
    assert c1.delta.count(1) == 0
    # A restart finds what the inventory says, with nothing to copy.
    h.group.commit()
    h.crash()
    assert h.group.clones["c1"].state == clones.SYNCHRONIZED
    assert h.group.clones["c1"].delta.count(1) == 0
    # With space again the fracture succeeds, at the Source's image.
    h.lu.write(b"C" * GRAN, 5 * GRAN)
    at_fracture = bytes(h.mem_src.data)
    h.group.fracture("c1")
    assert h.states["c1"] == clones.FRACTURED
    h.lu.write(b"D" * GRAN, 5 * GRAN)
    assert bytes(h.mem["c1"].data) == at_fracture


def test_sync_start_not_saved_starts_nothing(h):
    h.lu.write(b"A" * SIZE, 0)
    _refused(h, lambda: h.group.start_sync("c1", rate=1 << 20, run=False))
    c1 = h.group.clones["c1"]
    assert c1.state == h.states["c1"] == clones.OUT_OF_SYNC
    assert c1.rate is None
    assert h.group.engine is None
    # Not mirrored: Source writes keep setting bits.
    h.lu.write(b"B" * GRAN, 0)
    assert bytes(h.mem["c1"].data[:GRAN]) == bytes(GRAN)


def test_sync_completion_not_saved_stays_syncing(h):
    h.lu.write(b"A" * SIZE, 0)
    engine = h.group.start_sync("c1", run=False)
    while engine.step():
        pass
    _refused(h, engine.finish)
    assert h.group.clones["c1"].state == h.states["c1"] == clones.SYNCING
    # Recorded as failed is not possible either: the engine stops and the
    # clone stays what the inventory says (resumed after a restart).
    h.full = True
    try:
        engine.fail("TransitionNotSaved")
    finally:
        h.full = False
    assert h.group.clones["c1"].state == clones.SYNCING
    assert not engine.running
    h.crash()
    assert h.group.resume(run=False) is h.group.clones["c1"]
    h.run(h.group.engine)
    assert h.states["c1"] == clones.SYNCHRONIZED


def test_restore_start_not_saved_changes_no_path(h):
    h.lu.write(b"A" * SIZE, 0)
    h.sync("c1")
    h.group.fracture("c1")
    c1 = h.group.clones["c1"]
    c1.export.write(b"C" * GRAN, 2 * GRAN)
    _refused(h, lambda: h.group.start_restore("c1", run=False))
    assert c1.state == h.states["c1"] == clones.FRACTURED
    assert h.group.restoring is None
    assert h.lu.read == h.mem_src.readinto
    # A Source write is the fractured clone's divergence, not a protected
    # restore's host write.
    h.lu.write(b"B" * GRAN, 7 * GRAN)
    assert c1.delta[7] == 1 and h.group.prm.count(1) == 0
    buf = bytearray(GRAN)
    h.lu.read(buf, 2 * GRAN)
    assert buf == b"A" * GRAN


def test_reverse_sync_start_not_saved_keeps_reads(h):
    h.lu.write(b"A" * SIZE, 0)
    h.sync("c1")
    h.group.fracture("c1")
    h.group.clones["c1"].export.write(b"C" * GRAN, 2 * GRAN)
    _refused(h, lambda: h.group.start_reverse_sync("c1", run=False))
    assert h.group.clones["c1"].state == clones.FRACTURED
    buf = bytearray(GRAN)
    h.lu.read(buf, 2 * GRAN)
    assert buf == b"A" * GRAN


def test_mirror_failure_not_saved_fails_the_write_after_every_mirror(
        tmp_path):
    """c1's mirrored write fails and its out-of-sync state cannot be saved:
    c2 still gets the write, the write fails with the save's error, c1
    keeps its bit; a fracture saves the pending state change first and is
    refused."""
    h = FullHarness(tmp_path)
    failing = FailingBackend(h.mem["c1"])
    h.group.clones["c1"].backend = failing
    h.lu.write(b"A" * SIZE, 0)
    h.sync("c1")
    h.sync("c2")
    failing.fail_writes = errno.EIO
    h.full = True
    with pytest.raises(clones.TransitionNotSaved):
        h.lu.write(b"B" * GRAN, 4 * GRAN)
    assert bytes(h.mem["c2"].data[4 * GRAN:5 * GRAN]) == b"B" * GRAN
    c1 = h.group.clones["c1"]
    assert c1.state == h.states["c1"] == clones.SYNCHRONIZED
    assert c1.delta[4] == 1
    failing.fail_writes = None
    _refused(h, lambda: h.group.fracture("c1"))
    assert c1.state == clones.SYNCHRONIZED
    with pytest.raises(clones.InvalidTransition):
        h.group.fracture("c1")
    assert c1.state == h.states["c1"] == clones.OUT_OF_SYNC
    assert c1.delta[4] == 1
