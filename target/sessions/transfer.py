"""The transfer engine: sends a session's frozen image to its destinations.

Design notes
------------
The transfer map is the union of the destinations' pending maps: the
frozen extents somebody still needs.  The engine reads one run at a time
(up to copier.CHUNK bytes) from the frozen image (or, for a full copy while
unmarked, the live Source), and sends it to every live destination that
needs it: data as writes, all-zero extents as write-zeroes (the
destination may punch them); holes of the image are not read.  Every
CHECKPOINT_BYTES the destinations are flushed, and only then are their
pending bits cleared, the cleared maps saved before the bits leave memory
(the price of resuming without resending everything).  A destination that
fails is dropped from the transfer (its bits stay set) while the others go
on.  A marked transfer that completes ends the mark; interrupted
transfers resume from the pending maps.

It chunks like target.copier (copier.CHUNK, copier.is_zero) but keeps its
own loop rather than a copier.Copier: each chunk goes to several
destinations (one that fails is dropped, the others go on), a chunk's
writes stay in flight while the next one is read (a Copier reuses its
buffer; the NBD client shares it with libnbd), and zero extents inside a
data chunk go out as write-zeroes.

Deliberately ignored: rate limiting; reading ahead of the destinations
(they pipeline writes themselves).  See docs/design.md and
docs/persistence.md.
"""

import logging
import threading
import time

from .. import copier, maps
from .destinations import CONSISTENT, INCONSISTENT
from .layer import FrozenImageGone

log = logging.getLogger("clonectl.sessions")

CHECKPOINT_BYTES = 64 << 20


def _pieces(buf, granularity):
    """buf as [(start, end, all zero)]: runs of whole extents (the last
    may be short) that are all zero or not."""
    out = []
    pos = 0
    while pos < len(buf):
        end = min(pos + granularity, len(buf))
        # A slice of a bytearray compares with memcmp.
        zero = copier.is_zero(buf[pos:end], end - pos)
        while end < len(buf):
            e = min(end + granularity, len(buf))
            if copier.is_zero(buf[end:e], e - end) != zero:
                break
            end = e
        out.append((pos, end, zero))
        pos = end
    return out


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
        self.unflushed = {i: [] for i in self.clients}
        self.since_checkpoint = 0
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

    def step(self):
        """Send one run; return False when nothing is left."""
        s = self.session
        g = s.granularity
        live = [i for i in self.clients if i not in self.failed]
        if not live:
            return False
        with s.cond:
            if s.generation != self.generation:
                raise FrozenImageGone(name=s.name)
            pending = self._pending_union()
            x = pending.find(1, self.cursor)
            if x < 0:
                return False
            end = pending.find(0, x, min(s.extents, x + max(1, copier.CHUNK // g)))
            if end < 0:
                end = min(s.extents, x + max(1, copier.CHUNK // g))
            targets = [i for i in live
                       if s.dests[i].pending.find(1, x, end) >= 0]
        offset = x * g
        length = min(end * g, s.size) - offset
        # Holes are not read: they stay zero in buf and go out as
        # write-zeroes with the zero extents of the data.
        buf = bytearray(length)
        view = memoryview(buf)
        if self.unmarked:
            for start, n, hole in s.inner.extents(offset, length):
                if not hole:
                    s.inner.readinto(view[start - offset:start - offset + n],
                                     start)
        else:
            for start, n, hole in s.frozen_extents(offset, length):
                if not hole:
                    s.read_frozen(view[start - offset:start - offset + n],
                                  start, self.generation)
        pieces = _pieces(buf, g)
        for i in targets:
            try:
                self._send(i, buf, offset, pieces)
            except Exception as e:  # noqa: BLE001 - one destination fails
                self._drop(i, e)
                continue
            self.unflushed[i].append((x, end))
        self.cursor = end
        self.bytes_done += length
        self.since_checkpoint += length
        if self.since_checkpoint >= CHECKPOINT_BYTES:
            self.checkpoint()
        return True

    def _send(self, i, buf, offset, pieces):
        """Data pieces as writes, all-zero pieces as write-zeroes."""
        client = self.clients[i]
        view = memoryview(buf)
        for pos, end, zero in pieces:
            if zero:
                client.zero(offset + pos, end - pos)
                self.bytes_zeroed += end - pos
            else:
                client.write(view[pos:end], offset + pos)
                self.session.dests[i].bytes_sent += end - pos
                self.bytes_sent += end - pos

    def _drop(self, i, exc):
        s = self.session
        d = s.dests[i]
        msg = str(exc)
        log.error("session %s: destination %s failed: %s", s.name, d.uri, msg)
        self.failed[i] = msg
        d.last_error = msg
        self.unflushed[i] = []

    def checkpoint(self):
        """Flush every destination, then clear what it now has."""
        s = self.session
        done = {}
        for i, runs in self.unflushed.items():
            if i in self.failed or not runs:
                continue
            try:
                self.clients[i].flush()
            except Exception as e:  # noqa: BLE001
                self._drop(i, e)
                continue
            done[i] = runs
        # The cleared maps are durable before the bits leave memory: once
        # a transfer bit is clear, host writes to the extent no longer save
        # its old data, so a crash must not bring the bit back.
        with s.cond:
            if s.generation != self.generation:
                raise FrozenImageGone(name=s.name)
            cleared = {}
            for i, runs in done.items():
                m = bytearray(s.dests[i].pending)
                for a, b in runs:
                    m[a:b] = bytes(b - a)
                cleared[i] = m
        for i, m in cleared.items():
            maps.save(s.pending_path(s.dests[i]), m, s.granularity)
        with s.cond:
            if s.generation != self.generation:
                raise FrozenImageGone(name=s.name)
            for i, runs in done.items():
                d = s.dests[i]
                for a, b in runs:
                    d.pending[a:b] = bytes(b - a)
            if not self.unmarked:
                for i, runs in done.items():
                    for a, b in runs:
                        s.recompute_transfer(a, b)
        for i in done:
            self.unflushed[i] = []
        self.since_checkpoint = 0

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
