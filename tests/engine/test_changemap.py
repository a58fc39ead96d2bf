"""The durable change map (target.changemap) on a simulated disk.

The map files go through powerloss.SimDisk, which forgets writes not made
durable, so each test can cut the power where the protocol says it is safe.
"""

import errno
import random
import threading

import pytest

from target import changemap, maps

from tests.support import powerloss

GRAN = 64 << 10
EXTENTS = 256           # 16 MiB: four 4 MiB regions
REGION = changemap.REGION // GRAN


@pytest.fixture
def disk():
    saved = maps.files
    maps.files = powerloss.SimDisk()
    try:
        yield maps.files
    finally:
        maps.files = saved


class Owner:
    """One committed map over a data file on the simulated disk: a clear
    bit vouches that the data's extent holds the copied value."""

    def __init__(self, tmp_path, flush=True):
        self.lock = threading.Condition()
        self.data = powerloss.SimFile(bytes(EXTENTS * GRAN))
        self.path = str(tmp_path / "m.delta")
        self.bits = bytearray(b"\x01" * EXTENTS)
        self.changes = changemap.ChangeMap(
            str(tmp_path / "m.activity"), GRAN, EXTENTS, self.lock,
            lambda: [(self.path, self.bits)],
            flush=self.data.sync if flush else None)
        maps.save(self.path, self.bits, GRAN)
        self.changes.start()

    def write(self, e0, e1, value):
        with self.lock:
            token = self.changes.begin(e0, e1)
            maps.set_range(self.bits, e0, e1)
        self.data.write(bytes([value]) * ((e1 - e0) * GRAN), e0 * GRAN)
        with self.lock:
            self.changes.end(token)

    def copy(self, e0, e1, value):
        """A copy: the data, then its bits cleared."""
        with self.lock:
            token = self.changes.copy_begin(e0, e1)
        self.data.write(bytes([value]) * ((e1 - e0) * GRAN), e0 * GRAN)
        with self.lock:
            self.bits[e0:e1] = bytes(e1 - e0)
            self.changes.copy_end(token)

    def recovered(self):
        bits = maps.load(self.path, GRAN, EXTENTS)
        activity, problem = self.changes.recover()
        assert problem is None
        changemap.ChangeMap.merge(bits, activity)
        return bits


def test_a_write_is_in_the_activity_map_before_it_returns(disk, tmp_path):
    owner = Owner(tmp_path)
    owner.bits[:] = bytes(EXTENTS)
    owner.changes.commit()
    syncs = disk.files[owner.changes.activity.path].syncs
    owner.write(5, 6, 7)
    owner.write(6, 9, 7)        # the same region: no second sync
    assert disk.files[owner.changes.activity.path].syncs == syncs + 1
    disk.power_cut(random.Random(1), keep=0.0)
    bits = owner.recovered()
    # The written extents and the rest of their region, nothing else.
    assert bits.find(0, 0, REGION) < 0
    assert bits.find(1, REGION) < 0


def test_commit_rewrites_the_activity_map_to_what_is_in_flight(disk,
                                                               tmp_path):
    owner = Owner(tmp_path)
    owner.write(0, 1, 1)
    with owner.lock:
        token = owner.changes.begin(3 * REGION, 3 * REGION + 1)
    owner.changes.commit()
    activity = owner.changes.activity.load()
    # The write still in flight keeps its region; the ended one's is kept
    # once (it ended before the commit began: nothing of it may land after).
    assert activity.count(1) == REGION
    assert activity[3 * REGION] == 1
    with owner.lock:
        owner.changes.end(token)
    owner.changes.commit()      # the write ended during the commit above
    owner.changes.commit()
    assert owner.changes.activity.load().count(1) == 0


@pytest.mark.parametrize("flush_before_commit", [True, False])
def test_clean_bits_are_saved_only_over_durable_data(disk, tmp_path,
                                                     flush_before_commit):
    """The rule: data durable before the map that vouches for it.  With
    the flush switched off, a cut after the commit leaves a clean bit over
    data that never reached the disk, and the check below sees it."""
    owner = Owner(tmp_path)
    owner.changes.flush_before_commit = flush_before_commit
    owner.changes.commit()
    owner.copy(0, 8, 0xAB)
    owner.changes.commit()      # the copy ended before: not kept in activity
    disk.power_cut(random.Random(2), keep=0.0)
    owner.data.power_cut(random.Random(2), keep=0.0)
    bits = owner.recovered()
    wrong = [e for e in range(8) if not bits[e] and
             owner.data.durable[e * GRAN] != 0xAB]
    if flush_before_commit:
        assert wrong == []
    else:
        assert wrong, "a broken durability order was not caught"


@pytest.mark.parametrize("snapshot_before_flush", [True, False])
def test_a_copy_during_the_flush_is_saved_by_the_next_commit(
        disk, tmp_path, snapshot_before_flush):
    owner = Owner(tmp_path)
    owner.changes.snapshot_before_flush = snapshot_before_flush
    owner.changes.commit()
    flush = owner.data.sync

    def flush_then_copy():
        flush()
        owner.copy(0, 4, 0xCD)  # lands after the flush: not durable
    owner.changes.flush = flush_then_copy
    cut = {}

    def cut_after_save():
        # A power cut right after the map is saved, before the activity
        # map is rewritten: what is on disk then.
        cut["saved"] = maps.load(owner.path, GRAN, EXTENTS)
        cut["activity"] = owner.changes.activity.load()
    owner.changes.after_save = cut_after_save
    owner.changes.commit()
    saved, activity = cut["saved"], cut["activity"]
    lost = [e for e in range(4) if not saved[e] and not activity[e]]
    if snapshot_before_flush:
        assert lost == []
        assert saved[:4] == b"\x01" * 4
    else:
        assert lost, "a map newer than its flush was not caught"


def test_a_map_without_flush_is_saved_as_is(disk, tmp_path):
    owner = Owner(tmp_path, flush=False)
    owner.write(2, 3, 1)
    owner.changes.commit()
    assert maps.load(owner.path, GRAN, EXTENTS) == owner.bits


def test_commit_applies_a_change_atomically(disk, tmp_path):
    owner = Owner(tmp_path, flush=False)

    def clear():
        owner.bits[:] = bytes(EXTENTS)
    owner.changes.commit(clear)
    assert maps.load(owner.path, GRAN, EXTENTS).count(1) == 0


def test_lost_activity_map_sets_everything(disk, tmp_path):
    owner = Owner(tmp_path)
    del disk.files[owner.changes.activity.path]
    activity, problem = owner.changes.recover()
    assert "missing" in problem
    assert activity.count(1) == EXTENTS
    activity, problem = owner.changes.recover(required=False)
    assert activity.count(1) == 0


def test_maybe_commit_waits_for_the_interval(disk, tmp_path, monkeypatch):
    owner = Owner(tmp_path)
    owner.changes.commit()
    owner.write(0, 1, 1)
    monkeypatch.setattr(changemap, "COMMIT_INTERVAL", 1e9)
    owner.changes.maybe_commit()
    assert maps.load(owner.path, GRAN, EXTENTS)[0] == 1
    owner.bits[0] = 0
    owner.changes.maybe_commit()
    assert maps.load(owner.path, GRAN, EXTENTS)[0] == 1
    monkeypatch.setattr(changemap, "COMMIT_INTERVAL", 0)
    owner.changes.maybe_commit()
    assert maps.load(owner.path, GRAN, EXTENTS)[0] == 0


def test_a_dcm_is_an_activity_map_of_one_extent_regions(disk, tmp_path):
    dcm = changemap.ActivityMap(str(tmp_path / "dcm"), GRAN, EXTENTS,
                                region_bytes=GRAN)
    dcm.replace(bytearray(EXTENTS))
    dcm.mark(10, 12)
    disk.power_cut(random.Random(3), keep=0.0)
    assert list(maps.runs(dcm.load())) == [(10, 12)]
    again = changemap.ActivityMap(str(tmp_path / "dcm"), GRAN, EXTENTS,
                                  region_bytes=GRAN)
    again.reopen()
    again.mark(0, 1)
    disk.power_cut(random.Random(3), keep=0.0)
    assert list(maps.runs(again.load())) == [(0, 1), (10, 12)]


def test_a_failed_activity_sync_fails_later_writes_into_its_region(
        disk, tmp_path, monkeypatch):
    """A failed fdatasync of a mark (the kernel may drop the page it could
    not write: here it is lost at once): the write that made the mark
    fails, and a later write into the same region, whose bits are set in
    memory, must not reach the data while its region is marked in memory
    only."""
    owner = Owner(tmp_path)
    owner.bits[:] = bytes(EXTENTS)
    owner.changes.commit()
    path = owner.changes.activity.path
    real = disk.datasync

    def failing(handle):
        if handle.path == path:
            handle.data = bytearray(handle.durable)
            handle.pending = []
            raise OSError(5, "Input/output error (injected)")
        real(handle)
    monkeypatch.setattr(disk, "datasync", failing)
    with pytest.raises(OSError, match="injected"):
        owner.write(5, 6, 7)
    monkeypatch.setattr(disk, "datasync", real)
    try:
        owner.write(6, 7, 8)
    except OSError:
        pass
    disk.power_cut(random.Random(1), keep=0.0)
    if owner.data.data[6 * GRAN] == 8:
        assert owner.recovered()[6], "extent 6 was written but a power " \
            "cut leaves it clean in the map"


def test_a_failed_activity_sync_does_not_fail_every_later_mark(
        disk, tmp_path, monkeypatch):
    """An activity map that is never replaced (a replication group's
    activity log or a DCM between replays): one failed fdatasync fails the
    marks it covered, not every mark into a cold region from then on; the
    marks are durable once they return."""
    dcm = changemap.ActivityMap(str(tmp_path / "dcm"), GRAN, EXTENTS,
                                region_bytes=GRAN)
    dcm.replace(bytearray(EXTENTS))
    real = disk.datasync

    def failing(handle):
        handle.data = bytearray(handle.durable)
        handle.pending = []
        raise OSError(5, "Input/output error (injected)")
    monkeypatch.setattr(disk, "datasync", failing)
    with pytest.raises(OSError, match="injected"):
        dcm.mark(10, 11)
    monkeypatch.setattr(disk, "datasync", real)
    dcm.mark(20, 21)
    dcm.mark(10, 11)
    disk.power_cut(random.Random(3), keep=0.0)
    assert list(maps.runs(dcm.load())) == [(10, 11), (20, 21)]


@pytest.mark.parametrize("fails", ["reopen", "directory fsync"])
def test_a_failed_activity_rewrite_leaves_later_writes_marked(
        disk, tmp_path, monkeypatch, fails):
    """A commit rewrites the activity map to what may still land (here:
    nothing) and the rewrite fails after the new file is in place (its
    reopen: EMFILE; the fsync of its directory: EIO).  The map in memory
    still has the region an earlier write marked; a later write into that
    region must not reach the data unmarked on disk."""
    owner = Owner(tmp_path)
    owner.bits[:] = bytes(EXTENTS)
    owner.changes.commit()
    with owner.lock:                # marks region 0, on disk and in memory
        token = owner.changes.begin(5, 6)
    owner.changes.commit()          # keeps region 0: a write in flight
    with owner.lock:
        owner.changes.end(token)
    path = owner.changes.activity.path
    if fails == "reopen":
        real = disk.open

        def failing(p):
            if p == path:
                raise OSError(errno.EMFILE, "Too many open files (injected)")
            return real(p)
        monkeypatch.setattr(disk, "open", failing)
    else:
        real = disk.replace

        def failing(p, data):
            real(p, data)
            if p == path:
                raise OSError(errno.EIO, "Input/output error (injected)")
        monkeypatch.setattr(disk, "replace", failing)
    with pytest.raises(OSError, match="injected"):
        owner.changes.commit()      # nothing may land: region 0 goes
    monkeypatch.undo()
    owner.write(6, 7, 8)    # the map is written anew first (it can be)
    disk.power_cut(random.Random(1), keep=0.0)
    assert owner.data.data[6 * GRAN] == 8
    assert owner.recovered()[6], "extent 6 was written after a failed " \
        "commit but a power cut leaves it clean in the map"


def test_a_failed_replace_that_widens_the_map_keeps_its_regions(
        disk, tmp_path, monkeypatch):
    """A DCM widened (a replay's regions merged in, every region marked)
    by a replace that fails after the new file is in place: the next mark
    writes the file anew from the bits in memory, which must hold the
    regions of the map that failed, not only those before it."""
    dcm = changemap.ActivityMap(str(tmp_path / "dcm"), GRAN, EXTENTS,
                                region_bytes=GRAN)
    dcm.replace(bytearray(EXTENTS))
    wide = bytearray(b"\x01" * 16 + bytes(EXTENTS - 16))
    real = disk.replace

    def failing(p, data):
        real(p, data)
        raise OSError(errno.EIO, "Input/output error (injected)")
    monkeypatch.setattr(disk, "replace", failing)
    with pytest.raises(OSError, match="injected"):
        dcm.replace(wide)
    monkeypatch.undo()
    dcm.mark(100, 101)
    disk.power_cut(random.Random(2), keep=0.0)
    assert list(maps.runs(dcm.load())) == [(0, 16), (100, 101)]
