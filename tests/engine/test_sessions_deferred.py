"""Deferred first writes (SessionLayer): a host write that must wait for a
copy on first write (or a tracking mark) to become durable is queued and
acknowledged at once; the layer's applier thread makes the saves durable,
one save-area flush for everything queued meanwhile, and only then writes
the Source.  The sessions' layer is set up through an I/O stack, as the
target does (iostack.IOStack), and writes enter at its top.

- test_one_writers_first_writes_share_save_area_flushes: 64 first writes
  one after another (one client, one request at a time) cost far fewer
  save-area fdatasyncs than writes.
- test_a_queued_write_is_seen_by_*: a read, an extents call, a flush and
  an overlapping write issued after a queued write see its data.
- test_a_failed_deferred_write_fails_every_later_flush.
- test_the_queue_drains_before_another_layer_is_linked and
  test_no_deferral_with_another_layer: clones, guard, replication.
- test_close_drains_and_leaves_no_thread, test_mark_waits_for_queued_writes.
- test_frozen_image_survives_power_loss_with_deferred_writes: the power is
  cut when the N-th write lands on the Source; the frozen image recovered
  from what was durable must be the mark's.  Its twin ignores the save
  area's fdatasync and must be caught.
- test_every_source_write_finds_its_save_durable: at every write that
  lands on the Source, the save area's durable bytes hold the old data of
  its extents; its twin too.
- test_a_failed_save_*, test_a_full_save_area_*: the mark ends, the
  deferred writes apply.
- What must wait for the queue: a session added, the layer taken out of
  the stack, prepare_stop (nbdkit may be killed next), a rollback right
  after the hosts left; an unexpected error in the applier fails its
  write and hangs nothing; a failed write shows in session status.
"""

import collections
import errno
import os
import random
import threading
import time

import pytest

from target import backends, errors, iostack, sessions

from tests.support import powerloss, sessionfakes
from tests.support.powerloss import SimSaveArea
from tests.support.sessionfakes import FakeLU, frozen_image, one_lu_target

GRAN = 4096
EXTENTS = 64
SIZE = GRAN * EXTENTS
SAVE_SIZE = sessions.SaveArea.minimum_size(EXTENTS, GRAN) - GRAN + SIZE
APPLIER = "session-writes"


class GatedSave(backends.MemoryBackend):
    """A save area whose flushes wait while `gate` is closed (cleared),
    but those of the threads in `exempt` (idents)."""

    def __init__(self, size):
        super().__init__(size)
        self.gate = threading.Event()
        self.gate.set()
        self.exempt = set()

    def flush(self):
        if threading.get_ident() not in self.exempt:
            assert self.gate.wait(10), "the gate was never opened"


def stacked_session(tmp_path, source, save, mark=True):
    """A session "s" on a sessions' layer in an I/O stack over source;
    returns (stack, session), marked (with its frozen export) if mark."""
    stack = iostack.IOStack(source)
    layer = sessions.SessionLayer()
    stack.set("sessions", layer)
    s = sessions.Session("s", FakeLU(stack.top, source.size), GRAN,
                         str(tmp_path), save, [])
    s.create()
    layer.add(s)
    if mark:
        s.mark(export=True)
    return stack, s


def returns(call, timeout=2.0):
    """Run call in a thread; (whether it returned within timeout, the
    thread, a list that gets its result or exception)."""
    out = []

    def run():
        try:
            out.append(call())
        except BaseException as e:   # reported by the caller
            out.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive(), t, out


def counting_slow_syncs(monkeypatch, fd):
    syncs = collections.Counter()
    real = os.fdatasync

    def fdatasync(f):
        if f == fd:
            syncs[f] += 1
            time.sleep(0.002)     # a disk's flush: writes arrive meanwhile
        real(f)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return syncs


def test_one_writers_first_writes_share_save_area_flushes(tmp_path,
                                                          monkeypatch):
    source, save = sessionfakes.source_and_save_file(tmp_path, SIZE,
                                                     SAVE_SIZE)
    stack, s = stacked_session(tmp_path, source, save)
    at_mark = bytes(source.data)
    expected = bytearray(at_mark)
    syncs = counting_slow_syncs(monkeypatch, save.fd)
    rng = random.Random(2)
    for x in range(EXTENTS):
        data = rng.randbytes(1024)
        offset = x * GRAN + rng.randrange(0, GRAN - 1024, 512)
        stack.top.write(data, offset)
        expected[offset:offset + len(data)] = data
    stack.top.flush()
    assert s.cofw_count == EXTENTS
    assert syncs[save.fd] <= EXTENTS // 4, \
        "{} save-area fdatasyncs for {} first writes one after another" \
        .format(syncs[save.fd], EXTENTS)
    assert bytes(source.data) == bytes(expected)
    assert frozen_image(s) == at_mark
    s.close()
    # What is on the save area's disk reads the same after a restart.
    lu2, s2 = sessionfakes.new_session(tmp_path, source,
                                       backends.FileBackend(save.path),
                                       granularity=GRAN, marked=True)
    assert frozen_image(s2) == at_mark
    s2.close()


@pytest.fixture
def gated(tmp_path):
    """A marked session whose save area's flushes wait for the test; the
    Source's first extent is a hole, the rest random; the gate is opened
    and the session closed at the end."""
    save = GatedSave(SAVE_SIZE)
    source = backends.MemoryBackend(SIZE)
    source.data[GRAN:] = random.Random(3).randbytes(SIZE - GRAN)
    stack, s = stacked_session(tmp_path, source, save)
    yield stack, s, source, save
    save.gate.set()
    s.close()


def queue_a_write(stack, save, data, offset):
    """With the save area's flush held, a first write is acknowledged
    before its save is durable (its Source write queued)."""
    save.gate.clear()
    done, _, out = returns(lambda: stack.top.write(data, offset))
    assert done, "the write waited for the save area's flush"
    assert out == [None], out


def test_a_queued_write_is_seen_by_reads(gated):
    stack, s, source, save = gated
    queue_a_write(stack, save, b"a" * 1024, 0)
    assert bytes(source.data[:1024]) == bytes(1024)
    # A read elsewhere does not wait.
    buf = bytearray(GRAN)
    done, _, _ = returns(lambda: stack.top.readinto(buf, 4 * GRAN))
    assert done and bytes(buf) == bytes(source.data[4 * GRAN:5 * GRAN])
    # One of the queued write's bytes: it waits for it.
    buf = bytearray(512)
    done, t, out = returns(lambda: stack.top.readinto(buf, 512), 0.3)
    assert not done, "a read overlapping a queued write did not wait"
    save.gate.set()
    t.join(5)
    assert out == [None] and bytes(buf) == b"a" * 512


def test_a_queued_write_is_seen_by_extents(gated):
    stack, s, source, save = gated
    assert stack.top.extents(0, GRAN)[0][2], "extent 0 is not a hole"
    queue_a_write(stack, save, b"a" * 1024, 0)
    done, t, out = returns(lambda: stack.top.extents(0, GRAN), 0.3)
    assert not done, "extents of a queued write did not wait"
    save.gate.set()
    t.join(5)
    assert not out[0][0][2], out


def test_a_queued_write_is_seen_by_a_flush(gated):
    stack, s, source, save = gated
    queue_a_write(stack, save, b"a" * 1024, 0)
    done, t, out = returns(stack.top.flush, 0.3)
    assert not done, "a flush returned before a queued write was applied"
    save.gate.set()
    t.join(5)
    assert out == [None]
    assert bytes(source.data[:1024]) == b"a" * 1024
    assert s.writes_in_flight == 0


def test_a_queued_write_is_seen_by_overlapping_writes(gated):
    stack, s, source, save = gated
    queue_a_write(stack, save, b"a" * 1024, 0)
    # Later writes over its bytes, and a zero: each lands after it.
    done, t, _ = returns(lambda: stack.top.write(b"b" * 512, 512), 0.3)
    done2, t2, _ = returns(lambda: stack.top.zero(768, 128), 0.3)
    save.gate.set()
    t.join(5)
    t2.join(5)
    stack.top.flush()
    assert bytes(source.data[:1024]) == b"a" * 512 + b"b" * 256 + \
        bytes(128) + b"b" * 128
    assert frozen_image(s)[:GRAN] == bytes(GRAN)


class FailingWrites(backends.MemoryBackend):
    armed = False

    def write(self, buf, offset):
        if self.armed:
            raise OSError(errno.EIO, "Input/output error (injected)")
        super().write(buf, offset)


def _a_deferred_write_that_fails(tmp_path):
    """A first write acknowledged once queued, whose Source write then
    fails (EIO); (source, stack, session)."""
    source = FailingWrites(SIZE)
    stack, s = stacked_session(tmp_path, source, GatedSave(SAVE_SIZE))
    s.save_area.backend.gate.clear()
    source.armed = True
    done, _, out = returns(lambda: stack.top.write(b"a" * 1024, GRAN))
    assert done and out == [None], out
    s.save_area.backend.gate.set()
    return source, stack, s


def test_a_failed_deferred_write_fails_every_later_flush(tmp_path):
    source, stack, s = _a_deferred_write_that_fails(tmp_path)
    for _ in range(3):
        with pytest.raises(errors.Error) as e:
            stack.top.flush()
        assert e.value.errno == errno.EIO
        assert "could not be applied" in str(e.value)
    source.armed = False
    assert bytes(source.data[GRAN:GRAN + 1024]) == bytes(1024)
    # Later writes still land; flushes go on failing.
    stack.top.write(b"b" * 1024, 2 * GRAN)
    with pytest.raises(errors.Error):
        stack.top.flush()
    assert bytes(source.data[2 * GRAN:2 * GRAN + 1024]) == b"b" * 1024
    assert s.writes_in_flight == 0
    s.close()


class Recorder(iostack.Layer):
    """A pass-through layer that records the Source's first KiB when it is
    linked."""

    def __init__(self, source):
        self.source = source
        self.seen = None

    def link(self, inner):
        self.inner = inner
        if self.seen is None:
            self.seen = bytes(self.source.data[:1024])


def test_the_queue_drains_before_another_layer_is_linked(gated):
    stack, s, source, save = gated
    queue_a_write(stack, save, b"a" * 1024, 0)
    layer = Recorder(source)
    done, t, out = returns(lambda: stack.set("clones", layer), 0.3)
    assert not done, "the clones layer was linked with a write queued"
    save.gate.set()
    t.join(5)
    assert out == [None]
    assert layer.seen == b"a" * 1024, \
        "the clones layer was linked before the queued write was applied"
    # From then on a write waits for its save in its own thread.
    save.gate.clear()
    done, t, _ = returns(lambda: stack.top.write(b"b" * 1024, 2 * GRAN), 0.3)
    assert not done, "a write was deferred under a clones layer"
    save.gate.set()
    t.join(5)
    assert bytes(source.data[2 * GRAN:2 * GRAN + 1024]) == b"b" * 1024
    # Without it again, writes are deferred again.
    stack.remove("clones", layer)
    queue_a_write(stack, save, b"c" * 1024, 3 * GRAN)
    save.gate.set()
    stack.top.flush()
    assert bytes(source.data[3 * GRAN:3 * GRAN + 1024]) == b"c" * 1024


@pytest.mark.parametrize("slot", ["guard", "clones", "replication"])
def test_no_deferral_with_another_layer(tmp_path, slot):
    source = backends.MemoryBackend(SIZE)
    stack, s = stacked_session(tmp_path, source, GatedSave(SAVE_SIZE),
                               mark=False)
    stack.set(slot, iostack.Layer())
    s.mark(export=True)
    save = s.save_area.backend
    save.gate.clear()
    done, t, _ = returns(lambda: stack.top.write(b"a" * 1024, 0), 0.3)
    assert not done, "a write was acknowledged before its save was durable " \
        "with a {} layer".format(slot)
    save.gate.set()
    t.join(5)
    assert bytes(source.data[:1024]) == b"a" * 1024
    s.close()


def test_mark_waits_for_queued_writes(gated):
    stack, s, source, save = gated
    queue_a_write(stack, save, b"a" * 1024, 0)
    assert s.writes_in_flight == 1

    def remark():
        save.exempt.add(threading.get_ident())
        s.unmark()
        s.mark(export=True)
    done, t, out = returns(remark, 0.3)
    assert not done, "a mark began with a write queued"
    save.gate.set()
    t.join(5)
    assert out == [None]
    # The queued write is part of the new point in time.
    assert frozen_image(s)[:1024] == b"a" * 1024


def test_close_drains_and_leaves_no_thread(gated):
    stack, s, source, save = gated
    queue_a_write(stack, save, b"a" * 1024, 0)
    assert any(t.name == APPLIER for t in threading.enumerate())
    threading.Timer(0.2, save.gate.set).start()
    s.close()
    assert bytes(source.data[:1024]) == b"a" * 1024
    assert not any(t.name == APPLIER for t in threading.enumerate())


def test_queued_writes_are_bounded(gated, monkeypatch):
    stack, s, source, save = gated
    layer = stack.get("sessions")
    monkeypatch.setattr(layer, "MAX_QUEUED", 4)
    save.gate.clear()
    for x in range(4):
        done, _, _ = returns(lambda: stack.top.write(b"a" * 512, x * GRAN))
        assert done
    done, t, _ = returns(lambda: stack.top.write(b"a" * 512, 5 * GRAN), 0.3)
    assert not done, "a fifth write was queued beyond the bound"
    save.gate.set()
    t.join(5)
    stack.top.flush()
    assert bytes(source.data[5 * GRAN:5 * GRAN + 512]) == b"a" * 512



def check_power_cut(tmp_path, seed, keep, honour_flush=True):
    rng = random.Random(seed)
    lock = threading.Lock()
    save = SimSaveArea(powerloss.SimFile(bytes(SAVE_SIZE)), lock)
    source = sessionfakes.SaveCutSource(SIZE, GRAN, lock, save,
                                         rng.randrange(4, EXTENTS), rng,
                                         keep)
    source.data[:] = rng.randbytes(SIZE)
    stack, s = stacked_session(tmp_path, source, save)
    # The twin ignores the saves' flushes, not the mark's.
    save.honour_flush = honour_flush
    at_mark = bytes(source.data)
    order = list(range(EXTENTS))
    rng.shuffle(order)
    for x in order:
        stack.top.write(rng.randbytes(1024), x * GRAN +
                        rng.randrange(0, GRAN - 1024, 512))
    stack.top.flush()
    assert frozen_image(s) == at_mark
    s.close()
    save_bytes, source_bytes, _ = source.cut
    recovered = backends.MemoryBackend(SIZE)
    recovered.data[:] = source_bytes
    lu2, s2 = sessionfakes.new_session(
        tmp_path, recovered, powerloss.PowerLossBackend(
            powerloss.SimFile(save_bytes)), granularity=GRAN, marked=True)
    image = frozen_image(s2)
    wrong = [x for x in range(EXTENTS)
             if image[x * GRAN:(x + 1) * GRAN] !=
             at_mark[x * GRAN:(x + 1) * GRAN]]
    s2.close()
    assert not wrong, "after the power cut the frozen image differs from " \
        "the mark's in extents {}".format(wrong)


@pytest.mark.parametrize("keep", [0.0, 0.5])
@pytest.mark.parametrize("seed", range(3))
def test_frozen_image_survives_power_loss_with_deferred_writes(tmp_path,
                                                               seed, keep):
    check_power_cut(tmp_path, seed, keep)


@pytest.mark.parametrize("keep", [0.0, 0.5])
def test_frozen_image_power_loss_twin_protection_off(tmp_path, keep):
    """The save area's fdatasync ignored: the check above must catch it."""
    with pytest.raises(AssertionError, match="frozen image differs"):
        check_power_cut(tmp_path, 0, keep, honour_flush=False)


class FailingFlush(backends.MemoryBackend):
    """A save area whose flushes fail with EIO once armed."""

    armed = False

    def flush(self):
        if self.armed:
            raise OSError(errno.EIO, "Input/output error (injected)")


def test_a_failed_save_ends_the_mark_and_the_deferred_write_applies(
        tmp_path):
    save = FailingFlush(SAVE_SIZE)
    source = backends.MemoryBackend(SIZE)
    source.data[:] = random.Random(4).randbytes(SIZE)
    stack, s = stacked_session(tmp_path, source, save)
    save.armed = True
    stack.top.write(b"x" * GRAN, 0)
    stack.top.flush()
    assert not s.marked
    assert "Input/output error" in s.error
    assert bytes(source.data[:GRAN]) == b"x" * GRAN
    save.armed = False
    s.mark(export=True)
    at_mark = bytes(source.data)
    stack.top.write(b"y" * GRAN, GRAN)
    stack.top.flush()
    assert s.marked and s.cofw_count == 1
    assert frozen_image(s) == at_mark
    s.close()


def test_a_full_save_area_ends_the_mark_and_the_deferred_writes_apply(
        tmp_path):
    index = sessions.SaveArea.minimum_size(EXTENTS, GRAN) - GRAN
    source = backends.MemoryBackend(SIZE)
    source.data[:] = random.Random(5).randbytes(SIZE)
    stack, s = stacked_session(tmp_path, source,
                               backends.MemoryBackend(index + 2 * GRAN))
    for x in range(4):
        stack.top.write(bytes([x + 1]) * 512, x * GRAN)
    stack.top.flush()
    assert not s.marked
    assert "full" in s.error
    for x in range(4):
        assert bytes(source.data[x * GRAN:x * GRAN + 512]) == \
            bytes([x + 1]) * 512
    # Nothing is lost from the next transfer.
    assert all(s.tracking.bits[x] for x in range(4))
    s.close()



def check_every_write(tmp_path, seed, honour_flush=True):
    rng = random.Random(seed)
    lock = threading.Lock()
    save = SimSaveArea(powerloss.SimFile(bytes(SAVE_SIZE)), lock)
    source = sessionfakes.CheckedSource(SIZE, GRAN, lock, save)
    source.data[:] = rng.randbytes(SIZE)
    stack, s = stacked_session(tmp_path, source, save)
    save.honour_flush = honour_flush
    source.at_mark = at_mark = bytes(source.data)
    for x in rng.sample(range(EXTENTS), EXTENTS):
        stack.top.write(rng.randbytes(1024), x * GRAN +
                        rng.randrange(0, GRAN - 1024, 512))
    stack.top.flush()
    assert frozen_image(s) == at_mark
    s.close()
    assert not source.early, "extents {} were written on the Source " \
        "before their saves were durable".format(sorted(source.early))


@pytest.mark.parametrize("seed", range(3))
def test_every_source_write_finds_its_save_durable(tmp_path, seed):
    check_every_write(tmp_path, seed)


def test_every_source_write_twin_protection_off(tmp_path):
    """The save area's fdatasync ignored: the check above must catch it."""
    with pytest.raises(AssertionError, match="before their saves were"):
        check_every_write(tmp_path, 0, honour_flush=False)


def test_a_session_added_with_writes_queued_sees_them_applied_first(
        gated, tmp_path):
    """A write acknowledged before a session exists is part of every point
    in time the session marks: the new session's frozen image of the
    extent never changes after its mark, and no Source change escapes
    both its saves and its tracking."""
    stack, s, source, save = gated
    queue_a_write(stack, save, b"a" * 1024, 4 * GRAN)
    layer = stack.get("sessions")
    s2 = sessions.Session("s2", FakeLU(stack.top, SIZE), GRAN,
                          str(tmp_path), backends.MemoryBackend(SAVE_SIZE),
                          [])
    s2.create()
    threading.Timer(0.3, save.gate.set).start()
    done, _, out = returns(lambda: layer.add(s2), 5)
    assert done and out == [None], out
    s2.mark(export=True)
    image = frozen_image(s2)
    stack.top.flush()
    assert frozen_image(s2) == image, \
        "the new session's frozen image changed after its mark"
    assert image[4 * GRAN:4 * GRAN + 1024] == b"a" * 1024
    s2.close()


def test_taking_the_layer_out_applies_its_queue_before_the_relink(gated):
    """The layer leaves the stack (its last session deleted): a write
    acknowledged before must not land after a later write to its bytes,
    nor be missing from a read."""
    stack, s, source, save = gated
    queue_a_write(stack, save, b"a" * 1024, 0)
    layer = stack.get("sessions")
    threading.Timer(0.3, save.gate.set).start()
    done, _, out = returns(lambda: stack.remove("sessions", layer), 5)
    assert done and out == [None], out
    buf = bytearray(1024)
    stack.top.readinto(buf, 0)
    assert bytes(buf) == b"a" * 1024, \
        "a read after the relink misses a write acknowledged before it"
    stack.top.write(b"b" * 1024, 0)
    layer.close()
    assert bytes(source.data[:1024]) == b"b" * 1024, \
        "a queued write landed over a later write to its bytes"


def test_an_unexpected_error_in_the_applier_hangs_no_flush(gated,
                                                           monkeypatch):
    stack, s, source, save = gated

    def broken(slots, generation):
        raise RuntimeError("a bug in the copy")
    monkeypatch.setattr(s, "_store_old_data", broken)
    queue_a_write(stack, save, b"a" * 1024, 0)
    save.gate.set()
    done, _, out = returns(stack.top.flush, 5)
    assert done, "a flush hangs after an error in the applier"
    assert isinstance(out[0], errors.Error) and out[0].errno == errno.EIO, out
    done, _, out = returns(lambda: stack.top.readinto(bytearray(512), 0), 5)
    assert done, "a read of the failed write's bytes hangs"
    assert s.writes_in_flight == 0 and not s.saving


def gate_flushes(save_area):
    """Hold save_area's flushes until the returned event is set."""
    gate = threading.Event()
    real_flush = save_area.backend.flush

    def gated_flush():
        assert gate.wait(10), "the gate was never opened"
        real_flush()
    save_area.backend.flush = gated_flush
    return gate


def test_prepare_stop_leaves_no_acknowledged_write_off_the_source(tmp_path):
    """`clonectl stop` asks the target to prepare (prepare_stop), then
    SIGKILLs nbdkit if a client stays connected: every write acknowledged
    by then must be on the Source (its page cache), and later writes not
    acknowledged before they are, as without sessions."""
    t, path = one_lu_target(tmp_path, SIZE)
    gate = threading.Event()
    try:
        lu = t.lus["src"]
        s = t.session_ops.create_session(
            lu, "s", [{"uri": "nbd://127.0.0.1:1/none", "peer": None}],
            "4K", None)
        t.session_ops.session_mark("s", export=True)
        gate = gate_flushes(s.save_area)
        done, _, out = returns(lambda: lu.write(b"a" * 4096, 0))
        assert done and out == [None], "the write was not deferred"
        threading.Timer(0.3, gate.set).start()
        t.prepare_stop()
        with open(path, "rb") as f:
            assert f.read(4096) == b"a" * 4096, \
                "an acknowledged write is still queued after prepare_stop"
        gate.clear()
        done, th, _ = returns(lambda: lu.write(b"b" * 4096, GRAN), 0.3)
        assert not done, "a write was deferred after prepare_stop"
        gate.set()
        th.join(5)
    finally:
        gate.set()
        t.close()


def test_a_rollback_right_after_the_hosts_left_puts_back_their_queued_writes(
        tmp_path):
    """`lu rollback` once the last host disconnected: a write it had
    acknowledged may still be queued (its save not yet in the protected
    image); the rollback must put that extent back too."""
    t, path = one_lu_target(tmp_path, SIZE)
    gate = threading.Event()
    try:
        lu = t.lus["src"]
        lu.write(b"o" * GRAN, 0)
        t.session_ops.image_protect("src")
        gate = gate_flushes(t.session_ops._image("src").save_area)
        done, _, out = returns(lambda: lu.write(b"n" * GRAN, 0))
        assert done and out == [None], "the write was not deferred"
        threading.Timer(0.3, gate.set).start()
        t.session_ops.image_rollback("src")
        with open(path, "rb") as f:
            assert f.read(GRAN) == b"o" * GRAN, \
                "the rollback left a write made after the image"
    finally:
        gate.set()
        t.close()


def test_a_failed_deferred_write_is_shown_in_session_status(tmp_path):
    """A client that never flushes learns nothing from the failed write:
    the LU's sessions say so, and the next write and read still work."""
    source, stack, s = _a_deferred_write_that_fails(tmp_path)
    stack.get("sessions").drain()
    source.armed = False
    problems = s.status()["problems"]
    assert any("could not be applied" in p and str(GRAN) in p
               for p in problems), problems
    stack.top.write(b"b" * 512, 0)
    buf = bytearray(512)
    stack.top.readinto(buf, 0)
    assert bytes(buf) == b"b" * 512
    s.close()
