"""Incremental copy sessions: mark, copy on first write, transfer.

Design notes
------------
A session belongs to one Source LU and has one or more destinations (NBD
exports served by anything).  It sees every change to the Source's bytes
through its layer in the Source's I/O stack (layer.SessionLayer), so
nothing can change the Source behind a session's back.

Maps (one byte per extent, target.maps):
- tracking (tracking.TrackingMap): extents changed since the last mark,
  durable as a bounded superset.
- pending, one per destination: what that destination still needs beyond
  `tracking`.  At mark every destination's pending map gets the tracking
  map (all extents for a destination that has never had a full copy) and
  tracking starts empty.  The transfer map is the union of the pending
  maps.  A destination's bits are cleared only after it has flushed the
  data, and the map is saved then (transfer.TransferEngine).

The mark lifecycle is the table TRANSITIONS.  Mark is atomic with respect
to host writes: while MARKING, new writes wait while the writes in flight
drain, then the maps are swapped.  While MARKED, a write to an extent set
in the transfer map (to any extent, when the frozen image is exported)
first copies the old data of the blocks it changes to the save area
(copy on first write, a target.copier run; a block is 4 KiB, less than
an extent: savearea.py) and makes it durable (savearea.SaveArea, a group
commit shared with concurrent first writes): a write that could become
durable before its old data is saved would lose the point in time.  The
steps are apart (prepare_write notes and claims, copy_old_data copies,
finish_write waits and takes the saves into the frozen image) so that the
layer may acknowledge a write after the first and do the others in its
applier thread (layer.py: deferred writes); a queued write counts as in
flight until applied, and its claims keep other writes to its extents
waiting until then.  The
frozen image is saved data where present, else the Source.  A reader of
the frozen image reads the Source and then checks, under the lock, whether
a block was saved meanwhile; if so it reads the saved copy instead: a
copy on first write always finishes before the write that triggered it
starts.  A writer that knows a window of writes to come (a secondary's
replay writer) saves them ahead (save_ahead): one flush of the save area
and one of the activity map for the whole window, after which its writes
find their blocks saved and wait for neither.

Unmark (by command, after a successful transfer, or when a copy on first
write cannot be made: save area full, I/O error) merges the transfer map
into tracking and saves it, records the session unmarked (UNMARKING), then
clears the pending maps and the save area (UNMARKED); in that order, so a
crash at any point loses no extent from the next transfer.  An unmark
forced by an error is done before the write that hit it proceeds, and the
error is kept in the session's status.

Deliberately ignored: several frozen images per session.  See
docs/design.md and docs/persistence.md.
"""

import errno
import logging
import os
import threading
import time

from .. import copier, errors, maps
from .destinations import INCONSISTENT, Destination
from .layer import FrozenImageGone
from .savearea import (SaveArea, SaveAreaFull, SaveAreaUnreadable,
                       block_runs)
from .tracking import TrackingMap
from .transfer import TransferEngine

log = logging.getLogger("clonectl.sessions")

# The mark lifecycle.  The record on disk says only marked or not: a
# session is MARKED from the moment its marked record is saved, and
# UNMARKING from the moment its unmarked record is saved until its pending
# maps and save area are dropped.
UNMARKED = "unmarked"
MARKING = "marking"         # host writes wait; the maps are being swapped
MARKED = "marked"           # the frozen image: copy on first write
UNMARKING = "unmarking"     # recorded unmarked; the frozen image is dropped
STATES = (UNMARKED, MARKING, MARKED, UNMARKING)

# (state, event) -> next state.  Anything not listed is refused.
TRANSITIONS = {
    (UNMARKED, "mark"): MARKING,
    (MARKING, "marked"): MARKED,        # the marked record is saved
    (MARKING, "failed"): UNMARKED,      # nothing was recorded
    (MARKED, "unmark"): UNMARKING,      # the unmarked record is saved
    (UNMARKING, "dropped"): UNMARKED,
}

# Why a mark is refused, by state.
_MARK_REFUSED = {
    MARKING: "a mark is in progress; try again",
    MARKED: "already marked; unmark it or let the transfer finish",
    UNMARKING: "an unmark is finishing; try again",
}


class SessionError(errors.Error):
    msg = "session {name!r}: {reason}"
    errno = errno.EINVAL


class SessionBusy(errors.Error):
    msg = "session {name!r} is busy: {reason}"
    errno = errno.EBUSY


class UnknownSession(errors.Error):
    msg = "no session named {name!r}"
    errno = errno.ENOENT


class _Change:
    """A change of the save area's blocks [b0, b1) between
    Session.prepare_write and finish_write: its activity map ticket, the
    blocks it claimed to save (claimed) and their saves (stored: [(first
    block, count, first slot, ticket)]), whether blocks it must save were
    claimed by other writers (busy), and an error that ends the mark (a
    full save area, a failed copy)."""

    __slots__ = ("b0", "b1", "noted", "generation", "claimed", "stored",
                 "busy", "error")

    def __init__(self, b0, b1, noted):
        self.b0, self.b1, self.noted = b0, b1, noted
        self.generation = None
        self.claimed = self.stored = ()
        self.busy = False
        self.error = None

    @property
    def waits(self):
        """finish_write has something to wait for."""
        return bool(self.noted or self.claimed or self.busy or self.error)


def _range_of(offset, length, granularity):
    return offset // granularity, \
        (offset + max(length, 1) + granularity - 1) // granularity


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
                                    self.extents, self.cond)
        self.dests = [Destination(i, r, self.extents)
                      for i, r in enumerate(dest_records)]
        self.transfer = bytearray(self.extents)
        self.save_area = SaveArea(save_backend, self.extents, granularity)
        self.block = self.save_area.block
        self.save_area_size = save_area_size or save_backend.size
        self.state = MARKED if marked else UNMARKED
        self.export = export
        self.error = error
        self.mark_time = mark_time if marked else None
        self.generation = 0
        self.closed = False     # deleted or stopped: writes pass untracked
        self.writes_in_flight = 0
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
    def marked(self):
        """The frozen image exists (and the record on disk says so)."""
        return self.state == MARKED

    def _enter(self, event):
        """Take the transition of event (caller holds the lock)."""
        self.state = TRANSITIONS[(self.state, event)]

    @property
    def inner(self):
        """The Source under the sessions' layer (what a copy on first
        write saves and a frozen image reads)."""
        return self.layer.inner

    def export_name(self):
        return "{}@{}".format(self.source.name, self.name)

    def pending_path(self, dest):
        """The file of dest's pending map."""
        return "{}.d{}.pending".format(self.base, dest.index)

    def create(self):
        self.tracking.create()
        for d in self.dests:
            maps.save(self.pending_path(d), d.pending, self.granularity)
        # Not yet attached: no write can store a save.
        self.save_area.reset(quiet=True)

    def load(self):
        """Recover maps and the save area after a restart or crash."""
        problem = self.tracking.load()
        if problem:
            self.problems.append(problem)
        for d in self.dests:
            try:
                d.pending = maps.load(self.pending_path(d), self.granularity,
                                      self.extents)
            except maps.MapCorrupt as e:
                d.pending = bytearray(b"\x01" * self.extents)
                self.problems.append("{}; destination {} gets every extent"
                                     .format(e, d.uri))
        if self.marked:
            self.recompute_transfer()
            try:
                dropped = self.save_area.load()
            except SaveAreaUnreadable as e:
                self.problems.append(str(e))
                self._abandon_mark(self.generation, str(e))
                return self.problems
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

    def save(self):
        """Write the session's record (record()) to the inventory."""
        self.persist(self.record())

    def _record_as(self, needs_full=None, **changes):
        """record() with changes not yet made in memory (to save first)."""
        rec = self.record()
        rec.update(changes)
        if needs_full is not None:
            for d in rec["dests"]:
                d["needs_full"] = needs_full
        return rec

    def recompute_transfer(self, start=0, end=None):
        """The transfer map of [start, end) anew: the union of the pending
        maps (caller holds the lock)."""
        end = self.extents if end is None else end
        t = bytearray(end - start)
        for d in self.dests:
            for s, e in maps.runs(d.pending, start, end):
                maps.set_range(t, s - start, e - start)
        self.transfer[start:end] = t

    # ------------------------------------------------------------ host writes

    def _protected(self, b0, b1):
        """Blocks of [b0, b1) whose old data must be saved first."""
        b1 = min(b1, self.save_area.blocks)
        per = self.granularity // self.block
        if not self.export and \
                self.transfer.find(1, b0 // per, (b1 + per - 1) // per) < 0:
            return []
        missing = self.save_area.slots.missing(b0, b1)
        if self.export or not missing:
            return missing
        return [b for b in missing if self.transfer[b // per]]

    def before_write(self, offset, length):
        """Track a change of [offset, offset+length); COFW if marked.  The
        tracking bit and the old data are durable before returning."""
        change = self.prepare_write(offset, length)
        self.copy_old_data(change)
        self.finish_write(change)

    def prepare_write(self, offset, length):
        """The part of before_write that does no I/O but the tracking
        mark's write: the write is counted in flight (after_write undoes
        it, whatever happens), its tracking bits are noted and, while
        marked, the blocks it must save that no other writer is saving
        are claimed.  Returns the _Change to give copy_old_data and then
        finish_write before the write may reach the Source (None: the
        session is closed).  The claims keep every other write to those
        blocks from the Source until finish_write: the old data may be
        copied any time before."""
        e0, e1 = _range_of(offset, length, self.granularity)
        b0, b1 = _range_of(offset, length, self.block)
        with self.cond:
            while self.state == MARKING:
                self.cond.wait()
            self.writes_in_flight += 1
            if self.closed:
                return None     # deleted while this write was on its way
            change = _Change(b0, b1, self.tracking.note_write(e0, e1))
            if self.marked:
                self._claim(change, self._protected(b0, b1))
        return change

    def finish_write(self, change):
        """The rest of before_write, after copy_old_data: change's saves
        and tracking marks are durable (its saves then part of the frozen
        image), and so is the old data of the blocks other writers were
        saving; a full save area or a failed save ends the mark."""
        if change is None:
            return
        self._settle(change)
        if change.busy:
            self._wait_saved(change.b0, change.b1)

    def _claim(self, change, need):
        """Claim the blocks of need no other writer is saving (caller
        holds the lock)."""
        free = [b for b in need if b not in self.saving]
        change.busy = len(free) < len(need)
        change.generation = self.generation
        change.claimed = free
        self.saving.update(free)

    def copy_old_data(self, change):
        """Write the old data of change's claimed blocks to the save
        area (not yet durable); a failure (a full save area too) is
        change's error."""
        if change is None or not change.claimed or change.error is not None \
                or change.generation != self.generation:
            return      # nothing to save, or the mark went meanwhile
        try:
            change.stored = self._store_old_data(change.claimed,
                                                 change.generation)
        except (OSError, SaveAreaFull) as e:
            change.error = e

    def _settle(self, change):
        """Make change's saves durable and part of the frozen image (a
        full save area or a failed save ends the mark), wait for its
        activity marks, and release its claims."""
        try:
            try:
                if change.error is not None:
                    raise change.error
                if change.stored:
                    self._make_durable(change.stored, change.generation)
            except (SaveAreaFull, OSError) as e:
                self._abandon_mark(change.generation, str(e))
            # The activity map's mark: its fdatasync overlaps the other
            # writers' saves, and is shared with their marks.
            self.tracking.wait_durable(change.noted)
        finally:
            if change.claimed:
                with self.cond:
                    self.saving.difference_update(change.claimed)
                    self.cond.notify_all()

    def _wait_saved(self, b0, b1):
        """Wait until every block of [b0, b1) that must be saved is (or
        the mark is gone), saving any no writer is saving."""
        while True:
            with self.cond:
                if not self.marked:
                    return
                need = self._protected(b0, b1)
                if not need:
                    return
                if any(b in self.saving for b in need):
                    self.cond.wait()
                    continue
                change = _Change(b0, b1, 0)
                self._claim(change, need)
            self.copy_old_data(change)
            self._settle(change)

    def save_ahead(self, runs):
        """Copy on first write ahead of writes to come: the old data of
        every block of runs ([(offset, length)]) that a write would save
        first is saved, and made durable with one flush of the save area
        and one of the activity map (with their tracking bits) for them
        all, before returning.  The writes then find their blocks saved;
        whatever this did not save (a block another writer is saving, a
        mark that began meanwhile) their before_write still saves first,
        so no write depends on it.  Counted as a write in flight: a mark
        waits for it."""
        ranges = [_range_of(offset, length, self.granularity)
                  for offset, length in runs]
        blocks = [_range_of(offset, length, self.block)
                  for offset, length in runs]
        with self.cond:
            while self.state == MARKING:
                self.cond.wait()
            self.writes_in_flight += 1
        try:
            with self.cond:
                if self.closed:
                    return
                change = _Change(None, None, max(
                    (self.tracking.note_write(e0, e1) for e0, e1 in ranges),
                    default=0))
                if self.marked:
                    # Those another writer is saving are left to it.
                    self._claim(change, sorted(
                        {b for b0, b1 in blocks
                         for b in self._protected(b0, b1)}))
            self.copy_old_data(change)
            self._settle(change)
        finally:
            self.after_write()

    def _store_old_data(self, blocks, generation):
        """Copy the old data of blocks (block numbers, sorted) from the
        Source below to the save area, not yet durable; returns [(first
        block, count, first slot, ticket)] to make durable (none if the
        mark went meanwhile).  Raises SaveAreaFull."""
        bs = self.block
        unmarked = threading.Event()
        stored = []

        def full():
            return SaveAreaFull(name=self.name, blocks=self.save_area.capacity,
                                block=bs)

        def store(view, offset):
            # A save holds whole blocks: the last one's tail is zeroes.
            data = view if len(view) % bs == 0 else \
                bytes(view) + bytes(bs - len(view) % bs)
            got = self.save_area.store(offset // bs, data)
            if got is None:
                raise full()
            stored.append((offset // bs, len(data) // bs) + got)
            if generation != self.generation:
                unmarked.set()  # meanwhile: the save area was reset

        def zero(offset, length):
            count = (length + bs - 1) // bs
            ticket = self.save_area.store_zero(offset // bs, count)
            if ticket is None:
                raise full()
            stored.append((offset // bs, count, SaveArea.ZERO_SLOT, ticket))
            if generation != self.generation:
                unmarked.set()

        def holes(offset, length):
            # Whole blocks: a block is a hole only if all of it is (the
            # zero check catches zero data).
            parts = self.inner.extents(offset, length)
            if len(parts) == 1:
                return parts
            data = bytearray((length + bs - 1) // bs)
            for start, n, hole in parts:
                if not hole:
                    maps.set_range(data, (start - offset) // bs,
                                   (start - offset + n + bs - 1) // bs)
            return [(offset + s * bs, min(e * bs, length) - s * bs,
                     not has_data)
                    for s, e, has_data in maps.same_byte_runs(data)]

        # A piece a chunk: one save (entry) each, its buffer in the cache.
        copier.Copier(self.inner.readinto, store, zero,
                      chunk=copier.WRITE_PIECE, cancel=unmarked,
                      extents=holes).copy(
            (b * bs, min(n * bs, self.size - b * bs))
            for b, n in block_runs(blocks))
        return [] if unmarked.is_set() else stored

    def _make_durable(self, stored, generation):
        """Make the saves of stored durable (one group commit for them
        all, shared with concurrent first writes) and only then part of
        the frozen image, before the host write that needs them
        proceeds."""
        self.save_area.wait_durable(max(t for _, _, _, t in stored))
        # Only a durable save is part of the frozen image: a reader (or a
        # second write to the block, waiting in before_write) never sees
        # one a crash could still take away.
        with self.cond:
            if generation != self.generation:
                return
            for first, count, slot, _ in stored:
                self.save_area.slots.set_run(first, count, slot)
            self.cofw_count += sum(count for _, count, _, _ in stored)

    def after_write(self):
        with self.cond:
            self.writes_in_flight -= 1
            if self.state == MARKING and self.writes_in_flight == 0:
                self.cond.notify_all()

    def maybe_commit(self):
        if self.closed:
            return
        if self.tracking.due():
            self.tracking.commit()

    # ------------------------------------------------------------ frozen image

    def frozen_extents(self, offset, length):
        """Holes of the marked point in time: the Source's holes in
        blocks not saved.  A block not saved is unchanged since the mark
        (a write saves it first), and saves are never undone while
        marked, so the Source is asked first and the save area after."""
        parts = self.inner.extents(offset, length)
        bs = self.block
        b0, b1 = _range_of(offset, length, bs)
        with self.cond:
            saved = set(self.save_area.slots.saved_in(b0, b1))
        if not saved:
            return parts
        out = []
        for start, n, hole in parts:
            if not hole:
                out.append((start, n, False))
                continue
            pos, end = start, start + n
            while pos < end:
                b = pos // bs
                stop = min(end, (b + 1) * bs)
                out.append((pos, stop - pos, b not in saved))
                pos = stop
        return out

    def read_frozen(self, buf, offset, generation=None):
        """Read the marked point in time (saved data, else the Source)."""
        view = memoryview(buf).cast("B")
        bs = self.block
        b0, b1 = _range_of(offset, len(view), bs)
        with self.cond:
            if not self.marked or self.closed or (
                    generation is not None and generation != self.generation):
                raise FrozenImageGone(name=self.name)
            generation = self.generation
            saved = self.save_area.slots.saved_in(b0, b1)
        if len(saved) < b1 - b0:
            self.inner.readinto(view, offset)
        with self.cond:
            # Closed: its save area is too (a target that stops).
            if not self.marked or self.closed or \
                    generation != self.generation:
                raise FrozenImageGone(name=self.name)
            slot_of = self.save_area.slots.slots_in(b0, b1)
        if not slot_of:
            return
        for first, count in block_runs(slot_of):
            tmp = bytearray(count * bs)
            self.save_area.readinto(first, tmp, slot_of)
            s = max(offset, first * bs)
            e = min(offset + len(view), (first + count) * bs)
            view[s - offset:e - offset] = tmp[s - first * bs:e - first * bs]
        with self.cond:
            # Slots are reused by the next mark: an unmark meanwhile (a
            # forced one, beside an export's reader) may have given these
            # to other blocks.
            if generation != self.generation:
                raise FrozenImageGone(name=self.name)

    # ------------------------------------------------------------ mark

    def mark(self, export=False, check=None, full=False):
        """Freeze the point in time: tracking becomes the transfer map
        (every extent, with full)."""
        with self.cond:
            if (self.state, "mark") not in TRANSITIONS:
                raise SessionBusy(name=self.name,
                                  reason=_MARK_REFUSED[self.state])
            self._check_idle()
            self._enter("mark")
            while self.writes_in_flight:
                self.cond.wait()
        recorded = False
        try:
            if check is not None:
                check()
            # Writes not yet durable on the Source must not be sent as part
            # of the point in time and then lost there by a power cut with
            # no map left to say so: the Source is flushed first.
            self.inner.flush()
            # Writes in flight were waited for and new ones wait (MARKING).
            self.save_area.reset(quiet=True)
            bits = self.tracking.bits
            for d in self.dests:
                pending = bytearray(b"\x01" * self.extents) \
                    if d.needs_full or full else bytearray(d.pending)
                for s, e in maps.runs(bits):
                    maps.set_range(pending, s, e)
                maps.save(self.pending_path(d), pending, self.granularity)
                d.pending = pending
            # The marked record first: a save that fails (a full state
            # directory) leaves the session unmarked, in memory as on disk.
            mark_time = time.time()
            self.persist(self._record_as(marked=True, export=bool(export),
                                         error=None, mark_time=mark_time,
                                         needs_full=False))
            recorded = True
            with self.cond:
                self.recompute_transfer()
                self.export = bool(export)
                self.error = None
                self.mark_time = mark_time
                self.generation += 1
                for d in self.dests:
                    d.needs_full = False
            self.tracking.replace(bytearray(self.extents))
        finally:
            # Marked in memory as on disk, even if the new tracking map
            # could not be saved; host writes go on.
            with self.cond:
                self._enter("marked" if recorded else "failed")
                self.cond.notify_all()
        log.info("session %s marked (%d extents to transfer)", self.name,
                 self.transfer.count(1))

    def _check_idle(self):
        if self.engine is not None and self.engine.running:
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
        self.drop_mark(generation, error)

    def _abandon_mark(self, generation, reason):
        log.error("session %s: %s; unmarking", self.name, reason)
        self.drop_mark(generation, reason)

    def drop_mark(self, generation, error):
        """Unmark, if the mark of generation is still the session's (a
        transfer that completed it, a copy on first write that failed)."""
        with self.cond:
            if not self.marked or generation != self.generation:
                return
            merged = bytearray(self.tracking.bits)
            for s, e in maps.runs(self.transfer):
                maps.set_range(merged, s, e)
            self.tracking.bits = merged
        # 1. the merged tracking map is durable ...
        self.tracking.commit()
        # 2. ... before the session is recorded unmarked, and only then
        # unmarked in memory: a save that fails leaves the frozen image
        # whole (writes keep saving its data) ...
        self.persist(self._record_as(marked=False, export=False, error=error,
                                     mark_time=None))
        with self.cond:
            if self.state != MARKED or generation != self.generation:
                return      # another unmark of this mark came first
            self._enter("unmark")
            self.export = False
            self.generation += 1
            self.error = error
            self.mark_time = None
            self.transfer = bytearray(self.extents)
        # 3. ... and only then are the pending maps and saved data dropped
        # (a mark is refused until then: UNMARKING).
        try:
            for d in self.dests:
                d.pending = bytearray(self.extents)
                maps.save(self.pending_path(d), d.pending, self.granularity)
            try:
                self.save_area.reset()
            except OSError as e:
                # The save area that failed a save may fail this too; its
                # stale index is never read (the next mark resets it).
                log.error("session %s: the save area's reset failed: %s",
                          self.name, e)
        finally:
            with self.cond:
                self._enter("dropped")
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
                maps.save(self.pending_path(d), d.pending, self.granularity)
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
        self.tracking.commit()

    def _failure(self, running):
        """Why this session's destinations are not what it was asked for,
        until something makes them so: its error (a mark it gave up), or
        its last transfer's failure while none runs.  What `clonectl
        status` calls degraded and the metrics count as a session's
        error."""
        last = self.last_transfer or {}
        result = last.get("result") or "completed"
        if self.error:
            return self.error
        if not running and result != "completed":
            return "its last transfer {}".format(result)
        return None

    def status(self):
        with self.cond:
            engine = self.engine
            running = engine is not None and engine.running
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
                              "block": self.block,
                              "capacity_blocks": self.save_area.capacity,
                              "used_blocks": len(self.save_area.slots),
                              "used_bytes": self.save_area.used_bytes()},
                "transfer": engine.progress() if engine is not None else None,
                "transferring": running,
                "error": self.error,
                "last_transfer": self.last_transfer,
                "failure": self._failure(running),
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
            saved = self.save_area.slots.groups(
                self.granularity // self.block, self.extents)
        code = maps.combine(changed, transfer, saved)
        names = {v: ",".join(k for i, k in enumerate(self.MAP_KINDS)
                             if v >> i & 1) or "clean" for v in range(8)}
        return {"granularity": self.granularity, "size": self.size,
                "runs": maps.kind_runs(code, self.granularity, self.size,
                                       names)}

    def close(self):
        if self.layer is not None:
            # Its writes queued in the layer are applied first (they may
            # still save old data), and the layer's applier ends.
            self.layer.drain(stop=True)
        engine = self.engine
        if engine is not None:
            engine.stop("closing")
            engine.join()
        with self.cond:
            self.closed = True
        try:
            self.tracking.commit()
        except OSError as e:
            log.error("session %s: final commit failed: %s", self.name, e)
        self.tracking.close()
        self.save_area.backend.close()
