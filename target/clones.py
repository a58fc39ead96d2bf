"""Clone groups: one Source LU, up to 8 Clones, and the sync engine.

Design notes
------------
A clone is in one of the states of TRANSITIONS.  While a clone is
`synchronized`, `syncing` or `reverse-syncing` host writes to the Source are
mirrored to it before they are acknowledged; while it is `out-of-sync` or
`fractured`, host writes to the Source set bits in its Delta Map instead, and
a fractured clone is exported under its own name, its writes setting its
own bits.

Interception: CloneGroup.attach() replaces the Source LU's write, zero,
trim and flush attributes (and read, during a reverse sync) with the group's
own; an LU without clones pays nothing.

Persistence (DESIGN.md section 3.3).  Each clone's Delta Map is committed
whole at flush points (at most once per COMMIT_INTERVAL), when an operation
ends and on close.  Between commits the group's activity map, on disk, holds
every extent that may have been written since the last commit: before a
write touches a region (ACTIVITY_REGION bytes) not yet marked there, the
whole region is marked and made durable (DRBD's activity log).  Recovery sets
each clone's Delta Map to its committed map OR the activity map: a superset
bounded by the recently written regions.  Because the activity map is shared
by the group, recovery may set a bit in one clone's map because another
clone's export was written (seed figure 9); that only costs a re-copy.

A commit must not forget an extent whose write is not yet durable.  The
group keeps `track`, the extents written (by hosts or by the engine) since
the current commit began; a write marks it when it begins and when it ends.
A commit swaps in a fresh `track`, flushes every backend, saves the delta
maps, and then writes an activity map made of `track` and the writes still
in flight: everything that may have landed after the flush.

Collisions (seed 000, figures 10-11).  Host writes register their extents
in `active` while they run; the engine registers the run it copies in
`copying`.  Any overlap in time sets `collided`, and the engine copies the
run again once it is done, until a copy overlaps no host write.  Host writes
are never queued for this.  A mirrored write goes Source first, Clone second,
except during a reverse sync where the Clone (the reference the Source is
being restored from) is written first, so a crash between the two leaves
the newer data where the engine will copy it from.

Fracture quiesces: new writes wait while writes in flight drain, so no
write is half-mirrored at the fracture point.

Deliberately ignored: trim on a Source with clones is carried out as a
zero on every side (a trim may leave old data on one side and zeroes on the
other, which would be a divergence the maps do not show); the engine copies
one run at a time (serially, as the seed describes).
"""

import errno
import logging
import os
import threading
import time

from . import backends, errors, maps

log = logging.getLogger("clonectl.clones")

OUT_OF_SYNC = "out-of-sync"
SYNCING = "syncing"
SYNCHRONIZED = "synchronized"
FRACTURED = "fractured"
REVERSE_SYNCING = "reverse-syncing"
STATES = (OUT_OF_SYNC, SYNCING, SYNCHRONIZED, FRACTURED, REVERSE_SYNCING)

# (state, event) -> next state.  Anything not listed is refused.
TRANSITIONS = {
    (OUT_OF_SYNC, "sync"): SYNCING,
    (FRACTURED, "sync"): SYNCING,
    (SYNCING, "completed"): SYNCHRONIZED,
    (SYNCING, "failed"): OUT_OF_SYNC,
    (SYNCHRONIZED, "fracture"): FRACTURED,
    (SYNCHRONIZED, "mirror-failed"): OUT_OF_SYNC,
    (SYNCHRONIZED, "recovered-dirty"): SYNCING,
    (FRACTURED, "reverse-sync"): REVERSE_SYNCING,
    # A failed reverse sync keeps redirecting reads (the Source is partly
    # restored); running reverse-sync again resumes it.
    (REVERSE_SYNCING, "reverse-sync"): REVERSE_SYNCING,
    (REVERSE_SYNCING, "completed"): SYNCHRONIZED,
    (REVERSE_SYNCING, "failed"): REVERSE_SYNCING,
    (OUT_OF_SYNC, "remove"): None,
    (SYNCHRONIZED, "remove"): None,
    (FRACTURED, "remove"): None,
}

MIRRORED = (SYNCING, SYNCHRONIZED, REVERSE_SYNCING)
RUNNING = (SYNCING, REVERSE_SYNCING)

MAX_CLONES = 8
MIN_GRANULARITY = 2 << 10
MAX_GRANULARITY = 1 << 20
DEFAULT_GRANULARITY = 64 << 10
ACTIVITY_REGION = 4 << 20
COPY_CHUNK = 1 << 20
COMMIT_INTERVAL = 1.0

_HINTS = {
    "fracture": "only a synchronized clone can be fractured",
    "sync": "sync needs an out-of-sync or fractured clone",
    "reverse-sync": "reverse sync needs a fractured clone",
    "remove": "wait until the operation has finished",
}


class InvalidTransition(errors.Error):
    msg = "cannot {event} clone {name!r}: it is {state} ({hint})"
    errno = errno.EINVAL


class GroupBusy(errors.Error):
    msg = ("cannot {event} clone {name!r}: clone {other!r} of the same "
           "group is {state}; one operation per group at a time")
    errno = errno.EBUSY


class SiblingsMirrored(errors.Error):
    msg = ("cannot {event} clone {name!r}: clone {other!r} of the same "
           "source is {state}; fracture it first (the Source is about to "
           "change under it)")
    errno = errno.EBUSY


class AlreadyRunning(errors.Error):
    msg = "cannot {event} clone {name!r}: it is already running"
    errno = errno.EALREADY


class CloneInUse(errors.Error):
    msg = "cannot {event} clone {name!r}: its export has {count} connection(s)"
    errno = errno.EBUSY


def check_granularity(value):
    if not (MIN_GRANULARITY <= value <= MAX_GRANULARITY) or \
            value & (value - 1):
        raise errors.InvalidArgument(
            reason="granularity must be a power of two from 2K to 1M, not "
                   "{}".format(value))
    return value


class Clone:

    def __init__(self, group, name, backend, state, delta, file=None):
        self.group = group
        self.name = name
        self.backend = backend
        self.state = state
        self.delta = delta
        self.file = file
        self.error = None
        # A reverse sync that failed keeps its state (reads stay redirected)
        # but is not resumed until asked to (or the target restarts).
        self.paused = False
        self.connections = 0
        self.export = CloneExport(self)

    @property
    def map_path(self):
        return os.path.join(self.group.map_dir, self.name + ".delta")


class CloneExport:
    """The LU-like face of a fractured clone, served under its own name."""

    def __init__(self, clone):
        self.clone = clone
        self.name = clone.name
        self.readonly = False
        self.read = clone.backend.readinto

    @property
    def size(self):
        return self.clone.group.size

    def write(self, buf, offset, fua=False):
        self.clone.group.clone_write(self.clone, offset, len(buf),
                                     lambda b: b.write(buf, offset), fua)

    def zero(self, offset, length, may_trim=False, fast=False, fua=False):
        self.clone.group.clone_write(
            self.clone, offset, length,
            lambda b: b.zero(offset, length, may_trim=may_trim, fast=fast), fua)

    def trim(self, offset, length, fua=False):
        self.zero(offset, length, may_trim=True, fua=fua)

    def flush(self):
        self.clone.backend.flush()
        self.clone.group.maybe_commit()

    def extents(self, offset, length):
        return self.clone.backend.extents(offset, length)


class Progress:
    """Counters of one sync or reverse sync, for status."""

    def __init__(self, kind, dirty, granularity):
        self.kind = kind
        self.started = time.monotonic()
        self.extents_at_start = dirty
        self.granularity = granularity
        self.bytes_copied = 0
        self.collisions = 0
        self.retries = 0
        self.finished = None

    def to_dict(self, dirty):
        elapsed = (self.finished or time.monotonic()) - self.started
        rate = self.bytes_copied / elapsed if elapsed > 0 else 0.0
        remaining = dirty * self.granularity
        return {
            "operation": self.kind,
            "elapsed": round(elapsed, 3),
            "bytes_copied": self.bytes_copied,
            "rate": round(rate),
            "eta": round(remaining / rate, 1) if rate > 0 and not
            self.finished else None,
            "collisions": self.collisions,
            "retries": self.retries,
        }


class CloneGroup:
    """A Source LU and its clones, with their maps and the sync engine.

    persist(clone_name, state) records a clone's state in the inventory; it
    is called after the maps that state relies on are committed.
    """

    def __init__(self, source, granularity, map_dir, persist=None):
        self.source = source
        self.size = source.size
        self.granularity = check_granularity(granularity)
        self.extents = maps.extent_count(self.size, granularity)
        self.region = max(1, ACTIVITY_REGION // granularity)
        self.map_dir = map_dir
        self.persist = persist or (lambda name, state, error=None: None)
        self.clones = {}
        self.cond = threading.Condition(threading.Lock())
        self.commit_lock = threading.Lock()
        self.active = {}
        self._next_token = 0
        self.copying = None
        self.collided = False
        self.quiesce = False
        self.track = bytearray(self.extents)
        self.activity = bytearray(self.extents)
        self.activity_file = maps.ActivityFile(
            os.path.join(map_dir, source.name + ".activity"), granularity,
            self.extents)
        self.last_commit = 0.0
        self.engine = None
        self.progress = {}
        # Test hook: called by the engine between reading and writing a run.
        self.copy_hook = None
        # Tests switch this off to show what the retry protects against.
        self.retry_collisions = True

    # ------------------------------------------------------------ set-up

    def load(self, clone_records, open_backend):
        """Open the clones and recover their delta maps.

        clone_records: {name: {"state": ..., "file": ...}}.  Returns a list
        of (clone name, message) for maps that were lost or corrupt (those
        clones are set wholly dirty).
        """
        problems = []
        try:
            activity = maps.load(self.activity_file.path, self.granularity,
                                 self.extents, with_crc=False)
        except maps.MapCorrupt as e:
            if clone_records:
                problems.append((None, str(e)))
            activity = bytearray(b"\x01" * self.extents) if clone_records \
                else bytearray(self.extents)
        for name, record in clone_records.items():
            clone = Clone(self, name, open_backend(record), record["state"],
                          None, record.get("file"))
            try:
                delta = maps.load(clone.map_path, self.granularity,
                                  self.extents)
            except maps.MapCorrupt as e:
                problems.append((name, str(e) + "; every extent will be "
                                 "copied"))
                delta = bytearray(b"\x01" * self.extents)
                clone.error = str(e)
            for s, e in maps.runs(activity):
                maps.set_range(delta, s, e)
            clone.delta = delta
            self.clones[name] = clone
        # Every extent recovered as dirty is now in a delta map: commit them
        # and start a clean activity map.
        self.activity_file.reset(self.activity)
        for clone in self.clones.values():
            maps.save(clone.map_path, clone.delta, self.granularity)
            if clone.state == SYNCHRONIZED and clone.delta.count(1):
                self._transition(clone, "recovered-dirty", clone.error)
        if self.clones:
            self.attach()
        return problems

    def add_clone(self, name, backend, file=None):
        if len(self.clones) >= MAX_CLONES:
            raise errors.InvalidArgument(
                reason="source {!r} already has {} clones, the maximum"
                .format(self.source.name, MAX_CLONES))
        if backend.size < self.size:
            raise errors.InvalidArgument(
                reason="clone backing of {} bytes is smaller than source "
                       "{!r} of {} bytes".format(backend.size,
                                                 self.source.name, self.size))
        delta = bytearray(b"\x01" * self.extents)
        clone = Clone(self, name, backend, OUT_OF_SYNC, delta, file)
        maps.save(clone.map_path, delta, self.granularity)
        if self.activity_file.fd < 0:
            self.activity_file.reset(self.activity)
        with self.cond:
            self.clones[name] = clone
        self.attach()
        return clone

    def remove_clone(self, name):
        clone = self.clones[name]
        with self.cond:
            self._check(clone, "remove")
            if clone.connections:
                raise CloneInUse(event="remove", name=name,
                                 count=clone.connections)
            del self.clones[name]
        for path in (clone.map_path,):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if not self.clones:
            self.detach()
            self.activity_file.close()
            try:
                os.unlink(self.activity_file.path)
            except FileNotFoundError:
                pass
        return clone

    def attach(self):
        lu = self.source
        lu.write = self.source_write
        lu.zero = self.source_zero
        lu.trim = self.source_trim
        lu.flush = self.source_flush
        self._set_read_path()

    def detach(self):
        lu = self.source
        for attr in ("write", "zero", "trim", "flush"):
            lu.__dict__.pop(attr, None)
        lu.read = lu.backend.readinto

    def _set_read_path(self):
        redirect = any(c.state == REVERSE_SYNCING for c in self.clones.values())
        self.source.read = self.redirected_read if redirect \
            else self.source.backend.readinto

    # ------------------------------------------------------------ states

    def _check(self, clone, event):
        if (clone.state, event) not in TRANSITIONS:
            raise InvalidTransition(event=event, name=clone.name,
                                    state=clone.state,
                                    hint=_HINTS.get(event, "not allowed"))

    def _transition(self, clone, event, error=None):
        self._check(clone, event)
        clone.state = TRANSITIONS[(clone.state, event)]
        clone.error = error
        self.persist(clone.name, clone.state, error)

    def _check_group_idle(self, clone, event):
        for other in self.clones.values():
            if other is not clone and other.state in RUNNING:
                raise GroupBusy(event=event, name=clone.name,
                                other=other.name, state=other.state)
        if self.engine is not None and self.engine.is_alive():
            if self.engine.clone is clone:
                raise AlreadyRunning(event=event, name=clone.name)
            raise GroupBusy(event=event, name=clone.name,
                            other=self.engine.clone.name,
                            state=self.engine.clone.state)

    def start_sync(self, name, rate=None, run=True):
        return self._start(name, "sync", rate, run)

    def start_reverse_sync(self, name, rate=None, run=True):
        if self.source.readonly:
            raise errors.ReadOnly(name=self.source.name)
        return self._start(name, "reverse-sync", rate, run)

    def _start(self, name, event, rate, run):
        clone = self.clones[name]
        with self.cond:
            self._check(clone, event)
            self._check_group_idle(clone, event)
            if clone.connections:
                raise CloneInUse(event=event, name=name,
                                 count=clone.connections)
            if event == "reverse-sync":
                self._prepare_restore(clone)
            self._transition(clone, event)
            clone.paused = False
            self._set_read_path()
        if event == "reverse-sync":
            # The siblings' new bits must be durable before the engine
            # changes the Source under them.
            self.commit()
        return self._launch(clone, rate, run)

    def _prepare_restore(self, clone):
        """Source extents about to change are dirty for every sibling.

        Siblings must not be mirrored: their copy of the Source would
        silently stop being one as the engine rewrites the Source.
        """
        for other in self.clones.values():
            if other is not clone and other.state in MIRRORED:
                raise SiblingsMirrored(event="reverse-sync", name=clone.name,
                                       other=other.name, state=other.state)
        for other in self.clones.values():
            if other is not clone:
                for s, e in maps.runs(clone.delta):
                    maps.set_range(other.delta, s, e)

    def _launch(self, clone, rate, run):
        kind = "reverse-sync" if clone.state == REVERSE_SYNCING else "sync"
        self.progress[clone.name] = Progress(kind, clone.delta.count(1),
                                             self.granularity)
        self.engine = SyncEngine(self, clone, rate)
        if run:
            self.engine.start()
        return self.engine

    def resume(self, run=True):
        """Start the engine for a clone left syncing or reverse-syncing."""
        for clone in self.clones.values():
            if clone.state in RUNNING and not clone.paused:
                self._launch(clone, None, run)
                return clone

    def fracture(self, name):
        clone = self.clones[name]
        with self.cond:
            self._check(clone, "fracture")
            self.quiesce = True
            try:
                self._drain()
                clone.backend.flush()
                self._transition(clone, "fracture")
            finally:
                self.quiesce = False
                self.cond.notify_all()
        self.commit()
        return clone

    def _drain(self):
        """Wait (holding cond, quiesce set) until no write is in flight."""
        while self.active:
            self.cond.wait()

    # ------------------------------------------------------------ host I/O

    def _extent_range(self, offset, length):
        g = self.granularity
        return offset // g, (offset + max(length, 1) + g - 1) // g

    def _begin(self, e0, e1, only=None):
        """Register a write of extents [e0, e1); return (token, mirrors).

        only: a fractured clone whose export is written (its bits are set,
        nobody is mirrored); None for a write to the Source.
        """
        with self.cond:
            while self.quiesce:
                self.cond.wait()
            token = self._next_token
            self._next_token += 1
            self.active[token] = (e0, e1)
            if self.copying is not None and self.copying[0] < e1 \
                    and e0 < self.copying[1]:
                self.collided = True
            maps.set_range(self.track, e0, e1)
            if self.activity.find(0, e0, e1) >= 0:
                self._mark_activity(e0, e1)
            mirrors = []
            if only is not None:
                maps.set_range(only.delta, e0, e1)
            else:
                for clone in self.clones.values():
                    if clone.state in MIRRORED:
                        mirrors.append(clone)
                    else:
                        maps.set_range(clone.delta, e0, e1)
            return token, mirrors

    def _end(self, token, e0, e1):
        with self.cond:
            del self.active[token]
            maps.set_range(self.track, e0, e1)
            if self.quiesce and not self.active:
                self.cond.notify_all()

    def _mark_activity(self, e0, e1):
        """Make extents [e0, e1) (whole regions) durable in the activity map."""
        r = self.region
        s = e0 // r * r
        e = min(self.extents, (e1 + r - 1) // r * r)
        maps.set_range(self.activity, s, e)
        self.activity_file.persist(self.activity, s, e)

    def _mutate(self, offset, length, apply, fua):
        self.source._check_write(offset, length)
        e0, e1 = self._extent_range(offset, length)
        token, mirrors = self._begin(e0, e1)
        try:
            first = [c for c in mirrors if c.state == REVERSE_SYNCING]
            for clone in first:
                apply(clone.backend)
            apply(self.source.backend)
            for clone in mirrors:
                if clone in first:
                    continue
                try:
                    apply(clone.backend)
                except OSError as e:
                    self._mirror_failed(clone, e0, e1, e)
            if fua:
                self.source.backend.flush()
                for clone in mirrors:
                    clone.backend.flush()
        finally:
            self._end(token, e0, e1)

    def source_write(self, buf, offset, fua=False):
        self._mutate(offset, len(buf), lambda b: b.write(buf, offset), fua)

    def source_zero(self, offset, length, may_trim=False, fast=False,
                    fua=False):
        self._mutate(offset, length, lambda b: b.zero(
            offset, length, may_trim=may_trim, fast=fast), fua)

    def source_trim(self, offset, length, fua=False):
        self.source_zero(offset, length, may_trim=True, fua=fua)

    def source_flush(self):
        self.source.backend.flush()
        for clone in list(self.clones.values()):
            if clone.state in MIRRORED:
                clone.backend.flush()
        self.maybe_commit()

    def redirected_read(self, buf, offset):
        """Source read during a reverse sync: dirty extents from the clone."""
        clone = next((c for c in self.clones.values()
                      if c.state == REVERSE_SYNCING), None)
        if clone is None:
            return self.source.backend.readinto(buf, offset)
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
                self.source.backend.readinto(part, pos)
            pos = chunk_end

    def clone_write(self, clone, offset, length, apply, fua):
        if offset < 0 or length < 0 or offset + length > self.size:
            raise errors.OutOfRange(name=clone.name, offset=offset,
                                    length=length, size=self.size)
        if clone.state != FRACTURED:
            raise errors.ReadOnly(name=clone.name)
        e0, e1 = self._extent_range(offset, length)
        token, _ = self._begin(e0, e1, only=clone)
        try:
            apply(clone.backend)
            if fua:
                clone.backend.flush()
        finally:
            self._end(token, e0, e1)

    def _mirror_failed(self, clone, e0, e1, exc):
        msg = "mirrored write failed: {}".format(exc)
        log.error("clone %s: %s", clone.name, msg)
        with self.cond:
            maps.set_range(clone.delta, e0, e1)
            if clone.state == SYNCHRONIZED:
                self._transition(clone, "mirror-failed", msg)
            elif clone.state == SYNCING:
                if self.engine is not None:
                    self.engine.stop(msg)

    # ------------------------------------------------------------ commits

    def maybe_commit(self):
        if time.monotonic() - self.last_commit >= COMMIT_INTERVAL:
            self.commit()

    def commit(self):
        """Make the delta maps durable and shrink the activity map."""
        with self.commit_lock:
            with self.cond:
                self.track = bytearray(self.extents)
                clones = list(self.clones.values())
            self.source.backend.flush()
            for clone in clones:
                clone.backend.flush()
            for clone in clones:
                maps.save(clone.map_path, bytes(clone.delta), self.granularity)
            with self.cond:
                keep = bytearray(self.track)
                for e0, e1 in self.active.values():
                    maps.set_range(keep, e0, e1)
                if self.copying is not None:
                    maps.set_range(keep, *self.copying)
                activity = bytearray(self.extents)
                r = self.region
                for s, e in maps.runs(keep):
                    maps.set_range(activity, s // r * r,
                                   min(self.extents, (e + r - 1) // r * r))
                self.activity_file.reset(activity)
                self.activity = activity
            self.last_commit = time.monotonic()

    # ------------------------------------------------------------ status

    def clone_status(self, clone):
        dirty = clone.delta.count(1)
        st = {
            "name": clone.name,
            "source": self.source.name,
            "state": clone.state,
            "size": self.size,
            "file": clone.file,
            "granularity": self.granularity,
            "extents_total": self.extents,
            "extents_dirty": dirty,
            "bytes_dirty": min(self.size, dirty * self.granularity),
            "exported": clone.state == FRACTURED,
            "connections": clone.connections,
            "error": clone.error,
            "operation": None,
        }
        progress = self.progress.get(clone.name)
        if progress is not None:
            st["operation"] = progress.to_dict(dirty)
            st["operation"]["running"] = (self.engine is not None and
                                          self.engine.clone is clone and
                                          self.engine.is_alive())
        return st

    def stop_engine(self):
        """Stop a running engine; its state stays, so it resumes later."""
        if self.engine is not None:
            self.engine.stop(None)
            self.engine.join()

    def close(self):
        self.stop_engine()
        if self.clones:
            self.commit()
        self.activity_file.close()
        for clone in self.clones.values():
            clone.backend.close()


class SyncEngine:
    """Copies the dirty extents of one clone, serially from start to end.

    step() copies one run and is what tests drive; start() runs the steps in
    a thread until the map is clean or stop() is called.
    """

    def __init__(self, group, clone, rate=None):
        self.group = group
        self.clone = clone
        self.reverse = clone.state == REVERSE_SYNCING
        self.rate = rate
        self.cursor = 0
        self.chunk = max(1, COPY_CHUNK // group.granularity)
        self.buf = bytearray(self.chunk * group.granularity)
        self._stop = threading.Event()
        self.stop_reason = None
        self.thread = None
        # True until the operation completed, failed or was stopped; not
        # tied to the thread, so tests that call step() see the same.
        self.active = True

    def start(self):
        self.thread = threading.Thread(target=self.run, daemon=True,
                                       name="sync-" + self.clone.name)
        self.thread.start()

    def is_alive(self):
        return self.active

    def stop(self, reason):
        self.stop_reason = reason
        self._stop.set()

    def join(self, timeout=None):
        if self.thread is not None and \
                self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def run(self):
        progress = self.group.progress[self.clone.name]
        try:
            while not self._stop.is_set():
                if not self.step():
                    if self.finish():
                        self.group.resume()
                        return
                    continue
                self._throttle(progress)
            if self.stop_reason:
                self.fail(self.stop_reason)
        except Exception as e:
            log.exception("sync of clone %s failed", self.clone.name)
            self.fail("{}: {}".format(type(e).__name__, e))
        finally:
            self.active = False
            progress.finished = time.monotonic()

    def _throttle(self, progress):
        if self.rate:
            ahead = progress.bytes_copied / self.rate - \
                (time.monotonic() - progress.started)
            if ahead > 0:
                self._stop.wait(ahead)

    def step(self):
        """Copy the next dirty run; return False when none is left."""
        delta = self.clone.delta
        s = delta.find(1, self.cursor)
        if s < 0:
            s = delta.find(1, 0)
            if s < 0:
                return False
        e = delta.find(0, s, min(len(delta), s + self.chunk))
        if e < 0:
            e = min(len(delta), s + self.chunk)
        self.copy_run(s, e)
        self.cursor = e
        return True

    def copy_run(self, s, e):
        group = self.group
        progress = group.progress[self.clone.name]
        g = group.granularity
        offset = s * g
        length = min(e * g, group.size) - offset
        src, dst = (self.clone.backend, group.source.backend) if self.reverse \
            else (group.source.backend, self.clone.backend)
        view = memoryview(self.buf)[:length]
        while True:
            with group.cond:
                group.copying = (s, e)
                group.collided = any(a0 < e and s < a1
                                     for a0, a1 in group.active.values())
                maps.set_range(group.track, s, e)
            copied = False
            try:
                src.readinto(view, offset)
                if group.copy_hook is not None:
                    group.copy_hook(self, s, e)
                dst.write(view, offset)
                copied = True
            finally:
                with group.cond:
                    collided = group.collided and group.retry_collisions
                    group.copying = None
                    maps.set_range(group.track, s, e)
                    if copied and not collided:
                        self.clone.delta[s:e] = bytes(e - s)
            progress.bytes_copied += length
            if not collided:
                return
            progress.collisions += 1
            progress.retries += 1

    def finish(self):
        group = self.group
        group.commit()
        with group.cond:
            if self.clone.delta.count(1):
                return False  # bits came back (a failed mirror): go on
            group._transition(self.clone, "completed")
            group._set_read_path()
            self.active = False
        log.info("clone %s: %s completed", self.clone.name,
                 "reverse sync" if self.reverse else "sync")
        return True

    def fail(self, message):
        group = self.group
        with group.cond:
            if self.clone.state in RUNNING:
                group._transition(self.clone, "failed", message)
                self.clone.paused = self.clone.state in RUNNING
                group._set_read_path()
            self.active = False
        try:
            group.commit()
        except OSError:
            log.exception("commit after failed sync")


def open_backend(path, readonly=False):
    return backends.FileBackend(path, readonly)
