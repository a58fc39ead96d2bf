"""Failing devices: a Source or Clone backend that returns EIO or ENOSPC on
chosen requests (docs/clones.md, state table "syncing | I/O
error | out-of-sync (bits kept)").

Each test checks: the error reaches the caller with its errno (the NBD
plugin passes OSError.errno on to the client), the operation is marked
failed with a message in status, no acknowledged data is lost, every
extent that differs keeps its bit, and everything resumes once the fault
is gone.
"""

import errno

import pytest

from target import clones
from target.clones import mirroring

from tests.support.clonegroup import (EXTENTS, GRAN, Harness,
                                     on_failing_backends, pattern)


@pytest.fixture
def fh(tmp_path):
    # The Source and both clones on failing backends.
    return on_failing_backends(Harness(tmp_path))


def _clean_extents_equal(h, name):
    delta = h.group.clones[name].delta
    return [e for e in range(EXTENTS) if not delta[e] and
            h.extent(h.mem_src, e) != h.extent(h.mem[name], e)]


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_clone_failing_mid_sync_is_left_out_of_sync_with_bits(fh, code):
    h = fh
    h.lu.write(pattern(1), 0)
    engine = h.group.start_sync("c1", run=False)
    engine.chunk = 2
    assert engine.step()  # extents 0-1 copied
    h.fail["c1"].fail_writes = code
    engine.start()  # the thread hits the fault and fails the sync
    engine.join(10)
    clone = h.group.clones["c1"]
    st = h.group.clone_status(clone)
    assert st["state"] == clones.OUT_OF_SYNC, st
    assert h.states["c1"] == clones.OUT_OF_SYNC
    assert errno.errorcode[code] in st["error"] and "injected" in st["error"]
    assert not st["operation"]["running"]
    # Bits kept: what was copied is clean, the rest still dirty, and no
    # clear bit hides a difference.
    assert clone.delta[0] == 0 and clone.delta[1] == 0
    assert clone.delta.count(1) == EXTENTS - 2
    assert _clean_extents_equal(h, "c1") == []
    # Recovery after a crash keeps them too (the failure was committed).
    h.crash()
    assert h.group.clones["c1"].state == clones.OUT_OF_SYNC
    assert h.group.clones["c1"].delta.count(1) >= EXTENTS - 2
    # The fault is gone: the same backends sync to the end.
    h.fail["c1"].fail_writes = None
    h.group.clones["c1"].backend = h.fail["c1"]
    h.group.source.backend = h.src
    h.sync("c1")
    assert h.group.clones["c1"].state == clones.SYNCHRONIZED
    assert h.mem["c1"].data == h.mem_src.data


def _reverse_syncing(h, start="start_reverse_sync"):
    """c1 synchronized at pattern 1, fractured, written pattern 7 through
    its export; its reverse sync (or start: its restore) started, not
    run, two extents a step."""
    h.lu.write(pattern(1), 0)
    h.sync("c1")
    h.group.fracture("c1")
    h.group.clones["c1"].export.write(pattern(7), 0)
    engine = getattr(h.group, start)("c1", run=False)
    engine.chunk = 2
    return engine


def test_clone_failing_read_mid_reverse_sync_keeps_source_view(fh):
    """A reverse sync whose clone cannot be read stops, keeps its state (the
    Source still shows the clone's data where it is not yet copied), says
    why, and resumes when asked once the fault is gone."""
    h = fh
    engine = _reverse_syncing(h)
    assert engine.step()
    h.fail["c1"].fail_reads = errno.EIO
    h.fail["c1"].fail_from = 8 * GRAN
    engine.start()
    engine.join(10)
    clone = h.group.clones["c1"]
    st = h.group.clone_status(clone)
    assert st["state"] == clones.REVERSE_SYNCING and clone.paused, st
    assert "EIO" in st["error"]
    assert h.group.clones["c1"].delta.count(1) > 0
    h.fail["c1"].fail_reads = None
    h.run(h.group.start_reverse_sync("c1", run=False))
    assert clone.state == clones.SYNCHRONIZED
    assert h.mem_src.data == pattern(7) == h.mem["c1"].data


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_mirrored_write_failing_on_the_clone(fh, code):
    """The host write succeeds (the Source has it); the clone drops out of
    sync with the extent marked; a sync after the fault brings it back."""
    h = fh
    h.lu.write(pattern(1), 0)
    h.sync("c1")
    h.fail["c1"].fail_writes = code
    h.lu.write(b"H" * 5000, 3 * GRAN + 100)
    h.lu.flush()
    clone = h.group.clones["c1"]
    st = h.group.clone_status(clone)
    assert st["state"] == clones.OUT_OF_SYNC, st
    assert "mirrored write failed" in st["error"]
    assert errno.errorcode[code] in st["error"]
    assert clone.delta[3] == 1 and clone.delta[4] == 1
    assert h.mem_src.data[3 * GRAN + 100:3 * GRAN + 5100] == b"H" * 5000
    assert _clean_extents_equal(h, "c1") == []
    # While the clone is out of sync host writes no longer reach it.
    h.lu.write(b"K" * 10, 0)
    assert h.mem_src.data[:10] == b"K" * 10
    h.fail["c1"].fail_writes = None
    h.sync("c1")
    assert h.mem["c1"].data == h.mem_src.data


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_source_write_failing_reports_errno_and_keeps_acked_data(fh, code):
    h = fh
    h.lu.write(pattern(1), 0)
    h.sync("c1")
    h.group.fracture("c1")
    h.src.fail_writes = code
    h.src.fail_from, h.src.fail_to = 5 * GRAN, 6 * GRAN
    with pytest.raises(OSError) as info:
        h.lu.write(b"X" * GRAN, 5 * GRAN)
    assert info.value.errno == code
    # Acknowledged data elsewhere is intact; writes outside the fault work.
    h.lu.write(b"Y" * GRAN, 2 * GRAN)
    assert h.mem_src.data[2 * GRAN:3 * GRAN] == b"Y" * GRAN
    assert h.mem_src.data[5 * GRAN:6 * GRAN] == pattern(1)[5 * GRAN:6 * GRAN]
    # The failed write may have reached part of the extent: its bit is set
    # for the fractured clone, so a sync would copy it.
    assert h.group.clones["c1"].delta[5] == 1
    h.src.fail_writes = None
    h.lu.write(b"X" * GRAN, 5 * GRAN)
    assert h.mem_src.data[5 * GRAN:6 * GRAN] == b"X" * GRAN
    h.sync("c1")
    assert h.mem["c1"].data == h.mem_src.data


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_source_write_failing_part_way_keeps_its_mirrors_equal(
        fh, code, monkeypatch):
    """A Source write that changes part of its range, then fails (a short
    write): the host gets the error, and every synchronized clone holds
    what the Source holds there now, or has its bits set.  (Before, the
    clone kept the old data under clear bits while the Source had part
    of the new: a synchronized clone that differs, silently.)"""
    h = fh
    # Read back in pieces that do not divide the range.
    monkeypatch.setattr(mirroring, "READ_BACK_CHUNK", 1000)
    h.lu.write(pattern(1), 0)
    h.sync("c1")
    h.src.fail_writes = code
    h.src.short_writes = True
    h.src.fail_from, h.src.fail_to = 6 * GRAN, 7 * GRAN
    with pytest.raises(OSError) as info:
        h.lu.write(b"X" * 2 * GRAN, 5 * GRAN)
    assert info.value.errno == code
    assert h.mem_src.data[5 * GRAN:6 * GRAN] == b"X" * GRAN   # in part
    clone = h.group.clones["c1"]
    assert _clean_extents_equal(h, "c1") == []
    assert clone.state == clones.SYNCHRONIZED
    assert h.mem["c1"].data == h.mem_src.data
    # Mirrored still, and the fault gone, the host's retry reaches both.
    h.src.fail_writes = None
    h.lu.write(b"X" * 2 * GRAN, 5 * GRAN)
    assert h.mem["c1"].data == h.mem_src.data


def test_source_write_failing_part_way_on_an_unreadable_source(fh):
    """... and when the Source cannot even be read back there, the clone
    has its bits set and stops being mirrored (out of sync: a sync copies
    the region once the Source works)."""
    h = fh
    h.lu.write(pattern(1), 0)
    h.sync("c1")
    h.src.fail_writes = h.src.fail_reads = errno.EIO
    h.src.short_writes = True
    h.src.fail_from, h.src.fail_to = 6 * GRAN, 7 * GRAN
    with pytest.raises(OSError):
        h.lu.write(b"X" * 2 * GRAN, 5 * GRAN)
    clone = h.group.clones["c1"]
    assert clone.state == clones.OUT_OF_SYNC, h.group.clone_status(clone)
    assert clone.delta[5] == 1 and clone.delta[6] == 1
    assert _clean_extents_equal(h, "c1") == []
    h.src.fail_writes = h.src.fail_reads = None
    h.sync("c1")
    assert h.mem["c1"].data == h.mem_src.data


def test_host_write_failing_part_way_on_a_reverse_syncing_clone(fh):
    """During a reverse sync a host write goes to the clone first; one
    that changes part of an extent already copied there, then fails,
    leaves that extent's bit set, so the engine copies it to the Source
    again (before, the bit stayed clear: reads came from the Source, the
    engine skipped it, and the clone ended synchronized but different)."""
    h = fh
    engine = _reverse_syncing(h)
    for _ in range(3):
        assert engine.step()            # extents 0-5 copied, clean
    clone = h.group.clones["c1"]
    assert clone.delta[0] == 0 and clone.delta[1] == 0
    h.fail["c1"].fail_writes = errno.EIO
    h.fail["c1"].short_writes = True
    h.fail["c1"].fail_from, h.fail["c1"].fail_to = GRAN, 2 * GRAN
    with pytest.raises(OSError):
        h.lu.write(b"Z" * 2 * GRAN, 0)
    assert h.mem["c1"].data[:GRAN] == b"Z" * GRAN      # in part
    assert _clean_extents_equal(h, "c1") == []
    h.fail["c1"].fail_writes = None
    h.run(engine)
    assert clone.state == clones.SYNCHRONIZED
    assert h.mem["c1"].data == h.mem_src.data


def test_a_write_whose_activity_mark_fails_does_not_block_the_next(fh):
    """A host write whose activity mark cannot be made durable (a full
    state disk) fails; the next write of the same extents goes on once
    the disk works (before, the failed write stayed registered in flight
    for ever: every later write of its extents, and any fracture, waited
    for it)."""
    import threading
    h = fh
    h.lu.write(pattern(1), 0)
    h.sync("c1")
    activity = h.group.changes.activity
    mark = activity.mark

    def full(e0, e1):
        raise OSError(errno.ENOSPC, "No space left on device")
    activity.mark = full
    activity.bits[:] = bytes(len(activity.bits))    # cold: marks needed
    with pytest.raises(OSError):
        h.lu.write(b"Q" * GRAN, 3 * GRAN)
    activity.mark = mark
    done = threading.Event()

    def again():
        h.lu.write(b"R" * GRAN, 3 * GRAN)
        h.group.fracture("c1")
        done.set()
    threading.Thread(target=again, daemon=True).start()
    assert done.wait(5), "the next write waits for the failed one"
    assert h.mem["c1"].data[3 * GRAN:4 * GRAN] == b"R" * GRAN


def test_a_fast_zero_reaches_a_clone_that_zeroes_only_slowly(fh):
    """A host's fast zero (a request refused unless it is cheap) that the
    Source carries out reaches every mirror, cheap there or not: the clone
    stays synchronized (before, a clone on a file system without a quick
    zero refused its leg and dropped out of sync)."""
    h = fh
    h.lu.write(pattern(1), 0)
    h.sync("c1")
    h.fail["c1"].slow_zero = True
    h.lu.zero(2 * GRAN, 3 * GRAN, fast=True)
    clone = h.group.clones["c1"]
    assert clone.state == clones.SYNCHRONIZED, h.group.clone_status(clone)
    assert h.mem_src.data[2 * GRAN:5 * GRAN] == bytes(3 * GRAN)
    assert h.mem["c1"].data == h.mem_src.data
    # A Source that refuses it changes nothing anywhere.
    h.src.slow_zero = True
    with pytest.raises(OSError) as info:
        h.lu.zero(6 * GRAN, GRAN, fast=True)
    assert info.value.errno == errno.EOPNOTSUPP
    assert clone.state == clones.SYNCHRONIZED
    assert h.mem["c1"].data == h.mem_src.data == pattern(1)[:2 * GRAN] + \
        bytes(3 * GRAN) + pattern(1)[5 * GRAN:]


def test_a_clone_flush_failing_mid_sync_keeps_the_bits_of_what_it_lost(fh):
    """A sync's commit flushes the clone before saving the bits its copies
    cleared; a flush that fails may have dropped those copies (a failed
    fdatasync loses pages): their bits are set again and the sync stops,
    out of sync.  (Before, the failed commit's bits were saved as they
    were by the next commit, whose flush succeeded over the loss: the
    next sync skipped extents the clone no longer had.)"""
    h = fh
    h.lu.write(pattern(1), 0)
    h.lu.flush()
    engine = h.group.start_sync("c1", run=False)
    engine.chunk = 2
    for _ in range(3):
        assert engine.step()            # extents 0-5 copied, clean
    h.fail["c1"].fail_flush = errno.EIO
    try:
        h.group.commit()
    except OSError:
        pass
    h.fail["c1"].fail_flush = None
    engine.start()              # stopped: it fails at once
    engine.join(10)
    h.group.commit()
    clone = h.group.clones["c1"]
    assert _clean_extents_equal(h, "c1") == []
    assert clone.state == clones.OUT_OF_SYNC, h.group.clone_status(clone)
    h.crash()
    assert _clean_extents_equal(h, "c1") == []
    h.group.clones["c1"].backend = h.fail["c1"]
    h.group.source.backend = h.src
    h.sync("c1")
    assert h.mem["c1"].data == h.mem_src.data


def _written_since_the_commit_on_a_failing_clone(h, e):
    """c1 synchronized and committed, then extent e written (mirrored);
    c1's flushes fail from now on."""
    h.lu.write(pattern(1), 0)
    h.sync("c1")
    h.group.commit()
    h.lu.write(b"W" * GRAN, e * GRAN)
    h.fail["c1"].fail_flush = errno.EIO


def test_a_clone_flush_failing_under_a_host_flush(fh):
    """A host flush reaches every mirror; a synchronized clone whose flush
    fails (and may have dropped what it was given) drops out of sync with
    the bits of everything written since the last commit, and the host's
    flush succeeds: the Source has its data, as when a mirrored write
    fails.  (Before, the host got the error and the clone stayed
    synchronized, its bits clear over the data it lost.)"""
    h = fh
    _written_since_the_commit_on_a_failing_clone(h, 9)
    h.lu.flush()
    clone = h.group.clones["c1"]
    assert clone.state == clones.OUT_OF_SYNC, h.group.clone_status(clone)
    assert "flush" in clone.error
    assert clone.delta[9] == 1
    assert _clean_extents_equal(h, "c1") == []
    h.fail["c1"].fail_flush = None
    h.sync("c1")
    assert h.mem["c1"].data == h.mem_src.data


def test_a_clone_flush_failing_at_its_fracture(fh):
    """A fracture flushes the clone before it becomes a point in time; a
    flush that fails (and may have dropped writes) refuses the fracture
    and leaves the clone out of sync with the bits of what it may have
    lost (before, it stayed synchronized with its bits clear)."""
    h = fh
    _written_since_the_commit_on_a_failing_clone(h, 4)
    with pytest.raises(OSError):
        h.group.fracture("c1")
    clone = h.group.clones["c1"]
    assert clone.state == clones.OUT_OF_SYNC, h.group.clone_status(clone)
    assert _clean_extents_equal(h, "c1") == []


def test_a_source_flush_failing_after_a_fracture(fh):
    """A write mirrored to a clone that is fractured before the Source's
    flush fails (in the commit that follows the fracture): the Source may
    have lost it, the clone has it, and its bit says so (before, only
    clones still mirrored were marked: the fractured clone kept the write
    under a clear bit)."""
    h = fh
    h.lu.write(pattern(1), 0)
    h.sync("c1")
    h.group.commit()
    h.lu.write(b"W" * GRAN, 3 * GRAN)
    h.src.fail_flush = errno.EIO
    h.group.fracture("c1")
    clone = h.group.clones["c1"]
    assert clone.state == clones.FRACTURED
    assert h.mem_src.data[3 * GRAN:4 * GRAN] != b"W" * GRAN    # lost
    assert _clean_extents_equal(h, "c1") == []


def test_a_flush_failing_during_a_copy_keeps_the_copy_dirty(fh):
    """A copy that a sync engine is writing, piece by piece, when a flush
    fails (here the clone's, under a host flush) may have lost the pieces
    written so far: the copy is made again, not taken as done (before,
    the copy's end cleared the bits the failure had just set, over a
    piece the clone no longer had)."""
    h = fh
    h.lu.write(pattern(1), 0)
    h.lu.flush()
    engine = h.group.start_sync("c1", run=False)
    engine.chunk = 2
    engine.step()                       # extents 0-1 copied
    engine.copier.piece = GRAN          # extents 2-3: two pieces
    clone_backend = h.fail["c1"]
    write = clone_backend.write

    def write_then_fail_a_flush(buf, offset):
        write(buf, offset)
        if offset == 2 * GRAN:          # the first piece is in
            clone_backend.write = write
            clone_backend.fail_flush = errno.EIO
            h.lu.flush()                # which drops it
            clone_backend.fail_flush = None
    clone_backend.write = write_then_fail_a_flush
    engine.step()
    assert _clean_extents_equal(h, "c1") == []


def test_a_large_source_request_failing_drops_its_mirrors_out_of_sync(
        fh, monkeypatch):
    """A failed Source request larger than what is read back (a zero over
    a whole disk) marks its range in every mirror, which stops being
    mirrored: no gigabytes are read back on a host's request."""
    h = fh
    monkeypatch.setattr(mirroring, "READ_BACK_MAX", GRAN)
    h.lu.write(pattern(1), 0)
    h.sync("c1")
    h.src.fail_writes = errno.EIO
    h.src.short_writes = True
    h.src.fail_from, h.src.fail_to = 6 * GRAN, 7 * GRAN
    reads = h.src.failures
    with pytest.raises(OSError):
        h.lu.write(b"X" * 2 * GRAN, 5 * GRAN)
    clone = h.group.clones["c1"]
    assert clone.state == clones.OUT_OF_SYNC
    assert clone.delta[5] == 1 and clone.delta[6] == 1
    assert _clean_extents_equal(h, "c1") == []
    assert h.src.failures == reads + 1


def test_a_restoring_clone_whose_flush_fails_keeps_its_copied_extents(fh):
    """The clone a protected restore reads is never written by it: its
    flush failing marks nothing (before, the extents the restore had
    copied got their bits back, so they were copied again, over host
    writes made since without a copy on demand)."""
    h = fh
    engine = _reverse_syncing(h, "start_restore")
    assert engine.step()
    clone = h.group.clones["c1"]
    copied = [e for e in range(EXTENTS) if not clone.delta[e]]
    assert copied
    h.fail["c1"].fail_flush = errno.EIO
    with pytest.raises(OSError):
        h.group.commit()
    assert [e for e in copied if clone.delta[e]] == []


def test_a_verify_whose_commit_fails_says_so(fh):
    """A verify ends with a commit of its marks; one that fails (here the
    clone's flush) ends the verify with that error in its result, the
    marks kept (before, the exception escaped the verify's thread: its
    result said no error, and the differences were not resynced)."""
    h = fh
    h.lu.write(pattern(1), 0)
    h.sync("c1")
    h.group.commit()
    h.mem["c1"].data[3 * GRAN + 7] ^= 0xFF         # behind our back
    h.fail["c1"].durable = bytes(h.mem["c1"].data)
    h.fail["c1"].fail_flush = errno.EIO
    engine = h.group.start_verify("c1", run=False)
    engine.run()
    clone = h.group.clones["c1"]
    result = h.group.clone_status(clone)["verify"]
    assert "EIO" in (result["error"] or ""), result
    assert clone.delta[3] == 1
    assert _clean_extents_equal(h, "c1") == []
