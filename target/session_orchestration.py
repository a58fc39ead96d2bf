"""Session orchestration: the incremental sessions of the Target (create,
delete, mark, transfer, update, status and maps), the sessions layer in
each LU's I/O stack, the sessions' records in the inventory, the peer
destinations' protected images around a transfer, this target's own
protected images asked for by a peer (LU@protected-LU, target.peer), and
the last consistent image a replicated group's secondary keeps of its
volumes during a replay (LU@consistent-LU, the group's own).
"""

import contextlib
import errno
import functools
import logging
import os

from . import (backends, channel, clones, copier, errors, fsutil, inventory,
               maps, peer, replication, sessions, units)
from .lu import one_change_at_a_time

log = logging.getLogger("clonectl.target")

# The name of an LU's protected image is this prefix and the LU's name.
IMAGE_PREFIX = "protected-"
# The name of the image a secondary's replay keeps of a volume (its group's
# last consistent image, every volume of the same point): this prefix and
# the LU's name.  Only the group makes and releases it (its replay, its
# promotion, its deletion; a rollback to it), so an admin's or a peer's
# protected image never becomes the group's, nor the group's theirs.
CONSISTENT_PREFIX = "consistent-"
# User sessions may not start with these.
RESERVED_PREFIXES = (IMAGE_PREFIX, CONSISTENT_PREFIX)
# `lu rollback --image`: which image to put back.
PROTECTED, CONSISTENT = "protected", "consistent"
# What runs on an image (SessionOrchestration._images_busy).
ROLLING_BACK, RELEASING = "a rollback", "being released"


class RollbackRefused(errors.Error):
    msg = "LU {name!r} cannot be rolled back: {reason}"
    errno = errno.EBUSY


class RollbackRunning(errors.Error):
    msg = ("cannot {event} clone {name!r}: its Source {source!r} is being "
           "rolled back to {image}; try again once that has finished")
    errno = errno.EBUSY


class PointRefused(errors.Error):
    msg = ("no point in time of LU {name!r} is taken now: it is being "
           "rolled back to {image}; try again once that has finished")
    errno = errno.EBUSY


class SessionOrchestration:
    """The session and image operations of target (a Target): its LUs,
    sessions, images, lock and inventory."""

    def __init__(self, target):
        self.target = target
        # Session name -> what its record last said (events of a change).
        self._seen = {}
        # The images a rollback is reading (their names), under
        # target.lock: nothing releases them meanwhile.
        # Image session name -> what runs on it (ROLLING_BACK, RELEASING):
        # neither starts while the other runs.
        self._images_busy = {}
        # LU name -> what is starting on it and may not meet a rollback
        # (a restore or reverse sync, a point in time: _starting), under
        # target.lock: no rollback of it starts meanwhile.
        self._starting = {}

    def load_sessions(self, lu, records):
        for name, rec in sorted(records.items()):
            # Images recorded before they were flagged have the image's
            # name and no destination (a user session always has one).
            image = rec.get("image") is True or (
                name == self._image_session_name(lu.name) and not rec["dests"])
            consistent = image and name == self._consistent_name(lu.name)
            session = None
            try:
                session = self._open_session(lu, name, rec, image=image)
                for problem in session.load():
                    self._session_problem(lu, name, problem)
            except (errors.Error, OSError) as e:
                if session is not None:
                    # Its files only: no commit of maps it never loaded.
                    session.tracking.close()
                    session.save_area.backend.close()
                self._session_problem(lu, name, "not loaded: {}".format(e))
                self._not_loaded(lu, name, rec, e)
                continue
            self._attach_session(lu, session)
            if consistent:
                self.target.consistent_images[lu.name] = session
            elif image:
                self.target.images[lu.name] = session

    def _not_loaded(self, lu, name, rec, exc):
        """A session that did not load hears of none of its LU's writes:
        before the LU is served its record says, durably, that every
        destination needs a full copy and that no image is frozen (a
        later load would trust maps that missed them); if even that
        cannot be saved, the LU is held (not served) until a restart
        loads the session or saves that."""
        rec = dict(rec, marked=False, export=False, mark_time=None,
                   error="not loaded at a start ({}): every destination "
                   "gets a full copy, no image is frozen".format(exc),
                   dests=[dict(d, needs_full=True) for d in rec["dests"]])
        try:
            with self.target.state_dir.editing() as doc:
                doc["lus"][lu.name]["sessions"][name] = rec
        except (errors.Error, OSError) as e:
            why = lu.holds["session " + name] = (
                "session {} did not load ({}) and its record could not be "
                "marked for a full copy ({}): its writes would be in no "
                "map; restart the server once the state directory can be "
                "written".format(name, exc, e))
            log.error("LU %s is not served: %s", lu.name, why)

    def _session_problem(self, lu, name, problem):
        log.error("session %s of %s: %s", name, lu.name, problem)
        self.target.recovery_problems.append(
            {"source": lu.name, "session": name, "message": problem})

    def _open_session(self, lu, name, rec, image=False):
        self._seen[name] = (
            {"marked": rec["marked"], "error": rec.get("error"),
             "export": rec.get("export", False)}, rec.get("last_transfer"))
        save_path = self._save_area_path(lu.name, name)
        size = self._grown_save_area(lu, rec, save_path)
        backend = backends.FileBackend(
            save_path, owner="the save area of session {}".format(name))
        try:
            return sessions.Session(
                name, lu, rec["granularity"], self.target.state_dir.maps_dir,
                backend, rec["dests"], persist=self._persist_session(
                    lu.name, name, image), marked=rec["marked"],
                export=rec.get("export", False), error=rec.get("error"),
                save_area_size=size,
                last_transfer=rec.get("last_transfer"),
                token_file=rec.get("token_file"),
                mark_time=rec.get("mark_time"))
        except BaseException:
            backend.close()
            raise

    @staticmethod
    def _grown_save_area(lu, rec, save_path):
        """The size of the save area of record rec: a session made when
        whole extents were saved has the default size of that layout
        (SaveArea.former_default_size), too small for this one's entries;
        it is grown (sparse: no space until used) to this layout's
        default, which can never fill.  Only while unmarked: the
        slots' place follows the file's size, so a save area holding
        saves keeps its size (one of the former layout is unmarked at
        load, and grown at the next).  The record says so from its next
        save."""
        g = rec["granularity"]
        extents = maps.extent_count(lu.size, g)
        if rec["marked"] or rec["save_area"] != \
                sessions.SaveArea.former_default_size(extents, g):
            return rec["save_area"]
        size = sessions.SaveArea.size_for(extents, g)
        if os.path.getsize(save_path) < size:
            os.truncate(save_path, size)
        return size

    def _save_area_path(self, source, name):
        return self.target.state_dir.save_area(source, name)

    def _kept_save_area_path(self, source):
        """The save area file a secondary group keeps of LU source between
        its replays' images (LU@consistent-LU): the next image's saves
        overwrite its written blocks instead of filling holes, an
        fdatasync that allocates nothing costing about half as much."""
        return self._save_area_path(source, self._consistent_name(source)) \
            + ".kept"

    def _take_kept_save_area(self, kept, save_path, size):
        """Move the kept save area file kept (if any, of size bytes) to
        save_path; False if there is none to take.  Its stale slots are
        never read: the session's create writes a new tag to its header
        durably before the session is recorded, and a slot is read only
        through an entry of that tag, whose crc it must match."""
        try:
            st = os.stat(kept)
        except FileNotFoundError:
            return False
        if st.st_size != size:
            fsutil.remove_durably([kept])
            return False
        os.rename(kept, save_path)
        # Durable before the record that names save_path is saved.
        fsutil.fsync_dir(os.path.dirname(os.path.abspath(save_path)))
        return True

    def _attach_session(self, lu, session):
        layer = lu.stack.get("sessions")
        if layer is None:
            layer = sessions.SessionLayer(name=lu.name)
            lu.stack.set("sessions", layer)
        layer.add(session)
        self.target.sessions[session.name] = session

    def _detach_session(self, session):
        lu = session.source
        layer = lu.stack.get("sessions")
        if layer is not None:
            layer.remove(session)
            if not layer.sessions:
                # An LU without sessions pays nothing for them.
                lu.stack.remove("sessions", layer)
                layer.close()
        self.target.sessions.pop(session.name, None)

    def _persist_session(self, source, name, image=False):
        def persist(record):
            if image:
                record = dict(record, image=True)
            with self.target.state_dir.editing() as doc:
                doc["lus"][source].setdefault("sessions", {})[name] = record
            self._session_persisted(name, record)
        return persist

    def _session_persisted(self, name, record):
        """Events of a session's record: marked or not, its error, and
        the end of a transfer (the record keeps the last one)."""
        seen = {"marked": record.get("marked"), "error": record.get("error"),
                "export": record.get("export")}
        last = record.get("last_transfer")
        before = self._seen.get(name)
        self._seen[name] = (seen, last)
        if before is None:
            return
        changed = {k: v for k, v in seen.items() if before[0].get(k) != v}
        if changed:
            self.target.changed("session", name, **changed)
        if last and last != before[1]:
            self.target.changed("transfer", name, result=last.get("result"),
                          bytes_sent=last.get("bytes_sent"),
                          transferring=False)

    def find(self, name):
        session = self.target.sessions.get(name)
        if session is None:
            raise sessions.UnknownSession(name=name)
        return session

    def session_create(self, source, name, dests=(), granularity=None,
                       save_area=None, timeout=10.0, peer_dests=(),
                       peer_token_file=None, peer_tls_certificates=None):
        """A new incremental session on source; every destination is
        probed (reachable, writable, same size) before anything is made.

        peer_dests: [uri, "HOST:PORT"] pairs, destinations served by
        another clonectl whose manager listens for peer requests there
        (with TLS if peer_tls_certificates, a certificates directory).
        """
        units.check_name(name)
        if name.startswith(RESERVED_PREFIXES):
            raise errors.InvalidArgument(
                reason="session names starting with {!r} or {!r} are "
                "reserved for the images this target keeps of its LUs "
                "(LU@{}LU, LU@{}LU)".format(
                    IMAGE_PREFIX, CONSISTENT_PREFIX, IMAGE_PREFIX,
                    CONSISTENT_PREFIX))
        dest_records = [{"uri": u, "peer": None} for u in dests]
        for pair in peer_dests or ():
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise errors.InvalidArgument(reason="a peer destination is "
                                             "a URI and a HOST:PORT")
            dest_records.append({"uri": pair[0], "peer": _peer_addr(pair[1]),
                                 "peer_tls": os.path.abspath(
                                     peer_tls_certificates)
                                 if peer_tls_certificates else None})
        if not dest_records:
            raise errors.InvalidArgument(reason="a session needs at least "
                                         "one destination (--dest URI)")
        uris = [r["uri"] for r in dest_records]
        if len(set(uris)) != len(uris):
            raise errors.InvalidArgument(reason="a destination is given twice")
        token_file = None
        if peer_tls_certificates and not peer_dests:
            raise errors.InvalidArgument(
                reason="--peer-tls-certificates needs a --peer-dest")
        if any(r["peer"] for r in dest_records):
            if not peer_token_file:
                raise errors.InvalidArgument(
                    reason="peer destinations need --peer-token-file")
            token_file = os.path.abspath(peer_token_file)
            token = fsutil.read_token(token_file, "peer")
        lu = self._session_source(source)
        for r in dest_records:
            sessions.probe_destination(r["uri"], lu.size,
                                       timeout=float(timeout))
            if r["peer"]:
                _peer_call(sessions.Destination(0, r, 0), token, "status",
                           _export_of(r["uri"]), timeout=float(timeout))
        return self.create_session(lu, name, dest_records, granularity,
                                    save_area, token_file).status()

    def _session_source(self, source):
        lu = self.target.lus.get(source)
        if lu is None or lu.removed:
            raise errors.UnknownLU(name=source)
        if lu.backend is None:
            raise errors.BackingUnusable(path=lu.file, reason=lu.error)
        if lu.readonly:
            raise errors.InvalidArgument(
                reason="LU {!r} is read-only: nothing to track".format(source))
        return lu

    @one_change_at_a_time
    def create_session(self, lu, name, dest_records, granularity, save_area,
                        token_file=None, image=False, kept=None):
        granularity = clones.check_granularity(
            units.parse_size(granularity) if granularity else
            clones.DEFAULT_GRANULARITY)
        if name in self.target.sessions:
            raise sessions.SessionError(name=name, reason="a session of that "
                                        "name exists")
        extents = maps.extent_count(lu.size, granularity)
        minimum = sessions.SaveArea.minimum_size(extents, granularity)
        if save_area is None:
            size = sessions.SaveArea.size_for(extents, granularity)
        else:
            size = units.parse_size(save_area)
            if size < minimum:
                raise errors.InvalidSize(
                    value=save_area, reason="the save area needs at least {} "
                    "bytes (its header and index, and one extent)"
                    .format(minimum))
        save_path = self._save_area_path(lu.name, name)
        record = {"granularity": granularity, "save_area": size,
                  "marked": False, "export": False, "error": None,
                  "dests": [dict(r, consistency=sessions.NEW, needs_full=True)
                            for r in dest_records],
                  "token_file": token_file, "last_transfer": None}
        if image:
            record["image"] = True
        with self.target.state_dir.locked():
            doc = self.target.state_dir.load()
            if lu.name not in doc["lus"]:
                raise errors.UnknownLU(name=lu.name)
            taken = {n for r in doc["lus"].values()
                     for n in r.get("sessions", {})}
            if name in taken:
                raise sessions.SessionError(name=name, reason="a session of "
                                            "that name exists")
            if os.path.exists(save_path):
                os.unlink(save_path)   # left by a crash during a create
            if kept is None or \
                    not self._take_kept_save_area(kept, save_path, size):
                inventory.create_sparse(save_path, size)
            try:
                session = self._open_session(lu, name, record, image=image)
                session.create()
                doc["lus"][lu.name].setdefault("sessions", {})[name] = record
                self.target.state_dir.save(doc)
            except BaseException:
                os.unlink(save_path)
                raise
        self._attach_session(lu, session)
        log.info("session %s created on %s (%d destinations)", name, lu.name,
                 len(dest_records))
        return session

    def session_delete(self, name, force=False):
        return self._delete_session(name, force)

    @one_change_at_a_time
    def _delete_session(self, name, force=False, keep_save_area=None):
        """Delete session name; keep_save_area: a path its save area file
        is moved to instead of being removed (see _kept_save_area_path)."""
        session = self.find(name)
        if session.marked and not force:
            raise sessions.SessionBusy(
                name=name, reason="it is marked; unmark it first (or --force)")
        if session.engine is not None and session.engine.running:
            raise sessions.SessionBusy(name=name, reason="a transfer is "
                                       "running")
        self._release(session, [d for d in session.dests
                                if d.peer and d.protected])
        if session.marked:
            # The frozen image ends while its old data is still saved:
            # a reader of its export gets "gone" from here on, never the
            # Source's newer data once the layer is detached.
            session.unmark(force=True)
        source = session.source.name
        # The inventory first: a save that fails leaves the session
        # tracking writes (a restart brings it back, its maps whole).
        with self.target.state_dir.editing() as doc:
            record = doc["lus"].get(source, {})
            record.get("sessions", {}).pop(name, None)
            if "sessions" in record and not record["sessions"]:
                del record["sessions"]
        self._detach_session(session)
        session.close()
        save_path = self._save_area_path(source, name)
        if keep_save_area is not None:
            # Made durable by the directory's fsync that follows.
            try:
                os.replace(save_path, keep_save_area)
            except FileNotFoundError:
                pass
        fsutil.remove_durably(
            [session.tracking.path, session.tracking.path + ".activity",
             save_path] + [session.pending_path(d) for d in session.dests])
        return {"name": name, "source": source}

    def session_list(self, source=None):
        return [s.status() for n, s in sorted(self.target.sessions.items())
                if source is None or s.source.name == source]

    def session_status(self, name):
        return self.find(name).status()

    def session_map(self, name):
        """The same for a session's maps (Session.map_runs)."""
        session = self.find(name)
        out = session.map_runs()
        out.update(name=name, source=session.source.name,
                   marked=session.marked)
        return out

    def _restoring_clone(self, lu):
        """The clone restoring LU lu (a protected restore or reverse sync:
        hosts read its data, the engine copies it), or None."""
        group = self.target.groups.get(lu.name)
        if group is None:
            return None
        return next((c for c in list(group.clones.values())
                     if c.state in (clones.REVERSE_SYNCING,
                                    clones.RESTORING)), None)

    def _check_source_stable(self, session):
        clone = self._restoring_clone(session.source)
        if clone is not None:
            raise sessions.SessionBusy(
                name=session.name, reason="the Source is being restored from "
                "clone {}; mark once that has finished".format(clone.name))

    def _mark(self, session, **kwargs):
        """Mark session (Session.mark's options): every point in time of a
        Source is taken here, refused while a clone restores it (hosts
        read the clone's data, the Source below still holds the old)."""
        session.mark(check=lambda: self._check_source_stable(session),
                     **kwargs)

    @one_change_at_a_time
    def session_mark(self, name, export=False):
        # One at a time with a delete: a mark between a forced delete's
        # unmark and its detaching would freeze an image nothing saves.
        session = self.find(name)
        with self.target.rsg_ops.point_in_time(session.source):
            self._mark(session, export=bool(export))
        return session.status()

    def session_unmark(self, name, force=False):
        session = self.find(name)
        session.unmark(force=bool(force))
        return session.status()

    def _connect_destinations(self, session, timeout):
        clients = {}
        try:
            for d in session.dests:
                clients[d.index] = sessions.NbdDestination(
                    d.uri, timeout=float(timeout))
                if clients[d.index].size != session.size:
                    raise sessions.DestinationError(
                        uri=d.uri, reason="its size is now {} bytes, the "
                        "Source's is {}; nothing was written".format(
                            clients[d.index].size, session.size))
        except BaseException:
            for c in clients.values():
                c.close()
            raise
        return clients

    def session_transfer(self, name, full=False, unmarked=False,
                         timeout=sessions.DEFAULT_TIMEOUT):
        return self._start_transfer(name, "transfer", bool(full),
                                    bool(unmarked), timeout)

    def session_update(self, name, timeout=sessions.DEFAULT_TIMEOUT):
        """Mark (unless an interrupted transfer left it marked), transfer;
        the transfer unmarks on success."""
        return self._start_transfer(name, "update", False, False, timeout)

    def _start_transfer(self, name, what, full, unmarked, timeout):
        """Refuse early (nothing marked or protected for a refused
        request), connect, mark if needed, protect peers, start."""
        session = self.find(name)
        if session.engine is not None and session.engine.running:
            log.warning("session %s: %s refused: a transfer is running",
                        name, what)
            raise sessions.SessionBusy(name=name, reason="an update or "
                                       "transfer is already running")
        will_mark = not session.marked and not unmarked and \
            (what == "update" or full)
        if will_mark:
            self.target.rsg_ops.check_point_in_time(session.source)
        session.check_transfer(full=full, unmarked=unmarked,
                               will_mark=will_mark)
        clients = self._connect_destinations(session, timeout)
        protected = []
        try:
            self._check_peer_images(session)
            if not session.marked and not unmarked:
                with self.target.config_lock, \
                        self.target.rsg_ops.point_in_time(session.source):
                    # Not deleted while the destinations were connected
                    # (as session_mark).
                    if self.find(session.name) is not session:
                        raise sessions.UnknownSession(name=session.name)
                    self._mark(session, full=full)
            protected = self._protect_peers(session)
            session.start_transfer(clients, full=full, unmarked=unmarked,
                                   on_done=self._release_peers)
        except BaseException:
            for c in clients.values():
                c.close()
            self._release(session, protected)
            raise
        return session.status()

    def _check_peer_images(self, session):
        """A destination whose protected image is gone (rolled back or
        released by its admin) holds something no map describes: it gets
        everything again, from a new mark."""
        lost = []
        for d in session.dests:
            if not (d.peer and d.protected):
                continue
            token = fsutil.read_token(session.token_file, "peer")
            st = _peer_call(d, token, "status", _export_of(d.uri))
            if not st.get("protected") or st.get("since") != \
                    d.protected_since:
                lost.append(d)
        if not lost:
            return
        if session.marked:
            session.unmark(force=True)
        for d in lost:
            log.warning("session %s: the protected image at %s is gone "
                        "(rolled back?); it gets a full copy", session.name,
                        d.uri)
            d.protected = False
            d.protected_since = None
            d.needs_full = True
            d.consistency = sessions.INCONSISTENT
            d.last_error = "its protected image was gone (rolled back or " \
                "released there); a full copy follows"
        session.save()

    def _protect_peers(self, session):
        """Protect the consistent image of each clonectl destination before
        out-of-order updates reach it; return the destinations protected
        here.  If one protect fails, every protect of this call (the
        failing one too: it may have been applied) is released again and
        the transfer does not start."""
        todo = [d for d in session.dests if d.peer and
                d.consistency == sessions.CONSISTENT]
        if not todo:
            return []
        token = fsutil.read_token(session.token_file, "peer")
        done = []
        try:
            for d in todo:
                if d.protected:
                    # Left protected by a release that failed: that image
                    # is older than the consistent one; protect anew.
                    _peer_call(d, token, "release", _export_of(d.uri))
                    d.protected = False
                done.append(d)
                st = _peer_call(d, token, "protect", _export_of(d.uri))
                d.protected = True
                d.protected_since = st.get("since")
        except errors.Error:
            self._release(session, done)
            raise
        session.save()
        return done

    def _release(self, session, dests):
        """Release the protected images of dests (best effort, logged)."""
        if not dests:
            return
        for d in dests:
            try:
                token = fsutil.read_token(session.token_file, "peer")
                _peer_call(d, token, "release", _export_of(d.uri))
                d.protected = False
                d.protected_since = None
            except errors.Error as e:
                log.error("session %s: could not release the protected image "
                          "of %s: %s", session.name, d.uri, e)
                d.protected = True
        session.save()

    def _release_peers(self, engine):
        """After a transfer: release the protected images of destinations
        that got the whole point in time; the others stay protected."""
        session = engine.session
        changed = False
        for i in engine.completed:
            d = session.dests[i]
            if not (d.peer and d.protected) or engine.unmarked:
                continue
            try:
                token = fsutil.read_token(session.token_file, "peer")
                _peer_call(d, token, "release", _export_of(d.uri))
                d.protected = False
                d.protected_since = None
            except errors.Error as e:
                d.last_error = "transfer completed, but the protected image " \
                    "was not released: {}".format(e)
            changed = True
        if changed:
            session.save()

    @staticmethod
    def _image_session_name(lu):
        return IMAGE_PREFIX + lu

    def _image(self, lu):
        """The session holding lu's protected image, or None."""
        session = self.target.images.get(lu)
        if session is None or \
                self.target.sessions.get(session.name) is not session:
            return None
        return session

    def image_status(self, lu):
        if lu not in self.target.lus or not self.target.lus[lu].healthy:
            raise errors.UnknownLU(name=lu)
        session = self._image(lu)
        protected = session is not None and session.marked
        return {"lu": lu, "size": self.target.lus[lu].size,
                "protected": protected,
                "export": session.export_name() if protected else None,
                "since": session.mark_time if protected else None,
                "saved_bytes": session.save_area.used_bytes() if protected
                else 0}

    def image_protect(self, lu):
        """Keep lu's current image readable (LU@protected-LU) until
        released; protecting a protected image keeps the older one."""
        source = self._session_source(lu)
        name = self._image_session_name(lu)
        session = self._image(lu)
        if session is None:
            if name in self.target.sessions:
                raise sessions.SessionError(
                    name=name, reason="a session that is not LU {}'s "
                    "protected image has its name (made by an older "
                    "clonectl); delete that session first".format(lu))
            session = self.create_session(source, name, [], None, None,
                                           image=True)
            self.target.images[lu] = session
        if not session.marked:
            with self.target.rsg_ops.point_in_time(source,
                                                   consistent=False):
                self._mark(session, export=True)
        return self.image_status(lu)

    def image_release(self, lu):
        """Release lu's protected image (never the one a replicated
        group's secondary keeps: LU@consistent-LU is the group's)."""
        session = self._image(lu)
        if session is not None:
            self._delete_image(session)
        return self.image_status(lu)

    @contextlib.contextmanager
    def _image_busy(self, session, what):
        """what (ROLLING_BACK, RELEASING) runs on image session for the
        block; refused while either runs on it already."""
        with self.target.lock:
            busy = self._images_busy.get(session.name)
            if busy == ROLLING_BACK:
                reason = "a rollback of it to {} is running".format(
                    session.export_name())
                if what == RELEASING:
                    reason += "; that image is released when it has " \
                        "finished"
            elif busy is not None:
                reason = "{} is {}".format(session.export_name(), busy)
            if busy is not None:
                raise RollbackRefused(name=session.source.name,
                                      reason=reason)
            self._images_busy[session.name] = what
        try:
            yield
        finally:
            with self.target.lock:
                self._images_busy.pop(session.name, None)

    def _delete_image(self, session, keep_save_area=None):
        with self._image_busy(session, RELEASING):
            if session.marked:
                session.unmark(force=True)
            self._delete_session(session.name, force=False,
                                 keep_save_area=keep_save_area)

    @staticmethod
    def _consistent_name(lu):
        return CONSISTENT_PREFIX + lu

    def consistent_image(self, lu):
        """The session holding the last consistent image a secondary keeps
        of lu (LU@consistent-LU), or None.  None too while it is not the
        group's last consistent point (SecondaryGroup.point_kept) or lu
        is no secondary's: an image a failed release left there is of an
        older point (the next replay or a start releases it)."""
        session = self.target.consistent_images.get(lu)
        if session is None or not session.marked or \
                self.target.sessions.get(session.name) is not session:
            return None
        rsg = session.source.rsg
        if rsg is not None and (rsg.role != replication.SECONDARY or
                                not rsg.point_kept()):
            return None
        return session

    def consistent_protect(self, lus, point):
        """Keep the current image of every LU of lus (a secondary group's
        volumes) readable as LU@consistent-LU, all of one point: the images
        are made first, then marked together inside point (a context: the
        group's apply lock).  An image of an earlier point is replaced.  If
        one fails, none is kept."""
        self.consistent_release(lus)
        made = []
        try:
            for lu in lus:
                name = self._consistent_name(lu.name)
                if name in self.target.sessions:
                    raise sessions.SessionError(
                        name=name, reason="a session that is not LU {}'s "
                        "last consistent image has its name (made by an "
                        "older clonectl); delete that session first"
                        .format(lu.name))
                session = self.create_session(
                    self._session_source(lu.name), name, [], None, None,
                    image=True, kept=self._kept_save_area_path(lu.name))
                self.target.consistent_images[lu.name] = session
                made.append(lu)
            with point:
                for lu in lus:
                    self._mark(self.target.consistent_images[lu.name],
                               export=True)
        except BaseException:
            try:
                self.consistent_release(made)
            except (errors.Error, OSError) as e:
                log.error("could not remove the images just made of %s: %s",
                          ", ".join(lu.name for lu in made), e)
            raise
        log.info("last consistent image of %s kept (%s)",
                 ", ".join(lu.name for lu in lus),
                 ", ".join(self.target.consistent_images[lu.name]
                           .export_name() for lu in lus))

    def consistent_release(self, lus, for_good=False):
        """Release the LU@consistent-LU images of lus (only these: an
        admin's or a peer's LU@protected-LU stays).  Their save area files
        are kept for the group's next replay (_kept_save_area_path), or
        removed if for_good (the group is no longer their secondary)."""
        for lu in lus:
            session = self.target.consistent_images.get(lu.name)
            if session is not None and \
                    self.target.sessions.get(session.name) is session:
                self._delete_image(session, keep_save_area=None if for_good
                                   else self._kept_save_area_path(lu.name))
            self.target.consistent_images.pop(lu.name, None)
            if for_good:
                self.consistent_discard(lu.name)

    def consistent_discard(self, lu):
        """Remove the save area file kept for LU lu's next last consistent
        image, and one a crash left at the image's own path without its
        session."""
        name = self._consistent_name(lu)
        paths = [self._kept_save_area_path(lu)]
        if name not in self.target.sessions:
            paths.append(self._save_area_path(lu, name))
        fsutil.remove_durably(paths)

    def save_ahead(self, lu, runs):
        """Writes of runs ([(offset, length)]) of LU lu are about to come
        (a secondary's window of replay data): its sessions (its last
        consistent image) save what they will change now, with one flush
        for them all."""
        layer = lu.stack.get("sessions")
        if layer is not None:
            layer.save_ahead(runs)

    def consistent_export(self, lu):
        """The export of the last consistent image kept of lu, or None."""
        session = self.consistent_image(lu.name)
        return session.export_name() if session is not None else None

    def image_rollback(self, lu, image=None):
        """Put an image back into lu (only the extents written since it was
        taken), then release it.  image: CONSISTENT (the last consistent
        image a replicated group's secondary keeps, LU@consistent-LU),
        PROTECTED (LU@protected-LU), or None: the consistent one if lu has
        it, else the protected one."""
        source = self._session_source(lu)
        if image not in (None, PROTECTED, CONSISTENT):
            raise errors.InvalidArgument(
                reason="--image must be {} or {}".format(CONSISTENT,
                                                         PROTECTED))
        session = None
        if image in (None, CONSISTENT):
            session = self.consistent_image(lu)
            if session is None and image == CONSISTENT:
                raise errors.InvalidArgument(
                    reason="LU {!r} has no last consistent image of a "
                    "replicated group (LU@{}LU) to roll back to".format(
                        lu, CONSISTENT_PREFIX))
        if session is None:
            session = self._image(lu)
            if session is None or not session.marked:
                raise errors.InvalidArgument(
                    reason="LU {!r} has no protected image to roll back to"
                    .format(lu))
        with self._image_busy(session, ROLLING_BACK), self.target.withheld(
                source, "it is being rolled back to {}; connect again once "
                "that has finished".format(session.export_name()),
                lambda users: self._check_rollback(source, session, users)):
            restored, export = self._roll_back(source, session)
        # The image put back and no other: the group may have become
        # consistent meanwhile (its own release then had it already).
        if session.name == self._consistent_name(lu):
            if self.target.consistent_images.get(lu) is session:
                self.consistent_release([source])
        elif self._image(lu) is session:
            self._delete_image(session)
        return {"lu": lu, "image": export, "extents_restored": restored}

    def _check_rollback(self, source, session, users):
        """Refuse a rollback of source to session's image (under
        target.lock, source withheld: what passes here stays so until the
        rollback ends): while hosts use it, another rollback of it runs,
        or a clone restores it or is starting to (restore_starting).  A
        restore or reverse sync shows hosts the clone's data and copies
        it over the Source: the image put back below would not be what
        hosts read, yet released."""
        lu = source.name
        if users:
            raise RollbackRefused(
                name=lu, reason="{} connection(s) use it (NBD hosts or the "
                "iSCSI gateway); stop the hosts first, so no write lands "
                "during or after the rollback".format(users))
        other = self._rolling_back(lu, but=session.name)
        if other is not None:
            raise RollbackRefused(name=lu, reason="a rollback of it to {} "
                                  "is running".format(other))
        clone = self._restoring_clone(source)
        if clone is not None:
            raise RollbackRefused(
                name=lu, reason="clone {} is restoring it ({}: hosts read "
                "that clone's data); roll back once that has finished"
                .format(clone.name, "a reverse sync"
                        if clone.state == clones.REVERSE_SYNCING
                        else "a protected restore"))
        starting = self._starting.get(lu)
        if starting:
            raise RollbackRefused(name=lu, reason=starting[0])

    def _rolling_back(self, lu, but=None):
        """The export of the image of LU lu a rollback is putting back
        (but that of image session but), or None; under target.lock."""
        for name in (self._image_session_name(lu), self._consistent_name(lu)):
            if name != but and self._images_busy.get(name) == ROLLING_BACK:
                return "{}@{}".format(lu, name)
        return None

    def point_starting(self, source):
        """A point in time of LU source (a mark, protect or fracture) is
        taken inside this (_starting)."""
        return self._starting_on(
            source, "a point in time of it (a mark, protect or fracture) "
            "is being taken", lambda image: PointRefused(
                name=source.name, image=image))

    def restore_starting(self, source, clone, event):
        """A restore or reverse sync (event) of LU source from clone (its
        name) starts inside this, until the clone's state says it runs
        (_starting)."""
        return self._starting_on(
            source, "a restore or reverse sync from clone {} is starting "
            "on it".format(clone), lambda image: RollbackRunning(
                event=event, name=clone, source=source.name, image=image))

    @contextlib.contextmanager
    def _starting_on(self, source, what, refusal):
        """what starts on LU source inside this: refused (refusal(the
        image's export)) while a rollback of source runs, and no rollback
        of source starts meanwhile (_check_rollback says what)."""
        with self.target.lock:
            image = self._rolling_back(source.name)
            if image is not None:
                raise refusal(image)
            self._starting.setdefault(source.name, []).append(what)
        try:
            yield
        finally:
            with self.target.lock:
                starting = self._starting[source.name]
                starting.remove(what)
                if not starting:
                    del self._starting[source.name]

    def _roll_back(self, source, session):
        """Put session's image back into source (withheld, its users
        checked); (extents, export)."""
        lu = source.name
        g, bs = session.granularity, session.block
        saved = []

        def regions():
            # Read where nothing else changes the LU (volume_change): on a
            # secondary, a primary's batch saves into the image what it
            # overwrites, and one that came and went before would
            # otherwise be left out; its replay may also have ended,
            # leaving the group at a later point than the image's.
            if session not in (self._image(lu), self.consistent_image(lu)):
                raise RollbackRefused(name=lu, reason="{} is no longer kept "
                                      "(its group's replay completed)".format(
                                          session.export_name()))
            layer = source.stack.get("sessions")
            if layer is not None:
                # The hosts are gone, but writes they were told are done
                # may still be queued (their saves not yet in the image):
                # applied first, so that the extents to put back include
                # theirs.
                layer.drain()
            with session.cond:
                slots = session.save_area.slots
                saved[:] = slots
                return slots.groups(g // bs, session.extents)

        # Below a secondary's guard (rolling a secondary back to its last
        # consistent image is what its promotion asks for), through every
        # other layer, looked up for each write: a clone or session of the
        # LU sees the rollback.
        def write(view, offset):
            source.stack.below("guard").write(view, offset)

        def zero(offset, length):
            source.stack.below("guard").zero(offset, length)

        # The saved blocks only: the others are as they were.
        rollback = copier.Copier(
            lambda view, offset: session.save_area.readinto(offset // bs,
                                                            view),
            write, zero)
        with self.target.rsg_ops.volume_change(source, regions, g,
                                               "a rollback") as changed:
            rollback.copy((b * bs, min((b + n) * bs, source.size) - b * bs)
                          for b, n in sessions.block_runs(saved))
            source.stack.below("guard").flush()
            if session.name == self._consistent_name(lu) and \
                    source.rsg is not None and \
                    source.rsg.role == replication.SECONDARY:
                # Counted while no primary may connect (a replay begun
                # after it writes the volume again) and before the image
                # goes (a crash in between leaves the image to roll back
                # to again).
                source.rsg.volume_rolled_back(source)
        restored = changed.count(1)
        export = session.export_name()
        log.info("LU %s rolled back to %s (%d extents)", lu, export, restored)
        return restored, export

    def users_session(self, operation):
        """operation(name, ...) as a user may call it: never on a session
        holding an image of an LU (the target's own: an LU's protected
        image, or the last consistent image a secondary keeps during a
        replay)."""
        @functools.wraps(operation)
        def call(name, **kwargs):
            with self.target.lock:
                image = next(((what, lu) for what, images in (
                    ("protected image", self.target.images),
                    ("last consistent image", self.target.consistent_images))
                              for lu, s in images.items()
                              if s.name == name), None)
            if image is not None:
                raise errors.InvalidArgument(
                    reason="session {!r} holds the {} of LU {} ({}@{}); it "
                    "is changed by `clonectl lu rollback` and replication "
                    "only".format(name, image[0], image[1], image[1], name))
            return operation(name, **kwargs)
        return call


def _peer_call(dest, token, op, lu, timeout=10.0):
    """peer.call to the manager of dest, with TLS if dest has a
    certificates directory."""
    tls = channel.client_context(dest.peer_tls, "--peer-tls-certificates") \
        if dest.peer_tls else None
    return peer.call(dest.peer, token, op, lu, timeout=timeout, tls=tls)


def _peer_addr(text):
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise errors.InvalidArgument(
            reason="invalid peer address {!r}: use HOST:PORT".format(text))
    return "{}:{}".format(host, int(port))


def _export_of(uri):
    """The export name of an NBD URI (what the peer calls the LU)."""
    from urllib.parse import unquote, urlsplit
    return unquote(urlsplit(uri).path.lstrip("/"))
