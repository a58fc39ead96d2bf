"""A replay into a secondary that keeps its last consistent image
(LU@consistent-LU): the replay's writer saves the old data of a whole
window of received frames into the image's save area and makes those saves
durable with one flush (the save area's, and the activity map's) before it
writes any frame of the window into the volume.

- test_a_window_of_frames_shares_one_save_area_flush: the save area and
  the image's activity map are fdatasync'ed about once per window, not
  once per group commit of the writers.
- test_no_frame_reaches_the_volume_before_its_save_is_durable: every
  replay write that reaches the volume's file finds the old data of its
  extents durable in the save area (a save written before an fdatasync of
  the save area that completed).  Its twin ignores the wait for the save
  area's flush (the protection off) and must be caught.  It also checks
  that every write comes after the save_ahead of its window returned (the
  writes then wait for no save of their own).
- test_the_connection_reads_on_while_a_window_is_saved: the window's save
  runs beside the connection, which goes on receiving the next frames
  meanwhile; the window's frames are written once the save returned.
- test_a_window_whose_save_fails_is_not_written: a save that fails fails
  the window's writes (none lands), no RSYN after it is answered, and the
  session ends leaving no thread behind.
"""

import collections
import os
import threading
import time
import zlib

import pytest

from tests.support.rsgmodel import fast_timing, restore_timing, wait_for
from tests.support.rsgpair import FakePrimary, pair  # noqa: F401

from target import backends, sessions
from target import replication as R

GRAN = 64 << 10
# The save area's unit.
BLOCK = min(sessions.savearea.BLOCK, GRAN)
FRAMES = 128


@pytest.fixture(autouse=True)
def _fast():
    saved = fast_timing()
    yield
    restore_timing(saved)


def _path_of(fd):
    try:
        return os.readlink("/proc/self/fd/{}".format(fd))
    except OSError:
        return ""


def _replay(p, frames, counting=None):
    """A replay of frames (offset, data) and an RSYN by a primary of the
    test's own, the secondary keeping its image; the frames are sent at
    once from a thread of their own.  counting (an Event) is set once the
    image is made and cleared once the RSYN is answered.  Returns the
    image's session."""
    f = FakePrimary(p)
    try:
        f.begin()
        image = p.tb.sessions["consistent-v"]
        if counting is not None:
            counting.set()

        def send():
            for off, data in frames:
                f.data(off, data)
            f.send(b"RSYN", R.wire.SEQ.pack(1))
        t = threading.Thread(target=send)
        t.start()
        t.join(30)
        assert f.recv()[0] == b"RSAK"
        if counting is not None:
            counting.clear()
        f.end()
    finally:
        f.close()
    return image


def test_a_window_of_frames_shares_one_save_area_flush(pair, monkeypatch):
    p = pair(size=FRAMES * GRAN)
    save_path = p.tb.state_dir.save_area("v", "consistent-v")
    activity_path = os.path.join(p.tb.state_dir.maps_dir,
                                 "v@consistent-v.track.activity")
    syncs = collections.Counter()
    counting = threading.Event()
    real = os.fdatasync

    def fdatasync(fd):
        path = _path_of(fd)
        if counting.is_set() and path in (save_path, activity_path):
            syncs[path] += 1
        real(fd)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    windows = []
    save_ahead = sessions.SessionLayer.save_ahead

    def counted(self, runs):
        windows.append(len(runs))
        save_ahead(self, runs)
    monkeypatch.setattr(sessions.SessionLayer, "save_ahead", counted)
    frames = [(x * GRAN, os.urandom(GRAN)) for x in range(FRAMES)]
    image = _replay(p, frames, counting)
    assert image.cofw_count == FRAMES * GRAN // image.block
    # Windows: the frames held when the bound is reached, at the RSYN, or
    # when the connection pauses (as at the start, while the sender gets
    # going); each is saved with one flush of the save area and of the
    # activity map.
    assert sum(windows) == FRAMES and len(windows) <= FRAMES // 16, windows
    assert max(windows) <= R.secondary.REPLAY_APPLY_FRAMES + 1, windows
    assert syncs[save_path] <= len(windows), \
        "{} save area fdatasyncs for {} frames in {} windows".format(
            syncs[save_path], FRAMES, len(windows))
    assert syncs[activity_path] <= len(windows), \
        "{} activity map fdatasyncs for {} frames in {} windows".format(
            syncs[activity_path], FRAMES, len(windows))


def check_order(p, monkeypatch, frames):
    """Replay frames; every replay write reaching the volume's file must
    find the saves of each of its blocks durable: written before an fdatasync
    of the save area that began after it and has completed.  Returns the
    image's session."""
    save_path = p.tb.state_dir.save_area("v", "consistent-v")
    volume = p.tb.lus["v"].backend
    lock = threading.Lock()
    state = {"written": 0, "durable": 0}
    stored, early = {}, []
    # From the replay whose image is kept (not the link's first).
    checking = threading.Event()

    def saved(store, count):
        """store recording its blocks (count(self, arg) of them from
        first) with its number; under the lock, so that no
        flush counts it before it is counted."""
        def wrapper(self, first, arg):
            if self.backend.path != save_path:
                return store(self, first, arg)
            with lock:
                ticket = store(self, first, arg)
                state["written"] += 1
                for b in range(first, first + count(self, arg)):
                    stored[b] = state["written"]
            return ticket
        return wrapper
    monkeypatch.setattr(sessions.SaveArea, "store", saved(
        sessions.SaveArea.store, lambda self, data: len(data) // self.block))
    monkeypatch.setattr(sessions.SaveArea, "store_zero", saved(
        sessions.SaveArea.store_zero, lambda self, count: count))
    real_sync = os.fdatasync

    def fdatasync(fd):
        if _path_of(fd) != save_path:
            return real_sync(fd)
        with lock:
            upto = state["written"]
        real_sync(fd)
        with lock:
            state["durable"] = max(state["durable"], upto)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    # Extents whose window's save_ahead has returned.
    saved_ahead, unsaved = set(), []
    real_save_ahead = sessions.SessionLayer.save_ahead

    def save_ahead(self, runs):
        real_save_ahead(self, runs)
        with lock:
            saved_ahead.update(x for off, n in runs
                               for x in range(off // GRAN,
                                              (off + n - 1) // GRAN + 1))
    monkeypatch.setattr(sessions.SessionLayer, "save_ahead", save_ahead)
    real_write = backends.FileBackend.write

    def write(self, buf, offset):
        if self is volume and checking.is_set():
            n = memoryview(buf).nbytes
            with lock:
                for b in range(offset // BLOCK, (offset + n - 1) // BLOCK + 1):
                    if stored.get(b, state["durable"] + 1) > \
                            state["durable"]:
                        early.append(b * BLOCK // GRAN)
                for x in range(offset // GRAN, (offset + n - 1) // GRAN + 1):
                    if x not in saved_ahead:
                        unsaved.append(x)
        return real_write(self, buf, offset)
    monkeypatch.setattr(backends.FileBackend, "write", write)
    image = _replay(p, frames, checking)
    assert not early, "replay data reached extents {} of the volume " \
        "before their old data was durable in the save area".format(
            sorted(set(early))[:8])
    assert not unsaved, "replay data reached extents {} of the volume " \
        "before the save_ahead of their window returned".format(
            sorted(set(unsaved))[:8])
    return image


def test_no_frame_reaches_the_volume_before_its_save_is_durable(pair):
    p = pair(size=FRAMES * GRAN)
    # In the order of a DCM (every other extent, then the rest), so that
    # windows hold extents of all of the volume.
    order = list(range(0, FRAMES, 2)) + list(range(1, FRAMES, 2))
    frames = [(x * GRAN, os.urandom(GRAN)) for x in order]
    with pytest.MonkeyPatch.context() as mp:
        image = check_order(p, mp, frames)
    assert image.cofw_count == FRAMES * GRAN // image.block
    b = bytearray(FRAMES * GRAN)
    p.tb.lus["v"].backend.readinto(b, 0)
    assert all(b[off:off + GRAN] == data for off, data in frames)


def test_frame_order_twin_protection_off(pair, monkeypatch):
    """The wait for the save area's flush skipped: the check above must
    catch it."""
    p = pair(size=FRAMES * GRAN)
    frames = [(x * GRAN, os.urandom(GRAN)) for x in range(FRAMES)]
    monkeypatch.setattr(sessions.SaveArea, "wait_durable",
                        lambda self, ticket: None)
    with pytest.raises(AssertionError, match="before their old data"):
        check_order(p, monkeypatch, frames)


def test_a_save_area_failure_in_a_window_drops_the_image_not_the_data(
        pair, monkeypatch):
    """The save area fails (EIO) while a window is saved ahead: the image
    is given up (unmarked, its error kept, no longer listed by the group)
    and never read as a point in time it no longer holds; the replay's
    data still lands whole and the RSYN is answered after it."""
    p = pair(size=FRAMES * GRAN)
    save_path = p.tb.state_dir.save_area("v", "consistent-v")
    failing = threading.Event()
    real_store = sessions.SaveArea.store

    def store(self, extent, *args):
        if failing.is_set() and self.backend.path == save_path:
            raise OSError(5, "Input/output error (injected)")
        return real_store(self, extent, *args)
    monkeypatch.setattr(sessions.SaveArea, "store", store)
    frames = [(x * GRAN, os.urandom(GRAN)) for x in range(FRAMES)]
    image = _replay(p, frames, failing)
    assert not image.marked
    assert "Input/output error" in (image.error or ""), image.error
    b = bytearray(FRAMES * GRAN)
    p.tb.lus["v"].backend.readinto(b, 0)
    assert all(b[off:off + GRAN] == data for off, data in frames)



def test_frames_sharing_extents_across_windows_are_saved_first(pair):
    """Frames smaller than an extent and not aligned to one, in an order
    that puts parts of one extent into several windows (and writes in
    flight beside the next window's save): each still finds its extents'
    old data durable, and the volume ends with every frame's data."""
    p = pair(size=FRAMES * GRAN)
    piece = GRAN // 4
    starts = [s + 4096 for s in range(0, FRAMES * GRAN - GRAN, piece)]
    order = starts[0::4] + starts[2::4] + starts[1::4] + starts[3::4]
    frames = [(off, os.urandom(piece)) for off in order]
    with pytest.MonkeyPatch.context() as mp:
        check_order(p, mp, frames)
    after = bytearray(FRAMES * GRAN)
    p.tb.lus["v"].backend.readinto(after, 0)
    assert all(after[off:off + piece] == data for off, data in frames)


def _record_writes(monkeypatch, lock, written):
    """Append the offset of every replay write to written (under lock)
    as it begins."""
    real_apply = R.SecondaryGroup._apply_one

    def apply_one(self, vol, kind, off, length, data):
        with lock:
            written.append(off)
        real_apply(self, vol, kind, off, length, data)
    monkeypatch.setattr(R.SecondaryGroup, "_apply_one", apply_one)


def test_the_connection_reads_on_while_a_window_is_saved(pair, monkeypatch):
    """The save of a window (a copy and a flush of the kept image's save
    area) is held up: the connection goes on receiving the frames after
    the window meanwhile (it is not the thread saving), no frame of the
    window reaches the volume before the save returned, and every frame
    lands once it has, before the RSYN after them is answered."""
    p = pair(size=FRAMES * GRAN)
    window = R.secondary.REPLAY_APPLY_FRAMES
    total = window + window // 2
    # Small frames, one extent each, sent in one piece: all of them fit in
    # the sockets' buffers, so the connection finds the next frame there
    # at once and has no pause to drain at.
    frames = [(x * GRAN, os.urandom(512)) for x in range(total)]
    f = FakePrimary(p)
    lock = threading.Lock()
    armed, sent = threading.Event(), threading.Event()
    held, go = threading.Event(), threading.Event()
    state = {"received": 0}
    savers, written = [], []
    real_check = R.SecondaryGroup._check_data

    def check_data(self, *args):
        if armed.is_set():
            # The first frame waits until all of them were sent.
            sent.wait(10)
            with lock:
                state["received"] += 1
        return real_check(self, *args)
    monkeypatch.setattr(R.SecondaryGroup, "_check_data", check_data)
    real_save_ahead = sessions.SessionLayer.save_ahead

    def save_ahead(self, runs):
        savers.append(threading.current_thread())
        if len(savers) == 1:
            held.set()
            go.wait(30)
        real_save_ahead(self, runs)
    monkeypatch.setattr(sessions.SessionLayer, "save_ahead", save_ahead)
    _record_writes(monkeypatch, lock, written)

    def received():
        with lock:
            return state["received"]
    try:
        f.begin()
        armed.set()
        R.wire.send_frames(f.sock, [
            (b"RDAT", R.wire.DATA.pack(0, R.WRITE, off, len(data),
                                       zlib.crc32(data)), data)
            for off, data in frames])
        sent.set()
        assert held.wait(10), "no window was saved ahead"
        with lock:
            assert not written, "a frame was written before its " \
                "window's save returned"
        wait_for(lambda: received() == total, 5, "the frames after the "
                 "window being saved to be received",
                 lambda: "{} of {} received; the connection's thread "
                 "saving: {}".format(received(), total,
                                     savers[0] is f.thread))
        assert savers[0] is not f.thread
        with lock:
            assert not written, "a frame was written before its " \
                "window's save returned"
        go.set()
        f.send(b"RSYN", R.wire.SEQ.pack(1))
        assert f.recv()[0] == b"RSAK"
        with lock:
            assert sorted(written) == sorted(off for off, _ in frames)
        f.end()
    finally:
        go.set()
        f.close()
    b = bytearray(512)
    for off, data in frames:
        p.tb.lus["v"].backend.readinto(b, off)
        assert bytes(b) == data


def test_a_window_whose_save_fails_is_not_written(pair, monkeypatch):
    """The save of a window fails (EIO, after the connection went on
    receiving): none of the window's frames, nor any after them, reaches
    the volume, the RSYN after them is not answered, the session ends as
    for a failure of this node's volumes, and no thread of the replay's
    writer is left."""
    p = pair(size=FRAMES * GRAN)
    window = R.secondary.REPLAY_APPLY_FRAMES
    frames = [(x * GRAN, os.urandom(512)) for x in range(window + 8)]
    f = FakePrimary(p)
    lock = threading.Lock()
    written = []
    real_save_ahead = sessions.SessionLayer.save_ahead

    def save_ahead(self, runs):
        time.sleep(0.2)
        raise OSError(5, "Input/output error (injected)")
    _record_writes(monkeypatch, lock, written)

    def writers():
        return [t.name for t in threading.enumerate()
                if t.name.startswith(("rsg-apply", "rsg-replay-sync"))]
    try:
        f.begin()
        monkeypatch.setattr(sessions.SessionLayer, "save_ahead", save_ahead)
        R.wire.send_frames(f.sock, [
            (b"RDAT", R.wire.DATA.pack(0, R.WRITE, off, len(data),
                                       zlib.crc32(data)), data)
            for off, data in frames] + [(b"RSYN", R.wire.SEQ.pack(1), None)])
        f.thread.join(10)
        assert not f.thread.is_alive(), "the session goes on"
        answers = f.answers()
    finally:
        monkeypatch.setattr(sessions.SessionLayer, "save_ahead",
                            real_save_ahead)
        f.close()
    assert b"RSAK" not in answers, answers
    assert not written, "{} frames written without their save".format(
        len(written))
    assert "Input/output error" in (f.sg.error or ""), f.sg.error
    assert not writers(), writers()
    assert not f.sg.consistent
