"""Host I/O through the clones layer: mirroring, delta bits, collisions.

Design notes
------------
The clone group is the "clones" layer of the Source's I/O stack
(target.iostack): it takes the Source's writes, zeroes, trims and flushes,
and its reads during a reverse sync or a restore; what it writes into the
Source goes `below` it, through sessions and replication.  An LU without
clones has no such layer and pays nothing.

Every write registers its extents in the group's change map
(target.changemap) while it runs: durable in the activity map first, then
the data.  A write to the Source is mirrored to every MIRRORED clone before
it is acknowledged and sets the Delta Map bits of the others (the PRM bits
of a restoring clone); a write to a fractured clone's export sets that
clone's bits.  A mirrored write goes Source first, Clone second, except
during a reverse sync where the Clone (the reference the Source is being
restored from) is written first, so a crash between the two leaves the
newer data where the engine will copy it from.

Collisions: the engine waits until no host write of the run it is about
to copy is in flight, then registers the run (copy_begin); a host
write that begins while it is copied sets `collided`, and the engine
copies the run again (CollisionGuard, the copier's guard) until a copy
overlaps no host write.  Host writes are never queued for this.

Quiescing: a fracture, a clone's removal, a restore's or reverse sync's
switch and a restore's end hold new writes back while those in flight
drain (a count, `quiesce`: two may drain at once), so no write is
half-mirrored at the fracture point and no leg writes a removed clone.

Failures: a clean bit vouches that clone and Source hold the same data, so
a request that fails part way must not leave one side changed under a
clean bit.  A Source write that fails (perhaps after a short write) gives
its mirrors what the Source holds there now; a mirror leg that fails
marks the clone and stops mirroring it.  A flush that fails may have lost
whatever its backend got since the last commit (a failed fdatasync drops
the pages it could not write, and the next one succeeds without them):
those extents (ChangeMap.unflushed) are marked, in the clone whose flush
failed, or in every clone when it was the Source's; never in a restoring
clone, which the restore does not write and whose bits would restore an
extent again over the hosts' writes.

Deferred legs: the mirror legs of a large write (DEFER_MIN to DEFER_MAX
bytes) are written by the group's leg thread once the Source has it, and
the host's write is acknowledged then: one connection's requests run one at
a time, and the next one is received while the clone is written (a 1 MiB
write's second page-cache copy is most of the difference with no clone).
The leg reads the Source's range back through the stack below and writes
that, so the request's buffer (nbdkit's, gone when the request returns) is
not kept.  The write stays registered (in flight, in the activity map)
until its legs are done, so every path that waits for writes in flight
waits for them: an overlapping write, a fracture, a restore's or reverse
sync's switch, an engine's collision check; a crash before the leg leaves
the extents in the activity map, resynchronized like any write cut short.
A host flush first waits for the legs queued before it, so what it
vouches for is on the clones too.  A leg that fails marks the clone as an
inline one does; a state that could not be saved then fails the next
flush instead of the write (already acknowledged).  Never deferred: FUA
writes, zeroes, and writes while a clone reverse-syncs or restores (the
clone is written first, or the Source's reads are redirected).

Overlapping writes to the Source are ordered: a write waits while another
write of any of its extents is in flight.  Two hosts may write the same
block at once (NBD lets either win), but both legs of a mirror must see
the same winner: unordered, the later write could reach Source and clone
while the earlier one is still on its way to the clone, leaving the clone
with the other data and no bit set.  Writes to different extents never
wait for each other.

Deliberately ignored: trim on a Source with clones is carried out as a
zero on every side (a trim may leave old data on one side and zeroes on the
other, a divergence the maps would not show).  See docs/design.md.
"""

import concurrent.futures
import contextlib
import errno
import functools
import logging
import threading

from .. import copier, errors, maps
from .model import EXPORTED, MIRRORED, REVERSE_SYNCING, SYNCHRONIZED, \
    SYNCING, TransitionNotSaved

log = logging.getLogger("clonectl.clones")

# A failed Source write's range is read back for its mirrors in pieces of
# this size; a larger range than READ_BACK_MAX (a zero or trim may cover a
# whole disk) drops them out of sync instead.
READ_BACK_CHUNK = 1 << 20
READ_BACK_MAX = 64 << 20

# Writes whose mirror legs are deferred (module notes).  Below DEFER_MIN
# the hand-off to the leg thread costs about what the copy does; above
# DEFER_MAX the leg's read-back buffer would be large.  At most
# DEFER_QUEUE legs wait: then a write waits for a place, so the clones lag
# the Source by a bounded amount and a flush waits a bounded time.
DEFER_MIN = 128 << 10
DEFER_MAX = 8 << 20
DEFER_QUEUE = 16


class DeferredLegs:
    """The leg thread of a group: runs legs in the order given, at most
    DEFER_QUEUE waiting.  A one-worker ThreadPoolExecutor is FIFO, which
    is what lets wait() stand for "every leg queued before"; its worker is
    started before the first leg is queued, because a thread that fails to
    start would leave that leg queued and the caller unsure of it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pool = None
        self._closed = False
        self._places = threading.BoundedSemaphore(DEFER_QUEUE)
        self._buf = bytearray()

    def buffer(self, length):
        """A buffer for the running leg's read-back (one leg runs at a
        time: it is reused)."""
        if len(self._buf) < length:
            self._buf = bytearray(length)
        return memoryview(self._buf)[:length]

    def submit(self, leg):
        """Queue leg(); False if it cannot be (closed, no thread, the
        interpreter shutting down): the caller writes its legs itself."""
        with self._lock:
            if self._closed:
                return False
            if self._pool is None:
                pool = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="clone-legs")
                try:
                    pool.submit(lambda: None).result()
                except RuntimeError:
                    return False
                self._pool = pool
        self._places.acquire()

        def run():
            try:
                leg()
            finally:
                self._places.release()
        with self._lock:
            try:
                if not self._closed:
                    self._pool.submit(run)
                    return True
            except RuntimeError:
                pass
        self._places.release()
        return False

    def wait(self):
        """Return once every leg queued before has ended."""
        with self._lock:
            pool, closed = self._pool, self._closed
        if pool is None:
            return
        try:
            if not closed:
                pool.submit(lambda: None).result()
                return
        except RuntimeError:
            pass    # shutting down: wait for every leg queued
        pool.shutdown(wait=True)

    def close(self):
        """Wait for the legs queued; later ones are refused (submit)."""
        with self._lock:
            self._closed = True
            pool = self._pool
        if pool is not None:
            pool.shutdown(wait=True)


class Mirroring:
    """CloneGroup's host I/O (a part of CloneGroup, target.clones.group)."""

    def _drain(self):
        """Wait (holding cond, quiesce counted) until no write is in
        flight."""
        while self.changes.in_flight:
            self.cond.wait()

    @contextlib.contextmanager
    def _quiesced(self):
        """(Holding cond.)  The block runs with new writes held back and
        none in flight (the drain lets go of cond: what the caller
        checked before may have changed)."""
        self.quiesce += 1
        try:
            self._drain()
            yield
        finally:
            self.quiesce -= 1
            self.cond.notify_all()

    def _extent_range(self, offset, length):
        g = self.granularity
        return offset // g, (offset + max(length, 1) + g - 1) // g

    def _begin(self, e0, e1, only=None, restoring=None):
        """Register a write of extents [e0, e1); return (token, mirrors).

        only: a fractured clone whose export is written (its bits are set,
        nobody is mirrored); None for a write to the Source.
        restoring: the restoring clone the caller saw (and copied on
        demand for), or None; if another one restores now (a restore
        began while it waited), nothing is registered and (None, None)
        returned: the caller looks again.  (None, []): the last clone was
        removed while the write waited, the layer is gone from the stack
        and its maps closed: the caller enters the stack again.
        """
        with self.cond:
            while self.quiesce or (only is None and self._overlapped(e0, e1)):
                self.overlap_waiters += 1
                try:
                    self.cond.wait()
                finally:
                    self.overlap_waiters -= 1
            if self.restoring is not restoring:
                return None, None
            if only is not None and only.state not in EXPORTED:
                # Admitted before a switch it waited for (a sync or a
                # reverse sync began): the clone is no longer writable.
                raise errors.ReadOnly(name=only.name)
            if restoring is not None and (only is None or only is restoring) \
                    and self._restore_pending(restoring, e0, e1):
                # A failed Source flush marked an extent again since the
                # caller's copy on demand (_mark_lost): copied first.
                return None, None
            if only is None and not self.clones:
                return None, []
            token = self.changes.begin(e0, e1)
            if self.changes.copying and any(
                    c0 < e1 and e0 < c1
                    for c0, c1 in self.changes.copying.values()):
                self.collided = True
            mirrors = []
            if only is not None:
                maps.set_range(self.prm if only is self.restoring
                               else only.delta, e0, e1)
            else:
                for clone in self.clones.values():
                    if clone.state in MIRRORED:
                        mirrors.append(clone)
                    elif clone is self.restoring:
                        maps.set_range(self.prm, e0, e1)
                    else:
                        maps.set_range(clone.delta, e0, e1)
            return token, mirrors

    def copy_begin(self, e0, e1, stopped):
        """(Holding cond.)  Register an engine's copy (or comparison) of
        extents [e0, e1) once no host write of them is in flight, and
        return its token; a write that begins from then on collides
        (_begin).  Begun beside such a write, it would only be made again,
        at once and for as long as the write stays in flight (a deferred
        write stays until its legs are done).  stopped(): the engine was
        asked to stop, which nothing notifies cond of (polled); the copy
        is registered collided then, so it counts for nothing."""
        clear = True
        while self._overlapped(e0, e1):
            if stopped():
                clear = False
                break
            self.overlap_waiters += 1
            try:
                self.cond.wait(0.1)
            finally:
                self.overlap_waiters -= 1
        token = self.changes.copy_begin(e0, e1)
        self.collided = not clear
        return token

    def _overlapped(self, e0, e1):
        """Whether a write of extents overlapping [e0, e1) is in flight."""
        return any(w0 < e1 and e0 < w1
                   for w0, w1 in self.changes.in_flight.values())

    def _end(self, token):
        with self.cond:
            self.changes.end(token)
            if self.overlap_waiters or \
                    (self.quiesce and not self.changes.in_flight):
                self.cond.notify_all()

    def _mutate(self, offset, length, apply, fua, mirror=None, defer=False):
        """apply(backend) the change to the Source and its mirrors;
        mirror(backend), if given, applies it to a mirror written after
        the Source (which has carried it out: the mirror must too).
        defer: the mirrors may be written by the leg thread, with what the
        Source holds (module notes, deferred legs)."""
        mirror = mirror or apply
        self.source.check_write(offset, length)
        e0, e1 = self._extent_range(offset, length)
        token = None
        while token is None:
            restoring = self.restoring
            if restoring is not None:
                self.copy_on_demand(e0, e1)
            token, mirrors = self._begin(e0, e1, restoring=restoring)
            if token is None and mirrors is not None:
                # From the layer's slot down again: a group attached since
                # (a new first clone) registers it.
                entry = self.source.stack.below("guard")
                apply(entry)
                if fua:
                    entry.flush()
                return
        try:
            first = [c for c in mirrors if c.state == REVERSE_SYNCING]
            try:
                for clone in first:
                    apply(clone.backend)
                apply(self.below)
            except Exception as e:
                # The clone has the write (or part of it: a short write),
                # the Source maybe not: dirty, so the engine copies the
                # extent (and reads come from the clone meanwhile).
                with self.cond:
                    for clone in first:
                        maps.set_range(clone.delta, e0, e1)
                if getattr(e, "errno", None) != errno.EOPNOTSUPP:
                    # (EOPNOTSUPP: refused whole, a fast zero the Source
                    # cannot do; nothing changed.)
                    self._source_failed(
                        [c for c in mirrors if c not in first],
                        offset, length, e0, e1, e)
                raise
            # (A partial, not a lambda: a closure here would make this
            # function's locals cells, which every write pays for.)
            if defer and mirrors and not first and not fua and \
                    restoring is None and self.legs.submit(functools.partial(
                        self._deferred_leg, mirrors, offset, length, e0, e1,
                        token)):
                token = None    # the leg ends it
                return
            unsaved = None
            for clone in mirrors:
                if clone in first:
                    continue
                try:
                    mirror(clone.backend)
                except OSError as e:
                    unsaved = self._mirror_failed(clone, e0, e1, e) or unsaved
            if fua:
                if not self._persist_prm():
                    self._flush_source()
                for clone in mirrors:
                    unsaved = self._flush_clone(clone)[1] or unsaved
            if unsaved is not None:
                raise unsaved
        finally:
            if token is not None:
                self._end(token)

    def _deferred_leg(self, mirrors, offset, length, e0, e1, token):
        """The leg thread's part of a deferred write (module notes): the
        mirrors get what the Source holds over the write's range, which
        no other write changes while the write is registered."""
        try:
            try:
                buf = self.legs.buffer(length)
                self.below.readinto(buf, offset)
            except Exception as e:
                buf, failure = None, "the Source could not be read back " \
                    "for the clone ({})".format(e)
            # Each clone on its own: one whose failure cannot be handled
            # must not leave the next one unwritten under clear bits.
            for clone in mirrors:
                try:
                    if buf is None:
                        self._leg_failed(clone, e0, e1, failure)
                        continue
                    try:
                        clone.backend.write(buf, offset)
                    except Exception as e:
                        self._leg_failed(clone, e0, e1, e)
                except BaseException:
                    log.exception("clone %s: a mirror leg of %d bytes at "
                                  "offset %d failed", clone.name, length,
                                  offset)
                    with self.cond:
                        maps.set_range(clone.delta, e0, e1)
        finally:
            self._end(token)

    def _leg_failed(self, clone, e0, e1, exc):
        unsaved = self._mirror_failed(clone, e0, e1, exc)
        if unsaved is not None:
            with self.cond:
                self.legs_unsaved = self.legs_unsaved or unsaved

    def source_write(self, buf, offset, fua=False):
        self._mutate(offset, len(buf), lambda b: b.write(buf, offset), fua,
                     defer=DEFER_MIN <= len(buf) <= DEFER_MAX)

    def source_zero(self, offset, length, may_trim=False, fast=False,
                    fua=False):
        # A fast zero is one the Source may refuse (it changes nothing
        # then); once the Source has zeroed, every mirror zeroes too, cheap
        # there or not (a clone's file system may lack a quick zero).
        self._mutate(offset, length, lambda b: b.zero(
            offset, length, may_trim=may_trim, fast=fast), fua,
            mirror=lambda b: b.zero(offset, length, may_trim=may_trim))

    def source_trim(self, offset, length, fua=False):
        self.source_zero(offset, length, may_trim=True, fua=fua)

    def source_flush(self):
        if not self.clones:
            # Entered as the last clone went: the maps are closed.
            self.source.stack.below("guard").flush()
            return
        # What the flush vouches for includes the legs of the writes
        # acknowledged before it (module notes, deferred legs).
        self.legs.wait()
        if not self._persist_prm():
            self._flush_source()
        unsaved = None
        for clone in list(self.clones.values()):
            if clone.state in MIRRORED:
                unsaved = self._flush_clone(clone)[1] or unsaved
        self.maybe_commit()
        with self.cond:
            unsaved, self.legs_unsaved = unsaved or self.legs_unsaved, None
        if unsaved is not None:
            raise unsaved

    def _flush_source(self):
        """Flush the Source.  A flush that fails may have lost what the
        Source got since the last commit (a failed fdatasync drops the
        pages it could not write), which its clones may have: each clone
        gets those extents' bits (a sync gives it the Source's data again,
        a reverse sync gives the Source the clone's, a restore copies the
        clone's again where no host wrote: _mark_lost), and the error is
        raised."""
        try:
            self.below.flush()
        except OSError:
            with self.cond:
                self._mark_lost(list(self.clones.values()))
                self.flush_failures += 1
            raise

    def _flush_clone(self, clone):
        """Flush a clone.  One whose flush fails may have lost what it got
        since the last commit: those extents are marked in its Delta Map
        and it stops being mirrored (_mirror_failed).  Returns (error,
        unsaved): the flush's OSError (a commit fails with it) and the
        TransitionNotSaved of a state that could not be saved (a host's
        request fails with it; otherwise it succeeds without the clone),
        each None if none.  A reverse-syncing clone's failure is raised
        instead: its bits would copy its losses to the Source, which has
        those writes too.  A restoring clone's marks nothing: the restore
        never writes it (its export's writes set PRM bits), and a bit set
        again over an extent the restore copied would copy it again, over
        host writes made since."""
        try:
            clone.backend.flush()
        except OSError as e:
            if clone.state == REVERSE_SYNCING:
                raise
            if clone is self.restoring:
                return e, None
            with self.cond:
                self._mark_lost([clone])
            return e, self._mirror_failed(clone, 0, 0, e,
                                          what="flush of the clone failed")
        return None, None

    def _mark_lost(self, clones):
        """(Holding cond.)  What a failed flush may have lost is marked in
        clones; a copy running over it does not clear it (collided, and
        for a restore's copies the Source's flush_failures).  A restoring
        clone's marked extents are copied again, except where the PRM has
        a bit: an extent a host wrote since the restore began is never
        copied over (the host's write was in the failed flush too), and a
        write whose copy on demand preceded the mark copies again before
        it sets its bit (_begin)."""
        lost = self.changes.unflushed()
        for clone in clones:
            maps.set_where(clone.delta, lost)
        if self.changes.copying:
            self.collided = True

    def _restore_pending(self, clone, e0, e1):
        """(Holding cond.)  Whether an extent of [e0, e1) is still to be
        restored from clone (Delta bit, no PRM bit)."""
        delta, prm = clone.delta, self.prm
        e = delta.find(1, e0, e1)
        while e >= 0:
            if not prm[e]:
                return True
            e = delta.find(1, e + 1, e1)
        return False

    def redirected_read(self, buf, offset):
        """Source read during a reverse sync: dirty extents from the clone."""
        # A copy of the values: a clone added meanwhile (under cond) would
        # end a live iteration with a RuntimeError.
        clone = next((c for c in list(self.clones.values())
                      if c.state == REVERSE_SYNCING), None)
        if clone is None:
            return self.below.readinto(buf, offset)
        view = memoryview(buf).cast("B")
        g = self.granularity
        end = offset + len(view)
        pos = offset
        limit = (end + g - 1) // g
        while pos < end:
            e = pos // g
            dirty = clone.delta[e]
            stop = clone.delta.find(1 - dirty, e + 1, limit)
            if stop < 0:
                stop = limit
            chunk_end = min(end, stop * g)
            part = view[pos - offset:chunk_end - offset]
            if dirty:
                clone.backend.readinto(part, pos)
            else:
                self.below.readinto(part, pos)
            pos = chunk_end

    def clone_write(self, clone, offset, length, apply, fua):
        if offset < 0 or length < 0 or offset + length > self.size:
            raise errors.OutOfRange(name=clone.name, offset=offset,
                                    length=length, size=self.size)
        if clone.state not in EXPORTED:
            raise errors.ReadOnly(name=clone.name)
        e0, e1 = self._extent_range(offset, length)
        token = None
        while token is None:
            restoring = self.restoring
            if clone is restoring:
                # The Source first gets the clone's point-in-time
                # data for these extents, then the clone write lands.
                self.copy_on_demand(e0, e1)
            token, _ = self._begin(e0, e1, only=clone, restoring=restoring)
        try:
            if clone is self.restoring:
                # Protect these extents before the clone changes: a resumed
                # restore must never carry post-restore clone data over.
                self._persist_prm()
            apply(clone.backend)
            if fua:
                self._persist_prm()
                clone.backend.flush()
        finally:
            self._end(token)

    def _source_failed(self, mirrors, offset, length, e0, e1, exc):
        """A write to the Source failed, perhaps after changing part of its
        range (a short write): the mirrors get what the Source holds there
        now (zero pieces as zeroes), so no clear bit hides a difference; a
        mirror that cannot (the Source cannot be read back, the mirror's
        write fails, or the range is larger than READ_BACK_MAX, the size
        of a zero over a whole disk) has its bits set and stops being
        mirrored.  The write's extents are still registered: no other
        write of them runs meanwhile."""
        mirrors = list(mirrors)
        if length > READ_BACK_MAX:
            for clone in mirrors:
                self._mirror_failed(clone, e0, e1, "the Source failed a "
                                    "request of {} bytes ({})".format(
                                        length, exc))
            return
        pos, end = offset, offset + length
        buf = bytearray(min(length, READ_BACK_CHUNK))
        while mirrors and pos < end:
            n = min(end - pos, len(buf))
            view = memoryview(buf)[:n]
            try:
                self.below.readinto(view, pos)
            except Exception as e:
                for clone in mirrors:
                    self._mirror_failed(clone, e0, e1, "the Source failed a "
                                        "write ({}) and could not be read "
                                        "back ({})".format(exc, e))
                return
            zero = copier.is_zero(buf, n)
            for clone in list(mirrors):
                try:
                    if zero:
                        clone.backend.zero(pos, n, may_trim=True)
                    else:
                        clone.backend.write(view, pos)
                except Exception as e:
                    self._mirror_failed(clone, e0, e1, e)
                    mirrors.remove(clone)
            pos += n

    def _mirror_failed(self, clone, e0, e1, exc,
                       what="mirrored write failed"):
        """The clone misses a write (of extents [e0, e1)): its bits are set
        and it stops being mirrored.  Returns the TransitionNotSaved of a
        state that could not be saved (the clone stays synchronized, its
        bits set, until a fracture or a restart retries), for the write to
        fail with once the other clones have it."""
        msg = "{}: {}".format(what, exc)
        log.error("clone %s: %s", clone.name, msg)
        with self.cond:
            maps.set_range(clone.delta, e0, e1)
            if self.clones.get(clone.name) is not clone:
                return None     # removed: no state to save
            if clone.state == SYNCHRONIZED:
                try:
                    self.transition(clone, "mirror-failed", msg)
                except TransitionNotSaved as e:
                    log.error("clone %s: %s", clone.name, e)
                    return e
            elif clone.state == SYNCING:
                if self.engine is not None:
                    self.engine.stop(msg)


class CollisionGuard:
    """The sync engine's copier guard: a chunk whose copy overlapped a
    host write in time is copied again (module notes, collisions); its
    bits are cleared only when a copy overlapped none."""

    def __init__(self, engine):
        self.engine = engine
        self.token = None

    def _extents(self, offset, length):
        g = self.engine.group.granularity
        return offset // g, (offset + length + g - 1) // g

    def begin(self, offset, length):
        group = self.engine.group
        s, e = self._extents(offset, length)
        with group.cond:
            self.token = group.copy_begin(s, e, self.engine.stopping)

    def end(self, offset, length, written):
        group = self.engine.group
        s, e = self._extents(offset, length)
        with group.cond:
            collided = group.collided and group.retry_collisions
            group.changes.copy_end(self.token)
            if written and not collided:
                self.engine.clone.delta[s:e] = bytes(e - s)
        if collided and written:
            progress = group.progress[self.engine.clone.name]
            progress.collisions += 1
            progress.retries += 1
            return False
        return True
