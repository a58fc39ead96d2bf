"""The storage replicator log (SRL): the primary's ring file of entries.

Owns the file format (a header, then entries on 512-byte boundaries, a pad
marker where a lap's end is skipped), appending, reading and the scan that
finds the head again at start-up.  The SRL is written with pwrite and made
durable by sync(); which entries are still needed (the tail) is the
group's business (primary.py).  A read, write or sync error is raised to
the group, which switches the links to their DCMs.  File format and
recovery: docs/persistence.md; design notes in target/replication/__init__.py.
"""

import collections
import errno
import os
import struct
import threading

from .. import backends, errors, fsutil
from .wire import WRITE, entry_crc

MIN_SRL = 1 << 20
SECTOR = 512


class SrlCorrupt(errors.Error):
    msg = ("SRL of group {name!r}: entry {seq} at byte {pos} fails its "
           "checksum; replication to {peer} stopped, nothing of it was sent")
    errno = errno.EUCLEAN


SRL_MAGIC = b"CLNSRL01"
SRL_HEADER = struct.Struct("<8sQI")        # magic, capacity, crc
SRL_DATA_START = 4096
ENTRY_MAGIC = b"SRLE"
PAD_MAGIC = b"SRLP"
SRL_ENTRY = struct.Struct("<4sQIBQII")      # magic seq vol kind off len crc
ENTRY_SPACE = SECTOR                        # entries start on 512 bytes
# The newest entries are kept in memory too (at most this many bytes of
# data, and never more than a quarter of the ring, so none of them can have
# been overwritten in the file): a link that keeps up sends them without
# reading them back or checking them again.
RECENT_BYTES = 8 << 20


def _round_up(n, m):
    return (n + m - 1) // m * m


class Srl:
    """A ring of entries in a file: positions are logical byte counts that
    only grow; an entry never wraps (it starts at the ring's beginning if
    it does not fit before the end)."""

    def __init__(self, path, capacity=None):
        self.path = path
        if capacity is not None:
            capacity = _round_up(capacity, SECTOR)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL |
                         os.O_CLOEXEC, 0o600)
            try:
                head = SRL_HEADER.pack(SRL_MAGIC, capacity, 0)
                os.pwrite(fd, head.ljust(SRL_DATA_START, b"\0"), 0)
                os.ftruncate(fd, SRL_DATA_START + capacity)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                os.unlink(path)
                raise
            fsutil.fsync_dir(os.path.dirname(path))
        else:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                raw = os.pread(fd, SRL_HEADER.size, 0)
                magic, capacity, _ = SRL_HEADER.unpack(raw)
                if magic != SRL_MAGIC or capacity < MIN_SRL // 2:
                    raise errors.CorruptState(path=path,
                                              reason="not an SRL file")
            except (struct.error, errors.Error):
                os.close(fd)
                raise errors.CorruptState(path=path, reason="not an SRL file")
        self.fd = fd
        self.capacity = capacity
        # Tests only (CLONECTL_FAULTS): a failing log device.
        self.faults = backends.fault_rules(path)
        self.head_pos = 0          # where the next entry goes
        self.next_seq = 1
        self.dirty = False
        self._sync_lock = threading.Lock()
        # pos -> entry as read() gives it, for the newest entries appended
        # (pos is where a reader asks for it: the head before the append).
        self._recent = collections.OrderedDict()
        self._recent_bytes = 0
        self._recent_limit = min(RECENT_BYTES, capacity // 4)

    @staticmethod
    def space(length, kind):
        data = length if kind == WRITE else 0
        return _round_up(SRL_ENTRY.size + data, ENTRY_SPACE)

    def _placement(self, pos, need):
        """(logical start, physical offset) of an entry of need bytes."""
        room = self.capacity - pos % self.capacity
        if room < need:
            pos += room
        return pos, SRL_DATA_START + pos % self.capacity

    def end_after(self, pos, need):
        start, _ = self._placement(pos, need)
        return start + need

    def append(self, seq, vol, kind, offset, length, data, crc):
        need = self.space(length, kind)
        start, phys = self._placement(self.head_pos, need)
        if self.faults is not None:
            self.faults.check("write", phys, need)
        if start != self.head_pos and \
                self.capacity - self.head_pos % self.capacity >= \
                SRL_ENTRY.size:
            # The rest of the lap is skipped: say so, so that a reader
            # never takes the old bytes there for an entry.
            os.pwrite(self.fd, PAD_MAGIC.ljust(SRL_ENTRY.size, b"\0"),
                      SRL_DATA_START + self.head_pos % self.capacity)
        head = SRL_ENTRY.pack(ENTRY_MAGIC, seq, vol, kind, offset, length, crc)
        if data is not None:
            # A copy the caller cannot change under the link (a no-op for
            # bytes).
            data = bytes(data)
            written = os.pwritev(self.fd, [head, data], phys)
        else:
            written = os.pwrite(self.fd, head, phys)
        if written < len(head) + (len(data) if data is not None else 0):
            # A full file system cuts a write short: the file would hold
            # a torn entry while the one kept in memory is sent.
            raise OSError(errno.ENOSPC, "the SRL took {} of the entry's "
                          "bytes".format(written))
        self._remember(self.head_pos, (seq, vol, kind, offset, length, crc,
                                       data, start + need))
        self.head_pos = start + need
        self.next_seq = seq + 1
        self.dirty = True
        return start

    def _remember(self, pos, entry):
        recent = self._recent
        recent[pos] = entry
        self._recent_bytes += self._kept_bytes(entry)
        while self._recent_bytes > self._recent_limit and recent:
            _, old = recent.popitem(last=False)
            self._recent_bytes -= self._kept_bytes(old)

    @staticmethod
    def _kept_bytes(entry):
        # Its header's space, and its data if it carries any.
        return ENTRY_SPACE + (entry[4] if entry[6] is not None else 0)

    def entry(self, pos):
        """(entry, checked): the entry at logical pos as read() gives it
        (None if there is none), and whether its checksum is known good:
        it is one of the newest, appended by this process and kept in
        memory.  Otherwise it is read from the file and the caller checks
        it."""
        # A failing log device (tests' CLONECTL_FAULTS) fails the reads
        # of its entries, newest or not.
        if self.faults is None:
            e = self._recent.get(pos)
            if e is not None:
                return e, True
        return self.read(pos), False

    def read(self, pos, with_data=True):
        """The entry at logical pos: (seq, vol, kind, off, len, crc, data,
        next pos), or None if there is no entry there.  The caller checks
        the sequence number and the crc (entry_crc)."""
        room = self.capacity - pos % self.capacity
        if room < SRL_ENTRY.size:
            pos += room
            room = self.capacity
        phys = SRL_DATA_START + pos % self.capacity
        if self.faults is not None:
            self.faults.check("read", phys, SRL_ENTRY.size)
        raw = os.pread(self.fd, SRL_ENTRY.size, phys)
        if raw[:4] == PAD_MAGIC:
            pos += room
            room = self.capacity
            phys = SRL_DATA_START
            raw = os.pread(self.fd, SRL_ENTRY.size, phys)
        if len(raw) < SRL_ENTRY.size or raw[:4] != ENTRY_MAGIC:
            return None
        magic, seq, vol, kind, off, length, crc = SRL_ENTRY.unpack(raw)
        need = self.space(length, kind)
        if need > room:
            return None
        data = None
        if kind == WRITE and with_data:
            data = os.pread(self.fd, length, phys + SRL_ENTRY.size)
        return seq, vol, kind, off, length, crc, data, pos + need

    def scan(self, pos, seq):
        """Follow the entries from (pos, seq); set head and next_seq.
        Return (seq, pos) of the first entry whose checksum fails (it is
        kept: the link that reaches it stops with a message), or None."""
        corrupt = None
        while True:
            e = self.read(pos, with_data=True)
            if e is None or e[0] != seq:
                break
            if entry_crc(e[0], e[1], e[2], e[3], e[4], e[6]) != e[5] and \
                    corrupt is None:
                corrupt = (seq, pos)
            pos, seq = e[7], seq + 1
        self.head_pos, self.next_seq = pos, seq
        return corrupt

    def sync(self):
        """Make every entry appended so far durable.  One at a time: a
        caller that finds a sync running waits for it to end, since what
        it appended may be what that sync is writing."""
        with self._sync_lock:
            if self.dirty:
                # Cleared first: an append during the sync sets it again.
                self.dirty = False
                try:
                    if self.faults is not None:
                        self.faults.check("flush", 0, 0)
                    os.fdatasync(self.fd)
                except OSError:
                    self.dirty = True
                    raise

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
