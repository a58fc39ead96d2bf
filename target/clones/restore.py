"""Protected restore and copy on demand.

Design notes
------------
The clone is never written by the restore; the engine copies Clone ->
Source the extents set in the clone's Delta Map and not in the Protected
Restore Map (PRM).  A host read or write of the Source (or a write to the
restoring clone's export) that touches such an extent first has it copied
(copy on demand, COD) by the requesting thread.  The COD scoreboard (one
byte per extent) says which extents are being copied right now, by the
engine or by a COD: an extent is claimed in it under the group lock, so it
is never copied twice, and a request waiting for extents claimed by someone
else waits on the group's condition until *its* extents are done (the COD
queue).  While an extent is copied nobody reads or writes it on either
side; afterwards no lock is needed, because the extent is never copied
again.

Host writes to the Source, and writes to the restoring clone's export, set
PRM bits before their data is written; the PRM is made durable at every
flush, FUA write and commit, so a flushed host write is never overwritten by
a resumed restore.  Each PRM save flushes the Source first: a bit set for an
extent copied on demand vouches for the copy (data durable before the map
that vouches for it, target.changemap).  When no extent is left to copy,
the PRM becomes the clone's Delta Map and the clone stays fractured.

A reverse sync and a restore both change the Source: the siblings' bits
for the extents about to change are set first (`_prepare_restore`), and
siblings must not be mirrored then.  Both change what hosts read at once
(the clone's data), with no write in flight (`_switch_quiesced`): a write
that entered before lands before the switch, one that arrives during it
waits and then copies on demand first (it checked for a restore before
one began, `_begin`).  A caller that took the restore's extents before
it started it (a replicated Source's links replay exactly those) gets
exactly those restored: a write since then counts as made after the
restore began, protected in the PRM (`_protect_later`).  `visible_read`
reads what hosts read without copying anything (a replicated Source's
replay reads under its group's lock, which a copy's write takes).  See
docs/design.md and docs/persistence.md (the PRM file).
"""

import collections
import logging
import os
import time

from .. import copier, errors, maps
from .model import MIRRORED, RESTORING, SiblingsMirrored

log = logging.getLogger("clonectl.clones")


class CodStats:
    """Copy-on-demand counters: how often and how long hosts waited."""

    def __init__(self):
        self.requests = 0
        self.extents = 0
        self.queued = 0
        self.waits = collections.deque(maxlen=4096)

    def record(self, seconds, extents):
        self.requests += 1
        self.extents += extents
        self.waits.append(seconds)

    def to_dict(self):
        waits = sorted(self.waits)

        def pct(p):
            if not waits:
                return None
            return round(waits[min(len(waits) - 1, int(p * len(waits)))] * 1e3,
                         3)
        return {"cod_requests": self.requests, "cod_extents": self.extents,
                "cod_queue_depth": self.queued, "cod_wait_p50_ms": pct(0.5),
                "cod_wait_p99_ms": pct(0.99)}


def runs_of(extents):
    """Sorted extent numbers -> [(start, end)) runs of consecutive ones."""
    out = []
    for e in extents:
        if out and out[-1][1] == e:
            out[-1][1] = e + 1
        else:
            out.append([e, e + 1])
    return [tuple(r) for r in out]


class Restore:
    """CloneGroup's protected restore (a part of CloneGroup,
    target.clones.group)."""

    def _recover_restore(self, clone, problems):
        self.restoring = clone
        try:
            self.prm = maps.load(self.prm_file.path, self.granularity,
                                 self.extents, with_crc=False)
            self.prm_file.reset(self.prm)
        except maps.MapCorrupt as e:
            # Without the PRM we cannot tell which extents hosts wrote:
            # copying would overwrite them.  Stop and say so.
            msg = "{}; the restore cannot continue safely and is paused " \
                  "(the Source holds a partial restore): `clone restore " \
                  "{} --full` restores every extent again".format(
                      e, clone.name)
            problems.append((clone.name, msg))
            clone.error = msg
            clone.paused = True
            self.prm = bytearray(b"\x01" * self.extents)
            self.prm_lost = True

    def check_restore(self, name, full=False):
        """Refuse, changing nothing, a restore from clone name that
        start_restore would refuse now: asked before a replicated Source's
        links are made to replay the restore's regions."""
        clone = self.clones[name]
        self._check_restorable(clone)
        with self.cond:
            self._restore_checks(clone, full)

    def _restore_checks(self, clone, full):
        """(Under cond.)"""
        self._check(clone, "restore")
        self._check_group_idle(clone, "restore")
        self._check_siblings_split(clone, "restore")
        if clone.state == RESTORING and self.prm_lost and not full:
            # Resumed with every extent protected, it would copy nothing
            # and call the Source restored.
            raise errors.InvalidArgument(
                reason="the restore of source {!r} from clone {!r} lost its "
                "record of the extents hosts wrote since it began, so it "
                "cannot tell them from the extents still to restore; "
                "`clone restore {} --full` restores every extent from the "
                "clone (what hosts wrote since the restore began is "
                "overwritten)".format(self.source.name, clone.name,
                                      clone.name))

    def _check_restorable(self, clone):
        if self.source.readonly:
            raise errors.ReadOnly(name=self.source.name)
        if clone.backend.size != self.size:
            raise errors.InvalidArgument(
                reason="clone {!r} holds {} bytes and source {!r} {}: a "
                       "restore needs equal sizes".format(
                           clone.name, clone.backend.size, self.source.name,
                           self.size))

    def start_restore(self, name, full=False, rate=None, run=True,
                      regions=None):
        """Protected restore of the Source from fractured clone name.

        regions: the extents (one byte each) the caller took as the
        restore's before it started it (a replicated Source's links
        replay exactly them); a write since then that set another bit
        counts as made after the restore began (`_protect_later`)."""
        clone = self.clones[name]
        self._check_restorable(clone)
        with self.cond:
            self._restore_checks(clone, full)
            # Every check passed: only now change anything.
            fresh = clone.state != RESTORING
            # A restore whose PRM was lost, restarted whole (--full).
            restart = not fresh and self.prm_lost
            if full and (fresh or restart):
                maps.set_range(clone.delta, 0, self.extents)
            if fresh:
                self.prm = bytearray(self.extents)
                self.prm_file.reset(self.prm)
            self._prepare_restore(clone, "restore")
        # Maps first (the clone's and the siblings' new bits, an empty
        # PRM), then the state: a crash in between leaves a fractured clone
        # with extra bits, never a restore with bits missing.  A restart's
        # empty PRM comes after its maps too: a crash before leaves the
        # PRM lost, and the restart is asked again.
        self.commit()
        with self.cond:
            self._check(clone, "restore")
            self._check_group_idle(clone, "restore")

            def switch():
                if restart:
                    # No write in flight: what hosts wrote before now is
                    # restored over, as --full says.
                    empty = bytearray(self.extents)
                    try:
                        self.prm_file.reset(empty)
                    except BaseException:
                        self._spoil_prm_file()
                        raise
                    self.prm, self.prm_lost = empty, False
                if regions is not None:
                    self._protect_later(clone, regions)
                self.transition(clone, "restore", rate=rate)
                self.restoring = clone
                clone.paused = False
                self._set_read_path()
            self._switch_quiesced(
                switch, lambda: self._restore_checks(clone, full))
        return self._launch(clone, rate, run)

    def _spoil_prm_file(self):
        """After a failed reset of a lost PRM: the new, empty PRM may be in
        place (not reopened, or the old file not put back after a failed
        directory sync: fsutil.write_atomic), while the restore stays
        paused with its PRM lost.  After a crash that
        file would resume the restore by itself, over what hosts write
        from now on: its header is overwritten in place (the file's data
        only, no directory operation), so it loads as lost again, or else
        removed."""
        path = self.prm_file.path
        try:
            fd = maps.files.open(path)
        except FileNotFoundError:
            return
        except OSError:
            fd = None
        if fd is not None:
            try:
                maps.files.pwrite(fd, bytes(maps.HEADER.size), 0)
                maps.files.datasync(fd)
                return
            except OSError:
                pass
            finally:
                maps.files.close(fd)
        # A missing PRM loads as lost too.
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError:
            log.exception("the PRM file %s of the restore of %s could be "
                          "neither spoiled nor removed: a crash now resumes "
                          "the restore", path, self.source.name)

    def _protect_later(self, clone, regions):
        """(Holding cond, no write in flight.)  Extents set in the Delta
        Map and not in the restore's regions were written (Source or
        clone) after the caller took them: those writes count as made
        after the restore began, so the PRM protects them (the Source
        keeps its data, the clone's then), and the restore copies nothing
        its caller did not count on.  Durable before the restore's state
        is: a resumed restore copies none of them either."""
        delta, later = clone.delta, False
        e = delta.find(1)
        while e >= 0:
            if not regions[e] and not self.prm[e]:
                self.prm[e] = later = 1
            e = delta.find(1, e + 1)
        if later:
            self.prm_file.persist(self.prm, 0, self.extents)

    def _switch_quiesced(self, switch, checks):
        """(Holding cond.)  Run switch(), which changes what hosts read of
        the Source, with no write in flight: one that entered before would
        change the Source after the switch, where hosts never read it,
        and a replicated Source's secondary would get it on top of what
        the switch shows (target.replication, volume-changing
        operations).  checks() first, again: the drain lets go of cond,
        and another operation may have begun meanwhile."""
        with self._quiesced():
            checks()
            switch()

    def _check_siblings_split(self, clone, event):
        for other in self.clones.values():
            if other is not clone and other.state in MIRRORED:
                raise SiblingsMirrored(event=event, name=clone.name,
                                       other=other.name, state=other.state)

    def _prepare_restore(self, clone, event="reverse-sync"):
        """Source extents about to change are dirty for every sibling.

        Siblings must not be mirrored: their copy of the Source would
        silently stop being one as the engine rewrites the Source.
        """
        self._check_siblings_split(clone, event)
        for other in self.clones.values():
            if other is not clone:
                for s, e in maps.runs(clone.delta):
                    maps.set_range(other.delta, s, e)

    def _persist_prm(self):
        """Make the PRM durable, the Source data its bits vouch for first.

        A bit set for a copy on demand says the clone's data is on the
        Source; one set for a host write, that the extent is never copied
        again (its data is only promised at the host's flush, which flushes
        the Source here).  Either way the Source is flushed between taking
        the bits and saving them: a copy lands before its bit is set, so
        one fdatasync covers every bit of the save.  Saves are serialized,
        so an older copy of the map never overwrites a newer one.

        Returns whether the Source was flushed (False when no restore
        runs), so that callers flush it only once.
        """
        if self.restoring is None or not self.prm_file.is_open:
            return False
        with self.prm_lock:
            with self.cond:
                prm = bytes(self.prm)
            if self.flush_before_prm:
                self._flush_source()
            self.prm_file.persist(prm, 0, self.extents)
        return self.flush_before_prm

    def _claim(self, clone, e0, e1):
        """Claim in the scoreboard the extents of [e0, e1) still to copy.

        Returns (claimed, busy): extents now ours to copy, and whether some
        are being copied by somebody else.  Called holding cond.
        """
        delta, prm, board = clone.delta, self.prm, self.scoreboard
        claimed, busy = [], False
        e = delta.find(1, e0, e1)
        while e >= 0:
            if not prm[e]:
                if board[e]:
                    busy = True
                else:
                    board[e] = 1
                    claimed.append(e)
            e = delta.find(1, e + 1, e1)
        return claimed, busy

    def restore_copier(self, clone, **kwargs):
        """A copier of Clone -> Source runs, for the engine or a COD."""
        g = self.granularity

        def between(offset, length):
            if self.copy_hook is not None:
                self.copy_hook(None, offset // g, (offset + length + g - 1)
                               // g)
        # The clone's holes become holes of the Source (may_trim), unread.
        return copier.Copier(
            clone.backend.readinto, lambda view, offset: self.below.write(
                view, offset), lambda offset, length: self.below.zero(
                offset, length, may_trim=True), between=between,
            extents=clone.backend.extents, **kwargs)

    def _copy_claimed(self, clone, claimed, copy=None):
        """Copy claimed extents Clone -> Source, then release them.
        Returns whether every extent was copied (a cancelled copier stops
        early, a Source flush that failed meanwhile may have dropped the
        copy: the extents stay to copy)."""
        g = self.granularity
        copied = False
        runs = []
        with self.cond:
            failures = self.flush_failures
            for s, e in runs_of(claimed):
                self.changes.touch(s, e)
                runs.append((s * g, min(e * g, self.size) - s * g))
        try:
            copied = (copy or self.restore_copier(clone)).copy(runs)
        finally:
            with self.cond:
                # A Source flush that failed meanwhile may have dropped
                # the copy: its extents stay to copy.
                copied = copied and failures == self.flush_failures
                for e in claimed:
                    self.scoreboard[e] = 0
                    if copied:
                        clone.delta[e] = 0
                for s, e in runs_of(claimed):
                    self.changes.touch(s, e)
                self.cond.notify_all()
        return copied

    def copy_on_demand(self, e0, e1):
        """Wait until no extent of [e0, e1) is left to restore.

        Extents nobody copies yet are copied here, by the requesting
        thread; extents the engine or another request is copying are waited
        for.  Returns at once when nothing in the range is pending.
        """
        clone = self.restoring
        if clone is None or clone.delta.find(1, e0, e1) < 0:
            return
        started = time.monotonic()
        waited = copies = 0
        with self.cond:
            self.cod.queued += 1
        try:
            while True:
                with self.cond:
                    claimed, busy = self._claim(clone, e0, e1)
                    if not claimed:
                        if not busy:
                            break
                        waited += 1
                        self.cond.wait(1.0)
                        continue
                self._copy_claimed(clone, claimed)
                copies += len(claimed)
        finally:
            with self.cond:
                self.cod.queued -= 1
        if copies or waited:
            self.cod.record(time.monotonic() - started, copies)

    def restore_read(self, buf, offset):
        e0, e1 = self._extent_range(offset, len(buf))
        self.copy_on_demand(e0, e1)
        self.below.readinto(buf, offset)

    def visible_read(self, buf, offset):
        """Read what a host read of the Source returns now, copying
        nothing: during a restore the clone's data for the extents still
        to copy, during a reverse sync for its dirty ones.  For a reader
        that may not wait for a copy on demand (a replication replay reads
        under its group's lock, which the copy's write takes).  An extent
        leaves the map only once its copy is complete, so a read that
        finds it gone finds the copy on the Source."""
        clone = self.restoring
        if clone is None:
            return self.redirected_read(buf, offset)
        view = memoryview(buf).cast("B")
        g = self.granularity
        delta, prm = clone.delta, self.prm
        end = offset + len(view)
        pos = offset
        while pos < end:
            e = pos // g
            pending = bool(delta[e] and not prm[e])
            stop = e + 1
            while stop * g < end and \
                    bool(delta[stop] and not prm[stop]) == pending:
                stop += 1
            part = view[pos - offset:min(end, stop * g) - offset]
            (clone.backend if pending else self.below).readinto(part, pos)
            pos += len(part)

    def pending_restore(self):
        """Extents still to copy: set in the Delta Map, not in the PRM."""
        clone = self.restoring
        if clone is None:
            return 0
        delta = int.from_bytes(clone.delta, "little")
        prm = int.from_bytes(self.prm, "little")
        return (delta & ~prm).bit_count()
