"""Extent maps and their files.

A map is a bytearray with one byte per extent (0 clean, 1 set).  A byte per
extent costs 8x the memory of a bitmap (16 KiB per GiB at the default 64 KiB
granularity), but slice assignment and bytearray.count() run in C and are
atomic under the GIL, faster than a bit loop that also needs a lock
(docs/performance.md, "Maps: a byte per extent").

Two kinds of map file share one layout, a 32-byte header then the body:

    magic "CLNMAP01" | u32 granularity | u64 extents | u32 crc32 | 8 reserved

- committed maps (a clone's delta map) are replaced whole (temp, fsync,
  rename, fsync dir) and carry the crc32 of the body;
- activity maps are updated in place, a few bytes at a time, ahead of the
  writes they describe; their crc field is 0 and the body is checked for
  values other than 0 and 1 instead.  A torn in-place write leaves bytes that
  are each either old or new, which is fine: both are valid.

A map file that is missing, truncated or fails its check raises
MapCorrupt; callers then assume every extent differs and say so.

All map file I/O goes through the module's `files` (OsFiles): the
power-loss tests (tests/support/powerloss.py) put a simulated disk there that
loses writes not yet made durable.
"""

import errno
import os
import struct
import zlib

from . import errors, fsutil

MAGIC = b"CLNMAP01"
HEADER = struct.Struct("<8sIQI8x")
assert HEADER.size == 32

ONES = b"\x01" * (1 << 16)


class MapCorrupt(errors.Error):
    msg = "map file {path!r} is unusable: {reason}"
    errno = 117  # EUCLEAN


class OsFiles:
    """Map file I/O on the real file system."""

    def read(self, path):
        """The whole file; FileNotFoundError if it does not exist."""
        with open(path, "rb") as f:
            return f.read()

    def replace(self, path, data):
        """Replace path atomically and durably (old or new after a crash)."""
        fsutil.write_atomic(path, data)

    def open(self, path):
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def pwrite(self, handle, data, offset):
        os.pwrite(handle, data, offset)

    def datasync(self, handle):
        os.fdatasync(handle)

    def close(self, handle):
        os.close(handle)


files = OsFiles()


def extent_count(size, granularity):
    return (size + granularity - 1) // granularity


def set_range(m, start, end):
    """Set m[start:end]; fast for long ranges too."""
    while start < end:
        n = min(end - start, len(ONES))
        m[start:start + n] = ONES[:n]
        start += n


def set_where(m, other):
    """Set m where other (a map of the same extents) is set."""
    for s, e in runs(other):
        set_range(m, s, e)


def runs(m, start=0, end=None, value=1):
    """Yield (start, end) of maximal runs of value in m[start:end]."""
    end = len(m) if end is None else end
    needle = bytes([value])
    other = bytes([1 - value])
    pos = start
    while pos < end:
        s = m.find(needle, pos, end)
        if s < 0:
            return
        e = m.find(other, s, end)
        if e < 0:
            e = end
        yield s, e
        pos = e


def same_byte_runs(code):
    """Yield (start, end, value) of the maximal runs of equal bytes."""
    pos, end = 0, len(code)
    while pos < end:
        value = code[pos]
        nxt = end
        # The first byte that differs: a find per other value in C.
        for other in set(code[pos:pos + 1]).symmetric_difference(
                range(_KINDS_MAX)):
            i = code.find(bytes([other]), pos, nxt)
            if i >= 0:
                nxt = i
        yield pos, nxt, value
        pos = nxt


_KINDS_MAX = 8


def kind_runs(code, granularity, size, names):
    """Run-length runs [[offset, length, kind], ...] of a per-extent code
    map (bytes with values below 8; names[value] is the run's kind), in
    bytes, the last run ending at size, as `clone map` and `session map`
    print them."""
    out = []
    for start, end, value in same_byte_runs(code):
        offset = start * granularity
        out.append([offset, min(size, end * granularity) - offset,
                    names[value]])
    return out


def combine(*layers):
    """One code map from 0/1 maps: bit i of an extent's byte is layers[i]."""
    if not layers:
        return b""
    n = len(layers[0])
    value = 0
    for i, m in enumerate(layers):
        value |= int.from_bytes(m, "little") << i
    return value.to_bytes(n, "little")


def encode(m, granularity, with_crc=True):
    crc = zlib.crc32(m) if with_crc else 0
    return HEADER.pack(MAGIC, granularity, len(m), crc) + bytes(m)


def load(path, granularity, extents, with_crc=True):
    try:
        data = files.read(path)
    except FileNotFoundError:
        raise MapCorrupt(path=path, reason="missing")
    if len(data) < HEADER.size:
        raise MapCorrupt(path=path, reason="truncated header")
    magic, gran, count, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MapCorrupt(path=path, reason="bad magic")
    if gran != granularity or count != extents:
        raise MapCorrupt(path=path, reason="geometry {}x{} does not match "
                         "{}x{}".format(count, gran, extents, granularity))
    body = bytearray(data[HEADER.size:])
    if len(body) != count:
        raise MapCorrupt(path=path, reason="body of {} bytes, expected {}"
                         .format(len(body), count))
    if with_crc:
        if zlib.crc32(body) != crc:
            raise MapCorrupt(path=path, reason="checksum mismatch")
    elif body.count(0) + body.count(1) != len(body):
        raise MapCorrupt(path=path, reason="values other than 0 and 1")
    return body


def save(path, m, granularity):
    """Replace a committed map file atomically."""
    files.replace(path, encode(m, granularity))


class ActivityFile:
    """An activity map on disk, updated in place ahead of writes."""

    def __init__(self, path, granularity, extents):
        self.path = path
        self.granularity = granularity
        self.extents = extents
        self.fd = None
        # Tests switch this off to show what the write-ahead's durability
        # protects against (a power cut loses the unsynced mark).
        self.sync_writes = True

    def reset(self, m):
        """Replace the file with m (atomically) and reopen it."""
        self.close()
        files.replace(self.path, encode(m, self.granularity, with_crc=False))
        self.fd = files.open(self.path)

    def persist(self, m, start, end, sync=True):
        """Write m[start:end] in place and make it durable (with sync
        False, the caller calls datasync() later)."""
        files.pwrite(self.fd, bytes(m[start:end]), HEADER.size + start)
        if sync:
            self.datasync()

    def datasync(self):
        """Make the writes made in place so far durable."""
        if self.fd is None:
            raise OSError(errno.EBADF, "activity map {} is closed".format(
                self.path))
        if self.sync_writes:
            files.datasync(self.fd)

    @property
    def is_open(self):
        return self.fd is not None

    def close(self):
        if self.fd is not None:
            files.close(self.fd)
            self.fd = None
