"""The secondary writes a replay's data while it receives the next frames
(secondary._ReplayApplier: several writes in flight, RSYN answered from a
thread of its own).  What that must not break: a stream entry lands after
the replay data received before it, RSAK goes only once every write
received before its RSYN is done, and a connection lost with writes in
flight loses no region (the replay resumes and the volumes end
identical).  Engine level: two in-process Targets (tests/support/rsgpair).
"""

import os
import random
import subprocess
import sys
import threading
import time

import pytest

from tests.support.rsgmodel import fast_timing, restore_timing, wait_for
from tests.support.rsgpair import FakePrimary, MiB, pair  # noqa: F401
from target import replication as R

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _fast():
    saved = fast_timing()
    yield
    restore_timing(saved)


def _replay_writer():
    """Whether the calling thread writes replay data on the secondary."""
    return threading.current_thread().name.startswith("rsg-apply")


def test_an_entry_lands_after_the_replay_data_in_flight_before_it(
        pair, monkeypatch):
    p = pair(size=8 * MiB)
    orig = R.SecondaryGroup._apply_one
    held = {}

    def slow(self, vol, kind, off, length, data):
        if _replay_writer() and kind == R.WRITE and off >= 2 * MiB and \
                not held:
            held["off"] = off
            # A host write into the region whose replay data is still
            # being written here: its entry reaches the secondary now.
            p.write(off, b"\x5a" * 4096)
            held["seq"] = p.ta.rsgs["g"].next_seq - 1
            time.sleep(0.5)
        orig(self, vol, kind, off, length, data)
    monkeypatch.setattr(R.SecondaryGroup, "_apply_one", slow)
    p.link_up()
    p.check_identical()
    assert held, "no replay data went through the writer threads"
    b = bytearray(4096)
    p.tb.lus["v"].backend.readinto(b, held["off"])
    assert bytes(b) == b"\x5a" * 4096, "the entry was overwritten by the " \
        "replay data sent before it"


def test_rsak_only_once_the_data_before_its_rsyn_is_written(
        pair, monkeypatch):
    monkeypatch.setattr(R.link, "REPLAY_SYNC_BYTES", 1 * MiB)
    p = pair(size=16 * MiB)
    # What the primary sent, in order: ("data", offset) and ("sync", id).
    sent = []
    orig_send = R.link.send_frames

    def send_frames(sock, frames):
        for kind, head, data in frames:
            if kind == b"RDAT":
                sent.append(("data", R.wire.DATA.unpack(head)[2]))
            elif kind == b"RSYN":
                sent.append(("sync", R.wire.SEQ.unpack(head)[0]))
        return orig_send(sock, frames)
    monkeypatch.setattr(R.link, "send_frames", send_frames)
    rng = random.Random(7)
    written, lock = set(), threading.Lock()
    orig_apply = R.SecondaryGroup._apply_one

    def apply_one(self, vol, kind, off, length, data):
        if _replay_writer():
            # Writes end out of order, the early ones late.
            time.sleep(rng.random() * 0.004)
        orig_apply(self, vol, kind, off, length, data)
        with lock:
            written.add(off)
    monkeypatch.setattr(R.SecondaryGroup, "_apply_one", apply_one)
    at_sync = {}
    orig_sync = R.SecondaryGroup.replay_sync

    def replay_sync(self, ident):
        with lock:
            at_sync[ident] = set(written)
        orig_sync(self, ident)
    monkeypatch.setattr(R.SecondaryGroup, "replay_sync", replay_sync)
    p.link_up()
    p.check_identical()
    assert len(at_sync) >= 8, at_sync.keys()
    before = set()
    for what, value in sent:
        if what == "data":
            before.add(value)
        elif value in at_sync:
            missing = before - at_sync[value]
            assert not missing, "RSYN {:#x} made durable before the " \
                "data at {} was written".format(value, sorted(missing)[:4])


def test_connection_lost_with_replay_data_in_flight_loses_no_region(
        pair, monkeypatch):
    # Syncs answered before the cut, windows of a few frames in flight.
    monkeypatch.setattr(R.link, "REPLAY_SYNC_BYTES", 4 * MiB)
    size = 32 * MiB
    p = pair(size=size)
    orig = R.SecondaryGroup._apply_one
    lock, cut = threading.Lock(), threading.Event()
    state = {"written": 0, "running": 0, "at_cut": 0}

    def slow(self, vol, kind, off, length, data):
        if not _replay_writer() or cut.is_set():
            return orig(self, vol, kind, off, length, data)
        with lock:
            state["running"] += 1
            state["written"] += length
            now = state["written"] > size // 4 and not cut.is_set()
            if now:
                cut.set()
                state["at_cut"] = state["running"]
        if now:
            # Part of the replay acknowledged, this write and others in
            # flight: the connection goes down under them.
            R.wire.shutdown_socket(self.connection)
        time.sleep(0.05)
        try:
            orig(self, vol, kind, off, length, data)
        finally:
            with lock:
                state["running"] -= 1
    monkeypatch.setattr(R.SecondaryGroup, "_apply_one", slow)
    p.link_up()
    link = p.link
    assert cut.wait(30), link.status()
    wait_for(lambda: link.replays > 1, 30, "the replay again", link.status)
    p.check_identical()
    assert state["at_cut"] >= 2, state
    # It resumed from what was acknowledged, not from the start.
    assert link.sent_bytes < 2 * size, link.status()


def test_no_rsyn_is_answered_after_one_failed(pair, monkeypatch):
    """After a failed flush the kernel may have dropped the data it could
    not write, so a later flush that succeeds proves nothing: an RSYN whose
    flush failed and every RSYN after it on that connection go
    unanswered, the connection ends, and the replay resumes."""
    monkeypatch.setattr(R.link, "REPLAY_SYNC_BYTES", 1 * MiB)
    p = pair(size=16 * MiB)
    orig = R.SecondaryGroup.replay_sync
    failed, later = [], []

    def replay_sync(self, ident):
        if failed:
            later.append(ident)
        else:
            failed.append(ident)
            raise OSError(5, "Input/output error")
        orig(self, ident)
    monkeypatch.setattr(R.SecondaryGroup, "replay_sync", replay_sync)
    p.link_up()
    link = p.link
    wait_for(lambda: link.replays > 1, R.server.IDLE_TIMEOUT / 2,
             "the replay again", link.status)
    p.check_identical()
    same_pass = [i for i in later if i >> 32 == failed[0] >> 32]
    assert not same_pass, "RSYN {:#x} answered after {:#x} failed".format(
        same_pass[0], failed[0])


def test_zero_frames_in_flight_are_bounded(pair, monkeypatch):
    """Zero and trim frames carry no data but each is a write (a copy on
    first write of the kept image, a punch): a stream of them must not
    pile up unbounded between the connection and the writers (memory, an
    overlap scan of everything in flight per frame, and the apply lock
    held all along)."""
    p = pair(size=64 * MiB)
    f = FakePrimary(p)
    lock = threading.Lock()
    state = {"received": 0, "applied": 0, "most": 0}
    orig_check = R.SecondaryGroup._check_data
    orig_apply = R.SecondaryGroup._apply_one

    def check_data(self, *args):
        with lock:
            state["received"] += 1
            state["most"] = max(state["most"],
                                state["received"] - state["applied"])
        return orig_check(self, *args)

    def apply_one(self, vol, kind, off, length, data):
        time.sleep(0.002)
        orig_apply(self, vol, kind, off, length, data)
        with lock:
            state["applied"] += 1
    monkeypatch.setattr(R.SecondaryGroup, "_check_data", check_data)
    monkeypatch.setattr(R.SecondaryGroup, "_apply_one", apply_one)
    try:
        f.begin()
        n = 2000
        for i in range(n):
            f.zero(i * 16384, 16384)
        f.end()
        assert state["applied"] == n
        image = p.tb.lus["v"].backend
        b = bytearray(16384)
        image.readinto(b, (n - 1) * 16384)
        assert bytes(b) == bytes(16384)
    finally:
        f.close()
    # The frame just received, the window held and the one in flight.
    assert state["most"] <= 1 + 2 * R.secondary.REPLAY_APPLY_FRAMES, state


def test_host_read_during_a_streaming_replay_is_refused_at_once(
        pair, monkeypatch):
    """The apply lock is held while replay writes are in flight; a read
    of the secondary's volume (refused: it is inconsistent) or a point in
    time of it must wait only for the writes in flight, not for as long
    as the primary keeps sending data (a primary of its own process: one
    of this one's threads could not keep the connection busy)."""
    p = pair(size=64 * MiB)
    f = FakePrimary(p)
    orig_apply = R.SecondaryGroup._apply_one
    checked = threading.Event()

    def apply_one(self, vol, kind, off, length, data):
        if not checked.is_set():
            time.sleep(0.05)
        orig_apply(self, vol, kind, off, length, data)
    monkeypatch.setattr(R.SecondaryGroup, "_apply_one", apply_one)
    try:
        f.begin()
        # Data for 2 s, as fast as the secondary takes it.
        sender = subprocess.Popen(
            [sys.executable, "-c", _SENDER, str(f.sock.fileno()), "2"],
            pass_fds=[f.sock.fileno()], cwd=REPO)
        time.sleep(1.0)
        start = time.monotonic()
        with pytest.raises(R.ReplicaUnavailable):
            p.tb.lus["v"].read(bytearray(4096), 0)
        waited = time.monotonic() - start
        start = time.monotonic()
        with p.tb.rsg_ops.point_in_time(p.tb.lus["v"], consistent=False):
            pointed = time.monotonic() - start
        checked.set()
        assert sender.wait(30) == 0
        f.end()
    finally:
        f.close()
    assert waited < 1.0, "a refused read waited {:.1f} s".format(waited)
    assert pointed < 1.0, "a point in time waited {:.1f} s".format(pointed)


_SENDER = """
import os, socket, sys, time, zlib
from target.replication.wire import DATA, WRITE, send_frame
sock = socket.socket(fileno=int(sys.argv[1]))
sock.settimeout(30)
chunk = 16 << 10
data = os.urandom(chunk)
crc = zlib.crc32(data)
i, until = 0, time.monotonic() + float(sys.argv[2])
while time.monotonic() < until:
    off = i * chunk % (64 << 20)
    send_frame(sock, b"RDAT", DATA.pack(0, WRITE, off, chunk, crc) + data)
    i += 1
sock.detach()
"""


def test_a_close_writes_no_replay_data_it_had_not_begun(pair, monkeypatch):
    """The secondary closing (a target close, which waits a while for the
    session and then closes the volumes) with replay writes queued: those
    not begun are dropped (no RSYN covering them is answered, so the
    primary sends them again), not written for as long as the queue lasts
    after the close."""
    p = pair(size=8 * MiB)
    f = FakePrimary(p)
    lock = threading.Lock()
    began, after_close = threading.Event(), []
    orig_apply = R.SecondaryGroup._apply_one

    def apply_one(self, vol, kind, off, length, data):
        began.set()
        with lock:
            if self.closed:
                after_close.append(off)
        time.sleep(0.1)
        orig_apply(self, vol, kind, off, length, data)
    monkeypatch.setattr(R.SecondaryGroup, "_apply_one", apply_one)
    try:
        f.begin()
        for i in range(64):
            f.data(i * 16384, os.urandom(16384))
        f.send(b"RSYN", R.wire.SEQ.pack(7))
        assert began.wait(10)
        time.sleep(0.05)
        with lock:
            f.sg.close()
        start = time.monotonic()
        f.thread.join(30)
        ended = time.monotonic() - start
        # No RSAK for writes never made.
        answers = f.answers()
    finally:
        f.close()
    assert not after_close, "{} replay writes began after the close " \
        "(in {:.1f} s)".format(len(after_close), ended)
    assert b"RSAK" not in answers, answers


def test_an_rsak_lost_on_the_wire_is_no_apply_failure(pair, monkeypatch):
    """RSAK is sent by a thread of its own: a connection that fails under
    it ends the session as a lost connection does, not as a failure of
    this node's volumes (`rsg status` would blame them)."""
    p = pair(size=8 * MiB)
    f = FakePrimary(p)
    orig_send = R.secondary.send_frame

    def send_frame(sock, kind, payload=b""):
        if kind == b"RSAK":
            raise ConnectionResetError(104, "Connection reset by peer")
        return orig_send(sock, kind, payload)
    monkeypatch.setattr(R.secondary, "send_frame", send_frame)
    error_before = f.sg.error
    try:
        f.begin()
        f.data(0, os.urandom(65536))
        f.send(b"RSYN", R.wire.SEQ.pack(7))
        time.sleep(0.2)
        try:
            f.send(b"BEAT")
        except OSError:
            pass
        f.thread.join(10)
        assert not f.thread.is_alive(), "the session goes on"
    finally:
        f.close()
    assert f.sg.error == error_before, f.sg.error


def test_sessions_cut_with_replay_writes_in_flight_leave_no_threads(
        pair, monkeypatch):
    p = pair(size=8 * MiB)
    f = FakePrimary(p)
    orig_apply = R.SecondaryGroup._apply_one

    def apply_one(self, vol, kind, off, length, data):
        time.sleep(0.01)
        orig_apply(self, vol, kind, off, length, data)
    monkeypatch.setattr(R.SecondaryGroup, "_apply_one", apply_one)

    def writers():
        return [t.name for t in threading.enumerate()
                if t.name.startswith(("rsg-apply", "rsg-replay-sync"))]
    try:
        for i in range(10):
            if i:
                f.connect()
            f.begin()
            for j in range(32):
                f.data(j * 65536, os.urandom(65536))
                if j % 8 == 7:
                    f.send(b"RSYN", R.wire.SEQ.pack((i << 8) + j))
            f.close()       # the primary gone, writes in flight
            assert not writers(), writers()
    finally:
        f.close()
    assert not f.sg.consistent
