"""The target: the one object that owns every LU of a state directory.

It lives inside the nbdkit process (created by the plugin) and is also used
directly by unit tests.  Host I/O arrives through Connection objects (one
per NBD connection, the plugin's handle; target/lu.py); control requests
arrive through the control socket (target.control), which looks them up in
the operations table (target/operations.py).

The Target is the registry: the LUs, their clone groups, sessions,
protected images and replicated groups, recovered from the state
directory at load; it decides what is exported and opens and closes the
connections to it.  The operations on clones, sessions and replicated
groups are orchestrated by one object each (clone_ops, session_ops,
rsg_ops), which receive the Target; the iSCSI gateway's route is
target/gateway.py.
"""

import contextlib
import functools
import logging
import os
import threading
import time

from . import (clones, errors, events, gateway, inventory, replication,
               sessions)
from .clone_orchestration import CloneOrchestration
from .lu import Connection, LogicalUnit, LUHeld
from .rsg_orchestration import RsgOrchestration
from .session_orchestration import SessionOrchestration

log = logging.getLogger("clonectl.target")


def _forward(owner, name):
    """A method of the Target that is orchestration owner's method name
    (for in-process callers; the control socket calls the orchestration's
    own method, through target/operations.py)."""
    def method(self, *args, **kwargs):
        return getattr(getattr(self, owner), name)(*args, **kwargs)
    method.__name__ = method.__qualname__ = name
    return method


class Target:
    """All LUs of a state directory and what is made of them.

    Operations run here, in the process that serves host I/O (the nbdkit
    plugin), or in a short-lived offline Target created by the CLI when no
    server runs; engines are only started by start().
    """

    def __init__(self, state_dir, gateway_secret=None):
        self.state_dir = inventory.StateDir(state_dir)
        self.state_dir.ensure()
        self.lock = threading.Lock()
        # The iSCSI gateway's route (target/gateway.py).
        self.gateway = gateway.GatewayRoute(self.lock, gateway_secret)
        self.lus = {}
        self.groups = {}
        self.sessions = {}
        # LU name -> the internal session holding its protected image; only
        # what is recorded here is an image (never a session of that name).
        self.images = {}
        # LU name -> the internal session holding the last consistent image
        # a secondary keeps of it during a replay (its group's, apart from
        # the protected image above).
        self.consistent_images = {}
        self.rsgs = {}
        self.config_lock = threading.RLock()    # lu.one_change_at_a_time
        self.closing = False
        self.recovery_problems = []
        # Every state change, for `clonectl events` (target/events.py):
        # emitted from the engines' persist callbacks, the rest found by
        # the watcher started with the engines.
        self.events = events.EventBus()
        self.watcher = None
        self.started = False        # start() ran: engines may run
        self.clone_ops = CloneOrchestration(self)
        self.session_ops = SessionOrchestration(self)
        self.rsg_ops = RsgOrchestration(self)
        with self.state_dir.locked():
            inventory.settle_owned_files(self.state_dir,
                                         self.state_dir.load())
        self.reload()
        self.rsg_ops.load()

    def watch_parent(self, ppid, interval=0.25):
        """Exit at once if the manager (ppid) dies.

        PR_SET_PDEATHSIG was measured not to fire here once nbdkit has
        connection threads, and nbdkit's --exit-with-parent waits for idle
        clients.  Exiting without cleanup is a kill -9: completed writes
        are in the page cache and recovery covers the maps.
        """
        def watch():
            while True:
                time.sleep(interval)
                if os.getppid() != ppid:
                    log.error("manager pid %d is gone; exiting", ppid)
                    os._exit(1)
        threading.Thread(target=watch, name="watch-parent", daemon=True).start()

    def start(self):
        """Resume operations left running (after a crash or a stop)."""
        self.started = True
        for group in self.groups.values():
            self._resume(group)
        for rsg in self.rsgs.values():
            if rsg.role == replication.PRIMARY:
                rsg.start()
        self.watcher = events.Watcher(self.events, self.status)
        self.watcher.start()

    def start_replication(self, bind, port, token_file,
                          tls_certificates=None):
        """Listen for primaries (serve --replication-port)."""
        self.rsg_ops.start_replication(bind, port, token_file,
                                       tls_certificates)

    def events_since(self, seq=None, timeout=10.0):
        """Events after seq, waiting up to timeout seconds (at most 25)
        for one; without seq, the current state as events and the number
        to follow from."""
        if seq is None:
            out = {"seq": self.events.seq, "lost": 0,
                   "events": events.state_events(self.status())}
        else:
            out = self.events.since(int(seq), min(float(timeout), 25.0))
        out["pid"] = os.getpid()    # a new target counts from 0 again
        return out

    def changed(self, kind, name, **fields):
        """A state change of kind (clone, session, ...) for the events."""
        if self.watcher is not None:
            self.watcher.note(kind, name, fields)
        else:
            self.events.emit(kind, name, **fields)

    def poking(self, op):
        """op, followed by a look for the changes it made (events)."""
        @functools.wraps(op)
        def run(**args):
            try:
                return op(**args)
            finally:
                if self.watcher is not None:
                    self.watcher.poke()
        return run

    # ------------------------------------------------------------ LUs

    def lu_create(self, name, size=None, file=None, readonly=False):
        """Add an LU to the inventory and export it (`clonectl lu create`
        while a server runs).  file must be absolute: this process does not
        share the caller's working directory."""
        if file is not None and not (isinstance(file, str) and
                                     os.path.isabs(file)):
            raise errors.InvalidArgument(
                reason="file must be an absolute path, not {!r}".format(file))
        with self.config_lock:
            record = inventory.create_lu(self.state_dir, name, size=size,
                                         file=file, readonly=readonly)
            self.reload()
        lu = self.lus.get(name)
        return {"record": record,
                "error": "not loaded" if lu is None else lu.error}

    def gateway_let_go(self, name, obj, going):
        """Before obj (exported as name) goes, the iSCSI gateway's mount of
        it must be gone: its reads and writes use obj's backing file, and
        an object made later under the same name would not be mounted
        again (the manager compares exports by name).

        Why wait rather than refuse: the gateway mounts every export, so
        refusing would leave it removable only with the gateway stopped.
        going() (under the lock) raises what would refuse the removal
        anyway, or returns False if the removal refuses it later with its
        own reason: then nothing is withdrawn.  Returns whether name was
        withdrawn: if so, the caller gives it back (gateway.give_back)
        when done, and only then (another operation may hold it too)."""
        with self.lock:
            if not self.gateway.held[obj] or not going():
                return False
        self.gateway.withdraw(name, obj)
        return True

    @contextlib.contextmanager
    def withheld(self, lu, why, check):
        """Inside this LU lu is not exported: no new host or iSCSI gateway
        connection, each refused with why (LUHeld); it is exported again
        after.  check(users) runs under the lock once lu is withdrawn,
        users being the connections that may still write it (host_users):
        none can open between the check and the end of the block.  If it
        raises, lu is exported again at once and nothing is done.

        Unlike gateway_let_go nothing waits for the gateway: its
        connections are users, for check to refuse."""
        with self.lock:
            self.gateway.hold(lu.name, why)
            try:
                check(self.host_users(lu))
            except BaseException:
                self.gateway.unhold(lu.name, why)
                raise
        try:
            yield
        finally:
            self.gateway.give_back([lu.name], why)

    def _lu_busy(self, lu, name, record):
        """Raise LUBusy if LU name (lu: its object, if loaded) cannot be
        deleted now: hosts connected, or a clone, session or group uses
        it."""
        if lu is not None and lu.connections:
            raise errors.LUBusy(
                name=name, reason="{} host connection(s) are open to it; "
                "disconnect them first".format(lu.connections))
        reason = self._lu_user(lu, name, record)
        if reason:
            raise errors.LUBusy(name=name, reason=reason)

    def lu_delete(self, name):
        """Delete an LU while serving (`clonectl lu delete`).

        Refused while hosts are connected to it or a clone, session or
        replicated group uses it; the other LUs are not touched.  The
        iSCSI gateway's mount is let go first (gateway_let_go).

        Lock order: config_lock (an LU's changes, and its layers', one at
        a time: lu.one_change_at_a_time), then Target.lock before the
        state-file lock, as everywhere (a group's lock, taken under
        Target.lock, persists under it)."""
        with self.config_lock:
            return self._lu_delete(name)

    def _lu_delete(self, name):
        def going():
            record = self.state_dir.load()["lus"].get(name)
            if record is None:
                return False
            self._lu_busy(self.lus.get(name), name, record)
            return True
        lu = self.lus.get(name)
        withdrawn = lu is not None and self.gateway_let_go(name, lu, going)
        try:
            with self.lock:
                lu = self.lus.get(name)
                record = inventory.delete_lu(
                    self.state_dir, name,
                    check_busy=lambda n, rec: self._lu_busy(lu, n, rec))
                if lu is not None and self.lus.get(name) is lu:
                    self._retire(self.lus.pop(name))
        finally:
            if withdrawn:
                self.gateway.give_back([name])
        log.info("LU %s deleted", name)
        return {"name": name, "record": record}

    def _lu_user(self, lu, name, record):
        """What uses LU name (its clones, sessions or group), or None."""
        reason = inventory.lu_user(self.state_dir, name, record)
        if reason is None and lu is not None and lu.rsg is not None:
            reason = "it is a volume of replicated group {}".format(
                lu.rsg.name)
        return reason

    def lu_resize(self, name, size, file_data=None):
        """Grow an LU while serving (`clonectl lu resize`).

        Connections opened from now on see the new size; nbdkit asks a
        connection's size once, at its handshake, so connections already
        open keep the old one (and nbdkit refuses their requests beyond
        it) until they reconnect.  Refused for LUs with clones, sessions
        or a replicated group: their maps and copies have the LU's size
        (one being added is waited for: config_lock).  file_data:
        inventory.resize_lu."""
        with self.config_lock:
            return self._lu_resize(name, size, file_data)

    def _lu_resize(self, name, size, file_data):
        with self.lock:
            lu = self.lus.get(name)

            def check_busy(n, record):
                reason = self._lu_user(lu, n, record)
                if reason:
                    raise errors.LUResizeRefused(name=n, reason=reason)

            old, new = inventory.resize_lu(self.state_dir, name, size,
                                           check_busy=check_busy,
                                           file_data=file_data)
            if lu is not None and lu.backend is not None and \
                    lu.error is None:
                # Same file, same descriptor: the new bytes are there.
                lu.backend.size = new["size"]
                lu.size = new["size"]
        log.info("LU %s resized from %d to %d bytes", name, old["size"],
                 new["size"])
        return {"name": name, "old_size": old["size"], "record": new}

    def reload(self):
        """Bring the LUs in line with state.json; return the exported names.

        New LUs are opened (with their sessions and clone group: the
        recovery of what a crash left), LUs gone from the inventory stop
        being exported and are closed when their last connection ends.
        An LU whose record changed (file, size, read-only) is opened
        again only once no host uses it: its hosts would otherwise go on
        writing through the old one, whose clones and sessions are closed
        and which nothing counts.  Until then it serves as it was, and the
        status says why (a recovery problem).
        """
        with self.lock, self.state_dir.listed():
            # Read under the lock: lu_resize changes the record and the
            # open LU together under it, and an older record read before
            # would look like another LU and retire this one.
            doc = self.state_dir.load()
            # Gone LUs first: their files may be a new LU's now.
            for name in [n for n in self.lus if n not in doc["lus"]]:
                self._retire(self.lus.pop(name))
            opened = []
            # An LU's own problems (the only ones keyed by "lu") are
            # found again below.
            self.recovery_problems = [p for p in self.recovery_problems
                                      if "lu" not in p]
            for name, record in doc["lus"].items():
                lu = self.lus.get(name)
                if lu is not None and lu.file == record["file"] \
                        and lu.size == record["size"] \
                        and lu.readonly == record["readonly"] \
                        and lu.error is None:
                    continue
                users = self.host_users(lu) if lu is not None and \
                    lu.error is None else 0
                if users:
                    why = "its record in state.json changed, and it is " \
                        "opened again as it says once its {} host " \
                        "connection(s) are gone (then reload, or " \
                        "restart)".format(users)
                    log.error("LU %s: %s", name, why)
                    self.recovery_problems.append({"lu": name,
                                                   "message": why})
                    continue
                if lu is not None:
                    self._retire(lu)
                lu = LogicalUnit(name, record, state_dir=self.state_dir)
                if lu.error:
                    log.error("LU %s is not exported: %s", name, lu.error)
                self.lus[name] = lu
                opened.append((lu, record))
            # Every LU's file first, then the clones' (and save areas'):
            # a clone whose path now names an LU's storage is refused
            # (target.filelocks), never mirrored onto it.
            unrecorded = []
            loaded = []
            for lu, record in opened:
                if lu.backend is not None and not record["owned"] and \
                        "storage" not in record:
                    unrecorded.append((lu.name, None, lu.file, lu.storage))
                if record.get("sessions") and lu.backend is not None:
                    self.session_ops.load_sessions(lu, record["sessions"])
                if record.get("clones") and lu.backend is not None:
                    self.clone_ops.load_group(lu, record, unrecorded)
                    loaded.append(self.groups[lu.name])
            self._record_storage(unrecorded)
            exported = sorted(n for n, lu in self.lus.items() if lu.healthy)
            # An LU opened after the start (its file back, its storage
            # accepted): what its clones ran goes on, as start() does.
            # Started here, under the lock, so that a stop or a reload
            # does not come between.
            if self.started:
                for group in loaded:
                    self._resume(group)
        return exported

    @staticmethod
    def _resume(group):
        clone = group.resume()
        if clone is not None:
            log.info("resuming %s of clone %s", clone.state, clone.name)

    def _record_storage(self, unrecorded):
        """Records made before storage identities were: what their paths
        name at this first opening is what later ones are checked
        against."""
        try:
            inventory.record_storage(self.state_dir, unrecorded)
        except (errors.Error, OSError) as e:
            log.warning("the storage of %s is not recorded (not checked "
                        "until a start records it): %s", ", ".join(
                            c or n for n, c, _, _ in unrecorded), e)

    def lu_accept_storage(self, name):
        """Take what the path of LU name names now as its storage
        (`clonectl lu accept-storage`), and open the LU if it was
        refused."""
        with self.config_lock:
            lu = self.lus.get(name)
            served = getattr(lu.backend, "fd", None) if lu is not None \
                and lu.error is None else None
            _, _, record = inventory.accept_storage(self.state_dir, name,
                                                    served=served)
            self.reload()
            lu = self.lus.get(name)
        return {"name": name, "file": record["file"],
                "storage": record.get("storage"),
                "error": "not loaded" if lu is None else lu.error}

    def _retire(self, lu):
        lu.removed = True
        group = self.groups.pop(lu.name, None)
        if group is not None:
            group.close()
        for name in [n for n, s in self.sessions.items() if s.source is lu]:
            self.sessions.pop(name).close()
        if lu.connections == 0 and not self.gateway.held[lu]:
            lu.close()

    def _exportable(self):
        """name -> object serving it: healthy LUs and fractured clones."""
        out = {n: lu for n, lu in self.lus.items()
               if lu.healthy and n not in self.gateway.withdrawn}
        for group in self.groups.values():
            for name, clone in group.clones.items():
                if clone.state in clones.EXPORTED and not clone.broken \
                        and name not in self.gateway.withdrawn:
                    out[name] = clone.export
        for session in self.sessions.values():
            if session.marked and session.export and session.source.healthy:
                out[session.export_name()] = sessions.FrozenExport(session)
        return out

    def clone_sources(self):
        """{clone name: its Source's name}, for the export rules
        (access.rules_source)."""
        with self.lock:
            return {name: group.source.name
                    for group in self.groups.values()
                    for name in group.clones}

    def exports(self):
        with self.lock:
            out = []
            for name, obj in sorted(self._exportable().items()):
                if isinstance(obj, clones.CloneExport):
                    desc = "clonectl fractured clone {} of {} ({} bytes)".format(
                        name, obj.clone.group.source.name, obj.size)
                elif isinstance(obj, sessions.FrozenExport):
                    desc = ("clonectl frozen image of {} marked by session {} "
                            "({} bytes, read-only)".format(
                                obj.session.source.name, obj.session.name,
                                obj.size))
                else:
                    desc = "clonectl LU {} ({} bytes{})".format(
                        name, obj.size, ", read-only" if obj.readonly else "")
                out.append((name, desc))
            return out

    def export_modes(self):
        """{name: readonly} of the exports the iSCSI gateway serves: LUs and
        fractured clones (frozen session images are left out), in the mode
        a connection to them gets; those a connection would be refused
        (an inconsistent secondary's volumes) are left out too."""
        with self.lock:
            modes = {}
            for name, obj in self._exportable().items():
                if isinstance(obj, sessions.FrozenExport):
                    continue
                try:
                    modes[name] = self._mode(obj, False)
                except errors.Error:
                    pass
            return modes

    def _resolve(self, name, readonly):
        """(object serving export name, readonly) after every check a
        connection must pass, host or gateway alike; under self.lock."""
        exportable = self._exportable()
        obj = exportable.get(name)
        if obj is None:
            lu = self.lus.get(name)
            if lu is not None and lu.held:
                raise LUHeld(name=name, reason=lu.held)
            why = self.gateway.reason(name)
            if why is not None:
                raise LUHeld(name=name, reason=why)
            if name == "":
                raise errors.InvalidArgument(
                    reason="an export name is required; exports: " +
                    (", ".join(sorted(exportable)) or "none"))
            raise errors.UnknownLU(name=name)
        return obj, self._mode(obj, readonly)

    @staticmethod
    def _mode(obj, readonly):
        """Whether a connection to export obj is read-only; raises if no
        connection may open it now."""
        replica = getattr(obj, "rsg", None)
        if replica is not None and replica.role == replication.SECONDARY:
            # Written by replication only, readable while consistent.
            replica.check_readable(obj)
            readonly = True
        return bool(readonly or obj.readonly)

    def connect(self, name, readonly):
        with self.lock:
            export = self.gateway.export_of(name)
            if export is not None:
                # The iSCSI gateway's mount: the same checks, counted apart
                # so that clone sync is not refused because of it (the
                # target goes when the export does; iscsi.py).
                obj, readonly = self._resolve(export, readonly)
                self.gateway.opened(obj)
                return Connection(obj, readonly, gateway=True)
            obj, readonly = self._resolve(name, readonly)
            if isinstance(obj, clones.CloneExport):
                obj.clone.connections += 1
            elif isinstance(obj, sessions.FrozenExport):
                with obj.session.cond:
                    obj.session.export_connections += 1
            else:
                obj.connections += 1
            return Connection(obj, readonly)

    def disconnect(self, conn):
        with self.lock:
            obj = conn.export
            if conn.gateway:
                self.gateway.closed(obj)
            elif isinstance(obj, clones.CloneExport):
                obj.clone.connections -= 1
                return
            elif isinstance(obj, sessions.FrozenExport):
                with obj.session.cond:
                    obj.session.export_connections -= 1
                return
            else:
                obj.connections -= 1
            if isinstance(obj, LogicalUnit) and obj.removed and \
                    obj.connections == 0 and not self.gateway.held[obj]:
                obj.close()

    def host_users(self, lu):
        """Connections that may write lu: NBD hosts and the iSCSI
        gateway's mounts (an initiator writes through those); under
        self.lock, with lu withdrawn (withheld) if none may open after."""
        return lu.connections + self.gateway.held[lu]

    def with_gateway(self, st, obj):
        st["gateway_connections"] = self.gateway.held[obj]
        return st

    def status(self):
        with self.lock:
            return {"pid": os.getpid(),
                    "lus": [self.with_gateway(lu.status(), lu)
                            for _, lu in sorted(self.lus.items())],
                    "clones": [self.with_gateway(g.clone_status(c), c.export)
                               for _, g in sorted(self.groups.items())
                               for _, c in sorted(g.clones.items())],
                    "sessions": [s.status() for _, s in
                                 sorted(self.sessions.items())],
                    "rsgs": [r.status() for _, r in sorted(self.rsgs.items())],
                    "recovery_problems": self.recovery_problems}

    # ------------------------------------------------------------ operations
    # The operations of the orchestrations, as methods of the Target.

    clone_add = _forward("clone_ops", "clone_add")
    clone_remove = _forward("clone_ops", "clone_remove")
    clone_list = _forward("clone_ops", "clone_list")
    clone_status = _forward("clone_ops", "clone_status")
    clone_map = _forward("clone_ops", "clone_map")
    clone_picture = _forward("clone_ops", "clone_picture")
    clone_sync = _forward("clone_ops", "clone_sync")
    clone_reverse_sync = _forward("clone_ops", "clone_reverse_sync")
    clone_restore = _forward("clone_ops", "clone_restore")
    clone_fracture = _forward("clone_ops", "clone_fracture")
    session_create = _forward("session_ops", "session_create")
    session_delete = _forward("session_ops", "session_delete")
    session_list = _forward("session_ops", "session_list")
    session_status = _forward("session_ops", "session_status")
    session_map = _forward("session_ops", "session_map")
    session_mark = _forward("session_ops", "session_mark")
    session_unmark = _forward("session_ops", "session_unmark")
    session_transfer = _forward("session_ops", "session_transfer")
    session_update = _forward("session_ops", "session_update")
    image_status = _forward("session_ops", "image_status")
    image_protect = _forward("session_ops", "image_protect")
    image_release = _forward("session_ops", "image_release")
    image_rollback = _forward("session_ops", "image_rollback")
    rsg_create = _forward("rsg_ops", "rsg_create")
    rsg_delete = _forward("rsg_ops", "rsg_delete")
    rsg_list = _forward("rsg_ops", "rsg_list")
    rsg_status = _forward("rsg_ops", "rsg_status")
    rsg_set = _forward("rsg_ops", "rsg_set")
    rsg_link = _forward("rsg_ops", "rsg_link")
    rsg_unlink = _forward("rsg_ops", "rsg_unlink")
    rsg_attach = _forward("rsg_ops", "rsg_attach")
    rsg_detach = _forward("rsg_ops", "rsg_detach")
    rsg_promote = _forward("rsg_ops", "rsg_promote")
    rsg_demote = _forward("rsg_ops", "rsg_demote")

    def prepare_stop(self):
        """Stop engines (they resume at the next start) and commit maps."""
        with self.lock:
            self.started = False        # a reload now starts none
            groups = list(self.groups.values())
        for group in groups:
            group.stop_engine()
            if group.clones:
                group.commit()
        for session in list(self.sessions.values()):
            if session.layer is not None:
                # nbdkit may be killed next (a client stays connected):
                # every write acknowledged is on the Source by then, and
                # none is acknowledged before it is from now on.
                session.layer.drain(defer=False)
            session.stop_engine()
        for rsg in list(self.rsgs.values()):
            if rsg.role == replication.PRIMARY:
                for link in rsg.links:
                    link.stop()
                rsg.persist()
                rsg.clear_activity_log()
        return {}

    def close(self):
        with self.lock:
            self.closing = True
        if self.watcher is not None:
            self.watcher.stop()
        self.rsg_ops.close()
        with self.lock:
            for group in self.groups.values():
                group.close()
            self.groups.clear()
            for session in self.sessions.values():
                session.close()
            self.sessions.clear()
            for lu in self.lus.values():
                lu.close()
            self.lus.clear()
