"""The durable change map: committed maps, write-ahead activity regions,
commit.

Design notes
------------
A change map says which extents of a volume may differ from something (a
clone, the point in time of a mark, a secondary).  It lives in memory as one
byte per extent (target.maps) and must survive a crash as a superset of the
truth, bounded by what was written recently.  Two files keep it:

- committed maps, replaced whole (maps.save) at commit points: at most
  once per COMMIT_INTERVAL, when an operation ends and on close;
- one activity map (maps.ActivityFile), updated in place: before a write
  touches a REGION not yet marked there, the whole region is marked and
  made durable (DRBD's activity log).  Only the first write into a cold
  region pays an fdatasync.

Recovery sets each map to its committed map OR the activity map.  Several
maps may share one activity map (a clone group's delta maps): recovery may
then set a bit in one map because another map's extent was written, which
only costs a re-copy.

The rule: data is durable before the map that vouches for it.  A clear bit
says "equal"; a commit may save it only when the data that made it equal is
on disk.  So a commit, in this order:
  1. swaps in a fresh `track` (extents written or copied from now on) and
     takes the maps as they are at that moment;
  2. flushes the data (`flush`, when the owner's bits vouch for data: a map
     whose bits only say "changed" needs none, a bit set early is harmless);
  3. saves the maps it took in 1 (a bit cleared by a copy during the flush
     is saved by the next commit: the map is never newer than the flush
     that covers it);
  4. rewrites the activity map as the regions of `track`, of the writes in
     flight and of the runs being copied: everything that may have landed
     after the flush.
A write registers (`begin`) before it starts and is marked in the activity
map, durably, before it reaches the data; it leaves `track` marked when it
ends.  A copy registers its run (`copy_begin`/`copy_end`) and clears its
bits only after its data is written (target.copier).

Locking: the owner's lock (`lock`) guards the bits, `track`, the tables of
writes in flight and copies; `begin`, `end`, `note`, `note_deferred`,
`touch`, `copy_begin` and `copy_end` are called holding it; `wait_durable`
is called without it.  `commit` takes it itself, never across a flush or a
file save; commits are serialized by `commit_lock`.  The activity map's
group commit has a lock of its own, never held while taking the owner's.

Deliberately ignored: a torn in-place activity write (each byte is old or
new, both valid); regions are whole extents of the map's granularity.
The map file format is target.maps'.  See docs/persistence.md.
"""

import threading
import time

from . import maps
from .groupcommit import GroupCommit

REGION = 4 << 20        # bytes an activity mark covers
COMMIT_INTERVAL = 1.0   # seconds between timed commits


class ActivityMap:
    """Write-ahead activity regions: marked, durable, before the writes
    they cover.  With region_bytes equal to the granularity it is a map
    persisted in place extent by extent (a replication DCM).

    Group commit of the marks (target.groupcommit): mark_deferred() sets
    the regions in memory and writes them in place (under the owner's
    lock), returning a ticket; wait_durable(ticket) returns once an
    fdatasync that began after that write completed, running one itself
    if none that covers it runs.  A region marked but not yet durable
    keeps its ticket (`_pending`), so a later write into it waits for the
    same fdatasync instead of passing on a mark a power cut could still
    take away.  A failed fdatasync (or replace) fails every mark waiting
    and every later one until the file is replaced: by the owner's next
    commit, or by the next mark, which writes the file anew from the bits
    in memory (after a failed fdatasync the kernel may have dropped pages
    it will not write again).
    A replace makes every mark written before it durable: the new file
    holds them, or, for a commit's, the owner's committed maps do.
    """

    def __init__(self, path, granularity, extents, region_bytes=REGION):
        self.path = path
        self.granularity = granularity
        self.extents = extents
        self.region = max(1, region_bytes // granularity)  # in extents
        self.bits = bytearray(extents)
        self.file = maps.ActivityFile(path, granularity, extents)
        self._group = GroupCommit(lambda: self.file.datasync(),
                                  self._durable_upto)
        self._pending = {}      # region number -> ticket, not yet durable

    @property
    def is_open(self):
        return self.file.is_open

    def load(self):
        """The activity map on disk; raises maps.MapCorrupt."""
        return maps.load(self.path, self.granularity, self.extents,
                         with_crc=False)

    def reopen(self):
        """Take the map on disk as it is, for in-place updates (a DCM kept
        across restarts); raises maps.MapCorrupt."""
        self.bits = self.load()
        self.file.fd = maps.files.open(self.path)

    def cover(self, e0, e1):
        """The whole regions around extents [e0, e1)."""
        r = self.region
        return e0 // r * r, min(self.extents, (e1 + r - 1) // r * r)

    def mark(self, e0, e1):
        """Make [e0, e1) (whole regions) durable in the map, unless it is
        marked already."""
        ticket = self.mark_deferred(e0, e1)
        if ticket:
            self.wait_durable(ticket)

    def mark_deferred(self, e0, e1):
        """Mark [e0, e1) (whole regions) in memory and in place; return
        the ticket to wait_durable() for, 0 when it is durable already
        (caller holds the owner's lock)."""
        if self._group.failed is not None:
            # The pages a failed fdatasync covered may be gone: the file
            # is written anew, whole, from the bits in memory (raises if
            # that fails too).
            self.replace(bytearray(self.bits))
        if self.bits.find(0, e0, e1) < 0:
            if not self._pending:
                return 0
            r = self.region
            with self._group.lock:
                return max((self._pending.get(i, 0)
                            for i in range(e0 // r, (e1 - 1) // r + 1)),
                           default=0)
        s, e = self.cover(e0, e1)
        before = bytes(self.bits[s:e])
        maps.set_range(self.bits, s, e)
        try:
            self.file.persist(self.bits, s, e, sync=False)
        except BaseException:
            self.bits[s:e] = before
            raise
        # Taken after the write returned: an fdatasync that begins after
        # this covers it.
        with self._group.lock:
            ticket = self._group.take()
            r = self.region
            for i in range(s // r, (e - 1) // r + 1):
                self._pending[i] = ticket
        return ticket

    def wait_durable(self, ticket):
        """Return once the mark of ticket (and every earlier one) is
        durable, running the fdatasync if none is running; raise the error
        of a failed one.  Called without the owner's lock."""
        self._group.wait(ticket)

    @property
    def pending(self):
        """Some region marked in memory may not be so on disk: its
        fdatasync has not completed, or a sync or a replace failed (a
        commit's replace that fails after the new file is in place leaves
        the bits in memory wider than the file; the next mark writes the
        file anew from them)."""
        return bool(self._pending) or self._group.failed is not None

    def _durable_upto(self, ticket):
        # A sync made the marks up to ticket durable (holding the group
        # commit's lock): their regions need not be waited for again.
        self._pending = {i: t for i, t in self._pending.items()
                         if t > ticket}

    def replace(self, bits):
        """Make bits the map on disk (atomically) and in memory.  Every
        mark written before is durable once it returns (class notes): its
        waiters return, before the file may be closed under them."""
        with self._group.lock:
            self._group.quiesce()
            try:
                self.file.reset(bits)
            except OSError as e:
                # The file is closed and holds the old map or the new one:
                # the bits in memory cover both (a rewrite narrows them, a
                # DCM's merge widens them), and the next mark writes the
                # file anew from them (marks waiting fail meanwhile).
                maps.set_where(self.bits, bits)
                self._group.fail(e)
                raise
            self.bits = bits
            self._pending = {}
            self._group.all_durable()

    def rewrite(self, keep):
        """Replace the map with the regions covering the set extents of
        keep."""
        activity = bytearray(self.extents)
        for s, e in maps.runs(keep):
            maps.set_range(activity, *self.cover(s, e))
        self.replace(activity)

    def close(self):
        with self._group.lock:
            self._group.quiesce()
            self.file.close()


class ChangeMap:
    """One or more committed maps sharing one activity map.

    lock: the owner's lock (a Lock or Condition) guarding the bits.
    committed(): called holding lock, the maps to save now as
        [(path, bits)] (the live bytearrays: commit copies them).
    flush(): makes the data the clear bits vouch for durable; None when
        bits only say "changed".
    after_save(): called after the maps are saved, before the activity
        map is rewritten (an owner's own map that must be durable by then).
    """

    def __init__(self, activity_path, granularity, extents, lock, committed,
                 flush=None, after_save=None, region_bytes=REGION):
        self.granularity = granularity
        self.extents = extents
        self.lock = lock
        self.committed = committed
        self.flush = flush
        self.after_save = after_save
        self.activity = ActivityMap(activity_path, granularity, extents,
                                    region_bytes)
        self.track = bytearray(extents)
        # The track a commit took, while its flush runs.
        self.flushing = None
        self.in_flight = {}     # token -> (e0, e1): writes that set bits
        self.copying = {}       # token -> (e0, e1): copies that clear bits
        self._next_token = 0
        self.commit_lock = threading.Lock()
        self.last_commit = 0.0
        # Tests switch these off to show what each protects against
        # (tests/engine/test_commit_order.py, test_powerloss.py): the flush
        # that makes a commit's clean bits true on disk, taking the maps
        # before that flush, the recent extents kept in the new activity map.
        self.flush_before_commit = True
        self.snapshot_before_flush = True
        self.keep_recent_in_activity = True

    # -------------------------------------------------------- recovery

    def recover(self, required=True):
        """The activity map on disk, to OR into every committed map, and a
        problem (None or the reason it was unusable: then every extent is
        set, or none when nothing is required)."""
        try:
            return self.activity.load(), None
        except maps.MapCorrupt as e:
            fill = b"\x01" if required else b"\x00"
            return bytearray(fill * self.extents), str(e)

    def start(self):
        """Start a clean activity map (after the recovered bits are
        saved, or for a new map)."""
        self.activity.replace(bytearray(self.extents))

    @staticmethod
    def merge(bits, activity):
        """bits |= activity (recovery)."""
        for s, e in maps.runs(activity):
            maps.set_range(bits, s, e)

    # -------------------------------------------------------- writes
    # Called holding lock.

    def note(self, e0, e1):
        """Extents [e0, e1) are about to change: durable in the activity
        map before returning."""
        maps.set_range(self.track, e0, e1)
        self.activity.mark(e0, e1)

    def note_deferred(self, e0, e1):
        """note() without waiting: extents [e0, e1) are about to change;
        returns the ticket to wait_durable() for (without the lock) before
        the change may reach the data."""
        maps.set_range(self.track, e0, e1)
        return self.activity.mark_deferred(e0, e1)

    def wait_durable(self, ticket):
        """The activity marks up to ticket are durable (called without the
        lock; nothing to do for ticket 0)."""
        if ticket:
            self.activity.wait_durable(ticket)

    def touch(self, e0, e1):
        """Extents [e0, e1) are being copied outside a registered run
        (their bits are cleared after the copy): keep them in the next
        activity map."""
        maps.set_range(self.track, e0, e1)

    def begin(self, e0, e1):
        """Register a write of [e0, e1) (note it); returns its token."""
        # Inline (a host write's path): note() without the extra calls.
        self._next_token += 1
        token = self._next_token
        self.in_flight[token] = (e0, e1)
        maps.set_range(self.track, e0, e1)
        # A region set in memory may still wait for its fdatasync (or
        # have had it fail): mark() waits for it (or fails).
        if self.activity.bits.find(0, e0, e1) >= 0 or self.activity.pending:
            try:
                self.activity.mark(e0, e1)
            except BaseException:
                # The write does not happen: nothing may wait for it.
                del self.in_flight[token]
                raise
        return token

    def end(self, token):
        e0, e1 = self.in_flight.pop(token)
        maps.set_range(self.track, e0, e1)

    def unflushed(self):
        """(Holding lock.)  The extents written or copied since the last
        commit whose flush succeeded: what a failed flush may have lost."""
        lost = bytearray(self.track)
        if self.flushing is not None:
            maps.set_where(lost, self.flushing)
        for e0, e1 in list(self.in_flight.values()) + \
                list(self.copying.values()):
            maps.set_range(lost, e0, e1)
        return lost

    def copy_begin(self, e0, e1):
        """Register a copy of [e0, e1): its bits are cleared when its data
        is written; returns its token."""
        token = self._token()
        self.copying[token] = (e0, e1)
        maps.set_range(self.track, e0, e1)
        return token

    def copy_end(self, token):
        e0, e1 = self.copying.pop(token)
        maps.set_range(self.track, e0, e1)

    def _token(self):
        self._next_token += 1
        return self._next_token

    # -------------------------------------------------------- commits

    def due(self):
        return time.monotonic() - self.last_commit >= COMMIT_INTERVAL

    def maybe_commit(self):
        if self.due():
            self.commit()

    def commit(self, change=None):
        """Make the maps durable and shrink the activity map (module notes).

        change(), if given, is called holding lock first (replace a map
        whole, as a mark does): the commit saves its result.
        """
        with self.commit_lock:
            with self.lock:
                if change is not None:
                    change()
                self.flushing = self.track
                self.track = bytearray(self.extents)
                entries = self.committed()
                taken = [bytes(bits) for _, bits in entries] \
                    if self.snapshot_before_flush else None
            try:
                if self.flush is not None and self.flush_before_commit:
                    self.flush()
            except BaseException:
                with self.lock:
                    # A flush that failed may have lost what it covered
                    # (the kernel drops pages it could not write): still
                    # tracked, for the activity map and the next commit.
                    maps.set_where(self.track, self.flushing)
                    self.flushing = None
                raise
            with self.lock:
                self.flushing = None
            if taken is None:
                taken = [bytes(bits) for _, bits in entries]
            for (path, _), bits in zip(entries, taken):
                maps.save(path, bits, self.granularity)
            if self.after_save is not None:
                self.after_save()
            with self.lock:
                keep = bytearray(self.extents)
                if self.keep_recent_in_activity:
                    keep[:] = self.track
                    for e0, e1 in list(self.in_flight.values()) + \
                            list(self.copying.values()):
                        maps.set_range(keep, e0, e1)
                self.activity.rewrite(keep)
            self.last_commit = time.monotonic()

    def close(self):
        self.activity.close()
