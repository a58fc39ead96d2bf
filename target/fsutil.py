"""Durable file updates (rtslib save_to_file style) and path helpers."""

import errno
import hashlib
import json
import os
import stat
import tempfile

from . import errors

# sun_path is 108 bytes on Linux including the terminating NUL.
_MAX_UNIX_PATH = 107


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durable(path, mode=0o700):
    """os.makedirs, and each new directory's entry made durable (fsync of
    the directory that holds it), so a power cut cannot take away a
    directory that files were then created and synced in."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    makedirs_durable(parent, mode)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not os.path.isdir(path):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR),
                                     path)
        return
    fsync_dir(parent)


def remove_durably(paths):
    """Unlink each of paths that exists, then fsync the directories they
    are in: a removal the disk forgets brings an old file back (an old map
    or stage file that a later create would trip over).  A directory is
    synced even where nothing was left to unlink: a file gone already may
    have gone in an earlier call whose sync failed."""
    dirs = set()
    for path in paths:
        dirs.add(os.path.dirname(os.path.abspath(path)))
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
    for directory in sorted(dirs):
        try:
            fsync_dir(directory)
        except FileNotFoundError:
            continue        # no directory: nothing of it to forget


def write_atomic(path, data, mode=0o600):
    """Replace path with data so that a crash leaves the old or the new file.

    Write a temporary file in the same directory, fsync it, rename it over the
    target, then fsync the directory so the rename itself is durable.  A
    failure raises with the old file in place (or none, if there was
    none), also when only the directory's fsync failed: the old file is
    kept as a hard link until then and renamed back, so that a caller
    told of the failure never finds the new file at its path (a crash
    then may still leave either).
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp", dir=directory)
    old = tmp[:-len(".tmp")] + ".old"
    existed = True
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        try:
            os.link(path, old)
        except FileNotFoundError:
            old, existed = None, False
        except OSError:
            # vfat, some FUSE, protected_hardlinks, EMLINK: no copy kept;
            # a failed directory sync then cannot be undone (as before).
            old = None
        os.rename(tmp, path)        # a failure leaves path as it was
        try:
            fsync_dir(directory)
        except BaseException:
            if old is not None or not existed:
                _put_back(path, old)
            old = None
            raise
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    finally:
        if old is not None:
            try:
                os.unlink(old)
            except OSError:
                pass        # a hidden leftover; the new file is in place


def _put_back(path, old):
    """After a failed replacement: path as it was (old: a hard link of
    the file it was, or None if there was none), as well as can be."""
    try:
        if old is not None:
            os.rename(old, path)
        else:
            os.unlink(path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    except OSError:
        pass


def write_json_atomic(path, obj):
    data = json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n"
    write_atomic(path, data)


def unix_socket_path(preferred):
    """Return preferred, or a short stand-in under /tmp if it is too long.

    A Unix socket path is limited to 107 bytes; pytest and deep state
    directories exceed that.  The stand-in is derived from the preferred path,
    so every process computes the same one without recording it.  Its
    directory, /tmp/clonectl-UID, must be ours alone (private_dir).
    """
    preferred = os.path.abspath(preferred)
    if len(preferred.encode()) <= _MAX_UNIX_PATH:
        return preferred
    digest = hashlib.sha256(preferred.encode()).hexdigest()[:20]
    directory = private_dir("/tmp/clonectl-{}".format(os.getuid()))
    return os.path.join(directory, "{}-{}".format(
        digest, os.path.basename(preferred)))


def private_dir(path):
    """Make directory path with mode 0700, or check that the one there is
    ours alone: a real directory (not a symbolic link), owned by our uid,
    with no permission for group or others.  Anyone can create a name in
    /tmp first, and whoever owns the directory can replace our sockets in it
    and receive our clients; so another's directory is refused
    (SocketDirUnsafe), never used or repaired."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        reason = "it is a symbolic link" if stat.S_ISLNK(st.st_mode) \
            else "it is not a directory"
    elif st.st_uid != os.getuid():
        reason = "it is owned by uid {}, not {}".format(st.st_uid,
                                                        os.getuid())
    elif st.st_mode & 0o077:
        reason = "its mode {:o} gives others access (it must be 700)".format(
            stat.S_IMODE(st.st_mode))
    else:
        return path
    raise errors.SocketDirUnsafe(path=path, reason=reason)


def is_socket(path):
    """True if path is a Unix socket, False if nothing is there.  Anything
    else (a file, a directory, a symbolic link) is refused: a socket path
    is only ever replaced when it holds a stale socket, never whatever a
    mistyped option or another user put there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISSOCK(st.st_mode):
        return True
    kind = ("a directory" if stat.S_ISDIR(st.st_mode) else
            "a symbolic link" if stat.S_ISLNK(st.st_mode) else
            "a regular file" if stat.S_ISREG(st.st_mode) else "a special file")
    raise errors.InvalidArgument(
        reason="{} is not a socket but {}; it was left alone (only a stale "
               "socket there is replaced): choose another path or remove "
               "it".format(path, kind))


def check_private(path, what):
    """Refuse path, a secret (a token or a key file; what: its name in
    errors), when its group or others may read it: the file is the only
    credential, and a copy someone else could read is one no longer."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise errors.InvalidArgument(
            reason="cannot read the {} file {!r}: {}".format(
                what, path, e.strerror))
    if st.st_mode & 0o077:
        raise errors.InvalidArgument(
            reason="the {} file {} is readable by its group or others "
                   "(mode {:o}); it holds a secret: chmod 600 {}".format(
                       what, path, stat.S_IMODE(st.st_mode), path))


def read_token(path, what):
    """The shared token of a manager-to-manager channel (what: its name, in
    errors), from a file only its owner may read."""
    check_private(path, "{} token".format(what))
    try:
        with open(path) as f:
            token = f.read().strip()
    except OSError as e:
        raise errors.InvalidArgument(
            reason="cannot read the {} token file {!r}: {}".format(
                what, path, e.strerror))
    if len(token) < 16:
        raise errors.InvalidArgument(
            reason="the {} token in {!r} is shorter than 16 characters"
            .format(what, path))
    return token
