"""The sync engine: copies one clone's dirty extents, then finishes.

Design notes
------------
One engine per group runs at a time: a sync (Source -> Clone), a reverse
sync (Clone -> Source, reads of the Source redirected to the clone for
dirty extents meanwhile) or a protected restore (target.clones.restore).
It copies the dirty runs serially from a cursor, each with the group's
copier (target.copier): a run's bits are cleared only once its data is
written and no host write collided with it (mirroring.CollisionGuard).
The copier zeroes (punches) the holes of the side it copies from instead
of reading them, so a clone is as sparse as its Source and back.
Between runs it commits the group's change map at most once per
COMMIT_INTERVAL (target.changemap), so a kill -9 resumes from the last
commit; stop() cancels between chunks and leaves every map valid.

When no bit is left, finish() commits and takes the `completed`
transition; a failure takes `failed` (the state on disk of a failed
reverse sync or restore is still running: it resumes after a restart, or
when asked).  See docs/design.md.
"""

import logging
import threading
import time

from .. import copier
from .mirroring import CollisionGuard
from .model import RESTORING, REVERSE_SYNCING, RUNNING, TransitionNotSaved

log = logging.getLogger("clonectl.clones")

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
        self.stopping = self._stop.is_set
        self.stop_reason = None
        self.thread = None
        # True until the operation completed, failed or was stopped; not
        # tied to the thread, so tests that call step() see the same.
        self.running = True
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
            dst = Below(group)
        else:
            src = Below(group)
            dst = clone.backend

        def between(offset, length):
            if group.copy_hook is not None:
                group.copy_hook(self, offset // g,
                                (offset + length + g - 1) // g)

        def progress(length):
            group.progress[clone.name].bytes_copied += length

        # Holes of the copy's source are zeroed with may_trim: the other
        # side gets holes where this one has them, not zeroes as data.
        return copier.Copier(
            lambda view, offset: src.readinto(view, offset),
            lambda view, offset: dst.write(view, offset),
            lambda offset, length: dst.zero(offset, length, may_trim=True),
            chunk=chunk, guard=CollisionGuard(self), between=between,
            rate=self.rate, progress=progress, cancel=self._stop,
            extents=lambda offset, length: src.extents(offset, length))

    def start(self):
        self.thread = threading.Thread(target=self.run, daemon=True,
                                       name="sync-" + self.clone.name)
        self.thread.start()

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
                # After the step released what it held (a restore's claims).
                self.copier.throttle()
            if self.stop_reason:
                self.fail(self.stop_reason)
        except Exception as e:
            log.exception("sync of clone %s failed", self.clone.name)
            self.fail("{}: {}".format(type(e).__name__, e))
        finally:
            self.running = False
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
            group.transition(self.clone, "completed")
            group._set_read_path()
            self.running = False
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
            group.quiesce += 1
        try:
            with group.cond:
                group._drain()
                # A Source flush that failed while the writes drained
                # marked extents to copy again (Mirroring._mark_lost).
                if group.pending_restore():
                    return False
                clone.delta[:] = group.prm
            group.commit()  # the new Delta Map and the PRM, durable
            with group.cond:
                if group.pending_restore():
                    # Marked by a flush that failed during the commit.
                    return False
                group.transition(clone, "completed", rate=None)
                group.restoring = None
                group._set_read_path()
                self.running = False
        finally:
            with group.cond:
                group.quiesce -= 1
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
                    group.transition(self.clone, "failed", message)
                except TransitionNotSaved as e:
                    # The engine stops all the same; the state on disk
                    # (a running operation) resumes it after a restart.
                    log.error("clone %s: %s", self.clone.name, e)
                self.clone.paused = self.clone.state in RUNNING
                group._set_read_path()
            self.running = False
        try:
            group.commit()
        except OSError:
            log.exception("commit after failed sync")


class Below:
    """The Source below the clones layer, looked up at each request (the
    stack changes when sessions or replication come and go)."""

    def __init__(self, group):
        self.group = group

    def readinto(self, buf, offset):
        self.group.below.readinto(buf, offset)

    def write(self, buf, offset):
        self.group.below.write(buf, offset)

    def zero(self, offset, length, may_trim=False):
        self.group.below.zero(offset, length, may_trim=may_trim)

    def extents(self, offset, length):
        return self.group.below.extents(offset, length)
