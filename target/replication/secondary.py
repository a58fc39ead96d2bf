"""A replicated storage group on a secondary node.

Owns the session with a primary (receiving batches and replays), the two
staging slots that make a batch one atomic unit across a crash, applying
batches below the volumes' guard, consistency and the last consistent
image kept during a replay, and refusing a primary while a local change
runs.
See the design notes in target/replication/__init__.py; staging slots
and recovery: docs/persistence.md.
"""

import concurrent.futures
import contextlib
import copy
import functools
import json
import logging
import os
import select
import struct
import threading
import time
import uuid
import zlib

from .. import errors, fsutil
from . import verify
from .layer import Guard
from .records import (DISCONNECT, SECONDARY, SPLIT_BRAIN_POLICIES,
                      ReplicaUnavailable, ReplicationError, RsgBusy,
                      check_split_brain_policy, peer_history, peer_seq)
from .wire import (DATA, ENTRY, KINDS, SEQ, TRIM, WRITE, ZERO, Reader,
                   entry_crc, recv_frame, send_frame, send_json,
                   shutdown_socket)

log = logging.getLogger("clonectl.replication")


def _fields(kind, payload, read):
    """read(payload): the fields of a primary's frame of kind, or its
    refusal (a frame too short for its kind, or JSON of another shape),
    which the primary is told (FAIL) rather than a traceback here."""
    try:
        return read(payload)
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise errors.ProtocolError(
            reason="a {} frame of the primary's could not be read ({})"
            .format(bytes(kind).decode("ascii", "replace"), e)) from e


STAGE_MAGIC = b"CLNSTG01"
STAGE_HEADER = struct.Struct("<8sBQQII")   # magic state first last count crc
STAGED, APPLIED = 1, 2
PULL_CHUNK = 1 << 20           # bytes of one RDAT frame sent to a primary
# A replay's data (RDAT frames: each a region no other frame of the pass
# has) is written by REPLAY_APPLY_WORKERS threads while the next frames
# are received (_ReplayApplier), in windows of at most REPLAY_APPLY_FRAMES
# frames and half of REPLAY_APPLY_BYTES: one window in flight and the
# next one held (a zero or trim frame carries no data but is a write all
# the same).
REPLAY_APPLY_BYTES = 16 << 20
REPLAY_APPLY_WORKERS = 8
REPLAY_APPLY_FRAMES = 8 * REPLAY_APPLY_WORKERS
# A change of the volumes asked for while a session is ending (the primary
# went; the session makes what it applied durable) waits this long for it.
SESSION_END_WAIT = 30.0
# A batch is applied under the apply lock for APPLY_SLICE seconds at a
# time while a reader waits for it: the reader waits that long (and one
# update) at most, and readers that keep coming take no more than about
# half the batch's time.
APPLY_SLICE = 0.002


class _ApplyFailed(Exception):
    """This node's volumes failed an update (the OSError is __cause__),
    which they may now hold in part; staged: of a batch staged and
    acknowledged (applied again from the stage); volatile: of a batch
    applied without a stage (the primary sends its regions again)."""

    def __init__(self, what, staged, volatile=False):
        super().__init__(what)
        self.what, self.staged, self.volatile = what, staged, volatile


class _Dropped(errors.Error):
    msg = "group {name!r}: replay data not written: the session ended"


class ImageNotKept(errors.Error):
    msg = "replicated group {name!r}: the last consistent image of its " \
        "volumes could not be kept, so the primary's replay does not " \
        "start ({reason}); it starts when the primary connects again " \
        "and the image can be kept"


@contextlib.contextmanager
def _applying(what, staged=False, volatile=False):
    try:
        yield
    except OSError as e:
        raise _ApplyFailed(what, staged, volatile) from e


def _answer(sock, kind, payload):
    """Send a frame from a thread beside the connection's: a connection
    that fails under it is shut down, and the connection's thread ends as
    for any lost connection (not as for a failure of the volumes)."""
    try:
        send_frame(sock, kind, payload)
    except OSError:
        shutdown_socket(sock)


class _ApplyLock:
    """A group's apply lock (SecondaryGroup.lock): reentrant, and it says
    whether a thread is waiting for it (`wanted`), so a replay whose
    writes in flight hold it lets that thread in once they are done,
    rather than when the primary pauses."""

    def __init__(self):
        self._lock = threading.RLock()
        self._count = threading.Lock()
        self._waiting = 0

    @property
    def wanted(self):
        return self._waiting > 0

    def acquire(self):
        if self._lock.acquire(blocking=False):
            return True
        with self._count:
            self._waiting += 1
        try:
            return self._lock.acquire()
        finally:
            with self._count:
                self._waiting -= 1

    def release(self):
        self._lock.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


class _ReplayApplier:
    """Writes a replay's data frames concurrently, while the connection
    reads on: what a write of a volume waits for (the disk) overlaps the
    network and the other writes.

    Windows: the frames received are held (the window) until it is full
    (REPLAY_APPLY_FRAMES frames or half of REPLAY_APPLY_BYTES), or an
    RSYN, a frame that must wait (below) or a pause of the connection
    (idle()) comes; then the old data of every extent the window writes
    is saved ahead by the volumes' sessions (the last consistent image:
    save_ahead), made durable with one flush for the whole window, by a
    thread of its own (the saver, one window after the other) while the
    window before is still being written and the connection receives
    the next one; once the writes in flight leave room (as many frames,
    the other half of the bytes) the window's writes are queued, and
    each begins only once the window's save returned (a failed save
    fails them: nothing of the window is written).  A write would
    otherwise save its extent itself and wait for a flush of its own (a
    group commit shared with the writes beside it): about one flush per
    few frames instead of one per window.  A frame's bytes never reach a
    volume before the old data of its extent is durable in the save area
    (the write still saves what the window did not).

    Order: frames of distinct regions may land in any order; a frame that
    overlaps one held or in flight, and every other frame but RSYN
    (stream entries, REND, ...), is handled only after drain(), so the
    stream's order is kept; an RSYN begins the window before it and is
    answered once the writes received before it are done (sync()).  The
    apply lock is held while frames are held or in flight, and they are
    drained before the connection waits for a frame that has not begun to
    arrive, or when a thread waits for that lock (idle()): a point in
    time of a volume, or a read, waits for the writes in flight, not for
    a primary that sends nothing nor for one that keeps sending."""

    def __init__(self, group):
        self.group = group
        self.pool = None
        self.window = []        # (vol, kind, offset, length, data)
        self.inflight = []      # (vol, offset, length, bytes, future)
        self.held = 0           # bytes of the frames held
        self.bytes = 0          # bytes of the writes in flight
        self.saver = None       # the thread saving windows ahead
        self.syncer = None
        self.syncs = []         # futures of RSYNs not yet answered
        # A write or a flush failed: after a failed flush the kernel may
        # have dropped what it could not write, so a later flush that
        # succeeds proves nothing; no RSYN is answered any more.
        self.failed = False
        # The session ends (the group closes, the connection is lost):
        # what has not begun is dropped.
        self.dropping = threading.Event()

    def cancel(self):
        """(Any thread.)  The group closes: writes and RSYNs not begun
        are dropped, and drain() raises for them."""
        self.dropping.set()

    def _save(self, runs):
        """(The saver.)  Save ahead what a window changes: runs, by
        volume."""
        if self.dropping.is_set():
            return
        for vol, r in sorted(runs.items()):
            self.group.save_ahead(self.group.volumes[vol], r)

    def _write(self, saved, vol, kind, off, length, data):
        saved.result()      # its error, if any, is this write's
        if self.dropping.is_set():
            raise _Dropped(name=self.group.name)
        self.group._apply_one(vol, kind, off, length, data)

    def _release_if_idle(self):
        if not self.inflight and not self.window:
            self.group.lock.release()

    def _overlaps(self, vol, off, length):
        """A frame held or in flight writes some of vol's bytes
        [off, off + length)."""
        regions = [(v, o, n) for v, o, n, _, _ in self.inflight] + \
            [(v, o, n) for v, _, o, n, _ in self.window]
        return any(v == vol and o < off + length and off < o + n
                   for v, o, n in regions)

    def add(self, vol, kind, off, length, data):
        if self._overlaps(vol, off, length):
            self.drain()
        if not self.inflight and not self.window:
            # Threads that waited for the writes drained for them go
            # first (the lock is not fair); for a moment at most, so
            # readers that keep coming do not stop the replay.
            until = time.monotonic() + 0.05
            while self.group.lock.wanted and time.monotonic() < until:
                time.sleep(0.001)
            self.group.lock.acquire()
        self.window.append((vol, kind, off, length, data))
        self.held += len(data) if data is not None else 0
        try:
            if len(self.window) >= REPLAY_APPLY_FRAMES or \
                    self.held >= REPLAY_APPLY_BYTES // 2:
                self._begin_window()
        except Exception:
            try:
                self.drain()
            except Exception:   # the first error is the one raised
                pass
            raise

    def _begin_window(self):
        """Save ahead what the window's frames change, one flush for them
        all (the saver), and queue their writes (the pool), which wait
        for that save, once there is room."""
        window = self.window
        if not window:
            return
        if self.saver is None:
            self.saver = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="rsg-apply-save")
        runs = {}
        for vol, _, off, length, _ in window:
            runs.setdefault(vol, []).append((off, length))
        saved = self.saver.submit(self._save, runs)
        try:
            # The writes in flight make room for the window (it holds the
            # apply lock meanwhile).
            while self.inflight and (
                    len(self.inflight) + len(window) > REPLAY_APPLY_FRAMES
                    or self.bytes + self.held > REPLAY_APPLY_BYTES // 2):
                self._wait_oldest()
            if self.pool is None:
                self.pool = concurrent.futures.ThreadPoolExecutor(
                    REPLAY_APPLY_WORKERS, thread_name_prefix="rsg-apply")
            while window:
                vol, kind, off, length, data = window[0]
                f = self.pool.submit(self._write, saved, vol, kind, off,
                                     length, data)
                window.pop(0)
                n = len(data) if data is not None else 0
                self.held -= n
                self.bytes += n
                self.inflight.append((vol, off, length, n, f))
        except BaseException:
            # What was not begun is not written: no RSYN is answered
            # after it (the primary sends it again).
            self.failed = True
            self.window = []
            self.held = 0
            # The save ends before the apply lock may go.
            concurrent.futures.wait([saved])
            self._release_if_idle()
            raise

    def _wait_oldest(self):
        _, _, _, n, f = self.inflight.pop(0)
        self.bytes -= n
        try:
            f.result()
        finally:
            self._release_if_idle()

    def sync(self, ident, answer):
        """RSYN ident: once the writes received before it are done, make
        them durable (SecondaryGroup.replay_sync) and answer() (RSAK), in
        a thread of its own while the next frames are received and written
        (a flush that covers some of them too is no harm).  RSYNs are
        answered in order; once a write or an RSYN failed none is, and
        the error is raised by the next drain() or idle()."""
        self._begin_window()
        writes = [f for _, _, _, _, f in self.inflight]
        if self.syncer is None:
            self.syncer = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="rsg-replay-sync")

        def run():
            for f in writes:
                if f.exception() is not None:
                    self.failed = True      # drain() raises it
            if self.failed or self.dropping.is_set():
                return
            try:
                self.group.replay_sync(ident)
            except BaseException:
                self.failed = True
                raise
            answer()
        self.syncs.append(self.syncer.submit(run))

    def drain(self):
        """Begin the window, wait for every write in flight and every
        RSYN; raise the first error."""
        error = None
        try:
            self._begin_window()
        except Exception as e:
            error = e
        while self.inflight:
            try:
                self._wait_oldest()
            except Exception as e:   # the others still end first
                error = error or e
        while self.syncs:
            try:
                self.syncs.pop(0).result()
            except Exception as e:
                error = error or e
        if error is not None:
            raise error

    def idle(self, sock):
        """Frames held or in flight and nothing to read yet, or a thread
        waiting for the apply lock they hold: drain them; an RSYN that
        failed: raise its error."""
        while self.syncs and self.syncs[0].done():
            self.syncs.pop(0).result()
        if not self.inflight and not self.window:
            return
        if self.group.lock.wanted:
            self.drain()
            return
        pending = getattr(sock, "pending", None)    # TLS: buffered
        if pending is not None and pending():
            return
        if not select.select([sock], [], [], 0)[0]:
            self.drain()

    def close(self):
        """The session ends: writes and RSYNs not begun are dropped (no
        RSYN covering them is answered: the primary sends them again), so
        nothing is written long after a close that waits for the session
        only so long; those begun are waited for."""
        self.dropping.set()
        try:
            self.drain()
        except Exception:   # the connection ends anyway
            pass
        if self.pool is not None:
            self.pool.shutdown()
        if self.saver is not None:
            self.saver.shutdown()
        if self.syncer is not None:
            self.syncer.shutdown()


class SecondaryGroup:
    """A replicated storage group on a secondary node (module notes)."""

    role = SECONDARY

    def __init__(self, files, record, volumes, protect=None, release=None,
                 running_change=None, image=None, save_ahead=None):
        self.files = files
        self.name = record["name"]
        self.record_base = record
        self.granularity = record["granularity"]
        self.volumes = volumes
        self.sizes = [lu.size for lu in volumes]
        self.history = [list(h) for h in record.get("history", [])]
        self.last_seq = record.get("last_seq", 0)
        self.applied_seq = record.get("applied_seq", 0)
        # The id of the last RSYN of a replay acknowledged (the replay's
        # data up to it is durable in the volumes): the primary checks it
        # against what it cleared from its DCM (module notes).
        self.replay_synced = record.get("replay_synced", 0)
        self.consistent = record.get("consistent", False)
        # A staged, acknowledged batch this node's volumes failed to take
        # (they hold part of it): applied again from the stage before
        # anything else, and until then the node is not consistent.
        self.reapply = record.get("reapply", False)
        # The group's last consistent image of every volume is kept (made
        # by the replay that began while this node was consistent, until
        # that replay or the next completes; the module notes).
        self.protected = record.get("protected", False)
        # The point the kept image is of (history, applied_seq, diverged
        # then) and the volumes rolled back to it since: once all are,
        # the node holds that point again (volume_rolled_back).
        self.image_point = record.get("image_point")
        # Updates were applied and acknowledged without being made durable
        # (a sync link's CAPL; module notes): saved before the first such
        # apply of a session and cleared once the volumes are flushed at
        # its end.  Found at a start, the volumes may hold any part of
        # those updates (a power cut keeps some pages and not others).
        self.volatile = record.get("volatile", False)
        self.primary = record.get("primary")
        self.diverged = record.get("diverged")       # set by demote
        # protect(volumes, point): keep every volume's current image, all
        # marked inside point (a context); release(volumes); image(lu):
        # the export of lu's kept image, or None.
        self.protect = protect or (lambda volumes, point: None)
        self.release = release or (lambda volumes: None)
        self.image = image or (lambda lu: None)
        # save_ahead(lu, runs): writes of runs ([(offset, length)]) of lu
        # come next; its image saves what they change now, one flush for
        # them all (_ReplayApplier).
        self.save_ahead = save_ahead or (lambda lu, runs: None)
        # A volume-changing operation (restore, reverse sync) running here,
        # described, or None: a primary is refused meanwhile.
        self.running_change = running_change or (lambda: None)
        # Changes of the volumes made here being started (a restore until
        # it runs, a rollback): under session_lock, like `connection`.
        self.local_changes = []
        self.alone = set()          # those of local_changes run alone
        self.layers = []                    # Guard per volume
        # Apply vs. host reads and points in time (a fracture or mark of
        # a volume holds it); reentrant, as what runs under a point in
        # time may read through the guard, which takes it too.
        self.lock = _ApplyLock()
        self.session_lock = threading.Lock()
        self.persist_lock = threading.Lock()    # a snapshot and its save
        self.connection = None
        self.serving = None         # the thread serving self.connection
        self.applier = None         # its replay writer (_ReplayApplier)
        self.connected_since = None
        # The session's primary went and it is ending (until the
        # connection is cleared): a local change waits for it.
        self.ending = False
        # A replay's end is answered and its image released after: while
        # it is, a primary that went meanwhile is not seen, so a local
        # change waits for that as for an ending session.
        self.releasing = False
        # The error of the last release that failed (tried again).
        self.release_error = None
        self.reason = record.get("reason") or "never synchronized"
        self.error = None
        self.batches = 0
        self.slot = 0
        self.closed = False
        self._recover_stage()
        if self.volatile:
            if self.consistent:
                with self.lock:
                    self.consistent = False
                    self.reason = "this node stopped while it held updates " \
                        "not yet made durable; consistent again once the " \
                        "primary has sent their regions again"
                log.warning("group %s: %s", self.name, self.reason)
            self.volatile = False
            self.persist()

    # Stage slots.

    def _read_slot(self, i):
        try:
            with open(self.files.stage[i], "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        if len(raw) < STAGE_HEADER.size:
            return None
        magic, st, first, last, count, crc = STAGE_HEADER.unpack_from(raw)
        body = raw[STAGE_HEADER.size:]
        if magic != STAGE_MAGIC or st not in (STAGED, APPLIED):
            return None
        # The declared body is what the crc covers; a longer file holds
        # leftovers of an earlier, larger batch.
        entries, pos = [], 0
        for _ in range(count):
            if pos + ENTRY.size > len(body):
                return None
            seq, vol, kind, off, length, ecrc = ENTRY.unpack_from(body, pos)
            pos += ENTRY.size
            data = None
            if kind == WRITE:
                data = body[pos:pos + length]
                pos += length
            entries.append((seq, vol, kind, off, length, ecrc, data))
        if zlib.crc32(body[:pos]) != crc:
            return None
        return {"state": st, "first": first, "last": last,
                "entries": entries, "slot": i}

    def _recover_stage(self):
        """Batches are staged one at a time, each applied before the next
        is staged: only the newest valid slot can be unapplied."""
        slots = [s for s in (self._read_slot(0), self._read_slot(1)) if s]
        if not slots or not (self.consistent or self.reapply):
            return
        newest = max(slots, key=lambda s: s["last"])
        self.slot = 1 - newest["slot"]
        if newest["last"] <= self.applied_seq:
            return
        if newest["state"] == STAGED:
            log.info("group %s: applying the staged batch %d-%d again "
                     "(one atomic unit)", self.name, newest["first"],
                     newest["last"])
            self._apply_entries(newest["entries"])
            self._flush_volumes()
            self._mark_applied(self.files.stage[newest["slot"]])
        self.applied_seq = newest["last"]
        if self.reapply:
            with self.lock:
                self.consistent, self.reason = True, None
                self.reapply = False
            self.error = None
        self.persist()

    def _stage(self, entries, first, last):
        body = b"".join(ENTRY.pack(*e[:6]) + (bytes(e[6]) if e[6] is not
                                              None else b"") for e in entries)
        head = STAGE_HEADER.pack(STAGE_MAGIC, STAGED, first, last,
                                 len(entries), zlib.crc32(body))
        path = self.files.stage[self.slot]
        new = not os.path.exists(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.pwritev(fd, [head, body], 0)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        if new:
            # The batch is acknowledged next: a power cut must not take the
            # new file's entry and the batch with it.
            fsutil.fsync_dir(os.path.dirname(path))
        return path

    def _mark_applied(self, path):
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.pwrite(fd, bytes([APPLIED]), 8)
        finally:
            os.close(fd)

    def _slot_applied(self, path):
        """The batch staged at path (the current slot) is applied: the
        next batch goes to the other slot."""
        self._mark_applied(path)
        self.slot = 1 - self.slot

    def _clear_stage(self):
        fsutil.remove_durably(self.files.stage)

    # Applying.

    def attach(self):
        for lu in self.volumes:
            self.layers.append(Guard(self, lu))
            lu.stack.set("guard", self.layers[-1])

    def detach(self):
        for lu, layer in zip(self.volumes, self.layers):
            lu.stack.remove("guard", layer)
        self.layers = []

    def _backend(self, vol):
        # Below the read guard and above everything else: a clone or a
        # session of the volume sees a replicated change as a host write.
        return self.volumes[vol].stack.below("guard")

    def _apply_one(self, vol, kind, off, length, data):
        b = self._backend(vol)
        if kind == WRITE:
            b.write(memoryview(data), off)
        elif kind == ZERO:
            # Zeroes read back either way; a hole keeps the volume as
            # sparse as the primary's (a replay sends holes as zeroes).
            b.zero(off, length, may_trim=True)
        elif kind == TRIM:
            b.trim(off, length)
        else:
            raise ReplicationError(name=self.name, reason="a change of an "
                                   "unknown kind ({})".format(kind))

    def _apply_entries(self, entries):
        # Every prefix of the stream is a state the primary had, so a
        # reader (or a point in time) may come between two updates: the
        # lock is let go between two once a thread waits for it and the
        # slice is over, not at every update (the wait to let it in, and
        # the lock taken back from readers that keep coming, would cost
        # each update).
        i = 0
        while i < len(entries):
            with self.lock:
                until = time.monotonic() + APPLY_SLICE
                while i < len(entries):
                    _, vol, kind, off, length, _, data = entries[i]
                    try:
                        self._apply_one(vol, kind, off, length, data)
                    except OSError as e:
                        # The volume may hold part of the update: no
                        # reader waiting for the lock gets it (the
                        # caller says what follows).
                        self.consistent = False
                        self.reason = "applying update {} failed: {}" \
                            .format(entries[i][0], e)
                        raise
                    i += 1
                    if self.lock.wanted and time.monotonic() >= until:
                        break
            # The lock is not fair: the threads waiting for it go first,
            # for a slice at most.
            until = time.monotonic() + APPLY_SLICE
            while i < len(entries) and self.lock.wanted and \
                    time.monotonic() < until:
                time.sleep(APPLY_SLICE / 4)

    def _flush_volumes(self):
        for vol in range(len(self.volumes)):
            self._backend(vol).flush()

    def persist(self, ahead=None, **settings):
        """Save the record; settings (an admin's change of the group's
        own fields) are in force once saved, never before.  ahead: state
        fields saved with the values given instead of this object's, which
        the caller sets once saved."""
        # The session and an admin's change (a policy, an image released)
        # save it from two threads: the save that lands last must be of
        # the later state (a stale `volatile` or `consistent` would let a
        # crash pass a torn state for a consistent one).
        with self.persist_lock:
            rec = dict(self.record_base, **settings)
            rec.update({"role": SECONDARY, "history": self.history,
                        "last_seq": max(self.last_seq, self.applied_seq),
                        "applied_seq": self.applied_seq,
                        "replay_synced": self.replay_synced,
                        "consistent": self.consistent,
                        "reapply": self.reapply,
                        "protected": self.protected,
                        "image_point": self.image_point,
                        "primary": self.primary,
                        "volatile": self.volatile,
                        "diverged": self.diverged, "reason": self.reason})
            rec.update(ahead or {})
            self.files.save(rec)
            self.record_base.update(settings)

    # Host reads.

    @contextlib.contextmanager
    def local_change(self, what, alone=False):
        """A change of the volumes made on this node (a restore, a reverse
        sync, a rollback): refused while a primary is connected, and no
        primary is accepted while it is being made; a restore that runs is
        seen by `running_change` from then on.  One that is running already
        (the same rollback twice) is refused, and so is any beside one
        that runs alone (a promotion, a deletion: they close the group
        and release the images a rollback reads)."""
        self.wait_session_end()
        with self.session_lock:
            if self.connection is not None:
                raise RsgBusy(name=self.name, reason="{} is refused: this "
                                "node is a secondary and its primary is "
                                "replicating; detach the link on the primary "
                                "first".format(what))
            running = next((w for w in self.local_changes
                            if w == what or alone or w in self.alone), None)
            if running is not None:
                raise RsgBusy(name=self.name, reason="{} is refused: {} is "
                              "running on this secondary; try again when it "
                              "has finished".format(what, running))
            self.local_changes.append(what)
            if alone:
                self.alone.add(what)
        try:
            yield
        finally:
            with self.session_lock:
                self.local_changes.remove(what)
                self.alone.discard(what)

    def wait_session_end(self, timeout=SESSION_END_WAIT):
        """A session whose primary went is still ending (it makes what it
        applied durable, or releases a replay's image first): wait for
        it, up to timeout, so that a change asked for right after a
        detach is not refused as if a primary were connected."""
        deadline = time.monotonic() + timeout
        while (self.ending or self.releasing) and \
                self.connection is not None and time.monotonic() < deadline:
            time.sleep(0.01)

    def refuse_primary(self):
        """Under session_lock: why a primary may not connect now, or None.
        Its batches would land beside a local change's own writes; the
        primary tries again and replays what the change did once it has
        finished."""
        busy = self.local_changes[0] if self.local_changes \
            else self.running_change()
        if busy:
            return "{} is running on this secondary; replication resumes " \
                "when it has finished".format(busy)
        return None

    def check_readable(self, lu):
        if not self.consistent:
            export = self.image(lu) if self.protected else None
            hint = "; its last consistent image is readable as {} " \
                "(`clonectl lu rollback {}` puts it back)".format(
                    export, lu.name) if export else ""
            raise ReplicaUnavailable(name=lu.name, group=self.name,
                                     reason=self.reason, hint=hint)


    # The session with a primary.

    def handshake(self, hello):
        """Check a primary's hello; return the reply."""
        peer_history(hello.get("history"))
        peer_seq(hello.get("last_seq"), "last update")
        vols = hello.get("volumes") or []
        mine = [{"lu": lu.name, "size": lu.size} for lu in self.volumes]
        if vols != mine:
            raise ReplicationError(
                name=self.name, reason="the primary's volumes {} do not match "
                "this secondary's {}".format(
                    ", ".join("{}({})".format(v.get("lu"), v.get("size"))
                              if isinstance(v, dict) else repr(v)
                              for v in (vols if isinstance(vols, list)
                                        else [vols])),
                    ", ".join("{lu}({size})".format(**v) for v in mine)))
        policy = hello.get("after_split_brain")
        if policy is not None and policy not in SPLIT_BRAIN_POLICIES:
            # A newer version's, or garbage: replication goes on, and a
            # promotion acts on the policy kept before.
            log.warning("group %s: the primary's split-brain policy %r is "
                        "not one this node knows; it keeps %r for when it "
                        "is promoted", self.name, policy,
                        self.record_base.get("after_split_brain",
                                             DISCONNECT))
        elif policy and policy != self.record_base.get("after_split_brain"):
            # The group's policy, kept for when this node is promoted.
            self.persist(after_split_brain=policy)
        reply = {"ok": True, "role": SECONDARY,
                 "consistent": self.consistent,
                 "applied_seq": self.applied_seq, "history": self.history,
                 "last_seq": max(self.last_seq, self.applied_seq),
                 "base": self.own_base(),
                 # It answers VREQ (an older secondary would fail the link).
                 "verify": True,
                 # It answers RSYN (a replay resumes from its answers),
                 # and this is the last one it made durable.
                 "replay_sync": True,
                 "replay_synced": self.replay_synced,
                 # It answers CAPL (a batch acknowledged once applied,
                 # made durable at the next CMIT).
                 "applied_acks": True}
        if self.diverged is not None:
            reply["diverged"] = self.diverged.get("runs", [])
            reply["diverged_all"] = self.diverged.get("all", False)
            reply["diverged_maps"] = self.diverged.get("maps", [])
            # Apart: each holds what this node changed since a secondary's
            # image only together with that secondary's writes since it,
            # which an older primary would not add.
            reply["diverged_image_maps"] = self.diverged.get(
                "image_maps", [])
        return reply

    def own_base(self):
        """The point since which `diverged` holds every change made on
        this node on its own ([generation, seq]), or None when unknown
        (then a primary on another line copies everything).  With nothing
        diverged it is the last update received from a primary."""
        if self.diverged is not None:
            return self.diverged.get("base")
        if self.consistent and self.history:
            return [self.history[-1][0], self.applied_seq]
        return None

    def record_local_change(self, runs):
        """(Before the change is made.)  Regions [vol, offset, length]
        this node changes on its own, saved as diverged; if that record
        cannot be saved the change is refused, and nothing of it is kept
        (a volume would lose the point it holds for a change never
        made)."""
        before = copy.deepcopy((self.diverged, self.image_point))
        diverged, point = copy.deepcopy(before)
        if diverged is None:
            diverged = {"runs": [], "all": False, "base": self.own_base(),
                        "maps": []}
        runs = [list(r) for r in runs]
        diverged["runs"] = diverged.get("runs", []) + runs
        for m in diverged.get("maps", []) + diverged.get("image_maps", []):
            m["runs"] = m["runs"] + runs
        if point is not None:
            # A volume changed after its rollback no longer holds the
            # point (its image is gone: it cannot get there again).
            changed = {self.volumes[r[0]].name for r in runs}
            point["rolled_back"] = [n for n in point["rolled_back"]
                                    if n not in changed]
        self.diverged, self.image_point = diverged, point
        try:
            self.persist()
        except BaseException:
            self.diverged, self.image_point = before
            raise

    def _send_pull(self, sock, runs):
        """A primary takes this node's diverged regions (the split-brain
        policy discard-zero-changes, when only this node wrote): their
        data, in RDAT frames, then PEND."""
        if not isinstance(runs, list) or not all(
                isinstance(r, list) and len(r) == 3 and
                all(type(x) is int for x in r) for r in runs):
            raise errors.ProtocolError(reason="the primary's PULL asked for "
                                       "regions {!r}, not a list of [volume, "
                                       "offset, length]".format(runs))
        for vol, off, length in runs:
            if not (0 <= vol < len(self.sizes)) or off < 0 or length < 0 \
                    or off + length > self.sizes[vol]:
                raise ReplicationError(name=self.name, reason="the primary "
                                       "asked for a region out of range")
            end = off + length
            while off < end:
                n = min(PULL_CHUNK, end - off)
                buf = bytearray(n)
                with self.lock:
                    self._backend(vol).readinto(buf, off)
                head = DATA.pack(vol, WRITE, off, n, zlib.crc32(buf))
                send_frame(sock, b"RDAT", head + bytes(buf))
                off += n
        send_frame(sock, b"PEND")

    def serve(self, sock, hello, peer):
        """Receive from one primary until the connection ends."""
        self.primary = peer
        theirs = peer_history(hello.get("history"))
        # The primary's last update as far as this node knows: its hello's,
        # then the last of each batch received.
        their_last = peer_seq(hello.get("last_seq"), "last update")
        self.ending = self.releasing = False
        self.connected_since = time.time()
        batch = []
        replaying = False
        # Updates applied since the volumes were last flushed (CAPL).
        unflushed = False
        replay = "the primary's replay"
        applier = self.applier = _ReplayApplier(self)
        reader = Reader(sock)
        try:
            if self.reapply:
                with _applying("the staged batch", staged=True):
                    self._recover_stage()
            self.release_done_images()
            while not self.closed:
                with _applying(replay):
                    applier.idle(reader)
                kind, payload = recv_frame(reader)
                if kind in (b"RDAT", b"RSYN", b"REND") and not replaying:
                    # Replay frames outside a replay would write a node
                    # that keeps no image and stages nothing, or call it
                    # consistent at a point it never reached.
                    raise errors.ProtocolError(
                        reason="{} outside a replay".format(
                            kind.decode("ascii", "replace")))
                if kind == b"RDAT":
                    vol, k, off, length, crc = _fields(
                        kind, payload, DATA.unpack_from)
                    data = payload[DATA.size:] if k == WRITE else None
                    self._check_data(vol, k, off, length, crc, data)
                    with _applying(replay):
                        applier.add(vol, k, off, length, data)
                    continue
                if kind == b"RSYN":
                    with _applying(replay):
                        applier.sync(_fields(kind, payload, SEQ.unpack)[0],
                                     functools.partial(_answer, sock, b"RSAK",
                                                       payload))
                    continue
                # What follows the data (stream entries, REND...) lands
                # after it.
                with _applying(replay):
                    applier.drain()
                if kind == b"ENTR":
                    seq, vol, k, off, length, crc = \
                        _fields(kind, payload, ENTRY.unpack_from)
                    data = payload[ENTRY.size:] if k == WRITE else None
                    self._check_entry(seq, vol, k, off, length, crc, data)
                    if replaying or not self.consistent:
                        with _applying(replay), self.lock:
                            self._apply_one(vol, k, off, length, data)
                    elif seq > self.applied_seq:
                        batch.append((seq, vol, k, off, length, crc, data))
                elif kind == b"BEAT":
                    if self.volatile and not unflushed:
                        # The primary idles and a CMIT made everything
                        # durable: a crash from here on finds nothing
                        # undurable (one save per idle spell).
                        self.volatile = False
                        self.persist()
                    if not replaying:
                        self.release_done_images()
                    continue
                elif kind == b"PULL":
                    self._send_pull(sock, _fields(
                        kind, payload, lambda p: json.loads(p)["runs"]))
                elif kind == b"CAPL":
                    # A batch of a sync link: acknowledged once applied,
                    # made durable by a later CMIT (module notes).
                    seq, = _fields(kind, payload, SEQ.unpack)
                    if batch and self.consistent and not replaying:
                        if not self.volatile:
                            self.volatile = True
                            self.persist()
                        with _applying("updates {}-{}".format(
                                batch[0][0], batch[-1][0]), volatile=True):
                            self._apply_entries(batch)
                        self.applied_seq = batch[-1][0]
                        self.batches += 1
                        batch = []
                    unflushed = True
                    send_frame(sock, b"APLD", SEQ.pack(seq))
                    self._received(seq, theirs)
                    their_last = max(their_last, seq)
                elif kind == b"CMIT":
                    seq, = _fields(kind, payload, SEQ.unpack)
                    if replaying or not self.consistent:
                        with _applying(replay):
                            self._flush_volumes()
                        unflushed = False
                        send_frame(sock, b"ACKS", SEQ.pack(seq))
                        continue
                    if unflushed:
                        # What CAPL applied is durable before this batch
                        # is staged: a stage is applied again after a
                        # crash over volumes that hold everything before.
                        with _applying("updates before {}".format(seq),
                                       volatile=True):
                            self._flush_volumes()
                        unflushed = False
                        if not batch:
                            # Where a start finds what is durable.
                            self._slot_applied(self._stage(
                                [], self.applied_seq, self.applied_seq))
                    if batch:
                        path = self._stage(batch, batch[0][0], batch[-1][0])
                    send_frame(sock, b"ACKS", SEQ.pack(seq))
                    if batch:
                        with _applying("updates {}-{}".format(
                                batch[0][0], batch[-1][0]), staged=True):
                            self._apply_entries(batch)
                            self._flush_volumes()
                        self._slot_applied(path)
                        self.applied_seq = batch[-1][0]
                        self.batches += 1
                        batch = []
                    self._received(seq, theirs)
                    their_last = max(their_last, seq)
                    if not replaying:
                        self.release_done_images()
                elif kind == b"VREQ":
                    send_json(sock, b"VANS",
                              self.verify_answer(
                                  _fields(kind, payload, json.loads)))
                elif kind == b"RBEG":
                    if unflushed:
                        # The image kept is of durable data.
                        with _applying(replay, volatile=True):
                            self._flush_volumes()
                        unflushed = False
                    replaying = True
                    self._begin_replay(theirs, their_last)
                    send_json(sock, b"RBOK", dict(self._image_kept(),
                                                  ok=True))
                elif kind == b"REND":
                    seq, = _fields(kind, payload, SEQ.unpack)
                    with _applying(replay):
                        self._end_replay(seq, theirs)
                    replaying = False
                    send_json(sock, b"RACK", {"ok": True})
                    # After the answer, which it need not delay: the node
                    # is consistent on disk, and a crash before the
                    # release leaves the image to the start's.
                    self.release_done_images()
                else:
                    raise errors.ProtocolError(reason="unknown frame {!r}"
                                               .format(kind))
        except errors.Error as e:
            # No RSAK (nor save of the record) from a sync still running
            # beside what follows.
            applier.close()
            if self.closed:
                # The target closing under this session (its LUs go away):
                # no FAIL, which would stop the primary's link for good;
                # the primary sees the connection drop and comes back.
                log.info("group %s: session ended by the close: %s",
                         self.name, e)
                return
            self.error = str(e)
            log.error("group %s: %s", self.name, e)
            if not isinstance(e, (ReplicationError, errors.ProtocolError)):
                # A failure of this node's own (a state that cannot be
                # saved, a disk gone): not a refusal of the primary's
                # updates, so no FAIL, which would stop its link for good;
                # the connection drops and the primary tries again.
                return
            # Refused updates (checksum, range, history): the primary stops
            # with the message.
            try:
                send_json(sock, b"FAIL", {"message": str(e)})
            except OSError:
                pass
        except _ApplyFailed as e:
            applier.close()
            # This node's own volumes failed an update (EIO, ENOSPC): the
            # connection ends (the primary tries again), and the status
            # says why; a batch applied in part leaves the node
            # inconsistent until its staged copy is applied again.
            self.error = "applying {} failed: {}".format(e.what, e.__cause__)
            log.error("group %s: %s", self.name, self.error)
            if e.staged or e.volatile:
                with self.lock:
                    self.consistent = False
                    if e.staged:
                        self.reapply = True
                        self.reason = self.error + "; the staged copy " \
                            "is applied again when the primary reconnects"
                    else:
                        self.reason = self.error + "; the primary sends " \
                            "its regions again when it reconnects"
                try:
                    self.persist()
                except OSError as e2:
                    log.error("group %s: cannot save its record: %s",
                              self.name, e2)
        finally:
            self.ending = True
            applier.close()
            self._settle()
            self.connected_since = None

    def _settle(self):
        """The session ended: what CAPL applied is made durable, and the
        record no longer says this node holds updates that are not."""
        if not self.volatile:
            return
        try:
            self._flush_volumes()
        except OSError as e:
            # After a failed flush the kernel may have dropped what it
            # could not write: not consistent, and the primary sends the
            # regions of what was not durable again.
            self.error = "making the updates applied durable failed: " \
                "{}".format(e)
            log.error("group %s: %s", self.name, self.error)
            with self.lock:
                self.consistent = False
                self.reason = self.error + "; the primary sends their " \
                    "regions again when it reconnects"
        else:
            self.volatile = False
        try:
            self.persist()
        except OSError as e:
            # The record on disk still says volatile: a start takes the
            # node for inconsistent.
            log.error("group %s: cannot save its record: %s", self.name, e)

    def _received(self, seq, theirs):
        """A batch up to seq is in (a commit frame): the primary's history
        is this node's from now on."""
        self.last_seq = max(self.last_seq, seq)
        if self.history != theirs:
            self.history = theirs
            self.persist()

    def verify_answer(self, request):
        """The checksums of a region of a volume as applied here, for a
        primary's online verify (target.replication.verify): every frame
        before the request is applied already."""
        try:
            ident, vol, offset, length, gran = (
                int(request[k]) for k in ("id", "vol", "offset", "length",
                                          "granularity"))
        except (KeyError, TypeError, ValueError):
            raise errors.ProtocolError(reason="bad verify request")
        if not (0 <= vol < len(self.volumes)) or offset < 0 or \
                length < 0 or gran <= 0 or length > verify.REGION or \
                offset + length > self.volumes[vol].size:
            raise errors.ProtocolError(reason="verify request out of range")
        buf = bytearray(length)
        with self.lock:
            self._backend(vol).readinto(buf, offset)
        return {"id": ident, "digests": verify.digests(buf, gran)}

    def _check_entry(self, seq, vol, kind, off, length, crc, data):
        if kind not in KINDS or vol >= len(self.sizes) or \
                off + length > self.sizes[vol] or \
                (kind == WRITE and len(data) != length) or \
                entry_crc(seq, vol, kind, off, length, data) != crc:
            raise ReplicationError(
                name=self.name, reason="update {} fails its checks (kind, "
                "range, checksum); replication stopped, nothing of its "
                "batch was applied".format(seq))

    def _check_data(self, vol, kind, off, length, crc, data):
        if kind not in KINDS or vol >= len(self.sizes) or \
                off + length > self.sizes[vol] or \
                (kind == WRITE and (len(data) != length or
                                    zlib.crc32(data) != crc)):
            raise ReplicationError(
                name=self.name, reason="replay data at {} of volume {} fails "
                "its checks (kind, range, checksum); replication "
                "stopped".format(off, vol))

    def _begin_replay(self, theirs, their_last):
        log.info("group %s: replay from the primary started", self.name)
        if self.consistent:
            # Keep the last consistent image readable and restorable: the
            # group's own (never an admin's or a peer's protected image),
            # every volume of this point (no batch applied meanwhile).  A
            # replay that begins on an inconsistent node keeps the one an
            # earlier replay made.
            try:
                self.protect(self.volumes, self.lock)
            except OSError as e:
                # This node's own failure (a full or read-only state
                # directory): the session ends with it in the status.
                raise ImageNotKept(name=self.name, reason=str(e)) from e
            self.protected = True
            self.image_point = {
                "history": copy.deepcopy(self.history),
                "applied_seq": self.applied_seq,
                "diverged": copy.deepcopy(self.diverged),
                "rolled_back": [],
                # Names this image to the primaries that replay over it
                # (_image_kept), and the diverged map a rollback to it
                # leaves (volume_rolled_back).
                "id": uuid.uuid4().hex}
        lost = []
        if self.protected and not self.consistent:
            # A volume rolled back to its image (which went with it) is
            # written by this replay: the other volumes' images are no
            # longer of a point the group can get back.  Recorded as gone
            # before they are released (a start releases what is left).
            back = (self.image_point or {}).get("rolled_back", [])
            lost = [lu.name for lu in self.volumes
                    if not self.image(lu) or lu.name in back]
            if lost:
                log.warning("group %s: its last consistent point is lost "
                            "(no image of it kept of %s: rolled back, or "
                            "passed by a replay); the images left are "
                            "released", self.name, ", ".join(lost))
                self.protected = False
                self.image_point = None
        # One step for whoever holds the lock (a status, a hello's reply):
        # never inconsistent while still diverged on its own line.
        with self.lock:
            self.consistent = False
            self.reason = "a DCM replay from the primary is running"
            self.diverged = None
            self.history = theirs
            # The primary's line from here on: of it this node holds
            # nothing past the primary's last update (its own numbers
            # went on another line, or past what the primary has: the
            # replay overwrites those updates), so it never looks ahead
            # of the primary on the primary's own line
            # (records.history_diverges).
            self.applied_seq = min(self.applied_seq, their_last)
            self.last_seq = min(self.last_seq, their_last)
        self._clear_stage()
        self.persist()
        if lost:
            self.release(self.volumes)

    def point_kept(self):
        """Whether the images kept (LU@consistent-LU) hold the group's
        last consistent point: not once the node is consistent again, nor
        after a replay that completed over them (their release may have
        failed, and the node become inconsistent since)."""
        point = self.image_point
        return self.protected and not self.consistent and \
            not (point or {}).get("passed")

    def _image_kept(self):
        """For RBOK: the last consistent image kept here, {"image": {id,
        base}} (base: the [generation, update] it holds), or nothing.  A
        primary replaying over it knows that what it sends and clears from
        its DCM lands on top of that image: its DCM with the regions
        written here since the image holds every region where it differs
        from the image (PrimaryGroup.changes_since_agreement)."""
        point = self.image_point
        if not self.point_kept() or point is None or \
                not point.get("id") or not point["history"]:
            return {}
        return {"image": {"id": point["id"], "base": [
            point["history"][-1][0], point["applied_seq"]]}}

    def replay_sync(self, ident):
        """RSYN ident: the replay's data so far (applied already) is made
        durable, and so is the record saying so, before the primary
        clears it from its DCM; a node that later reports an older id
        (its state went back) gets the whole DCM copied again."""
        self._flush_volumes()
        self.replay_synced = ident
        self.persist()

    def _end_replay(self, seq, theirs):
        self._flush_volumes()
        self._clear_stage()
        ended = {"applied_seq": seq, "last_seq": seq, "history": theirs,
                 "consistent": True, "reason": None}
        if self.image_point is not None:
            # The images kept are of an older point from now on, even if
            # their release fails and the node becomes inconsistent again:
            # never offered to roll back to (point_kept).
            ended["image_point"] = dict(self.image_point, passed=True)
        # Consistent once recorded, never before: a node saying so with its
        # record saying otherwise would release its last consistent image
        # (release_done_images) and answer a primary as consistent.
        self.persist(ahead=ended)
        with self.lock:
            for field, value in ended.items():
                setattr(self, field, value)
        log.info("group %s: replay from the primary completed: consistent "
                 "at sequence %d", self.name, seq)

    def release_images(self):
        """Release the last consistent image this group kept (a replay
        completed: the node is consistent again).  Done only once the
        record says so: if it cannot be saved, the node stays protected
        (as its record still says), so the release is tried again (a
        second release of the images is a no-op)."""
        self.release(self.volumes)
        point = self.image_point
        self.protected = False
        self.image_point = None
        try:
            self.persist()
        except BaseException:
            self.protected = True
            self.image_point = point
            raise

    def release_done_images(self):
        """A consistent node keeps no last consistent image (every update
        it applies would save old data there, filling its save areas):
        one kept is released, at a replay's end and, if that failed, at
        the next session's start and at the primary's next BEAT or CMIT
        (the caller is the session, not replaying).  A failure is logged
        (once per error) and in the status; the session replicates on."""
        if not (self.protected and self.consistent):
            return
        self.releasing = True
        try:
            self.release_images()
        except Exception as e:
            # Any error: the release only keeps replicated updates from
            # being copied on first write; ending the session for it
            # would end every later one at its start as well.
            error = "releasing the last consistent image failed: {} " \
                "(tried again as the primary replicates on)".format(e)
            if error != self.release_error:
                log.error("group %s: %s", self.name, error,
                          exc_info=not isinstance(e, (errors.Error,
                                                      OSError)))
            self.error = self.release_error = error
            return
        finally:
            self.releasing = False
        if self.release_error is not None:
            log.info("group %s: its last consistent image is released",
                     self.name)
            if self.error == self.release_error:
                self.error = None
            self.release_error = None

    def volume_rolled_back(self, lu):
        """lu was rolled back to the group's last consistent image (and
        the regions it changed recorded as diverged).  Once every volume
        is, the node holds that point again: consistent, at the update
        and history it had then, with what it diverged then plus the
        regions the rollbacks changed (the primary copies exactly those
        back, and the replay's regions it cleared are among them)."""
        with self.session_lock:
            point = self.image_point
            if point is None or self.consistent:
                return
            if lu.name not in point["rolled_back"]:
                point["rolled_back"].append(lu.name)
            if set(point["rolled_back"]) != {v.name for v in self.volumes}:
                self.persist()
                return
            runs = (self.diverged or {}).get("runs", [])
            diverged = copy.deepcopy(point["diverged"])
            if diverged is None:
                history = point["history"]
                diverged = {"runs": [], "all": False, "maps": [],
                            "base": [history[-1][0], point["applied_seq"]]
                            if history else None}
            diverged["runs"] = diverged.get("runs", []) + runs
            for m in diverged.get("maps", []) + \
                    diverged.get("image_maps", []):
                m["runs"] = m["runs"] + runs
            # Its runs hold every region written here since the image was
            # kept (the rollbacks copied them back): a primary that
            # replayed over the image pairs its DCM with them
            # (PrimaryGroup._image_changes).
            diverged["image"] = point.get("id")
            with self.lock:
                self.history = point["history"]
                self.applied_seq = self.last_seq = point["applied_seq"]
                self.diverged = diverged
                self.consistent, self.reason = True, None
            # The broken replay's error is history now.
            self.error = None
            self.protected = False
            self.image_point = None
            self.persist()
        log.info("group %s: every volume rolled back to its last consistent "
                 "image: consistent at update %d", self.name,
                 self.applied_seq)

    def set_split_brain_policy(self, policy):
        """Kept for when this node is promoted (a primary sends its own)."""
        self.persist(after_split_brain=check_split_brain_policy(policy))

    def status(self):
        return {"name": self.name, "role": SECONDARY,
                "after_split_brain": self.record_base.get(
                    "after_split_brain", DISCONNECT),
                "granularity": self.granularity,
                "volumes": [{"lu": lu.name, "size": lu.size}
                            for lu in self.volumes],
                "consistent": self.consistent,
                "reason": None if self.consistent else self.reason,
                "applied_seq": self.applied_seq, "history": self.history,
                "generation": self.history[-1][0] if self.history else None,
                "primary": self.primary,
                "connected": self.connected_since is not None,
                "protected": self.protected,
                "images": [e for e in (self.image(lu) for lu in self.volumes)
                           if e] if self.protected else [],
                "batches": self.batches,
                "error": self.error}

    def close(self):
        # Under the session lock: a connection being set up sees `closed`
        # (ReplicaServer._serve) or is shut down here, never neither.
        with self.session_lock:
            self.closed = True
            conn, applier = self.connection, self.applier
        if conn is not None:
            shutdown_socket(conn)
        if applier is not None:
            applier.cancel()
