"""A session's save area: the old data of blocks written while marked.

Design notes
------------
A copy on first write stores here the old data of the blocks a host write
is about to change, before that write may proceed; the frozen image is
saved data where present, else the Source.  The unit saved is a block
(BLOCK, or the session's granularity when smaller), not the session's
extent: a 4 KiB write into a 64 KiB extent saves 4 KiB.  The extent stays
the unit of the session's maps (what changed, what to send).  A save must
be durable before its host write proceeds, and a flush costs about what
it writes back: with whole 64 KiB extents the saves of 4 KiB first writes
were bound by the disk's bandwidth (docs/performance.md).

Layout: a header block (magic, block size, the tag of the current mark),
then the entries (ENTRY, 32 bytes each), then the data slots (a block
each).  A save is one entry naming a run of consecutive blocks (first
block, count, first slot, crc32 of the data) and, unless the run is all
zeroes (a hole saved costs its entry alone: nothing written, nothing
punched), the run's data in consecutive slots.  Entries and slots are
both taken in order and never freed while marked; when either runs out
the save is refused (SaveAreaFull) and the session unmarks.

The tag.  A reset (a mark, an unmark) writes a new random tag to the
header and flushes it before any save of the new mark: entries carrying
another tag are an earlier mark's, so a reset writes nothing else, and
the next mark's saves overwrite the same blocks in place (an fdatasync
that allocates no blocks commits no journal transaction: about half the
cost of one that fills holes, on ext4 here; docs/performance.md).

Group commit (target.groupcommit): the flushes are shared.  `store`
writes and returns a ticket; `wait_durable(ticket)` returns once a flush
that began after that save was written has completed.  One flush runs at
a time; the saves written while it runs are covered together by the next
one.  So N concurrent first writes cost about two flushes, not N.
Concurrent means other connections, or one connection's writes deferred
by the sessions' layer (layer.py: its applier saves a batch before it
waits for one flush), or a window saved ahead (Session.save_ahead).

What a crash keeps, and how load finds it.  An entry is taken and
written under one lock, after its data: entries are written in the order
they are taken.  A flush that made entry i durable began after entry i
was written, so after every entry before it: the entries whose saves
were waited for form a prefix, each with its data.  Load reads entries
from the first until one does not carry the header's tag (or its own crc
fails: torn, never written): nothing after it was waited for.  An entry
of the prefix whose data does not match its crc is dropped: its data
never became durable, and then the write it protected had not started.
A save joins the frozen image (slots) only once durable, so a second
write to the same block waits for the first's save and then finds
nothing left to save.  A flush that fails fails every save it covered
and every later one until the next reset (after a failed fdatasync the
kernel may have dropped pages it will not write again): the session
unmarks.

Deliberately ignored: reusing slots within a mark, growing the area,
merging the saves of different writes into one write (each save is its
own pair of writes; only the flush is shared).  See docs/design.md and
docs/persistence.md.
"""

import array
import errno
import os
import struct
import threading
import zlib

from .. import errors
from ..groupcommit import GroupCommit

# The unit saved, at most (a session's granularity may be smaller).
BLOCK = 4096


def block_runs(blocks):
    """[first, count] of the runs of consecutive numbers in sorted
    blocks."""
    out = []
    for b in blocks:
        if out and out[-1][0] + out[-1][1] == b:
            out[-1][1] += 1
        else:
            out.append([b, 1])
    return out


class SavedBlocks:
    """block -> slot of the saves durable so far (ZERO_SLOT: saved as
    zeroes), a mapping in arrays of CHUNK slots, one per CHUNK blocks
    that hold a save: 8 bytes a block where blocks are saved, nothing
    elsewhere (a dict of ints costs about 100 bytes a block, 28 GB for a
    whole TiB saved)."""

    CHUNK = 1024
    _NONE = -2
    _EMPTY = array.array("q", [_NONE]) * CHUNK

    def __init__(self):
        self._chunks = {}
        self._count = 0

    def __len__(self):
        return self._count

    def __contains__(self, b):
        c = self._chunks.get(b // self.CHUNK)
        return c is not None and c[b % self.CHUNK] != self._NONE

    def __getitem__(self, b):
        c = self._chunks.get(b // self.CHUNK)
        slot = self._NONE if c is None else c[b % self.CHUNK]
        if slot == self._NONE:
            raise KeyError(b)
        return slot

    def __setitem__(self, b, slot):
        c = self._chunks.get(b // self.CHUNK)
        if c is None:
            c = self._chunks[b // self.CHUNK] = array.array("q", self._EMPTY)
        if c[b % self.CHUNK] == self._NONE:
            self._count += 1
        c[b % self.CHUNK] = slot

    def _pieces(self, b0, b1, held_only):
        """(first block of the chunk, its array or None, lo, hi) for each
        chunk over [b0, b1) in order, [lo, hi) the part of it in range;
        held_only: only the chunks that hold a save (looked up among
        those when the range spans more chunks than are held)."""
        n = self.CHUNK
        if b1 <= b0:
            return
        if held_only and (b1 - b0) // n > len(self._chunks):
            keys = sorted(k for k in self._chunks
                          if b0 // n <= k <= (b1 - 1) // n)
        else:
            keys = range(b0 // n, (b1 - 1) // n + 1)
        for k in keys:
            c = self._chunks.get(k)
            if c is None and held_only:
                continue
            base = k * n
            yield base, c, max(b0 - base, 0), min(b1 - base, n)

    def missing(self, b0, b1):
        """The blocks of [b0, b1) not saved, in order."""
        out = []
        for base, c, lo, hi in self._pieces(b0, b1, False):
            if c is None:
                out.extend(range(base + lo, base + hi))
            elif self._NONE in c[lo:hi]:
                out.extend(base + i for i in range(lo, hi)
                           if c[i] == self._NONE)
        return out

    def set_run(self, first, count, slot):
        """Blocks [first, first + count) saved in slots from slot on
        (all in slot, if it is ZERO_SLOT)."""
        n = self.CHUNK
        b, end = first, first + count
        while b < end:
            k = b // n
            stop = min(end, (k + 1) * n)
            c = self._chunks.get(k)
            if c is None:
                c = self._chunks[k] = array.array("q", self._EMPTY)
            part = c[b - k * n:stop - k * n]
            self._count += part.count(self._NONE)
            if slot == SaveArea.ZERO_SLOT:
                c[b - k * n:stop - k * n] = array.array(
                    "q", [slot]) * (stop - b)
            else:
                c[b - k * n:stop - k * n] = array.array(
                    "q", range(slot + b - first, slot + stop - first))
            b = stop

    def slots_in(self, b0, b1):
        """{block: slot} of the saved blocks of [b0, b1), in order."""
        out = {}
        for base, c, lo, hi in self._pieces(b0, b1, True):
            if c[lo:hi] != self._EMPTY[:hi - lo]:
                out.update((base + i, c[i]) for i in range(lo, hi)
                           if c[i] != self._NONE)
        return out

    def saved_in(self, b0, b1):
        """The saved blocks of [b0, b1), in order."""
        return list(self.slots_in(b0, b1))

    def groups(self, per, count):
        """A 0/1 map of count groups of per blocks (group g: blocks
        [g * per, (g + 1) * per)), 1 where a block of the group is saved:
        one slice compare per group and chunk, not a look per block."""
        out = bytearray(count)
        for base, c, lo, hi in self._pieces(0, count * per, True):
            for g in range((base + lo) // per, (base + hi - 1) // per + 1):
                a = max(g * per - base, lo)
                e = min((g + 1) * per - base, hi)
                if c[a:e] != self._EMPTY[:e - a]:
                    out[g] = 1
        return out

    def items(self):
        end = (max(self._chunks, default=-1) + 1) * self.CHUNK
        return iter(self.slots_in(0, end).items())

    def __iter__(self):
        return (b for b, _ in self.items())

    def __eq__(self, other):
        return dict(self.items()) == dict(other.items())

    def __repr__(self):
        return "<SavedBlocks {!r}>".format(dict(self.items()))


class SaveAreaFull(errors.Error):
    msg = ("the save area of session {name!r} is full ({blocks} blocks of "
           "{block} bytes); the session was unmarked")
    errno = errno.ENOSPC


class SaveAreaUnreadable(errors.Error):
    msg = ("the save area holds no frozen image this version can read "
           "({reason}); the session was unmarked, and its next transfer "
           "sends every extent the mark had to send")
    errno = errno.EIO


class SaveArea:
    """Old data of blocks written while marked, in a backend (layout in
    the design notes).  slots (SavedBlocks): block -> its data slot
    (ZERO_SLOT for a block saved as zeroes), the saves durable so far."""

    HEADER = struct.Struct("<8sIIQI")
    MAGIC = b"CLSAVE02"
    VERSION = 2
    HEADER_BYTES = 4096
    # tag, first block, first slot (ZERO_ENTRY: zeroes), count, crc32 of
    # the data, crc32 of the entry's first 28 bytes.
    ENTRY = struct.Struct("<QQIIII")
    ZERO_ENTRY = 0xFFFFFFFF
    ZERO_SLOT = -1
    # Entries read at a time at load.
    LOAD_CHUNK = 1 << 20

    def __init__(self, backend, extents, granularity):
        self.backend = backend
        self.block = min(BLOCK, granularity)
        self.blocks = extents * (granularity // self.block)
        self.capacity = self._capacity(backend.size, self.block)
        self.entries_bytes = self._entries_bytes(self.capacity)
        self.slots = SavedBlocks()
        self.next_entry = 0
        self.next_slot = 0
        self.tag = 0
        self._zero_crc = {}
        # Taking slots; taking and writing entries (in the order taken).
        self._lock = threading.Lock()
        # The header holds a tag no entry carries, durably: a quiet reset
        # (no writer) since which nothing was stored; the next quiet
        # reset (a mark right after the create) writes nothing.
        self.empty = False
        # Group commit of the saves (see the design notes); the error of
        # a failed flush is kept until reset.
        self._group = GroupCommit(lambda: self.backend.flush())

    @classmethod
    def _entries_bytes(cls, capacity):
        return (capacity * cls.ENTRY.size + 4095) // 4096 * 4096

    @classmethod
    def _capacity(cls, size, block):
        """Blocks a save area of size bytes holds (an entry each)."""
        n = max(0, (size - cls.HEADER_BYTES) // (block + cls.ENTRY.size))
        while n and cls.HEADER_BYTES + cls._entries_bytes(n) + \
                n * block > size:
            n -= 1
        return min(n, cls.ZERO_ENTRY - 1)

    @classmethod
    def minimum_size(cls, extents, granularity):
        """The size that holds one extent's blocks."""
        block = min(BLOCK, granularity)
        per = granularity // block
        return cls.HEADER_BYTES + cls._entries_bytes(per) + granularity

    @classmethod
    def size_for(cls, extents, granularity):
        """The size that holds every block of extents extents."""
        n = extents * (granularity // min(BLOCK, granularity))
        return cls.HEADER_BYTES + cls._entries_bytes(n) + \
            extents * granularity

    @staticmethod
    def former_default_size(extents, granularity):
        """The default size of a save area of the former layout, which
        saved whole extents (an index of 8 bytes an extent, then the
        extents): too small for this layout's entries."""
        return (extents * 8 + 4095) // 4096 * 4096 + extents * granularity

    def _slot_offset(self, slot):
        return self.HEADER_BYTES + self.entries_bytes + slot * self.block

    def _entry_offset(self, entry):
        return self.HEADER_BYTES + entry * self.ENTRY.size

    def _header(self):
        head = self.HEADER.pack(self.MAGIC, self.VERSION, self.block,
                                self.tag, 0)
        crc = zlib.crc32(head[:self.HEADER.size - 4])
        return self.HEADER.pack(self.MAGIC, self.VERSION, self.block,
                                self.tag, crc) + \
            bytes(self.HEADER_BYTES - self.HEADER.size)

    def load(self):
        """Read the saves back (see the design notes); return how many
        entries were dropped.  Raises SaveAreaUnreadable if the header is
        not this version's."""
        # A killed process's saves may be in the page cache only: durable
        # first, or a power cut after the next host write (which no longer
        # saves the block) would take the save away.
        self.backend.flush()
        head = bytearray(self.HEADER.size)
        self.backend.readinto(head, 0)
        magic, version, block, tag, crc = self.HEADER.unpack(head)
        if magic != self.MAGIC or version != self.VERSION or \
                crc != zlib.crc32(head[:self.HEADER.size - 4]):
            raise SaveAreaUnreadable(reason="no header of format {}".format(
                self.VERSION))
        if block != self.block:
            raise SaveAreaUnreadable(reason="blocks of {} bytes, not {}"
                                     .format(block, self.block))
        self.tag = tag
        self.slots = SavedBlocks()
        self.next_entry = self.next_slot = 0
        dropped = 0
        for i, entry in self._entries():
            first, slot, count, data_crc = entry
            self.next_entry = i + 1
            if slot == self.ZERO_ENTRY:
                if data_crc != self._zero_crc_value(count):
                    dropped += 1
                    continue
                self.slots.set_run(first, count, self.ZERO_SLOT)
                continue
            self.next_slot = max(self.next_slot, slot + count)
            data = bytearray(count * self.block)
            self.backend.readinto(data, self._slot_offset(slot))
            if zlib.crc32(data) != data_crc:
                dropped += 1
                continue
            self.slots.set_run(first, count, slot)
        return dropped

    def _entries(self):
        """(index, (first block, slot, count, crc)) of the entries of the
        current tag, from the first until one is not (design notes)."""
        size = self.ENTRY.size
        i = 0
        while i < self.capacity:
            n = min(self.LOAD_CHUNK // size, self.capacity - i)
            buf = bytearray(n * size)
            self.backend.readinto(buf, self._entry_offset(i))
            for k, (tag, first, slot, count, data_crc, crc) in \
                    enumerate(self.ENTRY.iter_unpack(buf)):
                if tag != self.tag or crc != zlib.crc32(
                        buf[k * size:k * size + size - 4]) or \
                        not self._valid(first, slot, count):
                    return
                yield i + k, (first, slot, count, data_crc)
            i += n

    def _valid(self, first, slot, count):
        return count > 0 and first + count <= self.blocks and (
            slot == self.ZERO_ENTRY or slot + count <= self.capacity)

    def reset(self, quiet=False):
        """Forget every save, durably: a new tag in the header (see the
        design notes).  Forgotten in memory even if the header's write
        fails (raised): only a marked session's save area is read, and
        every mark resets it first.  quiet: no store() can run until the
        next reset returns (a create, a mark), so the next quiet reset,
        with nothing stored since, leaves the header as it is.  Any other
        reset (an unmark's, beside a write whose save is in flight) may
        be followed by an entry of the old tag, which load ignores."""
        with self._lock:
            self.slots = SavedBlocks()
            self.next_entry = self.next_slot = 0
            retag = not (quiet and self.empty)
            if retag:
                self.empty = False
                self.tag = int.from_bytes(os.urandom(8), "little") or 1
                header = self._header()
        if retag:
            # Unlocked: a late store of the old mark may land meanwhile,
            # under the new tag; the next mark tags again (empty is
            # False), and nothing reads an unmarked save area.
            self.backend.write(header, 0)
            self.backend.flush()
            self.empty = quiet
        with self._group.lock:
            self._group.reset()

    def _take_slots(self, count):
        with self._lock:
            if self.next_slot + count > self.capacity:
                return None
            self.next_slot += count
            return self.next_slot - count

    def _write_entry(self, first, slot, count, data_crc):
        """Take the next entry and write it; False if none is left."""
        with self._lock:
            if self.next_entry >= self.capacity:
                return False
            head = self.ENTRY.pack(self.tag, first, slot, count, data_crc,
                                   0)[:self.ENTRY.size - 4]
            self.backend.write(head + struct.pack("<I", zlib.crc32(head)),
                               self._entry_offset(self.next_entry))
            self.next_entry += 1
            self.empty = False
            return True

    def store(self, first, data):
        """Save data, whole blocks from block first, to slots of its own;
        return (its first slot, the ticket to wait_durable() for), or
        None if the save area is full."""
        count = len(data) // self.block
        slot = self._take_slots(count)
        if slot is None:
            return None
        self.empty = False
        self.backend.write(data, self._slot_offset(slot))
        if not self._write_entry(first, slot, count, zlib.crc32(data)):
            return None
        # Taken after the writes returned: a flush that begins after this
        # covers them.
        return slot, self._group.ticket()

    def _zero_crc_value(self, count):
        crc = self._zero_crc.get(count)
        if crc is None:
            crc = self._zero_crc[count] = zlib.crc32(
                bytes(count * self.block))
        return crc

    def store_zero(self, first, count):
        """store() of count blocks of zeroes: their entry alone; their
        slot in slots is ZERO_SLOT.  The ticket, or None if full."""
        if not self._write_entry(first, self.ZERO_ENTRY, count,
                                 self._zero_crc_value(count)):
            return None
        return self._group.ticket()

    def wait_durable(self, ticket):
        """Return once the save of ticket (and every earlier one) is
        durable, flushing if no flush is running; raise the error of a
        failed flush."""
        self._group.wait(ticket)

    def readinto(self, first, view, slots=None):
        """Read saved blocks from block first into view (every block it
        reaches in slots: block -> slot, self.slots by default; the last
        may be read in part); consecutive slots in one read."""
        slots = self.slots if slots is None else slots
        view = memoryview(view).cast("B")
        bs = self.block
        n = (len(view) + bs - 1) // bs
        k = 0
        while k < n:
            slot = slots[first + k]
            run = 1
            while k + run < n and slots[first + k + run] == (
                    slot if slot == self.ZERO_SLOT else slot + run):
                run += 1
            part = view[k * bs:min((k + run) * bs, len(view))]
            if slot == self.ZERO_SLOT:
                part[:] = bytes(len(part))
            else:
                self.backend.readinto(part, self._slot_offset(slot))
            k += run

    def used_bytes(self):
        return len(self.slots) * self.block
