"""Protected restore scenarios on memory backends: copies on demand, the
shared activity map and the PRM across a crash, writes to the restoring
clone; each protection with a twin that switches it off and shows the
check failing."""

import threading
import time

import pytest

from target import clones, errors

from tests.support.clonegroup import EXTENTS, GRAN, Harness, hold_write, \
    restore_losing_its_prm


def _fractured_pair(h):
    """c1 and c2 synchronized, then fractured: all maps clean."""
    h.lu.write(bytes(range(256)) * (EXTENTS * GRAN // 256), 0)
    h.sync("c1")
    h.group.fracture("c1")
    h.sync("c2")
    h.group.fracture("c2")
    h.group.commit()


def _make_clone_differ(h, name, extents, fill=b"C"):
    for e in extents:
        h.group.clones[name].export.write(fill * GRAN, e * GRAN)


def _bits(m):
    return [e for e, b in enumerate(m) if b]


@pytest.fixture
def h(tmp_path):
    return Harness(tmp_path)


def test_writes_wait_only_for_their_own_copies_on_demand(h):
    """Write 1 (extent 0) needs no COD; writes 2 and 3 (extents 4 and 7)
    wait on the COD queue while extents 4 and 7 are copied; afterwards
    bits 4 and 7 are clear in the Delta Map and 0, 4, 7 set in the PRM."""
    _fractured_pair(h)
    _make_clone_differ(h, "c1", [4, 7, 9])
    clone_before = bytes(h.mem["c1"].data)
    h.group.start_restore("c1", run=False)
    c1 = h.group.clones["c1"]
    assert _bits(c1.delta) == [4, 7, 9]
    h.lu.write(b"1" * 512, 0 * GRAN)
    assert h.group.cod.requests == 0
    h.lu.write(b"2" * 512, 4 * GRAN + 100)
    h.lu.write(b"3" * 512, 7 * GRAN + 200)
    assert h.group.cod.requests == 2 and h.group.cod.extents == 2
    assert _bits(c1.delta) == [9]
    assert _bits(h.group.prm) == [0, 4, 7]
    # Extents 4 and 7: the clone's data with the host writes on top.
    ext4 = h.extent(h.mem_src, 4)
    assert ext4[:100] == b"C" * 100 and ext4[100:612] == b"2" * 512
    assert bytes(h.mem["c1"].data) == clone_before


@pytest.mark.parametrize("protected", [True, False])
def test_shared_map_and_recovery_keep_a_host_write(h, protected,
                                                  monkeypatch):
    """During the restore of c1, a host write touching
    extents 6 and 7 (c1's bit 6 clear, bit 7 set) copies 7 on demand, sets
    PRM 6-7 and c2's Delta Map 6-7.  After a crash the shared
    persistent map sets c1's bits 6-7 again; the PRM keeps the engine from
    copying them over the (flushed) host write."""
    _fractured_pair(h)
    _make_clone_differ(h, "c1", [7, 10])
    h.group.start_restore("c1", run=False)
    c1, c2 = h.group.clones["c1"], h.group.clones["c2"]
    assert c1.delta[6] == 0 and c1.delta[7] == 1
    if not protected:
        monkeypatch.setattr(clones.CloneGroup, "_persist_prm",
                            lambda self: None)
    write = b"W" * (GRAN + 1000)
    h.lu.write(write, 6 * GRAN + 500)
    h.lu.flush()
    assert h.group.cod.extents == 1                  # extent 7 only
    assert _bits(h.group.prm) == [6, 7]
    assert c2.delta[6] == 1 and c2.delta[7] == 1
    h.crash()
    c1 = h.group.clones["c1"]
    assert c1.state == clones.RESTORING
    assert c1.delta[6] == 1 and c1.delta[7] == 1     # set again on recovery
    h.group.resume(run=False)
    h.run(h.group.engine)
    got = bytes(h.mem_src.data[6 * GRAN + 500:6 * GRAN + 500 + len(write)])
    assert (got == write) == protected, \
        "a flushed host write was overwritten by the resumed restore"
    if protected:
        assert _bits(h.group.clones["c1"].delta) == [6, 7]  # PRM -> Delta


@pytest.mark.parametrize("protected", [True, False])
def test_write_to_restoring_clone_restores_the_extent_first(h, protected,
                                                           monkeypatch):
    """A write to the mirror during a restore first copies that
    track to the Source, so the Source still gets the point-in-time data."""
    _fractured_pair(h)
    _make_clone_differ(h, "c1", [3], fill=b"P")
    h.group.start_restore("c1", run=False)
    if not protected:
        real = clones.CloneGroup.copy_on_demand

        def skip_for_clone_writes(self, e0, e1):
            import inspect
            if inspect.stack()[1].function == "clone_write":
                return
            real(self, e0, e1)
        monkeypatch.setattr(clones.CloneGroup, "copy_on_demand",
                            skip_for_clone_writes)
        # And the write's own look at the extent before it registers.
        monkeypatch.setattr(clones.CloneGroup, "_restore_pending",
                            lambda self, clone, e0, e1: False)
    h.group.clones["c1"].export.write(b"N" * 100, 3 * GRAN)
    h.run(h.group.engine)
    assert (h.extent(h.mem_src, 3) == b"P" * GRAN) == protected
    assert h.group.clones["c1"].delta[3] == 1


def test_cod_queue_waits_only_for_its_own_extents(h):
    """A request waiting for an extent another request is copying proceeds
    as soon as that extent is done; nothing is copied twice."""
    _fractured_pair(h)
    _make_clone_differ(h, "c1", [2, 5])
    h.group.start_restore("c1", run=False)
    in_copy, release = threading.Event(), threading.Event()

    def pause(engine, s, e):
        h.group.copy_hook = None
        in_copy.set()
        release.wait(10)

    h.group.copy_hook = pause
    first = threading.Thread(target=h.lu.read, args=(bytearray(GRAN), 2 * GRAN))
    first.start()
    assert in_copy.wait(5)
    # Extent 5 is not being copied: a request for it is not held up.
    other = threading.Event()
    threading.Thread(target=lambda: (h.lu.read(bytearray(GRAN), 5 * GRAN),
                                     other.set())).start()
    assert other.wait(5), "a request waited for an extent it does not touch"
    # Extent 2 is: a second request for it waits in the COD queue.
    second_done = threading.Event()
    second = threading.Thread(target=lambda: (
        h.lu.read(bytearray(GRAN), 2 * GRAN), second_done.set()))
    second.start()
    assert not second_done.wait(0.3)
    assert h.group.cod.queued == 2
    release.set()
    first.join(5)
    second.join(5)
    assert second_done.is_set()
    assert h.group.cod.extents == 2        # extents 2 and 5, once each
    assert h.extent(h.mem_src, 2) == b"C" * GRAN


def test_restore_refusals_change_nothing(h):
    _fractured_pair(h)
    with pytest.raises(clones.InvalidTransition):
        h.group.clones["c2"].state = clones.OUT_OF_SYNC
        h.group.start_restore("c2", run=False)
    h.group.clones["c2"].state = clones.FRACTURED
    h.group.start_restore("c1", run=False)
    with pytest.raises(clones.GroupBusy):
        h.group.start_restore("c2", run=False)
    with pytest.raises(clones.InvalidTransition):
        h.group.remove_clone("c1")
    assert h.group.clones["c2"].state == clones.FRACTURED
    assert h.group.clones["c1"].state == clones.RESTORING


def test_full_restore_copies_every_extent_and_clone_is_untouched(h):
    _fractured_pair(h)
    h.lu.write(b"Z" * (EXTENTS * GRAN), 0)        # Source diverges entirely
    clone_before = bytes(h.mem["c1"].data)
    h.group.clones["c1"].delta[:] = bytes(EXTENTS)  # pretend nothing differs
    h.run(h.group.start_restore("c1", full=True, run=False))
    assert bytes(h.mem_src.data) == clone_before
    assert bytes(h.mem["c1"].data) == clone_before
    assert h.group.clones["c1"].state == clones.FRACTURED


def test_throttled_restore_does_not_hold_host_io(tmp_path):
    """A restore at a low --rate waits between chunks with the extents it
    copied released: a host read of them is not held for the wait."""
    h = Harness(tmp_path)
    _fractured_pair(h)
    _make_clone_differ(h, "c1", [0, 1, 2, 3])
    # 4 extents of 4 KiB at 8 KiB/s: the first step is ~2 s ahead.
    engine = h.group.start_restore("c1", rate=8192, run=False)
    stepping = threading.Thread(target=engine.step)
    stepping.start()
    try:
        time.sleep(0.3)                     # copied, now waiting out the rate
        started = time.monotonic()
        h.lu.read(bytearray(512), 0)        # extent 0, copied already
        waited = time.monotonic() - started
    finally:
        engine.stop(None)
        stepping.join()
    assert waited < 0.5, "a host read waited {:.2f} s".format(waited)


def test_a_clone_write_waiting_for_the_restores_switch_copies_first(h):
    """A write to the clone's export that arrives while the restore's
    switch waits for a Source write in flight: it saw no restore, waits
    for the switch, and must then copy its extents on demand before it
    protects them in the PRM (as a Source write does), or the Source
    never gets the clone's point-in-time data there."""
    _fractured_pair(h)
    _make_clone_differ(h, "c1", [3], fill=b"P")
    old = h.extent(h.mem_src, 3)
    entered, gate = hold_write(h.mem_src, 10 * GRAN)
    writer = threading.Thread(target=h.lu.write,
                              args=(b"W" * GRAN, 10 * GRAN))
    writer.start()
    assert entered.wait(5)
    engines = []
    restorer = threading.Thread(target=lambda: engines.append(
        h.group.start_restore("c1", run=False)))
    restorer.start()
    deadline = time.monotonic() + 5
    while not h.group.quiesce and time.monotonic() < deadline:
        time.sleep(0.01)
    assert h.group.quiesce, "the switch did not wait for the write"
    clone_writer = threading.Thread(
        target=h.group.clones["c1"].export.write, args=(b"N" * 100, 3 * GRAN))
    clone_writer.start()
    while not h.group.overlap_waiters and time.monotonic() < deadline:
        time.sleep(0.01)
    assert h.group.overlap_waiters, "the clone write did not wait"
    gate.set()
    for t in (writer, restorer, clone_writer):
        t.join(10)
    h.run(engines[0])
    got = h.extent(h.mem_src, 3)
    assert got != old, "the Source kept its old data where the clone " \
        "was written during the restore's switch"
    assert got in (b"P" * GRAN, b"N" * 100 + b"P" * (GRAN - 100))


def test_a_restore_whose_prm_was_lost_is_not_reported_complete(h):
    """The restore's record of the extents hosts wrote (PRM) is lost in a
    crash: the restore pauses, and resuming it must not copy nothing and
    call the Source restored.  It is refused, naming --full; a full
    restore then copies every extent (overwriting what hosts wrote since
    the restore began, as the admin chose)."""
    restore_losing_its_prm(h)
    c1 = h.group.clones["c1"]
    assert c1.state == clones.RESTORING and c1.paused
    with pytest.raises(errors.InvalidArgument, match="--full"):
        h.group.start_restore("c1", run=False)
    assert c1.state == clones.RESTORING and c1.paused
    h.run(h.group.start_restore("c1", full=True, run=False))
    assert c1.state == clones.FRACTURED
    assert bytes(h.mem_src.data) == bytes(h.mem["c1"].data)


def test_a_crash_inside_the_full_restart_of_a_lost_restore(h, monkeypatch):
    """The --full restart of a restore whose PRM was lost, cut by a crash
    before its maps are saved: the restore is still one whose PRM is lost
    (paused, refused without --full), never one that resumes with the old
    Delta Map and an empty PRM and leaves clean bits over extents that
    differ."""
    restore_losing_its_prm(h, host_write=True)

    class Crash(Exception):
        pass

    def crash():
        raise Crash()
    monkeypatch.setattr(h.group, "commit", crash)
    with pytest.raises(Crash):
        h.group.start_restore("c1", full=True, run=False)
    h.crash()
    c1 = h.group.clones["c1"]
    assert c1.state == clones.RESTORING and c1.paused
    with pytest.raises(errors.InvalidArgument, match="--full"):
        h.group.start_restore("c1", run=False)
    h.run(h.group.start_restore("c1", full=True, run=False))
    assert bytes(h.mem_src.data) == bytes(h.mem["c1"].data)
