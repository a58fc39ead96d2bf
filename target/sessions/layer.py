"""The sessions' layer of a Source's I/O stack, and the frozen image export.

Design notes
------------
SessionLayer sees every change to the Source's bytes (host writes, a
secondary's replicated apply, clone engine writes into the Source, trims)
and shows it to each session before it is applied: the session tracks it
and, while marked, saves the old data first (copy on first write).  A
flush gives sessions a chance to commit their tracking maps.  An LU
without sessions has no such layer and pays nothing.

Deferred writes (a write-back of first writes, like a disk's volatile
cache).  NBD lets a server acknowledge a write without FUA before it is
durable, and nbdkit serves one request of a connection at a time, so a
client never has a second first write to share a save's flush with.  A
write that must wait for a save (or an activity map mark) to become
durable is therefore prepared in the request's thread (tracking noted,
the extents to save claimed: Session.prepare_write), queued with a copy
of its data, and acknowledged.  One applier thread per layer (started
when needed, ended by drain(stop=True)) takes the queued writes as a
batch: it copies the old data of them all to the save area
(Session.copy_old_data), then finishes each in order (Session.finish_write:
the first one's wait runs one save-area flush covering the whole batch,
the group commit; the saves then join the frozen image) and only then
writes it to the Source below.  A claim keeps every later write to its
extent off the Source until its write is finished (it waits, or queues
behind), so the old data is still there when the applier copies it, and
the copy is off the request's path (measured: docs/performance.md).  So a
Source write never precedes its durable save, as before; what changes is
when the host is told.
- Order: a read, extents call, zero, trim or write overlapping a queued
  write waits until it is applied (a write that has to wait anyway is
  queued behind it instead); a flush waits for every write queued before
  it, then flushes below: what a flush or FUA covers is durable, saves
  and Source alike.  A write with nothing to wait for that overlaps
  nothing queued goes straight on.  Zero and trim stay synchronous.
- Bounded: MAX_QUEUED writes or MAX_QUEUED_BYTES; a writer beyond waits.
- A deferred write whose finish or Source write fails cannot be reported
  to its request: every later flush fails (DeferredWriteFailed, EIO) for
  as long as the layer lives (until the LU's last session is deleted or
  the target restarts), so no client takes a later flush for a promise
  that covers it.  A failed save still only ends the mark; the write
  applies.
- Only while sessions are the stack's only layer (`relinking`): a clones
  layer above would mirror a write whose Source copy is still queued (a
  kill -9 would leave the two different with no Delta Map bit), a primary's
  replication layer below acknowledges sync writes only once the
  secondary has them, a secondary's guard orders reads against applied
  batches.  Before such a layer is linked the queue is drained.  Reads
  and extents are intercepted only then too (one frame more per read).
- Marks count a queued write as in flight until applied (mark waits for
  it); a session's close, the layer's removal (told by the stack before
  the links change) and the target's stop drain the queue and end the
  applier.  A session added waits for the queue, and for the writes
  shown only to the sessions before it that are still on their way to
  the Source (iostack.Generations): it sees every write applied after it
  came, and every write acknowledged before is on the Source when it
  marks.  A kill -9 loses queued writes, which
  were acknowledged but not flushed, as a power cut can lose any write
  not flushed; the frozen image is unaffected (a save joins it only once
  durable, and its Source write comes after).

FrozenExport is the read-only face of a marked session's point in time.  A
connection reads the point in time it connected to, or fails with
FrozenImageGone (ESTALE) once that is gone: never a later mark's image.
See docs/design.md (the order of the I/O stack: target/iostack.py).
"""

import collections
import errno
import logging
import threading

from .. import errors, iostack

log = logging.getLogger("clonectl.sessions")


class FrozenImageGone(errors.Error):
    msg = "session {name!r} was unmarked; its frozen image is gone"
    errno = errno.ESTALE


class DeferredWriteFailed(errors.Error):
    msg = ("a write acknowledged earlier could not be applied to the Source "
           "({length} bytes at offset {offset}): {reason}; every flush of "
           "this LU fails until its sessions' layer is closed (the last "
           "session deleted, or the target restarted)")
    errno = errno.EIO


class _Queued:
    """A host write acknowledged and queued: applied once the changes
    (Session.prepare_write) of its sessions are finished."""

    __slots__ = ("seq", "offset", "end", "data", "changes", "error")

    def __init__(self, seq, offset, data, changes):
        self.seq = seq
        self.offset = offset
        self.end = offset + len(data)
        self.data = data
        self.changes = changes
        self.error = None       # its old data could not be copied


class SessionLayer(iostack.Layer):
    """The sessions' layer of the Source's I/O stack: every change is shown
    to every session first (copy on first write, tracking bits).

    defer: writes that must wait for a save may be queued (see the design
    notes); in a stack, the stack decides (relinking).
    """

    # The bound of the queue: a writer beyond it waits.
    MAX_QUEUED = 256
    MAX_QUEUED_BYTES = 4 << 20

    def __init__(self, inner=None, defer=False, name=None):
        self.inner = inner
        # Replaced, never changed in place: writers iterate it unlocked.
        self.sessions = []
        self._alone = defer     # no other layer in the stack
        self._defer = defer     # writes may be queued now
        # Held from a deferred write's prepare until it is queued: the
        # queue is in the order the writes claimed extents to save, so
        # the applier never waits for a claim of a write queued after.
        self._order = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._queue = collections.deque()
        self._queued_bytes = 0
        self._queued_seq = 0    # the last write queued
        self._applied_seq = 0   # the last one applied (or failed)
        self._applier = None
        self._stopping = False
        self._failed = None     # DeferredWriteFailed's fields
        # Changes in flight, from before they look at `sessions` until
        # they are on the Source (or queued).
        self._changes = iostack.Generations(
            "LU {}: a session added".format(name))

    def add(self, session):
        """session sees every change applied to the Source from now on:
        the writes queued before it came (acknowledged before it existed,
        so in every point in time it marks) are applied first, and the
        changes shown only to the sessions before it are waited for."""
        session.layer = self
        with self._order:
            self._wait_applied(self._queued_seq)
            self.sessions = self.sessions + [session]
            older = self._changes.advance()
        self._changes.wait(older)

    def remove(self, session):
        self.sessions = [s for s in self.sessions if s is not session]

    def intercepts(self):
        ops = {"write": self.write, "zero": self.zero, "trim": self.trim,
               "flush": self.flush}
        if self._alone:
            # Requests that overlap a queued write wait for it.
            ops.update(readinto=self.readinto, extents=self.extents)
        return ops

    def relinking(self, slots):
        """Deferred only while sessions are the stack's only layer: a
        layer about to be linked would not see the queued writes (a clone
        mirror, a replication log), so they are applied first."""
        self._alone = set(slots) == {"sessions"}
        if not self._alone:
            self.drain(stop=True, defer=False)

    def relinked(self):
        # Only now that reads pass through the layer.
        self._defer = self._alone

    # ------------------------------------------------------------ changes

    def _prepare(self, offset, length):
        """Every session's prepare_write; [(session, change)].  If one
        raises, the others' changes are finished and the write ends."""
        changes = []
        try:
            for s in self.sessions:
                # Listed first: prepare_write counts the write in flight
                # before anything in it can fail, and after_write undoes it.
                changes.append((s, None))
                changes[-1] = (s, s.prepare_write(offset, length))
        except Exception:
            self._abandon(changes)
            raise
        except BaseException:
            self._done(changes)
            raise
        return changes

    @staticmethod
    def _copy(changes):
        for s, change in changes:
            s.copy_old_data(change)

    @staticmethod
    def _finish(changes):
        """finish_write of every change; raise the first error after all
        are finished (each releases the extents it claimed)."""
        error = None
        for s, change in changes:
            try:
                s.finish_write(change)
            except Exception as e:
                error = error or e
        if error is not None:
            raise error

    @staticmethod
    def _done(changes):
        for s, _ in changes:
            s.after_write()

    def _abandon(self, changes):
        """A write that ends before it reaches the Source: its changes
        are finished (their claims released) and it is no longer in
        flight."""
        try:
            self._finish(changes)
        finally:
            self._done(changes)

    def _change(self, offset, length, apply):
        if self._queue:
            self._wait_for(offset, length)
        changes = self._prepare(offset, length)
        try:
            self._copy(changes)
            self._finish(changes)
            apply()
        finally:
            self._done(changes)

    def save_ahead(self, runs):
        """Writes of runs ([(offset, length)]) are about to come: every
        session saves what they will change now, with one flush for them
        all (Session.save_ahead), so that the writes wait for none."""
        for s in self.sessions:
            s.save_ahead(runs)

    def write(self, buf, offset):
        self._changes.run(self._write, buf, offset)

    def _write(self, buf, offset):
        if not self._defer:
            return self._change(offset, len(buf),
                                lambda: self.inner.write(buf, offset))
        with self._order:
            if not self._defer:
                changes = None
            else:
                changes = self._prepare(offset, len(buf))
                try:
                    if any(c is not None and c.waits for _, c in changes) \
                            or self._overlaps(offset, len(buf)):
                        self._enqueue(bytes(buf), offset, changes)
                        return
                except Exception:
                    self._abandon(changes)
                    raise
        if changes is None:
            return self._change(offset, len(buf),
                                lambda: self.inner.write(buf, offset))
        # Nothing to wait for and nothing queued under it: straight on.
        try:
            self.inner.write(buf, offset)
        finally:
            self._done(changes)

    def zero(self, offset, length, may_trim=False, fast=False):
        self._changes.run(self._change, offset, length,
                          lambda: self.inner.zero(offset, length,
                                                  may_trim=may_trim,
                                                  fast=fast))

    def trim(self, offset, length):
        self._changes.run(self._change, offset, length,
                          lambda: self.inner.trim(offset, length))

    def flush(self):
        if self._queue:
            self._wait_applied(self._queued_seq)
        if self._failed is not None:
            raise DeferredWriteFailed(**self._failed)
        self.inner.flush()
        for s in self.sessions:
            s.maybe_commit()

    def readinto(self, buf, offset):
        if self._queue:
            self._wait_for(offset, len(buf))
        self.inner.readinto(buf, offset)

    def extents(self, offset, length):
        if self._queue:
            self._wait_for(offset, length)
        return self.inner.extents(offset, length)

    # ------------------------------------------------------------ the queue

    def _overlaps(self, offset, length):
        end = offset + length
        with self._cond:
            return any(q.offset < end and offset < q.end for q in self._queue)

    def _wait_for(self, offset, length):
        """Wait until the queued writes that overlap [offset, +length)
        are applied."""
        end = offset + length
        with self._cond:
            seq = max((q.seq for q in self._queue
                       if q.offset < end and offset < q.end), default=0)
            while self._applied_seq < seq:
                self._cond.wait()

    def _wait_applied(self, seq):
        with self._cond:
            while self._applied_seq < seq:
                self._cond.wait()

    def _enqueue(self, data, offset, changes):
        """Queue a write (the caller holds _order), waiting while the
        queue is full."""
        with self._cond:
            while self._queue and (
                    len(self._queue) >= self.MAX_QUEUED or
                    self._queued_bytes + len(data) > self.MAX_QUEUED_BYTES):
                self._cond.wait()
            self._queued_seq += 1
            self._queue.append(_Queued(self._queued_seq, offset, data,
                                       changes))
            self._queued_bytes += len(data)
            if self._applier is None:
                self._applier = threading.Thread(
                    target=self._apply_queued, name="session-writes",
                    daemon=True)
                self._applier.start()
            self._cond.notify_all()

    def _apply_queued(self):
        """The applier: queued writes in order.  The first one's save
        waits for a flush of the save area that covers every save written
        before it began: the saves queued meanwhile share it."""
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._stopping:
                        self._cond.wait()
                    if not self._queue:
                        return
                    # Left in the queue until applied: requests over them
                    # wait.
                    batch = list(self._queue)
                self._copy_batch(batch)
                for q in batch:
                    try:
                        self._apply(q)
                    finally:
                        with self._cond:
                            self._queue.popleft()
                            self._queued_bytes -= len(q.data)
                            self._applied_seq = q.seq
                            self._cond.notify_all()
        finally:
            with self._cond:
                if self._applier is threading.current_thread():
                    # Ended by an exception: the next write starts one.
                    self._applier = None

    def _copy_batch(self, batch):
        """The old data of every write of batch to the save areas, before
        the first of them waits for a flush: one flush covers them all.
        Copied only now: until a write's finish its claims keep its
        extents' old data on the Source."""
        for q in batch:
            try:
                self._copy(q.changes)
            except Exception as e:
                # Not an I/O error (copy_old_data keeps those): the write
                # fails, and the applier lives on for the writes after.
                q.error = e

    def _apply(self, q):
        try:
            self._finish(q.changes)
            if q.error is not None:
                # Its old data may not be saved: the Source keeps it.
                raise q.error
            self.inner.write(q.data, q.offset)
        except Exception as e:
            # Acknowledged already: the next flush (and every later one)
            # reports it.
            log.error("a deferred write of %d bytes at offset %d could not "
                      "be applied: %s", len(q.data), q.offset, e)
            if self._failed is None:
                self._failed = {"offset": q.offset, "length": len(q.data),
                                "reason": str(e)}
                # A client that never flushes is not told: the sessions'
                # status is (session status, problems).
                problem = str(DeferredWriteFailed(**self._failed))
                for s in self.sessions:
                    s.problems.append(problem)
        finally:
            self._done(q.changes)

    def drain(self, stop=False, defer=None):
        """Wait until every write queued so far is applied; stop: and end
        the applier thread (a later queued write starts another); defer:
        whether writes may be queued from now on, if given."""
        with self._order:
            if defer is not None:
                self._defer = defer
            with self._cond:
                while self._queue:
                    self._cond.wait()
                applier, self._applier = self._applier, None
                if stop and applier is not None:
                    self._stopping = True
                    self._cond.notify_all()
                else:
                    self._applier = applier
            if stop and applier is not None:
                applier.join()
                with self._cond:
                    self._stopping = False

    def close(self):
        """Taken out of the stack: queued writes applied, the applier
        ended, later writes not deferred."""
        self.drain(stop=True, defer=False)

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
