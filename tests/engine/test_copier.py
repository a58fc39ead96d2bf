"""The copy engine (target.copier) between memory backends."""

import os
import threading
import time

import pytest

from target import backends, copier

from tests.support.spybackend import Spy as Recording

SIZE = 4 << 20


def make(src, dst, **kwargs):
    return copier.Copier(src.readinto, dst.write, dst.zero, **kwargs)


def source():
    src = backends.MemoryBackend(SIZE)
    src.write(os.urandom(SIZE), 0)
    return src


def read(backend, offset, length):
    buf = bytearray(length)
    backend.readinto(buf, offset)
    return bytes(buf)


def test_copies_runs_in_chunks_and_pieces():
    src, dst = source(), Recording(SIZE)
    runs = [(0, 100), (300_000, 1_500_000), (SIZE - 7, 7)]
    assert make(src, dst, chunk=1 << 20, piece=64 << 10).copy(runs)
    for offset, length in runs:
        assert read(dst, offset, length) == read(src, offset, length)
    assert read(dst, 100, 1000) == bytes(1000)      # not in a run
    writes = [op for op in dst.ops if op[0] != "read"]
    assert max(n for _, _, n in writes) == 64 << 10
    assert sum(n for _, _, n in writes) == sum(n for _, n in runs)


def test_zero_chunks_are_written_as_zeroes():
    src, dst = source(), Recording(SIZE)
    src.zero(1 << 20, 1 << 20)
    dst.write(b"x" * SIZE, 0)
    dst.ops.clear()
    assert make(src, dst, chunk=1 << 20).copy([(0, 3 << 20)])
    assert ("zero", 1 << 20, 1 << 20) in dst.ops
    assert not [op for op in dst.ops if op[0] == "write" and
                (1 << 20) <= op[1] < (2 << 20)]
    assert read(dst, 0, 3 << 20) == read(src, 0, 3 << 20)


def test_is_zero():
    buf = bytearray(1 << 20)
    assert copier.is_zero(buf, len(buf))
    buf[-1] = 1
    assert not copier.is_zero(buf, len(buf))
    assert copier.is_zero(buf, len(buf) - 1)
    assert copier.is_zero(bytearray(3 << 20), 3 << 20)


class Guard:
    """Says "again" once for the chunk at `collide`."""

    def __init__(self, collide=None):
        self.collide = collide
        self.calls = []

    def begin(self, offset, length):
        self.calls.append(("begin", offset, length))

    def end(self, offset, length, written):
        self.calls.append(("end", offset, length, written))
        if offset == self.collide:
            self.collide = None
            return False
        return True


def test_guard_collision_copies_the_chunk_again():
    src, dst = source(), Recording(SIZE)
    guard = Guard(collide=1 << 20)
    done = []
    c = make(src, dst, chunk=1 << 20, guard=guard, progress=done.append)
    assert c.copy([(0, 2 << 20)])
    assert guard.calls == [
        ("begin", 0, 1 << 20), ("end", 0, 1 << 20, True),
        ("begin", 1 << 20, 1 << 20), ("end", 1 << 20, 1 << 20, True),
        ("begin", 1 << 20, 1 << 20), ("end", 1 << 20, 1 << 20, True)]
    assert done == [1 << 20] * 3


def test_a_failed_read_ends_the_chunk_unwritten():
    dst = Recording(SIZE)
    guard = Guard()

    def failing_read(view, offset):
        raise OSError(5, "EIO")
    c = copier.Copier(failing_read, dst.write, dst.zero, guard=guard)
    with pytest.raises(OSError):
        c.copy([(0, 4096)])
    assert guard.calls == [("begin", 0, 4096), ("end", 0, 4096, False)]
    assert dst.ops == []


def test_cancel_stops_between_chunks():
    src, dst = source(), Recording(SIZE)
    cancel = threading.Event()
    c = make(src, dst, chunk=1 << 20, cancel=cancel,
             progress=lambda n: cancel.set())
    assert c.copy([(0, SIZE)]) is False
    assert sum(n for _, _, n in dst.ops) == 1 << 20
    assert read(dst, 1 << 20, 1 << 20) == bytes(1 << 20)


def test_throttle_keeps_the_rate_and_a_cancel_ends_its_wait():
    src, dst = source(), Recording(SIZE)
    c = make(src, dst, chunk=64 << 10, rate=1 << 20)
    started = time.monotonic()
    assert c.copy([(0, 256 << 10)])
    # 3 chunks of 64 KiB at 1 MiB/s were waited for before the last one.
    assert time.monotonic() - started >= 0.18
    c.throttle()
    assert time.monotonic() - started >= 0.25


def test_throttle_waits_between_chunks_never_after_the_last():
    """The caller throttles after a copy, once it released what it held."""
    src, dst = source(), Recording(SIZE)
    c = make(src, dst, chunk=64 << 10, rate=1 << 20)
    waits = []
    c.throttle = lambda: waits.append(c.bytes_done)
    assert c.copy([(0, 128 << 10), (1 << 20, 128 << 10)])
    assert waits == [64 << 10, 128 << 10, 192 << 10]
    cancel = threading.Event()
    c = make(src, dst, chunk=1 << 20, rate=1 << 10, cancel=cancel)
    threading.Timer(0.1, cancel.set).start()
    started = time.monotonic()
    assert c.copy([(0, 2 << 20)]) is False
    assert time.monotonic() - started < 5


def test_throttle_calls_idle_while_it_waits():
    """A caller that must not go silent while the rate holds it back (a
    replication link) is called every idle_interval of the wait."""
    src, dst = source(), Recording(SIZE)
    calls = []
    c = make(src, dst, chunk=64 << 10, rate=256 << 10,
             idle=lambda: calls.append(time.monotonic()), idle_interval=0.05)
    started = time.monotonic()
    assert c.copy([(0, 128 << 10)])
    # One wait of 0.25 s between the two chunks, in slices of 0.05 s.
    took = time.monotonic() - started
    assert took >= 0.24
    assert 3 <= len(calls) <= 6, calls
    assert all(b - a < 0.1 for a, b in zip([started] + calls, calls))
    assert read(dst, 0, 128 << 10) == read(src, 0, 128 << 10)
