"""Deterministic scenarios of the clone engine that random search rarely
reaches, each with a twin that switches the protection off and shows the
check catching it (a test that cannot fail is a defect).
"""

import errno
import threading

import pytest

from target import clones, maps

from tests.support.clonegroup import EXTENTS, GRAN, SIZE, Harness

@pytest.fixture
def h(tmp_path):
    return Harness(tmp_path)


def _fill(h, pattern=b"S"):
    h.lu.write(pattern * SIZE, 0)


# ------------------------------------------------------------ collisions

@pytest.mark.parametrize("retry", [True, False])
def test_reverse_sync_collision_is_recopied(h, retry):
    """A host write lands while the engine copies.

    The engine has read the clone's extent; the host write is mirrored to
    the clone and written to the Source; the engine then writes its stale
    copy to the Source.  With the retry the extent is copied again; without
    it the host's acknowledged write is gone from the Source.
    """
    _fill(h, b"S")
    h.sync("c1")
    h.group.fracture("c1")
    h.group.clones["c1"].export.write(b"C" * SIZE, 0)
    h.group.retry_collisions = retry
    engine = h.group.start_reverse_sync("c1", run=False)
    fired = []

    def host_write_mid_copy(engine, s, e):
        if not fired:
            fired.append((s, e))
            h.lu.write(b"H" * 100, s * GRAN + 10)

    h.group.copy_hook = host_write_mid_copy
    h.run(engine)
    h.group.copy_hook = None
    s, e = fired[0]
    got = h.extent(h.mem_src, s)
    expected = b"C" * 10 + b"H" * 100 + b"C" * (GRAN - 110)
    progress = h.group.progress["c1"]
    if retry:
        assert got == expected
        assert progress.collisions == 1 and progress.retries == 1
        assert h.mem_src.data == h.mem["c1"].data
    else:
        assert got != expected, "without the retry the Source is corrupt"
        assert b"H" * 100 not in got


def test_forward_sync_collision_is_recopied(h):
    _fill(h, b"A")
    engine = h.group.start_sync("c1", run=False)
    engine.chunk = 2

    def host_write_mid_copy(engine, s, e):
        h.group.copy_hook = None
        h.lu.write(b"W" * 5000, s * GRAN + 100)

    h.group.copy_hook = host_write_mid_copy
    h.run(engine)
    assert h.mem_src.data == h.mem["c1"].data
    assert h.group.progress["c1"].collisions == 1


def test_host_write_is_not_blocked_by_a_copy(h):
    """A host write proceeds while the engine is stopped mid-extent, and
    the overlapping copy is redone afterwards."""
    _fill(h, b"A")
    engine = h.group.start_sync("c1", run=False)
    paused, release = threading.Event(), threading.Event()

    def pause(engine_, s, e):
        h.group.copy_hook = None
        paused.set()
        release.wait(10)

    h.group.copy_hook = pause
    copier = threading.Thread(target=engine.step)
    copier.start()
    assert paused.wait(10)
    done = threading.Event()
    writer = threading.Thread(target=lambda: (h.lu.write(b"Z" * 512, 0),
                                              done.set()))
    writer.start()
    assert done.wait(5), "host write waited for the engine"
    release.set()
    copier.join(10)
    writer.join()
    h.run(engine)
    assert h.mem_src.data == h.mem["c1"].data
    assert h.group.progress["c1"].collisions == 1


# ------------------------------------------------------------ restore

@pytest.mark.parametrize("protected", [True, False])
def test_reverse_sync_marks_fractured_siblings(h, protected, monkeypatch):
    """The Source changes under a fractured sibling: its bits must be set."""
    _fill(h, b"S")
    h.sync("c1")
    h.group.fracture("c1")
    h.sync("c2")
    h.group.fracture("c2")
    h.group.clones["c1"].export.write(b"X" * GRAN, 5 * GRAN)
    if not protected:
        monkeypatch.setattr(clones.CloneGroup, "_prepare_restore",
                            lambda self, clone: None)
    h.run(h.group.start_reverse_sync("c1", run=False))
    assert h.extent(h.mem_src, 5) == b"X" * GRAN
    assert h.clean_extents_equal("c2") == protected


def test_reverse_sync_refused_while_a_sibling_is_mirrored(h):
    _fill(h)
    h.sync("c1")
    h.group.fracture("c1")
    h.sync("c2")
    with pytest.raises(clones.SiblingsMirrored):
        h.group.start_reverse_sync("c1", run=False)
    assert h.group.clones["c1"].state == clones.FRACTURED


@pytest.mark.parametrize("protected", [True, False])
def test_sibling_bits_survive_a_crash_early_in_reverse_sync(h, protected,
                                                            monkeypatch):
    """The siblings' new bits are committed before the engine writes."""
    _fill(h, b"S")
    h.sync("c1")
    h.group.fracture("c1")
    h.sync("c2")
    h.group.fracture("c2")
    h.group.commit()
    h.group.clones["c1"].export.write(b"X" * GRAN, 0)
    h.group.commit()
    if not protected:
        real_commit = clones.CloneGroup.commit
        calls = []

        def skip_first(self):
            if not calls:
                calls.append(1)
                return
            real_commit(self)
        monkeypatch.setattr(clones.CloneGroup, "commit", skip_first)
    engine = h.group.start_reverse_sync("c1", run=False)
    assert engine.step()          # extent 0 copied to the Source
    h.crash()                     # before any later commit
    assert h.extent(h.mem_src, 0) == b"X" * GRAN
    assert h.clean_extents_equal("c2") == protected


def test_shared_activity_map_resets_cleared_bits_after_a_crash(h):
    """After a crash, bits of one clone come back because
    another clone's export was written in the same region; the extra
    copy is harmless and nothing is lost."""
    _fill(h, b"S")
    h.sync("c1")
    h.group.fracture("c1")
    h.sync("c2")
    h.group.fracture("c2")
    h.group.commit()
    h.group.clones["c2"].export.write(b"Y" * 100, 6 * GRAN)  # c2's bit 6
    assert h.group.clones["c1"].delta[6] == 0
    h.crash()
    assert h.group.clones["c1"].delta[6] == 1     # over-approximated
    assert h.group.clones["c2"].delta[6] == 1
    h.sync("c1")
    assert h.mem_src.data == h.mem["c1"].data


# ------------------------------------------------------------ fracture

@pytest.mark.parametrize("protected", [True, False])
def test_fracture_waits_for_half_mirrored_writes(h, protected, monkeypatch):
    """No write is half-mirrored at the fracture point: a write that has
    reached the Source but not yet the clone finishes before fracture
    returns; otherwise it would land on the clone after hosts may have
    started writing the fractured clone."""
    _fill(h)
    h.sync("c1")
    if not protected:
        monkeypatch.setattr(clones.CloneGroup, "_drain", lambda self: None)
    clone_backend = h.group.clones["c1"].backend
    in_mirror, release = threading.Event(), threading.Event()
    real_write = clone_backend.write

    def slow_write(buf, offset):
        in_mirror.set()
        release.wait(5)
        real_write(buf, offset)

    clone_backend.write = slow_write
    writer = threading.Thread(target=h.lu.write, args=(b"M" * 512, 0))
    writer.start()
    assert in_mirror.wait(5)
    fractured = threading.Event()
    fracturer = threading.Thread(target=lambda: (h.group.fracture("c1"),
                                                 fractured.set()))
    fracturer.start()
    returned_early = fractured.wait(0.5)
    release.set()
    writer.join(5)
    fracturer.join(5)
    clone_backend.write = real_write
    assert returned_early != protected
    assert h.group.clones["c1"].state == clones.FRACTURED


# ------------------------------------------------------------ maps

def test_corrupt_delta_map_means_full_copy_and_says_so(h):
    h.sync("c1")
    h.group.commit()
    with open(h.group.clones["c1"].map_path, "r+b") as f:
        f.seek(40)
        f.write(b"\x07")
    h.crash()
    c1 = h.group.clones["c1"]
    assert c1.delta.count(1) == EXTENTS
    assert "checksum" in c1.error


def test_activity_map_bounds_the_superset(h):
    """Recovery re-dirties only the regions written since the last commit."""
    h.group.region = 2
    _fill(h)
    h.sync("c1")
    h.group.commit()
    h.lu.write(b"Q" * 10, 9 * GRAN)   # mirrored write, region [8, 10)
    h.crash()
    dirty = [e for e in range(EXTENTS) if h.group.clones["c1"].delta[e]]
    assert dirty == [8, 9]
    assert h.group.clones["c1"].state == clones.SYNCING  # recovered-dirty


def test_recovery_cut_short_keeps_the_recovered_bits(tmp_path, monkeypatch):
    """Recovery folds the activity map into the delta maps: the activity
    map may be emptied only once the delta maps holding its bits are
    saved, or a crash (or a full disk) in between forgets extents the
    Source changed, and a later sync never copies them."""
    h = Harness(tmp_path)
    h.sync("c1")
    h.group.fracture("c1")
    h.group.commit()
    assert h.group.clones["c1"].delta.count(1) == 0
    h.lu.write(b"X" * GRAN, 5 * GRAN)       # marked in the activity map only
    real_save = maps.save

    def disk_full(path, bits, granularity, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(maps, "save", disk_full)
    with pytest.raises(OSError):
        h.crash()                            # the first recovery fails
    monkeypatch.setattr(maps, "save", real_save)
    h.crash()                                # the second one completes
    assert h.group.clones["c1"].delta[5] == 1


def test_overlapping_writes_from_two_connections_leave_the_legs_equal(h):
    """Two hosts write the same block at once: whichever lands last on the
    Source lands last on a synchronized clone too.  Without ordering, the
    second write could reach both legs while the first is still on its
    way to the clone, and the clone would end with the older data."""
    h.sync("c1")
    clone = h.group.clones["c1"]
    real_write = clone.backend.write
    first_in, release = threading.Event(), threading.Event()

    def write(buf, offset):
        if not first_in.is_set():
            first_in.set()
            release.wait(5)         # the first write, between its two legs
        real_write(buf, offset)
    clone.backend.write = write
    first = threading.Thread(target=h.lu.write, args=(b"1" * 512, 3 * GRAN))
    first.start()
    assert first_in.wait(5)
    second = threading.Thread(target=h.lu.write, args=(b"2" * 512, 3 * GRAN))
    second.start()
    second.join(0.3)                # it waits for the first, or it is done
    release.set()
    first.join(5)
    second.join(5)
    clone.backend.write = real_write
    assert h.extent(h.mem_src, 3) == h.extent(h.mem["c1"], 3)
