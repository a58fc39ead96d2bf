"""The tracking map's activity marks as a group commit
(target.changemap.ActivityMap): a first write into a cold region marks
the region in memory and in place under the session's lock, and waits for
the fdatasync outside it, sharing it with every other write waiting.

- test_first_writes_into_cold_regions_share_activity_syncs: writer
  threads make first writes, each into a region of its own; the activity
  map is fdatasync'ed far fewer times than there were regions marked, and
  the frozen image and the tracking map are right.
- test_activity_sync_is_not_held_under_the_session_lock: while one
  write waits for its mark's fdatasync, a write into a region marked
  before and a read of the frozen image go on.
- test_a_write_into_a_region_being_marked_waits_for_its_sync: a second
  write into the region finds its bits set in memory, and still waits for
  the fdatasync of the first write's mark.
- test_a_failed_activity_sync_fails_the_writes_until_the_file_is_rewritten.
- test_a_write_waiting_for_its_mark_survives_the_session_closing.
- test_a_write_after_a_commit_that_could_not_replace_the_activity_file.
- test_tracking_survives_power_loss: writers race into cold regions and
  the power is cut the moment the N-th extent's host write lands on the
  Source; the tracking map recovered from the map files holds every
  extent that landed.  Its twin ignores the activity map's fdatasync (the
  protection off) and must be caught.  With a thread committing all
  along too (the activity file replaced under the writers).
"""

import functools
import os
import random
import threading
import time

import pytest

from target import backends, changemap, maps, sessions

from tests.support import powerloss, sessionfakes
from tests.support.sessionfakes import frozen_image, run_writers

GRAN = 4096
EXTENTS = 64
SIZE = GRAN * EXTENTS
SAVE_SIZE = sessions.SaveArea.minimum_size(EXTENTS, GRAN) - GRAN + SIZE

new_session = functools.partial(sessionfakes.new_session, granularity=GRAN)


@pytest.fixture
def one_extent_regions(monkeypatch):
    """Every extent its own activity region: every first write is a
    first write into a cold region."""
    monkeypatch.setattr(changemap, "REGION", GRAN)


def test_first_writes_into_cold_regions_share_activity_syncs(
        tmp_path, monkeypatch, one_extent_regions):
    lu, s, source, save, at_mark = sessionfakes.marked_on_save_file(
        tmp_path, SIZE, SAVE_SIZE, GRAN)
    activity_fd = s.tracking.changes.activity.file.fd
    syncs = sessionfakes.first_writes_everywhere(
        monkeypatch, lu, EXTENTS, GRAN, (activity_fd, save.fd))

    assert s.cofw_count == EXTENTS
    assert syncs[activity_fd] <= EXTENTS // 4, \
        "{} activity map fdatasyncs for {} first writes into cold " \
        "regions".format(syncs[activity_fd], EXTENTS)
    assert frozen_image(s) == at_mark, "the frozen image is not the mark's"
    assert s.tracking.bits == b"\x01" * EXTENTS
    # Every region is marked in the activity map on disk.
    assert s.tracking.changes.activity.load() == b"\x01" * EXTENTS
    s.close()


def blocking_activity_sync(monkeypatch, s):
    """os.fdatasync of s's activity map blocks until released; returns
    (entered, release) events."""
    activity_fd = s.tracking.changes.activity.file.fd
    entered, release = threading.Event(), threading.Event()
    real = os.fdatasync

    def fdatasync(fd):
        if fd == activity_fd:
            entered.set()
            assert release.wait(10), "the test never released the sync"
        real(fd)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return entered, release


def background_write(lu, data, offset):
    done = threading.Event()
    failed = []

    def run():
        try:
            lu.backend.write(data, offset)
        except Exception as e:   # reported by the test
            failed.append(e)
        done.set()
    threading.Thread(target=run, daemon=True).start()
    return done, failed


def test_activity_sync_is_not_held_under_the_session_lock(
        tmp_path, monkeypatch):
    """Regions of 4 extents: extent 5 is in extent 4's region."""
    monkeypatch.setattr(changemap, "REGION", 4 * GRAN)
    source = backends.MemoryBackend(SIZE)
    source.data[:] = random.Random(2).randbytes(SIZE)
    lu, s = new_session(tmp_path, source, backends.MemoryBackend(SAVE_SIZE))
    s.mark(export=True)
    at_mark = bytes(source.data)
    lu.backend.write(b"v" * GRAN, 4 * GRAN)     # extents 4-7: warm
    entered, release = blocking_activity_sync(monkeypatch, s)
    first, failed1 = background_write(lu, b"a" * GRAN, 0)
    assert entered.wait(10)
    try:
        # A first write (copy on first write) into a warm region, and a
        # read of the frozen image, while extent 0's mark syncs.
        second, failed2 = background_write(lu, b"b" * GRAN, 5 * GRAN)
        assert second.wait(5), "a write into a marked region waited for " \
            "another region's activity fdatasync (the session's lock is " \
            "held across it)"
        assert not failed2
        buf = bytearray(GRAN)
        s.read_frozen(buf, 5 * GRAN)
        assert bytes(buf) == at_mark[5 * GRAN:6 * GRAN]
        assert not first.is_set(), "the write did not wait for its mark"
        assert source.data[:GRAN] == at_mark[:GRAN]
    finally:
        release.set()
    assert first.wait(10) and not failed1
    assert source.data[:GRAN] == b"a" * GRAN
    assert frozen_image(s) == at_mark
    s.close()


def test_a_write_into_a_region_being_marked_waits_for_its_sync(
        tmp_path, monkeypatch):
    """Regions of 4 extents: extent 1 is in extent 0's region."""
    monkeypatch.setattr(changemap, "REGION", 4 * GRAN)
    source = backends.MemoryBackend(SIZE)
    lu, s = new_session(tmp_path, source, backends.MemoryBackend(SAVE_SIZE))
    entered, release = blocking_activity_sync(monkeypatch, s)
    first, failed1 = background_write(lu, b"a" * GRAN, 0)
    assert entered.wait(10)
    try:
        second, failed2 = background_write(lu, b"b" * GRAN, GRAN)
        time.sleep(0.2)
        assert not second.is_set(), "a write into a region whose mark is " \
            "not durable yet went ahead"
        assert source.data[GRAN:2 * GRAN] == bytes(GRAN)
    finally:
        release.set()
    assert first.wait(10) and second.wait(10)
    assert not failed1 and not failed2
    assert source.data[:2 * GRAN] == b"a" * GRAN + b"b" * GRAN
    s.close()


class LockedSimDisk(powerloss.SimDisk):
    """The map files on a simulated disk, safe for threads; a datasync
    takes a moment (marks arrive meanwhile)."""

    def __init__(self, lock):
        super().__init__()
        self.lock = lock

    def replace(self, path, data):
        with self.lock:
            super().replace(path, data)

    def pwrite(self, handle, data, offset):
        with self.lock:
            super().pwrite(handle, data, offset)

    def datasync(self, handle):
        time.sleep(0.001)
        with self.lock:
            super().datasync(handle)

    def snapshot(self):
        """The files as a power cut at this moment finds them (caller
        holds the lock)."""
        copy = powerloss.SimDisk()
        for path, f in self.files.items():
            g = powerloss.SimFile()
            g.durable = bytearray(f.durable)
            g.data = bytearray(f.data)
            g.pending = list(f.pending)
            copy.files[path] = g
        return copy


def racing_writers(monkeypatch, seed, per_writer):
    """The set-up of a power-cut check: every extent its own activity
    region, the map files on a LockedSimDisk, and 8 writers' plans of
    per_writer extents each, in random order; returns (lock, disk, the
    check's random source, plans)."""
    monkeypatch.setattr(changemap, "REGION", GRAN)
    lock = threading.Lock()
    disk = LockedSimDisk(lock)
    monkeypatch.setattr(maps, "files", disk)
    rng = random.Random(seed)
    plans = []
    for _ in range(8):
        plan = list(range(EXTENTS))
        rng.shuffle(plan)
        plans.append(plan[:per_writer])
    return lock, disk, rng, plans


class CutSource(sessionfakes.CutSource):
    """The Source; the power is cut when the cut_at-th extent is first
    written: the map files as they are then are kept."""

    def __init__(self, lock, disk, cut_at):
        super().__init__(SIZE, GRAN, lock, cut_at)
        self.disk = disk

    def at_cut(self):
        return self.disk.snapshot(), set(self.landed)


def check_power_cut(tmp_path, monkeypatch, seed, keep, honour_datasync=True,
                    commits=False):
    """commits: a thread commits the tracking map all along (replacing the
    activity file under the writers waiting for their marks)."""
    lock, disk, rng, plans = racing_writers(monkeypatch, seed,
                                            EXTENTS // 4)
    written = len(set().union(*plans))
    source = CutSource(lock, disk, rng.randrange(4, written + 1))
    lu, s = new_session(tmp_path, source, backends.MemoryBackend(SAVE_SIZE))
    disk.honour_datasync = honour_datasync
    stop = threading.Event()

    def committer():
        while not stop.is_set():
            s.tracking.commit()
    thread = threading.Thread(target=committer)
    if commits:
        thread.start()
    try:
        run_writers(lu, plans, GRAN)
    finally:
        stop.set()
        if commits:
            thread.join()
    s.close()
    after_cut, landed = source.cut
    after_cut.power_cut(rng, keep)
    monkeypatch.setattr(maps, "files", after_cut)
    lu2, s2 = new_session(tmp_path, backends.MemoryBackend(SIZE),
                          backends.MemoryBackend(SAVE_SIZE), marked=True,
                          export=False)
    missing = sorted(x for x in landed if not s2.tracking.bits[x])
    assert not missing, "after the power cut the tracking map lacks " \
        "extents {} ({} extents written)".format(missing, len(landed))
    s2.close()


@pytest.mark.parametrize("keep", [0.0, 0.5])
@pytest.mark.parametrize("seed", range(3))
def test_tracking_survives_power_loss(tmp_path, monkeypatch, seed, keep):
    check_power_cut(tmp_path, monkeypatch, seed, keep)


class CheckedSource(backends.MemoryBackend):
    """The Source; each time an extent is written, the map files' durable
    bytes (a power cut keeping nothing else) must hold every extent
    written so far: the committed map or the activity map."""

    def __init__(self, lock, disk, base):
        super().__init__(SIZE)
        self.lock = lock
        self.disk = disk
        self.paths = (base + ".track", base + ".track.activity")
        self.landed = set()
        self.missing = set()

    def write(self, buf, offset):
        with self.lock:
            super().write(buf, offset)
            self.landed.add(offset // GRAN)
            committed, activity = (
                self.disk.files[p].durable[maps.HEADER.size:]
                for p in self.paths)
            self.missing.update(x for x in self.landed
                                if not committed[x] and not activity[x])


def check_commits_meanwhile(tmp_path, monkeypatch, seed, keep_recent=True):
    lock, disk, rng, plans = racing_writers(monkeypatch, seed,
                                            EXTENTS // 2)
    source = CheckedSource(lock, disk, str(tmp_path / "src@s"))
    lu, s = new_session(tmp_path, source, backends.MemoryBackend(SAVE_SIZE))
    s.tracking.changes.keep_recent_in_activity = keep_recent
    # Saving the maps takes a moment on a disk: writes arrive meanwhile.
    s.tracking.changes.after_save = lambda: time.sleep(0.001)
    stop = threading.Event()

    def committer():
        while not stop.is_set():
            s.tracking.commit()
            time.sleep(0.0005)
    thread = threading.Thread(target=committer)
    thread.start()
    try:
        run_writers(lu, plans, GRAN)
    finally:
        stop.set()
        thread.join()
    s.close()
    assert not source.missing, "extents {} reached the Source while a " \
        "power cut would have lost them from the tracking map".format(
            sorted(source.missing))


@pytest.mark.parametrize("seed", range(3))
def test_tracking_survives_power_loss_with_commits_meanwhile(
        tmp_path, monkeypatch, seed):
    """A commit replaces the activity file while writers wait for their
    marks' fdatasync: a mark written before it is durable once it returns
    (the committed map or the new file holds the extent), at every moment
    a write lands."""
    check_commits_meanwhile(tmp_path, monkeypatch, seed)


def test_tracking_commits_meanwhile_twin_protection_off(tmp_path,
                                                        monkeypatch):
    """The commit's new activity file without the extents written since
    it took the maps: the check above must catch it."""
    with pytest.raises(AssertionError, match="would have lost them"):
        for seed in range(5):
            check_commits_meanwhile(tmp_path / str(seed), monkeypatch, seed,
                                    keep_recent=False)


def test_tracking_power_loss_twin_protection_off(tmp_path, monkeypatch):
    """The activity map's fdatasync ignored: the check above must catch
    it."""
    with pytest.raises(AssertionError, match="tracking map lacks"):
        check_power_cut(tmp_path, monkeypatch, 0, 0.0,
                        honour_datasync=False)


def test_a_failed_activity_sync_fails_the_writes_until_the_file_is_rewritten(
        tmp_path, monkeypatch, one_extent_regions):
    """After a failed fdatasync the kernel may have dropped the mark's
    page: every write waiting for it fails, and so does a later write into
    that region (its bits are set in memory) while the activity file cannot
    be written anew; once it can, the next write rewrites it whole from
    the bits in memory (no commit needed) and goes on."""
    source = backends.MemoryBackend(SIZE)
    lu, s = new_session(tmp_path, source, backends.MemoryBackend(SAVE_SIZE))
    activity_fd = s.tracking.changes.activity.file.fd
    real_datasync, real_fsync = os.fdatasync, os.fsync

    def fdatasync(fd):
        if fd == activity_fd:
            raise OSError(5, "Input/output error (injected)")
        real_datasync(fd)

    def fsync(fd):
        raise OSError(5, "Input/output error (injected)")
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with pytest.raises(OSError, match="injected"):
        lu.backend.write(b"a" * GRAN, 0)
    monkeypatch.setattr(os, "fsync", fsync)     # no new file either
    with pytest.raises(OSError, match="injected"):
        lu.backend.write(b"b" * GRAN, 0)
    assert source.data[:GRAN] == bytes(GRAN)
    assert s.writes_in_flight == 0
    monkeypatch.setattr(os, "fdatasync", real_datasync)
    monkeypatch.setattr(os, "fsync", real_fsync)
    lu.backend.write(b"c" * GRAN, 0)
    assert s.tracking.changes.activity.load()[0] == 1
    lu.backend.write(b"d" * GRAN, GRAN)
    assert source.data[:2 * GRAN] == b"c" * GRAN + b"d" * GRAN
    assert s.tracking.bits[:2] == b"\x01\x01"
    assert s.tracking.changes.activity.load()[:2] == b"\x01\x01"
    s.tracking.commit()
    assert maps.load(s.tracking.path, GRAN, EXTENTS)[:2] == b"\x01\x01"
    s.close()


def test_a_write_waiting_for_its_mark_survives_the_session_closing(
        tmp_path, monkeypatch, one_extent_regions):
    """A session deleted (or the target stopped) while a write's mark is
    written in place but not yet synced: the close commits the tracking
    map (it holds the extent) and replaces the activity file, so the
    write's mark is durable and the write goes on, as a write into a
    closed session does, instead of failing on the closed file."""
    source = backends.MemoryBackend(SIZE)
    lu, s = new_session(tmp_path, source, backends.MemoryBackend(SAVE_SIZE))
    noted, resume = threading.Event(), threading.Event()
    real = s.tracking.wait_durable

    def wait_durable(ticket):
        noted.set()     # the mark is written in place; the sync is next
        assert resume.wait(10), "the test never resumed the write"
        real(ticket)
    monkeypatch.setattr(s.tracking, "wait_durable", wait_durable)
    done, failed = background_write(lu, b"a" * GRAN, 0)
    assert noted.wait(10)
    s.close()
    assert maps.load(s.tracking.path, GRAN, EXTENTS)[0] == 1
    resume.set()
    assert done.wait(10)
    assert not failed, "the write failed: {}".format(failed)
    assert source.data[:GRAN] == b"a" * GRAN


def test_a_write_after_a_commit_that_could_not_replace_the_activity_file(
        tmp_path, monkeypatch, one_extent_regions):
    """A commit saved the tracking map but failed writing the new activity
    file (the old one closed already): a first write into a cold region
    writes the activity file anew, instead of writing to no file at all."""
    source = backends.MemoryBackend(SIZE)
    lu, s = new_session(tmp_path, source, backends.MemoryBackend(SAVE_SIZE))
    lu.backend.write(b"a" * GRAN, 0)
    activity = s.tracking.changes.activity
    real = os.fsync

    def fsync(fd):
        # The new activity file's temporary file.
        if os.path.basename(os.readlink("/proc/self/fd/{}".format(fd))) \
                .startswith("." + os.path.basename(activity.path) + "."):
            raise OSError(5, "Input/output error (injected)")
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="injected"):
        s.tracking.commit()
    monkeypatch.setattr(os, "fsync", real)
    assert maps.load(s.tracking.path, GRAN, EXTENTS)[0] == 1
    lu.backend.write(b"b" * GRAN, 5 * GRAN)
    assert source.data[5 * GRAN:6 * GRAN] == b"b" * GRAN
    assert activity.load()[5] == 1
    s.close()
