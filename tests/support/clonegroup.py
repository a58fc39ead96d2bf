"""A clone group on memory backends for engine tests: Harness (a Source
and named clones, with crash and recovery), FailingBackend (a memory
backend whose requests fail with a chosen errno), on_failing_backends
(a Harness moved onto them), hold_write (a write held on its way into a
backend), pattern (data that differs in every extent) and
restore_losing_its_prm (a restore whose PRM a crash lost)."""

import errno
import os
import threading

from target import backends, clones
from target.lu import LogicalUnit

GRAN = 4096
EXTENTS = 16
SIZE = GRAN * EXTENTS


class Harness:
    """A Source and named clones on memory backends, with crash/recover."""

    def __init__(self, tmp_path, names=("c1", "c2")):
        self.dir = str(tmp_path)
        self.mem_src = backends.MemoryBackend(SIZE)
        self.mem = {n: backends.MemoryBackend(SIZE) for n in names}
        self.states = {}
        self.lu, self.group = self._new()
        for n in names:
            self.group.add_clone(n, self.mem[n])
            self.states[n] = clones.OUT_OF_SYNC

    def _persist(self, name, state, error=None, rate=None):
        self.states[name] = state

    def _new(self):
        lu = LogicalUnit("src", {"size": SIZE, "file": "-",
                                         "readonly": False},
                                 backend=self.mem_src)
        return lu, clones.CloneGroup(lu, GRAN, self.dir, self._persist)

    def crash(self):
        """Drop the group without cleanup (kill -9) and recover it."""
        self.lu, self.group = self._new()
        self.group.load({n: {"state": s, "file": n}
                         for n, s in self.states.items()},
                        lambda rec: self.mem[rec["file"]])

    def run(self, engine):
        while engine.step():
            pass
        assert engine.finish()

    def sync(self, name):
        self.run(self.group.start_sync(name, run=False))

    def extent(self, backend, e):
        return bytes(backend.data[e * GRAN:(e + 1) * GRAN])

    def clean_extents_equal(self, name):
        delta = self.group.clones[name].delta
        return all(self.extent(self.mem_src, e) == self.extent(self.mem[name], e)
                   for e in range(EXTENTS) if not delta[e])


class FullHarness(Harness):
    """A Harness whose state saves fail with ENOSPC while `full` is set."""

    full = False

    def _persist(self, name, state, error=None, rate=None):
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        super()._persist(name, state, error, rate)


class FailingBackend(backends.Backend):
    """A MemoryBackend whose writes (or reads) fail while fail_writes (or
    fail_reads) holds an errno; failing requests change nothing (but see
    short_writes)."""

    def __init__(self, mem):
        self.mem = mem
        self.size = mem.size
        self.fail_writes = None
        self.fail_reads = None
        self.failures = 0
        # Fail only requests touching [fail_from, fail_to) (bytes).
        self.fail_from, self.fail_to = 0, SIZE
        # A failing write changes the part before fail_from first (a
        # short write, then the error).
        self.short_writes = False
        # Zeroes only by writing them (fast zero requests are refused, as
        # on a file system without fallocate's zero range).
        self.slow_zero = False
        # A failing flush (an errno) loses what was written since the
        # last flush that succeeded, as a failed fdatasync may drop the
        # pages it could not write.
        self.fail_flush = None
        self.durable = bytes(mem.data)

    @property
    def data(self):
        return self.mem.data

    def _check(self, code, offset, length):
        if code and offset < self.fail_to and self.fail_from < offset + length:
            self.failures += 1
            raise OSError(code, "injected: " + errno.errorcode[code])

    def readinto(self, buf, offset):
        self._check(self.fail_reads, offset, len(buf))
        self.mem.readinto(buf, offset)

    def write(self, buf, offset):
        view = memoryview(buf).cast("B")
        try:
            self._check(self.fail_writes, offset, len(view))
        except OSError:
            if self.short_writes and offset < self.fail_from:
                self.mem.write(view[:self.fail_from - offset], offset)
            raise
        self.mem.write(buf, offset)

    def zero(self, offset, length, may_trim=False, fast=False):
        if fast and self.slow_zero:
            raise OSError(errno.EOPNOTSUPP, "cannot zero quickly")
        self._check(self.fail_writes, offset, length)
        self.mem.zero(offset, length)

    def flush(self):
        if self.fail_flush:
            self.failures += 1
            self.mem.data[:] = self.durable
            raise OSError(self.fail_flush,
                          "injected: " + errno.errorcode[self.fail_flush])
        self.durable = bytes(self.mem.data)

    def trim(self, offset, length):
        pass


def on_failing_backends(h):
    """h with its Source (h.src) and clones (h.fail[name]) on
    FailingBackends over their memory backends; returns h."""
    h.src = FailingBackend(h.mem_src)
    h.fail = {n: FailingBackend(h.mem[n]) for n in h.mem}
    h.lu.backend = h.lu.stack.base = h.src
    h.lu.stack.refresh()
    for n, clone in h.group.clones.items():
        clone.backend = h.fail[n]
        clone.export.read = h.fail[n].readinto
    return h


def hold_write(backend, offset):
    """The next write of backend at offset waits on its way in: returns
    (entered, release), Events: entered once it waits, release to let it
    go on."""
    entered, release = threading.Event(), threading.Event()
    write = backend.write

    def held(buf, at):
        if at == offset and not entered.is_set():
            entered.set()
            release.wait(10)
        write(buf, at)
    backend.write = held
    return entered, release


def pattern(seed):
    """SIZE bytes that differ from another seed's in every extent."""
    return bytes((seed + i) % 251 for i in range(SIZE))


def restore_losing_its_prm(h, host_write=False):
    """c1 fractured from the Source, which then changed in its first 4
    extents; a restore from c1 started (with host_write, a host write
    into extent 10 during it) and a crash that loses its PRM file."""
    h.lu.write(b"A" * (EXTENTS * GRAN), 0)
    h.sync("c1")
    h.group.fracture("c1")
    h.group.commit()
    h.lu.write(b"B" * (4 * GRAN), 0)
    h.lu.flush()
    h.group.start_restore("c1", run=False)
    if host_write:
        h.lu.write(b"H" * GRAN, 10 * GRAN)
        h.lu.flush()
        h.group.commit()
    os.unlink(h.group.prm_file.path)
    h.crash()
