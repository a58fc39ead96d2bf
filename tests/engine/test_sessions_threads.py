"""Sessions under concurrent host writes (real threads, memory backends).

The model test (test_sessions_model) is single-threaded; these hold the
same invariants while writer threads race with mark, copy on first write,
the frozen-image readers and the transfer engine:

- the frozen image read right after a mark (by the frozen export path)
  equals what every destination holds after the transfer completes,
  however the writers interleave;
- once the writers stop, one more update makes every destination equal to
  the Source: no change was lost from tracking.
"""

import random
import threading
import time

import pytest

from target import backends, sessions
from tests.support.sessionfakes import FakeLU

GRAN = 4096
EXTENTS = 256
SIZE = GRAN * EXTENTS


class SlowBackend(backends.MemoryBackend):
    """Reads and writes that take a moment (and release the GIL meanwhile),
    so the threads interleave inside them as on a real disk."""

    def readinto(self, buf, offset):
        view = memoryview(buf).cast("B")
        n = len(view) // 2
        view[:n] = self.data[offset:offset + n]
        time.sleep(0.0005)
        view[n:] = self.data[offset + n:offset + len(view)]

    def write(self, buf, offset):
        view = memoryview(buf).cast("B")
        n = len(view) // 2
        self.data[offset:offset + n] = view[:n]
        time.sleep(0.0005)
        self.data[offset + n:offset + len(view)] = view[n:]


def make_session(tmp_path, save_extents=EXTENTS):
    lu = FakeLU(sessions.SessionLayer(SlowBackend(SIZE)), SIZE)
    index = sessions.SaveArea.minimum_size(EXTENTS, GRAN) - GRAN
    save = backends.MemoryBackend(index + save_extents * GRAN)
    s = sessions.Session("s", lu, GRAN, str(tmp_path), save,
                         [{"uri": "a"}, {"uri": "b"}])
    s.create()
    lu.backend.add(s)
    return lu, s


def writers(lu, stop, count=4):
    def run(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            off = rng.randrange(0, SIZE - 3 * GRAN)
            n = rng.randrange(1, 3 * GRAN)
            if rng.random() < 0.2:
                lu.backend.zero(off, n)
            else:
                lu.backend.write(rng.randbytes(n), off)
            if rng.random() < 0.05:
                lu.backend.flush()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    return threads


def read_frozen_image(session):
    buf = bytearray(SIZE)
    for off in range(0, SIZE, 5 * GRAN):
        n = min(5 * GRAN, SIZE - off)
        view = memoryview(buf)[off:off + n]
        session.read_frozen(view, off)
    return bytes(buf)


@pytest.mark.parametrize("export", [True, False])
@pytest.mark.parametrize("round_", range(3))
def test_transfer_under_concurrent_writes(tmp_path, export, round_):
    lu, s = make_session(tmp_path)
    dests = [backends.MemoryBackend(SIZE) for _ in range(2)]
    stop = threading.Event()
    threads = writers(lu, stop)
    try:
        for _ in range(3):
            s.mark(export=export)
            frozen = read_frozen_image(s) if export else None
            engine = s.start_transfer(
                {i: sessions.MemoryDestination(d)
                 for i, d in enumerate(dests)})
            engine.join(60)
            assert engine.result == "completed", engine.result
            assert not s.marked
            if export:
                for d in dests:
                    assert bytes(d.data) == frozen, \
                        "destination differs from the frozen image"
    finally:
        stop.set()
        for t in threads:
            t.join()
    s.mark()
    engine = s.start_transfer({i: sessions.MemoryDestination(d)
                               for i, d in enumerate(dests)})
    engine.join(60)
    assert engine.result == "completed"
    source = bytes(lu.backend.inner.data)
    for d in dests:
        assert bytes(d.data) == source, "a change was lost from tracking"


def test_save_area_full_under_concurrent_writes(tmp_path):
    """The save area fills while writers race: the session unmarks itself
    with the error, no write fails, and the next update loses nothing."""
    lu, s = make_session(tmp_path, save_extents=8)
    dests = [backends.MemoryBackend(SIZE) for _ in range(2)]
    s.mark(export=True)
    stop = threading.Event()
    threads = writers(lu, stop)
    try:
        for _ in range(200):
            if not s.marked:
                break
            threading.Event().wait(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not s.marked
    assert "save area" in s.error
    s.mark()
    engine = s.start_transfer({i: sessions.MemoryDestination(d)
                               for i, d in enumerate(dests)})
    engine.join(60)
    assert engine.result == "completed"
    for d in dests:
        assert bytes(d.data) == bytes(lu.backend.inner.data)
