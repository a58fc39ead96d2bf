"""Clone groups: one Source LU, up to 8 Clones, and the sync engine.

Design notes
------------
A clone is in one of the states of TRANSITIONS.  While a clone is
`synchronized`, `syncing` or `reverse-syncing` host writes to the Source are
mirrored to it before they are acknowledged; while it is `out-of-sync` or
`fractured`, host writes to the Source set bits in its Delta Map instead, and
a fractured clone is exported under its own name, its writes setting its
own bits.

Interception: the group is the "clones" layer of the Source's I/O stack
(target.iostack): it takes the Source's writes, zeroes, trims and flushes,
and its reads during a reverse sync or a restore; what it writes into the
Source goes `below` it, through sessions and replication.  An LU without
clones has no such layer and pays nothing.

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
A commit swaps in a fresh `track` and takes the delta maps as they are at
that moment, flushes every backend, saves the maps it took (a bit cleared
by a copy during the flush is saved by the next commit: the map is never
newer than the flush that vouches for it), and then writes an activity map
made of `track` and the writes still in flight: everything that may have
landed after the flush.

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

Protected restore (seed 000 figures 4-9, seed 002).  The clone is never
written by the restore; the engine copies Clone -> Source the extents set in
the clone's Delta Map and not in the Protected Restore Map (PRM).  A host
read or write of the Source (or a write to the restoring clone's export)
that touches such an extent first has it copied (copy on demand, COD) by the
requesting thread.  The COD scoreboard (one byte per extent) says which
extents are being copied right now, by the engine or by a COD: an extent is
claimed in it under the group lock, so it is never copied twice, and a
request waiting for extents claimed by someone else waits on the group's
condition until *its* extents are done (the COD queue).  Host writes to the
Source, and writes to the restoring clone's export, set PRM bits before
their data is written; the PRM is made durable at every flush, FUA write and
commit, so a flushed host write is never overwritten by a resumed restore.
Each PRM save flushes the Source first: a bit set for an extent copied on
demand vouches for the copy, and a PRM durable before the copy would leave
the Source's pre-restore bytes there for ever after a power cut.
When no extent is left to copy, the PRM becomes the clone's Delta Map and
the clone stays fractured.  The scoreboard claim is what seed 002's
per-track exclusive lock provides: while an extent is copied nobody reads
or writes it on either side; afterwards no lock is needed, because the
extent is never copied again.

Deliberately ignored: trim on a Source with clones is carried out as a
zero on every side (a trim may leave old data on one side and zeroes on the
other, which would be a divergence the maps do not show); the engine copies
one run at a time (serially, as the seed describes).
"""

import collections
import errno
import logging
import os
import threading
import time

from . import backends, changemap, copier, errors, fsutil, maps

log = logging.getLogger("clonectl.clones")

OUT_OF_SYNC = "out-of-sync"
SYNCING = "syncing"
SYNCHRONIZED = "synchronized"
FRACTURED = "fractured"
REVERSE_SYNCING = "reverse-syncing"
RESTORING = "restoring"
STATES = (OUT_OF_SYNC, SYNCING, SYNCHRONIZED, FRACTURED, REVERSE_SYNCING,
          RESTORING)

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
    # Protected restore: the clone is never written by the restore and
    # stays fractured (and exported) throughout.
    (FRACTURED, "restore"): RESTORING,
    (RESTORING, "restore"): RESTORING,
    (RESTORING, "completed"): FRACTURED,
    (RESTORING, "failed"): RESTORING,
    (OUT_OF_SYNC, "remove"): None,
    (SYNCHRONIZED, "remove"): None,
    (FRACTURED, "remove"): None,
}

MIRRORED = (SYNCING, SYNCHRONIZED, REVERSE_SYNCING)
RUNNING = (SYNCING, REVERSE_SYNCING, RESTORING)
EXPORTED = (FRACTURED, RESTORING)

MAX_CLONES = 8
MIN_GRANULARITY = 2 << 10
MAX_GRANULARITY = 1 << 20
DEFAULT_GRANULARITY = 64 << 10

_HINTS = {
    "fracture": "only a synchronized clone can be fractured",
    "sync": "sync needs an out-of-sync or fractured clone",
    "reverse-sync": "reverse sync needs a fractured clone",
    "restore": "a protected restore needs a fractured clone",
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


class CloneBroken(errors.Error):
    msg = ("cannot {event} clone {name!r}: it is broken ({reason}); put its "
           "file back and restart the server, or remove the clone")
    errno = errno.EIO


class TransitionNotSaved(errors.Error):
    msg = ("clone {name!r} stays {state}: the change to {new} could not be "
           "saved: {reason}")

    def __init__(self, errno, **kwargs):
        super().__init__(**kwargs)
        self.errno = errno


# _transition's default rate: the clone's own.
KEEP = object()


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
        # Why the backing file could not be opened: the clone is kept (its
        # delta map goes on recording the Source's writes) but not used.
        self.broken = None
        self.rate = None  # bytes/s of the running operation, kept on resume
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
    """Counters of one sync, reverse sync or restore, for status.

    How far the job has got, in bytes: done is what it copied (for a
    restore also what hosts had copied on demand); total is done plus what
    is still to copy, never less than what was to copy when the job
    started, and only growing: extents that host writes make dirty again
    (a collision with the copy, a write during a reverse sync) add to it.
    A job resumed by a restarted server starts counting again.
    """

    def __init__(self, kind, dirty, granularity, remaining_bytes=None,
                 cod_start=0):
        self.kind = kind
        self.started = time.monotonic()
        self.extents_at_start = dirty
        self.granularity = granularity
        self.bytes_copied = 0
        self.collisions = 0
        self.retries = 0
        self.finished = None
        self.bytes_total = dirty * granularity if remaining_bytes is None \
            else remaining_bytes
        self.cod_start = cod_start

    def to_dict(self, dirty, remaining_bytes=None, cod_extents=0):
        elapsed = (self.finished or time.monotonic()) - self.started
        done = self.bytes_copied + \
            max(0, cod_extents - self.cod_start) * self.granularity
        rate = done / elapsed if elapsed > 0 else 0.0
        remaining = dirty * self.granularity if remaining_bytes is None \
            else remaining_bytes
        self.bytes_total = max(self.bytes_total, done + remaining)
        return {
            "operation": self.kind,
            "elapsed": round(elapsed, 3),
            "bytes_copied": self.bytes_copied,
            "bytes_done": done,
            "bytes_total": self.bytes_total,
            "rate": round(rate),
            "eta": round(remaining / rate, 1) if rate > 0 and not
            self.finished else None,
            "collisions": self.collisions,
            "retries": self.retries,
        }


class CodStats:
    """Copy-on-demand counters: how often and how long hosts waited."""

    def __init__(self):
        self.requests = 0
        self.extents = 0
        self.queued = 0
        self.waits = collections.deque(maxlen=4096)

    def record(self, seconds, extents):
        self.requests += 1
        self.extents += extents
        self.waits.append(seconds)

    def to_dict(self):
        waits = sorted(self.waits)

        def pct(p):
            if not waits:
                return None
            return round(waits[min(len(waits) - 1, int(p * len(waits)))] * 1e3,
                         3)
        return {"cod_requests": self.requests, "cod_extents": self.extents,
                "cod_queue_depth": self.queued, "cod_wait_p50_ms": pct(0.5),
                "cod_wait_p99_ms": pct(0.99)}


def _all_data(offset, length):
    return [(offset, length, False)]


def _runs_of(extents):
    """Sorted extent numbers -> [(start, end)) runs of consecutive ones."""
    out = []
    for e in extents:
        if out and out[-1][1] == e:
            out[-1][1] = e + 1
        else:
            out.append([e, e + 1])
    return [tuple(r) for r in out]


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
        self.map_dir = map_dir
        self.persist = persist or (lambda name, state, error=None, rate=None:
                                   None)
        self.clones = {}
        self.cond = threading.Condition(threading.Lock())
        # The delta maps, with one activity map for the group.
        self.changes = changemap.ChangeMap(
            os.path.join(map_dir, source.name + ".activity"), granularity,
            self.extents, self.cond, lambda: self._committed_maps(),
            flush=lambda: self._flush_all(),
            after_save=lambda: self._persist_prm())
        self.collided = False
        self.quiesce = False
        self.engine = None
        self.progress = {}
        # Protected restore.
        self.restoring = None
        self.prm = bytearray(self.extents)
        self.prm_file = maps.ActivityFile(
            os.path.join(map_dir, source.name + ".prm"), granularity,
            self.extents)
        self.prm_lock = threading.Lock()
        self.scoreboard = bytearray(self.extents)
        self.cod = CodStats()
        # Test hook: called by the engine between reading and writing a run.
        self.copy_hook = None
        # Tests switch these off to show what each protects against: the
        # retry of collided copies; the Source flush before each PRM save
        # (only matters on power loss, tests/engine/test_powerloss.py).
        # The commit's own switches are the change map's (forwarded below).
        self.retry_collisions = True
        self.flush_before_prm = True

    def _forward(name, owner="changes"):
        return property(
            lambda self: getattr(getattr(self, owner), name),
            lambda self, value: setattr(getattr(self, owner), name, value))

    flush_before_commit = _forward("flush_before_commit")
    snapshot_before_flush = _forward("snapshot_before_flush")
    keep_recent_in_activity = _forward("keep_recent_in_activity")
    region = _forward("region", "_activity")    # extents an activity mark covers
    del _forward

    @property
    def _activity(self):
        return self.changes.activity

    @property
    def activity_file(self):
        return self.changes.activity.file

    def _committed_maps(self):
        return [(c.map_path, c.delta) for c in self.clones.values()]

    def _flush_all(self):
        """The data every clean bit of a commit vouches for, durable."""
        self.below.flush()
        for clone in list(self.clones.values()):
            clone.backend.flush()

    # ------------------------------------------------------------ set-up

    def load(self, clone_records, open_backend):
        """Open the clones and recover their delta maps.

        clone_records: {name: {"state": ..., "file": ...}}.  Returns a list
        of (clone name, message) for maps that were lost or corrupt (those
        clones are set wholly dirty).
        """
        problems = []
        activity, problem = self.changes.recover(required=bool(clone_records))
        if problem is not None and clone_records:
            problems.append((None, problem))
        for name, record in clone_records.items():
            try:
                backend, broken = open_backend(record), None
            except (errors.Error, OSError) as e:
                # One clone's file must not stop the Source and the other
                # clones from being served.
                broken = str(e)
                backend = backends.UnavailableBackend(record.get("file"),
                                                      self.size, broken)
            clone = Clone(self, name, backend, record["state"], None,
                          record.get("file"))
            clone.rate = record.get("rate")
            if broken is not None:
                clone.broken = broken
                clone.paused = True     # never resumed
                problems.append((name, "broken: " + broken))
            try:
                delta = maps.load(clone.map_path, self.granularity,
                                  self.extents)
            except maps.MapCorrupt as e:
                problems.append((name, str(e) + "; every extent will be "
                                 "copied"))
                delta = bytearray(b"\x01" * self.extents)
                clone.error = str(e)
            self.changes.merge(delta, activity)
            clone.delta = delta
            self.clones[name] = clone
        for clone in self.clones.values():
            if clone.state == RESTORING:
                self._recover_restore(clone, problems)
        # Every extent recovered as dirty is now in a delta map: commit them
        # and start a clean activity map.
        self.changes.start()
        for clone in self.clones.values():
            maps.save(clone.map_path, clone.delta, self.granularity)
            if clone.broken and clone.state in (SYNCHRONIZED, SYNCING):
                # Not mirrored any more: from now on the Source's writes
                # set its bits, as after a failed mirrored write.
                self._transition(clone, "mirror-failed" if clone.state ==
                                 SYNCHRONIZED else "failed", clone.broken)
            elif clone.state == SYNCHRONIZED and clone.delta.count(1):
                self._transition(clone, "recovered-dirty", clone.error)
        if self.clones:
            self.attach()
        return problems

    def _recover_restore(self, clone, problems):
        self.restoring = clone
        try:
            self.prm = maps.load(self.prm_file.path, self.granularity,
                                 self.extents, with_crc=False)
            self.prm_file.reset(self.prm)
        except maps.MapCorrupt as e:
            # Without the PRM we cannot tell which extents hosts wrote:
            # copying would overwrite them.  Stop and say so.
            msg = "{}; the restore cannot continue safely and is paused " \
                  "(the Source holds a partial restore)".format(e)
            problems.append((clone.name, msg))
            clone.error = msg
            clone.paused = True
            self.prm = bytearray(b"\x01" * self.extents)

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
        if not self.changes.activity.is_open:
            self.changes.start()
        with self.cond:
            self.clones[name] = clone
        self.attach()
        return clone

    def remove_clone(self, name, persist=None):
        """Remove clone name; persist(), if given, records the removal in
        the inventory first (a failing one raises and removes nothing)."""
        clone = self.clones[name]
        with self.cond:
            self._check(clone, "remove")
            if clone.connections:
                raise CloneInUse(event="remove", name=name,
                                 count=clone.connections)
            if persist is not None:
                persist()
            del self.clones[name]
        paths = [clone.map_path]
        if not self.clones:
            self.detach()
            self.changes.close()
            self.prm_file.close()
            paths += [self.changes.activity.path, self.prm_file.path]
        fsutil.remove_durably(paths)
        return clone

    # The group is the "clones" layer of the Source's I/O stack
    # (target.iostack): everything below it (sessions, replication, the
    # backing file) is `below`.

    @property
    def below(self):
        return self.source.stack.below("clones")

    def link(self, inner):
        pass    # `below` asks the stack: valid before attach and after

    def intercepts(self):
        ops = {"write": self.source_write, "zero": self.source_zero,
               "trim": self.source_trim, "flush": self.source_flush}
        # While the Source shows a clone's data, its allocation says nothing
        # about what a read returns: report data everywhere, or clients that
        # skip holes (nbdcopy, qemu-img convert) would copy zeroes.
        if any(c.state == REVERSE_SYNCING for c in self.clones.values()):
            ops.update(readinto=self.redirected_read, extents=_all_data)
        elif self.restoring is not None:
            ops.update(readinto=self.restore_read, extents=_all_data)
        return ops

    def attach(self):
        self.source.stack.set("clones", self)

    def detach(self):
        self.source.stack.remove("clones", self)

    def _set_read_path(self):
        self.source.stack.refresh()

    # ------------------------------------------------------------ states

    def _check(self, clone, event):
        if clone.broken and event == "remove" and clone.state in RUNNING:
            raise InvalidTransition(
                event=event, name=clone.name, state=clone.state,
                hint="broken: {}; the Source is partly restored from it: put "
                "the file back and restart the server to finish".format(
                    clone.broken))
        if clone.broken and event in _HINTS and event != "remove":
            raise CloneBroken(event=event, name=clone.name,
                              reason=clone.broken)
        if (clone.state, event) not in TRANSITIONS:
            raise InvalidTransition(event=event, name=clone.name,
                                    state=clone.state,
                                    hint=_HINTS.get(event, "not allowed"))

    def _transition(self, clone, event, error=None, rate=KEEP):
        """Save the clone's next state, then take it.

        A save that fails (a full state directory) raises
        TransitionNotSaved and leaves the clone as it was, in memory as on
        disk: a state that hosts could act on (a fractured clone takes
        writes) must not be lost by a restart.  Callers change nothing that
        depends on the new state (exports, read path, engine) before this
        returns.
        """
        self._check(clone, event)
        state = TRANSITIONS[(clone.state, event)]
        rate = clone.rate if rate is KEEP else rate
        try:
            self.persist(clone.name, state, error, rate)
        except (OSError, errors.Error) as e:
            raise TransitionNotSaved(
                name=clone.name, state=clone.state, new=state, reason=e,
                errno=getattr(e, "errno", None) or errno.EIO)
        clone.state = state
        clone.error = error
        clone.rate = rate

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

        def checks():
            self._check(clone, event)
            self._check_group_idle(clone, event)
            if clone.connections:
                raise CloneInUse(event=event, name=name,
                                 count=clone.connections)

        if event == "reverse-sync":
            with self.cond:
                checks()
                self._prepare_restore(clone)
            # The siblings' new bits are durable before the new state is,
            # and so before the engine changes the Source under them.
            self.commit()
        with self.cond:
            checks()
            self._transition(clone, event, rate=rate)
            clone.paused = False
            self._set_read_path()
        return self._launch(clone, rate, run)

    def start_restore(self, name, full=False, rate=None, run=True):
        """Protected restore of the Source from fractured clone name."""
        clone = self.clones[name]
        if self.source.readonly:
            raise errors.ReadOnly(name=self.source.name)
        if clone.backend.size != self.size:
            raise errors.InvalidArgument(
                reason="clone {!r} holds {} bytes and source {!r} {}: a "
                       "restore needs equal sizes".format(
                           name, clone.backend.size, self.source.name,
                           self.size))
        with self.cond:
            self._check(clone, "restore")
            self._check_group_idle(clone, "restore")
            self._check_siblings_split(clone, "restore")
            # Every check passed: only now change anything.
            if clone.state != RESTORING:
                if full:
                    maps.set_range(clone.delta, 0, self.extents)
                self.prm = bytearray(self.extents)
                self.prm_file.reset(self.prm)
            self._prepare_restore(clone, "restore")
        # Maps first (the clone's and the siblings' new bits, an empty
        # PRM), then the state: a crash in between leaves a fractured clone
        # with extra bits, never a restore with bits missing.
        self.commit()
        with self.cond:
            self._check(clone, "restore")
            self._check_group_idle(clone, "restore")
            self._transition(clone, "restore", rate=rate)
            self.restoring = clone
            clone.paused = False
            self._set_read_path()
        return self._launch(clone, rate, run)

    def _check_siblings_split(self, clone, event):
        for other in self.clones.values():
            if other is not clone and other.state in MIRRORED:
                raise SiblingsMirrored(event=event, name=clone.name,
                                       other=other.name, state=other.state)

    def _prepare_restore(self, clone, event="reverse-sync"):
        """Source extents about to change are dirty for every sibling.

        Siblings must not be mirrored: their copy of the Source would
        silently stop being one as the engine rewrites the Source.
        """
        self._check_siblings_split(clone, event)
        for other in self.clones.values():
            if other is not clone:
                for s, e in maps.runs(clone.delta):
                    maps.set_range(other.delta, s, e)

    def _launch(self, clone, rate, run):
        clone.rate = rate
        kind = {REVERSE_SYNCING: "reverse-sync",
                RESTORING: "restore"}.get(clone.state, "sync")
        with self.cond:
            left, left_bytes = self._left(clone)
            self.progress[clone.name] = Progress(
                kind, left, self.granularity, left_bytes, self.cod.extents)
        self.engine = SyncEngine(self, clone, rate)
        log.info("%s of clone %s (%s) started: %d extents of %d bytes to "
                 "copy", kind, clone.name, self.source.name,
                 self.progress[clone.name].extents_at_start, self.granularity)
        if run:
            self.engine.start()
        return self.engine

    def resume(self, run=True):
        """Start the engine for a clone left syncing or reverse-syncing."""
        for clone in self.clones.values():
            if clone.state in RUNNING and not clone.paused:
                self._launch(clone, clone.rate, run)
                return clone

    def fracture(self, name):
        clone = self.clones[name]
        with self.cond:
            if clone.state == SYNCHRONIZED and clone.delta.find(1) >= 0:
                # A mirrored write failed and its out-of-sync state could
                # not be saved then: save it now, the fracture is refused.
                self._transition(clone, "mirror-failed",
                                 "a mirrored write failed")
            self._check(clone, "fracture")
            self.quiesce = True
            try:
                self._drain()
                clone.backend.flush()
                self._transition(clone, "fracture")
            finally:
                self.quiesce = False
                self.cond.notify_all()
        try:
            self.commit()
        except OSError:
            # The fracture is durable and in effect; the writes since are
            # in the activity map until a later commit succeeds.
            log.exception("commit after the fracture of clone %s", name)
        log.info("clone %s (%s) fractured: %d extents differ from the "
                 "source", clone.name, self.source.name, clone.delta.count(1))
        return clone

    def _drain(self):
        """Wait (holding cond, quiesce set) until no write is in flight."""
        while self.changes.in_flight:
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
            token = self.changes.begin(e0, e1)
            if any(c0 < e1 and e0 < c1
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

    def _end(self, token):
        with self.cond:
            self.changes.end(token)
            if self.quiesce and not self.changes.in_flight:
                self.cond.notify_all()

    def _mutate(self, offset, length, apply, fua):
        self.source._check_write(offset, length)
        e0, e1 = self._extent_range(offset, length)
        if self.restoring is not None:
            self.copy_on_demand(e0, e1)
        token, mirrors = self._begin(e0, e1)
        try:
            first = [c for c in mirrors if c.state == REVERSE_SYNCING]
            for clone in first:
                apply(clone.backend)
            try:
                apply(self.below)
            except OSError:
                # The clone has the write, the Source maybe not: dirty, so
                # the engine copies the extent (and reads come from the
                # clone meanwhile).
                with self.cond:
                    for clone in first:
                        maps.set_range(clone.delta, e0, e1)
                raise
            unsaved = None
            for clone in mirrors:
                if clone in first:
                    continue
                try:
                    apply(clone.backend)
                except OSError as e:
                    unsaved = self._mirror_failed(clone, e0, e1, e) or unsaved
            if fua:
                if not self._persist_prm():
                    self.below.flush()
                for clone in mirrors:
                    clone.backend.flush()
            if unsaved is not None:
                raise unsaved
        finally:
            self._end(token)

    def source_write(self, buf, offset, fua=False):
        self._mutate(offset, len(buf), lambda b: b.write(buf, offset), fua)

    def source_zero(self, offset, length, may_trim=False, fast=False,
                    fua=False):
        self._mutate(offset, length, lambda b: b.zero(
            offset, length, may_trim=may_trim, fast=fast), fua)

    def source_trim(self, offset, length, fua=False):
        self.source_zero(offset, length, may_trim=True, fua=fua)

    def source_flush(self):
        if not self._persist_prm():
            self.below.flush()
        for clone in list(self.clones.values()):
            if clone.state in MIRRORED:
                clone.backend.flush()
        self.maybe_commit()

    def redirected_read(self, buf, offset):
        """Source read during a reverse sync: dirty extents from the clone."""
        clone = next((c for c in self.clones.values()
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
        if clone is self.restoring:
            # Seed 002: the Source first gets the clone's point-in-time
            # data for these extents, then the clone write lands.
            self.copy_on_demand(e0, e1)
        token, _ = self._begin(e0, e1, only=clone)
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

    def _mirror_failed(self, clone, e0, e1, exc):
        """The clone misses a write: its bits are set and it stops being
        mirrored.  Returns the TransitionNotSaved of a state that could
        not be saved (the clone stays synchronized, its bits set, until a
        fracture or a restart retries), for the write to fail with once
        the other clones have it."""
        msg = "mirrored write failed: {}".format(exc)
        log.error("clone %s: %s", clone.name, msg)
        with self.cond:
            maps.set_range(clone.delta, e0, e1)
            if clone.state == SYNCHRONIZED:
                try:
                    self._transition(clone, "mirror-failed", msg)
                except TransitionNotSaved as e:
                    log.error("clone %s: %s", clone.name, e)
                    return e
            elif clone.state == SYNCING:
                if self.engine is not None:
                    self.engine.stop(msg)

    # ------------------------------------------------------------ restore

    def _persist_prm(self):
        """Make the PRM durable, the Source data its bits vouch for first.

        A bit set for a copy on demand says the clone's data is on the
        Source; one set for a host write, that the extent is never copied
        again (its data is only promised at the host's flush, which flushes
        the Source here).  Either way the Source is flushed between taking
        the bits and saving them: a copy lands before its bit is set, so
        one fdatasync covers every bit of the save.  Saves are serialized,
        so an older copy of the map never overwrites a newer one.

        Returns whether the Source was flushed (False when no restore
        runs), so that callers flush it only once.
        """
        if self.restoring is None or not self.prm_file.is_open:
            return False
        with self.prm_lock:
            with self.cond:
                prm = bytes(self.prm)
            if self.flush_before_prm:
                self.below.flush()
            self.prm_file.persist(prm, 0, self.extents)
        return self.flush_before_prm

    def _claim(self, clone, e0, e1):
        """Claim in the scoreboard the extents of [e0, e1) still to copy.

        Returns (claimed, busy): extents now ours to copy, and whether some
        are being copied by somebody else.  Called holding cond.
        """
        delta, prm, board = clone.delta, self.prm, self.scoreboard
        claimed, busy = [], False
        e = delta.find(1, e0, e1)
        while e >= 0:
            if not prm[e]:
                if board[e]:
                    busy = True
                else:
                    board[e] = 1
                    claimed.append(e)
            e = delta.find(1, e + 1, e1)
        return claimed, busy

    def restore_copier(self, clone, **kwargs):
        """A copier of Clone -> Source runs, for the engine or a COD."""
        g = self.granularity

        def between(offset, length):
            if self.copy_hook is not None:
                self.copy_hook(None, offset // g, (offset + length + g - 1)
                               // g)
        return copier.Copier(
            clone.backend.readinto, lambda view, offset: self.below.write(
                view, offset), lambda offset, length: self.below.zero(
                offset, length), between=between, **kwargs)

    def _copy_claimed(self, clone, claimed, copy=None):
        """Copy claimed extents Clone -> Source, then release them.
        Returns whether every extent was copied (a cancelled copier stops
        early: the extents stay to copy)."""
        g = self.granularity
        copied = False
        runs = []
        with self.cond:
            for s, e in _runs_of(claimed):
                self.changes.touch(s, e)
                runs.append((s * g, min(e * g, self.size) - s * g))
        try:
            copied = (copy or self.restore_copier(clone)).copy(runs)
        finally:
            with self.cond:
                for e in claimed:
                    self.scoreboard[e] = 0
                    if copied:
                        clone.delta[e] = 0
                for s, e in _runs_of(claimed):
                    self.changes.touch(s, e)
                self.cond.notify_all()
        return copied

    def copy_on_demand(self, e0, e1):
        """Wait until no extent of [e0, e1) is left to restore.

        Extents nobody copies yet are copied here, by the requesting
        thread; extents the engine or another request is copying are waited
        for.  Returns at once when nothing in the range is pending.
        """
        clone = self.restoring
        if clone is None or clone.delta.find(1, e0, e1) < 0:
            return
        started = time.monotonic()
        waited = copies = 0
        with self.cond:
            self.cod.queued += 1
        try:
            while True:
                with self.cond:
                    claimed, busy = self._claim(clone, e0, e1)
                    if not claimed:
                        if not busy:
                            break
                        waited += 1
                        self.cond.wait(1.0)
                        continue
                self._copy_claimed(clone, claimed)
                copies += len(claimed)
        finally:
            with self.cond:
                self.cod.queued -= 1
        if copies or waited:
            self.cod.record(time.monotonic() - started, copies)

    def restore_read(self, buf, offset):
        e0, e1 = self._extent_range(offset, len(buf))
        self.copy_on_demand(e0, e1)
        self.below.readinto(buf, offset)

    def pending_restore(self):
        """Extents still to copy: set in the Delta Map, not in the PRM."""
        clone = self.restoring
        if clone is None:
            return 0
        delta = int.from_bytes(clone.delta, "little")
        prm = int.from_bytes(self.prm, "little")
        return (delta & ~prm).bit_count()

    # ------------------------------------------------------------ commits

    def maybe_commit(self):
        self.changes.maybe_commit()

    def commit(self):
        """Make the delta maps (and the PRM) durable and shrink the
        activity map (target.changemap)."""
        self.changes.commit()

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
            "exported": clone.state in EXPORTED,
            "connections": clone.connections,
            "error": clone.broken or clone.error,
            "broken": clone.broken is not None,
            "operation": None,
        }
        if clone is self.restoring:
            st["restore"] = {"pending_extents": self.pending_restore(),
                             "protected_extents": self.prm.count(1)}
            st["restore"].update(self.cod.to_dict())
        progress = self.progress.get(clone.name)
        if progress is not None:
            left, left_bytes = self._left(clone)
            st["operation"] = progress.to_dict(
                left, left_bytes, self.cod.extents
                if clone is self.restoring else progress.cod_start)
            st["operation"]["running"] = (self.engine is not None and
                                          self.engine.clone is clone and
                                          self.engine.is_alive())
        return st

    def _left(self, clone):
        """(extents, bytes) the clone's operation still has to copy: its
        dirty extents, or while it restores those not protected by host
        writes (the last extent may be shorter than the granularity)."""
        if clone is self.restoring:
            count = self.pending_restore()
            last = clone.delta[-1] and not self.prm[-1]
        else:
            count = clone.delta.count(1)
            last = clone.delta[-1]
        short = self.extents * self.granularity - self.size if last else 0
        return count, count * self.granularity - short

    def clone_map(self, clone):
        """The clone's extents as runs: clean/dirty (differs from the
        Source).  While it restores the Source: pending (still to copy),
        dirty (written by a host since the restore began: never copied,
        it differs from the clone once the restore ends) or clean (the
        same on both: restored already, or never different; the map does
        not keep which)."""
        with self.cond:
            delta = bytes(clone.delta)
            prm = bytes(self.prm) if clone is self.restoring else None
        if prm is None:
            names = {0: "clean", 1: "dirty"}
            code = delta
        else:
            names = {0: "clean", 1: "pending", 2: "dirty", 3: "dirty"}
            code = maps.combine(delta, prm)
        return {"granularity": self.granularity, "size": self.size,
                "runs": maps.kind_runs(code, self.granularity, self.size,
                                       names)}

    def stop_engine(self):
        """Stop a running engine; its state stays, so it resumes later."""
        if self.engine is not None:
            self.engine.stop(None)
            self.engine.join()

    def close(self):
        self.stop_engine()
        if self.clones:
            self.commit()
        self.changes.close()
        self.prm_file.close()
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
        self.restore = clone.state == RESTORING
        self.rate = rate
        self.cursor = 0
        # Extents a step copies at most (tests make it smaller).
        self.chunk = max(1, copier.CHUNK // group.granularity)
        self._stop = threading.Event()
        self.stop_reason = None
        self.thread = None
        # True until the operation completed, failed or was stopped; not
        # tied to the thread, so tests that call step() see the same.
        self.active = True
        chunk = self.chunk * group.granularity
        if self.restore:
            self.copier = group.restore_copier(
                clone, chunk=chunk, rate=rate, cancel=self._stop)
        else:
            self.copier = self._sync_copier(chunk)

    def _sync_copier(self, chunk):
        group, clone = self.group, self.clone
        g = group.granularity
        if self.reverse:
            src = clone.backend
            dst = _Below(group)
        else:
            src = _Below(group)
            dst = clone.backend

        def between(offset, length):
            if group.copy_hook is not None:
                group.copy_hook(self, offset // g,
                                (offset + length + g - 1) // g)

        def progress(length):
            group.progress[clone.name].bytes_copied += length

        return copier.Copier(
            lambda view, offset: src.readinto(view, offset),
            lambda view, offset: dst.write(view, offset),
            lambda offset, length: dst.zero(offset, length), chunk=chunk,
            guard=_CollisionGuard(self), between=between, rate=self.rate,
            progress=progress, cancel=self._stop)

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
                # Keep the progress: a kill -9 resumes from the last commit.
                self.group.maybe_commit()
            if self.stop_reason:
                self.fail(self.stop_reason)
        except Exception as e:
            log.exception("sync of clone %s failed", self.clone.name)
            self.fail("{}: {}".format(type(e).__name__, e))
        finally:
            self.active = False
            progress.finished = time.monotonic()

    def step(self):
        """Copy the next dirty run; return False when none is left."""
        if self.restore:
            return self._restore_step()
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

    def _restore_step(self):
        group = self.group
        with group.cond:
            claimed = self._claim_next()
            if not claimed:
                if group.pending_restore() == 0:
                    return False
                group.cond.wait(0.05)  # the rest is being copied on demand
                return True
        if not group._copy_claimed(self.clone, claimed, self.copier):
            return True     # stopped: run() sees it
        g = group.granularity
        group.progress[self.clone.name].bytes_copied += \
            min(self.group.size, (claimed[-1] + 1) * g) - claimed[0] * g
        self.cursor = claimed[-1] + 1
        return True

    def _claim_next(self):
        """Claim the next run to restore from the cursor (holding cond)."""
        delta, prm, board = self.clone.delta, self.group.prm, \
            self.group.scoreboard
        e = -1
        for start in (self.cursor, 0):
            e = delta.find(1, start)
            while e >= 0 and (prm[e] or board[e]):
                e = delta.find(1, e + 1)
            if e >= 0:
                break
        claimed = []
        while 0 <= e < len(delta) and len(claimed) < self.chunk and \
                delta[e] and not prm[e] and not board[e]:
            board[e] = 1
            claimed.append(e)
            e += 1
        return claimed

    def copy_run(self, s, e):
        g = self.group.granularity
        offset = s * g
        self.copier.copy([(offset, min(e * g, self.group.size) - offset)])

    def finish(self):
        if self.restore:
            return self._finish_restore()
        group = self.group
        group.commit()
        with group.cond:
            if self.clone.delta.count(1):
                return False  # bits came back (a failed mirror): go on
            group._transition(self.clone, "completed")
            group._set_read_path()
            self.active = False
        progress = group.progress[self.clone.name]
        log.info("%s of clone %s (%s) completed: %d bytes in %.1f s, %d "
                 "extents", "reverse-sync" if self.reverse else "sync",
                 self.clone.name, group.source.name, progress.bytes_copied,
                 time.monotonic() - progress.started,
                 progress.extents_at_start)
        return True

    def _finish_restore(self):
        """The PRM becomes the clone's Delta Map; the clone stays fractured.

        Host writes wait (as for a fracture) from the moment the PRM is
        copied until the fractured state is durable: until then recovery
        would resume the restore with the PRM file, so every write must be
        in it; after it, writes set the Delta Map bits themselves.
        """
        group, clone = self.group, self.clone
        with group.cond:
            if group.pending_restore():
                return False
            group.quiesce = True
            try:
                group._drain()
                clone.delta[:] = group.prm
            except BaseException:
                group.quiesce = False
                group.cond.notify_all()
                raise
        try:
            group.commit()  # the new Delta Map and the PRM, durable
            with group.cond:
                group._transition(clone, "completed", rate=None)
                group.restoring = None
                group._set_read_path()
                self.active = False
        finally:
            with group.cond:
                group.quiesce = False
                group.cond.notify_all()
        progress = group.progress[clone.name]
        log.info("restore of clone %s (%s) completed: %d bytes in %.1f s, "
                 "%d extents", clone.name, group.source.name,
                 progress.bytes_copied, time.monotonic() - progress.started,
                 progress.extents_at_start)
        return True

    def fail(self, message):
        group = self.group
        log.error("%s of clone %s (%s) failed: %s", getattr(
            group.progress.get(self.clone.name), "kind", "sync"),
            self.clone.name, group.source.name, message)
        with group.cond:
            if self.clone.state in RUNNING:
                try:
                    group._transition(self.clone, "failed", message)
                except TransitionNotSaved as e:
                    # The engine stops all the same; the state on disk
                    # (a running operation) resumes it after a restart.
                    log.error("clone %s: %s", self.clone.name, e)
                self.clone.paused = self.clone.state in RUNNING
                group._set_read_path()
            self.active = False
        try:
            group.commit()
        except OSError:
            log.exception("commit after failed sync")


class _Below:
    """The Source below the clones layer, looked up at each request (the
    stack changes when sessions or replication come and go)."""

    def __init__(self, group):
        self.group = group

    def readinto(self, buf, offset):
        self.group.below.readinto(buf, offset)

    def write(self, buf, offset):
        self.group.below.write(buf, offset)

    def zero(self, offset, length):
        self.group.below.zero(offset, length)


class _CollisionGuard:
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
            self.token = group.changes.copy_begin(s, e)
            group.collided = any(a0 < e and s < a1 for a0, a1
                                 in group.changes.in_flight.values())

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
