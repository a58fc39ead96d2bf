"""What storage an open backing file is, in terms that outlive a boot.

Design notes
------------
A `--file` path is a name, and names move: disks are named in the order
the kernel finds them (sdb and sdc swap), loop devices are attached in
another order, a symlink (`/dev/disk/by-*`, an admin's own) is
retargeted.  The inventory keeps, next to the path, the identity of what
the path named when the LU or clone was added; every opening of the path
by the target compares the identity of the file it opened with it
(target.inventory.check_storage), and a mismatch is refused: served, the
LU would show hosts another disk's data, and a synchronized clone would
be mirrored onto whatever disk now answers to its name.

An identity is a string, shown as it is in errors and in status:

    dm:UUID                 a device-mapper device (LVM, dm-crypt, multipath)
    dm-name:NAME            one whose UUID is empty
    md:UUID                 an md RAID array
    wwid:ID, serial:ID      a disk, as its driver names it
    DISK+part@START         a partition: its disk's identity, first sector
    loop:FILE@OFFSET        a loop device: the identity of the file (or
                            device) it shows, from where
    file:FS:ino=INO         a regular file: its filesystem and inode

For a device the first of these the kernel offers wins, in this order
(cryptsetup's UUIDs without the mapping name they end with, chosen at
each opening).  A file's filesystem FS is the identity of the block
device it is on, read from sysfs as above, so a disk renumbered at boot
leaves its files' identities alone.  A filesystem on no block device
(device major 0: btrfs, whose device numbers are made up per mount,
tmpfs, NFS, overlay) is named by statfs's f_fsid as `fsid=HEX` (btrfs
derives it from its UUID); one on a block device without an identity has
none (xfs reports its device number as f_fsid: no substitute).

Deliberately ignored: device numbers (handed out at boot), sizes (a
device grows legitimately) and contents (never read for this).  udev's
/dev/disk links are not used either: whether they exist depends on when
and where the server starts (early at boot, in a container), and an
identity must not.  Storage that offers none of the above (a virtio disk
without a serial and the files on it, nbd, zram, a filesystem reporting
f_fsid 0, a loop device whose file was deleted, values of zeroes, loops
nested deeper than DEPTH) has no identity: None is recorded, and nothing
can be checked for it.  A kernel that starts reporting another
attribute first (a wwid where it reported only a serial) changes an
identity: the storage is refused until accepted again.
"""

import os
import re
import stat

SYSFS = "/sys"


# Loops over loops over files on loops...: deeper is no identity (and a
# loop whose file's path leads back to itself ends here too).
DEPTH = 8


def of_fd(fd, sysfs=SYSFS):
    """The identity of the open file fd, or None (see the notes above)."""
    return _of_stat(os.fstat(fd), lambda: os.fstatvfs(fd).f_fsid, sysfs, 0)


def _of_stat(st, fsid, sysfs, depth):
    if depth > DEPTH:
        return None
    if stat.S_ISBLK(st.st_mode):
        return _device(_node(sysfs, st.st_rdev), sysfs, depth)
    if os.major(st.st_dev) != 0:
        # On a block device: its identity or none.  (Not f_fsid: xfs's
        # is the device number, which a swap keeps and a renumbering
        # changes.)
        fs = _device(_node(sysfs, st.st_dev), sysfs, depth)
    else:
        fs = fsid() & (1 << 64) - 1
        fs = "fsid={:x}".format(fs) if fs else None
    return None if fs is None else "file:{}:ino={}".format(fs, st.st_ino)


def _node(sysfs, dev):
    return os.path.join(sysfs, "dev", "block", "{}:{}".format(
        os.major(dev), os.minor(dev)))


def _read(directory, *names):
    """The first of directory's attributes names that holds text other
    than zeroes (an md array with external metadata shows a UUID of
    zeroes, some disks a serial of them: every such device alike)."""
    for name in names:
        try:
            with open(os.path.join(directory, name), "rb") as f:
                text = f.read().decode("utf-8", "replace").strip()
        except OSError:
            continue
        if text.strip("0-:. "):
            return text
    return None


def _device(node, sysfs, depth):
    """The identity of the block device whose sysfs directory is node."""
    try:
        node = os.path.realpath(node, strict=True)
    except OSError:
        return None
    if os.path.exists(os.path.join(node, "partition")):
        disk = _device(os.path.dirname(node), sysfs, depth)
        start = _read(node, "start")
        if disk is None or start is None:
            return None
        return "{}+part@{}".format(disk, start)
    if os.path.isdir(os.path.join(node, "dm")):
        uuid = _read(node, "dm/uuid")
        if uuid:
            return "dm:" + _without_mapping_name(uuid)
        name = _read(node, "dm/name")
        return "dm-name:" + name if name else None
    uuid = _read(node, "md/uuid")
    if uuid:
        return "md:" + uuid
    if os.path.isdir(os.path.join(node, "loop")):
        return _loop(node, sysfs, depth + 1)
    wwid = _read(node, "wwid", "device/wwid")
    if wwid:
        return "wwid:" + wwid
    serial = _read(node, "serial", "device/serial")
    return "serial:" + serial if serial else None


def _without_mapping_name(uuid):
    """cryptsetup's UUIDs end with the mapping's name, which an admin
    chooses at every opening: CRYPT-LUKS2-<uuid>-NAME -> without it."""
    parts = uuid.split("-", 3)
    if parts[0] == "CRYPT" and len(parts) == 4 and len(parts[2]) == 32:
        return "-".join(parts[:3])
    return uuid


def _loop(node, sysfs, depth):
    """A loop device is the file it shows: the kernel gives that file's
    path as it is now (renames followed, " (deleted)" once unlinked)."""
    backing = _read(node, "loop/backing_file")
    if backing is None or backing.endswith(" (deleted)"):
        return None
    try:
        fd = os.open(backing, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        inner = _of_stat(st, lambda: os.fstatvfs(fd).f_fsid, sysfs, depth)
    finally:
        os.close(fd)
    if inner is None:
        return None
    return "loop:{}@{}".format(inner, _read(node, "loop/offset") or 0)


_FILE = re.compile(r":ino=\d+$")
_PARTITION = re.compile(r"\+part@\d+$")
_OFFSET = re.compile(r"@\d+$")


def within(identity):
    """The identities whose bytes identity's are part of, innermost
    first: a partition's disk, a loop device's file (and what that file
    is on), a file's device.  Two objects overlap when one's identity is
    the other's or within it (a partition and its whole disk, a loop
    device and the file it shows); two partitions of one disk do not."""
    out = []
    while identity:
        # The outermost layer is told by how the string ends (each layer
        # wraps the one inside it as of_fd builds them).
        if identity.startswith("file:") and (m := _FILE.search(identity)):
            identity = identity[len("file:"):m.start()]
            if identity.startswith("fsid="):
                break
        elif m := _PARTITION.search(identity):
            identity = identity[:m.start()]
        elif identity.startswith("loop:") and (m := _OFFSET.search(identity)):
            identity = identity[len("loop:"):m.start()]
        else:
            break
        out.append(identity)
    return out


def overlap(a, b):
    """Whether storages a and b share bytes, as far as their identities
    tell (None tells nothing)."""
    if a is None or b is None:
        return False
    return a == b or a in within(b) or b in within(a)
