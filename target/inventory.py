"""The state directory: the LU inventory and the server's runtime files.

Layout of a state directory (StateDir names every path in it; the
engines are given the directories their own files live in):

    state.json      the inventory, one JSON document, replaced atomically
    .lock           flock()ed by every command that changes state.json
    lus/NAME.img    sparse backing files created by `clonectl lu create` and
                    `clonectl clone add`
    maps/           clone delta maps (CLONE.delta) and activity maps of
                    clone groups (SOURCE.activity), see target.maps; the
                    sessions' maps and save areas (SOURCE@SESSION.save)
    rsg/NAME.json   the record of replicated group NAME, beside its log,
                    stage slots and change maps (GroupFiles names them)
    run/            runtime files of a running server (sockets, serve.json,
                    serve.lock held for the server's whole life, or by a
                    command working without a server; serve.log,
                    nbdkit.pid, iscsi.json)

state.json is only ever replaced whole (temp file, fsync, rename, fsync the
directory), so a crash leaves either the old or the new inventory.  A file
that does not parse or does not validate is reported, naming the file, and
never reset: an empty inventory would make every LU vanish silently.
"""

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import stat

from . import backends, errors, filelocks, fsutil, storageid, units

log = logging.getLogger("clonectl.inventory")

FORMAT = "clonectl-state"
VERSION = 1

# The states a clone's record may be in (the clone engine's states, part
# of this format; tests/unit/test_inventory.py checks they are the same).
CLONE_STATES = ("out-of-sync", "syncing", "synchronized", "fractured",
                "reverse-syncing", "restoring")

# The roles a replicated group's record may name.
GROUP_ROLES = ("primary", "secondary")


class StateDir:

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.state_file = os.path.join(self.path, "state.json")
        self.lock_file = os.path.join(self.path, ".lock")
        self.lus_dir = os.path.join(self.path, "lus")
        self.run_dir = os.path.join(self.path, "run")
        self.maps_dir = os.path.join(self.path, "maps")
        self.rsg_dir = os.path.join(self.path, "rsg")
        # {file identity: path} of its files while listed() runs.
        self._listing = None

    # Paths of the inventory's objects.

    def owned_backing(self, name):
        """The backing file clonectl makes for LU or clone name."""
        return os.path.join(self.lus_dir, name + ".img")

    def save_area(self, source, session):
        """The save area of session of LU source."""
        return os.path.join(self.maps_dir, "{}@{}.save".format(source,
                                                               session))

    def group_files(self, name):
        """The files of replicated group name (GroupFiles)."""
        return GroupFiles(self.rsg_dir, name)

    def rsg_names(self):
        """The names of the replicated groups whose records are in rsg/."""
        if not os.path.isdir(self.rsg_dir):
            return []
        return [fn[:-5] for fn in sorted(os.listdir(self.rsg_dir))
                if fn.endswith(".json") and not fn.startswith(".")]

    # Paths of a running server.

    @property
    def control_socket(self):
        return fsutil.unix_socket_path(os.path.join(self.run_dir, "control.sock"))

    @property
    def default_nbd_socket(self):
        return fsutil.unix_socket_path(os.path.join(self.run_dir, "nbd.sock"))

    @property
    def serve_info_file(self):
        return os.path.join(self.run_dir, "serve.json")

    @property
    def serve_lock_file(self):
        return os.path.join(self.run_dir, "serve.lock")

    @property
    def serve_log_file(self):
        return os.path.join(self.run_dir, "serve.log")

    @property
    def nbdkit_pid_file(self):
        return os.path.join(self.run_dir, "nbdkit.pid")

    @property
    def iscsi_record(self):
        """What the iSCSI gateway started (target.iscsi)."""
        return os.path.join(self.run_dir, "iscsi.json")

    @contextlib.contextmanager
    def listed(self):
        """Within: check_outside lists the directory's files once, not at
        every call (a start opens every LU and clone: with hundreds of
        them, walking the directory for each took seconds)."""
        self._listing = self.own_files()
        try:
            yield
        finally:
            self._listing = None

    def own_files(self):
        """{file identity: path} of the files in the directory, or the
        listing listed() keeps."""
        if self._listing is not None:
            return self._listing
        top = os.path.realpath(self.path)
        found = {}
        for directory, _, files in os.walk(top):
            for fn in files:
                own = os.path.join(directory, fn)
                found.setdefault(file_identity(own), own)
        found.pop(None, None)
        return found

    def ensure(self):
        for d in (self.path, self.lus_dir, self.run_dir, self.maps_dir):
            fsutil.makedirs_durable(d)

    @contextlib.contextmanager
    def locked(self):
        """Serialize changes of state.json between concurrent commands."""
        self.ensure()
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # The inventory.

    @contextlib.contextmanager
    def editing(self):
        """The inventory, to change in place under the lock; saved when
        the block ends without an exception (nothing saved otherwise)."""
        with self.locked():
            doc = self.load()
            yield doc
            self.save(doc)

    def load(self):
        """Return the validated inventory; an absent file is an empty one."""
        try:
            with open(self.state_file, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {"format": FORMAT, "version": VERSION, "lus": {}}
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise errors.CorruptState(path=self.state_file,
                                      reason="not valid JSON ({})".format(e))
        _validate(doc, self.state_file)
        return doc

    def check_inventory_present(self):
        """Refuse a state directory whose state.json is gone while files it
        listed are still there: starting with an empty inventory would hide
        every LU and, later, let new ones take their names."""
        if os.path.lexists(self.state_file):
            return
        left = []
        for d in (self.lus_dir, self.maps_dir, self.rsg_dir):
            try:
                names = sorted(os.listdir(d))
            except FileNotFoundError:
                continue
            left += [os.path.relpath(os.path.join(d, n), self.path)
                     for n in names]
        if left:
            more = len(left) - 10
            raise errors.StateMissing(
                path=self.state_file, files=", ".join(left[:10]) + (
                    " and {} more".format(more) if more > 0 else ""))

    def save(self, doc):
        """Replace the inventory durably; StateNotSaved if it cannot be
        (the old inventory stays)."""
        _validate(doc, self.state_file)
        try:
            self.ensure()
            fsutil.write_json_atomic(self.state_file, doc)
        except OSError as e:
            raise errors.StateNotSaved(path=self.state_file,
                                       reason=e.strerror or str(e),
                                       errno=e.errno or errno.EIO)


class GroupFiles:
    """Where a group keeps its files in the state directory."""

    def __init__(self, rsg_dir, name):
        self.dir = rsg_dir
        self.name = name
        self.record = os.path.join(rsg_dir, name + ".json")
        self.srl = os.path.join(rsg_dir, name + ".srl")
        self.stage = [os.path.join(rsg_dir, "{}.stage{}".format(name, i))
                      for i in (0, 1)]
        self.diverged = os.path.join(rsg_dir, name + ".diverged")

    def dcm(self, index):
        return os.path.join(self.dir, "{}.link{}.dcm".format(self.name, index))

    def since(self):
        return os.path.join(self.dir, self.name + ".since-promotion.dcm")

    def activity_log(self):
        return os.path.join(self.dir, self.name + ".al")

    def save(self, record):
        fsutil.write_json_atomic(self.record, record)

    def load(self):
        try:
            with open(self.record, "rb") as f:
                rec = json.load(f)
        except ValueError as e:
            raise errors.CorruptState(path=self.record,
                                      reason="not valid JSON ({})".format(e))
        if not isinstance(rec, dict) or rec.get("role") not in \
                GROUP_ROLES or not isinstance(rec.get("volumes"),
                                                       list):
            raise errors.CorruptState(path=self.record,
                                      reason="not a replicated group record")
        return rec

    def volume_names(self):
        """The LU names the record lists as volumes, as far as the record
        can be read ([] when it cannot)."""
        try:
            with open(self.record, "rb") as f:
                volumes = json.load(f)["volumes"]
            return [v.get("lu") for v in volumes
                    if isinstance(v.get("lu"), str)]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return []

    def dcms(self):
        """Every link DCM path a group may have (link indexes < 64)."""
        return [self.dcm(i) for i in range(64)]

    def take_map(self, index):
        """What hosts changed in the regions of link index's take of its
        secondary's changes, while it is not over."""
        return os.path.join(self.dir, "{}.link{}.take".format(self.name,
                                                             index))

    @staticmethod
    def remove(paths):
        fsutil.remove_durably(paths)

    def paths(self):
        """Every file the group may have."""
        return [self.record, self.srl, self.diverged, self.since(),
                self.activity_log()] + self.stage + self.dcms() + \
            [self.take_map(i) for i in range(64)]

    def on_disk(self):
        return [p for p in self.paths() if os.path.lexists(p)]

    def remove_all(self):
        self.remove(self.paths())


def _validate(doc, path):
    def bad(reason):
        raise errors.CorruptState(path=path, reason=reason)

    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        bad("not a clonectl state document")
    if doc.get("version") != VERSION:
        raise errors.UnsupportedState(path=path, version=doc.get("version"),
                                      supported=VERSION)
    lus = doc.get("lus")
    if not isinstance(lus, dict):
        bad("'lus' is not an object")
    for name, lu in lus.items():
        if not _valid_name(name):
            bad("invalid LU name {!r}".format(name))
        if not isinstance(lu, dict):
            bad("LU {!r} is not an object".format(name))
        size = lu.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            bad("LU {!r} has an invalid size {!r}".format(name, size))
        if not isinstance(lu.get("file"), str) or not lu["file"]:
            bad("LU {!r} has no backing file".format(name))
        for key in ("readonly", "owned"):
            if not isinstance(lu.get(key), bool):
                bad("LU {!r} has an invalid {!r}".format(name, key))
        _validate_clones(name, lu, bad)
        _validate_sessions(name, lu, bad)
    pending = doc.get("pending_files", {})
    if not isinstance(pending, dict):
        bad("'pending_files' is not an object")
    for name, what in pending.items():
        if not _valid_name(name):
            bad("invalid pending file name {!r}".format(name))
        if not isinstance(what, str):
            bad("pending file {!r} is invalid".format(name))
    names = [c for lu in lus.values() for c in lu.get("clones", {})]
    taken = set(lus)
    for c in names:
        if c in taken:
            bad("clone name {!r} is used twice".format(c))
        taken.add(c)


def _valid_name(name):
    try:
        units.check_name(name)
        return True
    except errors.InvalidName:
        return False


def _validate_clones(name, lu, bad):
    clones = lu.get("clones", {})
    if not isinstance(clones, dict):
        bad("LU {!r}: 'clones' is not an object".format(name))
    if clones:
        g = lu.get("granularity")
        if not isinstance(g, int) or g <= 0 or g & (g - 1):
            bad("LU {!r} has an invalid granularity {!r}".format(name, g))
    for cname, rec in clones.items():
        if not _valid_name(cname):
            bad("invalid clone name {!r}".format(cname))
        if not isinstance(rec, dict) or not isinstance(rec.get("file"), str) \
                or not isinstance(rec.get("owned"), bool) \
                or rec.get("state") not in CLONE_STATES:
            bad("clone {!r} of LU {!r} is invalid".format(cname, name))


def _validate_sessions(name, lu, bad):
    sessions = lu.get("sessions", {})
    if not isinstance(sessions, dict):
        bad("LU {!r}: 'sessions' is not an object".format(name))
    for sname, rec in sessions.items():
        g = rec.get("granularity") if isinstance(rec, dict) else None
        if not isinstance(g, int) or g <= 0 or g & (g - 1) \
                or not isinstance(rec.get("save_area"), int) \
                or not isinstance(rec.get("marked"), bool) \
                or not isinstance(rec.get("dests"), list) \
                or not all(isinstance(d, dict) and isinstance(d.get("uri"), str)
                           for d in rec["dests"]):
            bad("session {!r} of LU {!r} is invalid".format(sname, name))


def probe_backing(path, size=None, readonly=False, owner=None,
                  identify=False):
    """Check that path can back an LU; return (its usable size in bytes,
    the identity of its storage if identify, else None: target.storageid).

    path must be an existing regular file or block device that we can open
    for reading (and writing unless readonly), at least size bytes long,
    that no other program holds for writing.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise errors.BackingMissing(path=path)
    except OSError as e:
        raise errors.BackingUnusable(path=path, reason=e.strerror)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise errors.BackingUnusable(
            path=path, reason="not a regular file or block device")
    try:
        # Locked as the server would: a file another program holds for
        # writing is refused here already (target.filelocks).
        fd = filelocks.open_locked(path, writable=not readonly, owner=owner)
    except OSError as e:
        raise errors.BackingUnusable(path=path, reason=e.strerror)
    try:
        actual = os.lseek(fd, 0, os.SEEK_END)
        os.pread(fd, 1, 0)
        storage = storageid.of_fd(fd) if identify else None
    except OSError as e:
        raise errors.BackingUnusable(path=path, reason=e.strerror)
    finally:
        filelocks.close(fd)
    if size is not None and actual < size:
        raise errors.BackingTooSmall(path=path, actual=actual, size=size)
    return actual, storage


def check_storage(record, found, owner, command):
    """Refuse storage identified as found (target.storageid), opened from
    record's path, if it is not the storage the path named when the
    record was made.  Nothing is checked for a file of the state
    directory, a record made before identities were recorded, or a device
    without an identity.  command accepts a move ("lu accept-storage x")."""
    recorded = record.get("storage")
    if not record["owned"] and recorded is not None and found != recorded:
        raise errors.StorageChanged(
            path=record["file"], owner=owner, recorded=recorded,
            found=found or "a device without an identity", command=command)


def record_storage(state_dir, found):
    """Record identities found at an opening of records made before they
    were recorded: found is a list of (LU name, clone name or None, path
    opened, identity).  A record changed meanwhile is left alone."""
    if not found:
        return
    with state_dir.editing() as doc:
        known = {(lu, clone): rec for lu, clone, rec in records(doc)}
        for name, clone, path, identity in found:
            rec = known.get((name, clone))
            if rec is not None and rec["file"] == path and \
                    "storage" not in rec:
                rec["storage"] = identity


def accept_storage(state_dir, name, clone=False, served=None):
    """Record what the path of LU name (clone name if clone) names now as
    its storage (`accept-storage`); return (its LU's name, the clone's or
    None, the record).  The path passes the checks of a new --file
    first.  A file of the state directory gets no identity: it is only
    probed (it may have been missing).  served: the descriptor the
    running target serves it from, if it does; a path naming another
    file or device is refused then (it would be served only from the
    next start on, without what hosts write until then)."""
    with state_dir.locked():
        doc = state_dir.load()
        source, clone, rec = find_record(doc, name, clone)
        owner = "clone {}".format(clone) if clone else "LU {}".format(name)
        size = doc["lus"][source]["size"]
        if not rec["owned"]:
            check_outside(state_dir, rec["file"])
            check_backing_free(doc, rec["file"], exclude=name)
        _, storage = probe_backing(rec["file"], size,
                                   not clone and rec["readonly"], owner=owner,
                                   identify=True)
        if served is not None and \
                file_identity(rec["file"]) != filelocks.identity(
                    os.fstat(served)):
            raise errors.StorageServed(
                path=rec["file"], owner=owner,
                found=storage or "storage without an identity",
                served=storageid.of_fd(served) or "storage without an "
                "identity")
        if not rec["owned"]:
            # A file of the state directory is its own by its path.
            check_storage_free(doc, rec["file"], storage, exclude=name)
            rec["storage"] = storage
            state_dir.save(doc)
        return source, clone, rec


def find_record(doc, name, clone=False):
    """(LU name, clone name or None, record) of LU name, or of clone name
    if clone."""
    if not clone:
        if name in doc["lus"]:
            return name, None, doc["lus"][name]
        raise errors.UnknownLU(name=name)
    for source, cname, rec in records(doc):
        if cname == name:
            return source, cname, rec
    raise errors.UnknownClone(name=name)


def records(doc):
    """(LU name, clone name or None, record) of every LU and clone."""
    for name, lu in doc["lus"].items():
        yield name, None, lu
        for cname, rec in lu.get("clones", {}).items():
            yield name, cname, rec


def owned_file_pending(doc, name, what):
    """Record in doc, to be saved before the file is made or after its
    record is gone, that the owned backing file of name (LU or clone) is
    being made or removed (what: the command): a crash between the two
    leaves a file no record names, which settle_owned_files removes
    instead of letting it block the name for good."""
    doc.setdefault("pending_files", {})[name] = what


def owned_file_settled(doc, name):
    """The file of name has its record, or is gone: no longer pending."""
    pending = doc.get("pending_files", {})
    pending.pop(name, None)
    if not pending:
        doc.pop("pending_files", None)


def make_owned_file(state_dir, doc, name, size, what):
    """(Under the lock, with doc just loaded.)  Make the owned backing
    file of name (LU or clone), recorded as pending first; return its
    path.  A file already there is not ours to take (create_sparse's
    refusal) and is never recorded as pending: a start would remove it."""
    path = state_dir.owned_backing(name)
    if os.path.lexists(path):
        raise errors.BackingUnusable(path=path, reason=_NOT_TAKEN)
    owned_file_pending(doc, name, what)
    state_dir.save(doc)
    try:
        create_sparse(path, size)
    except BaseException:
        owned_file_settled(doc, name)
        try:
            state_dir.save(doc)
        except errors.Error:
            pass    # no file: the next start drops the entry
        raise
    return path


def settle_owned_files(state_dir, doc):
    """(Under the lock, with doc just loaded.)  Remove the owned backing
    files that a command interrupted by a crash left pending and no record
    names, then save doc without them; return [(path, what)] removed.
    Only files recorded as pending are touched: a file in the directory
    that an older copy of state.json does not know of is left alone."""
    pending = doc.get("pending_files")
    if not pending:
        return []
    named = {rec["file"] for _, _, rec in records(doc)}
    paths = ((state_dir.owned_backing(n), what)
             for n, what in sorted(pending.items()))
    removed = [(path, what) for path, what in paths
               if path not in named and os.path.lexists(path)]
    fsutil.remove_durably([path for path, _ in removed])
    doc.pop("pending_files")
    state_dir.save(doc)
    for path, what in removed:
        log.warning("removed %s: made or removed by `%s`, which a crash "
                    "interrupted; no LU or clone names it", path, what)
    return removed


def create_lu(state_dir, name, size=None, file=None, readonly=False):
    """Add an LU to the inventory; return its record.

    Without file, a new sparse file of size bytes is made in the state
    directory (and removed again by delete_lu).  With file, an existing file
    or block device is used as it is and never removed by us; size defaults
    to the file's size.
    """
    units.check_name(name)
    if size is not None:
        size = units.parse_lu_size(size)
    with state_dir.locked():
        doc = state_dir.load()
        settle_owned_files(state_dir, doc)
        check_name_free(doc, name)
        if file is None:
            if size is None:
                raise errors.InvalidArgument(
                    reason="--size is required unless --file names an "
                           "existing file or device")
            path = make_owned_file(state_dir, doc, name, size,
                                   "lu create {}".format(name))
            owned, storage = True, None
        else:
            path = os.path.abspath(file)
            owned = False
            check_outside(state_dir, path)
            actual, storage = probe_backing(path, size, readonly,
                                            owner="LU {}".format(name),
                                            identify=True)
            if size is None:
                size = actual - actual % units.SECTOR
                if size == 0:
                    raise errors.BackingTooSmall(path=path, actual=actual,
                                                 size=units.SECTOR)
        try:
            check_backing_free(doc, path)
            check_storage_free(doc, path, storage)
        except errors.BackingInUse:
            if owned:
                os.unlink(path)
            raise
        record = {
            "size": size,
            "file": path,
            "owned": owned,
            "readonly": bool(readonly),
            "created": datetime.datetime.now(datetime.timezone.utc)
                               .isoformat(timespec="seconds"),
        }
        if not owned:
            record["storage"] = storage
        doc["lus"][name] = record
        owned_file_settled(doc, name)
        try:
            state_dir.save(doc)
        except BaseException:
            if owned:
                os.unlink(path)
            raise
        return record


def file_identity(path):
    """What a path names, whatever the way to it (symlinks, hard links,
    device nodes): ("dev", rdev) for a block device, else (st_dev, st_ino);
    None if it cannot be stat()ed."""
    try:
        return filelocks.identity(os.stat(path))
    except (OSError, ValueError):
        return None


def check_outside(state_dir, path):
    """Refuse a --file that is one of the state directory's own files, by
    any path: under its real path, under a directory that is the state
    directory (a bind mount), or a hard link of a file in it."""
    def refuse(what="it is inside the state directory"):
        raise errors.BackingUnusable(
            path=path, reason=what + ", whose files clonectl manages")

    real = os.path.realpath(path)
    top = os.path.realpath(state_dir.path)
    if real == top or real.startswith(top + os.sep):
        refuse()
    top_id = file_identity(top)
    if top_id is None:
        return
    parent = real
    while True:
        parent, tail = os.path.split(parent)
        if file_identity(parent) == top_id:
            refuse()
        if not tail:
            break
    wanted = file_identity(real)
    own = state_dir.own_files().get(wanted) if wanted is not None else None
    if own is not None:
        refuse("it is the state directory's file {} (a link to it)".format(
            os.path.relpath(own, top)))


def check_external(state_dir, record):
    """At every opening of an LU's or clone's record: a file given with
    --file that is now one of the state directory's own files (its path
    retargeted since) is refused, as at its creation (check_outside)."""
    if state_dir is not None and not record["owned"]:
        check_outside(state_dir, record["file"])


def check_name_free(doc, name):
    """LU and clone names share one namespace: the NBD export names."""
    if any(name == (cname or lu) for lu, cname, _ in records(doc)):
        raise errors.DuplicateLU(name=name)


def check_backing_free(doc, path, exclude=None):
    """Refuse a file that already backs an LU or a clone (other than
    exclude), by any path."""
    real = os.path.realpath(path)
    wanted = file_identity(real)

    def same(other):
        if os.path.realpath(other) == real:
            return True
        return wanted is not None and file_identity(other) == wanted

    for lu, cname, rec in records(doc):
        if (cname or lu) != exclude and same(rec["file"]):
            raise errors.BackingInUse(path=path, name=cname or lu)


def check_storage_free(doc, path, storage, exclude=None):
    """Refuse storage (target.storageid) that shares bytes with the
    storage recorded for an LU or a clone other than exclude: the same
    (whose own path names other storage now), within it or holding it (a
    partition and its disk, a loop device and its file)."""
    for lu, cname, rec in records(doc):
        if (cname or lu) != exclude and \
                storageid.overlap(rec.get("storage"), storage):
            raise errors.BackingInUse(path=path, name=cname or lu)


_NOT_TAKEN = "a file of that name is already in the state directory; it " \
    "was left untouched"


def create_sparse(path, size):
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise errors.BackingUnusable(path=path, reason=_NOT_TAKEN)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
        # The new entry too: the state record that names the file is saved
        # next, and a power cut must not keep the record without the file.
        fsutil.fsync_dir(os.path.dirname(os.path.abspath(path)))
    except (OSError, OverflowError) as e:
        os.close(fd)
        os.unlink(path)
        raise errors.BackingUnusable(
            path=path, reason="cannot make it {} bytes: {}".format(
                size, getattr(e, "strerror", None) or "too large")) from e
    os.close(fd)


def lu_user(state_dir, name, record):
    """Why LU name cannot be deleted or resized now: its clones, sessions
    or replicated group (all sized by the LU and mapping its extents), or
    None.  Connections are the running target's to check."""
    if record.get("clones"):
        return "it has clones ({}); remove them first with `clonectl clone " \
            "remove`".format(", ".join(sorted(record["clones"])))
    sessions = record.get("sessions") or {}
    # The images the target keeps of the LU (a peer's protected image, a
    # secondary's last consistent one) are internal sessions: recorded as
    # images, or (older records) without a destination, which a user's
    # session always has.
    images = sorted(n for n, r in sessions.items()
                    if r.get("image") is True or not r.get("dests"))
    users = sorted(n for n in sessions if n not in images)
    if users:
        return "it has sessions ({}); delete them first with `clonectl " \
            "session delete`".format(", ".join(users))
    for group in state_dir.rsg_names():
        if name in state_dir.group_files(group).volume_names():
            return "it is a volume of replicated group {}; delete the " \
                "group first with `clonectl rsg delete`".format(group)
    if images:
        return "images of it are kept ({}); `clonectl lu rollback {}` " \
            "puts one back and releases it".format(
                ", ".join("{}@{}".format(name, n) for n in images), name)
    return None


FILE_DATA = ("keep", "zero")


def _data_within(fd, start, end):
    """Whether a regular file holds data (not a hole) in [start, end)."""
    try:
        return os.lseek(fd, start, os.SEEK_DATA) < end
    except OSError as e:
        if e.errno == errno.ENXIO:
            return False    # nothing but a hole from start on
        raise


def _zero_file(fd, start, end):
    """Zero [start, end) of a regular file: a hole, or zeroes written
    where the file system cannot punch one."""
    try:
        backends.fallocate(fd, backends.FALLOC_FL_PUNCH_HOLE |
                           backends.FALLOC_FL_KEEP_SIZE, start, end - start)
        return
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    zeroes = memoryview(bytes(1 << 20))
    while start < end:
        start += os.pwrite(fd, zeroes[:min(len(zeroes), end - start)], start)


def resize_lu(state_dir, name, size, check_busy=None, file_data=None):
    """Grow LU name to size bytes; return (old record, new record).

    A file clonectl created is extended (sparse: the new bytes read as
    zeros); a file given with --file is extended too if it is a regular
    file; a block device must already be that large (grow it first).
    Shrinking is refused: it would cut off data hosts wrote.

    A --file longer than the LU may hold data of its own where the LU
    grows: hosts would read it as the new part.  Refused unless
    file_data says "zero" (those bytes of the file are zeroed) or "keep"
    (hosts read them).
    """
    if file_data not in (None,) + FILE_DATA:
        raise errors.InvalidArgument(
            reason="file_data must be one of {}, not {!r}".format(
                ", ".join(FILE_DATA), file_data))
    size = units.parse_lu_size(size)
    with state_dir.locked():
        doc = state_dir.load()
        record = doc["lus"].get(name)
        if record is None:
            raise errors.UnknownLU(name=name)
        if size <= record["size"]:
            raise errors.LUResizeRefused(
                name=name, reason="{} is not larger than its size {} ({}); "
                "only growing is supported".format(
                    size, record["size"], units.format_size(record["size"])))
        if check_busy is not None:
            check_busy(name, record)
        path = record["file"]
        owner = "LU {}".format(name)
        command = "lu accept-storage {}".format(name)
        try:
            st = os.stat(path)
        except OSError as e:
            raise errors.BackingUnusable(path=path, reason=e.strerror)
        if stat.S_ISREG(st.st_mode):
            # The part of the file the LU grows over (a --file longer than
            # the LU), then what is added to the file.
            start, end = record["size"], min(size, st.st_size)
            # Opened for writing only to write (a read-only LU's file may
            # not be writable at all).
            writes = st.st_size < size or (start < end and
                                           file_data == "zero")
            try:
                fd = os.open(path, os.O_RDWR if writes else os.O_RDONLY)
                try:
                    check_storage(record, storageid.of_fd(fd), owner,
                                  command)
                    data = start < end and file_data != "keep" and \
                        _data_within(fd, start, end)
                    if data and file_data is None:
                        raise errors.LUResizeRefused(
                            name=name, reason="its file {} holds data past "
                            "the LU's size ({}), which hosts would read as "
                            "the new part; choose --file-data zero (those "
                            "bytes of the file are zeroed) or --file-data "
                            "keep (hosts read them)".format(
                                path, units.format_size(start)))
                    if st.st_size < size:
                        os.ftruncate(fd, size)
                    if data:
                        _zero_file(fd, start, end)
                    if writes:
                        os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                raise errors.BackingUnusable(
                    path=path, reason="cannot make it {} bytes: {}".format(
                        size, e.strerror)) from e
        else:
            _, found = probe_backing(path, size, record["readonly"],
                                     owner=owner, identify=True)
            check_storage(record, found, owner, command)
        new = dict(record, size=size)
        doc["lus"][name] = new
        # The file first, then the record: a crash in between leaves a
        # longer file under the old size, which is what it was.
        state_dir.save(doc)
        return record, new


def delete_lu(state_dir, name, check_busy=None):
    """Remove an LU from the inventory (and its file if we created it).

    check_busy(name, record) is called under the state lock and raises
    LUBusy to refuse (served, has clones).
    """
    with state_dir.locked():
        doc = state_dir.load()
        record = doc["lus"].get(name)
        if record is None:
            raise errors.UnknownLU(name=name)
        if check_busy is not None:
            check_busy(name, record)
        del doc["lus"][name]
        if record["owned"]:
            owned_file_pending(doc, name, "lu delete {}".format(name))
        state_dir.save(doc)
        if record["owned"]:
            fsutil.remove_durably([record["file"]])
            owned_file_settled(doc, name)
            state_dir.save(doc)
    return record
