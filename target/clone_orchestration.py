"""Clone orchestration: the clone operations of the Target (add, remove,
sync, fracture, restore, reverse sync, status and maps), each checked
against the rest of the target (connections, the iSCSI gateway, replicated
groups) before the clone group (target.clones) carries it out, and the
clones' records in the inventory.
"""

import logging
import os

from . import backends, clones, errors, fsutil, inventory, storageid, units
from .lu import LUHeld, one_change_at_a_time, open_backing

log = logging.getLogger("clonectl.target")

# clone_map: the cells of a picture by default and at most, and the kind of
# extent each code means.
MAP_CELLS = 2048
MAP_CELLS_MAX = 1 << 20
_MAP_KINDS = {0: "clean", 1: "dirty", 2: "pending", 3: "protected"}


class CloneOrchestration:
    """The clone operations of target (a Target): its LUs, clone groups,
    lock, inventory and gateway route."""

    def __init__(self, target):
        self.target = target

    def load_group(self, lu, record, unrecorded):
        """Open the clone group of LU lu from its record; add to
        unrecorded what inventory.record_storage is to record."""
        group = clones.CloneGroup(lu, record["granularity"],
                                  self.target.state_dir.maps_dir,
                                  self._persist_clone(lu.name))

        def open_clone(rec):
            backend, found = open_backing(
                self.target.state_dir, rec, "clone {}".format(rec["name"]),
                "clone accept-storage {}".format(rec["name"]), lu.size)
            if not rec["owned"] and "storage" not in rec:
                unrecorded.append((lu.name, rec["name"], rec["file"], found))
            return backend

        group.record_verify = self._record_verify(lu.name)
        for who, problem in group.load(record["clones"], open_clone):
            log.error("clone group %s: %s", lu.name, problem)
            self.target.recovery_problems.append(
                {"source": lu.name, "clone": who, "message": problem})
        for source, name, _, found in unrecorded:
            if source == lu.name and name in group.clones:
                group.clones[name].storage = found
        self.target.groups[lu.name] = group

    def _persist_clone(self, source):
        def persist(name, clone_state, error=None, rate=None):
            with self.target.state_dir.editing() as doc:
                rec = doc["lus"][source]["clones"][name]
                rec["state"] = clone_state
                rec["error"] = error
                rec["rate"] = rate
            self.target.changed("clone", name, state=clone_state, error=error)
        return persist

    def _record_verify(self, source):
        def record(name, result):
            with self.target.state_dir.editing() as doc:
                rec = doc["lus"][source]["clones"].get(name)
                if rec is not None:
                    rec["last_verify"] = result
        return record

    @one_change_at_a_time
    def clone_accept_storage(self, clone):
        """Take what the path of clone clone names now as its storage
        (`clonectl clone accept-storage`), and serve the clone again if
        it was refused at its loading (broken)."""
        try:
            group, c = self.find(clone)
        except errors.UnknownClone:
            group = c = None        # its Source is not served
        served = getattr(c.backend, "fd", None) \
            if c is not None and c.broken is None else None
        source, _, record = inventory.accept_storage(
            self.target.state_dir, clone, clone=True, served=served)
        out = {"name": clone, "source": source, "file": record["file"],
               "storage": record.get("storage"), "error": None}
        if c is None:
            lu = self.target.lus.get(source)
            out["error"] = "its Source {} is not served{}".format(
                source, ": " + lu.error if lu is not None and lu.error
                else "")
            return out
        c.storage = out["storage"]
        if c.broken is not None:
            try:
                backend, _ = open_backing(
                    self.target.state_dir, record, "clone {}".format(clone),
                    "clone accept-storage {}".format(clone), group.size)
            except (errors.Error, OSError) as e:
                out["error"] = str(e)
            else:
                if group.repair(clone, backend, run=self.target.started):
                    log.info("clone %s: its %s goes on", clone, c.state)
        return out

    def find(self, name):
        for group in self.target.groups.values():
            if name in group.clones:
                return group, group.clones[name]
        raise errors.UnknownClone(name=name)

    @one_change_at_a_time
    def clone_add(self, source, clone, file=None, granularity=None):
        """Add a clone, out-of-sync with every extent dirty.

        Lock order: the group's lock may take the state-file lock (a state
        change is persisted under it), so the state-file lock is never held
        while entering the group.
        """
        units.check_name(clone)
        if granularity is not None:
            granularity = clones.check_granularity(units.parse_size(granularity))
        with self.target.state_dir.locked():
            doc = self.target.state_dir.load()
            inventory.settle_owned_files(self.target.state_dir, doc)
            record = doc["lus"].get(source)
            lu = self.target.lus.get(source)
            if record is None or lu is None:
                raise errors.UnknownLU(name=source)
            if lu.backend is None:
                raise errors.BackingUnusable(path=lu.file, reason=lu.error)
            inventory.check_name_free(doc, clone)
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
                inventory.check_backing_free(
                    doc, self.target.state_dir.owned_backing(clone))
                path = inventory.make_owned_file(
                    self.target.state_dir, doc, clone, lu.size,
                    "clone add {}".format(clone))
                owned = True
            else:
                path = os.path.abspath(file)
                owned = False
                inventory.check_outside(self.target.state_dir, path)
                inventory.check_backing_free(doc, path)
                inventory.probe_backing(path, lu.size,
                                        owner="clone {}".format(clone))
            backend = storage = None
            try:
                backend = backends.FileBackend(
                    path, owner="clone {}".format(clone))
                if not owned:
                    # What serves is what is checked and recorded.
                    storage = storageid.of_fd(backend.fd)
                    inventory.check_storage_free(doc, path, storage)
                group = self.target.groups.get(source) or clones.CloneGroup(
                    lu, granularity, self.target.state_dir.maps_dir,
                    self._persist_clone(source))
                group.record_verify = self._record_verify(source)
            except BaseException:
                if backend is not None:
                    backend.close()     # or its file stays this clone's
                if owned:
                    os.unlink(path)
                raise
        try:
            group.add_clone(clone, backend, file=path)
            group.clones[clone].storage = storage
        except BaseException:
            backend.close()
            if owned:
                os.unlink(path)
            raise
        try:
            with self.target.state_dir.editing() as doc:
                record = doc["lus"][source]
                rec = {"file": path, "owned": owned,
                       "state": clones.OUT_OF_SYNC, "error": None}
                if not owned:
                    rec["storage"] = storage
                record.setdefault("clones", {})[clone] = rec
                record["granularity"] = granularity
                inventory.owned_file_settled(doc, clone)
        except BaseException:
            group.remove_clone(clone)
            backend.close()
            if owned:
                os.unlink(path)
            raise
        self.target.groups[source] = group
        return group.clone_status(group.clones[clone])

    @one_change_at_a_time
    def clone_remove(self, clone):
        group, c = self.find(clone)
        source = group.source.name
        rec = {}

        def persist():
            with self.target.state_dir.editing() as doc:
                record = doc["lus"][source]
                rec.update(record["clones"].pop(clone))
                if not record["clones"]:
                    del record["clones"]
                    record.pop("granularity", None)
                if rec["owned"]:
                    inventory.owned_file_pending(
                        doc, clone, "clone remove {}".format(clone))

        withdrawn = self._gateway_let_go(c)
        try:
            # Refuses while busy or exported; the inventory first, so a
            # save that fails leaves the clone in place.
            group.remove_clone(clone, persist)
        finally:
            if withdrawn:
                self.target.gateway.give_back([clone])
        c.backend.close()
        if not group.clones:
            del self.target.groups[source]
        if rec["owned"]:
            fsutil.remove_durably([rec["file"]])
            with self.target.state_dir.editing() as doc:
                inventory.owned_file_settled(doc, clone)
        return {"name": clone, "file": rec["file"], "owned": rec["owned"]}

    def _gateway_let_go(self, c):
        """Before a clone is removed, the iSCSI gateway's mount of its
        export must be gone (Target.gateway_let_go).  Why not refuse sync
        too: a sync ends the export, which is what makes the gateway let
        go."""
        def going():
            if c.connections:
                raise clones.CloneInUse(event="remove", name=c.name,
                                        count=c.connections)
            # A state remove_clone refuses (with its own reason): nothing
            # is withdrawn for it.
            return (c.state, "remove") in clones.TRANSITIONS
        return self.target.gateway_let_go(c.name, c.export, going)

    def clone_list(self, source=None):
        with self.target.lock:
            return [self.target.with_gateway(g.clone_status(c), c.export)
                    for n, g in sorted(self.target.groups.items())
                    if source is None or n == source
                    for _, c in sorted(g.clones.items())]

    def clone_picture(self, clone, cells=MAP_CELLS):
        """The picture of clone's map for the status page, compactly: per kind of extent the
        runs [start, end) in extents.  Kinds: clean, dirty (differs from the
        Source); during a protected restore pending (still to copy to the
        Source) and protected (written by hosts, never copied over).  A map
        of more than cells extents is folded: each run then covers whole
        cells of `scale` extents and a cell shows its most notable kind."""
        group, c = self.find(clone)
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
        group, c = self.find(clone)
        with self.target.lock:
            return self.target.with_gateway(group.clone_status(c), c.export)

    def clone_map(self, clone):
        """{"granularity", "size", "runs": [[offset, length, kind], ...]}
        of the clone's extents (CloneGroup.clone_map says the kinds)."""
        group, c = self.find(clone)
        out = group.clone_map(c)
        out.update(name=clone, source=group.source.name, state=c.state)
        return out

    def _working_clone(self, name, event):
        group, c = self.find(name)
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
        # A rollback of the Source is a second writer of it: never both.
        with self.target.session_ops.restore_starting(group.source, clone,
                                                      "reverse-sync"):
            # Refused before the links of a replicated Source replay its
            # regions (a refusal changes nothing, on the secondaries too).
            group.check_reverse_sync(clone)
            # The regions are read where nothing else changes the Source
            # (a secondary's primary's batches set delta bits too).
            self.target.rsg_ops.run_volume_change(
                group.source, lambda: bytearray(c.delta), group.granularity,
                "a reverse sync", lambda regions: group.start_reverse_sync(
                    clone, rate=_rate(rate), run=False))
        return group.clone_status(c)

    def clone_restore(self, clone, full=False, rate=None):
        group, c = self._working_clone(clone, "restore")
        with self.target.session_ops.restore_starting(group.source, clone,
                                                      "restore"):
            group.check_restore(clone, full=bool(full))
            self.target.rsg_ops.run_volume_change(
                group.source, lambda: bytearray(b"\x01" * len(c.delta))
                if full else bytearray(c.delta), group.granularity,
                "a protected restore",
                lambda regions: group.start_restore(
                    clone, full=bool(full), rate=_rate(rate), run=False,
                    regions=regions))
        return group.clone_status(c)

    def clone_verify(self, clone, rate=None, stop=False):
        """Start an online verify of clone against its Source (or, with
        stop, stop the running one: its marks stay)."""
        group, c = self.find(clone)
        if stop:
            group.stop_verify(clone)
        else:
            if c.broken:
                raise clones.CloneBroken(event="verify", name=clone,
                                         reason=c.broken)
            group.start_verify(clone, rate=_rate(rate))
        return group.clone_status(c)

    def clone_fracture(self, clone):
        group, c = self._working_clone(clone, "fracture")
        with self.target.rsg_ops.point_in_time(group.source):
            group.fracture(clone)
        return group.clone_status(c)


def _rate(value):
    return units.parse_size(value) if value else None
