"""The target: the one object that owns every LU of a state directory.

It lives inside the nbdkit process (created by the plugin) and is also used
directly by unit tests.  Host I/O arrives through Connection objects (one per
NBD connection, the plugin's handle); control requests arrive through the
control socket (target.control) and end up in the methods of Target.

Design notes
- Range and read-only checks are done by nbdkit before the plugin is called
  (it knows each export's size and can_write).  LogicalUnit checks again, but
  only on the paths that change data, because engines call it directly too.
- The per-request path is kept short: no locks, no counters.  Connection
  counts change at open/close only, under Target.lock.  LogicalUnit.read is
  the top of the LU's I/O stack itself (an instance attribute, one Python
  frame less per read: measurable at 4 KiB).  Features never patch the LU:
  each puts a layer in its slot of the stack (target/iostack.py says the
  order and why), and the stack rebinds read when a layer changes.
- An LU whose backing file cannot be opened is kept in the inventory with its
  error, shown by status and not exported; the other LUs are still served.
"""

import collections
import contextlib
import errno
import functools
import hmac
import json
import logging
import os
import threading
import time

from . import (backends, clones, errors, events, fsutil, iostack, iscsi, maps,
               peer, replication, sessions, state, units)

log = logging.getLogger("clonectl.target")


def _one_change_at_a_time(method):
    """A Target method that changes the configuration (clone add and
    remove, session create and delete): each reads what exists, then makes
    its part (a clone group, a sessions layer) if it is missing, so two must
    not interleave."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.config_lock:
            return method(self, *args, **kwargs)
    return locked

# How long `clone remove` waits for the iSCSI gateway to let go of the
# clone's export once it is withdrawn: the manager looks at the exports
# every second (server.ISCSI_POLL) and removes a target in well under one.
GATEWAY_LET_GO_TIMEOUT = 10.0

# clone_map: the cells of a picture by default and at most, and the kind of
# extent each code means.
MAP_CELLS = 2048
MAP_CELLS_MAX = 1 << 20
_MAP_KINDS = {0: "clean", 1: "dirty", 2: "pending", 3: "protected"}

# Control operations that change nothing (the others make the event
# watcher look for what they changed).
_READ_ONLY_OPS = {"ping", "status", "export_modes", "clone_list",
                  "clone_status", "session_list", "session_status",
                  "image_status", "rsg_list", "rsg_status"}


class LogicalUnit:
    """An LU: its inventory record and its I/O stack (target.iostack).

    Every reader and writer of the LU's bytes enters the stack: hosts at
    the top (read, write, ...), engines below their own layer.  `backend`
    is the backing file itself, under every layer.
    """

    def __init__(self, name, record, backend=None):
        self.name = name
        self.size = record["size"]
        self.file = record["file"]
        self.readonly = record["readonly"]
        self.connections = 0
        self.removed = False
        self.error = None
        self.rsg = None         # the replicated group it belongs to
        # Why it is not served although its file is fine: a volume of a
        # replicated group that did not load (writes would not be logged).
        self.held = None
        self.backend = backend
        self.stack = None
        if backend is None:
            try:
                state.probe_backing(self.file, self.size, self.readonly)
                self.backend = backends.FileBackend(self.file, self.readonly)
            except (errors.Error, OSError) as e:
                self.error = str(e)
        if self.backend is not None:
            self.stack = iostack.IOStack(self.backend, on_change=self._bind)

    def _bind(self, top):
        # read is the top's own bound method: one frame less per request.
        self._top = top
        self.read = top.readinto

    @property
    def healthy(self):
        return self.backend is not None and not self.removed and \
            self.held is None

    def _check_write(self, offset, length):
        if self.readonly:
            raise errors.ReadOnly(name=self.name)
        if offset < 0 or length < 0 or offset + length > self.size:
            raise errors.OutOfRange(name=self.name, offset=offset,
                                    length=length, size=self.size)

    # Data path (read is bound by _bind).

    def write(self, buf, offset, fua=False):
        self._check_write(offset, len(buf))
        self._top.write(buf, offset, fua)

    def flush(self):
        self._top.flush()

    def trim(self, offset, length, fua=False):
        self._check_write(offset, length)
        self._top.trim(offset, length, fua)

    def zero(self, offset, length, may_trim=False, fast=False, fua=False):
        self._check_write(offset, length)
        self._top.zero(offset, length, may_trim, fast, fua)

    def extents(self, offset, length):
        return self._top.extents(offset, length)

    def close(self):
        if self.backend is not None:
            self.backend.close()

    def status(self):
        return {
            "name": self.name,
            "size": self.size,
            "file": self.file,
            "readonly": self.readonly,
            "exported": self.healthy,
            "connections": self.connections,
            "error": self.error or self.held,
        }


class Connection:
    """One NBD connection to one LU: the plugin's handle."""

    __slots__ = ("lu", "readonly", "gateway")

    def __init__(self, lu, readonly, gateway=False):
        self.lu = lu
        self.readonly = readonly
        # The iSCSI gateway's mount: counted in Target.gateway_held, not as
        # a host connection.
        self.gateway = gateway


class Target:
    """All LUs of a state directory and their clone groups.

    Clone operations run here, in the process that serves host I/O (the
    nbdkit plugin), or in a short-lived offline Target created by the CLI
    when no server runs; engines are only started by start().
    """

    def __init__(self, state_dir, gateway_secret=None):
        self.state_dir = state.StateDir(state_dir)
        self.state_dir.ensure()
        self.lock = threading.Lock()
        # The iSCSI gateway's route (iscsi.py): export names
        # GATEWAY_PREFIX + secret + ":" + NAME, usable only with the secret
        # of this server start; None: no route.
        self.gateway_secret = gateway_secret
        # Export object -> the gateway's connections to it; let_go is
        # notified when one ends.
        self.gateway_held = collections.Counter()
        self.let_go = threading.Condition(self.lock)
        # Clones whose removal waits for the gateway: not exported meanwhile.
        self.withdrawn = set()
        self.lus = {}
        self.groups = {}
        self.sessions = {}
        # LU name -> the internal session holding its protected image; only
        # what is recorded here is an image (never a session of that name).
        self.images = {}
        self.rsgs = {}
        self.config_lock = threading.RLock()    # _one_change_at_a_time
        self.replica_server = None
        self.closing = False
        self.recovery_problems = []
        self.rsg_failures = {}  # group name -> why it was not loaded
        self.rsg_dir = os.path.join(self.state_dir.path, "rsg")
        # Every state change, for `clonectl events` (target/events.py):
        # emitted from the engines' persist callbacks, the rest found by
        # the watcher started with the engines.
        self.events = events.EventBus()
        self.watcher = None
        self._session_seen = {}
        self.reload()
        self._load_rsgs()

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
        for group in self.groups.values():
            clone = group.resume()
            if clone is not None:
                log.info("resuming %s of clone %s", clone.state, clone.name)
        for rsg in self.rsgs.values():
            if rsg.role == replication.PRIMARY:
                rsg.start()
        self.watcher = events.Watcher(self.events, self.status)
        self.watcher.start()

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

    def _changed(self, kind, name, **fields):
        if self.watcher is not None:
            self.watcher.note(kind, name, fields)
        else:
            self.events.emit(kind, name, **fields)

    def _poking(self, op):
        """op, followed by a look for the changes it made (events)."""
        @functools.wraps(op)
        def run(**args):
            try:
                return op(**args)
            finally:
                if self.watcher is not None:
                    self.watcher.poke()
        return run

    # ------------------------------------------------------------ replication

    def _rsg_files(self, name):
        fsutil.makedirs_durable(self.rsg_dir)
        return replication.GroupFiles(self.rsg_dir, name)

    def _load_rsgs(self):
        if not os.path.isdir(self.rsg_dir):
            return
        for fn in sorted(os.listdir(self.rsg_dir)):
            if not fn.endswith(".json") or fn.startswith("."):
                continue
            name = fn[:-5]
            try:
                files = self._rsg_files(name)
                self._open_rsg(files, files.load())
            except (errors.Error, OSError, KeyError, TypeError) as e:
                log.error("replicated group %s: %s", name, e)
                self.rsg_failures[name] = "not loaded: {}".format(e)
                self.recovery_problems.append(
                    {"rsg": name, "message": self.rsg_failures[name]})
                self._hold_volumes(name, "a volume of replicated group {}, "
                                   "which did not load ({}); not served "
                                   "until it loads or is deleted, so no "
                                   "write escapes its log".format(name, e))

    def _hold_volumes(self, name, reason):
        """Hold (reason) or release (None) the LUs a group's record names,
        as far as it can be read."""
        try:
            with open(replication.GroupFiles(self.rsg_dir, name).record) as f:
                volumes = json.load(f).get("volumes")
            names = [v.get("lu") for v in volumes]
        except (OSError, ValueError, AttributeError, TypeError):
            return      # unreadable: nothing names its volumes
        for lu_name in names:
            lu = self.lus.get(lu_name) if isinstance(lu_name, str) else None
            if lu is not None and lu.rsg is None:
                lu.held = reason

    def _failed_rsg_status(self, name):
        files = replication.GroupFiles(self.rsg_dir, name).on_disk()
        return {"name": name, "role": None, "loaded": False,
                "error": self.rsg_failures[name],
                "files": [os.path.relpath(p, self.state_dir.path)
                          for p in files]}

    def _check_group_files_free(self, name):
        """A group name whose files are on disk is not free: a group that
        failed to load (or a create that crashed) left them, and making a
        new group would silently wipe its SRL and DCMs."""
        files = replication.GroupFiles(self.rsg_dir, name).on_disk()
        if name in self.rsg_failures or files:
            raise replication.ReplicationError(
                name=name, reason="files of a group of that name are in the "
                "state directory ({}){}; repair or restore them and restart "
                "the server, or remove them with `clonectl rsg delete {}`"
                .format(", ".join(os.path.relpath(p, self.state_dir.path)
                                  for p in files),
                        ": it was " + self.rsg_failures[name]
                        if name in self.rsg_failures else "", name))

    def _rsg_volumes(self, names):
        vols = []
        for n in names:
            lu = self.lus.get(n)
            if lu is None or not lu.healthy:
                raise errors.UnknownLU(name=n)
            vols.append(lu)
        return vols

    def _open_rsg(self, files, record):
        vols = self._rsg_volumes([v["lu"] for v in record["volumes"]])
        for lu, v in zip(vols, record["volumes"]):
            if lu.size != v["size"]:
                raise replication.ReplicationError(
                    name=record["name"], reason="LU {} is now {} bytes, the "
                    "group was made with {}".format(lu.name, lu.size,
                                                    v["size"]))
        if record["role"] == replication.PRIMARY:
            rsg = replication.PrimaryGroup(
                files, record, vols,
                volume_change=lambda: self._volume_change_running(vols))
            rsg.attach()
            self.recovery_problems += [{"rsg": rsg.name, "message": p}
                                       for p in rsg.problems]
        else:
            rsg = replication.SecondaryGroup(
                files, record, vols, protect=lambda lu: self.image_protect(
                    lu.name), release=lambda lu: self.image_release(lu.name),
                volume_change=lambda: self._volume_change_running(vols))
            rsg.attach()
        for lu in vols:
            lu.rsg = rsg
        self.rsgs[rsg.name] = rsg
        return rsg

    def _close_rsg(self, rsg):
        # Out of the volumes' I/O stacks first: no write may reach a
        # group whose log and maps are closed.
        rsg.detach()
        rsg.close()
        for lu in rsg.volumes:
            lu.rsg = None
        self.rsgs.pop(rsg.name, None)

    def _volume_change_running(self, vols):
        for lu in vols:
            group = self.groups.get(lu.name)
            if group is None:
                continue
            for c in group.clones.values():
                if c.state in (clones.RESTORING, clones.REVERSE_SYNCING):
                    return "the {} of {} from clone {}".format(
                        c.state.replace("ing", ""), lu.name, c.name)
        return None

    @staticmethod
    def _check_not_grouped(name, lu):
        if lu.rsg is not None:
            raise replication.ReplicationError(
                name=name, reason="LU {} already belongs to group {}".format(
                    lu.name, lu.rsg.name))

    def _rsg(self, name, role=None):
        rsg = self.rsgs.get(name)
        if rsg is None:
            raise replication.UnknownGroup(name=name)
        if role is not None and rsg.role != role:
            raise replication.ReplicationError(
                name=name, reason="this node is its {}; that is done on the "
                "{}".format(rsg.role, role))
        return rsg

    def start_replication(self, bind, port, token_file):
        """Listen for primaries (serve --replication-port)."""
        token = replication.read_token(token_file)
        self.replica_server = replication.ReplicaServer(
            bind, int(port), token, self._accept_primary)
        self.replica_server.start()

    def _accept_primary(self, hello, peer_host):
        """A primary's hello: the secondary group to serve, made on first
        contact from LUs of the same names and sizes."""
        name = hello.get("group")
        units.check_name(name if isinstance(name, str) else "")
        with self.lock:
            if self.closing:
                # A group made now would be served after close() shut the
                # others down, into a closed target.
                raise replication.ReplicationError(
                    name=name, reason="this node is stopping")
            rsg = self.rsgs.get(name)
            if rsg is not None and rsg.role == replication.PRIMARY:
                raise replication.ReplicationError(
                    name=name, reason="this node is itself its primary: two "
                    "primaries; demote one (`clonectl rsg demote {}`)"
                    .format(name))
            if rsg is not None:
                return rsg
            self._check_group_files_free(name)
            vols = hello.get("volumes") or []
            if not isinstance(vols, list) or not all(
                    isinstance(v, dict) and isinstance(v.get("lu"), str)
                    for v in vols):
                raise replication.ReplicationError(
                    name=name, reason="the primary's hello has no valid "
                    "list of volumes")
            names = [v.get("lu") for v in vols]
            for v in vols:
                lu = self.lus.get(v.get("lu"))
                if lu is None or not lu.healthy:
                    raise replication.ReplicationError(
                        name=name, reason="this node has no LU {!r}; create "
                        "the volumes here first (same names and sizes)"
                        .format(v.get("lu")))
                if lu.size != v.get("size"):
                    raise replication.ReplicationError(
                        name=name, reason="LU {} is {} bytes here and {} on "
                        "the primary; the sizes must match".format(
                            lu.name, lu.size, v.get("size")))
                self._check_not_grouped(name, lu)
                users = lu.connections + self.gateway_held[lu]
                if users:
                    raise replication.ReplicationError(
                        name=name, reason="LU {} has {} host connection(s) "
                        "(NBD or the iSCSI gateway); a secondary's volumes "
                        "are written by replication only".format(lu.name,
                                                                 users))
            record = {"name": name, "role": replication.SECONDARY,
                      "granularity": int(hello.get("granularity") or
                                         replication.DEFAULT_GRANULARITY),
                      "volumes": [{"lu": n, "size": self.lus[n].size}
                                  for n in names],
                      "history": [], "applied_seq": 0, "consistent": False}
            files = self._rsg_files(name)
            files.save(record)
            log.info("replicated group %s: secondary of %s", name, peer_host)
            return self._open_rsg(files, record)

    def rsg_create(self, name, volumes, srl_size, granularity=None):
        units.check_name(name)
        if not volumes:
            raise errors.InvalidArgument(reason="a group needs at least one "
                                         "volume (--volume LU)")
        if len(set(volumes)) != len(volumes):
            raise errors.InvalidArgument(reason="a volume is given twice")
        srl = units.parse_size(srl_size)
        if srl < replication.MIN_SRL:
            raise errors.InvalidArgument(
                reason="--srl-size must be at least 1M")
        g = units.parse_size(granularity) if granularity else \
            replication.DEFAULT_GRANULARITY
        clones.check_granularity(g)
        with self.lock:
            if name in self.rsgs:
                raise replication.ReplicationError(name=name,
                                                   reason="it exists already")
            self._check_group_files_free(name)
            vols = self._rsg_volumes(volumes)
            for lu in vols:
                self._check_not_grouped(name, lu)
                if lu.readonly:
                    raise errors.ReadOnly(name=lu.name)
            files = self._rsg_files(name)
            gen = replication.new_generation()
            record = {"name": name, "role": replication.PRIMARY,
                      "granularity": g, "srl_size": srl,
                      "volumes": [{"lu": lu.name, "size": lu.size}
                                  for lu in vols],
                      "generation": gen, "history": [[gen, 1]],
                      "next_seq": 1, "links": []}
            files.remove_all()
            rsg = None
            try:
                rsg = self._open_rsg(files, record)
                rsg.persist()
            except BaseException as e:
                # Nothing half made: the group (and its layers) closed, its
                # files gone.
                if rsg is not None:
                    self._close_rsg(rsg)
                files.remove_all()
                if isinstance(e, OSError):
                    raise replication.ReplicationError(
                        name=name, reason="its files could not be made in "
                        "{}: {}".format(self.rsg_dir, e.strerror)) from e
                raise
        return rsg.status()

    def rsg_delete(self, name):
        if name not in self.rsgs:
            files = replication.GroupFiles(self.rsg_dir, name)
            if name in self.rsg_failures or files.on_disk():
                # What a group that failed to load (or a crashed create)
                # left: the admin clears the name.
                self._hold_volumes(name, None)
                files.remove_all()
                self.rsg_failures.pop(name, None)
                self.recovery_problems = [p for p in self.recovery_problems
                                          if p.get("rsg") != name]
                return {"name": name}
        rsg = self._rsg(name)
        if rsg.role == replication.SECONDARY and \
                rsg.connected_since is not None:
            raise replication.GroupBusy(name=name, reason="a primary is "
                                        "connected; detach its link first")
        self._close_rsg(rsg)
        rsg.files.remove_all()
        return {"name": name}

    def rsg_list(self):
        rows = {n: r.status() for n, r in self.rsgs.items()}
        rows.update((n, self._failed_rsg_status(n)) for n in self.rsg_failures)
        return [st for _, st in sorted(rows.items())]

    def rsg_status(self, name):
        if name in self.rsg_failures and name not in self.rsgs:
            return self._failed_rsg_status(name)
        return self._rsg(name).status()

    def rsg_link(self, name, secondary, mode="async", token_file=None):
        rsg = self._rsg(name, replication.PRIMARY)
        if mode not in replication.MODES:
            raise errors.InvalidArgument(reason="--mode must be sync or async")
        if not token_file:
            raise errors.InvalidArgument(
                reason="a link needs --token-file (the secondary's "
                       "--replication-token-file)")
        token_file = os.path.abspath(token_file)
        replication.read_token(token_file)
        rsg.add_link(replication.parse_secondary(secondary), mode, token_file)
        return rsg.status()

    def rsg_unlink(self, name, secondary):
        rsg = self._rsg(name, replication.PRIMARY)
        rsg.remove_link(rsg.link(replication.parse_secondary(secondary)))
        return rsg.status()

    def rsg_attach(self, name, secondary, discard_secondary_changes=False):
        rsg = self._rsg(name, replication.PRIMARY)
        rsg.attach_link(rsg.link(replication.parse_secondary(secondary)),
                        discard_secondary=discard_secondary_changes)
        return rsg.status()

    def rsg_detach(self, name, secondary):
        rsg = self._rsg(name, replication.PRIMARY)
        rsg.detach_link(rsg.link(replication.parse_secondary(secondary)))
        return rsg.status()

    def rsg_promote(self, name, force=False):
        """Make this secondary the primary of a new generation."""
        rsg = self._rsg(name, replication.SECONDARY)
        if rsg.connected_since is not None:
            raise replication.GroupBusy(
                name=name, reason="its primary is connected and replicating; "
                "promote only when the link is detached or the primary is "
                "unreachable (or demote the primary first)")
        if not rsg.consistent and not force:
            raise replication.GroupBusy(
                name=name, reason="this secondary is inconsistent ({}); its "
                "last consistent image is {}; roll the volumes back to it "
                "(`clonectl lu rollback LU`) or use --force".format(
                    rsg.reason, "protected (LU@protected-LU)"
                    if rsg.protected else "gone"))
        gen = replication.new_generation()
        history = rsg.history + [[gen, rsg.applied_seq + 1]]
        record = {"name": name, "role": replication.PRIMARY,
                  "granularity": rsg.granularity,
                  "srl_size": rsg.record_base.get("srl_size", 64 << 20),
                  "volumes": rsg.record_base["volumes"],
                  "generation": gen, "history": history,
                  "next_seq": rsg.applied_seq + 1, "links": [],
                  "since_promotion": True}
        files = rsg.files
        with self.lock:
            self._close_rsg(rsg)
            # A secondary uses neither the SRL nor the since map; its
            # staged batches stay until the primary record is saved.
            files.remove([files.srl, files.since()])
            since = replication.Dcm(files.since(), record["granularity"],
                                    [v["size"] for v in record["volumes"]],
                                    fresh_value=0)
            # What this node changed that the others never got (its own
            # unacknowledged writes when it was primary, a restore done
            # while detached) differs there as much as what it writes from
            # now on: the first contact copies both.
            diverged = rsg.diverged or {}
            for vol, off, length in diverged.get("runs", []):
                since.mark(vol, off, length)
            if diverged.get("all"):
                since.mark_all()
            since.close()
            self._save_role(files, record)
            files.remove(files.stage)
            new = self._open_rsg(files, record)
            new.persist()
        new.start()
        log.info("replicated group %s promoted: generation %s", name, gen)
        return new.status()

    def rsg_demote(self, name):
        """Make this primary a secondary; it reports the regions it wrote
        that no secondary acknowledged (what may have diverged)."""
        rsg = self._rsg(name, replication.PRIMARY)
        busy = [lu.name for lu in rsg.volumes if lu.connections]
        if busy:
            raise replication.GroupBusy(
                name=name, reason="LU {} has host connections; stop the "
                "hosts first, so no write lands after the demotion"
                .format(busy[0]))
        # The iSCSI gateway mounts every volume: it lets go first (no
        # write may land between the regions reported below and the
        # guard), and mounts them again, read-only, as a secondary's.
        withdrawn = []
        try:
            for lu in rsg.volumes:
                withdrawn.append(lu.name)
                self._withdraw(lu.name, lu)
            return self._demote(rsg)
        finally:
            with self.lock:
                self.withdrawn.difference_update(withdrawn)

    def _demote(self, rsg):
        name = rsg.name
        files = rsg.files
        last = rsg.next_seq - 1
        with rsg.cond:
            for link in rsg.links:
                rsg.to_logging(link)
            # What some node may lack: what a link has not acknowledged,
            # and what changed here since the promotion (a link made just
            # now has not taken that into its DCM yet).
            dcms = [link.dcm for link in rsg.links]
            if rsg.since is not None:
                dcms.append(rsg.since)
            union = bytearray(dcms[0].bits) if dcms else None
            for dcm in dcms[1:]:
                union = bytearray(a | b for a, b in zip(union, dcm.bits))
            runs = [list(r) for r in dcms[0].runs(union)] \
                if union is not None else []
        record = {"name": name, "role": replication.SECONDARY,
                  "granularity": rsg.granularity,
                  "srl_size": rsg.srl.capacity,
                  "volumes": rsg.record_base["volumes"],
                  "history": rsg.history, "last_seq": last,
                  "applied_seq": last, "consistent": True,
                  "diverged": {"runs": runs, "all": False}}
        with self.lock:
            self._close_rsg(rsg)
            self._save_role(files, record)
            files.remove(files.dcms() + [files.srl, files.since()])
            new = self._open_rsg(files, record)
        log.info("replicated group %s demoted: secondary from sequence %d, "
                 "%d regions not acknowledged by a secondary", name, last,
                 len(runs))
        return new.status()

    def lu_create(self, name, size=None, file=None, readonly=False):
        """Add an LU to the inventory and export it (`clonectl lu create`
        while a server runs).  file must be absolute: this process does not
        share the caller's working directory."""
        if file is not None and not (isinstance(file, str) and
                                     os.path.isabs(file)):
            raise errors.InvalidArgument(
                reason="file must be an absolute path, not {!r}".format(file))
        record = state.create_lu(self.state_dir, name, size=size, file=file,
                                 readonly=readonly)
        self.reload()
        lu = self.lus.get(name)
        return {"record": record,
                "error": "not loaded" if lu is None else lu.error}

    def lu_delete(self, name):
        """Delete an LU while serving (`clonectl lu delete`).

        Refused while hosts are connected to it or a clone, session or
        replicated group uses it; the other LUs are not touched.  The
        iSCSI gateway's mount does not refuse it: the LU stops being
        exported (the manager then removes its iSCSI target) and its file
        is closed when the gateway's connection ends.

        Lock order: Target.lock before the state-file lock, as everywhere
        (a group's lock, taken under Target.lock, persists under it)."""
        with self.lock:
            lu = self.lus.get(name)
            if lu is not None and lu.connections:
                raise errors.LUBusy(
                    name=name, reason="{} host connection(s) are open to it; "
                    "disconnect them first".format(lu.connections))

            def check_busy(n, record):
                reason = self._lu_user(lu, n, record)
                if reason:
                    raise errors.LUBusy(name=n, reason=reason)

            record = state.delete_lu(self.state_dir, name,
                                     check_busy=check_busy)
            if lu is not None and self.lus.get(name) is lu:
                self._retire(self.lus.pop(name))
        log.info("LU %s deleted", name)
        return {"name": name, "record": record}

    def _lu_user(self, lu, name, record):
        """What uses LU name (its clones, sessions or group), or None."""
        reason = state.lu_user(self.state_dir, name, record)
        if reason is None and lu is not None and lu.rsg is not None:
            reason = "it is a volume of replicated group {}".format(
                lu.rsg.name)
        return reason

    def lu_resize(self, name, size):
        """Grow an LU while serving (`clonectl lu resize`).

        Connections opened from now on see the new size; nbdkit asks a
        connection's size once, at its handshake, so connections already
        open keep the old one (and nbdkit refuses their requests beyond
        it) until they reconnect.  Refused for LUs with clones, sessions
        or a replicated group: their maps and copies have the LU's size."""
        with self.lock:
            lu = self.lus.get(name)

            def check_busy(n, record):
                reason = self._lu_user(lu, n, record)
                if reason:
                    raise errors.LUResizeRefused(name=n, reason=reason)

            old, new = state.resize_lu(self.state_dir, name, size,
                                       check_busy=check_busy)
            if lu is not None and lu.backend is not None and \
                    lu.error is None:
                # Same file, same descriptor: the new bytes are there.
                lu.backend.size = new["size"]
                lu.size = new["size"]
        log.info("LU %s resized from %d to %d bytes", name, old["size"],
                 new["size"])
        return {"name": name, "old_size": old["size"], "record": new}

    def _save_role(self, files, record):
        """Save a closed group's record for its new role.  A save that
        fails (a full state directory) opens the group again as its saved
        record says, and raises: nothing changed."""
        try:
            files.save(record)
        except BaseException:
            old = self._open_rsg(files, files.load())
            if old.role == replication.PRIMARY:
                old.start()
            raise

    def reload(self):
        """Bring the LUs in line with state.json; return the exported names.

        New LUs are opened, LUs gone from the inventory stop being exported
        and are closed when their last connection ends.
        """
        with self.lock:
            # Read under the lock: lu_resize changes the record and the
            # open LU together under it, and an older record read before
            # would look like another LU and retire this one.
            doc = self.state_dir.load()
            for name, record in doc["lus"].items():
                lu = self.lus.get(name)
                if lu is not None and lu.file == record["file"] \
                        and lu.size == record["size"] \
                        and lu.readonly == record["readonly"] \
                        and lu.error is None:
                    continue
                if lu is not None:
                    self._retire(lu)
                lu = LogicalUnit(name, record)
                if lu.error:
                    log.error("LU %s is not exported: %s", name, lu.error)
                self.lus[name] = lu
                if record.get("sessions") and lu.backend is not None:
                    self._load_sessions(lu, record["sessions"])
                if record.get("clones") and lu.backend is not None:
                    self._load_group(lu, record)
            for name in [n for n in self.lus if n not in doc["lus"]]:
                self._retire(self.lus.pop(name))
            return sorted(n for n, lu in self.lus.items() if lu.healthy)

    def _load_group(self, lu, record):
        group = clones.CloneGroup(lu, record["granularity"],
                                  self.state_dir.maps_dir,
                                  self._persist_clone(lu.name))

        def open_clone(rec):
            state.probe_backing(rec["file"], lu.size)
            return backends.FileBackend(rec["file"])

        for who, problem in group.load(record["clones"], open_clone):
            log.error("clone group %s: %s", lu.name, problem)
            self.recovery_problems.append({"source": lu.name, "clone": who,
                                           "message": problem})
        self.groups[lu.name] = group

    def _load_sessions(self, lu, records):
        for name, rec in sorted(records.items()):
            # Images recorded before they were flagged have the image's
            # name and no destination (a user session always has one).
            image = rec.get("image") is True or (
                name == self._image_session_name(lu.name) and not rec["dests"])
            try:
                session = self._open_session(lu, name, rec, image=image)
                for problem in session.load():
                    self._session_problem(lu, name, problem)
            except (errors.Error, OSError) as e:
                self._session_problem(lu, name, "not loaded: {}".format(e))
                continue
            self._attach_session(lu, session)
            if image:
                self.images[lu.name] = session

    def _session_problem(self, lu, name, problem):
        log.error("session %s of %s: %s", name, lu.name, problem)
        self.recovery_problems.append({"source": lu.name, "session": name,
                                       "message": problem})

    def _open_session(self, lu, name, rec, image=False):
        self._session_seen[name] = (
            {"marked": rec["marked"], "error": rec.get("error"),
             "export": rec.get("export", False)}, rec.get("last_transfer"))
        save_path = self._save_area_path(lu.name, name)
        backend = backends.FileBackend(save_path)
        try:
            return sessions.Session(
                name, lu, rec["granularity"], self.state_dir.maps_dir,
                backend, rec["dests"], persist=self._persist_session(
                    lu.name, name, image), marked=rec["marked"],
                export=rec.get("export", False), error=rec.get("error"),
                save_area_size=rec["save_area"],
                last_transfer=rec.get("last_transfer"),
                token_file=rec.get("token_file"),
                mark_time=rec.get("mark_time"))
        except BaseException:
            backend.close()
            raise

    def _save_area_path(self, source, name):
        return os.path.join(self.state_dir.maps_dir,
                            "{}@{}.save".format(source, name))

    def _attach_session(self, lu, session):
        layer = lu.stack.get("sessions")
        if layer is None:
            layer = sessions.SessionLayer()
            lu.stack.set("sessions", layer)
        layer.add(session)
        self.sessions[session.name] = session

    def _detach_session(self, session):
        lu = session.source
        layer = lu.stack.get("sessions")
        if layer is not None:
            layer.remove(session)
            if not layer.sessions:
                # An LU without sessions pays nothing for them.
                lu.stack.remove("sessions", layer)
        self.sessions.pop(session.name, None)

    def _persist_session(self, source, name, image=False):
        def persist(record):
            if image:
                record = dict(record, image=True)
            with self.state_dir.locked():
                doc = self.state_dir.load()
                doc["lus"][source].setdefault("sessions", {})[name] = record
                self.state_dir.save(doc)
            self._session_persisted(name, record)
        return persist

    def _session_persisted(self, name, record):
        """Events of a session's record: marked or not, its error, and
        the end of a transfer (the record keeps the last one)."""
        seen = {"marked": record.get("marked"), "error": record.get("error"),
                "export": record.get("export")}
        last = record.get("last_transfer")
        before = self._session_seen.get(name)
        self._session_seen[name] = (seen, last)
        if before is None:
            return
        changed = {k: v for k, v in seen.items() if before[0].get(k) != v}
        if changed:
            self._changed("session", name, **changed)
        if last and last != before[1]:
            self._changed("transfer", name, result=last.get("result"),
                          bytes_sent=last.get("bytes_sent"),
                          transferring=False)

    def _persist_clone(self, source):
        def persist(name, clone_state, error=None, rate=None):
            with self.state_dir.locked():
                doc = self.state_dir.load()
                rec = doc["lus"][source]["clones"][name]
                rec["state"] = clone_state
                rec["error"] = error
                rec["rate"] = rate
                self.state_dir.save(doc)
            self._changed("clone", name, state=clone_state, error=error)
        return persist

    def _retire(self, lu):
        lu.removed = True
        group = self.groups.pop(lu.name, None)
        if group is not None:
            group.close()
        for name in [n for n, s in self.sessions.items() if s.source is lu]:
            self.sessions.pop(name).close()
        if lu.connections == 0 and not self.gateway_held[lu]:
            lu.close()

    def _clone(self, name):
        for group in self.groups.values():
            if name in group.clones:
                return group, group.clones[name]
        raise UnknownClone(name=name)

    def _exportable(self):
        """name -> object serving it: healthy LUs and fractured clones."""
        out = {n: lu for n, lu in self.lus.items()
               if lu.healthy and n not in self.withdrawn}
        for group in self.groups.values():
            for name, clone in group.clones.items():
                if clone.state in clones.EXPORTED and not clone.broken \
                        and name not in self.withdrawn:
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

    def _gateway_export(self, name):
        """The export a gateway name asks for, or None for a host's name.
        Without this server start's secret a gateway name is unknown: the
        route is the gateway's alone."""
        if not name.startswith(iscsi.GATEWAY_PREFIX):
            return None
        secret, sep, export = name[len(iscsi.GATEWAY_PREFIX):].partition(":")
        if self.gateway_secret is None or not sep or not hmac.compare_digest(
                secret.encode(), self.gateway_secret.encode()):
            raise errors.UnknownLU(name=name)
        return export

    def connect(self, name, readonly):
        with self.lock:
            export = self._gateway_export(name)
            if export is not None:
                # The iSCSI gateway's mount: the same checks, counted apart
                # so that clone sync is not refused because of it (the
                # target goes when the export does; iscsi.py).
                obj, readonly = self._resolve(export, readonly)
                self.gateway_held[obj] += 1
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
            obj = conn.lu
            if conn.gateway:
                self.gateway_held[obj] -= 1
                if not self.gateway_held[obj]:
                    del self.gateway_held[obj]
                self.let_go.notify_all()
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
                    obj.connections == 0 and not self.gateway_held[obj]:
                obj.close()

    def _host_users(self, lu):
        """Connections that may write lu: NBD hosts and the iSCSI
        gateway's mounts (an initiator writes through those)."""
        with self.lock:
            return lu.connections + self.gateway_held[lu]

    def _with_gateway(self, st, obj):
        st["gateway_connections"] = self.gateway_held[obj]
        return st

    def status(self):
        with self.lock:
            return {"pid": os.getpid(),
                    "lus": [self._with_gateway(lu.status(), lu)
                            for _, lu in sorted(self.lus.items())],
                    "clones": [self._with_gateway(g.clone_status(c), c.export)
                               for _, g in sorted(self.groups.items())
                               for _, c in sorted(g.clones.items())],
                    "sessions": [s.status() for _, s in
                                 sorted(self.sessions.items())],
                    "rsgs": [r.status() for _, r in sorted(self.rsgs.items())],
                    "recovery_problems": self.recovery_problems}

    # ------------------------------------------------------------ clones


    @_one_change_at_a_time
    def clone_add(self, source, clone, file=None, granularity=None):
        """Add a clone, out-of-sync with every extent dirty.

        Lock order: the group's lock may take the state-file lock (a state
        change is persisted under it), so the state-file lock is never held
        while entering the group.
        """
        units.check_name(clone)
        if granularity is not None:
            granularity = clones.check_granularity(units.parse_size(granularity))
        with self.state_dir.locked():
            doc = self.state_dir.load()
            record = doc["lus"].get(source)
            lu = self.lus.get(source)
            if record is None or lu is None:
                raise errors.UnknownLU(name=source)
            if lu.backend is None:
                raise errors.BackingUnusable(path=lu.file, reason=lu.error)
            state.check_name_free(doc, clone)
            group_gran = record.get("granularity") if record.get("clones") \
                else None
            if group_gran and granularity and granularity != group_gran:
                raise errors.InvalidArgument(
                    reason="the clone group of {!r} has granularity {}; all "
                           "its clones share it".format(source, group_gran))
            granularity = group_gran or granularity or \
                clones.DEFAULT_GRANULARITY
            if len(record.get("clones", {})) >= clones.MAX_CLONES:
                raise errors.InvalidArgument(
                    reason="source {!r} already has {} clones, the maximum"
                    .format(source, clones.MAX_CLONES))
            if file is None:
                path = os.path.join(self.state_dir.lus_dir, clone + ".img")
                owned = True
                state.check_backing_free(doc, path)
                state.create_sparse(path, lu.size)
            else:
                path = os.path.abspath(file)
                owned = False
                state.check_outside(self.state_dir, path)
                state.check_backing_free(doc, path)
                state.probe_backing(path, lu.size)
            try:
                backend = backends.FileBackend(path)
                group = self.groups.get(source) or clones.CloneGroup(
                    lu, granularity, self.state_dir.maps_dir,
                    self._persist_clone(source))
            except BaseException:
                if owned:
                    os.unlink(path)
                raise
        try:
            group.add_clone(clone, backend, file=path)
        except BaseException:
            backend.close()
            if owned:
                os.unlink(path)
            raise
        try:
            with self.state_dir.locked():
                doc = self.state_dir.load()
                record = doc["lus"][source]
                record.setdefault("clones", {})[clone] = {
                    "file": path, "owned": owned, "state": clones.OUT_OF_SYNC,
                    "error": None}
                record["granularity"] = granularity
                self.state_dir.save(doc)
        except BaseException:
            group.remove_clone(clone)
            backend.close()
            if owned:
                os.unlink(path)
            raise
        self.groups[source] = group
        return group.clone_status(group.clones[clone])


    @_one_change_at_a_time
    def clone_remove(self, clone):
        group, c = self._clone(clone)
        source = group.source.name
        rec = {}

        def persist():
            with self.state_dir.locked():
                doc = self.state_dir.load()
                record = doc["lus"][source]
                rec.update(record["clones"].pop(clone))
                if not record["clones"]:
                    del record["clones"]
                    record.pop("granularity", None)
                self.state_dir.save(doc)

        self._gateway_let_go(c)
        try:
            # Refuses while busy or exported; the inventory first, so a
            # save that fails leaves the clone in place.
            group.remove_clone(clone, persist)
        finally:
            with self.lock:
                self.withdrawn.discard(clone)
        c.backend.close()
        if not group.clones:
            del self.groups[source]
        if rec["owned"]:
            fsutil.remove_durably([rec["file"]])
        return {"name": clone, "file": rec["file"], "owned": rec["owned"]}

    def _gateway_let_go(self, c):
        """Before a clone is removed, the iSCSI gateway's mount of its
        export must be gone: its reads and writes use the clone's backing
        file, which the removal closes.

        Why wait rather than refuse: the gateway mounts every export, so
        refusing would leave a fractured clone removable only after a full
        resync.  Why not refuse sync too: a sync ends the export, which is
        what makes the gateway let go.  A removal that would be refused
        anyway (host connections, a running operation) is refused before
        anything is withdrawn."""
        with self.lock:
            if not self.gateway_held[c.export]:
                return
            if c.connections:
                raise clones.CloneInUse(event="remove", name=c.name,
                                        count=c.connections)
            if (c.state, "remove") not in clones.TRANSITIONS:
                return  # remove_clone refuses it with the reason
        self._withdraw(c.name, c.export)

    def _withdraw(self, name, obj):
        """Take export name (served by obj) away from the iSCSI gateway and
        wait until its connections to it have ended; the caller gives it
        back with `withdrawn.discard(name)` when done.

        While withdrawn the export is not exported (no new host or gateway
        connection, and export_modes stops naming it), so the manager
        removes its iSCSI target within its poll interval
        (Server._sync_gateway).  The wait holds no lock the gateway's path
        needs (let_go releases Target.lock), so it cannot deadlock the
        manager's sync; if the gateway has not let go within
        GATEWAY_LET_GO_TIMEOUT the export is given back and GatewayHolds
        is raised."""
        with self.lock:
            self.withdrawn.add(name)
            if self.let_go.wait_for(lambda: not self.gateway_held[obj],
                                    GATEWAY_LET_GO_TIMEOUT):
                return
            self.withdrawn.discard(name)
            raise GatewayHolds(name=name, timeout=GATEWAY_LET_GO_TIMEOUT)

    def clone_list(self, source=None):
        with self.lock:
            return [self._with_gateway(g.clone_status(c), c.export)
                    for n, g in sorted(self.groups.items())
                    if source is None or n == source
                    for _, c in sorted(g.clones.items())]

    def clone_picture(self, clone, cells=MAP_CELLS):
        """The picture of clone's map for the status page, compactly: per kind of extent the
        runs [start, end) in extents.  Kinds: clean, dirty (differs from the
        Source); during a protected restore pending (still to copy to the
        Source) and protected (written by hosts, never copied over).  A map
        of more than cells extents is folded: each run then covers whole
        cells of `scale` extents and a cell shows its most notable kind."""
        group, c = self._clone(clone)
        cells = max(1, min(int(cells), MAP_CELLS_MAX))
        with group.cond:
            delta = bytes(c.delta)
            restoring = group.restoring is c
            prm = bytes(group.prm) if restoring else None
        n = len(delta)
        if restoring:
            # 0 clean, 2 pending (in the Delta Map, not in the PRM),
            # 3 protected (in the PRM).
            codes = bytes((3 if p else d * 2) for d, p in zip(delta, prm))
        else:
            codes = delta
        counts = {k: codes.count(code) for code, k in _MAP_KINDS.items()}
        scale = max(1, -(-n // cells))
        if scale > 1:
            codes = bytes(max(codes[i:i + scale]) for i in range(0, n, scale))
        runs = {k: [] for k in _MAP_KINDS.values()}
        start = 0
        for i in range(1, len(codes) + 1):
            if i == len(codes) or codes[i] != codes[start]:
                runs[_MAP_KINDS[codes[start]]].append(
                    [start * scale, min(i * scale, n)])
                start = i
        for k in ("dirty",) if restoring else ("pending", "protected"):
            del runs[k], counts[k]
        return {"name": c.name, "source": group.source.name,
                "state": c.state, "extents": n,
                "granularity": group.granularity, "scale": scale,
                "counts": counts, "runs": runs}

    def clone_status(self, clone):
        group, c = self._clone(clone)
        with self.lock:
            return self._with_gateway(group.clone_status(c), c.export)

    def clone_map(self, clone):
        """{"granularity", "size", "runs": [[offset, length, kind], ...]}
        of the clone's extents (CloneGroup.clone_map says the kinds)."""
        group, c = self._clone(clone)
        out = group.clone_map(c)
        out.update(name=clone, source=group.source.name, state=c.state)
        return out

    def session_map(self, name):
        """The same for a session's maps (Session.map_runs)."""
        session = self._session(name)
        out = session.map_runs()
        out.update(name=name, source=session.source.name,
                   marked=session.marked)
        return out

    def _working_clone(self, name, event):
        group, c = self._clone(name)
        if c.broken:
            raise clones.CloneBroken(event=event, name=name, reason=c.broken)
        if group.source.held and event in ("restore", "reverse-sync"):
            # It would change a volume whose group cannot log the change.
            raise LUHeld(name=group.source.name, reason=group.source.held)
        return group, c

    def clone_sync(self, clone, rate=None):
        group, c = self._working_clone(clone, "sync")
        group.start_sync(clone, rate=_rate(rate))
        return group.clone_status(c)

    def clone_reverse_sync(self, clone, rate=None):
        group, c = self._working_clone(clone, "reverse-sync")
        self._run_volume_change(
            group.source, bytearray(c.delta), group.granularity,
            "a reverse sync", lambda: group.start_reverse_sync(
                clone, rate=_rate(rate), run=False))
        return group.clone_status(c)

    def clone_restore(self, clone, full=False, rate=None):
        group, c = self._working_clone(clone, "restore")
        regions = bytearray(b"\x01" * len(c.delta)) if full \
            else bytearray(c.delta)
        self._run_volume_change(
            group.source, regions, group.granularity, "a protected restore",
            lambda: group.start_restore(clone, full=bool(full),
                                        rate=_rate(rate), run=False))
        return group.clone_status(c)

    def _run_volume_change(self, lu, regions, granularity, what, start):
        """Start an engine that changes lu without host writes (start()
        returns it, not running yet) inside _volume_change, then run it:
        the links log, or the secondary records what changes, before the
        engine writes anything (a copy streamed as an ordinary update would
        show the secondary a half-restored image as consistent)."""
        engine = None
        try:
            with self._volume_change(lu, regions, granularity, what):
                engine = start()
        finally:
            # Recorded as running: it runs (and resumes after a restart)
            # even if the links' record could not be saved.
            if engine is not None:
                engine.start()

    @contextlib.contextmanager
    def _volume_change(self, lu, regions, granularity, what):
        """Around the start of an operation that changes lu without host
        writes (restore, reverse sync, rollback), regions (one byte per
        extent of granularity) being what it may change.  On a primary the
        links log those regions, to replay them once it has finished.  On
        a secondary the operation is refused while a primary is connected,
        no primary is accepted while it starts, and the regions are saved
        as diverged before anything changes (the primary copies exactly
        them back at the next contact)."""
        rsg = lu.rsg
        if rsg is None:
            yield
            return
        vol = rsg.volumes.index(lu)
        if rsg.role == replication.PRIMARY:
            yield
            rsg.begin_volume_change(vol, regions, granularity, what)
            return
        with rsg.local_change("{} of {}".format(what, lu.name)):
            runs = rsg.diverged.get("runs", []) if rsg.diverged else []
            for s_, e_ in maps.runs(regions):
                off = s_ * granularity
                runs.append([vol, off, min(e_ * granularity, lu.size) - off])
            rsg.diverged = {"runs": runs, "all": False}
            rsg.persist()
            yield

    @staticmethod
    def _check_point_in_time(lu):
        """A point in time of lu may be taken (fracture, mark) only while
        it is one: a secondary's volume is not while it is inconsistent."""
        rsg = lu.rsg
        if rsg is not None and rsg.role == replication.SECONDARY:
            rsg.check_readable(lu)

    def clone_fracture(self, clone):
        group, c = self._working_clone(clone, "fracture")
        self._check_point_in_time(group.source)
        group.fracture(clone)
        return group.clone_status(c)

    # ------------------------------------------------------------ sessions

    def _session(self, name):
        session = self.sessions.get(name)
        if session is None:
            raise sessions.UnknownSession(name=name)
        return session

    def session_create(self, source, name, dests=(), granularity=None,
                       save_area=None, timeout=10.0, peer_dests=(),
                       peer_token_file=None):
        """A new incremental session on source; every destination is
        probed (reachable, writable, same size) before anything is made.

        peer_dests: [uri, "HOST:PORT"] pairs, destinations served by
        another clonectl whose manager listens for peer requests there.
        """
        units.check_name(name)
        if name.startswith(IMAGE_PREFIX):
            raise errors.InvalidArgument(
                reason="session names starting with {!r} are reserved for "
                "the protected images of LUs (LU@{}LU)".format(
                    IMAGE_PREFIX, IMAGE_PREFIX))
        dest_records = [{"uri": u, "peer": None} for u in dests]
        for pair in peer_dests or ():
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise errors.InvalidArgument(reason="a peer destination is "
                                             "a URI and a HOST:PORT")
            dest_records.append({"uri": pair[0], "peer": _peer_addr(pair[1])})
        if not dest_records:
            raise errors.InvalidArgument(reason="a session needs at least "
                                         "one destination (--dest URI)")
        uris = [r["uri"] for r in dest_records]
        if len(set(uris)) != len(uris):
            raise errors.InvalidArgument(reason="a destination is given twice")
        token_file = None
        if any(r["peer"] for r in dest_records):
            if not peer_token_file:
                raise errors.InvalidArgument(
                    reason="peer destinations need --peer-token-file")
            token_file = os.path.abspath(peer_token_file)
            token = peer.read_token(token_file)
        lu = self._session_source(source)
        for r in dest_records:
            sessions.probe_destination(r["uri"], lu.size,
                                       timeout=float(timeout))
            if r["peer"]:
                peer.call(r["peer"], token, "status",
                          _export_of(r["uri"]), timeout=float(timeout))
        return self._create_session(lu, name, dest_records, granularity,
                                    save_area, token_file).status()

    def _session_source(self, source):
        lu = self.lus.get(source)
        if lu is None or lu.removed:
            raise errors.UnknownLU(name=source)
        if lu.backend is None:
            raise errors.BackingUnusable(path=lu.file, reason=lu.error)
        if lu.readonly:
            raise errors.InvalidArgument(
                reason="LU {!r} is read-only: nothing to track".format(source))
        return lu


    @_one_change_at_a_time
    def _create_session(self, lu, name, dest_records, granularity, save_area,
                        token_file=None, image=False):
        granularity = clones.check_granularity(
            units.parse_size(granularity) if granularity else
            clones.DEFAULT_GRANULARITY)
        if name in self.sessions:
            raise sessions.SessionError(name=name, reason="a session of that "
                                        "name exists")
        extents = maps.extent_count(lu.size, granularity)
        minimum = sessions.SaveArea.minimum_size(extents, granularity)
        if save_area is None:
            size = minimum - granularity + extents * granularity
        else:
            size = units.parse_size(save_area)
            if size < minimum:
                raise errors.InvalidSize(
                    value=save_area, reason="the save area needs at least {} "
                    "bytes (its index plus one extent)".format(minimum))
        save_path = self._save_area_path(lu.name, name)
        record = {"granularity": granularity, "save_area": size,
                  "marked": False, "export": False, "error": None,
                  "dests": [dict(r, consistency=sessions.NEW, needs_full=True)
                            for r in dest_records],
                  "token_file": token_file, "last_transfer": None}
        if image:
            record["image"] = True
        with self.state_dir.locked():
            doc = self.state_dir.load()
            if lu.name not in doc["lus"]:
                raise errors.UnknownLU(name=lu.name)
            taken = {n for r in doc["lus"].values()
                     for n in r.get("sessions", {})}
            if name in taken:
                raise sessions.SessionError(name=name, reason="a session of "
                                            "that name exists")
            if os.path.exists(save_path):
                os.unlink(save_path)   # left by a crash during a create
            state.create_sparse(save_path, size)
            try:
                session = self._open_session(lu, name, record, image=image)
                session.create()
                doc["lus"][lu.name].setdefault("sessions", {})[name] = record
                self.state_dir.save(doc)
            except BaseException:
                os.unlink(save_path)
                raise
        self._attach_session(lu, session)
        log.info("session %s created on %s (%d destinations)", name, lu.name,
                 len(dest_records))
        return session


    @_one_change_at_a_time
    def session_delete(self, name, force=False):
        session = self._session(name)
        if session.marked and not force:
            raise sessions.SessionBusy(
                name=name, reason="it is marked; unmark it first (or --force)")
        if session.engine is not None and session.engine.is_alive():
            raise sessions.SessionBusy(name=name, reason="a transfer is "
                                       "running")
        self._release(session, [d for d in session.dests
                                if d.peer and d.protected])
        source = session.source.name
        # The inventory first: a save that fails leaves the session
        # tracking writes (a restart brings it back, its maps whole).
        with self.state_dir.locked():
            doc = self.state_dir.load()
            record = doc["lus"].get(source, {})
            record.get("sessions", {}).pop(name, None)
            if "sessions" in record and not record["sessions"]:
                del record["sessions"]
            self.state_dir.save(doc)
        self._detach_session(session)
        session.close()
        fsutil.remove_durably(
            [session.tracking.path, session.tracking.path + ".activity",
             self._save_area_path(source, name)] +
            [session.pending_path(d) for d in session.dests])
        return {"name": name, "source": source}

    def session_list(self, source=None):
        return [s.status() for n, s in sorted(self.sessions.items())
                if source is None or s.source.name == source]

    def session_status(self, name):
        return self._session(name).status()

    def _check_source_stable(self, session):
        group = self.groups.get(session.source.name)
        if group is None:
            return
        busy = [c.name for c in group.clones.values()
                if c.state in (clones.REVERSE_SYNCING, clones.RESTORING)]
        if busy:
            raise sessions.SessionBusy(
                name=session.name, reason="the Source is being restored from "
                "clone {}; mark once that has finished".format(busy[0]))

    def session_mark(self, name, export=False):
        session = self._session(name)
        self._check_point_in_time(session.source)
        session.mark(export=bool(export),
                     check=lambda: self._check_source_stable(session))
        return session.status()

    def session_unmark(self, name, force=False):
        session = self._session(name)
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
        session = self._session(name)
        if session.engine is not None and session.engine.is_alive():
            log.warning("session %s: %s refused: a transfer is running",
                        name, what)
            raise sessions.SessionBusy(name=name, reason="an update or "
                                       "transfer is already running")
        will_mark = not session.marked and not unmarked and \
            (what == "update" or full)
        if will_mark:
            self._check_point_in_time(session.source)
        session.check_transfer(full=full, unmarked=unmarked,
                               will_mark=will_mark)
        clients = self._connect_destinations(session, timeout)
        protected = []
        try:
            self._check_peer_images(session)
            if not session.marked and not unmarked:
                session.mark(full=full, check=lambda:
                             self._check_source_stable(session))
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
            token = peer.read_token(session.token_file)
            st = peer.call(d.peer, token, "status", _export_of(d.uri))
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
        token = peer.read_token(session.token_file)
        done = []
        try:
            for d in todo:
                if d.protected:
                    # Left protected by a release that failed: that image
                    # is older than the consistent one; protect anew.
                    peer.call(d.peer, token, "release", _export_of(d.uri))
                    d.protected = False
                done.append(d)
                st = peer.call(d.peer, token, "protect", _export_of(d.uri))
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
                token = peer.read_token(session.token_file)
                peer.call(d.peer, token, "release", _export_of(d.uri))
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
                token = peer.read_token(session.token_file)
                peer.call(d.peer, token, "release", _export_of(d.uri))
                d.protected = False
                d.protected_since = None
            except errors.Error as e:
                d.last_error = "transfer completed, but the protected image " \
                    "was not released: {}".format(e)
            changed = True
        if changed:
            session.save()

    # ------------------------------------------------------------ images
    # Protected images of this target's LUs, asked for by a peer manager.

    @staticmethod
    def _image_session_name(lu):
        return IMAGE_PREFIX + lu

    def _image(self, lu):
        """The session holding lu's protected image, or None."""
        session = self.images.get(lu)
        if session is None or self.sessions.get(session.name) is not session:
            return None
        return session

    def image_status(self, lu):
        if lu not in self.lus or not self.lus[lu].healthy:
            raise errors.UnknownLU(name=lu)
        session = self._image(lu)
        protected = session is not None and session.marked
        return {"lu": lu, "size": self.lus[lu].size, "protected": protected,
                "export": session.export_name() if protected else None,
                "since": session.mark_time if protected else None,
                "saved_extents": len(session.save_area.slots) if protected else 0}

    def image_protect(self, lu):
        """Keep lu's current image readable (LU@protected-LU) until
        released; protecting a protected image keeps the older one."""
        source = self._session_source(lu)
        name = self._image_session_name(lu)
        session = self._image(lu)
        if session is None:
            if name in self.sessions:
                raise sessions.SessionError(
                    name=name, reason="a session that is not LU {}'s "
                    "protected image has its name (made by an older "
                    "clonectl); delete that session first".format(lu))
            session = self._create_session(source, name, [], None, None,
                                           image=True)
            self.images[lu] = session
        if not session.marked:
            session.mark(export=True)
        return self.image_status(lu)

    def image_release(self, lu):
        session = self._image(lu)
        if session is not None:
            if session.marked:
                session.unmark(force=True)
            self.session_delete(session.name)
        return self.image_status(lu)

    def image_rollback(self, lu):
        """Put the protected image back into lu (only the extents written
        since it was protected), then release it."""
        source = self._session_source(lu)
        session = self._image(lu)
        if session is None or not session.marked:
            raise errors.InvalidArgument(
                reason="LU {!r} has no protected image to roll back to"
                .format(lu))
        users = self._host_users(source)
        if users:
            raise RollbackRefused(
                name=lu, reason="{} connection(s) use it (NBD hosts or the "
                "iSCSI gateway); stop the hosts first, so no write lands "
                "during or after the rollback".format(users))
        g = session.granularity
        buf = bytearray(g)
        restored = 0
        with session.cond:
            saved = sorted(session.save_area.slots)
        regions = bytearray(session.extents)
        for x in saved:
            regions[x] = 1
        with self._volume_change(source, regions, g, "a rollback"):
            for x in saved:
                n = min(g, source.size - x * g)
                session.save_area.readinto(x, buf)
                # Below a secondary's guard (rolling a secondary back to its
                # last consistent image is what its promotion asks for),
                # through every other layer, looked up for each write: a
                # clone or session of the LU sees the rollback.
                source.stack.below("guard").write(memoryview(buf)[:n], x * g)
                restored += 1
            source.stack.below("guard").flush()
        log.info("LU %s rolled back to its protected image (%d extents)", lu,
                 restored)
        self.image_release(lu)
        return {"lu": lu, "extents_restored": restored}

    def _users_session(self, operation):
        """operation(name, ...) as a user may call it: never on the session
        holding an LU's protected image (the target's own; a secondary
        keeps its last consistent image in one during a replay)."""
        @functools.wraps(operation)
        def call(name, **kwargs):
            with self.lock:
                image = next((lu for lu, s in self.images.items()
                              if s.name == name), None)
            if image is not None:
                raise errors.InvalidArgument(
                    reason="session {!r} holds the protected image of LU {} "
                    "(LU@{}); it is changed by `clonectl lu rollback` and "
                    "replication only".format(name, image, name))
            return operation(name, **kwargs)
        return call

    def control_operations(self):
        """The operations the control socket offers: name -> callable."""
        ops = {
            "ping": lambda: {"pid": os.getpid()},
            "status": self.status,
            "reload": lambda: {"exports": self.reload()},
            "lu_create": self.lu_create,
            "lu_delete": self.lu_delete,
            "lu_resize": self.lu_resize,
            "export_modes": self.export_modes,
            "clone_add": self.clone_add,
            "clone_remove": self.clone_remove,
            "clone_list": self.clone_list,
            "clone_status": self.clone_status,
            "clone_map": self.clone_map,
            "clone_sync": self.clone_sync,
            "clone_reverse_sync": self.clone_reverse_sync,
            "clone_fracture": self.clone_fracture,
            "clone_restore": self.clone_restore,
            "session_create": self.session_create,
            "session_delete": self._users_session(self.session_delete),
            "session_list": self.session_list,
            "session_status": self.session_status,
            "session_map": self.session_map,
            "session_mark": self._users_session(self.session_mark),
            "session_unmark": self._users_session(self.session_unmark),
            "session_transfer": self._users_session(self.session_transfer),
            "session_update": self._users_session(self.session_update),
            "image_status": self.image_status,
            "image_protect": self.image_protect,
            "image_release": self.image_release,
            "image_rollback": self.image_rollback,
            "rsg_create": self.rsg_create,
            "rsg_delete": self.rsg_delete,
            "rsg_list": self.rsg_list,
            "rsg_status": self.rsg_status,
            "rsg_link": self.rsg_link,
            "rsg_unlink": self.rsg_unlink,
            "rsg_attach": self.rsg_attach,
            "rsg_detach": self.rsg_detach,
            "rsg_promote": self.rsg_promote,
            "rsg_demote": self.rsg_demote,
            "prepare_stop": self.prepare_stop,
        }
        ops = {name: op if name in _READ_ONLY_OPS else self._poking(op)
               for name, op in ops.items()}
        ops.update({"events_since": self.events_since,
                    "clone_picture": self.clone_picture})
        return ops

    def prepare_stop(self):
        """Stop engines (they resume at the next start) and commit maps."""
        with self.lock:
            groups = list(self.groups.values())
        for group in groups:
            group.stop_engine()
            if group.clones:
                group.commit()
        for session in list(self.sessions.values()):
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
        if self.replica_server is not None:
            self.replica_server.stop()
        for rsg in list(self.rsgs.values()):
            rsg.close()
        if self.replica_server is not None:
            self.replica_server.join()
            self.replica_server = None
        self.rsgs.clear()
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


# The name of an LU's protected image is this prefix and the LU's name;
# user sessions may not start with it.
IMAGE_PREFIX = "protected-"


class RollbackRefused(errors.Error):
    msg = "LU {name!r} cannot be rolled back: {reason}"
    errno = errno.EBUSY


class LUHeld(errors.Error):
    msg = "LU {name!r} is not served: {reason}"
    errno = errno.EBUSY


class GatewayHolds(errors.Error):
    msg = ("the iSCSI gateway did not let go of export {name!r} within "
           "{timeout:.0f} s; nothing was changed; see run/serve.log")
    errno = errno.EBUSY


class UnknownClone(errors.Error):
    msg = "no clone named {name!r}"
    errno = errno.ENOENT


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


def _rate(value):
    return units.parse_size(value) if value else None

