"""The transfer engine: sends a session's frozen image to its destinations.

Design notes
------------
The transfer map is the union of the destinations' pending maps: the
frozen extents somebody still needs.  The engine reads one run at a time
(up to CHUNK bytes) from the frozen image (or, for a full copy while
unmarked, the live Source) into a buffer of a small pool, and queues it to
every live destination that needs it: data as writes, all-zero extents as
write-zeroes (the destination may punch them); holes of the image are not
read.  The destination clients are asynchronous (destinations.pump drives
them all from this thread): up to POOL runs are in flight at once, so the
next run is read while the previous ones are being written.

Every CHECKPOINT_BYTES of runs queued close a checkpoint.  Once every
request of a checkpoint's runs to a destination has completed, that
destination is sent a flush (the runs after it keep going meanwhile), and
when the flush completes its pending bits of those runs are cleared, the
cleared map saved before the bits leave memory (the price of resuming
without resending everything).  A destination whose request fails (or
cannot be queued) gets nothing new; the flushes of its checkpoints whose
writes all completed still go, and once it has nothing in flight it is
dropped from the transfer (its other bits stay set) while the others go
on.  A marked transfer that completes ends the mark; interrupted
transfers resume from the pending maps.

It chunks like target.copier (copier.is_zero) but keeps its own loop
rather than a copier.Copier: each run goes to several destinations (one
that fails is dropped, the others go on), many runs are in flight at once
(a Copier copies one chunk at a time), and zero extents inside a data run
go out as write-zeroes.

Deliberately ignored: rate limiting; reading in a second thread (a read of
the Source is a fraction of the time its writes take).  See docs/design.md
and docs/persistence.md.
"""

import collections
import logging
import threading
import time

from .. import copier, maps
from .destinations import CONSISTENT, INCONSISTENT, DestinationError, pump
from .layer import FrozenImageGone

log = logging.getLogger("clonectl.sessions")

CHECKPOINT_BYTES = 64 << 20
CHUNK = copier.CHUNK    # bytes read at a time: one run
POOL = 16               # runs in flight (buffers of CHUNK bytes)
POLL = 0.5              # seconds between checks for a stop while waiting

_ZEROS = memoryview(bytes(CHUNK))


def _pieces(buf, length, granularity):
    """The first length bytes of buf as [(start, end, all zero)]: runs of
    whole extents (the last may be short) that are all zero or not."""
    out = []
    pos = 0
    while pos < length:
        end = min(pos + granularity, length)
        zero = copier.is_zero(buf, end - pos, pos)
        while end < length:
            e = min(end + granularity, length)
            if copier.is_zero(buf, e - end, end) != zero:
                break
            end = e
        out.append((pos, end, zero))
        pos = end
    return out


class _Run:
    """A run read into a pool buffer, and its requests still in flight."""

    __slots__ = ("x", "end", "buf", "waiting", "queuing")

    def __init__(self, x, end, buf):
        self.x, self.end, self.buf = x, end, buf
        self.waiting = {}       # dest index -> requests in flight
        # Still being queued to the destinations: the buffer is not free
        # even when every request queued so far has completed (libnbd
        # sends a write from the caller's buffer, it does not copy it).
        self.queuing = True


class _Checkpoint:
    """The runs queued to one destination between two checkpoints."""

    __slots__ = ("runs", "in_flight", "closed", "flushing", "refused")

    def __init__(self):
        self.runs = []
        self.in_flight = 0      # its writes and zeroes not completed
        self.closed = False     # no more runs join it
        self.flushing = False
        self.refused = False    # one of its requests failed: never flushed


class TransferEngine:
    """Sends the frozen image's pending extents to the destinations."""

    def __init__(self, session, clients, unmarked=False, on_done=None):
        self.session = session
        self.clients = dict(clients)
        self.unmarked = unmarked
        self.on_done = on_done
        self.generation = session.generation
        self.cursor = 0
        self.thread = None
        self.stop_reason = None
        self.started = time.time()
        self.finished = None
        self.bytes_sent = 0
        self.bytes_zeroed = 0
        self.result = None
        self.failed = {}
        self.completed = []     # destinations that got the whole image
        self.failing = {}       # dest index -> error: nothing new to it
        self.flush_failed = set()   # dest indexes a flush failed on
        self.in_flight = {i: 0 for i in self.clients}  # its requests
        self.checkpoints = {i: collections.deque([_Checkpoint()])
                            for i in self.clients}
        self.runs = []          # runs with requests in flight
        self.pool = []          # free buffers
        self.replies = collections.deque()  # (i, run, checkpoint, error)
        self.since_checkpoint = 0
        # Where the time goes (perf_counter seconds): reading the image,
        # waiting for the destinations (a full pool, a full window, the
        # last flushes).
        self.seconds = {"reading": 0.0, "waiting": 0.0}
        # Bytes of the image read and sent (to every live destination):
        # progress counts them before the checkpoint that clears their
        # pending bits (which happens every CHECKPOINT_BYTES).
        self.bytes_done = 0
        self.total = session.transfer.count(1) if not unmarked \
            else session.extents
        # Fixed at the start: host writes never add to a transfer (the
        # frozen image is what it sends; an unmarked full copy sends
        # every extent once).
        self.total_bytes = session.size if unmarked else \
            self._bytes(session.transfer, self.total)

    # ------------------------------------------------------------ thread

    def start(self):
        self.thread = threading.Thread(
            target=self.run, name="transfer-" + self.session.name, daemon=True)
        self.thread.start()

    @property
    def running(self):
        """Whether the transfer's thread is still at work."""
        return self.thread is not None and self.thread.is_alive()

    def stop(self, reason):
        self.stop_reason = reason

    def join(self, timeout=None):
        if self.thread is not None:
            self.thread.join(timeout)

    def run(self):
        try:
            self.advance()
        finally:
            for c in self.clients.values():
                c.close()
            if self.on_done is not None:
                self.on_done(self)

    def advance(self, max_steps=None):
        """Take up to max_steps steps (all, if None), then finish; failures
        end the transfer with abort().  Return True once it has ended."""
        try:
            steps = 0
            while self.stop_reason is None:
                if max_steps is not None and steps >= max_steps:
                    return False
                if not self.step():
                    self.finish()
                    return True
                steps += 1
            self.abort("stopped: " + self.stop_reason)
        except FrozenImageGone:
            self.abort("the session was unmarked during the transfer")
        except Exception as e:  # noqa: BLE001 - the transfer reports it
            log.exception("session %s: transfer failed", self.session.name)
            self.abort(str(e))
        return True

    # ------------------------------------------------------------ steps

    def _pending_union(self):
        s = self.session
        if self.unmarked:
            out = bytearray(s.extents)
            for i in self.clients:
                if i not in self.failed:
                    d = s.dests[i]
                    for a, b in maps.runs(d.pending):
                        maps.set_range(out, a, b)
            return out
        return s.transfer

    def _live(self):
        """Destinations that get new runs."""
        return [i for i in self.clients
                if i not in self.failed and i not in self.failing]

    def step(self):
        """Read one run and queue it; return False when nothing is left
        to read (what is in flight may still be)."""
        s = self.session
        g = s.granularity
        self._collect(0)
        while len(self.runs) >= POOL and self._live():
            self._collect(POLL)
        live = self._live()
        if not live:
            return False
        with s.cond:
            if s.generation != self.generation:
                raise FrozenImageGone(name=s.name)
            pending = self._pending_union()
            x = pending.find(1, self.cursor)
            if x < 0:
                return False
            limit = min(s.extents, x + max(1, CHUNK // g))
            end = pending.find(0, x, limit)
            if end < 0:
                end = limit
            targets = [i for i in live
                       if s.dests[i].pending.find(1, x, end) >= 0]
        offset = x * g
        length = min(end * g, s.size) - offset
        t0 = time.perf_counter()
        buf = self.pool.pop() if self.pool else \
            bytearray(max(CHUNK, g))
        view = memoryview(buf)
        # Holes are not read: they are zeroed in buf and go out as
        # write-zeroes with the zero extents of the data.
        if self.unmarked:
            parts = s.inner.extents(offset, length)
        else:
            parts = s.frozen_extents(offset, length)
        for start, n, hole in parts:
            at = start - offset
            if hole:
                view[at:at + n] = _ZEROS[:n] if n <= len(_ZEROS) \
                    else bytes(n)
            elif self.unmarked:
                s.inner.readinto(view[at:at + n], start)
            else:
                s.read_frozen(view[at:at + n], start, self.generation)
        pieces = _pieces(buf, length, g)
        self.seconds["reading"] += time.perf_counter() - t0
        run = _Run(x, end, buf)
        self.runs.append(run)
        for i in targets:
            if i in self.failing or i in self.failed:
                continue
            checkpoint = self.checkpoints[i][-1]
            try:
                if self._send(i, run, checkpoint, offset, pieces):
                    checkpoint.runs.append((x, end))
            except DestinationError as e:
                self._fail(i, e)
                self._flush_ready(i)
        run.queuing = False
        self._release(run)
        self.cursor = end
        self.bytes_done += length
        self.since_checkpoint += length
        if self.since_checkpoint >= CHECKPOINT_BYTES:
            self._close_checkpoints()
        return True

    def _send(self, i, run, checkpoint, offset, pieces):
        """Data pieces as writes, all-zero pieces as write-zeroes; False
        if i failed meanwhile."""
        client = self.clients[i]
        view = memoryview(run.buf)
        for pos, end, zero in pieces:
            while client.busy():
                self._collect(POLL)
                if i in self.failing or i in self.failed:
                    return False

            def done(error, run=run, checkpoint=checkpoint):
                self.replies.append((i, run, checkpoint, error))

            if zero:
                client.zero(offset + pos, end - pos, done)
                self.bytes_zeroed += end - pos
            else:
                client.write(view[pos:end], offset + pos, done)
                self.session.dests[i].bytes_sent += end - pos
                self.bytes_sent += end - pos
            self.in_flight[i] += 1
            run.waiting[i] = run.waiting.get(i, 0) + 1
            checkpoint.in_flight += 1
        return True

    def _release(self, run):
        """Back to the pool once no destination is still writing it."""
        if not run.waiting and not run.queuing and run.buf is not None:
            self.pool.append(run.buf)
            run.buf = None
            self.runs.remove(run)

    def _collect(self, timeout):
        """Wait up to timeout seconds for the destinations, then handle
        every reply they gave."""
        clients = [self.clients[i] for i in self.clients
                   if i not in self.failed]
        t0 = time.perf_counter()
        pump(clients, timeout)
        if timeout:
            self.seconds["waiting"] += time.perf_counter() - t0
        while self.replies:
            i, run, checkpoint, error = self.replies.popleft()
            if i in self.failed:
                continue
            self.in_flight[i] -= 1
            if run is None:
                # Flushed or not, the checkpoint is done with.
                self.checkpoints[i].remove(checkpoint)
                if error is None and i not in self.flush_failed:
                    self._clear(i, checkpoint)
                elif error is not None:
                    self.flush_failed.add(i)
                    self._fail(i, error)
            else:
                run.waiting[i] -= 1
                if not run.waiting[i]:
                    del run.waiting[i]
                    self._release(run)
                checkpoint.in_flight -= 1
                if error is not None:
                    checkpoint.refused = True
                    self._fail(i, error)
        for i in self.clients:
            self._flush_ready(i)

    def _close_checkpoints(self):
        for i in self.clients:
            if i in self.failed or i in self.failing:
                continue
            last = self.checkpoints[i][-1]
            if last.runs:
                last.closed = True
                self.checkpoints[i].append(_Checkpoint())
            self._flush_ready(i)
        self.since_checkpoint = 0

    def _flush_ready(self, i):
        """Flush i's closed checkpoints whose requests all completed; drop
        a failing i once nothing of it is in flight."""
        if i in self.failed:
            return
        client = self.clients[i]
        if i in self.flush_failed:
            # A failed flush may have dropped what it covered (a failed
            # fdatasync loses the dirty pages, and the next one succeeds):
            # nothing this destination calls durable from now on is
            # trusted; its checkpoints stay pending.
            for checkpoint in [c for c in self.checkpoints[i]
                               if not c.flushing]:
                self.checkpoints[i].remove(checkpoint)
        for checkpoint in list(self.checkpoints[i]):
            if checkpoint.refused and not checkpoint.in_flight:
                # What a flush would cover is not all there: its runs
                # stay pending.
                self.checkpoints[i].remove(checkpoint)
                continue
            if not checkpoint.closed or checkpoint.flushing or \
                    checkpoint.in_flight or checkpoint.refused:
                continue

            def done(error, checkpoint=checkpoint):
                self.replies.append((i, None, checkpoint, error))

            try:
                client.flush(done)
            except DestinationError as e:
                self.checkpoints[i].remove(checkpoint)
                self._fail(i, e)
                break
            checkpoint.flushing = True
            self.in_flight[i] += 1
        if i in self.failing and not self.in_flight[i]:
            self._drop(i, self.failing.pop(i))

    def _fail(self, i, exc):
        """i gets nothing new; what it has in flight may still complete."""
        if i in self.failed or i in self.failing:
            return
        self.failing[i] = exc
        # The runs queued since its last checkpoint are not flushed.
        if not self.checkpoints[i][-1].closed:
            self.checkpoints[i].pop()

    def _drop(self, i, exc):
        s = self.session
        d = s.dests[i]
        msg = str(exc)
        log.error("session %s: destination %s failed: %s", s.name, d.uri, msg)
        self.failed[i] = msg
        d.last_error = msg
        self.checkpoints[i].clear()
        for run in list(self.runs):
            if run.waiting.pop(i, None) is not None:
                self._release(run)

    def _clear(self, i, checkpoint):
        """checkpoint's runs reached i and were flushed: clear their bits."""
        s = self.session
        # The cleared map is durable before the bits leave memory: once a
        # transfer bit is clear, host writes to the extent no longer save
        # its old data, so a crash must not bring the bit back.
        with s.cond:
            if s.generation != self.generation:
                raise FrozenImageGone(name=s.name)
            d = s.dests[i]
            m = bytearray(d.pending)
            for a, b in checkpoint.runs:
                m[a:b] = bytes(b - a)
        maps.save(s.pending_path(d), m, s.granularity)
        with s.cond:
            if s.generation != self.generation:
                raise FrozenImageGone(name=s.name)
            for a, b in checkpoint.runs:
                d.pending[a:b] = bytes(b - a)
            if not self.unmarked:
                for a, b in checkpoint.runs:
                    s.recompute_transfer(a, b)

    def checkpoint(self):
        """Close the checkpoints and wait until every destination flushed
        them (or failed)."""
        self._close_checkpoints()
        while any(self.in_flight[i] or i in self.failing or
                  any(c.closed for c in self.checkpoints[i])
                  for i in self.clients if i not in self.failed):
            self._collect(POLL)

    def finish(self):
        s = self.session
        self.checkpoint()
        now = time.time()
        ok = not self.failed
        for i in self.clients:
            d = s.dests[i]
            d.transferring = False
            if i in self.failed:
                continue
            d.last_error = None
            self.completed.append(i)
            if self.unmarked:
                d.consistency = INCONSISTENT
                d.needs_full = False
            else:
                d.consistency = CONSISTENT
                d.last_success = now
        self.finished = now
        self.result = "completed" if ok else "failed: " + "; ".join(
            self.failed.values())
        s.last_transfer = self.summary()
        log.log(logging.INFO if ok else logging.ERROR,
                "transfer of session %s (%s) %s: %d bytes written and %d "
                "zeroed in %.1f s, %d extents, %d of %d destinations",
                s.name, s.source.name, self.result, self.bytes_sent,
                self.bytes_zeroed, self.finished - self.started, self.total,
                len(self.completed), len(self.clients))
        if ok and not self.unmarked:
            s.drop_mark(self.generation, None)   # saves the record too
        else:
            s.save()

    def abort(self, reason):
        s = self.session
        for i in self.clients:
            s.dests[i].transferring = False
            if i not in self.failed:
                s.dests[i].last_error = reason
        self.finished = time.time()
        self.result = "failed: " + reason
        s.last_transfer = self.summary()
        # Stopped with the target, it resumes at the next start.
        log.log(logging.WARNING if self.stop_reason else logging.ERROR,
                "transfer of session %s (%s) failed after %d bytes in %.1f "
                "s: %s", s.name, s.source.name, self.bytes_sent,
                self.finished - self.started, reason)
        try:
            s.save()
        except Exception:  # noqa: BLE001
            log.exception("session %s: could not record the failure", s.name)

    def summary(self):
        elapsed = (self.finished or time.time()) - self.started
        return {"result": self.result, "started": self.started,
                "finished": self.finished, "seconds": round(elapsed, 3),
                "bytes_sent": self.bytes_sent,
                "bytes_zeroed": self.bytes_zeroed,
                "full_unmarked": self.unmarked,
                "seconds_reading": round(self.seconds["reading"], 3),
                "seconds_waiting": round(self.seconds["waiting"], 3),
                "destinations_failed": {self.session.dests[i].uri: m
                                        for i, m in self.failed.items()}}

    def _bytes(self, m, count):
        """Bytes of count extents set in m (the last may be short)."""
        s = self.session
        short = s.extents * s.granularity - s.size if m and m[-1] else 0
        return count * s.granularity - short

    def progress(self):
        out = self.summary()
        out["running"] = self.running
        left = self._pending_union().count(1) if self.result is None else 0
        out["extents_total"] = self.total
        out["extents_left"] = left
        done = min(self.bytes_done, self.total_bytes)
        out["bytes_total"] = self.total_bytes
        out["bytes_done"] = done
        elapsed = (self.finished or time.time()) - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        out["rate"] = round(rate)
        out["eta"] = round((self.total_bytes - done) / rate, 1) \
            if rate > 0 and self.result is None else None
        elapsed = time.time() - self.started
        out["mb_per_s"] = round(self.bytes_sent / 1e6 / elapsed, 1) \
            if elapsed > 0 else 0.0
        return out
