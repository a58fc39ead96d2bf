"""Sessions on memory backends, for tests that drive the session engine
without a server: FakeLU (what a Session asks of its LU),
marked_session (a Source holding given data, a session marked on it),
new_session (a session "s" of a given Source and save area),
marked_on_save_file (a session marked, its save area a file),
frozen_image, run_writers (writer threads racing into extents),
first_writes_everywhere (the same with slow fdatasyncs), one_lu_target
(a Target of one LU, no server), session_sent_once and transfer_marked
(whole transfers to a memory destination), full_state_dir and start_with_full_maps (saves
of state.json, or of some maps, failing), CutSource and
SaveCutSource (a Source on which the power is cut at a given moment) and
CheckedSource (a Source that checks, at each write, that the save area's
durable bytes hold the old data it overwrites)."""

import collections
import errno
import os
import random
import tempfile
import threading
import time

from target import backends, errors, inventory, maps, sessions

from tests.support import powerloss


class FakeLU:
    """An LU as a Session sees it: a name, a size and its backend (the
    session layer over the Source's data)."""

    name = "src"

    def __init__(self, backend, size):
        self.backend = backend
        self.size = size


def marked_session(data, granularity, uris, map_dir=None):
    """A Source of `data` on a memory backend and a session "s" of it
    with one destination per URI, created and marked (its save area in
    memory, its maps in map_dir or a new temporary directory); returns
    (session, the frozen image)."""
    size = len(data)
    inner = backends.MemoryBackend(size)
    inner.write(data, 0)
    lu = FakeLU(sessions.SessionLayer(inner), size)
    save = backends.MemoryBackend(sessions.SaveArea.minimum_size(
        size // granularity, granularity) + size)
    s = sessions.Session("s", lu, granularity,
                         map_dir or tempfile.mkdtemp(prefix="session-"),
                         save, [{"uri": uri} for uri in uris],
                         persist=lambda record: None)
    s.create()
    lu.backend.add(s)
    s.mark()
    return s, bytes(inner.data)


class CutSource(backends.MemoryBackend):
    """A Source of size bytes, safe for threads (lock); the power is cut
    when the cut_at-th extent is first written: `cut` is then what
    at_cut() returns (a subclass keeps what it must), `landed` the
    extents written so far."""

    def __init__(self, size, granularity, lock, cut_at):
        super().__init__(size)
        self.granularity = granularity
        self.lock = lock
        self.cut_at = cut_at
        self.landed = set()
        self.cut = None

    def write(self, buf, offset):
        with self.lock:
            super().write(buf, offset)
            self.landed.add(offset // self.granularity)
            if self.cut is None and len(self.landed) == self.cut_at:
                self.cut = self.at_cut()

    def at_cut(self):
        raise NotImplementedError


class SaveCutSource(CutSource):
    """A CutSource whose cut keeps what the save area's simulated disk
    (save: a powerloss SimSaveArea) holds after a power cut of it, rng
    and keep choosing what of its pending writes survives: `cut` is
    (save area bytes, Source bytes, extents landed)."""

    def __init__(self, size, granularity, lock, save, cut_at, rng, keep):
        super().__init__(size, granularity, lock, cut_at)
        self.save = save
        self.rng = rng
        self.keep = keep

    def at_cut(self):
        disk = powerloss.SimFile()
        disk.durable = bytearray(self.save.file.durable)
        disk.pending = list(self.save.file.pending)
        disk.power_cut(self.rng, self.keep)
        return bytes(disk.data), bytes(self.data), set(self.landed)


class CheckedSource(backends.MemoryBackend):
    """A Source of size bytes; each time a write lands on it, the save
    area's durable bytes alone (save: a powerloss SimSaveArea), read back
    as a restart would, must hold the old data at the mark (at_mark, once
    set) of every block it writes.  A power cut at that moment keeps the
    frozen image; the extents for which it would not are collected in
    `early`."""

    def __init__(self, size, granularity, lock, save):
        super().__init__(size)
        self.granularity = granularity
        self.lock = lock
        self.save = save
        self.at_mark = None
        self.early = set()

    def write(self, buf, offset):
        g = self.granularity
        with self.lock:
            if self.at_mark is not None:
                durable = backends.MemoryBackend(len(self.save.file.durable))
                durable.data[:] = self.save.file.durable
                area = sessions.SaveArea(durable, self.size // g, g)
                try:
                    area.load()
                except sessions.SaveAreaUnreadable:
                    pass    # no header yet: nothing saved
                bs = area.block
                for b in range(offset // bs, (offset + len(buf) - 1) // bs + 1):
                    old = self.at_mark[b * bs:(b + 1) * bs]
                    saved = bytearray(bs)
                    if b in area.slots:
                        area.readinto(b, saved)
                    if b not in area.slots or saved != old:
                        self.early.add(b * bs // g)
            super().write(buf, offset)


def one_lu_target(tmp_path, size):
    """A Target (no server) of a state directory tmp_path/state with one
    LU "src" of size bytes; (target, the LU's file)."""
    from target.target import Target
    state = inventory.StateDir(str(tmp_path / "state"))
    state.ensure()
    record = inventory.create_lu(state, "src", size=size)
    return Target(state.path), record["file"]


def session_sent_once(t):
    """Session s of Target t's LU src (4K extents, one destination that
    no test reaches), marked and sent whole to a new memory destination;
    returns that destination."""
    lu = t.lus["src"]
    t.session_ops.create_session(
        lu, "s", [{"uri": "nbd://127.0.0.1:1/none", "peer": None}], "4K",
        None)
    dest = backends.MemoryBackend(lu.size)
    transfer_marked(t, dest)
    return dest


def transfer_marked(t, dest, name="s"):
    """Mark session name of Target t (unless marked) and run a whole
    transfer to the memory backend dest; returns the session."""
    s = t.sessions[name]
    if not s.marked:
        t.session_ops.session_mark(name)
    engine = s.start_transfer({0: sessions.MemoryDestination(dest)},
                              run=False)
    engine.advance()
    assert engine.result == "completed", engine.result
    return s


def full_state_dir(monkeypatch):
    """From now on every save of state.json fails (ENOSPC)."""
    def full(state_dir, doc):
        raise errors.StateNotSaved(path=state_dir.state_file,
                                   reason="No space left on device")
    monkeypatch.setattr(inventory.StateDir, "save", full)


def start_with_full_maps(tmp_path, monkeypatch, *suffixes):
    """The Target of tmp_path/state, started while every map file whose
    path ends with one of suffixes cannot be rewritten (ENOSPC)."""
    from target.target import Target
    real = maps.files.replace

    def full(p, data):
        if p.endswith(suffixes):
            raise OSError(errno.ENOSPC, "No space left on device", p)
        return real(p, data)
    monkeypatch.setattr(maps.files, "replace", full)
    try:
        return Target(str(tmp_path / "state"))
    finally:
        monkeypatch.setattr(maps.files, "replace", real)


def new_session(map_dir, source, save, granularity, marked=False,
                export=True):
    """A session "s" of the Source backend `source` (its maps in map_dir,
    its save area on `save`), created, or loaded when marked (exported
    when export too); returns (lu, session)."""
    lu = FakeLU(sessions.SessionLayer(source), source.size)
    s = sessions.Session("s", lu, granularity, str(map_dir), save, [],
                         marked=marked, export=marked and export)
    if marked:
        s.load()
    else:
        s.create()
    lu.backend.add(s)
    return lu, s


def source_and_save_file(tmp_path, size, save_size):
    """A Source (memory) of size bytes of random data, and a save area
    backend on the file tmp_path/save of save_size bytes."""
    path = tmp_path / "save"
    with open(path, "wb") as f:
        f.truncate(save_size)
    save = backends.FileBackend(str(path))
    source = backends.MemoryBackend(size)
    source.data[:] = random.Random(1).randbytes(size)
    return source, save


def marked_on_save_file(tmp_path, size, save_size, granularity):
    """A Source of size bytes of random data and a session "s" of it,
    marked (exported), its maps in tmp_path and its save area the file
    tmp_path/save of save_size bytes; returns (lu, session, Source, save
    area backend, the Source's data at the mark)."""
    source, save = source_and_save_file(tmp_path, size, save_size)
    lu, s = new_session(tmp_path, source, save, granularity)
    s.mark(export=True)
    return lu, s, source, save, bytes(source.data)


def frozen_image(s):
    """The frozen image of session s, whole."""
    buf = bytearray(s.size)
    s.read_frozen(buf, 0)
    return bytes(buf)


def run_writers(lu, plans, granularity):
    """One thread per plan (a list of extents), each writing 1 KiB of
    random data somewhere in each of its extents, all started at once."""
    start = threading.Barrier(len(plans))
    errors = []

    def run(i, plan):
        rng = random.Random(i)
        try:
            start.wait()
            for x in plan:
                lu.backend.write(rng.randbytes(1024), x * granularity +
                                 rng.randrange(0, granularity - 1024, 512))
        except Exception as e:   # reported below, in the test's thread
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i, p))
               for i, p in enumerate(plans)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def first_writes_everywhere(monkeypatch, lu, extents, granularity, slow_fds,
                            threads=8):
    """run_writers: `threads` threads, thread i writing into extents i,
    i + threads, ..., while every os.fdatasync of a file of slow_fds takes
    2 ms more (a disk's flush: other writes arrive meanwhile); returns
    {fd: fdatasyncs} of slow_fds."""
    syncs = collections.Counter()
    real = os.fdatasync

    def fdatasync(fd):
        if fd in slow_fds:
            syncs[fd] += 1
            time.sleep(0.002)
        real(fd)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    run_writers(lu, [list(range(i, extents, threads))
                     for i in range(threads)], granularity)
    monkeypatch.setattr(os, "fdatasync", real)
    return syncs
