"""The asynchronous transfer engine against destinations that behave like
real NBD servers in ways MemoryDestination does not: a write's buffer is
read when the server takes it (libnbd shares it, never copies), a client
is busy at its window, and a failed flush loses what it covered.

Each test checks the promise the engine makes: an extent whose pending bit
is clear is durable on the destination with the frozen image's data, and
a destination reported consistent holds the frozen image.
"""

import os

from target import backends, sessions
from target.sessions import transfer
from tests.support.sessionfakes import marked_session

G = 4096


def striped(n):
    """Data in even extents, zeroes in odd ones: every run of several
    extents goes out as several requests."""
    out = bytearray(n * G)
    for x in range(0, n, 2):
        out[x * G:(x + 1) * G] = os.urandom(G)
    return bytes(out)


class ServerLike(sessions.MemoryDestination):
    """Answers each request `lag` retire() calls after it was queued, in
    order, and only then takes its data (the buffer was shared, as libnbd
    does); busy at `window` requests in flight.  A flush makes durable
    what was answered before it; the fail_flush-th flush (from 1) fails
    and, as a Linux server's fdatasync does, the dirty data it covered is
    lost for good while the next flush succeeds."""

    def __init__(self, backend, lag, window=1 << 30, fail_flush=None):
        super().__init__(backend)
        self.lag = lag
        self.window = window
        self.fail_flush = fail_flush
        self.flushes = 0
        self.queue = []         # [age, done, kind, buf, offset, length]
        self.durable = bytearray(backend.data)
        self.dirty = {}         # offset -> bytes answered, not flushed

    def write(self, buf, offset, done):
        self.queue.append([0, done, "write", buf, offset, len(buf)])

    def zero(self, offset, length, done):
        self.queue.append([0, done, "zero", None, offset, length])

    def flush(self, done):
        self.queue.append([0, done, "flush", None, 0, 0])

    def busy(self):
        return len(self.queue) >= self.window

    def retire(self):
        for q in self.queue:
            q[0] += 1
        while self.queue and self.queue[0][0] >= self.lag:
            _, done, kind, buf, offset, length = self.queue.pop(0)
            error = None
            if kind == "write":
                data = bytes(buf)
                self.backend.write(data, offset)
                self.dirty[offset] = data
            elif kind == "zero":
                self.backend.zero(offset, length)
                self.dirty[offset] = bytes(length)
            else:
                self.flushes += 1
                if self.flushes == self.fail_flush:
                    error = sessions.DestinationError(
                        uri="server", reason="injected flush EIO")
                else:
                    for o, data in self.dirty.items():
                        self.durable[o:o + len(data)] = data
                self.dirty.clear()
            done(error)


def wrong_clear_extents(s, i, dest, frozen, n):
    """Extents clear in i's pending map that the destination does not
    durably hold as frozen."""
    pending = s.dests[i].pending
    return [x for x in range(n) if not pending[x] and
            bytes(dest.durable[x * G:(x + 1) * G]) !=
            frozen[x * G:(x + 1) * G]]


def test_a_shared_buffer_is_not_reused_while_a_write_of_it_is_in_flight(
        monkeypatch):
    """A run of 4 extents goes out as 4 requests; the client's window is 2,
    so the engine waits between them, and meanwhile the run's first
    requests complete.  The run's buffer must stay out of the pool until
    its last request completed: the destination reads it only then."""
    monkeypatch.setattr(transfer, "CHUNK", 4 * G)
    monkeypatch.setattr(transfer, "CHECKPOINT_BYTES", 8 * G)
    n = 32
    s, frozen = marked_session(striped(n), G, ["m0"])
    dest = ServerLike(backends.MemoryBackend(n * G), lag=2, window=2)
    engine = s.start_transfer({0: dest}, run=False)
    engine.advance()
    wrong = wrong_clear_extents(s, 0, dest, frozen, n)
    assert not wrong, "{}: extents {} are clear but hold other data than " \
        "the frozen image's".format(engine.result, wrong)
    assert engine.result == "completed", engine.result
    assert bytes(dest.backend.data) == frozen


def test_two_destinations_and_a_busy_client(monkeypatch):
    """The same, with a second destination: the run is sent to it after
    the first one's requests completed."""
    monkeypatch.setattr(transfer, "CHUNK", 4 * G)
    monkeypatch.setattr(transfer, "CHECKPOINT_BYTES", 8 * G)
    n = 32
    s, frozen = marked_session(striped(n), G, ["m0", "m1"])
    d0 = ServerLike(backends.MemoryBackend(n * G), lag=2, window=2)
    d1 = ServerLike(backends.MemoryBackend(n * G), lag=2, window=2)
    engine = s.start_transfer({0: d0, 1: d1}, run=False)
    engine.advance()
    assert engine.result == "completed", engine.result
    assert bytes(d0.backend.data) == frozen
    assert bytes(d1.backend.data) == frozen


def test_no_checkpoint_is_cleared_after_a_failed_flush(monkeypatch):
    """One extent per checkpoint, a destination some requests behind: its
    first flush fails after the writes of the next checkpoints were
    answered.  Those writes were covered by the failed flush and are lost
    (a failed fdatasync drops the dirty pages; the next one succeeds), so
    no later flush of that destination may clear their bits."""
    monkeypatch.setattr(transfer, "CHUNK", G)
    monkeypatch.setattr(transfer, "CHECKPOINT_BYTES", G)
    n = 8
    s, frozen = marked_session(os.urandom(n * G), G, ["m0"])
    dest = ServerLike(backends.MemoryBackend(n * G), lag=3, fail_flush=1)
    engine = s.start_transfer({0: dest}, run=False)
    engine.advance()
    assert engine.result.startswith("failed"), engine.result
    assert "injected flush EIO" in engine.result
    wrong = wrong_clear_extents(s, 0, dest, frozen, n)
    assert not wrong, "after a failed flush, extents {} were cleared but " \
        "are not durable on the destination".format(wrong)
