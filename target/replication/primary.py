"""A replicated storage group on its primary node.

Owns the order of changes (sequence numbers, the SRL append and the volume
write under one lock), the SRL's tail and space, the activity log, the
group record, recovery after an unclean stop, and switching links between
the SRL and their DCMs (overflow, a failing SRL, volume-changing
operations).  See the design notes in target/replication/__init__.py;
files and recovery: docs/persistence.md.
"""

import collections
import contextlib
import functools
import logging
import os
import threading
import time

from .. import errors, maps
from .dcm import ActivityLog, Dcm
from .layer import ReplicationLayer, TakeGuard, merged, overlap, without
from .link import (DCM_REPLAY, DETACHED, REPLICATING, SRL, SRL_DCM,
                   SRL_RETRY, Link)
from .records import (DISCARD_SECONDARY, DISCARD_ZERO_CHANGES, DISCONNECT,
                      PRIMARY, ReplicationError, check_split_brain_policy,
                      common_prefix, history_diverges, map_covers,
                      peer_history, peer_seq)
from .srl import ENTRY_SPACE, Srl
from .wire import WRITE, entry_crc

log = logging.getLogger("clonectl.replication")

SYNC_TIMEOUT = 10.0            # a sync link that does not ack is failed
SEQ_RESERVE = 1 << 20          # unlogged sequence numbers saved ahead


class _SrlSyncFailed(Exception):
    """PrimaryGroup._persist could not make the SRL durable (the OSError
    is its __cause__)."""


class _GroupCond(threading.Condition):
    """The group's condition.  Besides its own waiters it has two kinds
    that only some events concern, each waiting on a condition of its own
    over the same lock: link threads waiting for new entries or for
    acknowledgements (`feed`, woken by each change), and sync writers
    waiting for their write's acknowledgement (`ack_waiter`: each on an
    event of its own, woken by the acknowledgement that covers it, which
    it sees without taking the lock again).  notify_all wakes them all, so
    every other event reaches every waiter as it did with one condition."""

    def __init__(self, lock):
        super().__init__(lock)
        self.feed = threading.Condition(lock)
        self._acks = []             # AckWaiter of each waiting writer
        self._mine = threading.local()

    def notify_all(self):
        super().notify_all()
        self.feed.notify_all()
        for w in self._acks:
            w.event.set()

    def ack_waiter(self, link, seq):
        """(Under the lock.)  Register the calling thread as waiting for
        link's acknowledgement of seq (its event is set once it comes,
        and at every notify_all); give it to ack_done when done."""
        waiter = getattr(self._mine, "waiter", None)
        if waiter is None:
            waiter = self._mine.waiter = AckWaiter()
        waiter.link, waiter.seq, waiter.listed = link, seq, True
        waiter.event.clear()
        self._acks.append(waiter)
        return waiter

    def ack_done(self, waiter):
        """(Under the lock.)"""
        if waiter.listed:
            waiter.listed = False
            self._acks.remove(waiter)

    def acknowledged(self, link):
        """(Under the lock.)  link's secondary acknowledged more: wake the
        writers it covers (and take them off the list: they return
        without the lock), and the link thread if its flow control
        waits."""
        held = link.acknowledged
        covered = [w for w in self._acks if w.link is link and w.seq <= held]
        for w in covered:
            w.listed = False
            self._acks.remove(w)
            w.event.set()
        if link.flow_waits:
            self.feed.notify_all()

    def durable(self, link):
        """(Under the lock.)  link's secondary made more durable: wake the
        group's own waiters (a host flush waits for it), and those
        acknowledged() wakes; not a link thread waiting for entries."""
        super().notify_all()
        self.acknowledged(link)


class AckWaiter:
    """A sync writer waiting for its acknowledgement (_GroupCond)."""

    def __init__(self):
        self.event = threading.Event()
        self.link = self.seq = None
        self.listed = False


class VolumeChange:
    """An operation changing a volume without host writes, as a replay
    sees it (module notes, volume-changing operations): what it is,
    readinto(buf, offset) giving what a host read returns now without
    changing anything, and whether its engine writes data hosts never see
    (a reverse sync's copy that collided with a host write is written
    again), so that no replay may end while it runs."""

    def __init__(self, what, readinto, hides_copies=False):
        self.what = what
        self.readinto = readinto
        self.hides_copies = hides_copies


class _Visible:
    """A volume as its hosts see it during a volume change, for a
    replay's read: data everywhere (the operation's source decides what
    a read returns, not the volume's allocation)."""

    def __init__(self, change):
        self.readinto = change.readinto

    @staticmethod
    def extents(offset, length):
        return [(offset, length, False)]


class PrimaryGroup:
    """A replicated storage group on its primary node."""

    role = PRIMARY

    def __init__(self, files, record, volumes, volume_view=None,
                 sync_timeout=SYNC_TIMEOUT):
        self.files = files
        self.name = record["name"]
        self.record_base = record
        self.granularity = record["granularity"]
        self.volumes = volumes              # LogicalUnit objects, in order
        self.sizes = [lu.size for lu in volumes]
        self.generation = record["generation"]
        self.history = [list(h) for h in record["history"]]
        self.sync_timeout = sync_timeout
        # volume_view(vol): the VolumeChange running on volume vol, or
        # None.
        self._volume_view = volume_view or (lambda vol: None)
        # Volume changes begun and not started yet (begin_volume_change):
        # replays read nothing meanwhile.
        self.changes_starting = []
        # Volume -> TakeGuard while a secondary's changes are taken, and
        # whether this thread is writing a take's region now (its writes
        # are no host changes).
        self.take_guards = {}
        self._take_writer = threading.local()
        self.lock = threading.Lock()
        self.cond = _GroupCond(self.lock)
        self.persist_lock = threading.Lock()
        self.waiters = 0
        self.closed = False
        self.maps_closed = False    # the links' DCMs (at close)
        self.problems = []
        # Volume -> a backend of its own on the volume's storage, for the
        # group's flushes: it hears of a failed writeback even when a host's
        # flush heard first (Backend.reopen).
        self._flushers = {}
        self.seq_bound = 0
        self.srl_failed_at = -SRL_RETRY
        if os.path.exists(files.srl):
            self.srl = Srl(files.srl)
        else:
            self.srl = Srl(files.srl, record["srl_size"])
        tail = record.get("tail") or {"pos": 0, "seq": 1}
        corrupt = self.srl.scan(tail["pos"], tail["seq"])
        self.al = ActivityLog(files.activity_log(), self.granularity,
                              self.sizes)
        unclean = self.al.count() > 0
        if corrupt is not None and not unclean:
            self.problems.append("SRL entry {} (byte {}) fails its checksum; "
                                 "links that still need it stop there"
                                 .format(*corrupt))
        # Numbers of logged changes are found again in the SRL; numbers of
        # changes made while no link holds the SRL are saved ahead of use
        # (seq_bound), so a number handed out before a crash is never
        # handed out again.
        self.seq_bound = record.get("seq_bound", 1)
        self.next_seq = max(self.srl.next_seq, record.get("next_seq", 1),
                            self.seq_bound)
        self.after_split_brain = record.get("after_split_brain", DISCONNECT)
        # What this node changed since its promotion; since_base: the
        # last update it had from a primary then, if it had changed
        # nothing on its own (None: it had, see since_maps, or the record
        # is older than the field): the map holds every change since.
        self.since = None
        self.since_base = record.get("since_base")
        # [{base, runs}]: what this node changed on its own before its
        # promotion, each since its base (the since map goes with each).
        self.since_maps = record.get("since_maps") or []
        if record.get("since_promotion"):
            self.since = Dcm(files.since(), self.granularity, self.sizes)
        self.links = []
        recs = record.get("links", [])
        # The index names the link's DCM file; it is the one given when the
        # link was added (a record without it, from before it was saved,
        # numbers links by position, as they were then).
        indexes = [rec.get("index", i) for i, rec in enumerate(recs)]
        spare = max(indexes + [-1]) + 1
        for index, rec in zip(indexes, recs):
            if any(l.index == index for l in self.links):
                # Two links must never share a DCM: this one gets a file of
                # its own, with every extent set.
                self.problems.append(
                    "link {}: its DCM file belongs to another link; it gets "
                    "a new one and every extent will be copied".format(
                        rec.get("secondary")))
                link = self._add_link_object(spare, rec, fresh=True)
                spare += 1
                link.dcm.mark_all()
                if link.holds_srl:
                    link.transition("log")
                continue
            link = self._add_link_object(index, rec, fresh=False)
            if link.pulling and link.pull_left is not None:
                self._resume_take(link)
        self.layers = []            # ReplicationLayer per volume
        if unclean:
            self._recover_unclean(corrupt)

    def _recover_unclean(self, corrupt):
        """The activity log has marks: the group was not closed, and a
        power cut may have kept data writes whose SRL entries it lost, or
        lost entries a secondary has (module notes)."""
        regions = list(self.al.runs())
        for link in self.links:
            if link.holds_srl:
                self._mark_pending(link, link.acked_pos, link.acked_seq + 1)
                link.transition("log")
            if link.dcm_active:
                for vol, off, length in regions:
                    link.dcm.mark(vol, off, length)
        # Past every number the SRL could have held beyond what survived.
        self.next_seq += self.srl.capacity // ENTRY_SPACE + 1
        self.seq_bound = self.next_seq
        note = "not closed cleanly: {} active region(s) of the activity " \
            "log are replayed to every link{}".format(
                len(regions), "" if corrupt is None else
                " (the SRL's tail was torn at entry {})".format(corrupt[0]))
        self.problems.append(note)
        log.warning("group %s: %s", self.name, note)
        # The record (links logging, the new numbers) before the log is
        # let go: a crash in between recovers again.
        self.persist()
        self.al.clear()

    def _add_link_object(self, index, rec, fresh):
        link = Link(self, index, rec)
        link.dcm = Dcm(self.files.dcm(index), self.granularity, self.sizes,
                       fresh_value=0 if fresh else None)
        # A link that held the SRL logs from here on when its DCM has bits
        # (written ahead, the DCM is the truth: the link was logging,
        # whatever the record says), when its DCM is unusable, or when a
        # replay was running (SRL_DCM).
        log_now = link.holds == SRL_DCM or (
            not fresh and link.holds == SRL and link.dcm.count() > 0)
        if link.dcm.problem:
            self.problems.append("link {}: {}".format(link.secondary,
                                                      link.dcm.problem))
            log_now = True
        if log_now and link.holds_srl:
            if not fresh:
                # Entries streamed but not acknowledged before the stop:
                # the DCM must cover them now that the link logs again.
                self._mark_pending(link, link.acked_pos,
                                   link.acked_seq + 1)
            link.transition("log")
        self.links.append(link)
        return link

    # Wiring.

    def attach(self):
        for vol, lu in enumerate(self.volumes):
            self.layers.append(ReplicationLayer(self, vol))
            lu.stack.set("replication", self.layers[-1])

    def detach(self):
        for lu, layer in zip(self.volumes, self.layers):
            lu.stack.remove("replication", layer)
        self.layers = []

    def start(self):
        for link in self.links:
            if link.attached and not link.stopped_error:
                link.start()

    def close(self):
        self.closed = True
        for link in self.links:
            link.stop()
        try:
            self.persist()
            saved = True
        except (OSError, errors.Error) as e:
            log.error("group %s: could not save its record: %s; its activity "
                      "log is kept, so the next start sends its regions "
                      "again", self.name, e)
            saved = False
        with self.lock:
            self.maps_closed = True
        for link in self.links:
            link.dcm.close()
            if link.take_map is not None:
                link.take_map.close()
        if self.since is not None:
            self.since.close()
        # Cleared only under a record that says where every change went: an
        # older one (a replay's start not saved, whose changes since went
        # to the SRL and not the DCM) needs the log's regions to find them.
        if saved:
            try:
                self.clear_activity_log()
            except (OSError, errors.Error) as e:
                log.error("group %s: could not clear its activity log: %s",
                          self.name, e)
        self.al.close()
        self.srl.close()
        for flusher in self._flushers.values():
            flusher.close()

    def clear_activity_log(self):
        """(Stop and close.)  Make every SRL entry and volume write durable
        and empty the activity log, so that a stop that ends in nbdkit's
        SIGKILL (it waits for connected clients) is not taken for a crash
        at the next start.  A write after this marks its region again."""
        with self.lock:
            if any(l.holds_srl for l in self.links):
                self.srl.sync()
            # Not before the volumes' writes in its regions are durable
            # (kept, the next start replays them, as after a crash).
            failed = self._volumes_durable(sorted({vol for vol, _, _ in
                                                   self.al.runs()}))
            if failed is None:
                self.al.clear()
            else:
                # The log is kept.  At a stop the links' DCMs are open
                # still: marked now, as a close after it flushes without
                # hearing of the failure.
                self._volume_flush_failed(*failed)

    def replay_view(self, vol):
        """(Under the lock.)  What a replay reads of volume vol: what its
        hosts read (through a volume change's view, copying nothing), or
        the volume below this group's layer."""
        change = self._volume_view(vol)
        if change is not None:
            return _Visible(change)
        return self.volumes[vol].stack.below("replication")

    def replay_hold(self, ending):
        """(Under the lock.)  Why no replay may read now (a volume change
        that has begun and not yet changed what hosts see: what is read
        before would miss it) or, when ending, end (also a volume change
        whose engine writes data hosts never see), or None."""
        if self.changes_starting:
            return self.changes_starting[0]
        if ending:
            for vol, lu in enumerate(self.volumes):
                change = self._volume_view(vol)
                if change is not None and change.hides_copies:
                    return "{} of {}".format(change.what, lu.name)
        return None

    # Persistence.

    def record(self):
        rec = dict(self.record_base)
        holders = [(l.acked_pos, l.acked_seq + 1) for l in self.links
                   if l.holds_srl]
        tail = min(holders) if holders else (self.srl.head_pos,
                                             self.next_seq)
        rec.update({"role": PRIMARY, "generation": self.generation,
                    "history": self.history, "next_seq": self.next_seq,
                    "seq_bound": self.seq_bound,
                    "tail": {"pos": tail[0], "seq": tail[1]},
                    "links": [l.record() for l in self.links],
                    "since_promotion": self.since is not None,
                    "since_base": self.since_base,
                    "since_maps": self.since_maps,
                    "after_split_brain": self.after_split_brain})
        return rec, {l: l.acked_pos for l in self.links}

    def persist(self, locked=False):
        """Save the record (link positions, next sequence number); then
        the SRL space before the saved positions may be reused."""
        # Lock order: the group lock, then persist_lock (taken before the
        # group lock is let go, so records are written in snapshot order).
        try:
            self._persist(locked)
        except _SrlSyncFailed as e:
            # Not saved: the positions would point past what is durable.
            if locked:
                self.srl_failed(e.__cause__)
            else:
                with self.lock:
                    self.srl_failed(e.__cause__)

    def _persist(self, locked):
        def snapshot():
            self.persist_lock.acquire()
            try:
                rec, saved = self.record()
                held = any(l.holds_srl for l in self.links)
                self.al.sweep()
                # The volumes written in the regions a next sweep may clear.
                swept = sorted({vol for vol, _, _ in self.al.runs()})
            except BaseException:
                # Released by the save below otherwise.
                self.persist_lock.release()
                raise
            return rec, saved, held, swept
        lost = None         # (vol, error, runs) of a volume flush failed
        if locked:
            rec, saved, held, swept = snapshot()
        else:
            with self.lock:
                rec, saved, held, swept = snapshot()
        try:
            # The SRL must hold every entry up to the positions saved.
            if held:
                try:
                    self.srl.sync()
                except OSError as e:
                    raise _SrlSyncFailed() from e
            # A region leaves the activity log at the next sweep: its
            # writes must be durable in the volumes too, or a power cut
            # could lose them here after a secondary applied them (and
            # the log's clear, written back early, would hide that).  Not
            # under the group lock (a volume's flush may take long with
            # much written, and every host write would wait): the regions
            # then stay until the next unlocked persist (a streaming link
            # makes one every PERSIST_INTERVAL): a superset meanwhile.
            failed = None if locked else self._volumes_durable(swept)
            durable = not locked and failed is None
            if failed is not None:
                # Its regions now, before a later persist may sweep them
                # (sweeps run under persist_lock).
                lost = failed + ([r for r in self.al.runs()
                                  if r[0] == failed[0]],)
            # Only a saved record lets the next sweep clear regions: one
            # that was not saved may still say a link logs to its DCM
            # while the writes since went to the SRL alone (a replay's
            # start), and then the log is all that remembers them.
            self.al.sweep_ok = False
            self.files.save(rec)
            self.al.sweep_ok = durable
            for link, pos in saved.items():
                link.saved_pos = pos
        finally:
            self.persist_lock.release()
            if lost is not None:
                # Even if the record was not saved.  (The group lock once
                # persist_lock is let go: lock order.)
                with self.lock:
                    self._volume_flush_failed(*lost)

    def _volumes_durable(self, vols):
        """Flush volumes vols below this group's layer; None, or (vol,
        error) of one that failed: their regions stay in the activity
        log."""
        for vol in vols:
            try:
                self._flusher(vol).flush()
            except OSError as e:
                return vol, e
        return None

    def _flusher(self, vol):
        flusher = self._flushers.get(vol)
        if flusher is None:
            below = self.volumes[vol].stack.below("replication")
            try:
                flusher = below.reopen()
            except OSError as e:
                log.warning("group %s: volume %s cannot be opened again (%s):"
                            " its flushes share the hosts' file", self.name,
                            self.volumes[vol].name, e)
                flusher = below
            self._flushers[vol] = flusher
        return flusher

    def volume_flush_failed(self, vol, exc):
        """A flush of volume vol failed: what it got since the last flush
        that succeeded (its activity log regions) may be lost here, and
        secondaries may have applied it.  Every link replays those
        regions, so each secondary gets what this volume holds (what its
        hosts read); the pages are dropped from the cache first, so the
        replay reads the disk."""
        with self.lock:
            self._volume_flush_failed(vol, exc)

    def _volume_flush_failed(self, vol, exc, runs=None):
        """(Under the lock.)  volume_flush_failed, for the regions runs
        (by default the activity log's now)."""
        if self.maps_closed:
            # Closed: the activity log keeps the regions for the next
            # start (clear_activity_log does not clear it then).
            log.error("group %s: flushing volume %s failed (%s) while the "
                      "group closes: its activity log is kept, and its "
                      "regions are replayed at the next start", self.name,
                      self.volumes[vol].name, exc)
            return
        if runs is None:
            runs = [r for r in self.al.runs() if r[0] == vol]
        msg = "flushing volume {} failed ({}): it may have lost writes its " \
            "secondaries have; its {} activity log region(s) are " \
            "replayed".format(self.volumes[vol].name, exc, len(runs))
        log.error("group %s: %s", self.name, msg)
        if not runs:
            return
        below = self.volumes[vol].stack.below("replication")
        for _, off, length in runs:
            below.forget(off, length)
        # Every link's marks first: one that fails stops no other's.
        for link in self.links:
            try:
                for r in runs:
                    link.dcm.mark(*r)
            except OSError as e:
                log.error("group %s: link %s: %s", self.name, link.secondary,
                          e)
                try:
                    link.dcm.mark_all()
                except OSError:
                    pass    # logged above: this DCM itself is failing
        for link in self.links:
            if link.holds_srl:
                link.error = msg
                try:
                    self.to_logging(link)
                except OSError as e:
                    log.error("group %s: link %s: %s", self.name,
                              link.secondary, e)

    # Data path.

    def change(self, vol, kind, offset, length, data, apply):
        sync_links = None
        with self.lock:
            seq = self.next_seq
            self.next_seq = seq + 1
            logged = False
            try:
                for link in self.links:
                    if link.logging:
                        link.dcm.mark(vol, offset, length)
                if self.since is not None:
                    self.since.mark(vol, offset, length)
                for link in self.links:
                    if link.take_map is not None:
                        self._mark_take(link, vol, offset, length)
                if any(l.holds_srl for l in self.links):
                    self._make_room(Srl.space(length, kind), vol, offset,
                                    length)
                if any(l.holds_srl for l in self.links):
                    self.al.mark(vol, offset, length)
                    payload = data if kind == WRITE else None
                    try:
                        self.srl.append(seq, vol, kind, offset, length,
                                        payload,
                                        entry_crc(seq, vol, kind, offset,
                                                  length, payload))
                        logged = True
                    except OSError as e:
                        self.srl_failed(e, (vol, offset, length))
            except BaseException:
                # A map could not be written: the change is refused before
                # it is made, and its number was never logged -- giving it
                # out again keeps the SRL free of gaps (a scan stops at one).
                self.next_seq = seq
                raise
            if logged:
                sync_links = [l for l in self.links if l.sync_waits]
            elif seq >= self.seq_bound:
                # An unlogged number: reserve the next ones durably first.
                bound = self.seq_bound
                self._recorded(
                    lambda: setattr(self, "seq_bound", seq + SEQ_RESERVE),
                    lambda: setattr(self, "seq_bound", bound))
            try:
                apply()
                for link in self.links:
                    if link.take_noted is not None:
                        self._note_take(link, vol, offset, length)
            except OSError as e:
                if logged:
                    # The secondaries would apply what the volume refused:
                    # they get the region's real content by a replay.
                    self._all_to_dcm(
                        "a write to volume {} failed after it was logged "
                        "({}); the region is replayed".format(
                            self.volumes[vol].name, e), (vol, offset, length))
                    sync_links = None
                raise
            if self.waiters:
                self.cond.feed.notify_all()
        if sync_links:
            for link in sync_links:
                link.wait_ack(seq)

    def flush_log(self):
        """A host flush (or FUA write): the SRL is made durable, and so is
        every change before it on each sync link's secondary (which has
        them applied, not necessarily durable: module notes)."""
        with self.lock:
            dirty = self.srl.dirty
            seq = self.next_seq - 1
            sync_links = [l for l in self.links
                          if l.sync_waits and l.acked_seq < seq]
        if dirty:
            try:
                self.srl.sync()
            except OSError as e:
                with self.lock:
                    self.srl_failed(e)
        for link in sync_links:
            link.wait_ack(seq, durable=True)

    def srl_failed(self, e, change=None):
        """(Under the lock.)  The SRL cannot be read, written or made
        durable: every link that holds it switches to DCM logging with what
        it has not acknowledged (and the change that failed to be logged),
        so the host write or flush goes on and nothing is lost for
        replication; the links replay once the SRL works again (after
        SRL_RETRY)."""
        self.srl_failed_at = time.monotonic()
        self._all_to_dcm("the SRL failed ({}); changes are tracked in the "
                         "DCM and replayed when it works again".format(e),
                         change)

    def _all_to_dcm(self, msg, change=None):
        """(Under the lock.)  Every link that holds the SRL switches to DCM
        logging with what it has not acknowledged and `change`; saved
        without syncing the SRL."""
        log.error("group %s: %s", self.name, msg)
        for link in self.links:
            if not link.holds_srl:
                continue
            try:
                self._mark_pending(link, link.acked_pos, link.acked_seq + 1)
            except OSError:
                link.dcm.mark_all()
            if change is not None:
                link.dcm.mark(*change)
            link.error = msg
            self._stop_holding(link)
        # No link holds the SRL now: the record is saved without syncing it.
        self.persist(locked=True)

    def _tail(self):
        holders = [l.saved_pos for l in self.links if l.holds_srl]
        return min(holders) if holders else self.srl.head_pos

    def _fits(self, need):
        return self.srl.end_after(self.srl.head_pos, need) - self._tail() \
            <= self.srl.capacity

    def _make_room(self, need, vol, offset, length):
        """Called under the lock before an append: reclaim acknowledged
        space, else switch the links that hold it the longest to DCM
        logging (and mark this change for them)."""
        if self._fits(need):
            return
        self.persist(locked=True)
        while not self._fits(need):
            holders = [l for l in self.links if l.holds_srl]
            if not holders:
                return
            link = min(holders, key=lambda l: l.saved_pos)
            log.warning("group %s: the SRL is full; link %s switches to DCM "
                        "logging", self.name, link.secondary)
            link.error = "the SRL overflowed (the link could not keep up); " \
                "changes are tracked in the DCM and replayed"
            self.to_logging(link)
            link.dcm.mark(vol, offset, length)
            self.persist(locked=True)

    def _mark_pending(self, link, from_pos, seq):
        """Mark the SRL entries from from_pos (sequence number seq) to the
        head in link's DCM."""
        pos = from_pos
        while pos < self.srl.head_pos:
            e = self.srl.read(pos, with_data=False)
            if e is None or e[0] != seq:
                break
            seq += 1
            vol, kind, off, length = e[1:5]
            if vol < len(self.sizes) and 0 <= off and \
                    off + length <= self.sizes[vol]:
                link.dcm.mark(vol, off, length)
            else:
                # An entry too damaged to say what it changed.
                link.dcm.mark_all()
                break
            pos = e[7]
        if pos < self.srl.head_pos:
            link.dcm.mark_all()

    def to_logging(self, link):
        """(Under the lock.)  The link stops holding the SRL: what it has
        not acknowledged goes into its DCM, and changes are marked there
        from now on."""
        if link.logging:
            return
        if link.holds_srl:
            self._mark_pending(link, link.acked_pos, link.acked_seq + 1)
        self._stop_holding(link)
        # Saved now: a record that still says the link streams would,
        # after a crash, ignore the DCM bits set from here on.
        self.persist(locked=True)

    def _stop_holding(self, link):
        link.transition("log")
        link.kept_stream = False
        link.epoch += 1
        self.cond.notify_all()

    def replay_join(self, link):
        """(Under the lock.)  The link joins the SRL stream at its head; the
        DCM is static from here on (module notes)."""
        link.transition("replay")
        link.kept_stream = False
        link.acked_pos = link.saved_pos = self.srl.head_pos
        link.acked_seq = self.next_seq - 1
        # Changes are logged again from here on: no number above next_seq
        # was handed out unlogged (the caller saves this).
        self.seq_bound = self.next_seq
        link.last_sent_seq = link.acked_seq
        link.batches = []
        link.epoch += 1

    def skip_applied(self, pos, applied):
        if not applied:
            return pos
        while pos < self.srl.head_pos:
            e = self.srl.read(pos, with_data=False)
            if e is None or e[0] > applied:
                break
            pos = e[7]
        return pos

    # Links and the handshake.

    def hello(self):
        """What a link tells its secondary once both proved the token."""
        return {"group": self.name,
                "granularity": self.granularity,
                "volumes": [{"lu": lu.name, "size": lu.size}
                            for lu in self.volumes],
                "generation": self.generation, "history": self.history,
                "last_seq": self.next_seq - 1,
                "after_split_brain": self.after_split_brain}

    def accept_secondary(self, link, reply):
        """Decide, from the secondary's handshake reply, how the link goes
        on: stream from its position, or replay its DCM.  False (with the
        link's state set) when replication must not start."""
        theirs = peer_history(reply.get("history"))
        their_last = peer_seq(reply.get("last_seq"), "last update")
        applied = peer_seq(reply.get("applied_seq"), "applied update")
        with self.cond:
            link.batches = []
            link.stream_from = None
            link.pull = None
            link.split_brain = None     # set again if it still is one
            # (A node that is itself primary refuses the hello instead.)
            diverged, common = False, 0
            if theirs:
                diverged, common = history_diverges(
                    self.history, self.next_seq - 1, theirs, their_last)
            same_line = bool(theirs) and theirs[-1][0] == self.generation
            reported = reply.get("diverged") or reply.get("diverged_all")
            if link.replay_cleared and link.seeded and theirs:
                self._check_replay_synced(link, reply)
            if theirs and (diverged or not same_line or reported):
                # Another line of history, or regions the secondary changed
                # on its own (it was a primary, or was restored while
                # detached): the union of what each side changed since the
                # two last agreed is copied.
                if link.holds_srl:
                    self.to_logging(link)
                own = self._own_changes(link, theirs, common)
                peer = self._peer_changes(link, reply, theirs, common)
                image = self._image_changes(link, reply, theirs, common)
                if image is not None:
                    # Whichever pair copies less.
                    mine = bytearray(a | b for a, b in zip(own, image[1]))
                    if sum(a | b for a, b in zip(mine, image[0])) < \
                            sum(a | b for a, b in zip(own, peer)):
                        own, peer = mine, image[0]
                if diverged and not self._resolve_split_brain(
                        link, own, peer, theirs, common):
                    return False
                link.dcm.replace(bytearray(a | b for a, b in zip(own, peer)))
                link.seeded = True
            elif not link.seeded or not theirs:
                # First contact (or a secondary that knows nothing of the
                # group): what may differ?
                if not (same_line and reply.get("consistent") and
                        link.holds_srl and
                        applied >= link.acked_seq):
                    if link.holds_srl:
                        self.to_logging(link)
                    link.dcm.mark_all()
                link.seeded = True
            elif link.holds == SRL_DCM:
                # A replay broke off (it had joined the stream; the
                # secondary may not have begun it): the DCM keeps what the
                # secondary has not made durable of it, the stream from
                # acked_pos what it has not acknowledged.  Replay those.
                # A secondary without RSYN: as before, everything if it
                # lost updates it had acknowledged.
                if not reply.get("replay_sync") and \
                        applied < link.acked_seq:
                    link.dcm.mark_all()
                self.to_logging(link)
            elif link.holds_srl:
                if applied < link.acked_seq or not reply.get("consistent"):
                    # It lost updates it had acknowledged, or a replay was
                    # broken off there: replay (everything, if lost).
                    if applied < link.acked_seq:
                        link.dcm.mark_all()
                    self.to_logging(link)
            if not diverged:
                # The secondary has taken this side's history (a replay
                # began there): a choice to discard its changes is used,
                # and a take cut off is over (what it had not taken was
                # discarded).  Until then they hold, across lost
                # connections.
                link.discard_secondary = False
                self.take_over(link)
            if link.logging:
                link.transition("await-replay")
        self.persist()
        return True

    def _check_replay_synced(self, link, reply):
        """(Under the lock.)  The link cleared regions of a replay from
        its DCM up to RSYN replay_cleared, each once the secondary had
        made them durable and recorded the RSYN's id.  A secondary that
        reports an older id (or none: it does not answer RSYN) went back
        to an earlier state since (a restored snapshot of the node): the
        cleared regions may be missing there, and the whole DCM is copied
        again."""
        synced = peer_seq(reply.get("replay_synced"), "replay sync") \
            if reply.get("replay_sync") else 0
        if synced >= link.replay_cleared:
            return
        log.warning("group %s: %s reports replay data up to request %#x "
                    "durable, but this node cleared up to %#x: it lost "
                    "replayed data; every extent is copied again",
                    self.name, link.secondary, synced, link.replay_cleared)
        if link.holds_srl:
            self.to_logging(link)
        link.dcm.mark_all()
        link.replay_cleared = 0

    def _all_extents(self, link):
        return bytearray(b"\x01") * link.dcm.extents

    def _own_changes(self, link, theirs, common):
        """(Under the lock; the link logs.)  One byte per extent: what this
        node changed since it last agreed with the secondary (history
        theirs; update `common` of their last shared generation): the
        smallest of the maps that reach back to that point."""
        shared = common_prefix(self.history, theirs)
        if shared == 0:
            return self._all_extents(link)
        found = []
        if shared == len(self.history) and link.seeded:
            # The secondary left this node's generation (or is on it): the
            # link's DCM holds what it lacks since it last agreed.
            found.append(bytearray(link.dcm.bits))
        if self.since is not None:
            # This node branched off (its promotion) after that point.
            since = bytearray(a | b for a, b in zip(link.dcm.bits,
                                                    self.since.bits))
            candidates = [(m.get("base"), m.get("runs") or [])
                          for m in self.since_maps]
            if self.since_base is not None:
                candidates.append((self.since_base, []))
            for base, runs in candidates:
                if map_covers(base, self.history, theirs, common):
                    bits = bytearray(since)
                    self._set_runs(link, bits, runs)
                    found.append(bits)
        if not found:
            return self._all_extents(link)
        return min(found, key=lambda b: b.count(1))

    def _set_runs(self, link, bits, runs):
        """Set in bits the extents of runs [vol, offset, length] (a
        peer's: each is cut to its volume, as a map has one byte per
        extent of the volumes and no more)."""
        for vol, off, length in runs:
            if 0 <= vol < len(self.sizes):
                end = min(off + length, self.sizes[vol])
                off = max(off, 0)
                if end > off:
                    maps.set_range(bits, *link.dcm.range_of(vol, off,
                                                            end - off))

    def _peer_changes(self, link, reply, theirs, common):
        """One byte per extent: what the secondary changed on its own since
        the two last agreed, as it reports: the smallest of its maps that
        reach back to that point (everything, when none does)."""
        if reply.get("diverged_all"):
            return self._all_extents(link)
        candidates = [(reply.get("base"), reply.get("diverged") or [])] + \
            [(m.get("base"), m.get("runs") or [])
             for m in reply.get("diverged_maps") or []
             if isinstance(m, dict)]
        found = []
        for base, runs in candidates:
            if map_covers(base, self.history, theirs, common):
                bits = bytearray(link.dcm.extents)
                self._set_runs(link, bits, runs)
                found.append(bits)
        if not found:
            return self._all_extents(link)
        return min(found, key=lambda b: b.count(1))

    def _image_changes(self, link, reply, theirs, common):
        """(Under the lock.)  This node was promoted from a secondary
        rolled back to its last consistent image (the since map tagged
        with the image's id, volume_rolled_back), and the other node
        replayed over that image as a primary: its map of that image (its
        DCM then) holds every region where it differs from the image
        except those written here over the image, which the rollbacks
        took back and this node's map of the image holds with what it
        changed since.  (the other node's bits, this node's bits), which
        together hold every region where the two differ; None when no
        map of the other node is of an image this node rolled back to.
        The regions the rollbacks took back count on both sides: the
        other node changed some of them, and which is not known (counted
        on one side only, a split-brain policy could discard its changes
        as if it had made none)."""
        if self.since is None:
            return None
        mine = {m["image"]: m for m in self.since_maps if m.get("image")}
        found = []
        for m in reply.get("diverged_image_maps") or []:
            image = m.get("image") if isinstance(m, dict) else None
            if not isinstance(image, str) or image not in mine or \
                    not map_covers(m.get("base"), self.history, theirs,
                                   common):
                continue
            back = mine[image].get("runs") or []
            peer = bytearray(link.dcm.extents)
            self._set_runs(link, peer, (m.get("runs") or []) + back)
            own = bytearray(self.since.bits)
            self._set_runs(link, own, back)
            found.append((peer, own))
        if not found:
            return None
        return min(found, key=lambda p: sum(a | b for a, b in zip(*p)))

    def _bytes(self, link, bits):
        return sum(n for _, _, n in link.dcm.runs(bits))

    def _resolve_split_brain(self, link, own, peer, theirs, common):
        """(Under the lock.)  The secondary wrote after the two last
        agreed.  True when the link goes on (this node's data wins; with
        link.pull set, the secondary's changes are taken first), False
        when it waits for the admin (the link is diverged, and says what
        each side changed)."""
        sides = {"primary": {"extents": own.count(1),
                             "bytes": self._bytes(link, own)},
                 "secondary": {"extents": peer.count(1),
                               "bytes": self._bytes(link, peer)}}
        what = "this node changed {} extent(s) ({} bytes) and {} changed " \
            "{} extent(s) ({} bytes) on its own".format(
                sides["primary"]["extents"], sides["primary"]["bytes"],
                link.secondary, sides["secondary"]["extents"],
                sides["secondary"]["bytes"])
        policy = self.after_split_brain
        shared = theirs[common_prefix(self.history, theirs) - 1][0]
        if link.discard_secondary or policy == DISCARD_SECONDARY:
            how = "--discard-secondary-changes" if link.discard_secondary \
                else "policy " + policy
            log.warning("group %s: split brain with %s resolved (%s): %s; "
                        "this node's data wins", self.name, link.secondary,
                        how, what)
            # A take cut off before is given up: the secondary gets this
            # side's data everywhere.
            self.take_over(link)
            return True
        if policy == DISCARD_ZERO_CHANGES:
            if not any(peer):
                self.take_over(link)
                return True
            # Only the secondary changed something (or this node changed
            # only regions of a take that was cut off): take its changes.
            if not any(own) or (link.pulling and all(
                    p or not o for o, p in zip(own, peer))):
                log.warning("group %s: split brain with %s resolved (policy "
                            "%s): %s; its changes are taken", self.name,
                            link.secondary, policy, what)
                if link.pulling and link.pull_left is not None:
                    # A take cut off goes on with what it had not taken
                    # (a region taken holds its data, maybe newer host
                    # writes too), unless hosts changed a region it had
                    # not taken before this process began (its take map):
                    # their bytes are not known, so that region was
                    # changed on both sides.
                    pull = None if link.take_changed_before else \
                        [list(r) for r in link.pull_left]
                else:
                    pull = [list(r) for r in link.dcm.runs(peer)]
                    link.pull_left = collections.deque(
                        list(r) for r in pull)
                    self._note_takes(link, pull, 0)
                if pull is not None:
                    link.pulling, link.pull = True, pull
                    return True
        link.transition("diverge")
        link.split_brain = dict(sides, common=[shared, common],
                                policy=policy)
        link.error = (
            "split brain: since the two last agreed (generation {}, update "
            "{}), {}; nothing is sent (policy {}) until you choose: "
            "`clonectl rsg attach {} --secondary {} "
            "--discard-secondary-changes` makes this node win (only those "
            "regions are copied), or demote this node".format(
                shared, common, what, policy, self.name, link.secondary))
        link.refused = link.error
        return False

    def _note_takes(self, link, runs, fill):
        """(Under the lock, or loading.)  From now until link's take of
        runs is over (or they are recorded as taken), the host changes of
        those regions are noted: their bytes in memory (link.take_noted),
        so that the take keeps them across lost connections, and their
        extents durably before they are made (link.take_map: made anew
        with every extent fill, 0 for a new take, 1 for a lost map; None
        to keep it), so that a take resumed after a crash knows where
        they were."""
        link.take_regions = _per_volume(runs)
        link.take_noted = {}
        if link.take_map is not None:
            link.take_map.close()
        link.take_map = Dcm(self.files.take_map(link.index),
                            self.granularity, self.sizes, fresh_value=fill)
        link.take_changed_before = False

    def _resume_take(self, link):
        """(Loading.)  Link's take was cut off by a stop or a crash: did
        hosts change a region it had not taken?  A lost or unreadable
        take map says they may have, until the admin decides."""
        lost = not os.path.exists(self.files.take_map(link.index))
        self._note_takes(link, link.pull_left, 1 if lost else None)
        bits = link.take_map.bits
        link.take_changed_before = any(
            any(bits[slice(*link.take_map.range_of(*r))])
            for r in link.pull_left)

    def _host_change_of_take(self, link, vol, offset, length):
        """(Under the lock.)  The parts of a change that are a host's in
        a region of link's take not recorded as taken."""
        regions = link.take_regions.get(vol)
        if not regions or getattr(self._take_writer, "on", False):
            return []
        return overlap(regions, offset, offset + length)

    def _mark_take(self, link, vol, offset, length):
        """(Under the lock, before a change is made.)"""
        if self._host_change_of_take(link, vol, offset, length):
            link.take_map.mark(vol, offset, length)

    def _note_take(self, link, vol, offset, length):
        """(Under the lock, once a change was made.)"""
        found = self._host_change_of_take(link, vol, offset, length)
        if found:
            notes = link.take_noted.setdefault(vol, [])
            notes.extend(found)
            if len(notes) % 4096 == 0:
                # Kept short under writes to the same places.
                notes[:] = merged(notes)

    def take_recorded(self, link, regions):
        """(Under the lock.)  regions ([vol, offset, length]) are taken
        durably, data and a saved record: hosts changing them now change
        what the take wrote, and need no noting."""
        for vol, off, length in regions:
            if vol in link.take_regions:
                link.take_regions[vol] = without(link.take_regions[vol],
                                                 off, off + length)
            if vol in link.take_noted:
                link.take_noted[vol] = without(link.take_noted[vol], off,
                                               off + length)

    def take_over(self, link):
        """(Under the lock.)  Link's take is over (done, or given up), as
        the record says or will say: its notes and take map go."""
        link.pulling, link.pull_left = False, None
        link.take_noted, link.take_regions = None, {}
        link.take_changed_before = False
        if link.take_map is not None:
            link.take_map.close()
            link.take_map = None
            self.files.remove([self.files.take_map(link.index)])

    def _take_written(self, link, vol, a, b):
        """The parts of [a, b) of volume vol that hosts changed since
        link's take was decided."""
        with self.cond:
            return [(max(s, a), min(e, b))
                    for s, e in link.take_noted.get(vol, ())
                    if s < b and e > a]

    @contextlib.contextmanager
    def taking(self, link, runs):
        """While a secondary's changes runs ([vol, offset, length]) are
        taken over link: each volume written has a TakeGuard (module
        notes)."""
        guards = {vol: TakeGuard(regions, functools.partial(
            self._take_written, link, vol),
            self.volumes[vol].stack.below("guard"))
            for vol, regions in _per_volume(runs).items()}
        with self.cond:
            # A restore or reverse sync writes below the guards: neither
            # runs beside a take (begin_volume_change refuses too).
            if self.changes_starting or any(
                    self._volume_view(vol) is not None for vol in guards):
                raise ReplicationError(
                    name=self.name, reason="a restore or reverse sync of a "
                    "volume runs; the secondary's changes are taken once it "
                    "has finished")
            self.take_guards = guards
        installed = []
        try:
            for vol, guard in guards.items():
                self.volumes[vol].stack.set("guard", guard)
                installed.append(vol)
            yield
        finally:
            with self.cond:
                self.take_guards = {}
            for vol in installed:
                self.volumes[vol].stack.remove("guard", guards[vol])

    def take_changes(self, vol, offset, data):
        """A region taken from a secondary (link.pull): written below its
        volume's TakeGuard as a host write would be, so every link and
        map sees it, with what hosts wrote there meanwhile on top."""
        guard = self.take_guards.get(vol)
        if guard is None:
            raise errors.ProtocolError(reason="the secondary sent data of "
                                       "volume {}, which was not asked for"
                                       .format(vol))
        self._take_writer.on = True
        try:
            guard.take(bytes(data), offset)
        finally:
            self._take_writer.on = False

    def changes_since_agreement(self):
        """(Demote, under the lock, every link logging.)  What this node
        changed that another node may lack, for the secondary record:
        {"runs", "all", "base", "maps"}: runs holds every change of this
        node since base ([generation, seq]; None: unknown), and each of
        maps ({"base", "runs"}) the same since a later point, so that a
        node that agreed with this one later gets less copied.  The first
        is the since-promotion map (for a node never promoted: the union
        of its links' DCMs, since the oldest point a link's secondary
        agreed); then the maps kept from before the promotion, and each
        seeded link's DCM since its secondary last agreed."""
        def runs_of(bits):
            return [list(r) for r in Dcm.runs_of(bits, self.granularity,
                                                 self.sizes)]
        extents = sum(maps.extent_count(n, self.granularity)
                      for n in self.sizes)
        seeded = [l for l in self.links if l.seeded]
        links = [{"base": [self.generation, l.acked_seq],
                  "runs": runs_of(l.dcm.bits)} for l in seeded]
        # A link whose replays broke off over its secondary's last
        # consistent image: its DCM since that image, which holds every
        # change since only with what the replays wrote there (that
        # secondary alone has it, once rolled back: _image_changes).
        images = [{"base": l.replay_image["base"], "image":
                   l.replay_image["id"], "runs": runs_of(l.dcm.bits)}
                  for l in seeded if l.replay_image]
        if self.since is not None:
            since = self.since.bits
            found = [{"base": self.since_base, "runs": runs_of(since)}] \
                if self.since_base is not None else []
            for m in self.since_maps:
                bits = bytearray(since)
                for vol, off, length in m.get("runs") or []:
                    maps.set_range(bits, *self.since.range_of(vol, off,
                                                              length))
                found.append({"base": m.get("base"), "runs": runs_of(bits)})
            if not found:
                # A record older than the bases: since when is unknown.
                found = [{"base": None, "runs": runs_of(since)}]
            top, narrower = found[0], found[1:] + links
        else:
            narrower = links
            bits = bytearray(extents)
            for link in self.links:
                bits = bytearray(a | b for a, b in zip(bits, link.dcm.bits))
            top = {"runs": runs_of(bits), "base":
                   [self.generation, min(l.acked_seq for l in seeded)]
                   if seeded else None}
        return dict(top, all=False, maps=narrower, image_maps=images)

    def _recorded(self, change, undo):
        """(Under the lock.)  A change of the group (an admin's, a
        reservation of write numbers): made, then recorded before the lock
        is let go, and undone when the record cannot be saved.  Nothing
        acts meanwhile on what the record may never hold, and the error is
        the whole truth: the group runs as its record says, now and after
        a restart."""
        change()
        try:
            self.persist(locked=True)
        except BaseException:
            undo()
            raise

    def set_split_brain_policy(self, policy):
        policy = check_split_brain_policy(policy)
        with self.cond:
            before = self.after_split_brain
            self._recorded(lambda: setattr(self, "after_split_brain", policy),
                           lambda: setattr(self, "after_split_brain", before))

    def add_link(self, secondary, mode, token_file, tls_certificates=None,
                 replay_rate=None):
        if any(l.secondary == secondary for l in self.links):
            raise ReplicationError(name=self.name, reason="it already has a "
                                   "link to {}".format(secondary))
        with self.cond:
            index = max([l.index for l in self.links] + [-1]) + 1
            rec = {"secondary": secondary, "mode": mode,
                   "token_file": token_file,
                   "tls_certificates": tls_certificates, "attached": True,
                   "dcm_active": True, "seeded": False,
                   "replay_rate": replay_rate}
            made = []

            def forget():
                link = made.pop()
                self.links.remove(link)
                link.dcm.close()
                self.files.remove([self.files.dcm(index)])
            self._recorded(
                lambda: made.append(self._add_link_object(index, rec,
                                                          fresh=True)),
                forget)
        link, = made
        link.start()
        return link

    def remove_link(self, link):
        link.stop()
        with self.cond:
            if link not in self.links:
                raise ReplicationError(
                    name=self.name, reason="its link to {} is being removed "
                    "already".format(link.secondary))
            at = self.links.index(link)
            try:
                self._recorded(lambda: self.links.remove(link),
                               lambda: self.links.insert(at, link))
            except BaseException:
                # Still linked, as the record says: it goes on from where
                # it stopped (its change map was kept meanwhile).
                link.start()
                raise
        # Stopped again: a removal that failed beside this one may have
        # started it after this one stopped it.
        link.stop()
        link.dcm.close()
        if link.take_map is not None:
            link.take_map.close()
        self.files.remove([self.files.dcm(link.index),
                           self.files.take_map(link.index)])

    def link(self, secondary):
        for l in self.links:
            if l.secondary == secondary:
                return l
        raise ReplicationError(name=self.name, reason="no link to {}"
                               .format(secondary))

    def detach_link(self, link):
        link.stop()
        try:
            with self.cond:
                link.transition("detach")
                self.to_logging(link)
                link.error = None
            self.persist()
        except BaseException:
            # Not saved (a full state directory): the link stays attached,
            # as the record says; it logs to its DCM now and replays it.
            with self.cond:
                link.transition("attach")
            link.start()
            raise

    def attach_link(self, link, discard_secondary=False, replay_rate=None):
        """Start link again (a link that is not detached reconnects: a
        running replay resumes); replay_rate: bytes per second of its
        replays, 0 for no limit, None to keep it."""
        fields = ("stopped_error", "discard_secondary", "error",
                  "replay_rate")
        with self.cond:
            before = {f: getattr(link, f) for f in fields}
            if replay_rate is not None:
                link.replay_rate = replay_rate or None
            # A detached link is attached in the record saved next; any
            # other link takes the new state once that record is saved.
            was_detached = link.state == DETACHED
            if was_detached:
                link.transition("attach")
            link.stopped_error = None
            link.discard_secondary = bool(discard_secondary)
            link.error = None
        try:
            self.persist()
        except BaseException:
            # Not saved (a full state directory): as the record says.
            with self.cond:
                for f, v in before.items():
                    setattr(link, f, v)
                if was_detached:
                    link.transition("detach")
            raise
        with self.cond:
            if not was_detached:
                link.transition("attach")
        link.start()

    def begin_volume_change(self, vol, region_bits, granularity, what):
        """Before a volume-changing operation on volume vol changes
        anything (module notes): its region map is in every DCM, durably;
        a link that streams begins a replay of it at its stream's position
        (it keeps streaming: sync writes go on waiting for it), a replay
        that runs starts its pass again from where its stream is, with
        them; any other link logs, and replays them when it can."""
        reason = "{} of {}".format(what, self.volumes[vol].name)
        with self.cond:
            if self.take_guards:
                raise ReplicationError(
                    name=self.name, reason="it is taking a secondary's "
                    "changes (a split brain, policy discard-zero-changes); "
                    "try again once that has finished")
            self.changes_starting.append(reason)
            try:
                self._begin_volume_change(vol, region_bits, granularity,
                                          reason)
            except BaseException:
                self.changes_starting.remove(reason)
                self.cond.notify_all()
                raise
        return reason

    def _begin_volume_change(self, vol, region_bits, granularity, reason):
        """(Under the lock.)  The operation's regions go, durably, into
        every map a host write's extents go into: each link's DCM and, on
        a promoted node, the since map.  Its engine copies them long
        after hosts read them changed: a demotion meanwhile must report
        them all (the copies after it pass no replication layer), and a
        link made meanwhile must copy them (its DCM starts empty)."""
        if self.since is not None:
            self.since.merge(vol, region_bits, granularity)
        for link in self.links:
            link.dcm.merge(vol, region_bits, granularity)
            if link.state == REPLICATING:
                link.transition("extend")
                link.kept_stream = True
                link.epoch += 1
            elif link.state == DCM_REPLAY:
                # Its pass reads a DCM that was static: a new pass (the
                # clears of the old one's regions are dropped).
                link.epoch += 1
            else:
                self.to_logging(link)
            link.replay_reason = reason
        self.cond.notify_all()
        # The record says which links replay before the operation changes
        # anything.
        self.persist(locked=True)

    def end_volume_change(self, reason):
        """The operation begun with reason (begin_volume_change) has
        changed what hosts see, or was refused: replays read again."""
        with self.cond:
            self.changes_starting.remove(reason)
            self.cond.notify_all()

    def status(self):
        with self.lock:
            used = self.srl.head_pos - min(
                [l.acked_pos for l in self.links if l.holds_srl] +
                [self.srl.head_pos])
            return {"name": self.name, "role": PRIMARY,
                    "generation": self.generation, "history": self.history,
                    "granularity": self.granularity,
                    "volumes": [{"lu": lu.name, "size": lu.size}
                                for lu in self.volumes],
                    "last_seq": self.next_seq - 1,
                    "after_split_brain": self.after_split_brain,
                    "srl": {"size": self.srl.capacity, "used": used,
                            "used_percent": round(100.0 * used /
                                                  self.srl.capacity, 1)},
                    "activity_log_regions": self.al.count(),
                    "links": [l.status() for l in self.links],
                    "problems": self.problems}


def _per_volume(runs):
    """runs [vol, offset, length] as {vol: [(start, end)]}, sorted and
    disjoint."""
    per_vol = {}
    for vol, off, length in runs:
        per_vol.setdefault(vol, []).append((off, off + length))
    return {vol: merged(r) for vol, r in per_vol.items()}
