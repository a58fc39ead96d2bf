"""Copy on first write ahead of a window of writes (SessionLayer.save_ahead,
Session.save_ahead): the old data of every extent the writes will change
is saved, and made durable with one flush of the save area and one of the
activity map, before any of them is written; the writes then find their
extents saved and wait for nothing.

- test_a_window_is_saved_with_one_flush: fdatasyncs counted by file.
- test_save_ahead_skips_what_is_saved_and_what_a_write_saves: extents
  saved already, or outside the transfer map, are not saved again.
- test_window_survives_power_loss: windows of extents saved ahead, then
  written by racing threads; at the moment each write lands on the
  Source, the save area's durable bytes alone must give back that
  extent's data at the mark.  Its twin skips the wait for the flush (the
  protection off) and must be caught.
"""

import collections
import functools
import os
import random
import threading

import pytest

from target import backends, changemap, sessions

from tests.support import powerloss, sessionfakes
from tests.support.powerloss import SimSaveArea
from tests.support.sessionfakes import frozen_image, run_writers

GRAN = 4096
EXTENTS = 64
SIZE = GRAN * EXTENTS
SAVE_SIZE = sessions.SaveArea.minimum_size(EXTENTS, GRAN) - GRAN + SIZE

new_session = functools.partial(sessionfakes.new_session, granularity=GRAN)


def counting_syncs(monkeypatch, fds):
    syncs = collections.Counter()
    real = os.fdatasync

    def fdatasync(fd):
        if fd in fds:
            syncs[fd] += 1
        real(fd)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return syncs


def test_a_window_is_saved_with_one_flush(tmp_path, monkeypatch):
    # Every extent its own activity region: each is a cold region.
    monkeypatch.setattr(changemap, "REGION", GRAN)
    lu, s, source, save, at_mark = sessionfakes.marked_on_save_file(
        tmp_path, SIZE, SAVE_SIZE, GRAN)
    activity_fd = s.tracking.changes.activity.file.fd
    syncs = counting_syncs(monkeypatch, (save.fd, activity_fd))
    window = list(range(0, EXTENTS, 2))
    lu.backend.save_ahead([(x * GRAN, GRAN) for x in window])
    assert syncs[save.fd] == 1, syncs
    assert syncs[activity_fd] == 1, syncs
    assert s.cofw_count == len(window)
    # The writes of the window then flush nothing.
    run_writers(lu, [window[i::8] for i in range(8)], GRAN)
    assert syncs[save.fd] == 1 and syncs[activity_fd] == 1, syncs
    assert s.cofw_count == len(window)
    assert frozen_image(s) == at_mark
    assert bytes(source.data) != at_mark
    assert all(s.tracking.bits[x] for x in window)
    assert s.tracking.changes.activity.load()[0] == 1
    s.close()
    # What is on the save area's disk reads the same after a restart.
    lu2, s2 = new_session(tmp_path, source, backends.FileBackend(save.path),
                          marked=True)
    assert frozen_image(s2) == at_mark
    s2.close()


def test_save_ahead_skips_what_is_saved_and_what_a_write_saves(tmp_path):
    source = backends.MemoryBackend(SIZE)
    source.data[:] = random.Random(3).randbytes(SIZE)
    lu, s = new_session(tmp_path, source, backends.MemoryBackend(SAVE_SIZE))
    s.mark(export=True)
    at_mark = bytes(source.data)
    lu.backend.write(b"a" * GRAN, 0)            # extent 0: saved by a COFW
    assert s.cofw_count == 1
    # Ranges over extents 0-2 (partly), twice: extents 1 and 2 once each.
    lu.backend.save_ahead([(GRAN // 2, 2 * GRAN), (GRAN, 10)])
    assert s.cofw_count == 3
    assert sorted(s.save_area.slots) == [0, 1, 2]
    lu.backend.save_ahead([(0, 3 * GRAN)])
    assert s.cofw_count == 3
    lu.backend.write(b"b" * 3 * GRAN, 0)
    assert s.cofw_count == 3
    assert frozen_image(s) == at_mark
    s.unmark()
    # Unmarked: tracked, nothing saved.
    lu.backend.save_ahead([(5 * GRAN, GRAN)])
    assert s.tracking.bits[5] == 1
    assert not s.save_area.slots
    s.close()



def check_windows(tmp_path, seed, window=16):
    rng = random.Random(seed)
    lock = threading.Lock()
    save = SimSaveArea(powerloss.SimFile(bytes(SAVE_SIZE)), lock)
    source = sessionfakes.CheckedSource(SIZE, GRAN, lock, save)
    source.data[:] = rng.randbytes(SIZE)
    lu, s = new_session(tmp_path, source, save)
    s.mark(export=True)
    source.at_mark = at_mark = bytes(source.data)
    order = list(range(EXTENTS))
    rng.shuffle(order)
    for i in range(0, EXTENTS, window):
        part = order[i:i + window]
        lu.backend.save_ahead([(x * GRAN, GRAN) for x in part])
        run_writers(lu, [part[j::4] for j in range(4)], GRAN)
    assert frozen_image(s) == at_mark
    s.close()
    assert not source.early, "extents {} were written on the Source " \
        "before their old data was durable in the save area".format(
            sorted(source.early))


@pytest.mark.parametrize("seed", range(3))
def test_window_survives_power_loss(tmp_path, seed):
    check_windows(tmp_path, seed)


def test_window_power_loss_twin_protection_off(tmp_path, monkeypatch):
    """The wait for the window's flush skipped: the check above must catch
    it."""
    monkeypatch.setattr(sessions.SaveArea, "wait_durable",
                        lambda self, ticket: None)
    with pytest.raises(AssertionError, match="before their old data"):
        check_windows(tmp_path, 0)
