"""The sessions' layer of a Source's I/O stack, and the frozen image export.

Design notes
------------
SessionLayer sees every change to the Source's bytes (host writes, a
secondary's replicated apply, clone engine writes into the Source, trims)
and shows it to each session before it is applied: the session tracks it
and, while marked, saves the old data first (copy on first write).  Reads
and extents pass through; a flush gives sessions a chance to commit their
tracking maps.  An LU without sessions has no such layer and pays nothing.

FrozenExport is the read-only face of a marked session's point in time.  A
connection reads the point in time it connected to, or fails with
FrozenImageGone (ESTALE) once that is gone: never a later mark's image.
See docs/design.md (the order of the I/O stack: target/iostack.py).
"""

import errno

from .. import errors, iostack


class FrozenImageGone(errors.Error):
    msg = "session {name!r} was unmarked; its frozen image is gone"
    errno = errno.ESTALE


class SessionLayer(iostack.Layer):
    """The sessions' layer of the Source's I/O stack: every change is shown
    to every session first (copy on first write, tracking bits).  Reads
    and extents pass through.
    """

    def __init__(self, inner=None):
        self.inner = inner
        # Replaced, never changed in place: writers iterate it unlocked.
        self.sessions = []

    def add(self, session):
        session.layer = self
        self.sessions = self.sessions + [session]

    def remove(self, session):
        self.sessions = [s for s in self.sessions if s is not session]

    def intercepts(self):
        return {"write": self.write, "zero": self.zero, "trim": self.trim,
                "flush": self.flush}

    def _change(self, offset, length, apply):
        sessions = self.sessions
        done = []
        try:
            for s in sessions:
                # Entered first: before_write counts the write in flight
                # before anything in it can fail, and after_write undoes it.
                done.append(s)
                s.before_write(offset, length)
            apply()
        finally:
            for s in done:
                s.after_write()

    def save_ahead(self, runs):
        """Writes of runs ([(offset, length)]) are about to come: every
        session saves what they will change now, with one flush for them
        all (Session.save_ahead), so that the writes wait for none."""
        for s in self.sessions:
            s.save_ahead(runs)

    def write(self, buf, offset):
        self._change(offset, len(buf), lambda: self.inner.write(buf, offset))

    def zero(self, offset, length, may_trim=False, fast=False):
        self._change(offset, length, lambda: self.inner.zero(
            offset, length, may_trim=may_trim, fast=fast))

    def trim(self, offset, length):
        self._change(offset, length, lambda: self.inner.trim(offset, length))

    def flush(self):
        self.inner.flush()
        for s in self.sessions:
            s.maybe_commit()

    def readinto(self, buf, offset):
        self.inner.readinto(buf, offset)

    def extents(self, offset, length):
        return self.inner.extents(offset, length)


class FrozenExport:
    """The LU-like, read-only face of a marked session's point in time."""

    readonly = True

    def __init__(self, session):
        self.session = session
        self.name = session.export_name()
        self.size = session.size
        self.generation = session.generation

    def read(self, buf, offset):
        self.session.read_frozen(buf, offset, self.generation)

    def _refuse(self, *args, **kwargs):
        raise errors.ReadOnly(name=self.name)

    write = zero = trim = _refuse

    def flush(self):
        pass

    def extents(self, offset, length):
        return self.session.frozen_extents(offset, length)
