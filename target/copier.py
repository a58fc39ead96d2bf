"""The copy engine: copy runs of bytes from a reader to a writer.

Design notes
------------
Every engine that copies a volume's extents somewhere (sync, reverse sync,
restore, copy on demand, a session transfer, a replication replay) copies
with a Copier: it owns the chunking, the zero detection, the throttle and
the cancellation; the engine owns which runs to copy and what a copied run
means for its maps.

- Chunking: a run is read and written CHUNK bytes at a time, into one
  buffer the copier keeps; writes go out in `piece`-byte pieces (WRITE_PIECE
  by default: on kernels with large page-cache folios, later small host
  writes into a range filled with 1 MiB writes cost several times more).
- Holes: given the reader's `extents(offset, length)` (the backend
  interface's [(offset, length, is_hole)]: SEEK_DATA/SEEK_HOLE of a file,
  the allocation below an LU's layers), the hole parts of a chunk are
  zeroed without being read; only its data parts are read.  The query is
  made after `begin`, like the read, so a host write that fills a hole
  meanwhile is a collision like any other.
- Zero detection: the data read is checked piece by piece; all-zero pieces
  (and the holes next to them) go out as one zero(offset, length) (the
  writer leaves or punches a hole: a copy is as sparse as its Source), not
  as data.  The check is one memcmp against a zero buffer, so a data piece
  costs nothing (it differs in its first bytes) and a zero piece about
  what reading it cost.
- The guard, when given, is told of each chunk before it is read
  (`begin`) and after it is written, zeroed or failed (`end`: a zero run
  is a write); `end` returning False means "copy this chunk again" (a
  host write collided with it).  An
  engine clears its map bits in `end`, so the bits are cleared only for
  data that was written: cancelling at any point leaves the maps valid.
- Cancellation (`cancel`, an Event) is checked between chunks; copy()
  returns False when it stopped early.
- Throttle: at most `rate` bytes per second on average since the copier
  was made, by waiting on `cancel` (so a cancel ends the wait) between the
  chunks of one copy() call, never after its last chunk: an engine that
  holds something across a call (a restore holds its claims on the
  extents, and host I/O on them waits for it) releases it first and then
  calls throttle() itself.  `idle`, when given, is called every
  `idle_interval` seconds of such a wait, and as soon as `wait(timeout)`
  (default: the cancel event's) returns early (a replication link keeps
  its connection alive and its stream going while its replay is
  throttled, and wakes for a host write at once).
- Progress: progress(length) after each chunk written, retries included;
  zeroed holes count like copied data.

Deliberately ignored: one chunk at a time, synchronously; an asynchronous
copier keeps this interface (runs in, guard/progress callbacks out) and
pipelines the chunks inside.  See docs/design.md.
"""

import hashlib
import threading
import time

CHUNK = 1 << 20
WRITE_PIECE = 64 << 10

_ZEROS = memoryview(bytes(CHUNK))


def is_zero(buf, length, start=0):
    """Whether length bytes of bytearray buf from start are all zero."""
    zeros = _ZEROS if length <= len(_ZEROS) else memoryview(bytes(length))
    return buf.startswith(zeros[:length], start)


def digest(view):
    """The checksum by which a verify compares one extent on two sides
    (locally, or across the replication link)."""
    return hashlib.blake2b(view, digest_size=16).digest()


class Copier:
    """Copies runs [(offset, length)] with read(view, offset) into
    write(view, offset), or zero(offset, length) for zero pieces and for
    the holes extents(offset, length) reports (neither read nor written as
    data)."""

    def __init__(self, read, write, zero=None, chunk=CHUNK,
                 piece=WRITE_PIECE, guard=None, between=None, rate=None,
                 progress=None, cancel=None, extents=None, idle=None,
                 idle_interval=0.1, wait=None):
        self.read = read
        self.write = write
        self.zero = zero
        # Holes are only skipped when they can be zeroed.
        self.extents = extents if zero is not None else None
        self.chunk = chunk
        self.piece = piece
        self.guard = guard
        # Called between reading and writing a chunk (tests race host
        # writes with the copy there).
        self.between = between
        self.rate = rate
        self.idle = idle
        self.idle_interval = idle_interval
        self.progress = progress
        self.cancel = cancel or threading.Event()
        # wait(timeout): True once cancelled.
        self.wait = wait or self.cancel.wait
        self.started = time.monotonic()
        self.bytes_done = 0
        self._buf = bytearray(0)

    def copy(self, runs):
        """Copy every run; False if cancelled before the end."""
        first = True
        for offset, length in runs:
            end = offset + length
            while offset < end:
                if not first:
                    self.throttle()
                if self.cancel.is_set():
                    return False
                first = False
                n = min(self.chunk, end - offset)
                if not self._copy_chunk(offset, n):
                    return False
                offset += n
        return True

    def _copy_chunk(self, offset, length):
        if len(self._buf) < length:
            self._buf = bytearray(length)
        view = memoryview(self._buf)[:length]
        while True:
            if self.guard is not None:
                self.guard.begin(offset, length)
            written = False
            try:
                parts = self.extents(offset, length) if self.extents \
                    else ((offset, length, False),)
                for start, n, hole in parts:
                    if not hole:
                        self.read(view[start - offset:start - offset + n],
                                  start)
                if self.between is not None:
                    self.between(offset, length)
                self._write(view, offset, parts)
                written = True
            finally:
                again = self.guard is not None and \
                    self.guard.end(offset, length, written) is False
            self.bytes_done += length
            if self.progress is not None:
                self.progress(length)
            if not again:
                return True
            if self.cancel.is_set():
                return False    # the guard left the chunk dirty

    def _write(self, view, offset, parts):
        """Data pieces as writes; holes and zero pieces, merged, as zero."""
        zero_from = None    # start of the zero run not written yet
        for start, n, hole in parts:
            if hole:
                if zero_from is None:
                    zero_from = start
                continue
            pos, end = start, start + n
            while pos < end:
                # Pieces on the chunk's grid, wherever the data starts.
                stop = min(end, pos - (pos - offset) % self.piece +
                           self.piece)
                if self.zero is not None and \
                        is_zero(self._buf, stop - pos, pos - offset):
                    if zero_from is None:
                        zero_from = pos
                else:
                    if zero_from is not None:
                        self.zero(zero_from, pos - zero_from)
                        zero_from = None
                    self.write(view[pos - offset:stop - offset], pos)
                pos = stop
        if zero_from is not None:
            self.zero(zero_from, offset + len(view) - zero_from)

    def throttle(self):
        while self.rate:
            ahead = self.bytes_done / self.rate - \
                (time.monotonic() - self.started)
            if ahead <= 0:
                return
            if self.idle is None:
                self.cancel.wait(ahead)
                return
            if self.wait(min(ahead, self.idle_interval)):
                return
            self.idle()
