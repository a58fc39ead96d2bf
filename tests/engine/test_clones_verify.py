"""Online verify of a clone against its Source (target.clones.verify), on
memory backends: planted differences are found and marked (and only
they), host writes during a comparison never show up as a difference, a
stopped verify leaves the maps valid, the rate is honoured."""

import time

import pytest

from target import clones, maps

from tests.support.clonegroup import EXTENTS, GRAN, SIZE, Harness


@pytest.fixture
def h(tmp_path):
    h = Harness(tmp_path)
    h.lu.write(bytes(range(256)) * (SIZE // 256), 0)
    h.sync("c1")
    return h


def _plant(h, extents, name="c1"):
    """Change the clone's bytes behind the target's back."""
    for e in extents:
        h.mem[name].data[e * GRAN + 7] ^= 0xFF


def _verify(h, name="c1", **kw):
    engine = h.group.start_verify(name, run=False, **kw)
    engine.run()
    return h.group.clone_status(h.group.clones[name])["verify"]


def test_planted_differences_are_marked_and_resynced(h):
    _plant(h, [3, 9])
    result = _verify(h)
    assert result["extents_differing"] == 2
    assert result["differing_offsets"] == [3 * GRAN, 9 * GRAN]
    assert result["extents_compared"] == EXTENTS
    assert not result["running"]
    clone = h.group.clones["c1"]
    assert list(maps.runs(clone.delta)) == [(3, 4), (9, 10)]
    # A synchronized clone stays mirrored and resyncs exactly them.
    assert clone.state == clones.SYNCING
    assert h.states["c1"] == clones.SYNCING
    assert h.group.engine.clone is clone
    # The marks are durable: a crash recovers them.
    h.crash()
    assert list(maps.runs(h.group.clones["c1"].delta)) == [(3, 4), (9, 10)]
    engine = h.group.resume(run=False) and h.group.engine
    copied = []
    h.group.copy_hook = lambda engine, s, e: copied.append((s, e))
    h.run(engine)
    assert copied == [(3, 4), (9, 10)]
    assert h.states["c1"] == clones.SYNCHRONIZED
    assert h.mem_src.data == h.mem["c1"].data


def test_equal_clone_stays_synchronized(h):
    result = _verify(h)
    assert result["extents_differing"] == 0
    assert result["extents_compared"] == EXTENTS
    assert h.group.clones["c1"].state == clones.SYNCHRONIZED
    assert h.group.clones["c1"].delta.count(1) == 0


def test_fractured_clone_compares_only_clean_extents(h):
    h.group.fracture("c1")
    h.group.clones["c1"].export.write(b"x" * GRAN, 2 * GRAN)   # marked
    _plant(h, [5])
    result = _verify(h)
    assert result["extents_compared"] == EXTENTS - 1
    assert result["extents_differing"] == 1
    assert result["differing_offsets"] == [5 * GRAN]
    clone = h.group.clones["c1"]
    assert list(maps.runs(clone.delta)) == [(2, 3), (5, 6)]
    assert clone.state == clones.FRACTURED


def test_host_writes_during_comparison_are_rechecked(h):
    """A mirrored write lands between the Source's and the clone's read
    (the window in which they look different): the chunk is compared
    again, nothing is reported."""
    engine = h.group.start_verify("c1", run=False)
    engine.chunk = 4
    hits = []

    def write_between(engine, s, e):
        if len(hits) < 3:
            hits.append(s)
            # Source changes now, so the copy read before differs from
            # the clone read after: without the re-check a false report.
            h.lu.write(b"Q" * 10, s * GRAN)
    h.group.copy_hook = write_between
    engine.run()
    result = h.group.clone_status(h.group.clones["c1"])["verify"]
    assert len(hits) == 3
    assert result["extents_differing"] == 0, result
    assert result["collisions"] >= 3
    assert h.group.clones["c1"].delta.count(1) == 0
    assert h.group.clones["c1"].state == clones.SYNCHRONIZED
    assert h.mem_src.data == h.mem["c1"].data


def test_without_recheck_a_write_shows_as_a_false_difference(h):
    """The twin of the test above: with collision retries off, the same
    race reports a difference that is not there."""
    h.group.retry_collisions = False
    engine = h.group.start_verify("c1", run=False)
    engine.chunk = 4
    hits = []

    def write_between(engine, s, e):
        if not hits:
            hits.append(s)
            h.lu.write(b"Q" * 10, s * GRAN)
    h.group.copy_hook = write_between
    engine.run()
    result = h.group.clone_status(h.group.clones["c1"])["verify"]
    assert result["extents_differing"] == 1


def test_stopped_verify_leaves_maps_valid(h):
    h.group.fracture("c1")
    _plant(h, [1, 14])
    engine = h.group.start_verify("c1", run=False)
    engine.chunk = 2

    def stop_after_first(engine, s, e):
        if s >= 4:
            engine.stop("asked")
    h.group.copy_hook = stop_after_first
    engine.run()
    result = h.group.clone_status(h.group.clones["c1"])["verify"]
    assert result["stopped"] and not result["running"]
    assert result["extents_compared"] < EXTENTS
    clone = h.group.clones["c1"]
    # What was found is marked, nothing else; what was not reached is not.
    assert list(maps.runs(clone.delta)) == [(1, 2)]
    h.crash()
    assert list(maps.runs(h.group.clones["c1"].delta)) == [(1, 2)]
    assert h.clean_extents_equal("c1") is False   # extent 14, not reached
    # The group is free again; a verify of the rest finds the other one.
    h.group.start_verify("c1", run=False).run()
    assert list(maps.runs(h.group.clones["c1"].delta)) == [(1, 2), (14, 15)]


def test_verify_refusals(h):
    h.group.start_sync("c2", run=False)
    with pytest.raises(clones.GroupBusy):
        h.group.start_verify("c1", run=False)
    with pytest.raises(clones.InvalidTransition):
        h.group.start_verify("c2", run=False)   # syncing: not comparable


def test_sync_refused_while_verify_runs(tmp_path):
    h = Harness(tmp_path)
    h.sync("c1")
    h.group.start_verify("c1", run=False)
    with pytest.raises(clones.GroupBusy):
        h.group.start_sync("c2", run=False)


def test_rate_is_honoured(h):
    engine = h.group.start_verify("c1", run=False, rate=SIZE)
    engine.chunk = 2
    started = time.monotonic()
    engine.run()
    took = time.monotonic() - started
    # SIZE bytes at SIZE bytes/s: the last chunk is not waited for.
    assert 0.8 <= took < 3.0, took
    assert h.group.clone_status(h.group.clones["c1"])["verify"][
        "extents_compared"] == EXTENTS


@pytest.mark.parametrize("fractured", [False, True])
def test_verify_under_a_writer_thread_reports_only_the_planted(h, fractured):
    """A host writer runs throughout (Source writes, mirrored or marked);
    the planted extent is found, no write shows as a difference, and the
    map holds the planted extent and the written ones, nothing else."""
    import random
    import threading
    if fractured:
        h.group.fracture("c1")
    planted = 12
    _plant(h, [planted])
    written = set()
    stop = threading.Event()

    def writer():
        rnd = random.Random(1)
        while not stop.is_set():
            e = rnd.randrange(0, 8)     # the planted extent is not written
            h.lu.write(bytes([rnd.randrange(256)]) * 100, e * GRAN + 50)
            written.add(e)
    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(20):
            engine = h.group.start_verify("c1", run=False)
            engine.chunk = 1
            engine.run()
            if h.group.clones["c1"].delta[planted]:
                break
    finally:
        stop.set()
        t.join()
    result = h.group.clone_status(h.group.clones["c1"])["verify"]
    assert result["extents_differing"] == 1, result
    assert result["differing_offsets"] == [planted * GRAN]
    marked = {e for e in range(EXTENTS) if h.group.clones["c1"].delta[e]}
    if fractured:
        assert marked == {planted} | written
    else:
        assert marked == {planted}
        assert written
