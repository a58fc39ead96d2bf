"""Power-loss simulation for engine tests: a disk that forgets unsynced writes.

A SimFile holds what reads see (`data`), what is durable (`durable`) and the
writes made since the last sync (`pending`).  power_cut() keeps an arbitrary
subset of the pending writes, block by block (BLOCK bytes, aligned), applied
in the order they were made onto the durable bytes, and drops the rest:
the real semantics of a file after a power cut, where anything written since
the last fsync/fdatasync may or may not have reached the disk, in any
subset of blocks.

SimDisk implements the map-file layer of target.maps (OsFiles: read,
replace, open, pwrite, datasync, close) on SimFiles, so committed maps, the
activity map and the PRM lose their unsynced writes too; PowerLossBackend is
a storage backend on a SimFile (flush = fdatasync), with an optional crash
countdown like the model test's CrashingBackend.

Design notes: deliberately ignored
- replace() (fsutil.write_atomic: temp file, fsync, rename, fsync dir) is
  taken as atomic and durable when it returns; a cut before it returns
  leaves the old file.  Its own steps are the file system's business and
  tests/unit/test_fsutil.py's.
- A block that was written twice since the last sync comes back as the
  durable bytes overlaid with a subset of the writes applied in order, so
  it may show an intermediate value; a real page cache writes back the
  latest value of a page, and sometimes an intermediate one, so this only
  widens what is allowed.
- Reordering across a sync is not simulated: a sync makes everything before
  it durable at once (what fdatasync promises).
- Trim is a no-op (it is advisory), as in MemoryBackend.
"""

import random
import time

from target import backends

BLOCK = 512


class SimFile:

    def __init__(self, data=b""):
        self.durable = bytearray(data)
        self.data = bytearray(data)
        self.pending = []
        # Extents (of the caller's choosing) written by hosts since the last
        # sync: the model test uses them to know which acknowledged writes a
        # power cut may take away.
        self.host_unsynced = set()
        self.syncs = 0
        self.path = None  # set by SimDisk.open

    @property
    def size(self):
        return len(self.data)

    def write(self, data, offset):
        data = bytes(data)
        end = offset + len(data)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = data
        self.pending.append((offset, data))

    def sync(self):
        self.durable = bytearray(self.data)
        self.pending = []
        self.host_unsynced.clear()
        self.syncs += 1

    def power_cut(self, rng, keep):
        """Keep each pending block with probability keep; forget the rest."""
        disk = self.durable
        for offset, data in self.pending:
            end = offset + len(data)
            pos = offset
            while pos < end:
                stop = min(end, (pos // BLOCK + 1) * BLOCK)
                if rng.random() < keep:
                    if stop > len(disk):
                        disk.extend(bytes(stop - len(disk)))
                    disk[pos:stop] = data[pos - offset:stop - offset]
                pos = stop
        self.data = bytearray(disk)
        self.durable = bytearray(disk)
        self.pending = []
        self.host_unsynced.clear()


class SimDisk:
    """The map-file layer of target.maps on SimFiles (see maps.OsFiles)."""

    def __init__(self):
        self.files = {}
        # Tests switch this off to show what the fdatasync calls protect.
        self.honour_datasync = True
        # One-shot hook run before the next replace() of a path ending in
        # the given suffix: (suffix, function).
        self.before_replace = None
        # One-shot hook run after the next datasync of a path ending in the
        # given suffix: (suffix, function).
        self.after_datasync = None

    def read(self, path):
        if path not in self.files:
            raise FileNotFoundError(path)
        return bytes(self.files[path].data)

    def replace(self, path, data):
        hook = self.before_replace
        if hook is not None and path.endswith(hook[0]):
            self.before_replace = None
            hook[1]()
        self.files[path] = SimFile(data)

    def open(self, path):
        if path not in self.files:
            raise FileNotFoundError(path)
        self.files[path].path = path
        return self.files[path]

    def pwrite(self, handle, data, offset):
        handle.write(data, offset)

    def datasync(self, handle):
        if self.honour_datasync:
            handle.sync()
        hook = self.after_datasync
        if hook is not None and (handle.path or "").endswith(hook[0]):
            self.after_datasync = None
            hook[1]()

    def close(self, handle):
        pass

    def power_cut(self, rng, keep):
        for f in self.files.values():
            f.power_cut(rng, keep)


class PowerLossBackend(backends.Backend):
    """A storage backend on a SimFile; flush is its fdatasync.

    countdown: a crash countdown (see test_clones_model.Countdown) ticked
    on every operation; host_io: a function saying whether the current
    write is a host write (recorded in file.host_unsynced by extent of
    granularity bytes); after_write: a one-shot hook run after the next
    write lands.
    """

    def __init__(self, file, countdown=None, host_io=None, granularity=4096):
        self.file = file
        self.size = file.size
        self.countdown = countdown
        self.host_io = host_io or (lambda: False)
        self.granularity = granularity
        self.after_write = None

    @property
    def data(self):
        return self.file.data

    def _tick(self, torn=None):
        if self.countdown is not None:
            self.countdown.tick(torn)

    def _record(self, offset, length):
        if self.host_io():
            g = self.granularity
            self.file.host_unsynced.update(
                range(offset // g, (offset + max(length, 1) - 1) // g + 1))

    def readinto(self, buf, offset):
        self._tick()
        view = memoryview(buf).cast("B")
        view[:] = self.file.data[offset:offset + len(view)]

    def write(self, buf, offset):
        view = memoryview(buf).cast("B")

        def torn():
            # A write cut by the crash lands partly: its first half.
            self._record(offset, len(view))
            self.file.write(view[:len(view) // 2], offset)
        self._tick(torn)
        self._record(offset, len(view))
        self.file.write(view, offset)
        hook, self.after_write = self.after_write, None
        if hook is not None:
            hook()

    def zero(self, offset, length, may_trim=False, fast=False):
        self._tick()
        self._record(offset, length)
        self.file.write(bytes(length), offset)

    def flush(self):
        self._tick()
        self.file.sync()

    def trim(self, offset, length):
        self._tick()


class SimSaveArea(PowerLossBackend):
    """The save area on a simulated disk, safe for threads.  A flush makes
    durable what was written before it began (fdatasync's promise, no
    more), and takes a moment; with honour_flush False it is ignored."""

    def __init__(self, file, lock, honour_flush=True):
        super().__init__(file)
        self.lock = lock
        self.honour_flush = honour_flush
        self.written = 0    # writes made; file.pending holds the last ones
        self.synced = 0     # writes made durable (dropped from pending)

    def readinto(self, buf, offset):
        with self.lock:
            super().readinto(buf, offset)

    def write(self, buf, offset):
        with self.lock:
            super().write(buf, offset)
            self.written += 1

    def zero(self, offset, length, may_trim=False, fast=False):
        with self.lock:
            super().zero(offset, length)
            self.written += 1

    def flush(self):
        with self.lock:
            data = bytearray(self.file.data)
            upto = self.written
        time.sleep(0.001)
        if not self.honour_flush:
            return
        with self.lock:
            # Flushes may overlap: one that began earlier and ends later
            # makes nothing more durable.
            if upto > self.synced:
                self.file.pending = self.file.pending[upto - self.synced:]
                self.file.durable = data
                self.synced = upto
                self.file.syncs += 1


def cut_rng(seed):
    return random.Random(seed)
