"""Session defects found by review, each pinned by a deterministic test.

Each test places an event (a host write, a crash, a concurrent command, a
failing state directory) in a window the single-threaded model test cannot
reach, and checks the invariant the defect broke.
"""

import tempfile
import threading

import pytest

from target import backends, maps, sessions
from tests.support.sessionfakes import FakeLU

G = 4096
N = 8
SIZE = G * N


class Crash(BaseException):
    """A kill -9."""


def new_session(record=None, inner=None, save=None, mapdir=None):
    inner = inner or backends.MemoryBackend(SIZE)
    lu = FakeLU(sessions.SessionLayer(inner), SIZE)
    save = save or backends.MemoryBackend(
        sessions.SaveArea.minimum_size(N, G) + N * G)
    mapdir = mapdir or tempfile.mkdtemp(prefix="session-regress-")
    persisted = {}

    def persist(r):
        persisted.clear()
        persisted.update(r)

    if record is None:
        s = sessions.Session("s", lu, G, mapdir, save, [{"uri": "m"}],
                             persist=persist)
        s.create()
    else:
        s = sessions.Session("s", lu, G, mapdir, save, record["dests"],
                             persist=persist, marked=record["marked"],
                             export=record["export"])
        s.load()
    lu.backend.add(s)
    return lu, s, persisted, (inner, save, mapdir)


def transfer(s, dest):
    engine = s.start_transfer({0: sessions.MemoryDestination(dest)},
                              run=False)
    engine.advance()
    return engine


def test_checkpoint_saves_cleared_maps_before_clearing_them(monkeypatch):
    """A host write landing while a checkpoint saves its maps, then a
    crash: the resumed transfer must still send the frozen data."""
    lu, s, persisted, disks = new_session()
    dest = backends.MemoryBackend(SIZE)
    lu.backend.write(b"A" * G, 0)
    s.mark()
    transfer(s, dest)
    lu.backend.write(b"B" * G, 0)
    s.mark()                                  # the point in time: B
    orig = maps.save
    fired = []

    def save(path, m, g):
        if path.endswith(".pending") and not fired:
            fired.append(path)
            lu.backend.write(b"C" * G, 0)     # a host write in the window
            raise Crash()
        return orig(path, m, g)

    monkeypatch.setattr(maps, "save", save)
    engine = s.start_transfer({0: sessions.MemoryDestination(dest)},
                              run=False)
    with pytest.raises(Crash):
        engine.step()
        engine.checkpoint()
    monkeypatch.setattr(maps, "save", orig)
    lu2, s2, _, _ = new_session(dict(persisted), *disks)
    engine = transfer(s2, dest)
    assert engine.result == "completed"
    assert s2.dests[0].consistency == sessions.CONSISTENT
    assert bytes(dest.data[:G]) == b"B" * G, \
        "the destination got post-mark data"


def test_frozen_export_connection_never_reads_a_later_mark():
    lu, s, _, _ = new_session()
    dest = backends.MemoryBackend(SIZE)
    lu.backend.write(b"A" * SIZE, 0)
    s.mark(export=True)
    export = sessions.FrozenExport(s)          # a backup tool connects
    buf = bytearray(G)
    export.read(buf, 3 * G)
    assert bytes(buf) == b"A" * G
    transfer(s, dest)                          # completes and unmarks
    lu.backend.write(b"Z" * G, 3 * G)
    s.mark()                                   # the next update
    with pytest.raises(sessions.FrozenImageGone):
        export.read(buf, 3 * G)


def test_failing_activity_map_does_not_wedge_the_source():
    """A host write that fails in the session (state directory EIO) must
    not leave the session counting it: mark and later writes go on."""
    lu, s, _, _ = new_session()
    activity = s.tracking.changes.activity.file
    orig = activity.persist

    def boom(*a, **kw):
        activity.persist = orig
        raise OSError(5, "EIO on the state directory")

    activity.persist = boom
    with pytest.raises(OSError):
        lu.backend.write(b"x" * G, 0)
    assert s.writes_in_flight == 0
    marker = threading.Thread(target=s.mark, daemon=True)
    marker.start()
    marker.join(10)
    assert not marker.is_alive(), "mark waits for a write that ended"
    lu.backend.write(b"y" * G, G)


def test_mark_refused_while_an_unmark_finishes(monkeypatch):
    """An unmark drops the pending maps and the save area after recording
    the session unmarked; a mark in that window would lose its saved data."""
    lu, s, _, _ = new_session()
    dest = backends.MemoryBackend(SIZE)
    lu.backend.write(b"A" * SIZE, 0)
    s.mark()
    transfer(s, dest)
    lu.backend.write(b"B" * G, 2 * G)
    s.mark()
    orig_reset = sessions.SaveArea.reset
    outcome = []

    def reset(self):
        if not outcome and not s.marked:
            try:
                s.mark()                      # a concurrent `session mark`
                outcome.append("marked")
            except sessions.SessionBusy:
                outcome.append("refused")
        return orig_reset(self)

    monkeypatch.setattr(sessions.SaveArea, "reset", reset)
    s.unmark()
    monkeypatch.setattr(sessions.SaveArea, "reset", orig_reset)
    assert outcome == ["refused"]
    s.mark()
    lu.backend.write(b"C" * G, 2 * G)         # after the mark: COFW
    engine = transfer(s, dest)
    assert engine.result == "completed"
    assert bytes(dest.data[2 * G:3 * G]) == b"B" * G


def test_mark_flushes_the_source():
    """Data sent as part of the point in time must be durable on the
    Source, or a power cut could lose it there with no map saying so."""
    inner = backends.MemoryBackend(SIZE)
    lu, s, _, _ = new_session(inner=inner)
    lu.backend.write(b"A" * G, 0)
    before = inner.flushes
    s.mark()
    assert inner.flushes > before


class FailingSaveArea(backends.MemoryBackend):
    """A save area whose writes fail with EIO once armed."""

    armed = False

    def write(self, buf, offset):
        if self.armed:
            raise OSError(5, "Input/output error (injected)")
        super().write(buf, offset)


def test_save_area_eio_unmarks_and_loses_nothing():
    """A failing save area: it returns EIO on a copy on
    first write.  The host write still succeeds, the session is unmarked
    with the error in its status, and the next update sends everything."""
    save = FailingSaveArea(sessions.SaveArea.minimum_size(N, G) + N * G)
    lu, s, _, _ = new_session(save=save)
    dest = backends.MemoryBackend(SIZE)
    lu.backend.write(b"A" * SIZE, 0)
    s.mark()
    transfer(s, dest)
    lu.backend.write(b"B" * G, G)
    s.mark()
    save.armed = True
    lu.backend.write(b"C" * G, G)              # needs a COFW: EIO
    save.armed = False
    assert not s.marked
    assert "Input/output error" in s.error
    assert s.status()["error"] == s.error
    s.mark()
    engine = transfer(s, dest)
    assert engine.result == "completed"
    assert bytes(dest.data) == bytes(lu.backend.inner.data)


def _full_state_dir(s):
    """Make s's inventory saves fail like a full state directory."""
    def persist(record):
        raise OSError(28, "No space left on device")
    s.persist = persist


def test_mark_not_saved_leaves_the_session_unmarked():
    """The marked record cannot be saved: the session stays unmarked in
    memory as on disk (no frozen export, no copies on first write)."""
    lu, s, persisted, disks = new_session()
    lu.backend.write(b"A" * G, 0)
    _full_state_dir(s)
    with pytest.raises(OSError):
        s.mark(export=True)
    assert not s.marked and not s.export and s.mark_time is None
    assert not persisted.get("marked")
    lu.backend.write(b"B" * G, 0)
    assert not s.save_area.slots
    with pytest.raises(sessions.FrozenImageGone):
        s.read_frozen(bytearray(G), 0)


def test_unmark_not_saved_keeps_the_frozen_image():
    """The unmarked record cannot be saved: the session stays marked, and
    writes keep saving the frozen data, which a restart still shows."""
    lu, s, persisted, disks = new_session()
    lu.backend.write(b"A" * SIZE, 0)
    s.mark(export=True)
    _full_state_dir(s)
    with pytest.raises(OSError):
        s.unmark()
    assert s.marked and s.export and persisted["marked"] is True
    lu.backend.write(b"B" * G, 2 * G)
    buf = bytearray(SIZE)
    s.read_frozen(buf, 0)
    assert buf == b"A" * SIZE


def test_transfer_start_not_saved_sends_nothing():
    """The record saying the destination is inconsistent cannot be saved:
    no transfer starts, and the destination is shown as it was."""
    lu, s, persisted, disks = new_session()
    lu.backend.write(b"A" * G, 0)
    s.mark()
    before = s.dests[0].consistency
    _full_state_dir(s)
    dest = backends.MemoryBackend(SIZE)
    with pytest.raises(OSError):
        s.start_transfer({0: sessions.MemoryDestination(dest)}, run=False)
    assert s.engine is None
    assert s.dests[0].consistency == before != sessions.INCONSISTENT
    assert not s.dests[0].transferring
    assert dest.data == bytes(SIZE)


def test_a_mark_while_another_is_marking_is_refused():
    """Two marks at once: the second is refused while the first swaps the
    maps (MARKING), rather than swapping them beside it; the first ends
    marked, and host writes go on afterwards."""
    lu, s, persisted, _ = new_session()
    entered, release = threading.Event(), threading.Event()

    def check():
        entered.set()
        assert release.wait(10)

    first = threading.Thread(target=s.mark, kwargs={"check": check},
                             daemon=True)
    first.start()
    assert entered.wait(10)
    with pytest.raises(sessions.SessionBusy, match="a mark is in progress"):
        s.mark()
    release.set()
    first.join(10)
    assert not first.is_alive()
    assert s.marked and persisted["marked"] is True
    lu.backend.write(b"y" * G, 0)
    assert s.tracking.bits[0] == 1 and len(s.save_area.slots) == 1
