"""The layers replication puts in its volumes' I/O stacks (target.iostack).

On a primary, ReplicationLayer orders every change through the group (SRL,
DCMs) before it reaches the volume.  On a secondary, Guard is the outermost
layer: reads wait for a batch being applied and are refused while the
group is inconsistent; writes from above are refused (replication writes
below it).  RegionLock orders a secondary's applies and host reads.  See
docs/replication.md.
"""

import bisect
import contextlib
import threading

from .. import errors, iostack
from .wire import TRIM, WRITE, ZERO

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
        self.inner.flush()


class Guard(iostack.Layer):
    """A secondary volume's guard, the outermost layer of its LU's I/O
    stack: a read waits for the batch being applied and is refused while
    the volume is inconsistent; a write from above is refused, whatever
    connection it came on (one opened before the LU became a secondary's
    included): the volume is written by replication only, which enters
    below the guard."""

    def __init__(self, group, lu):
        self.group = group
        self.lu = lu
        self.vol = group.volumes.index(lu)

    def intercepts(self):
        return {"readinto": self.readinto, "write": self.refuse,
                "zero": self.refuse, "trim": self.refuse}

    def readinto(self, buf, offset):
        with self.group.lock.reading(self.vol, offset, len(buf)):
            self.group.check_readable(self.lu)
            self.inner.readinto(buf, offset)

    def refuse(self, *args, **kwargs):
        raise errors.ReadOnly(name=self.lu.name)


class Regions:
    """Regions of volumes, [(vol, offset, length)] merged per volume into
    sorted, disjoint runs, asked whether they overlap a range; None stands
    for everything."""

    def __init__(self, runs):
        self.all = runs is None
        self.vols = {}
        if runs is None:
            return
        by_vol = {}
        for vol, off, n in runs:
            if n > 0:
                by_vol.setdefault(vol, []).append((off, off + n))
        for vol, spans in by_vol.items():
            spans.sort()
            starts, ends = [], []
            for a, b in spans:
                if ends and a <= ends[-1]:
                    ends[-1] = max(ends[-1], b)
                else:
                    starts.append(a)
                    ends.append(b)
            self.vols[vol] = (starts, ends)

    def overlaps(self, vol, off, n):
        if self.all:
            return True
        runs = self.vols.get(vol)
        if runs is None or n <= 0:
            return False
        starts, ends = runs
        i = bisect.bisect_right(ends, off)
        return i < len(starts) and starts[i] < off + n

    def meets(self, other):
        if self.all or other.all:
            return True
        for vol, (starts, ends) in other.vols.items():
            for a, b in zip(starts, ends):
                if self.overlaps(vol, a, b - a):
                    return True
        return False


class RegionLock:
    """A secondary's applies against its host reads, by region: an apply
    holds the regions its batch changes, a read waits only for an apply
    that overlaps it (never for one elsewhere), and an apply waits for the
    overlapping reads in progress, so no read sees part of a batch in its
    range.  Used as a plain context manager it holds everything (a change
    of the group's state, a sample of every volume)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.applying = []          # Regions held by applies
        self.reads = []             # (vol, offset, length) being read
        self.whole = {}             # thread id -> Regions of `with lock`

    @contextlib.contextmanager
    def reading(self, vol, offset, length):
        me = (vol, offset, length)
        with self.cond:
            while any(r.overlaps(vol, offset, length)
                      for r in self.applying):
                self.cond.wait()
            self.reads.append(me)
        try:
            yield
        finally:
            with self.cond:
                self.reads.remove(me)
                self.cond.notify_all()

    @contextlib.contextmanager
    def writing(self, runs):
        """Hold runs ([(vol, offset, length)], or None: everything)."""
        mine = self._hold(Regions(runs))
        try:
            yield
        finally:
            self._release(mine)

    def _hold(self, mine):
        with self.cond:
            while any(r.meets(mine) for r in self.applying):
                self.cond.wait()
            # Held from here: reads that start now wait for it.
            self.applying.append(mine)
            try:
                while any(mine.overlaps(*r) for r in self.reads):
                    self.cond.wait()
            except BaseException:
                self.applying.remove(mine)
                self.cond.notify_all()
                raise
        return mine

    def _release(self, mine):
        with self.cond:
            self.applying.remove(mine)
            self.cond.notify_all()

    def __enter__(self):
        mine = self._hold(Regions(None))
        self.whole[threading.get_ident()] = mine

    def __exit__(self, *exc):
        self._release(self.whole.pop(threading.get_ident()))
