"""Copy on first write with group commit: concurrent first writes share
one durable save (target.sessions.savearea), and a host write still
proceeds only once its own extent's old data is durable.

- test_concurrent_first_writes_share_syncs: writer threads make first
  writes at once; the save area is fdatasync'ed fewer times than there
  were saves, and the frozen image reads exactly as at the mark.
- test_frozen_image_survives_power_loss: the same writers race, and the
  power is cut at the moment the N-th host write lands on the Source (the
  worst case: every write that reached the Source survives, the save
  area keeps only what its syncs made durable plus an arbitrary subset
  of the rest).  The session recovered from that disk must read the frozen
  image exactly as at the mark.  Its twin ignores the save area's
  fdatasync (the protection off) and must be caught.
  The same with the slots still holding an earlier mark's saves.
- test_a_save_read_back_after_a_kill_is_made_durable_before_it_is_trusted:
  a kill between a save and its flush, then a power cut.
"""

import functools
import random
import threading

import pytest

from target import backends, changemap, sessions

from tests.support import powerloss, sessionfakes
from tests.support.powerloss import SimSaveArea
from tests.support.sessionfakes import frozen_image, run_writers
from tests.support.spybackend import GatedReads

GRAN = 4096
EXTENTS = 64
SIZE = GRAN * EXTENTS
SAVE_SIZE = sessions.SaveArea.minimum_size(EXTENTS, GRAN) - GRAN + SIZE

new_session = functools.partial(sessionfakes.new_session, granularity=GRAN)


def test_concurrent_first_writes_share_syncs(tmp_path, monkeypatch):
    lu, s, source, save, at_mark = sessionfakes.marked_on_save_file(
        tmp_path, SIZE, SAVE_SIZE, GRAN)
    syncs = sessionfakes.first_writes_everywhere(
        monkeypatch, lu, EXTENTS, GRAN, (save.fd,))

    assert s.cofw_count == EXTENTS
    assert syncs[save.fd] <= EXTENTS // 2, \
        "{} fdatasyncs for {} saves".format(syncs[save.fd], s.cofw_count)
    assert bytes(source.data) != at_mark
    assert frozen_image(s) == at_mark, "the frozen image is not the mark's"
    s.close()
    # What is on the save area's disk reads the same after a restart.
    lu2, s2 = new_session(tmp_path, source,
                          backends.FileBackend(save.path), marked=True)
    assert frozen_image(s2) == at_mark
    s2.close()



def check_power_cut(tmp_path, seed, keep, honour_flush=True, reused=False):
    """reused: a mark, first writes everywhere and an unmark come first,
    so the save area's slots hold that mark's old data (a reset keeps
    them) when the power is cut."""
    rng = random.Random(seed)
    lock = threading.Lock()
    save = SimSaveArea(powerloss.SimFile(bytes(SAVE_SIZE)), lock)
    cut_at = rng.randrange(4, EXTENTS)
    source = sessionfakes.SaveCutSource(SIZE, GRAN, lock, save, None, rng,
                                         keep)
    source.data[:] = rng.randbytes(SIZE)
    lu, s = new_session(tmp_path, source, save)
    if reused:
        s.mark(export=True)
        run_writers(lu, [list(range(EXTENTS))], GRAN)
        assert s.save_area.next_slot >= EXTENTS
        s.unmark()
        source.landed.clear()
    source.cut_at = cut_at
    s.mark(export=True)
    # The twin ignores the saves' flushes, not the mark's.
    save.honour_flush = honour_flush
    at_mark = bytes(source.data)
    # Every thread writes every extent, in its own order: first writes to
    # one extent race with each other and with writes that follow them.
    plans = []
    for _ in range(4):
        plan = list(range(EXTENTS))
        rng.shuffle(plan)
        plans.append(plan)
    run_writers(lu, plans, GRAN)
    assert frozen_image(s) == at_mark
    s.close()
    save_bytes, source_bytes, landed = source.cut
    recovered = backends.MemoryBackend(SIZE)
    recovered.data[:] = source_bytes
    lu2, s2 = new_session(tmp_path, recovered, powerloss.PowerLossBackend(
        powerloss.SimFile(save_bytes)), marked=True)
    image = frozen_image(s2)
    wrong = [x for x in range(EXTENTS)
             if image[x * GRAN:(x + 1) * GRAN] !=
             at_mark[x * GRAN:(x + 1) * GRAN]]
    assert not wrong, "after the power cut the frozen image differs from " \
        "the mark's in extents {} ({} host writes had landed)".format(
            wrong, len(landed))
    s2.close()


@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("seed", range(3))
def test_frozen_image_survives_power_loss(tmp_path, seed, keep):
    check_power_cut(tmp_path, seed, keep)


@pytest.mark.parametrize("keep", [0.0, 0.5])
@pytest.mark.parametrize("seed", range(3))
def test_frozen_image_survives_power_loss_in_reused_slots(tmp_path, seed,
                                                          keep):
    """A save whose entry survives the cut and whose slot write does not
    finds the previous mark's data there, not zeroes: the crc drops it."""
    check_power_cut(tmp_path, seed, keep, reused=True)


@pytest.mark.parametrize("keep", [0.0, 0.5])
def test_frozen_image_power_loss_twin_protection_off(tmp_path, keep):
    """The save area's fdatasync ignored: the check above must catch it."""
    with pytest.raises(AssertionError, match="frozen image differs"):
        check_power_cut(tmp_path, 0, keep, honour_flush=False)


class FailingFlush(backends.MemoryBackend):
    """A save area whose next flush fails with EIO once armed."""

    armed = False

    def flush(self):
        if self.armed:
            self.armed = False
            raise OSError(5, "Input/output error (injected)")


def test_failed_flush_unmarks_and_the_next_mark_saves_again(tmp_path):
    """A failed fdatasync fails the saves it covered: the session unmarks
    with the error, the host write proceeds, and a later mark saves (and
    flushes) as before."""
    save = FailingFlush(SAVE_SIZE)
    source = backends.MemoryBackend(SIZE)
    source.data[:] = random.Random(2).randbytes(SIZE)
    lu, s = new_session(tmp_path, source, save)
    s.mark(export=True)
    save.armed = True
    lu.backend.write(b"x" * GRAN, 0)
    assert not save.armed
    assert not s.marked
    assert "Input/output error" in s.error
    assert bytes(source.data[:GRAN]) == b"x" * GRAN
    s.mark(export=True)
    at_mark = bytes(source.data)
    lu.backend.write(b"y" * GRAN, GRAN)
    assert s.marked and s.cofw_count == 1
    assert frozen_image(s) == at_mark


class Crash(BaseException):
    """A kill -9."""


def test_a_save_read_back_after_a_kill_is_made_durable_before_it_is_trusted(
        tmp_path, monkeypatch):
    """A kill -9 keeps the page cache: a save written but not yet flushed
    is read back by the restarted target.  Taken into the frozen image
    without being made durable, the next host write to the extent proceeds
    at once (nothing left to save), and a power cut then takes the save
    away: the frozen image reads the new data."""
    map_dir = str(tmp_path)
    disk = powerloss.SimFile(bytes(SAVE_SIZE))
    source = backends.MemoryBackend(SIZE)    # durable once written
    source.data[:] = random.Random(3).randbytes(SIZE)
    lu, s = new_session(map_dir, source, powerloss.PowerLossBackend(disk),
                        marked=False)
    s.mark(export=True)
    at_mark = bytes(source.data)

    # The target is killed while a first write to extent 2 waits for the
    # save area's flush: its save is written, not durable; the host write
    # never reached the Source.
    def killed(ticket):
        raise Crash()
    monkeypatch.setattr(s.save_area, "wait_durable", killed)
    try:
        lu.backend.write(b"x" * GRAN, 2 * GRAN)
    except Crash:
        pass
    assert bytes(source.data) == at_mark
    assert disk.pending, "the save was flushed: nothing to show"

    # Restarted on the same page cache; a host write to extent 2 is
    # acknowledged (and flushed: the Source keeps it).
    lu2, s2 = new_session(map_dir, source, powerloss.PowerLossBackend(disk),
                          marked=True)
    assert frozen_image(s2) == at_mark
    lu2.backend.write(b"y" * GRAN, 2 * GRAN)
    lu2.backend.flush()

    # Power cut: the save area loses what nobody flushed.
    disk.power_cut(random.Random(0), keep=0.0)
    lu3, s3 = new_session(map_dir, source, powerloss.PowerLossBackend(disk),
                          marked=True)
    image = frozen_image(s3)
    wrong = [x for x in range(EXTENTS)
             if image[x * GRAN:(x + 1) * GRAN] !=
             at_mark[x * GRAN:(x + 1) * GRAN]]
    assert not wrong, "the frozen image differs from the mark's in extents " \
        "{}: a save only the page cache held was trusted after a restart " \
        "and lost at the power cut".format(wrong)


class _CountingSave(backends.MemoryBackend):
    """A save area that counts the writes of its header (a new tag: a
    reset) beside its flushes (MemoryBackend.flushes)."""

    def __init__(self, size):
        super().__init__(size)
        self.headers = 0

    def write(self, buf, offset):
        if offset == 0:
            self.headers += 1
        super().write(buf, offset)


def test_a_mark_right_after_the_create_writes_the_header_once(tmp_path):
    """The create writes the save area's header (a new tag) durably; a
    mark with no save since (a secondary group's last consistent image is
    made so at every replay) finds no entry of that tag and writes
    nothing.  An unmark resets beside writes whose saves may still land
    under the old tag, so the mark after an unmark writes a new tag
    again, and the frozen image is the mark's."""
    source = backends.MemoryBackend(SIZE)
    source.data[:] = random.Random(2).randbytes(SIZE)
    save = _CountingSave(SAVE_SIZE)
    lu, s = new_session(tmp_path, source, save)
    assert (save.headers, save.flushes) == (1, 1)
    s.mark(export=True)
    assert (save.headers, save.flushes) == (1, 1)
    at_mark = bytes(source.data)
    lu.backend.write(b"\x07" * GRAN, 0)
    assert save.flushes == 2        # the first write's save
    assert frozen_image(s) == at_mark
    s.unmark()
    assert save.headers == 2
    s.mark(export=True)
    assert save.headers == 3
    lu.backend.write(b"\x08" * GRAN, GRAN)
    s.unmark()
    s.mark(export=True)
    assert save.headers == 5
    # Not the old data saved under the mark before.
    assert frozen_image(s) == bytes(source.data)
    s.close()


def test_a_mark_right_after_the_create_leaves_the_tracking_map_made(
        tmp_path, monkeypatch):
    """The create saves a zero tracking map and a clean activity map; a
    mark with no write since has nothing to commit there.  A mark after
    writes commits the zero map, which is what a restart finds."""
    source, save = sessionfakes.source_and_save_file(tmp_path, SIZE,
                                                     SAVE_SIZE)
    lu, s = new_session(tmp_path, source, save)
    commits = []
    commit = changemap.ChangeMap.commit

    def counted(self, change=None):
        commits.append(self.activity.path)
        return commit(self, change)
    monkeypatch.setattr(changemap.ChangeMap, "commit", counted)
    s.mark(export=True)
    assert commits == []
    lu.backend.write(b"\x07" * GRAN, 0)
    assert s.tracking.bits[0] == 1
    s.unmark()          # the tracked extent stays in the tracking map
    assert len(commits) == 1
    s.mark(export=True)
    assert len(commits) == 2 and s.tracking.bits.count(1) == 0
    s.close()
    lu2, s2 = new_session(tmp_path, source, backends.FileBackend(save.path),
                          marked=True)
    assert s2.tracking.bits.count(1) == 0
    s2.close()


class _SlowFlushSave(backends.MemoryBackend):
    """A save area whose next flush, once armed, lets a held writer go and
    waits for its entry to be written (a save landing while an unmark's
    reset is flushing the new tag).  entries: the entries' region
    (start, end)."""

    def __init__(self, size, entries, source):
        super().__init__(size)
        self.entries = entries
        self.source = source
        self.armed = False
        self.entry_written = threading.Event()

    def write(self, buf, offset):
        super().write(buf, offset)
        if self.entries[0] <= offset < self.entries[1]:
            self.entry_written.set()

    def flush(self):
        if self.armed:
            self.armed = False
            self.source.go.set()
            assert self.entry_written.wait(10)
        super().flush()


def test_a_save_landing_during_an_unmarks_reset_is_not_read_after_a_restart(
        tmp_path):
    """A first write whose save was claimed under a mark can store it
    while the unmark's reset writes a new tag (_store_old_data allows for
    it: the save area was reset meanwhile).  Its entry is then on disk
    after the reset: the next mark must not take it for one of its own
    (the next mark writes a new tag again), or a restart reads that entry
    as a save of the new mark and the frozen image holds the old mark's
    data of the extent."""
    source = GatedReads(SIZE)
    source.data[:] = random.Random(3).randbytes(SIZE)
    area = sessions.SaveArea(backends.MemoryBackend(SAVE_SIZE), EXTENTS,
                             GRAN)
    save = _SlowFlushSave(SAVE_SIZE, (area.HEADER_BYTES, area.HEADER_BYTES +
                                      area.entries_bytes), source)
    lu, s = new_session(tmp_path, source, save)
    s.mark(export=True)
    lu.backend.write(b"\x05" * GRAN, GRAN)      # a save: the index is used
    source.gate = True
    writer = threading.Thread(
        target=lu.backend.write, args=(b"\x07" * GRAN, 0))
    writer.start()
    assert source.reading.wait(10)      # its save claimed, not yet stored
    save.entry_written.clear()
    save.armed = True
    s.unmark()
    writer.join(10)
    assert not writer.is_alive()
    s.mark(export=True)
    at_mark = bytes(source.data)
    assert frozen_image(s) == at_mark
    s.close()
    lu2, s2 = new_session(tmp_path, source, save, marked=True)
    image = frozen_image(s2)
    s2.close()
    assert image[:GRAN] == at_mark[:GRAN], \
        "after a restart extent 0 of the frozen image is the old mark's " \
        "save (first bytes {!r}, the mark's {!r})".format(
            image[:4], at_mark[:4])
