"""Replicated-group orchestration: the rsg operations of the Target
(create, delete, link, attach, detach, promote, demote, status), the
groups' loading at start, a secondary made on a primary's first contact,
role changes (close, save the record for the new role, open again), and
the volume changes made without host writes (restore, reverse sync,
rollback) that a group must log or record as diverged first.
"""

import contextlib
import logging
import os

from . import channel, clones, errors, fsutil, maps, replication, units
from .lu import LUHeld

log = logging.getLogger("clonectl.target")


class RsgOrchestration:
    """The replicated groups of target (a Target): their files in
    STATE/rsg, the groups that failed to load, the replica listener."""

    def __init__(self, target):
        self.target = target
        self.rsg_dir = target.state_dir.rsg_dir
        self.failures = {}      # group name -> why it was not loaded
        # Group name -> the LUs held for it (its record may be gone by the
        # time they are let go: a deletion that removed it and failed).
        self.held = {}
        self.replica_server = None

    def _rsg_files(self, name):
        fsutil.makedirs_durable(self.rsg_dir)
        return self.target.state_dir.group_files(name)

    def load(self):
        for name in self.target.state_dir.rsg_names():
            try:
                files = self._rsg_files(name)
                self._open_rsg(files, files.load())
            except (errors.Error, OSError, KeyError, TypeError) as e:
                log.error("replicated group %s: %s", name, e)
                self._not_open(name, "not loaded: {}".format(e),
                               "which did not load ({}); not served until "
                               "it loads or is deleted, so no write "
                               "escapes its log".format(e))
        self._release_stale_images()

    def _not_open(self, name, failure, why, lu_names=None):
        """Group name has files on disk but is not open (failure: why, for
        its status): its volumes (lu_names, by default those its record
        names) are held (why: in their words), so that no write escapes
        its log or misses its secondaries, until it loads or a deletion
        removes its files."""
        self.failures[name] = failure
        self.target.recovery_problems.append({"rsg": name,
                                              "message": failure})
        self._hold_volumes(name, "a volume of replicated group {}, {}"
                           .format(name, why), lu_names)

    def _release_stale_images(self):
        """A last consistent image (LU@consistent-LU) is kept by the
        secondary group of its LU while that group is inconsistent; one
        that a crash left behind (in the middle of a replay's start or
        end, a promotion, a deletion) is released.  The images of a group
        that did not load stay."""
        held = {n for name in self.failures for n in
                self.target.state_dir.group_files(name).volume_names()}
        for name in sorted(self.target.consistent_images):
            lu = self.target.lus.get(name)
            if lu is None or name in held:
                continue
            rsg = lu.rsg
            try:
                if rsg is not None and rsg.role == replication.SECONDARY \
                        and rsg.protected:
                    if rsg.consistent:
                        rsg.release_images()    # its replay completed
                    continue
                # A secondary's kept for its next replay, else for good.
                self.target.session_ops.consistent_release(
                    [lu], for_good=rsg is None or
                    rsg.role != replication.SECONDARY)
            except (errors.Error, OSError) as e:
                log.error("LU %s: cannot release the image a replay kept: "
                          "%s", name, e)
        # The save area files kept between replays of LUs no secondary
        # group has any more (a crash in a deletion or promotion).
        for name, lu in sorted(self.target.lus.items()):
            rsg = lu.rsg
            if name in held or (rsg is not None and
                                rsg.role == replication.SECONDARY):
                continue
            try:
                self.target.session_ops.consistent_discard(name)
            except OSError as e:
                log.error("LU %s: cannot remove the save area kept for its "
                          "group's images: %s", name, e)

    def _release_images(self, name, lus):
        """Release the last consistent images group name kept of lus, as
        the group stops being their secondary (a promotion, a deletion):
        best effort, logged (a start releases what is left)."""
        try:
            self.target.session_ops.consistent_release(lus, for_good=True)
        except (errors.Error, OSError) as e:
            log.error("group %s: cannot release the last consistent images "
                      "of its volumes: %s", name, e)

    def _hold_volumes(self, name, reason, lu_names=None):
        """Hold (reason) or release (None) the LUs lu_names, by default
        those a group's record names, as far as it can be read."""
        if lu_names is None:
            lu_names = self.target.state_dir.group_files(name).volume_names()
        if reason is None:
            self.held.pop(name, None)
        else:
            self.held[name] = list(lu_names)
        for lu_name in lu_names:
            lu = self.target.lus.get(lu_name)
            if lu is not None and lu.rsg is None:
                if reason is None:
                    lu.holds.pop("group " + name, None)
                else:
                    lu.holds["group " + name] = reason

    def _failed_rsg_status(self, name):
        files = self.target.state_dir.group_files(name).on_disk()
        return {"name": name, "role": None, "loaded": False,
                "error": self.failures[name],
                "files": [os.path.relpath(p, self.target.state_dir.path)
                          for p in files]}

    def _check_group_files_free(self, name):
        """A group name whose files are on disk is not free: a group that
        failed to load (or a create that crashed) left them, and making a
        new group would silently wipe its SRL and DCMs."""
        files = self.target.state_dir.group_files(name).on_disk()
        if name in self.failures or files:
            raise replication.ReplicationError(
                name=name, reason="files of a group of that name are in the "
                "state directory ({}){}; repair or restore them and restart "
                "the server, or remove them with `clonectl rsg delete {}`"
                .format(", ".join(os.path.relpath(p, self.target.state_dir
                                                  .path) for p in files),
                        ": it was " + self.failures[name]
                        if name in self.failures else "", name))

    def _rsg_volumes(self, group, names):
        """The LUs of group's volume names: each once, existing and in no
        other group (a group made, accepted from a primary's hello or
        loaded from its record: a second guard in an LU's stack would
        break its I/O)."""
        if len(set(names)) != len(names):
            raise errors.InvalidArgument(reason="a volume is given twice")
        vols = []
        for n in names:
            lu = self.target.lus.get(n)
            if lu is None or not lu.healthy:
                raise errors.UnknownLU(name=n)
            self._check_not_grouped(group, lu)
            vols.append(lu)
        return vols

    def _open_rsg(self, files, record):
        vols = self._rsg_volumes(record["name"],
                                 [v["lu"] for v in record["volumes"]])
        for lu, v in zip(vols, record["volumes"]):
            if lu.size != v["size"]:
                raise replication.ReplicationError(
                    name=record["name"], reason="LU {} is now {} bytes, the "
                    "group was made with {}".format(lu.name, lu.size,
                                                    v["size"]))
        if record["role"] == replication.PRIMARY:
            rsg = replication.PrimaryGroup(
                files, record, vols,
                volume_view=lambda vol: self._volume_view(vols[vol]))
            rsg.attach()
            self.target.recovery_problems += [{"rsg": rsg.name, "message": p}
                                       for p in rsg.problems]
        else:
            images = self.target.session_ops
            rsg = replication.SecondaryGroup(
                files, record, vols,
                protect=images.consistent_protect,
                release=images.consistent_release,
                image=images.consistent_export,
                save_ahead=images.save_ahead,
                running_change=lambda: self._running_change(vols))
            rsg.attach()
        for lu in vols:
            lu.rsg = rsg
        self.target.rsgs[rsg.name] = rsg
        return rsg

    def _check_current(self, rsg):
        """(Under target.lock, before a role change or a deletion closes
        rsg.)  rsg is still the group of its name: another promotion,
        demotion or deletion that ran meanwhile closed it, and closing it
        again would take the new group's files and volumes."""
        if self.target.rsgs.get(rsg.name) is not rsg:
            raise replication.RsgBusy(
                name=rsg.name, reason="another promotion, demotion or "
                "deletion of it ran meanwhile; nothing was done here (see "
                "`clonectl rsg status {}`)".format(rsg.name))

    def _close_rsg(self, rsg):
        # Out of the volumes' I/O stacks first: no write may reach a
        # group whose log and maps are closed.
        rsg.detach()
        rsg.close()
        for lu in rsg.volumes:
            lu.rsg = None
        self.target.rsgs.pop(rsg.name, None)

    def _changing_clone(self, lu):
        """(The clone of, and words for) the restore or reverse sync that
        changes lu now, or (None, None)."""
        group = self.target.groups.get(lu.name)
        # A copy of the values: a clone added meanwhile (under the group's
        # cond) would end a live iteration with a RuntimeError.
        for c in list(group.clones.values()) if group is not None else ():
            if c.state in (clones.RESTORING, clones.REVERSE_SYNCING):
                return c, "protected restore" \
                    if c.state == clones.RESTORING else "reverse sync"
        return None, None

    def _running_change(self, vols):
        """What a secondary's refusal of a primary names: the restore or
        reverse sync changing one of vols now, in words, or None."""
        for lu in vols:
            c, what = self._changing_clone(lu)
            if c is not None:
                return "the {} of {} from clone {}".format(what, lu.name,
                                                           c.name)
        return None

    def _volume_view(self, lu):
        """The restore or reverse sync running on lu as a primary's replay
        sees it (replication.VolumeChange), or None.  Both show hosts the
        clone's data from their start on; the clone group reads it without
        copying anything (the replay reads under its group's lock, which
        a copy into the volume takes).  A reverse sync's engine may write
        a run hosts never see (copied again after a host write collided)."""
        c, what = self._changing_clone(lu)
        if c is None:
            return None
        return replication.VolumeChange(
            "a {} from clone {}".format(what, c.name),
            self.target.groups[lu.name].visible_read,
            hides_copies=c.state == clones.REVERSE_SYNCING)

    @staticmethod
    def _check_not_grouped(name, lu):
        if lu.rsg is not None:
            raise replication.ReplicationError(
                name=name, reason="LU {} already belongs to group {}".format(
                    lu.name, lu.rsg.name))

    def _rsg(self, name, role=None):
        rsg = self.target.rsgs.get(name)
        if rsg is None:
            raise replication.UnknownGroup(name=name)
        if role is not None and rsg.role != role:
            raise replication.ReplicationError(
                name=name, reason="this node is its {}; that is done on the "
                "{}".format(rsg.role, role))
        return rsg

    def start_replication(self, bind, port, token_file,
                          tls_certificates=None):
        """Listen for primaries (serve --replication-port), with TLS
        from the directory tls_certificates if given."""
        token = replication.read_token(token_file)
        tls = channel.server_context(
            tls_certificates, "--replication-tls-certificates") \
            if tls_certificates else None
        self.replica_server = replication.ReplicaServer(
            bind, int(port), token, self.accept_primary, tls=tls)
        self.replica_server.start()

    def accept_primary(self, hello, peer_host):
        """A primary's hello: the secondary group to serve, made on first
        contact from LUs of the same names and sizes."""
        name = hello.get("group")
        units.check_name(name if isinstance(name, str) else "")
        with self.target.lock:
            if self.target.closing:
                # A group made now would be served after close() shut the
                # others down, into a closed target.
                raise replication.ReplicationError(
                    name=name, reason="this node is stopping")
            rsg = self.target.rsgs.get(name)
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
            if len(set(names)) != len(names):
                raise replication.ReplicationError(
                    name=name, reason="the primary's hello names a volume "
                    "twice")
            for v in vols:
                lu = self.target.lus.get(v.get("lu"))
                if lu is None or not lu.healthy:
                    raise replication.ReplicationError(
                        name=name, reason="this node has no LU {!r}; create "
                        "the volumes here first (same names and sizes)"
                        .format(v.get("lu")))
                if lu.readonly:
                    raise replication.ReplicationError(
                        name=name, reason="LU {} is read-only here; a "
                        "secondary's volumes are written by replication"
                        .format(lu.name))
                if lu.size != v.get("size"):
                    raise replication.ReplicationError(
                        name=name, reason="LU {} is {} bytes here and {} on "
                        "the primary; the sizes must match".format(
                            lu.name, lu.size, v.get("size")))
                self._check_not_grouped(name, lu)
                users = lu.connections + self.target.gateway.held[lu]
                if users:
                    raise replication.ReplicationError(
                        name=name, reason="LU {} has {} host connection(s) "
                        "(NBD or the iSCSI gateway); a secondary's volumes "
                        "are written by replication only".format(lu.name,
                                                                 users))
            try:
                granularity = clones.check_granularity(int(
                    hello.get("granularity") or
                    replication.DEFAULT_GRANULARITY))
            except (TypeError, ValueError, errors.InvalidArgument) as e:
                raise replication.ReplicationError(
                    name=name, reason="the primary's hello has no valid "
                    "granularity ({})".format(e)) from e
            record = {"name": name, "role": replication.SECONDARY,
                      "granularity": granularity,
                      "volumes": [{"lu": n, "size": self.target.lus[n].size}
                                  for n in names],
                      "history": [], "applied_seq": 0, "consistent": False}
            files = self._rsg_files(name)
            files.save(record)
            log.info("replicated group %s: secondary of %s", name, peer_host)
            return self._open_rsg(files, record)

    def rsg_create(self, name, volumes, srl_size, granularity=None,
                   after_split_brain=None):
        units.check_name(name)
        if not volumes:
            raise errors.InvalidArgument(reason="a group needs at least one "
                                         "volume (--volume LU)")
        srl = units.parse_size(srl_size)
        if srl < replication.MIN_SRL:
            raise errors.InvalidArgument(
                reason="--srl-size must be at least 1M")
        g = units.parse_size(granularity) if granularity else \
            replication.DEFAULT_GRANULARITY
        clones.check_granularity(g)
        policy = replication.check_split_brain_policy(
            after_split_brain or replication.DISCONNECT)
        with self.target.lock:
            if name in self.target.rsgs:
                raise replication.ReplicationError(name=name,
                                                   reason="it exists already")
            self._check_group_files_free(name)
            vols = self._rsg_volumes(name, volumes)
            for lu in vols:
                if lu.readonly:
                    raise errors.ReadOnly(name=lu.name)
            files = self._rsg_files(name)
            gen = replication.new_generation()
            record = {"name": name, "role": replication.PRIMARY,
                      "granularity": g, "srl_size": srl,
                      "volumes": [{"lu": lu.name, "size": lu.size}
                                  for lu in vols],
                      "generation": gen, "history": [[gen, 1]],
                      "next_seq": 1, "links": [],
                      "after_split_brain": policy}
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
        if name not in self.target.rsgs:
            files = self.target.state_dir.group_files(name)
            if name in self.failures or files.on_disk():
                # What a group that failed to load (or a crashed create)
                # left: the admin clears the name.  Its volumes are held
                # until its files are gone: a group left on disk would
                # load at the next start, unaware of writes served
                # meanwhile, and its secondaries would miss them.
                names = self.held.get(name) or files.volume_names()
                files.remove_all()
                self._hold_volumes(name, None, names)
                self._release_images(name, [
                    self.target.lus[n] for n in names
                    if n in self.target.lus and
                    self.target.lus[n].rsg is None])
                self.failures.pop(name, None)
                self.target.recovery_problems = [
                    p for p in self.target.recovery_problems
                    if p.get("rsg") != name]
                return {"name": name}
        rsg = self._rsg(name)
        if rsg.role == replication.SECONDARY and \
                rsg.connected_since is not None:
            raise replication.RsgBusy(name=name, reason="a primary is "
                                        "connected; detach its link first")
        # A secondary's rollback reads the images this releases: none runs
        # meanwhile.
        alone = rsg.local_change("a deletion of group {}".format(name),
                                 alone=True) \
            if rsg.role == replication.SECONDARY else contextlib.nullcontext()
        with alone, self.target.lock:
            self._check_current(rsg)
            self._close_rsg(rsg)
            try:
                rsg.files.remove_all()
            except OSError as e:
                # Its record may stay and load the group at the next
                # start: no write may reach its volumes unlogged before.
                log.error("replicated group %s: closed, but its files "
                          "could not be removed: %s", name, e)
                # (Its record may be unlinked already, its removal not
                # durable: the volumes are the open group's.)
                self._not_open(name, "deleting it failed: its files could "
                               "not be removed ({}); run `rsg delete` "
                               "again".format(e),
                               "whose deletion failed ({}); not served "
                               "until it is deleted".format(e),
                               [lu.name for lu in rsg.volumes])
                raise
        # A secondary's last consistent images go with the group.
        self._release_images(name, rsg.volumes)
        return {"name": name}

    def rsg_list(self):
        rows = {n: r.status() for n, r in self.target.rsgs.items()}
        rows.update((n, self._failed_rsg_status(n)) for n in self.failures)
        return [st for _, st in sorted(rows.items())]

    def rsg_status(self, name):
        if name in self.failures and name not in self.target.rsgs:
            return self._failed_rsg_status(name)
        return self._rsg(name).status()

    def rsg_set(self, name, after_split_brain=None):
        """Change a group's settings (its split-brain policy), on its
        primary or a secondary (which keeps it for when it is promoted)."""
        rsg = self._rsg(name)
        if after_split_brain is None:
            raise errors.InvalidArgument(reason="nothing to set (use "
                                         "--after-split-brain)")
        rsg.set_split_brain_policy(after_split_brain)
        return rsg.status()

    def rsg_link(self, name, secondary, mode="async", token_file=None,
                 tls_certificates=None, rate=None):
        rsg = self._rsg(name, replication.PRIMARY)
        replay_rate = _replay_rate(rate) or None if rate else None
        if mode not in replication.MODES:
            raise errors.InvalidArgument(reason="--mode must be sync or async")
        if not token_file:
            raise errors.InvalidArgument(
                reason="a link needs --token-file (the secondary's "
                       "--replication-token-file)")
        token_file = os.path.abspath(token_file)
        replication.read_token(token_file)
        if tls_certificates:
            tls_certificates = os.path.abspath(tls_certificates)
            channel.client_context(tls_certificates, "--tls-certificates")
        rsg.add_link(replication.parse_secondary(secondary), mode, token_file,
                     tls_certificates or None, replay_rate=replay_rate)
        return rsg.status()

    def rsg_unlink(self, name, secondary):
        rsg = self._rsg(name, replication.PRIMARY)
        rsg.remove_link(rsg.link(replication.parse_secondary(secondary)))
        return rsg.status()

    def rsg_attach(self, name, secondary, discard_secondary_changes=False,
                   rate=None):
        """Start a link again; rate (bytes per second of its DCM replays,
        "0": no limit) is kept in its record, None keeps the one it has."""
        rsg = self._rsg(name, replication.PRIMARY)
        replay_rate = _replay_rate(rate) if rate is not None else None
        rsg.attach_link(rsg.link(replication.parse_secondary(secondary)),
                        discard_secondary=discard_secondary_changes,
                        replay_rate=replay_rate)
        return rsg.status()

    def rsg_verify(self, name, secondary=None, rate=None, stop=False):
        """Start an online verify of every link of group name (or of the
        link to secondary) against its secondary; with stop, stop them
        (target.replication.verify)."""
        rsg = self._rsg(name, replication.PRIMARY)
        links = [rsg.link(replication.parse_secondary(secondary))] \
            if secondary else list(rsg.links)
        if not links:
            raise errors.InvalidArgument(
                reason="group {!r} has no link to verify".format(name))
        bytes_rate = units.parse_size(rate) if rate else None
        with rsg.cond:
            if stop:
                for link in links:
                    link.stop_verify()
            else:
                # All or none: refused before any starts.
                for link in links:
                    link.verify_left()
                    link.check_verify()
                for link in links:
                    link.start_verify(rate=bytes_rate)
        return rsg.status()

    def rsg_detach(self, name, secondary):
        rsg = self._rsg(name, replication.PRIMARY)
        rsg.detach_link(rsg.link(replication.parse_secondary(secondary)))
        return rsg.status()

    def rsg_promote(self, name, force=False):
        """Make this secondary the primary of a new generation."""
        rsg = self._rsg(name, replication.SECONDARY)
        rsg.wait_session_end()
        if rsg.connected_since is not None:
            raise replication.RsgBusy(
                name=name, reason="its primary is connected and replicating; "
                "promote only when the link is detached or the primary is "
                "unreachable (or demote the primary first)")
        # No primary is accepted from the checks to the new record: one
        # applying batches meanwhile would leave changes that the new
        # generation's history does not account for.
        with rsg.local_change("a promotion of group {}".format(name),
                              alone=True):
            return self._promote(rsg, name, force)

    def _promote(self, rsg, name, force):
        if not rsg.consistent and not force:
            kept = [lu for lu in rsg.volumes if rsg.protected and
                    self.target.session_ops.consistent_export(lu)]
            if kept:
                advice = "its last consistent image is kept as {}: roll " \
                    "{} back to it (`clonectl lu rollback LU`), then " \
                    "promote with --force; --force alone promotes the " \
                    "volumes as they are and releases that image".format(
                        ", ".join(self.target.session_ops.consistent_export(
                            lu) for lu in kept),
                        " and ".join(lu.name for lu in kept))
            else:
                advice = "no consistent image of it is kept; --force " \
                    "promotes the volumes as they are"
            raise replication.RsgBusy(
                name=name, reason="this secondary is inconsistent ({}); {}"
                .format(rsg.reason, advice))
        gen = replication.new_generation()
        # After the node's last update; and after the first of its last
        # generation, which a node whose replay was broken off (promoted
        # with --force) holds without any update of it: a history's
        # generations start in order, or no secondary can read it.
        first = max(rsg.applied_seq + 1, rsg.history[-1][1]) \
            if rsg.history else rsg.applied_seq + 1
        history = rsg.history + [[gen, first]]
        # The since map holds what this node changes from its promotion
        # on.  With nothing diverged here that is every change since the
        # last update it had from a primary (since_base); otherwise its
        # diverged maps go with it, each since its own point.
        diverged = rsg.diverged
        if diverged is None:
            since_base, since_maps = rsg.own_base(), []
        else:
            since_base = None
            # The first, after a rollback to the last consistent image,
            # is tagged with it (PrimaryGroup._image_changes).
            since_maps = [{"base": diverged.get("base"),
                           "runs": diverged.get("runs", []),
                           "image": diverged.get("image")}] + \
                list(diverged.get("maps", []))
        record = {"name": name, "role": replication.PRIMARY,
                  "granularity": rsg.granularity,
                  "srl_size": rsg.record_base.get("srl_size", 64 << 20),
                  "volumes": rsg.record_base["volumes"],
                  "generation": gen, "history": history,
                  "next_seq": first, "links": [],
                  "since_promotion": True, "since_base": since_base,
                  "since_maps": since_maps,
                  "after_split_brain": rsg.record_base.get(
                      "after_split_brain", replication.DISCONNECT)}
        files = rsg.files
        with self.target.lock:
            self._check_current(rsg)
            self._close_rsg(rsg)
            # A secondary uses neither the SRL nor the since map; its
            # staged batches stay until the primary record is saved.
            files.remove([files.srl, files.since()])
            since = replication.Dcm(files.since(), record["granularity"],
                                    [v["size"] for v in record["volumes"]],
                                    fresh_value=0)
            if diverged is not None and diverged.get("all"):
                # Changed here who knows where: every extent differs.
                since.mark_all()
            since.close()
            self._save_role(files, record)
            files.remove(files.stage)
            new = self._open_new_role(files, record)
        # A primary keeps no last consistent image (promoted with --force,
        # its volumes are taken as they are).
        self._release_images(name, new.volumes)
        new.start()
        log.info("replicated group %s promoted: generation %s", name, gen)
        return new.status()

    def rsg_demote(self, name):
        """Make this primary a secondary; it reports the regions it wrote
        that no secondary acknowledged (what may have diverged)."""
        rsg = self._rsg(name, replication.PRIMARY)
        self._refuse_hosts(rsg)
        # The iSCSI gateway mounts every volume: it lets go first (no
        # write may land between the regions reported below and the
        # guard), and mounts them again, read-only, as a secondary's.
        withdrawn = []
        try:
            for lu in rsg.volumes:
                self.target.gateway.withdraw(lu.name, lu)
                withdrawn.append(lu.name)
            # Again, now that no connection can open: a host that
            # connected since the first look would write in between.
            self._refuse_hosts(rsg)
            return self._demote(rsg)
        finally:
            self.target.gateway.give_back(withdrawn)

    def _refuse_hosts(self, rsg):
        with self.target.lock:
            busy = [lu.name for lu in rsg.volumes if lu.connections]
        if busy:
            raise replication.RsgBusy(
                name=rsg.name, reason="LU {} has host connections; stop the "
                "hosts first, so no write lands after the demotion"
                .format(busy[0]))

    def _demote(self, rsg):
        name = rsg.name
        files = rsg.files
        # The record below says this node holds every change up to `last`,
        # consistently: make that durable first, through every layer (a
        # restoring clone group keeps in memory which extents hosts wrote
        # since its last commit; lost, a resumed restore copies over them).
        for lu in rsg.volumes:
            lu.flush()
        last = rsg.next_seq - 1
        with rsg.cond:
            for link in rsg.links:
                rsg.to_logging(link)
            # What some node may lack: what this node changed since it
            # last agreed with another (the since-promotion map, or what
            # its links have not acknowledged).
            diverged = rsg.changes_since_agreement()
        runs = diverged["runs"]
        record = {"name": name, "role": replication.SECONDARY,
                  "granularity": rsg.granularity,
                  "srl_size": rsg.srl.capacity,
                  "volumes": rsg.record_base["volumes"],
                  "history": rsg.history, "last_seq": last,
                  "applied_seq": last, "consistent": True,
                  "diverged": diverged,
                  "after_split_brain": rsg.after_split_brain}
        with self.target.lock:
            self._check_current(rsg)
            self._close_rsg(rsg)
            self._save_role(files, record)
            files.remove(files.dcms() + [files.srl, files.since()])
            new = self._open_new_role(files, record)
        self._release_images(name, new.volumes)     # left by a crash
        log.info("replicated group %s demoted: secondary from sequence %d, "
                 "%d regions not acknowledged by a secondary", name, last,
                 len(runs))
        return new.status()

    def _open_new_role(self, files, record):
        """Open a closed group as its record, saved for its new role, says.
        If it cannot be opened (a new SRL cannot be made), it is a group
        that failed to load: its volumes are held, so no write escapes a
        log or lands on a secondary, until a restart loads it or it is
        deleted."""
        try:
            new = self._open_rsg(files, record)
            if new.role == replication.PRIMARY:
                new.persist()
            return new
        except (errors.Error, OSError) as e:
            name = record["name"]
            log.error("replicated group %s: not opened as its new record "
                      "says (%s): %s", name, record["role"], e)
            self._not_open(name, "not opened as {} after its role change: "
                           "{}".format(record["role"], e),
                           "which could not be opened as {} ({}); not "
                           "served until it loads (restart the server) or "
                           "is deleted".format(record["role"], e))
            raise replication.ReplicationError(
                name=name, reason="it is recorded {} now but could not be "
                "opened as such ({}); its volumes are held until it loads: "
                "fix that, then restart the server".format(
                    record["role"], e)) from e

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

    def run_volume_change(self, lu, regions, granularity, what, start):
        """Start an engine that changes lu without host writes
        (start(regions) returns it, not running yet; regions as
        volume_change gives them) inside volume_change, then run it:
        the links replay (or log) its regions, or the secondary records
        what changes, before the operation changes what hosts see (a copy
        streamed as an ordinary update would show the secondary a
        half-restored image as consistent)."""
        engine = None
        try:
            with self.volume_change(lu, regions, granularity,
                                    what) as changed:
                engine = start(changed)
        finally:
            # Recorded as running: it runs (and resumes after a restart)
            # even if the links' record could not be saved.
            if engine is not None:
                engine.start()

    @contextlib.contextmanager
    def volume_change(self, lu, regions, granularity, what):
        """Around the start of an operation that changes lu without host
        writes (restore, reverse sync, rollback), regions (one byte per
        extent of granularity) being what it may change; yields them.
        regions may be a function giving them, called once nothing else
        may change lu (on a secondary: inside the guard below), for an
        operation whose regions come from a state a primary's batches also
        change (a rollback's image).  On a primary the
        links replay those regions, reading what hosts read (the links
        that stream begin at once, without leaving the stream), from the
        moment it has started (a refused one costs a copy of unchanged
        regions).  On a secondary the operation is refused while a primary
        is connected, no primary is accepted while it starts, and the
        regions are saved as diverged before anything changes (the primary
        copies exactly them back at the next contact)."""
        def given():
            return regions() if callable(regions) else regions
        if lu.held:
            # Its group did not load: nothing would log the change.
            raise LUHeld(name=lu.name, reason=lu.held)
        rsg = lu.rsg
        if rsg is None:
            yield given()
            return
        vol = rsg.volumes.index(lu)
        if rsg.role == replication.PRIMARY:
            changed = given()
            begun = rsg.begin_volume_change(vol, changed, granularity, what)
            try:
                yield changed
            finally:
                rsg.end_volume_change(begun)
            return
        with rsg.local_change("{} of {}".format(what, lu.name)):
            changed = given()
            runs = []
            for s_, e_ in maps.runs(changed):
                off = s_ * granularity
                runs.append([vol, off, min(e_ * granularity, lu.size) - off])
            rsg.record_local_change(runs)
            yield changed

    @staticmethod
    def check_point_in_time(lu):
        """A point in time of lu may be taken (fracture, mark) only while
        it is one: a secondary's volume is not while it is inconsistent."""
        rsg = lu.rsg
        if rsg is not None and rsg.role == replication.SECONDARY:
            rsg.check_readable(lu)

    @contextlib.contextmanager
    def point_in_time(self, lu, consistent=True):
        with self.target.session_ops.point_starting(lu):
            with self._point_in_time(lu, consistent):
                yield

    @staticmethod
    @contextlib.contextmanager
    def _point_in_time(lu, consistent=True):
        """Take a point in time of lu (fracture, mark) inside this: on a
        secondary no batch is applied meanwhile (its apply lock is held),
        so the point holds all of a batch or none of it, and the volume
        must be consistent (unless not asked: a protected image is the
        target's own, kept also of an inconsistent volume)."""
        rsg = lu.rsg
        if rsg is None or rsg.role != replication.SECONDARY:
            yield
            return
        with rsg.lock:
            if consistent:
                rsg.check_readable(lu)
            yield

    def close(self):
        """Stop listening for primaries and close every group."""
        if self.replica_server is not None:
            self.replica_server.stop()
        for rsg in list(self.target.rsgs.values()):
            rsg.close()
        if self.replica_server is not None:
            self.replica_server.join()
            self.replica_server = None
        self.target.rsgs.clear()


def _replay_rate(value):
    """A link's --rate: bytes per second, or 0 for no limit ("0",
    "none")."""
    if str(value).strip().lower() in ("0", "none"):
        return 0
    return units.parse_size(value)
