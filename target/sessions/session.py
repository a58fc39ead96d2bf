"""Incremental copy sessions: mark, copy on first write, transfer (seed 001).

Design notes
------------
A session belongs to one Source LU and has one or more destinations (NBD
exports served by anything).  It sees every change to the Source's bytes
through its layer in the Source's I/O stack (SessionLayer, target.iostack):
host writes, the replicated apply on a secondary, clone engine writes into
the Source (reverse sync, protected restore) and trims all pass it, so
nothing can change the Source behind a session's back.  An LU without
sessions has no such layer and pays nothing.

Maps (one byte per extent, target.maps):
- tracking: extents changed since the last mark.  Durable the way clone
  delta maps are: a committed map file replaced at flush points (at most
  once per COMMIT_INTERVAL), and between commits an activity map written
  ahead of any write into a cold 4 MiB region.  Recovery = committed OR
  activity, a bounded superset.  Unlike a delta map, a tracking bit only
  says "changed", so a commit needs no flush of the data: a bit recorded
  early is harmless.  A commit swaps in a fresh `track` (extents written
  since the commit began), saves the snapshot, then rewrites the activity
  map as the regions of `track`.
- pending, one per destination: what that destination still needs beyond
  `tracking`.  At mark every destination's pending map gets the tracking
  map (all extents for a destination that has never had a full copy) and
  tracking starts empty.  The transfer map is the union of the pending
  maps: the frozen extents somebody still needs.  A destination's bits are
  cleared only after it has flushed the data, and the map is saved then.

Mark is atomic with respect to host writes: new writes wait while the
writes in flight drain, then the maps are swapped.  While marked, a write to
an extent set in the transfer map (to any extent, when the frozen image is
exported) first copies the extent's old data to the save area (copy on
first write) and makes it durable (data, then the index entry with a crc,
one fdatasync): a write that could become durable before its old data is
saved would lose the point in time.  The frozen image is saved data where
present, else the Source.  A reader of the frozen image (transfer engine,
frozen export) reads the Source and then checks, under the lock, whether
the extent was saved meanwhile; if so it reads the saved copy instead: a
COFW always finishes before the write that triggered it starts.

Unmark (by command, after a successful transfer, or when a COFW cannot be
made: save area full, I/O error) merges the transfer map into tracking and
saves it, records the session unmarked, then clears the pending maps and
the save area; in that order, so a crash at any point loses no extent from
the next transfer.  An unmark forced by an error is done before the write
that hit it proceeds, and the error is kept in the session's status.

Consistency of destinations (DESIGN.md section 3.4): a destination is
`consistent` only after a marked transfer to it completed and it flushed;
while a transfer writes to it out of order it is `inconsistent`, and a full
copy while unmarked (no COFW: faster) leaves it `inconsistent` until the
next marked transfer completes.  Interrupted transfers resume: the pending
maps say what each destination still lacks.

Deliberately ignored: the transfer engine reads one run at a time (up to
CHUNK bytes) and pipelines the writes to the destinations (libnbd async,
IN_FLIGHT requests each, over several connections with multi-conn); the
destinations are flushed every CHECKPOINT_BYTES (the price of resuming
without resending everything); a destination that fails is dropped from the
transfer (its bits stay set) while the others go on; rate limiting.
"""

import errno
import logging
import os
import select
import struct
import threading
import time
import zlib

from .. import errors, iostack, maps

log = logging.getLogger("clonectl.sessions")

ACTIVITY_REGION = 4 << 20
COMMIT_INTERVAL = 1.0
CHUNK = 1 << 20
CHECKPOINT_BYTES = 64 << 20
IN_FLIGHT = 64          # per destination, spread over its connections
DEFAULT_TIMEOUT = 30.0

CONSISTENT = "consistent"
INCONSISTENT = "inconsistent"
NEW = "new"


class SessionError(errors.Error):
    msg = "session {name!r}: {reason}"
    errno = errno.EINVAL


class SessionBusy(errors.Error):
    msg = "session {name!r} is busy: {reason}"
    errno = errno.EBUSY


class UnknownSession(errors.Error):
    msg = "no session named {name!r}"
    errno = errno.ENOENT


class SaveAreaFull(errors.Error):
    msg = ("the save area of session {name!r} is full ({slots} extents of "
           "{granularity} bytes); the session was unmarked")
    errno = errno.ENOSPC


class DestinationError(errors.Error):
    msg = "destination {uri}: {reason}"
    errno = errno.EIO


class FrozenImageGone(errors.Error):
    msg = "session {name!r} was unmarked; its frozen image is gone"
    errno = errno.ESTALE


def _range_of(offset, length, granularity):
    return offset // granularity, \
        (offset + max(length, 1) + granularity - 1) // granularity


# ---------------------------------------------------------------- save area


class SaveArea:
    """Old data of extents written while marked, in a backend.

    Layout: an index of 8 bytes per extent (u32 slot + 1, u32 crc32 of the
    slot's data; 0 = not saved), rounded up to 4 KiB, then the slots, one
    extent each, allocated in order.  An entry whose crc does not match its
    slot is dropped at load: it was written but its data never became
    durable, and then the write it protected had not started either.
    """

    ENTRY = struct.Struct("<II")

    def __init__(self, backend, extents, granularity):
        self.backend = backend
        self.extents = extents
        self.granularity = granularity
        self.index_bytes = (extents * self.ENTRY.size + 4095) // 4096 * 4096
        self.capacity = max(0, (backend.size - self.index_bytes) // granularity)
        self.slots = {}
        self.next_slot = 0

    @staticmethod
    def minimum_size(extents, granularity):
        return (extents * 8 + 4095) // 4096 * 4096 + granularity

    def _slot_offset(self, slot):
        return self.index_bytes + slot * self.granularity

    def load(self):
        """Read the index back; return how many entries were dropped."""
        index = bytearray(self.index_bytes)
        self.backend.readinto(index, 0)
        self.slots = {}
        dropped = 0
        buf = bytearray(self.granularity)
        for x in range(self.extents):
            slot1, crc = self.ENTRY.unpack_from(index, x * self.ENTRY.size)
            if slot1 == 0:
                continue
            slot = slot1 - 1
            if slot >= self.capacity:
                dropped += 1
                continue
            self.backend.readinto(buf, self._slot_offset(slot))
            if zlib.crc32(buf) != crc:
                dropped += 1
                continue
            self.slots[x] = slot
        self.next_slot = max(self.slots.values(), default=-1) + 1
        return dropped

    def reset(self):
        self.backend.zero(0, self.index_bytes)
        if self.backend.size > self.index_bytes:
            self.backend.trim(self.index_bytes,
                              self.backend.size - self.index_bytes)
        self.backend.flush()
        self.slots = {}
        self.next_slot = 0

    def allocate(self):
        """Take the next slot (caller holds the session lock)."""
        if self.next_slot >= self.capacity:
            return None
        slot = self.next_slot
        self.next_slot += 1
        return slot

    def store(self, extent, slot, data):
        """Write data to slot and its index entry, and make both durable."""
        self.backend.write(data, self._slot_offset(slot))
        self.backend.write(self.ENTRY.pack(slot + 1, zlib.crc32(data)),
                           extent * self.ENTRY.size)
        self.backend.flush()

    def readinto(self, extent, view):
        self.backend.readinto(view, self._slot_offset(self.slots[extent]))

    def used_bytes(self):
        return len(self.slots) * self.granularity


# ---------------------------------------------------------------- tracking


class TrackingMap:
    """A map of changed extents that survives a crash as a bounded superset.

    note_write() and the activity map are used under the owner's lock;
    commit() takes the lock itself.
    """

    def __init__(self, path, granularity, extents):
        self.path = path
        self.granularity = granularity
        self.extents = extents
        self.region = max(1, ACTIVITY_REGION // granularity)
        self.bits = bytearray(extents)
        self.track = bytearray(extents)
        self.activity = bytearray(extents)
        self.activity_file = maps.ActivityFile(path + ".activity",
                                               granularity, extents)
        self.commit_lock = threading.Lock()
        self.last_commit = 0.0

    def create(self):
        maps.save(self.path, self.bits, self.granularity)
        self.activity_file.reset(self.activity)

    def load(self):
        """Recover committed OR activity; return a problem or None."""
        problem = None
        try:
            self.bits = maps.load(self.path, self.granularity, self.extents)
        except maps.MapCorrupt as e:
            problem = "{}; every extent is marked changed".format(e)
            self.bits = bytearray(b"\x01" * self.extents)
        try:
            activity = maps.load(self.activity_file.path, self.granularity,
                                 self.extents, with_crc=False)
        except maps.MapCorrupt as e:
            problem = problem or "{}; every extent is marked changed".format(e)
            activity = bytearray(b"\x01" * self.extents)
        for s, e in maps.runs(activity):
            maps.set_range(self.bits, s, e)
        # The recovered bits are durable once committed; start clean.
        maps.save(self.path, self.bits, self.granularity)
        self.activity = bytearray(self.extents)
        self.activity_file.reset(self.activity)
        return problem

    def note_write(self, e0, e1):
        maps.set_range(self.bits, e0, e1)
        maps.set_range(self.track, e0, e1)
        if self.activity.find(0, e0, e1) >= 0:
            r = self.region
            s = e0 // r * r
            e = min(self.extents, (e1 + r - 1) // r * r)
            maps.set_range(self.activity, s, e)
            self.activity_file.persist(self.activity, s, e)

    def commit(self, lock):
        with self.commit_lock:
            with lock:
                snapshot = bytes(self.bits)
                self.track = bytearray(self.extents)
            maps.save(self.path, snapshot, self.granularity)
            with lock:
                activity = bytearray(self.extents)
                r = self.region
                for s, e in maps.runs(self.track):
                    maps.set_range(activity, s // r * r,
                                   min(self.extents, (e + r - 1) // r * r))
                self.activity = activity
                self.activity_file.reset(activity)
            self.last_commit = time.monotonic()

    def replace(self, lock, bits):
        """Make bits the map, durable before returning (mark, unmark)."""
        with self.commit_lock:
            with lock:
                self.bits = bits
                self.track = bytearray(self.extents)
                snapshot = bytes(bits)
            maps.save(self.path, snapshot, self.granularity)
            with lock:
                self.activity = bytearray(self.extents)
                self.activity_file.reset(self.activity)

    def close(self):
        self.activity_file.close()


# ---------------------------------------------------------------- session


class Destination:
    """One destination of a session: its URI, state and pending map."""

    def __init__(self, index, record, extents):
        self.index = index
        self.uri = record["uri"]
        self.peer = record.get("peer")
        self.consistency = record.get("consistency", NEW)
        self.needs_full = record.get("needs_full", True)
        self.protected = record.get("protected", False)
        self.protected_since = record.get("protected_since")
        self.last_success = record.get("last_success")
        self.last_error = record.get("last_error")
        self.bytes_sent = record.get("bytes_sent", 0)
        self.pending = bytearray(extents)
        self.transferring = False

    def record(self):
        return {"uri": self.uri, "peer": self.peer,
                "consistency": self.consistency,
                "needs_full": self.needs_full, "protected": self.protected,
                "protected_since": self.protected_since,
                "last_success": self.last_success,
                "last_error": self.last_error, "bytes_sent": self.bytes_sent}


class Session:
    """An incremental copy session on one Source.

    persist(record) writes the session's record to the inventory
    (state.json) durably; the record is what record() returns.
    """

    def __init__(self, name, source, granularity, map_dir, save_backend,
                 dest_records, persist=None, marked=False, export=False,
                 error=None, save_area_size=None, last_transfer=None,
                 token_file=None, mark_time=None):
        self.name = name
        self.source = source            # the LU
        self.size = source.size
        self.granularity = granularity
        self.extents = maps.extent_count(self.size, granularity)
        self.base = os.path.join(map_dir, "{}@{}".format(source.name, name))
        self.persist = persist or (lambda record: None)
        self.cond = threading.Condition(threading.Lock())
        self.tracking = TrackingMap(self.base + ".track", granularity,
                                    self.extents)
        self.dests = [Destination(i, r, self.extents)
                      for i, r in enumerate(dest_records)]
        self.transfer = bytearray(self.extents)
        self.save = SaveArea(save_backend, self.extents, granularity)
        self.save_area_size = save_area_size or save_backend.size
        self.marked = marked
        self.export = export
        self.error = error
        self.mark_time = mark_time if marked else None
        self.generation = 0
        self.quiesce = False
        self.unmarking = False
        self.closed = False
        self.active = 0
        self.saving = set()
        self.cofw_count = 0
        self.engine = None
        self.export_connections = 0
        self.last_transfer = last_transfer
        self.token_file = token_file
        self.problems = []
        self.layer = None       # the SessionLayer it is attached to

    # ------------------------------------------------------------ set-up

    @property
    def inner(self):
        """The Source under the sessions' layer (what a copy on first
        write saves and a frozen image reads)."""
        return self.layer.inner

    def export_name(self):
        return "{}@{}".format(self.source.name, self.name)

    def _pending_path(self, dest):
        return "{}.d{}.pending".format(self.base, dest.index)

    def create(self):
        self.tracking.create()
        for d in self.dests:
            maps.save(self._pending_path(d), d.pending, self.granularity)
        self.save.reset()

    def load(self):
        """Recover maps and the save area after a restart or crash."""
        problem = self.tracking.load()
        if problem:
            self.problems.append(problem)
        for d in self.dests:
            try:
                d.pending = maps.load(self._pending_path(d), self.granularity,
                                      self.extents)
            except maps.MapCorrupt as e:
                d.pending = bytearray(b"\x01" * self.extents)
                self.problems.append("{}; destination {} gets every extent"
                                     .format(e, d.uri))
        if self.marked:
            self._recompute_transfer()
            dropped = self.save.load()
            if dropped:
                log.info("session %s: %d save-area entries never became "
                         "durable; dropped", self.name, dropped)
        return self.problems

    def record(self):
        return {"granularity": self.granularity,
                "save_area": self.save_area_size,
                "marked": self.marked, "export": self.export,
                "mark_time": self.mark_time,
                "error": self.error,
                "dests": [d.record() for d in self.dests],
                "token_file": self.token_file,
                "last_transfer": self.last_transfer}

    def _persist(self):
        self.persist(self.record())

    def _record_as(self, needs_full=None, **changes):
        """record() with changes not yet made in memory (to save first)."""
        rec = self.record()
        rec.update(changes)
        if needs_full is not None:
            for d in rec["dests"]:
                d["needs_full"] = needs_full
        return rec

    def _recompute_transfer(self, start=0, end=None):
        end = self.extents if end is None else end
        t = bytearray(end - start)
        for d in self.dests:
            for s, e in maps.runs(d.pending, start, end):
                maps.set_range(t, s - start, e - start)
        self.transfer[start:end] = t

    # ------------------------------------------------------------ host writes

    def _protected(self, e0, e1):
        """Extents of [e0, e1) whose old data must be saved first."""
        if self.export:
            return [x for x in range(e0, min(e1, self.extents))
                    if x not in self.save.slots]
        if self.transfer.find(1, e0, e1) < 0:
            return []
        return [x for x in range(e0, min(e1, self.extents))
                if self.transfer[x] and x not in self.save.slots]

    def before_write(self, offset, length):
        """Track a change of [offset, offset+length); COFW if marked."""
        e0, e1 = _range_of(offset, length, self.granularity)
        with self.cond:
            while self.quiesce:
                self.cond.wait()
            self.active += 1
            if self.closed:
                return      # deleted while this write was on its way
            self.tracking.note_write(e0, e1)
            if not self.marked:
                return
            while True:
                need = self._protected(e0, e1)
                if not any(x in self.saving for x in need):
                    break
                self.cond.wait()
                if not self.marked:
                    return
            slots = []
            for x in need:
                slot = self.save.allocate()
                if slot is None:
                    break
                slots.append((x, slot))
            full = len(slots) < len(need)
            self.saving.update(x for x, _ in slots)
            generation = self.generation
        try:
            if full:
                raise SaveAreaFull(name=self.name, slots=self.save.capacity,
                                   granularity=self.granularity)
            self._copy_on_first_write(slots, generation)
        except (SaveAreaFull, OSError) as e:
            self._abandon_mark(generation, str(e))
        finally:
            if slots:
                with self.cond:
                    self.saving.difference_update(x for x, _ in slots)
                    self.cond.notify_all()

    def _copy_on_first_write(self, slots, generation):
        g = self.granularity
        buf = bytearray(g)
        for x, slot in slots:
            n = min(g, self.size - x * g)
            view = memoryview(buf)
            if n < g:
                view[n:] = bytes(g - n)
            self.inner.readinto(view[:n], x * g)
            self.save.store(x, slot, buf)
            with self.cond:
                if generation != self.generation:
                    return  # unmarked meanwhile: the save area was reset
                self.save.slots[x] = slot
                self.cofw_count += 1

    def after_write(self):
        with self.cond:
            self.active -= 1
            if self.quiesce and self.active == 0:
                self.cond.notify_all()

    def maybe_commit(self):
        if self.closed:
            return
        if time.monotonic() - self.tracking.last_commit >= COMMIT_INTERVAL:
            self.tracking.commit(self.cond)

    # ------------------------------------------------------------ frozen image

    def read_frozen(self, buf, offset, generation=None):
        """Read the marked point in time (saved data, else the Source)."""
        view = memoryview(buf).cast("B")
        g = self.granularity
        e0, e1 = _range_of(offset, len(view), g)
        with self.cond:
            if not self.marked or (generation is not None and
                                   generation != self.generation):
                raise FrozenImageGone(name=self.name)
            generation = self.generation
            saved = [x for x in range(e0, e1) if x in self.save.slots]
        if len(saved) < e1 - e0:
            self.inner.readinto(view, offset)
        with self.cond:
            if not self.marked or generation != self.generation:
                raise FrozenImageGone(name=self.name)
            saved = [(x, self.save.slots[x]) for x in range(e0, e1)
                     if x in self.save.slots]
        if saved:
            tmp = bytearray(g)
            for x, _ in saved:
                self.save.readinto(x, tmp)
                s = max(offset, x * g)
                e = min(offset + len(view), (x + 1) * g)
                view[s - offset:e - offset] = tmp[s - x * g:e - x * g]

    # ------------------------------------------------------------ mark

    def mark(self, export=False, check=None, full=False):
        """Freeze the point in time: tracking becomes the transfer map
        (every extent, with full)."""
        with self.cond:
            if self.marked:
                raise SessionBusy(name=self.name, reason="already marked; "
                                  "unmark it or let the transfer finish")
            if self.unmarking:
                raise SessionBusy(name=self.name, reason="an unmark is "
                                  "finishing; try again")
            self._check_idle()
            self.quiesce = True
            while self.active:
                self.cond.wait()
        try:
            if check is not None:
                check()
            # Writes not yet durable on the Source must not be sent as part
            # of the point in time and then lost there by a power cut with
            # no map left to say so: the Source is flushed first.
            self.inner.flush()
            self.save.reset()
            bits = self.tracking.bits
            for d in self.dests:
                pending = bytearray(b"\x01" * self.extents) \
                    if d.needs_full or full else bytearray(d.pending)
                for s, e in maps.runs(bits):
                    maps.set_range(pending, s, e)
                maps.save(self._pending_path(d), pending, self.granularity)
                d.pending = pending
            # The marked record first: a save that fails (a full state
            # directory) leaves the session unmarked, in memory as on disk.
            mark_time = time.time()
            self.persist(self._record_as(marked=True, export=bool(export),
                                         error=None, mark_time=mark_time,
                                         needs_full=False))
            with self.cond:
                self._recompute_transfer()
                self.marked = True
                self.export = bool(export)
                self.error = None
                self.mark_time = mark_time
                self.generation += 1
                for d in self.dests:
                    d.needs_full = False
            self.tracking.replace(self.cond, bytearray(self.extents))
        finally:
            with self.cond:
                self.quiesce = False
                self.cond.notify_all()
        log.info("session %s marked (%d extents to transfer)", self.name,
                 self.transfer.count(1))

    def _check_idle(self):
        if self.engine is not None and self.engine.is_alive():
            raise SessionBusy(name=self.name, reason="a transfer is running")

    def unmark(self, error=None, force=False):
        """Discard the frozen image; nothing is lost from the next transfer."""
        with self.cond:
            if not self.marked:
                raise SessionError(name=self.name, reason="not marked")
            if self.export_connections and not force:
                raise SessionBusy(
                    name=self.name, reason="its frozen export {} has {} "
                    "connection(s); use --force to unmark anyway".format(
                        self.export_name(), self.export_connections))
        engine = self.engine
        if engine is not None:
            engine.stop("unmarked")
            engine.join()
        with self.cond:
            if not self.marked:
                return
            generation = self.generation
        self._unmark(generation, error)

    def _abandon_mark(self, generation, reason):
        log.error("session %s: %s; unmarking", self.name, reason)
        self._unmark(generation, reason)

    def _unmark(self, generation, error):
        with self.cond:
            if not self.marked or generation != self.generation:
                return
            merged = bytearray(self.tracking.bits)
            for s, e in maps.runs(self.transfer):
                maps.set_range(merged, s, e)
            self.tracking.bits = merged
        # 1. the merged tracking map is durable ...
        self.tracking.commit(self.cond)
        # 2. ... before the session is recorded unmarked, and only then
        # unmarked in memory: a save that fails leaves the frozen image
        # whole (writes keep saving its data) ...
        self.persist(self._record_as(marked=False, export=False, error=error,
                                     mark_time=None))
        with self.cond:
            self.marked = False
            self.unmarking = True
            self.export = False
            self.generation += 1
            self.error = error
            self.mark_time = None
            self.transfer = bytearray(self.extents)
        # 3. ... and only then are the pending maps and saved data dropped
        # (a mark waits for this: `unmarking`).
        try:
            for d in self.dests:
                d.pending = bytearray(self.extents)
                maps.save(self._pending_path(d), d.pending, self.granularity)
            self.save.reset()
        finally:
            with self.cond:
                self.unmarking = False
                self.cond.notify_all()

    # ------------------------------------------------------------ transfer

    def check_transfer(self, full=False, unmarked=False, will_mark=False):
        """Refuse a transfer request that start_transfer would refuse,
        before anything (a mark, a peer protect) is done for it."""
        with self.cond:
            self._check_transfer(full, unmarked, will_mark)

    def _check_transfer(self, full, unmarked, will_mark=False):
        self._check_idle()
        if unmarked:
            if self.marked:
                raise SessionError(name=self.name, reason="--unmarked needs "
                                   "an unmarked session")
            if not full:
                raise SessionError(name=self.name, reason="--unmarked is "
                                   "for full copies (--full)")
        elif not self.marked and not will_mark:
            raise SessionError(
                name=self.name, reason="not marked: mark it first (session "
                "mark), or run a whole update (session update)")
        elif full and self.marked and self.transfer.count(0) and \
                not self.export:
            # Extents outside the transfer map had no copy on first write:
            # the frozen image of those is gone.
            raise SessionError(
                name=self.name, reason="--full needs the whole image frozen: "
                "unmark, then transfer --full (it marks every extent)")

    def start_transfer(self, clients, full=False, unmarked=False, run=True,
                       on_done=None):
        """Start the transfer engine; clients: dest index -> client."""
        with self.cond:
            self._check_transfer(full, unmarked)
        if unmarked:
            for d in self.dests:
                d.pending = bytearray(b"\x01" * self.extents)
                maps.save(self._pending_path(d), d.pending, self.granularity)
        engine = TransferEngine(self, clients, unmarked=unmarked,
                                on_done=on_done)
        # The destinations are recorded inconsistent before anything is
        # sent to them, and shown so only once that is saved.
        rec = self.record()
        for d, r in zip(self.dests, rec["dests"]):
            if d.index in clients:
                r["consistency"] = INCONSISTENT
        self.persist(rec)
        for d in self.dests:
            if d.index in clients:
                d.consistency = INCONSISTENT
                d.transferring = True
        self.engine = engine
        log.info("transfer of session %s (%s) started: %d extents of %d "
                 "bytes to %d destinations%s", self.name, self.source.name,
                 engine.total, self.granularity, len(clients),
                 " (unmarked: the live image)" if unmarked else "")
        if run:
            engine.start()
        return engine

    def stop_engine(self):
        """Stop a transfer (it resumes from the pending maps next time)."""
        engine = self.engine
        if engine is not None:
            engine.stop("the target is stopping")
            engine.join()
        self.tracking.commit(self.cond)

    def status(self):
        with self.cond:
            engine = self.engine
            running = engine is not None and engine.is_alive()
            out = {
                "name": self.name,
                "source": self.source.name,
                "granularity": self.granularity,
                "marked": self.marked,
                "mark_time": self.mark_time,
                "frozen_export": self.export_name() if self.marked and
                self.export else None,
                "tracked_extents": self.tracking.bits.count(1),
                "extents_to_send": self.transfer.count(1) if self.marked
                else 0,
                "cofw_count": self.cofw_count,
                "save_area": {"size": self.save_area_size,
                              "capacity_extents": self.save.capacity,
                              "used_extents": len(self.save.slots),
                              "used_bytes": self.save.used_bytes()},
                "transfer": engine.progress() if engine is not None else None,
                "transferring": running,
                "error": self.error,
                "last_transfer": self.last_transfer,
                "problems": list(self.problems),
                "destinations": [],
            }
            for d in self.dests:
                if d.transferring and running:
                    shown = "inconsistent (protected)" if d.protected else \
                        "inconsistent (unprotected)"
                else:
                    shown = d.consistency
                out["destinations"].append({
                    "uri": d.uri, "peer": d.peer, "state": shown,
                    "consistency": d.consistency,
                    "protected": d.protected,
                    "pending_extents": d.pending.count(1),
                    "needs_full": d.needs_full,
                    "bytes_sent": d.bytes_sent,
                    "last_success": d.last_success,
                    "last_error": d.last_error})
            return out

    # What each bit of a map_runs code means (bits: changed, transfer,
    # saved); the kind of a run is the names of its bits.
    MAP_KINDS = ("changed", "transfer", "saved")

    def map_runs(self):
        """The Source's extents as runs, for `session map`: changed (since
        the mark, or since the session was made: the next transfer's),
        transfer (frozen extents still to send) and saved (old data in the
        save area), comma-separated when several apply, else clean."""
        with self.cond:
            changed = bytes(self.tracking.bits)
            transfer = bytes(self.transfer) if self.marked \
                else bytes(self.extents)
            saved = bytearray(self.extents)
            for extent in self.save.slots:
                saved[extent] = 1
        code = maps.combine(changed, transfer, saved)
        names = {v: ",".join(k for i, k in enumerate(self.MAP_KINDS)
                             if v >> i & 1) or "clean" for v in range(8)}
        return {"granularity": self.granularity, "size": self.size,
                "runs": maps.kind_runs(code, self.granularity, self.size,
                                       names)}

    def close(self):
        engine = self.engine
        if engine is not None:
            engine.stop("closing")
            engine.join()
        with self.cond:
            self.closed = True
        try:
            self.tracking.commit(self.cond)
        except OSError as e:
            log.error("session %s: final commit failed: %s", self.name, e)
        self.tracking.close()
        self.save.backend.close()


# ---------------------------------------------------------------- wrapper


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
                # Entered first: before_write counts the write as active
                # before anything in it can fail, and after_write undoes it.
                done.append(s)
                s.before_write(offset, length)
            apply()
        finally:
            for s in done:
                s.after_write()

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
        # A connection reads the point in time it connected to, or fails
        # (ESTALE) once that is gone: never a later mark's image.
        self.generation = session.generation

    def read(self, buf, offset):
        self.session.read_frozen(buf, offset, self.generation)

    def _refuse(self, *args, **kwargs):
        raise errors.ReadOnly(name=self.name)

    write = zero = trim = _refuse

    def flush(self):
        pass

    def extents(self, offset, length):
        return [(offset, length, False)]


# ---------------------------------------------------------------- engine


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

    def is_alive(self):
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
            end = pending.find(0, x, min(s.extents, x + max(1, CHUNK // g)))
            if end < 0:
                end = min(s.extents, x + max(1, CHUNK // g))
            targets = [i for i in live
                       if s.dests[i].pending.find(1, x, end) >= 0]
        offset = x * g
        length = min(end * g, s.size) - offset
        buf = bytearray(length)
        if self.unmarked:
            s.inner.readinto(buf, offset)
        else:
            s.read_frozen(buf, offset, self.generation)
        for i in targets:
            try:
                self._send(i, buf, offset)
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

    def _send(self, i, buf, offset):
        """Data pieces as writes, all-zero extents as write-zeroes."""
        client = self.clients[i]
        g = self.session.granularity
        zero = bytes(g)
        view = memoryview(buf)
        pos = 0
        # Slices of a bytearray compare with memcmp (6 us a 64 KiB piece
        # here; a memoryview comparison takes 210 us).
        while pos < len(buf):
            n = min(g, len(buf) - pos)
            is_zero = buf[pos:pos + n] == zero[:n]
            end = pos + n
            while end < len(buf):
                m = min(g, len(buf) - end)
                if (buf[end:end + m] == zero[:m]) != is_zero:
                    break
                end += m
            if is_zero:
                client.zero(end - pos, offset + pos)
                self.bytes_zeroed += end - pos
            else:
                client.write(view[pos:end], offset + pos)
                self.session.dests[i].bytes_sent += end - pos
                self.bytes_sent += end - pos
            pos = end

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
            maps.save(s._pending_path(s.dests[i]), m, s.granularity)
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
                        s._recompute_transfer(a, b)
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
            s._unmark(self.generation, None)   # persists the record too
        else:
            s._persist()

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
            s._persist()
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
        out["running"] = self.is_alive()
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


# ---------------------------------------------------------------- clients


class MemoryDestination:
    """A destination in memory, for engine tests; fail_after counts calls."""

    def __init__(self, backend):
        self.backend = backend
        self.size = backend.size
        self.fail_after = None
        self.flushed = bytes(backend.data)
        self.closed = False

    def _tick(self):
        if self.fail_after is not None:
            self.fail_after -= 1
            if self.fail_after < 0:
                raise DestinationError(uri="memory", reason="injected failure")

    def write(self, buf, offset):
        self._tick()
        self.backend.write(bytes(buf), offset)

    def zero(self, length, offset):
        self._tick()
        self.backend.zero(offset, length)

    def flush(self):
        self._tick()
        self.flushed = bytes(self.backend.data)

    def close(self):
        self.closed = True


def _nbd_reason(e):
    """The text of a libnbd error, with the errno's symbolic name added.

    libnbd's message ends in strerror() ("... command failed: No space left
    on device"); a destination that fails with ENOSPC wants a different fix
    (grow it) from one failing with EIO (a broken disk), so the status and
    the CLI name the errno as the server sent it ("(ENOSPC)") too, in a form
    scripts can match whatever the locale.  (The Python binding's e.errno
    is that name, a string; older ones may give a number.)
    """
    text = str(e.string if getattr(e, "string", None) else e)
    code = getattr(e, "errno", None)
    name = errno.errorcode.get(code) if isinstance(code, int) else code
    if name and name not in text:
        text += " ({})".format(name)
    return text


class _NbdConnection:
    """One libnbd handle and the commands it has in flight."""

    def __init__(self, nbd, uri, timeout, error):
        self.nbd = nbd
        self.uri = uri
        self.timeout = timeout
        self.error = error
        self.h = nbd.NBD()
        self.buffers = {}     # cookie -> buffer of a write in flight
        self.others = set()   # cookies of zeroes and flushes in flight
        h = self.h
        try:
            h.aio_connect_uri(uri)
            deadline = time.monotonic() + timeout
            while h.aio_is_connecting():
                if time.monotonic() > deadline:
                    raise error("no answer within {:g} s".format(timeout))
                h.poll(500)
            if not h.aio_is_ready():
                raise error("the connection failed")
        except nbd.Error as e:
            raise error(_nbd_reason(e))

    def in_flight(self):
        return len(self.buffers) + len(self.others)

    def retire(self):
        """Retire completed commands; raise if one failed."""
        h = self.h
        try:
            while self.in_flight():
                try:
                    cookie = h.aio_peek_command_completed()
                except self.nbd.Error:
                    break   # nothing in flight at all
                if not cookie:
                    break
                self.buffers.pop(cookie, None)
                self.others.discard(cookie)
                h.aio_command_completed(cookie)
            if h.aio_is_dead():
                raise self.error("the connection died")
        except self.nbd.Error as e:
            raise self.error(_nbd_reason(e))

    def submit(self, start, *args):
        try:
            return start(*args)
        except self.nbd.Error as e:
            raise self.error(_nbd_reason(e))

    def close(self):
        """Disconnect without waiting on a destination that may be gone:
        a graceful shutdown waits for the replies to commands in flight,
        which never come over a cut link."""
        if self.h is None:
            return
        h, self.h = self.h, None
        try:
            if not self.in_flight() and h.aio_is_ready():
                h.aio_disconnect(0)
                deadline = time.monotonic() + 2.0
                while not (h.aio_is_closed() or h.aio_is_dead()) and \
                        time.monotonic() < deadline:
                    h.poll(200)
        except self.nbd.Error:
            pass  # closing a dead connection
        self.buffers.clear()
        self.others.clear()
        # libnbd closes the socket when the handle is collected.


class NbdDestination:
    """A remote NBD export, written with libnbd's asynchronous API.

    When the server offers multi-conn (a flush on one connection covers
    writes completed on all of them), writes are spread over CONNECTIONS
    connections: a server that serializes each connection's requests (an
    nbdkit Python plugin, clonectl itself) then works on several at once.
    Measured here on a 1 GiB full copy to a clonectl destination: one
    connection reached 0.45 of nbdcopy (which uses four).
    """

    CONNECTIONS = 4

    def __init__(self, uri, timeout=DEFAULT_TIMEOUT, in_flight=IN_FLIGHT):
        import nbd
        self.nbd = nbd
        self.uri = uri
        self.timeout = timeout
        first = _NbdConnection(nbd, uri, timeout, self._error)
        self.conns = [first]
        self.next = 0
        try:
            h = first.h
            self.size = h.get_size()
            if h.is_read_only():
                raise self._error("the export is read-only")
            if not h.can_flush():
                raise self._error("the export cannot flush, so nothing "
                                  "written to it could be trusted")
            self.multi_conn = bool(h.can_multi_conn())
            if self.multi_conn:
                for _ in range(self.CONNECTIONS - 1):
                    self.conns.append(_NbdConnection(nbd, uri, timeout,
                                                     self._error))
        except self.nbd.Error as e:
            self.close()
            raise self._error(_nbd_reason(e))
        except BaseException:
            self.close()
            raise
        self.limit = max(2, in_flight // len(self.conns))

    def _error(self, reason):
        return DestinationError(uri=self.uri, reason=reason)

    def _wait(self, conns, until_below):
        """Drive every connection's state machine (libnbd sends queued
        data and reads replies only when its handle is polled, so all are
        polled together) until each of conns has fewer than until_below
        commands in flight."""
        deadline = time.monotonic() + self.timeout
        poller = select.poll()
        while True:
            for c in self.conns:
                c.retire()
            if all(c.in_flight() < until_below for c in conns):
                return
            fds = {}
            try:
                for c in self.conns:
                    fd = c.h.aio_get_fd()
                    want = c.h.aio_get_direction()
                    events = (select.POLLIN if want & 1 else 0) | \
                        (select.POLLOUT if want & 2 else 0)
                    if events:
                        fds[fd] = c
                        poller.register(fd, events)
                ready = poller.poll(500) if fds else []
                for fd, ev in ready:
                    c = fds[fd]
                    if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                        c.h.aio_notify_read()
                    if ev & select.POLLOUT:
                        c.h.aio_notify_write()
            except self.nbd.Error as e:
                raise self._error(_nbd_reason(e))
            finally:
                for fd in fds:
                    poller.unregister(fd)
            if ready:
                deadline = time.monotonic() + self.timeout
            elif time.monotonic() > deadline:
                raise self._error("no reply within {:g} s".format(
                    self.timeout))

    def _pick(self):
        conn = self.conns[self.next]
        self.next = (self.next + 1) % len(self.conns)
        self._wait([conn], self.limit)
        return conn

    def write(self, buf, offset):
        conn = self._pick()
        # Shared, not copied: the engine never reuses a chunk's buffer, and
        # the Buffer keeps it alive until the write completes.
        b = self.nbd.Buffer.from_buffer(buf)
        conn.buffers[conn.submit(conn.h.aio_pwrite, b, offset)] = b

    def zero(self, length, offset):
        conn = self._pick()
        conn.others.add(conn.submit(conn.h.aio_zero, length, offset))

    def flush(self):
        """Every write completed, then flushed (on one connection when
        multi-conn makes that cover all of them)."""
        self._wait(self.conns, 1)
        flushing = self.conns[:1] if self.multi_conn else self.conns
        for conn in flushing:
            conn.others.add(conn.submit(conn.h.aio_flush))
        self._wait(flushing, 1)

    def close(self):
        for conn in self.conns:
            conn.close()


def probe_destination(uri, size, timeout=10.0):
    """Check that uri answers, is writable and has the Source's size."""
    dest = NbdDestination(uri, timeout=timeout)
    try:
        if dest.size != size:
            raise DestinationError(
                uri=uri, reason="its size is {} bytes, the Source's is {}; "
                "nothing was written".format(dest.size, size))
    finally:
        dest.close()
