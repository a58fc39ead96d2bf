"""Saves failing in the middle of a protected restore: the Source flush
that a PRM save and a commit make first, the PRM's own fdatasync, the
activity map's rewrite, and the new PRM of a `--full` restart.

A failed fdatasync may drop the pages it could not write
(FailingBackend drops what the Source got since its last good flush):
whatever the restore copied since must be copied again, never left under
a clean bit, and never copied over what hosts wrote.  The tests marked
safe passed before the fixes too; they pin down why those failures lose
nothing.
"""

import errno
import os
import threading
import time

import pytest

from target import clones, maps

from tests.support.clonegroup import EXTENTS, GRAN, Harness, \
    hold_write, on_failing_backends, pattern, restore_losing_its_prm


@pytest.fixture
def fh(tmp_path):
    return on_failing_backends(Harness(tmp_path))


def _restoring(h):
    """c1 synced at pattern 1, fractured, its export rewritten with
    pattern 7 (every extent differs); its restore started, not run, two
    extents a step."""
    h.lu.write(pattern(1), 0)
    h.sync("c1")
    h.group.fracture("c1")
    h.group.clones["c1"].export.write(pattern(7), 0)
    h.lu.flush()
    engine = h.group.start_restore("c1", run=False)
    engine.chunk = 2
    return engine


def _wrong_unprotected(h):
    """Extents the restore calls done (Delta bit clear, no PRM bit) whose
    Source data is not the clone's."""
    c1 = h.group.clones["c1"]
    prm = h.group.prm if h.group.restoring is c1 else bytes(EXTENTS)
    return [e for e in range(EXTENTS) if not c1.delta[e] and not prm[e]
            and h.extent(h.mem_src, e) != h.extent(h.mem["c1"], e)]


# -------------------------------------------- a failed Source flush
@pytest.mark.parametrize("where", ["host-flush", "commit"])
def test_a_source_flush_failing_during_a_restore_keeps_copied_extents_dirty(
        fh, where):
    """The restore engine copied extents 0-3 (Delta bits cleared, data in
    the Source's page cache).  The Source's flush fails (a host flush's
    PRM save flushes it first; a commit flushes it too) and drops those
    pages, as a failed fdatasync does.  The extents must be copied again:
    otherwise the restore completes with the Source holding its
    pre-restore data under clean bits, and hosts read that meanwhile."""
    h = fh
    engine = _restoring(h)
    assert engine.step() and engine.step()          # extents 0-3 copied
    c1 = h.group.clones["c1"]
    assert [e for e in range(4) if c1.delta[e]] == []
    h.src.fail_flush = errno.EIO
    with pytest.raises(OSError):
        if where == "host-flush":
            h.lu.flush()
        else:
            h.group.commit()
    h.src.fail_flush = None
    # What a host reads at extent 0 now: must be the clone's data.
    buf = bytearray(GRAN)
    h.lu.read(buf, 0)
    stale = bytes(buf) != h.extent(h.mem["c1"], 0)
    h.run(engine)
    assert c1.state == clones.FRACTURED
    wrong = [e for e in range(EXTENTS) if not c1.delta[e] and
             h.extent(h.mem_src, e) != h.extent(h.mem["c1"], e)]
    assert wrong == [] and not stale, \
        "restore completed with pre-restore data under clean bits at " \
        "extents {} (host read stale data: {})".format(wrong, stale)


def test_a_copy_running_across_a_failed_source_flush_keeps_its_bits(fh):
    """The engine copies extents 0-1 one chunk each; between them a host
    flush fails on the Source and drops extent 0's copy.  The copy ends
    after the failure was marked: its bits must stay, not be cleared by
    its end."""
    h = fh
    engine = _restoring(h)
    c1 = h.group.clones["c1"]
    engine.copier = h.group.restore_copier(c1, chunk=GRAN)
    failed = []

    def fail_between(_, e0, e1):
        if e0 == 1 and not failed:
            h.src.fail_flush = errno.EIO
            try:
                h.lu.flush()
            except OSError as e:
                failed.append(e)
            h.src.fail_flush = None
    h.group.copy_hook = fail_between
    assert engine.step()
    h.group.copy_hook = None
    assert failed, "the host flush did not fail"
    assert c1.delta[0] and c1.delta[1], \
        "the copy cleared the bits of extents a failed flush may have lost"
    h.run(engine)
    assert c1.state == clones.FRACTURED
    assert _wrong_unprotected(h) == []
    assert all(h.extent(h.mem_src, e) == h.extent(h.mem["c1"], e)
               for e in range(EXTENTS))


def _fail_source_flush(h):
    """A host's flush that fails on the Source."""
    h.src.fail_flush = errno.EIO
    try:
        with pytest.raises(OSError):
            h.lu.flush()
    finally:
        h.src.fail_flush = None


def test_a_flushed_host_write_is_never_copied_over(fh):
    h = fh
    engine = _restoring(h)
    h.lu.write(b"H" * 100, 5 * GRAN + 10)     # copy on demand, PRM bit
    h.lu.flush()
    assert engine.step()                      # extents 0-1 copied
    _fail_source_flush(h)
    h.run(engine)
    assert h.mem_src.data[5 * GRAN + 10:5 * GRAN + 110] == b"H" * 100
    assert _wrong_unprotected(h) == []


def _fail_after_copy_on_demand(h, extent, then=None):
    """The Source's flush fails right after a host write's copy on
    demand of extent, before the write registers (then: called next)."""
    g = h.group
    real = g.copy_on_demand
    done = []

    def cod(e0, e1):
        real(e0, e1)
        if e0 == extent and not done:
            done.append(1)
            _fail_source_flush(h)
            if then is not None:
                then()
    g.copy_on_demand = cod
    return done


def test_a_write_whose_copy_on_demand_was_lost_copies_again(fh):
    """Between a host write's copy on demand and its registration a flush
    fails and may drop that copy: the write copies again before it lands,
    so the rest of the extent is the clone's, not the pre-restore data."""
    h = fh
    engine = _restoring(h)
    done = _fail_after_copy_on_demand(h, 3)
    h.lu.write(b"H" * 100, 3 * GRAN + 10)
    assert done
    h.run(engine)
    want = bytearray(h.extent(h.mem["c1"], 3))
    want[10:110] = b"H" * 100
    assert h.extent(h.mem_src, 3) == bytes(want), \
        "extent 3 keeps pre-restore data around the host write"


def test_an_engine_copy_of_an_extent_marked_again_never_lands_on_a_write(
        fh):
    """The engine claims the extent marked again while the host write
    that copied it on demand waits to register: the write must not land
    before that copy, or the copy overwrites it."""
    h = fh
    engine = _restoring(h)
    engine.chunk = 1
    engine.copier = h.group.restore_copier(h.group.clones["c1"], chunk=GRAN)
    engine.cursor = 3
    in_hook, go = threading.Event(), threading.Event()

    def hook(_, e0, e1):
        if e0 == 3:
            in_hook.set()
            go.wait(5)

    def engine_claims():
        h.group.copy_hook = hook
        threading.Thread(target=engine.step, daemon=True).start()
        assert in_hook.wait(5)               # the engine read extent 3
    _fail_after_copy_on_demand(h, 3, then=engine_claims)
    writer = threading.Thread(target=lambda: (
        h.lu.write(b"H" * 100, 3 * GRAN + 10), h.lu.flush()))
    writer.start()
    time.sleep(0.2)                          # the write waits, or lands
    go.set()
    writer.join(10)
    h.group.copy_hook = None
    del h.group.copy_on_demand               # the class's again
    h.run(engine)
    assert h.mem_src.data[3 * GRAN + 10:3 * GRAN + 110] == b"H" * 100, \
        "a flushed host write was overwritten by the restore"


def test_marks_made_while_the_finish_drains_are_copied(fh):
    h = fh
    engine = _restoring(h)
    while engine.step():
        pass                                 # all copied, not committed
    entered, release = hold_write(h.src, 15 * GRAN)
    w = threading.Thread(target=h.lu.write, args=(b"W" * 10, 15 * GRAN))
    w.start()
    assert entered.wait(5)
    done = []
    f = threading.Thread(target=lambda: done.append(engine.finish()))
    f.start()
    time.sleep(0.2)                          # the finish drains
    _fail_source_flush(h)                    # marks every copied extent
    release.set()
    w.join(5)
    f.join(5)
    if done != [True]:
        h.run(engine)
    c1 = h.group.clones["c1"]
    assert c1.state == clones.FRACTURED
    wrong = [e for e in range(EXTENTS) if e != 15 and not c1.delta[e]
             and h.extent(h.mem_src, e) != h.extent(h.mem["c1"], e)]
    assert wrong == [], "the restore completed with pre-restore data " \
        "under clean bits at {}".format(wrong)


def test_marks_made_during_the_finishs_commit_are_copied(fh):
    h = fh
    engine = _restoring(h)
    while engine.step():
        pass
    real_flush = h.src.flush
    armed = [True]

    def flush():
        if armed[0] and h.group.quiesce:     # the finish's commit
            armed[0] = False
            _fail_source_flush(h)            # a host's flush fails
        real_flush()
    h.src.flush = flush
    h.lu.stack.refresh()
    if not engine.finish():
        h.run(engine)
    c1 = h.group.clones["c1"]
    assert c1.state == clones.FRACTURED
    left = [e for e in range(EXTENTS) if c1.delta[e]]
    assert left == [], "the restore completed, yet extents {} hold " \
        "pre-restore data".format(left)


def _failed_full_restart(h, monkeypatch):
    """`clone restore --full` whose new PRM is renamed into place, then
    the fsync of its directory fails: the command fails."""
    real = maps.files.replace
    prm = h.group.prm_file.path
    calls = []

    def replace(path, data):
        real(path, data)                       # renamed into place ...
        if path == prm:
            calls.append(path)
            raise OSError(errno.EIO, "injected fsync of the directory")
    monkeypatch.setattr(maps.files, "replace", replace)
    with pytest.raises(OSError):
        h.group.start_restore("c1", full=True, run=False)
    monkeypatch.setattr(maps.files, "replace", real)
    assert calls


def test_a_prm_that_cannot_be_spoiled_is_removed(fh, monkeypatch):
    """The --full restart's reset failed at its reopen (EMFILE), after
    the rename, and the spoil cannot open the file either."""
    h = fh
    restore_losing_its_prm(h)
    assert h.group.prm_lost
    prm = h.group.prm_file.path
    real_open = maps.files.open

    def bad_open(path):
        if path == prm:
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path)
    monkeypatch.setattr(maps.files, "open", bad_open)
    with pytest.raises(OSError):
        h.group.start_restore("c1", full=True, run=False)
    monkeypatch.setattr(maps.files, "open", real_open)
    h.lu.write(b"H" * GRAN, 10 * GRAN)
    h.lu.flush()
    h.crash()
    if h.group.resume(run=False) is not None:
        h.run(h.group.engine)
    assert h.mem_src.data[10 * GRAN:11 * GRAN] == b"H" * GRAN


def test_a_full_restart_after_a_failed_one_protects_new_writes(
        fh, monkeypatch):
    h = fh
    restore_losing_its_prm(h)
    assert h.group.prm_lost
    _failed_full_restart(h, monkeypatch)
    h.lu.write(b"H" * GRAN, 10 * GRAN)       # restored over by the retry
    h.lu.flush()
    h.group.start_restore("c1", full=True, run=False)
    h.lu.write(b"K" * GRAN, 12 * GRAN)
    h.lu.flush()
    h.crash()
    h.group.resume(run=False)
    h.run(h.group.engine)
    assert h.mem_src.data[12 * GRAN:13 * GRAN] == b"K" * GRAN
    assert h.extent(h.mem_src, 10) == h.extent(h.mem["c1"], 10)


# ------------------------------------------------------------ safe
class _FailingPrmSync:
    """maps.files whose datasync of the PRM file fails while `fail` is
    set, dropping the bytes written since the last good sync (a failed
    fdatasync loses the pages it could not write)."""

    def __init__(self, real, path):
        self.real, self.path, self.fail = real, path, False
        self.fds, self.synced = set(), None

    def __getattr__(self, name):
        return getattr(self.real, name)

    def open(self, path):
        fd = self.real.open(path)
        if path == self.path:
            self.fds.add(fd)
            self.synced = self.real.read(path)
        return fd

    def datasync(self, fd):
        if fd in self.fds:
            if self.fail:
                os.pwrite(fd, self.synced, 0)
                raise OSError(errno.EIO, "injected PRM fdatasync EIO")
            self.synced = self.real.read(self.path)
        self.real.datasync(fd)


def test_prm_sync_failing_under_host_writes_then_crash(fh, monkeypatch):
    """Host writes into pending extents while the PRM's fdatasync fails:
    the host flush fails; the engine's commit fails and pauses the restore
    with the error.  Later a flush succeeds (the whole PRM is rewritten),
    the process crashes, the restore resumes: every flushed host write
    survives and every other extent holds the clone's data."""
    h = fh
    engine = _restoring(h)
    files = _FailingPrmSync(maps.files, h.group.prm_file.path)
    monkeypatch.setattr(maps, "files", files)
    h.group.prm_file.reset(h.group.prm)            # reopened through files
    assert engine.step()                           # extents 0-1
    files.fail = True
    h.lu.write(b"H" * 100, 5 * GRAN + 10)          # pending: COD then write
    with pytest.raises(OSError):
        h.lu.flush()
    with pytest.raises(OSError):
        h.group.commit()
    engine.start()
    engine.join(10)
    c1 = h.group.clones["c1"]
    st = h.group.clone_status(c1)
    assert c1.paused and "EIO" in (st["error"] or ""), st
    files.fail = False
    h.lu.write(b"K" * 100, 9 * GRAN + 10)          # pending too
    h.lu.flush()                                   # now the PRM saves
    h.crash()
    c1 = h.group.clones["c1"]
    assert c1.state == clones.RESTORING and not c1.paused
    h.group.resume(run=False)
    h.run(h.group.engine)
    src = h.mem_src.data
    assert src[5 * GRAN + 10:5 * GRAN + 110] == b"H" * 100
    assert src[9 * GRAN + 10:9 * GRAN + 110] == b"K" * 100
    for e in range(EXTENTS):
        if e not in (5, 9):
            assert h.extent(h.mem_src, e) == h.extent(h.mem["c1"], e), e
    assert sorted(e for e in range(EXTENTS)
                  if h.group.clones["c1"].delta[e]) == [5, 9]


def test_prm_sync_failing_at_the_restores_end(fh, monkeypatch):
    """The end's commit cannot save the PRM: the restore is not recorded
    complete; it stays restoring (paused, error shown); host writes then
    are protected; a crash and resume end it with them kept."""
    h = fh
    engine = _restoring(h)
    files = _FailingPrmSync(maps.files, h.group.prm_file.path)
    monkeypatch.setattr(maps, "files", files)
    h.group.prm_file.reset(h.group.prm)
    while engine.step():
        pass
    files.fail = True
    engine.start()                   # finish() -> commit fails
    engine.join(10)
    c1 = h.group.clones["c1"]
    assert c1.state == clones.RESTORING and h.states["c1"] == "restoring"
    assert c1.paused and "EIO" in h.group.clone_status(c1)["error"]
    files.fail = False
    h.lu.write(b"X" * 100, 3 * GRAN)
    h.lu.flush()
    h.crash()
    h.group.resume(run=False)
    h.run(h.group.engine)
    assert h.mem_src.data[3 * GRAN:3 * GRAN + 100] == b"X" * 100
    assert h.group.clones["c1"].delta[3] == 1
    assert _wrong_unprotected(h) == []


def test_activity_replace_failing_during_a_restore(fh, monkeypatch):
    """The commit's activity rewrite fails after the maps and the PRM
    were saved: the commit (and the host flush that made it) fails, writes
    are refused until the activity file is written anew; a crash then
    resumes with nothing lost."""
    h = fh
    engine = _restoring(h)
    assert engine.step()
    h.lu.write(b"H" * 100, 6 * GRAN)
    real = maps.files.replace
    act = h.group.changes.activity.path

    def replace(path, data):
        if path == act:
            raise OSError(errno.EIO, "injected activity replace EIO")
        real(path, data)
    monkeypatch.setattr(maps.files, "replace", replace)
    with pytest.raises(OSError):
        h.group.commit()
    with pytest.raises(OSError):
        h.lu.write(b"J" * 100, 12 * GRAN)          # mark must be rewritten
    monkeypatch.setattr(maps.files, "replace", real)
    h.lu.write(b"J" * 100, 12 * GRAN)
    h.lu.flush()
    h.crash()
    h.group.resume(run=False)
    h.run(h.group.engine)
    assert h.mem_src.data[6 * GRAN:6 * GRAN + 100] == b"H" * 100
    assert h.mem_src.data[12 * GRAN:12 * GRAN + 100] == b"J" * 100
    assert _wrong_unprotected(h) == []


def test_full_restart_whose_prm_reset_fails_after_the_rename(fh, monkeypatch):
    """`clone restore --full` of a restore whose PRM was lost: the new
    empty PRM is renamed into place but the reset then fails (the fsync
    of the directory, or the reopen).  The command fails, so the restore
    stays paused with its PRM lost; hosts go on writing and flush.  After
    a crash the restore must still be paused and refused without --full,
    never resumed on its own over those flushed writes."""
    h = fh
    restore_losing_its_prm(h)
    assert h.group.prm_lost
    _failed_full_restart(h, monkeypatch)
    c1 = h.group.clones["c1"]
    assert c1.state == clones.RESTORING and c1.paused and h.group.prm_lost
    h.lu.write(b"H" * GRAN, 10 * GRAN)         # after the failed command
    h.lu.flush()
    h.crash()
    c1 = h.group.clones["c1"]
    resumed = h.group.resume(run=False)
    if resumed is not None:
        h.run(h.group.engine)
    assert h.mem_src.data[10 * GRAN:11 * GRAN] == b"H" * GRAN, \
        "a write flushed after the failed --full was overwritten by a " \
        "restore that resumed by itself (resumed: {})".format(
            resumed is not None)
