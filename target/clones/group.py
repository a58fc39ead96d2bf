"""Clone groups: one Source LU, up to 8 clones, their maps and engine.

Design notes
------------
The group owns the clones of one Source, their Delta Maps, the PRM of a
protected restore and the one engine that may run.  It is the "clones"
layer of the Source's I/O stack; its host I/O is in mirroring.py, the
restore and copy on demand in restore.py, the engine in sync.py, the states
in model.py.

Persistence: the Delta Maps are one change map (target.changemap) with one
activity map for the group: committed whole at flush points (at most once
per COMMIT_INTERVAL), when an operation ends and on close, and recovered as
committed OR activity.  Because the activity map is shared by the group,
recovery may set a bit in one clone's map because another clone's export
was written; that only costs a re-copy.  A commit flushes the Source and
every clone before it saves the maps it took, then saves the PRM.

A new state is saved (persist) before it is taken, and after the maps it
relies on are committed; callers change nothing that depends on the new
state before `transition` returns.

Deliberately ignored: one operation (sync, reverse sync, restore) per
group at a time.  See docs/design.md and docs/persistence.md.
"""

import errno
import logging
import os
import threading

from .. import backends, changemap, errors, fsutil, maps
from .model import (EXPORTED, FRACTURED, HINTS, KEEP, MAX_CLONES,
                    OUT_OF_SYNC, RESTORING, REVERSE_SYNCING, RUNNING, SYNCHRONIZED,
                    SYNCING, TRANSITIONS, AlreadyRunning, Clone, CloneBroken,
                    CloneInUse, GroupBusy, InvalidTransition,
                    TransitionNotSaved, check_granularity)
from .mirroring import DeferredLegs, Mirroring
from .restore import CodStats, Restore
from .sync import Progress, SyncEngine
from .verify import VerifyEngine

log = logging.getLogger("clonectl.clones")


def all_data(offset, length):
    return [(offset, length, False)]


class SavedVerify:
    """The last verify of a clone as the inventory kept it."""

    def __init__(self, saved):
        self.saved = dict(saved, running=False)

    def to_dict(self, running=False):
        return dict(self.saved)


class CloneGroup(Mirroring, Restore):
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
        # Operations that hold new writes back while those in flight
        # drain (a count: two may drain at once, and the first to end
        # must not let writes in under the other).
        self.quiesce = 0
        self.overlap_waiters = 0    # writes waiting for an overlapping one
        self.legs = DeferredLegs()
        # A TransitionNotSaved of a deferred leg's failure, for the next
        # host flush to fail with (the write was acknowledged).
        self.legs_unsaved = None
        self.engine = None
        self.progress = {}
        # The online verify (one per group, alone) and the last result of
        # each clone's verify.
        self.verifier = None
        self.verify_results = {}
        # record_verify(clone_name, result dict): keeps the last result of
        # a verify in the inventory (status shows it after a restart).
        self.record_verify = None
        # Protected restore.
        self.restoring = None
        self.prm = bytearray(self.extents)
        # The PRM of the restore recovered could not be read (restore.py).
        self.prm_lost = False
        self.prm_file = maps.ActivityFile(
            os.path.join(map_dir, source.name + ".prm"), granularity,
            self.extents)
        self.prm_lock = threading.Lock()
        # Source flushes failed so far: a restore's copy that spans one
        # keeps its bits (Mirroring._mark_lost).
        self.flush_failures = 0
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

    def _forward(name):
        return property(
            lambda self: getattr(self.changes, name),
            lambda self, value: setattr(self.changes, name, value))

    flush_before_commit = _forward("flush_before_commit")
    snapshot_before_flush = _forward("snapshot_before_flush")
    keep_recent_in_activity = _forward("keep_recent_in_activity")
    del _forward

    @property
    def region(self):
        """Extents an activity mark covers (tests make it smaller)."""
        return self.changes.activity.region

    @region.setter
    def region(self, value):
        self.changes.activity.region = value

    @property
    def activity_file(self):
        return self.changes.activity.file

    def _committed_maps(self):
        return [(c.map_path, c.delta) for c in self.clones.values()]

    def _flush_all(self):
        """The data every clean bit of a commit vouches for, durable.  A
        flush that fails marks what it may have lost (_flush_source,
        _flush_clone) and fails the commit, whose maps would not hold
        those marks: the activity map keeps them until a later commit."""
        self._flush_source()
        failed = None
        for clone in list(self.clones.values()):
            error, _ = self._flush_clone(clone)
            failed = failed or error
        if failed is not None:
            raise failed

    # ------------------------------------------------------------ set-up

    def load(self, clone_records, open_backend):
        """Open the clones and recover their delta maps.

        clone_records: {name: {"state": ..., "file": ...}}; open_backend
        gets a record with its "name" too.  Returns a list
        of (clone name, message) for maps that were lost or corrupt (those
        clones are set wholly dirty).
        """
        problems = []
        activity, problem = self.changes.recover(required=bool(clone_records))
        if problem is not None and clone_records:
            problems.append((None, problem))
        for name, record in clone_records.items():
            try:
                backend, broken = open_backend(dict(record, name=name)), \
                    None
            except (errors.Error, OSError) as e:
                # One clone's file must not stop the Source and the other
                # clones from being served.
                broken = str(e)
                backend = backends.UnavailableBackend(record.get("file"),
                                                      self.size, broken)
            clone = Clone(self, name, backend, record["state"], None,
                          record.get("file"))
            clone.storage = record.get("storage")
            clone.rate = record.get("rate")
            if isinstance(record.get("last_verify"), dict):
                self.verify_results[name] = SavedVerify(record["last_verify"])
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
        # Every extent recovered as dirty is now in a delta map: save them,
        # and only then start a clean activity map (a crash or a full disk
        # in between recovers the same bits again).
        for clone in self.clones.values():
            maps.save(clone.map_path, clone.delta, self.granularity)
        self.changes.start()
        for clone in self.clones.values():
            if clone.broken and clone.state in (SYNCHRONIZED, SYNCING):
                # Not mirrored any more: from now on the Source's writes
                # set its bits, as after a failed mirrored write.
                self.transition(clone, "mirror-failed" if clone.state ==
                                 SYNCHRONIZED else "failed", clone.broken)
            elif clone.state == SYNCHRONIZED and clone.delta.count(1):
                self.transition(clone, "recovered-dirty", clone.error)
        if self.clones:
            self.attach()
        return problems

    def repair(self, name, backend, run=True):
        """Serve clone name from backend, its file opened again after
        being refused at load (broken).  Its map already says what to
        copy: a synchronized clone was set out of sync then.  An
        operation it was running (paused since) goes on unless something
        else paused it (a lost PRM), at once if run (a started target),
        else at the next start.  Returns whether the engine restarted."""
        with self.cond:
            clone = self.clones[name]
            if clone.broken is None:
                raise errors.InvalidArgument(
                    reason="clone {!r} is not broken".format(name))
            old, clone.backend, clone.broken = clone.backend, backend, None
            clone.export.read = backend.readinto
            if clone.state == RESTORING:
                self._set_read_path()
            if clone.state in RUNNING and clone.error is None:
                clone.paused = False
        old.close()
        # No other engine can have started meanwhile: a running clone's
        # siblings are refused (GroupBusy), and so is its own start.
        return run and self.resume() is clone

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
            self._removable(clone)
            # No write in flight: one that chose name as a mirror (its leg
            # deferred or not) writes its backend, which the caller
            # closes next, and a failing one saves name's state.
            with self._quiesced():
                # Again: an engine, a verify or an export connection may
                # have begun during the drain.
                self._removable(clone)
                if persist is not None:
                    persist()
                del self.clones[name]
                if not self.clones:
                    # Before writes go on: they bypass the layer now
                    # (those already waiting in it too: Mirroring._begin).
                    self.detach()
        paths = [clone.map_path]
        if not self.clones:
            self.legs.close()
            self.changes.close()
            self.prm_file.close()
            paths += [self.changes.activity.path, self.prm_file.path]
        fsutil.remove_durably(paths)
        return clone

    def _removable(self, clone):
        self._check(clone, "remove")
        if self.verifier is not None and self.verifier.running and \
                self.verifier.clone is clone:
            raise AlreadyRunning(event="remove", name=clone.name)
        if clone.connections:
            raise CloneInUse(event="remove", name=clone.name,
                             count=clone.connections)

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
            ops.update(readinto=self.redirected_read, extents=all_data)
        elif self.restoring is not None:
            ops.update(readinto=self.restore_read, extents=all_data)
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
                "the file back and run `clonectl clone accept-storage {}` to "
                "finish".format(clone.broken, clone.name))
        if clone.broken and event in HINTS and event != "remove":
            raise CloneBroken(event=event, name=clone.name,
                              reason=clone.broken)
        if (clone.state, event) not in TRANSITIONS:
            raise InvalidTransition(event=event, name=clone.name,
                                    state=clone.state,
                                    hint=HINTS.get(event, "not allowed"))

    def transition(self, clone, event, error=None, rate=KEEP):
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
        verifier = self.verifier
        if verifier is not None and verifier.running:
            if verifier.clone is clone and event == "verify":
                raise AlreadyRunning(event=event, name=clone.name)
            raise GroupBusy(event=event, name=clone.name,
                            other=verifier.clone.name, state="verifying")
        for other in self.clones.values():
            if other is not clone and other.state in RUNNING:
                raise GroupBusy(event=event, name=clone.name,
                                other=other.name, state=other.state)
        if self.engine is not None and self.engine.running:
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

    def check_reverse_sync(self, name):
        """Refuse, changing nothing, a reverse sync of clone name that
        start_reverse_sync would refuse now: asked before a replicated
        Source's links are made to replay its regions."""
        if self.source.readonly:
            raise errors.ReadOnly(name=self.source.name)
        with self.cond:
            self._start_checks(self.clones[name], "reverse-sync")

    def _start_checks(self, clone, event):
        self._check(clone, event)
        self._check_group_idle(clone, event)
        if clone.connections:
            raise CloneInUse(event=event, name=clone.name,
                             count=clone.connections)

    def _start(self, name, event, rate, run):
        clone = self.clones[name]

        def checks():
            self._start_checks(clone, event)

        if event == "reverse-sync":
            with self.cond:
                checks()
                self._prepare_restore(clone)
            # The siblings' new bits are durable before the new state is,
            # and so before the engine changes the Source under them.
            self.commit()
        with self.cond:
            checks()

            def switch():
                if event == "reverse-sync":
                    # Again: the export was writable until now, and a
                    # write since added bits the siblings need too.  The
                    # start's commit may have taken them out of the
                    # activity map already: noted there again, durably,
                    # before the state says the Source changes.
                    mine = int.from_bytes(clone.delta, "little")
                    missing = 0
                    for other in self.clones.values():
                        if other is not clone:
                            missing |= mine & ~int.from_bytes(other.delta,
                                                              "little")
                    self._prepare_restore(clone)
                    for s, e in maps.runs(missing.to_bytes(
                            self.extents, "little")):
                        self.changes.note(s, e)
                self.transition(clone, event, rate=rate)
                clone.paused = False
                self._set_read_path()
            if event == "reverse-sync":
                self._switch_quiesced(switch, lambda: (
                    checks(), self._check_siblings_split(clone, event)))
            else:
                switch()
        return self._launch(clone, rate, run)

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
        """Start the engine for a clone left syncing or reverse-syncing
        (none while one runs: a start of the clone's own came first)."""
        with self.cond:
            if self.engine is not None and self.engine.running:
                return None
            clone = next((c for c in self.clones.values()
                          if c.state in RUNNING and not c.paused), None)
        if clone is not None:
            self._launch(clone, clone.rate, run)
        return clone

    def start_verify(self, name, rate=None, run=True):
        """Compare clone name with the Source (target.clones.verify)."""
        clone = self.clones[name]
        with self.cond:
            if clone.broken:
                raise CloneBroken(event="verify", name=name,
                                  reason=clone.broken)
            if clone.state not in (SYNCHRONIZED, FRACTURED):
                raise InvalidTransition(event="verify", name=name,
                                        state=clone.state,
                                        hint=HINTS["verify"])
            self._check_group_idle(clone, "verify")
            self.verifier = VerifyEngine(self, clone, rate)
            self.verify_results[name] = self.verifier.result
        log.info("verify of clone %s (%s) started", name, self.source.name)
        if run:
            self.verifier.start()
        return self.verifier

    def stop_verify(self, name):
        """Stop clone name's running verify (its marks stay, committed)."""
        verifier = self.verifier
        if verifier is None or verifier.clone.name != name or \
                not verifier.running:
            return False
        verifier.stop("asked")
        verifier.join()
        return True

    def _fracturable(self, clone):
        if clone.state == SYNCHRONIZED and clone.delta.find(1) >= 0:
            # A mirrored write or a flush failed (its out-of-sync state
            # could not be saved then, or it was the Source's): save it
            # now, the fracture is refused.
            self.transition(clone, "mirror-failed", clone.error or
                            "its Delta Map says it differs from the Source "
                            "(a mirrored write or a flush failed)")
        self._check(clone, "fracture")

    def fracture(self, name):
        clone = self.clones[name]
        with self.cond:
            self._fracturable(clone)
            with self._quiesced():
                # Again: a write drained meanwhile (a deferred leg) may
                # have failed on the clone.
                self._fracturable(clone)
                try:
                    clone.backend.flush()
                except OSError as e:
                    # It may have lost writes (Mirroring._flush_clone): no
                    # point in time, and mirrored no more.
                    self._mark_lost([clone])
                    self.transition(clone, "mirror-failed",
                                    "flush of the clone failed: {}".format(e))
                    raise
                self.transition(clone, "fracture")
        try:
            self.commit()
        except OSError:
            # The fracture is durable and in effect; the writes since are
            # in the activity map until a later commit succeeds.
            log.exception("commit after the fracture of clone %s", name)
        log.info("clone %s (%s) fractured: %d extents differ from the "
                 "source", clone.name, self.source.name, clone.delta.count(1))
        return clone

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
            "storage": clone.storage,
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
                                          self.engine.running)
        result = self.verify_results.get(clone.name)
        if result is not None:
            st["verify"] = result.to_dict(
                self.verifier is not None and self.verifier.result is
                result and self.verifier.running)
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
        """Stop a running engine; its state stays, so it resumes later.
        A running verify is stopped too (its marks are committed)."""
        if self.verifier is not None:
            self.verifier.stop("stopping")
            self.verifier.join()
        if self.engine is not None:
            self.engine.stop(None)
            self.engine.join()

    def close(self):
        self.stop_engine()
        self.legs.close()
        if self.clones:
            self.commit()
        self.changes.close()
        self.prm_file.close()
        for clone in self.clones.values():
            clone.backend.close()
