"""The layers replication puts in its volumes' I/O stacks (target.iostack).

On a primary, ReplicationLayer orders every change through the group (SRL,
DCMs) before it reaches the volume, and TakeGuard is the outermost layer
while the primary takes a secondary's changes.  On a secondary, Guard is
the outermost layer: reads wait for the update being applied and are
refused while the group is inconsistent; writes from above are refused
(replication writes below it).  See docs/replication.md.
"""

import bisect
import logging
import threading

from .. import errors, iostack
from .wire import TRIM, WRITE, ZERO

log = logging.getLogger("clonectl.replication")


class ReplicationLayer(iostack.Layer):
    """A volume's layer in its LU's I/O stack (target.iostack): every
    change is ordered through the group (SRL, DCM) before it reaches the
    volume below; reads pass through."""

    def __init__(self, group, vol):
        self.group = group
        self.vol = vol

    def intercepts(self):
        return {"write": self.write, "zero": self.zero, "trim": self.trim,
                "flush": self.flush}

    def write(self, buf, offset):
        self.group.change(self.vol, WRITE, offset, len(buf), buf,
                          lambda: self.inner.write(buf, offset))

    def zero(self, offset, length, may_trim=False, fast=False):
        self.group.change(self.vol, ZERO, offset, length, None,
                          lambda: self.inner.zero(offset, length,
                                                  may_trim=may_trim,
                                                  fast=fast))

    def trim(self, offset, length):
        self.group.change(self.vol, TRIM, offset, length, None,
                          lambda: self.inner.trim(offset, length))

    def flush(self):
        self.group.flush_log()
        try:
            self.inner.flush()
        except OSError as e:
            # The group replays what the volume may have lost (its own
            # flushes hear of the failure too: Backend.reopen).
            try:
                self.group.volume_flush_failed(self.vol, e)
            except Exception:
                log.exception("group %s: volume %d: a failed flush could "
                              "not be handled", self.group.name, self.vol)
            raise


class Guard(iostack.Layer):
    """A secondary volume's guard, the outermost layer of its LU's I/O
    stack: a read waits for the update being applied and is refused while
    the volume is inconsistent; a write from above is refused, whatever
    connection it came on (one opened before the LU became a secondary's
    included): the volume is written by replication only, which enters
    below the guard."""

    def __init__(self, group, lu):
        self.group = group
        self.lu = lu

    def intercepts(self):
        return {"readinto": self.readinto, "write": self.refuse,
                "zero": self.refuse, "trim": self.refuse}

    def readinto(self, buf, offset):
        with self.group.lock:
            self.group.check_readable(self.lu)
            self.inner.readinto(buf, offset)

    def refuse(self, *args, **kwargs):
        raise errors.ReadOnly(name=self.lu.name)


class TakeGuard(iostack.Layer):
    """A primary volume's outermost layer while the primary takes a
    secondary's changes (split-brain policy discard-zero-changes): the
    secondary's data is written below it region by region (take), and the
    bytes hosts changed in a region since the take was decided are newer
    than that data, so they are put into it (written(a, b): those parts of
    [a, b), which the group notes as each host change is made).

    One lock per volume orders a take with the host writes, zeroes and
    trims into regions not taken yet: each is wholly before or after the
    take's write of its region in every layer below (a clone mirrors what
    the volume gets).  Host requests elsewhere only look at the list of
    regions left, which only shrinks.

    A host write that entered the stack before the guard was installed
    is done before the take begins (the stack's `set` waits for it).  The
    take writes through `below`, the stack's entry beneath the guard, so
    a layer put in meanwhile (a first clone) waits for its writes too.
    """

    def __init__(self, regions, written, below):
        """regions: [(start, end)] of this volume to take, sorted and
        disjoint; below: the volume's stack.below("guard")."""
        self.lock = threading.Lock()
        self.left = list(regions)
        self.written = written
        self.below = below

    def intercepts(self):
        return {"write": self.write, "zero": self.zero, "trim": self.trim}

    def _host(self, offset, length, request):
        if not overlap(self.left, offset, offset + length):
            return request()
        with self.lock:
            return request()

    def write(self, buf, offset, fua=False):
        self._host(offset, len(buf),
                   lambda: self.inner.write(buf, offset, fua))

    def zero(self, offset, length, may_trim=False, fast=False, fua=False):
        self._host(offset, length, lambda: self.inner.zero(
            offset, length, may_trim, fast, fua))

    def trim(self, offset, length, fua=False):
        self._host(offset, length,
                   lambda: self.inner.trim(offset, length, fua))

    def take(self, data, offset):
        """Write the secondary's data at offset, with the bytes hosts
        changed there since the take was decided in place of its own.
        Only a region still to take is written (a secondary sending
        another one is refused, not trusted)."""
        end = offset + len(data)
        with self.lock:
            if overlap(self.left, offset, end) != [(offset, end)]:
                raise errors.ProtocolError(
                    reason="the secondary sent {} bytes at {} that were not "
                    "asked for".format(len(data), offset))
            buf = bytearray(data)
            for a, b in self.written(offset, end):
                piece = bytearray(b - a)
                self.below.readinto(piece, a)
                buf[a - offset:b - offset] = piece
            self.below.write(buf, offset, False)
            self.left = without(self.left, offset, end)


def runs_without(runs, vol, offset, length):
    """runs ([vol, offset, length]) without [offset, offset + length) of
    volume vol."""
    out = []
    for v, o, n in runs:
        parts = [(o, o + n)] if v != vol else \
            without([(o, o + n)], offset, offset + length)
        out += [[v, a, b - a] for a, b in parts]
    return out


def merged(intervals):
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def overlap(intervals, a, b):
    """The parts of [a, b) in intervals (sorted, disjoint)."""
    i = max(bisect.bisect_right(intervals, (a,)) - 1, 0)
    found = []
    for s, e in intervals[i:]:
        if s >= b:
            break
        if e > a:
            found.append((max(s, a), min(e, b)))
    return found


def without(intervals, a, b):
    """intervals without [a, b) (a new list: readers without the lock see
    the old one or the new one)."""
    out = []
    for s, e in intervals:
        if e <= a or s >= b:
            out.append((s, e))
            continue
        if s < a:
            out.append((s, a))
        if e > b:
            out.append((b, e))
    return out
