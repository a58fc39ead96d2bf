"""Online verify: compare a clone with its Source while hosts write.

Design notes
------------
A verify reads the Source (below the clones layer) and the clone chunk by
chunk with the group's copier (target.copier), whose "writer" here is a
comparison: each extent's checksum on the Source against the same
extent's checksum on the clone (copier.digest).  What it compares:

- a synchronized clone: every extent (mirroring keeps them equal);
- a fractured clone: only the extents its Delta Map says are equal.

Host writes: a chunk is registered like a copy (the group's collision
mechanism, mirroring.CollisionGuard); a host write that overlaps it in
time (a mirrored write seen on one side only, a Source write of a
fractured clone) makes the chunk be compared again, so a write never shows
as a difference.  After MAX_RETRIES collisions in a row a chunk is left
uncompared (counted as skipped), never reported.

A differing extent is marked in the clone's Delta Map: noted durably in
the group's activity map first (target.changemap), then its bit set; the
maps are committed when the verify ends or stops.  A synchronized clone
with differences stays a mirror and is resynchronized at once ("verify-
differs": syncing), copying exactly the marked extents; a fractured
clone's marks are copied by its next `clone sync`.

A verify changes no data; it runs alone in its group (no sync, reverse
sync or restore meanwhile) and stop() ends it between chunks with the
maps valid.  The last result is kept in the clone's inventory record
(status shows it after a restart).  See docs/clones.md.
"""

import logging
import threading
import time

from .. import copier
from .model import FRACTURED, SYNCHRONIZED, TransitionNotSaved

log = logging.getLogger("clonectl.clones")

MAX_RETRIES = 16
# Offsets of differing extents a result lists at most.
FIRST_OFFSETS = 10


class VerifyResult:
    """The figures of one verify, for status."""

    def __init__(self, total_extents, granularity, size):
        self.started = time.monotonic()
        self.started_at = time.time()
        self.finished = None
        self.finished_at = None
        self.granularity = granularity
        self.size = size
        self.bytes_total = min(size, total_extents * granularity)
        self.bytes_done = 0
        self.extents_compared = 0
        self.extents_differing = 0
        self.extents_skipped = 0
        self.differing_offsets = []
        self.collisions = 0
        self.stopped = False
        self.error = None

    def to_dict(self, running):
        elapsed = (self.finished or time.monotonic()) - self.started
        rate = self.bytes_done / elapsed if elapsed > 0 else 0.0
        left = max(0, self.bytes_total - self.bytes_done)
        return {
            "running": running,
            "started": round(self.started_at, 3),
            "finished": round(self.finished_at, 3)
            if self.finished_at else None,
            "elapsed": round(elapsed, 3),
            "bytes_done": self.bytes_done,
            "bytes_total": max(self.bytes_total, self.bytes_done),
            "rate": round(rate),
            "eta": round(left / rate, 1) if rate > 0 and running else None,
            "extents_compared": self.extents_compared,
            "extents_differing": self.extents_differing,
            "extents_skipped": self.extents_skipped,
            "differing_offsets": list(self.differing_offsets),
            "collisions": self.collisions,
            "stopped": self.stopped,
            "error": self.error,
        }


class VerifyEngine:
    """Compares one clone with the Source, serially from start to end.

    run() compares until the end or stop(); tests call it directly (no
    thread) and set `chunk` (extents per comparison) smaller.
    """

    def __init__(self, group, clone, rate=None):
        self.group = group
        self.clone = clone
        self.rate = rate
        self.chunk = max(1, copier.CHUNK // group.granularity)
        self._stop = threading.Event()
        self.stop_reason = None
        self.thread = None
        self.running = True
        self.cursor = 0
        self.result = VerifyResult(self._eligible_count(), group.granularity,
                                   group.size)
        # Extents of the current comparison that differ (not yet judged).
        self._found = []
        self._tries = 0
        self._token = None
        g = group.granularity
        self._clone_buf = bytearray(g)
        self.copier = copier.Copier(
            lambda view, offset: group.below.readinto(view, offset),
            self._compare, chunk=self.chunk * g, piece=g, guard=self,
            between=self._between, rate=rate, progress=self._progress,
            cancel=self._stop)

    def _eligible_count(self):
        if self.clone.state == SYNCHRONIZED:
            return self.group.extents
        return self.clone.delta.count(0)

    # ------------------------------------------------------------ thread

    def start(self):
        self.thread = threading.Thread(target=self.run, daemon=True,
                                       name="verify-" + self.clone.name)
        self.thread.start()

    def stop(self, reason=None):
        self.stop_reason = reason
        self._stop.set()

    def join(self, timeout=None):
        if self.thread is not None and \
                self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def run(self):
        try:
            while not self._stop.is_set():
                run = self._next_run()
                if run is None:
                    break
                g = self.group.granularity
                s, e = run
                self.copier.chunk = (e - s) * g
                offset = s * g
                self.cursor = e
                if not self.copier.copy(
                        [(offset, min(e * g, self.group.size) - offset)]):
                    break
                self.copier.throttle()
            self.result.stopped = self._stop.is_set()
        except Exception as e:
            log.exception("verify of clone %s failed", self.clone.name)
            self.result.error = "{}: {}".format(type(e).__name__, e)
        finally:
            try:
                self._finish()
            finally:
                self.running = False
                if self.result.finished is None:
                    self.result.finished = time.monotonic()
                    self.result.finished_at = time.time()

    def _next_run(self):
        """The next extents [s, e) to compare from the cursor, at most
        chunk of them: all of a synchronized clone, the clean ones of a
        fractured clone; None at the end (or if the clone left both)."""
        clone, n = self.clone, self.group.extents
        with self.group.cond:
            if clone.state == SYNCHRONIZED:
                s = self.cursor
                return (s, min(n, s + self.chunk)) if s < n else None
            if clone.state != FRACTURED:
                self._stop.set()
                self.stop_reason = "the clone became " + clone.state
                return None
            s = clone.delta.find(0, self.cursor)
            if s < 0:
                return None
            e = clone.delta.find(1, s, min(n, s + self.chunk))
            return s, (e if e >= 0 else min(n, s + self.chunk))

    def _finish(self):
        group, clone, result = self.group, self.clone, self.result
        result.finished = time.monotonic()
        result.finished_at = time.time()
        # The marks durable before a state relies on them.
        try:
            group.commit()
        except OSError as e:
            # They stay marked in memory and in the activity map (a later
            # commit saves them); nothing relies on them meanwhile.
            why = "its marks could not be committed: {}".format(e)
            log.error("verify of clone %s: %s", clone.name, why)
            result.error = "{}; {}".format(result.error, why) \
                if result.error else why
            return
        if group.record_verify is not None:
            try:
                group.record_verify(clone.name, result.to_dict(False))
            except Exception:
                # The marks are committed; only the report is not kept.
                log.exception("clone %s: the verify's result could not "
                              "be saved", clone.name)
        resync = False
        with group.cond:
            if result.extents_differing and clone.state == SYNCHRONIZED:
                msg = "verify found {} extent(s) that differ from the " \
                    "Source".format(result.extents_differing)
                try:
                    group.transition(clone, "verify-differs", msg)
                    resync = True
                except TransitionNotSaved as e:
                    # The bits stay set: a restart resyncs them (recovered
                    # dirty), a fracture is refused.
                    log.error("clone %s: %s", clone.name, e)
        log.info("verify of clone %s (%s) %s: %d extents compared, %d "
                 "differ, %d skipped", clone.name, group.source.name,
                 "stopped" if result.stopped else "completed",
                 result.extents_compared, result.extents_differing,
                 result.extents_skipped)
        if resync:
            # A verify run by a thread hands over to a sync thread; one run
            # directly (tests) leaves the engine to be driven.
            self.running = False
            group.resume(run=self.thread is not None)

    # ------------------------------------------------------------ copier

    def _between(self, offset, length):
        group = self.group
        if group.copy_hook is not None:
            g = group.granularity
            group.copy_hook(self, offset // g,
                            (offset + length + g - 1) // g)

    def _progress(self, length):
        self.result.bytes_done += length

    def _compare(self, view, offset):
        """The copier's writer: view is one extent (or the short last one)
        of the Source; compare its checksum with the clone's."""
        n = len(view)
        mine = memoryview(self._clone_buf)[:n]
        self.clone.backend.readinto(mine, offset)
        if copier.digest(view) != copier.digest(mine):
            self._found.append(offset // self.group.granularity)

    # The copier's guard: the group's collision mechanism.

    def _extents(self, offset, length):
        g = self.group.granularity
        return offset // g, (offset + length + g - 1) // g

    def begin(self, offset, length):
        group = self.group
        s, e = self._extents(offset, length)
        self._found = []
        with group.cond:
            self._token = group.copy_begin(s, e, self._stop.is_set)

    def end(self, offset, length, written):
        group, clone, result = self.group, self.clone, self.result
        s, e = self._extents(offset, length)
        with group.cond:
            collided = group.collided and group.retry_collisions
            group.changes.copy_end(self._token)
            if collided:
                result.collisions += 1
                self._tries += 1
                if self._tries <= MAX_RETRIES and not self._stop.is_set():
                    return False
            self._tries = 0
            if not written:
                return True
            synchronized = clone.state == SYNCHRONIZED
            for ext in range(s, e):
                if not synchronized and clone.delta[ext]:
                    continue    # written meanwhile: no longer compared
                if collided:
                    result.extents_skipped += 1
                    continue
                result.extents_compared += 1
                if ext in self._found and not clone.delta[ext]:
                    group.changes.note(ext, ext + 1)
                    clone.delta[ext] = 1
                    result.extents_differing += 1
                    if len(result.differing_offsets) < FIRST_OFFSETS:
                        result.differing_offsets.append(
                            ext * group.granularity)
        return True
