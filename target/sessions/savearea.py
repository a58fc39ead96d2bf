"""A session's save area: the old data of extents written while marked.

Design notes
------------
A copy on first write stores an extent's old data here before the host
write that overwrites it may proceed; the frozen image is saved data where
present, else the Source.  The data and its index entry (with a crc of the
data) are made durable by one flush before `store` returns.  At load an
entry whose crc does not match its slot is dropped: its data never became
durable, and then the write it protected had not started either.

Slots are allocated in order and never freed while marked; a full save
area ends the mark (SaveAreaFull).  Deliberately ignored: reusing slots,
growing the area.  See docs/design.md and docs/persistence.md.
"""

import errno
import struct
import zlib

from .. import errors


class SaveAreaFull(errors.Error):
    msg = ("the save area of session {name!r} is full ({slots} extents of "
           "{granularity} bytes); the session was unmarked")
    errno = errno.ENOSPC


class SaveArea:
    """Old data of extents written while marked, in a backend.

    Layout: an index of 8 bytes per extent (u32 slot + 1, u32 crc32 of the
    slot's data; 0 = not saved), rounded up to 4 KiB, then the slots, one
    extent each, allocated in order.
    """

    ENTRY = struct.Struct("<II")

    def __init__(self, backend, extents, granularity):
        self.backend = backend
        self.extents = extents
        self.granularity = granularity
        self.index_bytes = (extents * self.ENTRY.size + 4095) // 4096 * 4096
        self.capacity = max(0, (backend.size - self.index_bytes) // granularity)
        self.slots = {}
        self.next_slot = 0
        self._zero_crc = None

    @staticmethod
    def minimum_size(extents, granularity):
        return (extents * 8 + 4095) // 4096 * 4096 + granularity

    def _slot_offset(self, slot):
        return self.index_bytes + slot * self.granularity

    def load(self):
        """Read the index back; return how many entries were dropped."""
        index = bytearray(self.index_bytes)
        self.backend.readinto(index, 0)
        self.slots = {}
        dropped = 0
        buf = bytearray(self.granularity)
        for x in range(self.extents):
            slot1, crc = self.ENTRY.unpack_from(index, x * self.ENTRY.size)
            if slot1 == 0:
                continue
            slot = slot1 - 1
            if slot >= self.capacity:
                dropped += 1
                continue
            self.backend.readinto(buf, self._slot_offset(slot))
            if zlib.crc32(buf) != crc:
                dropped += 1
                continue
            self.slots[x] = slot
        self.next_slot = max(self.slots.values(), default=-1) + 1
        return dropped

    def reset(self):
        self.backend.zero(0, self.index_bytes)
        if self.backend.size > self.index_bytes:
            self.backend.trim(self.index_bytes,
                              self.backend.size - self.index_bytes)
        self.backend.flush()
        self.slots = {}
        self.next_slot = 0

    def allocate(self):
        """Take the next slot (caller holds the session lock)."""
        if self.next_slot >= self.capacity:
            return None
        slot = self.next_slot
        self.next_slot += 1
        return slot

    def store(self, extent, slot, data):
        """Write data to slot and its index entry, and make both durable."""
        self.backend.write(data, self._slot_offset(slot))
        self.backend.write(self.ENTRY.pack(slot + 1, zlib.crc32(data)),
                           extent * self.ENTRY.size)
        self.backend.flush()

    def store_zero(self, extent, slot):
        """store() of an all-zero extent: the slot becomes a hole."""
        self.backend.zero(self._slot_offset(slot), self.granularity,
                          may_trim=True)
        if self._zero_crc is None:
            self._zero_crc = zlib.crc32(bytes(self.granularity))
        self.backend.write(self.ENTRY.pack(slot + 1, self._zero_crc),
                           extent * self.ENTRY.size)
        self.backend.flush()

    def readinto(self, extent, view):
        self.backend.readinto(view, self._slot_offset(self.slots[extent]))

    def used_bytes(self):
        return len(self.slots) * self.granularity
