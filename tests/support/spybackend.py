"""Spy: a memory backend that records its reads, writes and zeroes as
("read" | "write" | "zero", offset, length), for tests that check what a
copy did, not only what it left."""

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
