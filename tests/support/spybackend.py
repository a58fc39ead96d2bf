"""Spy: a memory backend that records its reads, writes and zeroes as
("read" | "write" | "zero", offset, length), for tests that check what a
copy did, not only what it left; GatedReads: one that holds a read, for
tests that race something against it."""

import threading

from target import backends


class Spy(backends.MemoryBackend):

    def __init__(self, size):
        super().__init__(size)
        self.ops = []

    def readinto(self, buf, offset):
        self.ops.append(("read", offset, memoryview(buf).nbytes))
        super().readinto(buf, offset)

    def write(self, buf, offset):
        self.ops.append(("write", offset, memoryview(buf).nbytes))
        super().write(buf, offset)

    def zero(self, offset, length, may_trim=False, fast=False):
        self.ops.append(("zero", offset, length))
        super().zero(offset, length, may_trim, fast)


class GatedReads(Spy):
    """Once `gate` is set, the next read sets `reading` and waits for
    `go` (a copy on first write held before its save, a frozen read held
    on a slot)."""

    def __init__(self, size):
        super().__init__(size)
        self.gate = False
        self.reading = threading.Event()
        self.go = threading.Event()

    def readinto(self, buf, offset):
        if self.gate:
            self.gate = False
            self.reading.set()
            assert self.go.wait(10)
        super().readinto(buf, offset)


class GatedWrites(Spy):
    """Once `gate` is set, the next write, zero or trim sets `writing` and
    waits for `go` (a host write still on its way into the backing file
    when something else happens)."""

    def __init__(self, size):
        super().__init__(size)
        self.gate = False
        self.writing = threading.Event()
        self.go = threading.Event()

    def _hold(self):
        if self.gate:
            self.gate = False
            self.writing.set()
            assert self.go.wait(10)

    def write(self, buf, offset):
        self._hold()
        super().write(buf, offset)

    def zero(self, offset, length, may_trim=False, fast=False):
        self._hold()
        super().zero(offset, length, may_trim, fast)

    def trim(self, offset, length):
        self._hold()
        super().trim(offset, length)
