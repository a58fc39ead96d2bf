"""Locks on the files an LU's bytes live in, against other programs.

A write that reaches a served file from outside the target passes no
layer of its I/O stack, so no map hears of it: a clone, a session's
destination or a secondary then differs from the Source under a clean
bit.  Every backing file the target opens is therefore locked with the
byte-range locks QEMU takes on its images, so that the programs an admin
would point at an image file (qemu, qemu-nbd, qemu-io, `qemu-img
convert`, another clonectl target) refuse to write it, and the target
refuses a file one of them holds for writing.

Design notes:

- QEMU's convention (block/file-posix.c): open file description (OFD)
  read locks on single bytes, 100 + bit for each permission the opener
  uses and 200 + bit for each it does not share with others; bits 0
  consistent read, 1 write, 2 write unchanged, 3 resize.  Read locks never
  conflict with each other: an opener takes its bytes first, then tests
  with a write-lock probe (F_OFD_GETLK) whether anyone else holds a byte
  that excludes it.  Two openers racing may both see each other and both
  fail; they never both succeed.
- We use consistent read and write (a read-only LU consistent read
  only; a resize goes through its own descriptor), and share consistent
  read and write unchanged: other programs may read the file
  (`qemu-img compare`, `qemu-nbd -r`; `qemu-img convert` from it needs
  `-U`, as from a running VM's disk), never write or resize it.
- A block device is also claimed with O_EXCL, on a descriptor of its
  own kept while this process uses the device: the claim fails while the
  device is mounted or held by device-mapper, md or another exclusive
  opener, and they fail while we hold it.
- Within this process a file may be opened again (a flusher's second
  descriptor, an LU reopened by a reload while its old connections end):
  OFD probes see our own other descriptors as strangers, so files held
  here are counted, and a second opening takes the same lock bytes
  without probing.  Each opening names its owner (an LU, a clone): a
  second owner of one file is refused, so that two objects of one target
  never share storage however their paths came to name it.

Deliberately ignored: programs that take no locks (dd, tgtd, nbdkit's
file plugin, a qemu told `locking=off` or `-U`/force-share) are not
stopped; that is the admin's choice.  A filesystem without OFD locks is
used unlocked with a warning in the log, as QEMU does.
"""

import collections
import errno
import fcntl
import logging
import os
import stat
import struct
import threading

from . import errors

log = logging.getLogger("clonectl.filelocks")

PERM_BASE = 100
SHARED_BASE = 200
CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE = range(4)
BITS = (CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE)
NAMES = {CONSISTENT_READ: "reading", WRITE: "writing",
         WRITE_UNCHANGED: "writing", RESIZE: "resizing"}
SHARED = frozenset((CONSISTENT_READ, WRITE_UNCHANGED))

_FLOCK = "hhqqi4x"     # struct flock: type, whence, start, len, pid

# (st_dev, st_ino) or ("dev", rdev) -> _Held.
_held = {}
_held_lock = threading.Lock()


def identity(st):
    """What a stat result names, whatever the way to it: ("dev", rdev)
    for a block device, else (st_dev, st_ino)."""
    if stat.S_ISBLK(st.st_mode):
        return ("dev", st.st_rdev)
    return (st.st_dev, st.st_ino)


def _perms(writable):
    return (CONSISTENT_READ, WRITE) if writable else (CONSISTENT_READ,)


def _lock(fd, byte):
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK,
                struct.pack(_FLOCK, fcntl.F_RDLCK, os.SEEK_SET, byte, 1, 0))


def _taken(fd, byte):
    """Whether another open file holds a lock on byte."""
    got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK,
                      struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, byte,
                                  1, 0))
    return struct.unpack(_FLOCK, got)[0] != fcntl.F_UNLCK


def _conflict(fd, writable):
    """What another program holds that excludes us, or None."""
    for bit in _perms(writable):
        if _taken(fd, SHARED_BASE + bit):
            return "it forbids {} the file".format(NAMES[bit])
    for bit in BITS:
        if bit not in SHARED and _taken(fd, PERM_BASE + bit):
            return "it holds the file for {}".format(NAMES[bit])
    return None


def _take(fd, path, writable, probe):
    """Take our lock bytes on fd (all of them, also for a second
    descriptor: the first may close before it); with probe, return what
    another program holds that excludes us (None: nothing)."""
    try:
        for bit in _perms(writable):
            _lock(fd, PERM_BASE + bit)
        for bit in BITS:
            if bit not in SHARED:
                _lock(fd, SHARED_BASE + bit)
        return _conflict(fd, writable) if probe else None
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return "it holds a write lock on the file"
        if e.errno in (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP,
                       errno.ENOSYS):
            # As QEMU does: a filesystem without OFD locks is used
            # unlocked, and said so.
            log.warning("%s cannot be locked against other programs (%s): "
                        "it is used unlocked", path, e.strerror)
            return None
        raise errors.BackingUnusable(
            path=path, reason="cannot lock it against other programs: "
            "{}".format(e.strerror))


def _claim_device(path):
    """A descriptor that holds the kernel's exclusive claim on block
    device path (O_EXCL), for as long as this process uses the device."""
    try:
        return os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise errors.BackingLocked(
                path=path, reason="the device is mounted, or held by "
                "device-mapper, md or another exclusive opener")
        raise


class _Held:
    """A file or device this process has open through open_locked."""

    def __init__(self, claim):
        self.claim = claim              # the O_EXCL descriptor, or None
        self.owners = collections.Counter()     # owner -> descriptors


# descriptor -> (its file's key, its owner)
_fds = {}


def open_locked(path, writable, owner=None):
    """Open path (O_RDWR if writable) locked as the module says; return
    the descriptor.  owner names what the file holds ("LU x", "clone
    c"): a file this process holds for another owner is refused
    (errors.BackingShared: two objects of one target on one storage,
    after a path was retargeted or a device renamed), one it holds for
    the same owner is opened again.  Raise errors.BackingLocked when
    another program holds it, errors.BackingUnusable when locking fails
    for another reason than a filesystem without OFD locks (then it is
    used unlocked, with a warning), OSError as os.open does otherwise.
    A writable opening of a file this process holds read-only only is
    not probed again (nothing does that)."""
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
    with _held_lock:
        fd = os.open(path, flags)
        try:
            st = os.fstat(fd)
            key = identity(st)
            held = _held.get(key)
            if held is not None and owner is not None:
                others = sorted(o for o in held.owners
                                if o is not None and o != owner)
                if others:
                    raise errors.BackingShared(path=path, owner=owner,
                                               other=others[0])
            claim = None
            if held is None and stat.S_ISBLK(st.st_mode):
                claim = _claim_device(path)
            try:
                reason = _take(fd, path, writable, probe=held is None)
                if reason is not None:
                    raise errors.BackingLocked(path=path, reason=reason)
            except BaseException:
                if claim is not None:
                    os.close(claim)
                raise
        except BaseException:
            os.close(fd)
            raise
        if held is None:
            held = _held[key] = _Held(claim)
        held.owners[owner] += 1
        _fds[fd] = (key, owner)
        return fd


def close(fd):
    """Close a descriptor of open_locked (its locks go with it; the
    device's claim with the last one)."""
    with _held_lock:
        key, owner = _fds.pop(fd, (None, None))
        try:
            os.close(fd)
        finally:
            held = _held.get(key)
            if held is not None:
                held.owners[owner] -= 1
                if held.owners[owner] <= 0:
                    del held.owners[owner]
                if not held.owners:
                    del _held[key]
                    if held.claim is not None:
                        os.close(held.claim)