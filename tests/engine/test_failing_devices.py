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

from tests.support.clonegroup import (EXTENTS, GRAN, SIZE, FailingBackend,
                                     Harness)


@pytest.fixture
def fh(tmp_path):
    h = Harness(tmp_path)
    # The Source and both clones on failing backends.
    h.src = FailingBackend(h.mem_src)
    h.fail = {n: FailingBackend(h.mem[n]) for n in h.mem}
    h.lu.backend = h.lu.stack.base = h.src
    h.lu.stack.refresh()
    for n, clone in h.group.clones.items():
        clone.backend = h.fail[n]
        clone.export.read = h.fail[n].readinto
    return h


def _pattern(seed):
    return bytes((seed + i) % 251 for i in range(SIZE))


def _clean_extents_equal(h, name):
    delta = h.group.clones[name].delta
    return [e for e in range(EXTENTS) if not delta[e] and
            h.extent(h.mem_src, e) != h.extent(h.mem[name], e)]


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_clone_failing_mid_sync_is_left_out_of_sync_with_bits(fh, code):
    h = fh
    h.lu.write(_pattern(1), 0)
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


def test_clone_failing_read_mid_reverse_sync_keeps_source_view(fh):
    """A reverse sync whose clone cannot be read stops, keeps its state (the
    Source still shows the clone's data where it is not yet copied), says
    why, and resumes when asked once the fault is gone."""
    h = fh
    h.lu.write(_pattern(1), 0)
    h.sync("c1")
    h.group.fracture("c1")
    h.group.clones["c1"].export.write(_pattern(7), 0)
    engine = h.group.start_reverse_sync("c1", run=False)
    engine.chunk = 2
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
    assert h.mem_src.data == _pattern(7) == h.mem["c1"].data


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_mirrored_write_failing_on_the_clone(fh, code):
    """The host write succeeds (the Source has it); the clone drops out of
    sync with the extent marked; a sync after the fault brings it back."""
    h = fh
    h.lu.write(_pattern(1), 0)
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
    h.lu.write(_pattern(1), 0)
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
    assert h.mem_src.data[5 * GRAN:6 * GRAN] == _pattern(1)[5 * GRAN:6 * GRAN]
    # The failed write may have reached part of the extent: its bit is set
    # for the fractured clone, so a sync would copy it.
    assert h.group.clones["c1"].delta[5] == 1
    h.src.fail_writes = None
    h.lu.write(b"X" * GRAN, 5 * GRAN)
    assert h.mem_src.data[5 * GRAN:6 * GRAN] == b"X" * GRAN
    h.sync("c1")
    assert h.mem["c1"].data == h.mem_src.data
