"""The transfer engine keeps many requests in flight to a destination that
answers late, and a request failing mid-way leaves pending exactly what
no completed checkpoint flush covered."""

import os

from target import backends, maps, sessions
from target.sessions import transfer
from tests.support.sessionfakes import marked_session

G = 4096


class LaggingDestination(sessions.MemoryDestination):
    """Answers each request `lag` retire() calls after it was queued, in
    order (a server some requests behind); the fail_write-th write (from 1)
    is answered with an error and not written."""

    def __init__(self, backend, lag, fail_write=None):
        super().__init__(backend)
        self.lag = lag
        self.fail_write = fail_write
        self.queue = []         # [age, done, extents acked or flushed, error]
        self.writes = 0
        self.max_writes_in_flight = 0
        self.acked = set()      # extents whose write completed
        self.durable = set()    # acked before a flush that completed

    def _extents(self, offset, length):
        return set(range(offset // G, (offset + length + G - 1) // G))

    def _queue(self, done, extents, kind, error=None):
        self.queue.append([0, done, extents, kind, error])
        self.max_writes_in_flight = max(self.max_writes_in_flight, sum(
            1 for q in self.queue if q[3] == "write"))

    def write(self, buf, offset, done):
        self.writes += 1
        if self.writes == self.fail_write:
            error = sessions.DestinationError(uri="lagging",
                                              reason="injected EIO")
            self._queue(done, set(), "write", error)
            return
        self.backend.write(bytes(buf), offset)
        self._queue(done, self._extents(offset, len(buf)), "write")

    def zero(self, offset, length, done):
        self.backend.zero(offset, length)
        self._queue(done, self._extents(offset, length), "write")

    def flush(self, done):
        # A flush covers the writes answered before it was sent.
        self._queue(done, set(self.acked), "flush")

    def retire(self):
        for q in self.queue:
            q[0] += 1
        while self.queue and self.queue[0][0] >= self.lag:
            _, done, extents, kind, error = self.queue.pop(0)
            if error is None:
                (self.acked if kind == "write" else self.durable).update(
                    extents)
            done(error)


def test_writes_stay_in_flight_up_to_the_pool(monkeypatch):
    monkeypatch.setattr(transfer, "CHUNK", G)        # one extent a run
    monkeypatch.setattr(transfer, "CHECKPOINT_BYTES", 8 * G)
    n = 4 * transfer.POOL
    s, frozen = marked_session(os.urandom(n * G), G, ["m"])
    dest = LaggingDestination(backends.MemoryBackend(n * G), lag=100)
    engine = s.start_transfer({0: dest}, run=False)
    engine.advance()
    assert engine.result == "completed", engine.result
    assert dest.max_writes_in_flight == transfer.POOL
    assert bytes(dest.backend.data) == frozen
    assert dest.durable == set(range(n))
    assert not s.marked


def _failed_transfer(monkeypatch, n, lag, fail_write):
    """A transfer of n extents (a run and a write each, a checkpoint every
    4) to a LaggingDestination that refuses write fail_write: it has
    failed; (session, frozen image, destination, engine, pending map)."""
    monkeypatch.setattr(transfer, "CHUNK", G)
    monkeypatch.setattr(transfer, "CHECKPOINT_BYTES", 4 * G)
    s, frozen = marked_session(os.urandom(n * G), G, ["m"])
    dest = LaggingDestination(backends.MemoryBackend(n * G), lag=lag,
                              fail_write=fail_write)
    engine = s.start_transfer({0: dest}, run=False)
    engine.advance()
    assert engine.result.startswith("failed"), engine.result
    return s, frozen, dest, engine, s.dests[0].pending


def test_failed_write_leaves_pending_what_no_checkpoint_flushed(monkeypatch):
    """The 13th write fails: the three checkpoints before it (4 extents
    each) were flushed and are clear, everything after stays pending,
    including the writes answered after the failure (never flushed)."""
    n = 32
    s, frozen, dest, engine, pending = _failed_transfer(
        monkeypatch, n, lag=3, fail_write=13)
    assert "injected EIO" in engine.result, engine.result
    clear = {x for x in range(n) if not pending[x]}
    assert clear == set(range(12)), sorted(clear)
    # Nothing is clear that was not answered and then flushed, and the
    # writes after the failure were still in flight when it came.
    assert clear <= dest.durable, (sorted(clear), sorted(dest.durable))
    assert dest.acked - set(range(12)), sorted(dest.acked)
    assert bytes(dest.backend.data[:12 * G]) == frozen[:12 * G]
    assert maps.load(s.pending_path(s.dests[0]), G, n) == pending
    assert s.transfer == pending
    assert s.marked


def test_a_checkpoint_with_a_failed_write_is_never_cleared(monkeypatch):
    """Every write is still in flight when its checkpoint closes (a slow
    destination); the second one fails.  Its checkpoint must stay pending:
    a flush that succeeds after it covers the other writes, not the one
    the destination refused (before, the closed checkpoint was flushed and
    cleared as if it had all arrived, and the next transfer would not have
    sent the extent again)."""
    n = 8
    s, frozen, dest, engine, pending = _failed_transfer(
        monkeypatch, n, lag=100, fail_write=2)
    clear = {x for x in range(n) if not pending[x]}
    assert 1 not in clear, "the refused write's extent was cleared"
    assert clear <= dest.durable, (sorted(clear), sorted(dest.durable))
    assert maps.load(s.pending_path(s.dests[0]), G, n) == pending
