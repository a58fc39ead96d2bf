"""A session's save area: the old data of extents written while marked.

Design notes
------------
A copy on first write stores an extent's old data here before the host
write that overwrites it may proceed; the frozen image is saved data where
present, else the Source.  A save is the slot's data and its index entry
(slot and crc of the data), written in place, then made durable by a flush
(fdatasync) before the host write proceeds.

Group commit (target.groupcommit): the flushes are shared.  `store`
writes and returns a ticket; `wait_durable(ticket)` returns once a flush
that began after that save was written has completed.  One flush runs at
a time; the saves written while it runs are covered together by the next
one, made by the first of their writers to find no flush running (the
others wait for it).  So N concurrent first writes cost about two
flushes, not N, and a host write waits at most for the flush running and
the one after it, never for saves that queue up later.  Concurrent means
other connections, or one connection's writes deferred by the sessions'
layer (layer.py: a write is acknowledged once queued, and the layer's
applier saves a batch of them before it waits for one flush), or its
requests under nbdkit's `parallel` thread model.

What a crash keeps: every save whose wait_durable returned (data and entry
both durable); of the others, an arbitrary subset of blocks.  At load an
entry whose crc does not match its slot is dropped: its data never became
durable, and then the write it protected had not started either.  A save
is taken into the frozen image (Session: save_area.slots) only once
durable, so a second write to the same extent waits for the first's save
and then finds nothing left to save.  A flush that fails fails every save
it covered and every later one until the next reset (after a failed
fdatasync the kernel may have dropped pages it will not write again):
the session unmarks.

Slots are allocated in order and never freed while marked; a full save
area ends the mark (SaveAreaFull).  A reset zeroes the index but keeps
the slots' blocks: the next mark's saves overwrite them in place, and an
fdatasync that allocates no blocks commits no journal transaction (about
half the cost of one that fills holes, on ext4 here; docs/performance.md).
The index itself is zeroed by writing zeroes (up to ZERO_WRITE_MAX; a
larger one's range is zeroed by fallocate): the entries written next then
overwrite written blocks too.  A slot's old data is never read without an
index entry written since the reset, whose crc it must match.  The file
thus keeps the space of the most slots a mark used (at most its size,
fixed at create), and a file kept from an earlier session (a replicated
group's image, session_orchestration) is reused the same way.

An all-zero extent is saved as its index entry alone (ZERO_SLOT, the crc
of zeroes): no slot is written, so it neither fills a hole nor punches
one (punching allocated blocks costs a journal commit as filling does),
and reads of it are zeroes.  Deliberately
ignored: reusing slots within a mark, growing the area, coalescing
adjacent slots into one write (each save is its own pwrite; only the
flush is shared).  See docs/design.md and docs/persistence.md.
"""

import errno
import struct
import zlib

from .. import errors
from ..groupcommit import GroupCommit


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
    # The index entry's slot + 1 of an all-zero extent (no slot written),
    # and what slots holds for it.
    ZERO_ENTRY = 0xFFFFFFFF
    ZERO_SLOT = -1
    # Index sizes up to this are zeroed by writing zeroes at a reset.
    ZERO_WRITE_MAX = 4 << 20

    def __init__(self, backend, extents, granularity):
        self.backend = backend
        self.extents = extents
        self.granularity = granularity
        self.index_bytes = (extents * self.ENTRY.size + 4095) // 4096 * 4096
        self.capacity = min(self.ZERO_ENTRY - 1, max(
            0, (backend.size - self.index_bytes) // granularity))
        self.slots = {}
        self.next_slot = 0
        self._zero_crc = None
        # The index is zero and durable: a quiet reset (no writer) since
        # which nothing was stored; the next quiet reset (a mark right
        # after the create) writes nothing.
        self.zeroed = False
        # Group commit of the saves (see the design notes); the error of
        # a failed flush is kept until reset.
        self._group = GroupCommit(lambda: self.backend.flush())

    @staticmethod
    def minimum_size(extents, granularity):
        return (extents * 8 + 4095) // 4096 * 4096 + granularity

    def _slot_offset(self, slot):
        return self.index_bytes + slot * self.granularity

    def load(self):
        """Read the index back; return how many entries were dropped."""
        # A killed process's saves may be in the page cache only: durable
        # first, or a power cut after the next host write (which no longer
        # saves the extent) would take the save away.
        self.backend.flush()
        index = bytearray(self.index_bytes)
        self.backend.readinto(index, 0)
        self.slots = {}
        dropped = 0
        buf = bytearray(self.granularity)
        for x in range(self.extents):
            slot1, crc = self.ENTRY.unpack_from(index, x * self.ENTRY.size)
            if slot1 == 0:
                continue
            if slot1 == self.ZERO_ENTRY:
                if crc != self._zero_crc_value():
                    dropped += 1
                    continue
                self.slots[x] = self.ZERO_SLOT
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

    def reset(self, quiet=False):
        """Forget every save, durably: the index is zeroed; the slots keep
        their blocks (see the design notes).  Forgotten in memory even if
        the index's zeroing fails (raised): only a marked session's index
        is read, and every mark resets it first.  quiet: no store() can
        run until the next reset returns (a create, a mark), so the index
        stays zero on disk: the next quiet reset, with nothing stored
        since, leaves it as it is.  Any other reset (an unmark's, beside
        a write whose save is in flight) may be followed by an entry
        written during it and always zeroes the index."""
        self.slots = {}
        self.next_slot = 0
        if not (quiet and self.zeroed):
            self.zeroed = False
            if self.index_bytes <= self.ZERO_WRITE_MAX:
                self.backend.write(bytes(self.index_bytes), 0)
            else:
                self.backend.zero(0, self.index_bytes)
            self.backend.flush()
            self.zeroed = quiet
        with self._group.lock:
            self._group.reset()

    def allocate(self):
        """Take the next slot (caller holds the session lock)."""
        if self.next_slot >= self.capacity:
            return None
        slot = self.next_slot
        self.next_slot += 1
        return slot

    def store(self, extent, slot, data):
        """Write data to slot and its index entry; return the ticket to
        wait_durable() for."""
        self.zeroed = False
        self.backend.write(data, self._slot_offset(slot))
        self.backend.write(self.ENTRY.pack(slot + 1, zlib.crc32(data)),
                           extent * self.ENTRY.size)
        # Taken after the writes returned: a flush that begins after this
        # covers them.
        return self._group.ticket()

    def _zero_crc_value(self):
        if self._zero_crc is None:
            self._zero_crc = zlib.crc32(bytes(self.granularity))
        return self._zero_crc

    def store_zero(self, extent):
        """store() of an all-zero extent: its index entry alone; its slot
        in slots is ZERO_SLOT."""
        self.zeroed = False
        self.backend.write(self.ENTRY.pack(self.ZERO_ENTRY,
                                           self._zero_crc_value()),
                           extent * self.ENTRY.size)
        return self._group.ticket()

    def wait_durable(self, ticket):
        """Return once the save of ticket (and every earlier one) is
        durable, flushing if no flush is running; raise the error of a
        failed flush."""
        self._group.wait(ticket)

    def readinto(self, extent, view):
        slot = self.slots[extent]
        if slot == self.ZERO_SLOT:
            view[:] = bytes(len(view))
        else:
            self.backend.readinto(view, self._slot_offset(slot))

    def used_bytes(self):
        return len(self.slots) * self.granularity
