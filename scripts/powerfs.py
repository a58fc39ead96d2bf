"""A FUSE file system that loses unsynced writes on a power cut (tests only).

    scripts/powerfs.py BACKING MOUNTPOINT [--seed S] [--writeback P]
                       [--unsafe-ignore-fsync]

mounts BACKING at MOUNTPOINT in the foreground.  Every file's data written
through the mount stays in this process's memory, page by page (4 KiB), as
a kernel page cache holds dirty pages, until one of:

  - fsync or fdatasync of that file: all its dirty pages are written to
    BACKING and the backing file is fdatasynced before the call returns;
  - early writeback, at random (seeded): each page a write dirties is
    written back at once with probability P (default 0.3), and now and then
    a random sample of a file's older dirty pages is written back too, so
    that what survives a cut is an arbitrary subset of the unsynced writes,
    old and new, as on a real disk;
  - memory pressure: beyond 256 MiB of dirty pages everything is written
    back.

A power cut is `kill -9` of this process: the dirty pages vanish with it,
and BACKING holds exactly what was made durable plus the pages written back
early.  The mount is then dead (ENOTCONN); unmount it (`fusermount3 -u -z`)
and mount again to "boot" -- the kernel's page cache of the old mount goes
with it.  --unsafe-ignore-fsync makes fsync and fdatasync return without
writing anything back: a disk that lies, or, what is the same from the
disk's side, a program whose flushes do nothing.  The torture's twin run
uses it to show that its checks catch lost flushed writes.  Reads through the mount see the dirty pages, so programs on it
see ordinary POSIX semantics until the cut.

Design notes.  Data is per inode of the backing file (so a rename keeps a
file's dirty pages), and a write is torn at page granularity: a 64 KiB write
may survive in part.  Deliberately simplified: metadata is durable at once
and in order -- create, mkdir, unlink, rename, truncate and size extension
go straight to BACKING (so a rename of an unsynced temporary file is caught:
the renamed file has stale data, but a rename that would only be lost
without an fsync of the directory is not modelled); fallocate is not offered
(EOPNOTSUPP, so callers fall back to writing zeroes, which are volatile like
any data); sockets and FIFOs cannot be made here (keep run directories
elsewhere); one lock serializes all data requests, which is slow and
simple; the mount uses direct_io (no kernel page cache above this one: with
the cache, a read racing a write could see the old bytes of a range just
written).  Not for production: nothing here is durable except what fsync
says.
"""

import argparse
import errno
import os
import random
import sys
import threading

import mfusepy

PAGE = 4096
DIRTY_LIMIT = 256 << 20


class Dirty:
    """The dirty pages of one backing inode (page index -> bytearray) and a
    descriptor of our own to write them back with: a page cache keeps dirty
    pages after the last close, and holding the inode open also keeps its
    number from being reused while we key pages by it.  Dropped when its
    last page is written back (temporary files come and go by the
    thousand)."""

    def __init__(self, ino, fd):
        self.ino = ino
        self.pages = {}
        self.fd = os.dup(fd)


class PowerLossFS(mfusepy.Operations):

    use_ns = True

    def __init__(self, backing, seed, writeback, ignore_fsync=False):
        self.root = os.path.realpath(backing)
        self.rng = random.Random(seed)
        self.writeback = writeback
        self.ignore_fsync = ignore_fsync
        self.mutex = threading.Lock()
        self.dirty = {}       # st_ino -> Dirty
        self.dirty_bytes = 0
        self.fds = {}         # fh (our backing fd) -> st_ino

    def _path(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    # Metadata: straight through, durable at once.

    def getattr(self, path, fh=None):
        st = os.lstat(self._path(path))
        keys = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size",
                "st_atime_ns", "st_mtime_ns", "st_ctime_ns", "st_ino",
                "st_blocks", "st_blksize")
        out = {k: getattr(st, k) for k in keys}
        for k in ("st_atime", "st_mtime", "st_ctime"):
            out[k] = out.pop(k + "_ns")
        return out

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._path(path))

    def readlink(self, path):
        return os.readlink(self._path(path))

    def mkdir(self, path, mode):
        os.mkdir(self._path(path), mode)
        return 0

    def rmdir(self, path):
        os.rmdir(self._path(path))
        return 0

    def unlink(self, path):
        os.unlink(self._path(path))
        return 0

    def symlink(self, target, source):
        os.symlink(source, self._path(target))
        return 0

    def rename(self, old, new):
        os.rename(self._path(old), self._path(new))
        return 0

    def link(self, target, source):
        os.link(self._path(source), self._path(target))
        return 0

    def chmod(self, path, mode):
        os.chmod(self._path(path), mode)
        return 0

    def chown(self, path, uid, gid):
        os.chown(self._path(path), uid, gid)
        return 0

    def utimens(self, path, times=None):
        os.utime(self._path(path), ns=times)
        return 0

    def statfs(self, path):
        sv = os.statvfs(self._path(path))
        return {k: getattr(sv, k) for k in (
            "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
            "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")}

    def access(self, path, amode):
        if not os.access(self._path(path), amode):
            raise mfusepy.FuseOSError(errno.EACCES)
        return 0

    # Files.

    def _track(self, fd):
        self.fds[fd] = os.fstat(fd).st_ino
        return fd

    def open(self, path, flags):
        # O_SYNC/O_DSYNC would make every write durable: not modelled, and
        # nothing of ours uses them; the kernel handles O_APPEND.
        flags &= ~(os.O_DIRECT | os.O_SYNC | os.O_DSYNC | os.O_APPEND)
        fd = os.open(self._path(path), flags)
        with self.mutex:
            if flags & os.O_TRUNC:
                self._forget(os.fstat(fd).st_ino)
            return self._track(fd)

    def create(self, path, mode, fi=None):
        fd = os.open(self._path(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC,
                     mode)
        with self.mutex:
            self._forget(os.fstat(fd).st_ino)
            return self._track(fd)

    def _forget(self, ino):
        d = self.dirty.pop(ino, None)
        if d is not None:
            self.dirty_bytes -= PAGE * len(d.pages)
            os.close(d.fd)

    def release(self, path, fh):
        with self.mutex:
            del self.fds[fh]
            os.close(fh)
        return 0

    def truncate(self, path, length, fh=None):
        with self.mutex:
            if fh is None:
                os.truncate(self._path(path), length)
                ino = os.lstat(self._path(path)).st_ino
            else:
                os.ftruncate(fh, length)
                ino = self.fds[fh]
            d = self.dirty.get(ino)
            if d is not None:
                for index in [i for i in d.pages if (i + 1) * PAGE > length]:
                    if index * PAGE >= length:
                        self._drop(d, index)
                    else:
                        page = d.pages[index]
                        page[length - index * PAGE:] = bytes(
                            PAGE - (length - index * PAGE))
        return 0

    def _drop(self, d, index):
        del d.pages[index]
        self.dirty_bytes -= PAGE

    def read(self, path, size, offset, fh):
        with self.mutex:
            data = bytearray(os.pread(fh, size, offset))
            d = self.dirty.get(self.fds[fh])
            if d is not None and d.pages:
                end = offset + len(data)
                for index in range(offset // PAGE, (end + PAGE - 1) // PAGE):
                    page = d.pages.get(index)
                    if page is None:
                        continue
                    start = max(offset, index * PAGE)
                    stop = min(end, (index + 1) * PAGE)
                    data[start - offset:stop - offset] = \
                        page[start - index * PAGE:stop - index * PAGE]
            return bytes(data)

    def write(self, path, data, offset, fh):
        with self.mutex:
            ino = self.fds[fh]
            d = self.dirty.get(ino)
            if d is None:
                d = self.dirty[ino] = Dirty(ino, fh)
            end = offset + len(data)
            size = os.fstat(fh).st_size
            if end > size:
                os.ftruncate(fh, end)  # the size is metadata: durable
            touched = []
            for index in range(offset // PAGE, (end + PAGE - 1) // PAGE):
                page = d.pages.get(index)
                if page is None:
                    page = bytearray(os.pread(fh, PAGE, index * PAGE))
                    page.extend(bytes(PAGE - len(page)))
                    d.pages[index] = page
                    self.dirty_bytes += PAGE
                start = max(offset, index * PAGE)
                stop = min(end, (index + 1) * PAGE)
                page[start - index * PAGE:stop - index * PAGE] = \
                    data[start - offset:stop - offset]
                touched.append(index)
            early = [i for i in touched if self.rng.random() < self.writeback]
            if self.rng.random() < 0.05 and d.pages:
                older = list(d.pages)
                early += self.rng.sample(older, max(1, len(older) // 4))
            if self.dirty_bytes > DIRTY_LIMIT:
                for other in list(self.dirty.values()):
                    self._write_back(other, list(other.pages))
            else:
                self._write_back(d, set(early))
            return len(data)

    def _write_back(self, d, indexes):
        size = os.fstat(d.fd).st_size
        for index in sorted(indexes):
            page = d.pages.get(index)
            if page is None:
                continue
            length = min(PAGE, size - index * PAGE)
            if length > 0:
                os.pwrite(d.fd, page[:length], index * PAGE)
            self._drop(d, index)
        if not d.pages:
            self._forget(d.ino)

    def fsync(self, path, datasync, fh):
        if self.ignore_fsync:
            return 0
        with self.mutex:
            d = self.dirty.get(self.fds[fh])
            if d is not None:
                self._write_back(d, list(d.pages))
        os.fdatasync(fh) if datasync else os.fsync(fh)
        return 0

    def flush(self, path, fh):
        return 0  # close(2) is not a durability point

    def fsyncdir(self, path, datasync, fh):
        return 0  # metadata is durable at once here


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Runs in the foreground. kill -9 is the power cut; then "
               "`fusermount3 -u -z MOUNTPOINT` and mount again. See the "
               "module's docstring for what is kept and what is lost.")
    p.add_argument("backing", help="directory that is the disk")
    p.add_argument("mountpoint", help="where programs see it")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the early writeback choices (default 0)")
    p.add_argument("--writeback", type=float, default=0.3,
                   help="probability that a dirtied page is written back "
                        "at once (default 0.3)")
    p.add_argument("--unsafe-ignore-fsync", action="store_true",
                   help="fsync and fdatasync do nothing (for the torture's "
                        "twin run that must fail)")
    args = p.parse_args(argv)
    fs = PowerLossFS(args.backing, args.seed, args.writeback,
                     args.unsafe_ignore_fsync)
    try:
        # direct_io: no kernel page cache above us.  Without it, a read racing
        # a write to a neighbouring range could fill the cache with the old
        # bytes (seen here: a 4 KiB entry just written read back stale).
        mfusepy.FUSE(fs, args.mountpoint, foreground=True,
                     fsname="powerfs", direct_io=True)
    except RuntimeError as e:
        print("powerfs: {}".format(e), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
