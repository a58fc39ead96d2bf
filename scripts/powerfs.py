"""A FUSE file system that loses unsynced writes on a power cut (tests only).

    scripts/powerfs.py BACKING MOUNTPOINT [--seed S] [--writeback P]
                       [--unsynced-entries random|keep|lose]
                       [--unsafe-ignore-fsync] [--unsafe-ignore-dir-fsync]

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
and mount again to "boot": the kernel's page cache of the old mount goes
with it, and the directory operations lost are undone before the mount.
--unsafe-ignore-fsync makes fsync and fdatasync return without writing
anything back: a disk that lies, or, what is the same from the disk's side,
a program whose flushes do nothing.  The torture's twin run uses it to show
that its checks catch lost flushed writes.  Reads through the mount see the
dirty pages, so programs on it see ordinary POSIX semantics until the cut.

Directory entries are volatile too (Namespace below): a create, mkdir,
unlink, rmdir, link, symlink or rename is durable only once its directory
has been fsynced (fsync(2): "an explicit fsync() on a file descriptor for
the directory is also needed"); the operations not made durable before a
cut are undone at the next start, all but a seeded prefix of them (a
journalling file system commits in order).  --unsynced-entries keep|lose
pins that choice for tests; --unsafe-ignore-dir-fsync makes directory
fsyncs do nothing, the twin that shows the checks catch a missing one.

Design notes.  Data is per inode of the backing file (so a rename keeps a
file's dirty pages), and a write is torn at page granularity: a 64 KiB write
may survive in part.  Deliberately simplified: attributes are durable at
once and in order -- truncate, size extension, chmod, times go straight to
BACKING, and so does renaming a directory (it commits every pending entry
first); fallocate is not offered (EOPNOTSUPP, so callers fall back to
writing zeroes, which are volatile like any data); sockets and FIFOs cannot
be made here (keep run directories elsewhere); one lock serializes all
requests, which is slow and simple; the mount uses direct_io (no kernel
page cache above this one: with the cache, a read racing a write could see
the old bytes of a range just written).  Not for production: nothing here
is durable except what fsync says.
"""

import argparse
import errno
import json
import os
import random
import shutil
import sys
import threading

import mfusepy

PAGE = 4096
DIRTY_LIMIT = 256 << 20
COMPACT_AFTER = 1000   # journal entries before durable ones are dropped


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


def journal_path(backing):
    """The namespace journal of BACKING: beside it, on the same file system
    (its stash holds hard links)."""
    return backing.rstrip("/") + ".powerfs-journal"


class Namespace:
    """Directory entries that are not durable yet, and how to take them
    back at the next boot.

    Each create, mkdir, symlink, link, unlink, rmdir and rename is done on
    BACKING at once (programs see it) and then appended to a journal next
    to BACKING, with what undoes it: an entry that is removed or replaced
    is first hard-linked into the journal's stash, so its inode (and the
    data it holds) can be put back.  fsync of a directory makes every
    earlier operation on its entries durable; a rename needs both of its
    directories synced, and an operation that becomes durable takes the
    creation of its parent directories with it.  Once nothing is pending
    the journal is emptied.

    The journal is this process's memory that outlives it: kill -9 does not
    lose the host's page cache, so it is written without syncs.  At the
    next start, recover() keeps every durable operation and a prefix of
    the pending ones (a journalling file system commits in order; how long
    a prefix is the seeded choice, or all/none by option) and undoes the
    rest, newest first.  Not modelled: renaming a directory (every pending
    operation is made durable first, then it is durable at once), the
    ordering of a file's size and its entry (sizes stay durable at once)."""

    def __init__(self, root, journal_dir):
        self.root = root
        self.dir = journal_dir
        self.log_path = os.path.join(journal_dir, "log")
        self.stash_dir = os.path.join(journal_dir, "stash")
        os.makedirs(self.stash_dir, exist_ok=True)
        self.pending = []     # ops (dicts) in order
        self.next_id = 0
        self.log = None

    # -- the journal, read at a boot

    def recover(self, rng, keep):
        """Undo what a power cut lost; return the number of undone ops."""
        pending = [op for op in self._read_log() if not op["durable"]]
        if keep == "all":
            prefix = len(pending)
        elif keep == "none":
            prefix = 0
        else:
            prefix = rng.randint(0, len(pending))
        undone = pending[prefix:]
        for op in reversed(undone):
            print("powerfs: lost {} {}{}".format(
                op["op"], op["path"],
                " -> " + op["new"] if "new" in op else ""), file=sys.stderr)
            self._undo(op)
        self._reset()
        return len(undone)

    def _read_log(self):
        try:
            with open(self.log_path) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        ops = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                # Torn by the cut: the operation was done before its
                # record (record() follows it), so it stays, as if the
                # journal had committed it.
                break
            if "sync" in rec:
                self._apply_sync(ops, rec["sync"])
            else:
                rec["durable"] = False
                ops.append(rec)
        return ops

    def _reset(self):
        if self.log is not None:
            self.log.close()
        for name in os.listdir(self.stash_dir):
            p = os.path.join(self.stash_dir, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
        self.log = open(self.log_path, "w")
        self.pending = []

    def _undo(self, op):
        path = self._abs(op["path"])
        kind = op["op"]
        try:
            if kind in ("create", "symlink", "link"):
                os.unlink(path)
            elif kind == "mkdir":
                # Its entries were undone first (they come later); move
                # anything left aside rather than fail.
                os.rename(path, os.path.join(self.stash_dir,
                                             "dir.{}".format(op["id"])))
            elif kind == "rmdir":
                os.mkdir(path, op["mode"])
            elif kind == "unlink":
                os.rename(self._stashed(op), path)
            elif kind == "rename":
                os.rename(self._abs(op["new"]), path)
                if op.get("replaced"):
                    os.rename(self._stashed(op), self._abs(op["new"]))
        except OSError as e:
            print("powerfs: could not undo {}: {}".format(op, e),
                  file=sys.stderr)

    # -- while mounted (the caller holds the file system's lock)

    def record(self, kind, path, dirs, **extra):
        op = dict(extra, id=self.next_id, op=kind, path=path)
        self.next_id += 1
        op["unsynced"] = sorted(set(dirs))
        self.log.write(json.dumps(op) + "\n")
        self.log.flush()
        op["durable"] = False
        self.pending.append(op)

    def stash(self, path):
        """Keep the inode at path reachable; return the stash name."""
        name = "s{}".format(self.next_id)
        os.link(self._abs(path), os.path.join(self.stash_dir, name),
                follow_symlinks=False)
        return name

    def synced(self, directory):
        if not self.pending:
            return
        self.log.write(json.dumps({"sync": directory}) + "\n")
        self.log.flush()
        self._apply_sync(self.pending, directory)
        for op in self.pending:
            if op["durable"] and op.get("stash"):
                os.unlink(self._stashed(op))
                op["stash"] = None
        if all(op["durable"] for op in self.pending):
            self._reset()
        elif len(self.pending) > COMPACT_AFTER:
            self._compact()

    def _compact(self):
        """Rewrite the journal with the pending operations only (durable
        ones are never undone)."""
        self.pending = [op for op in self.pending if not op["durable"]]
        tmp = self.log_path + ".new"
        with open(tmp, "w") as f:
            for op in self.pending:
                f.write(json.dumps({k: v for k, v in op.items()
                                    if k != "durable"}) + "\n")
        self.log.close()
        os.rename(tmp, self.log_path)
        self.log = open(self.log_path, "a")

    def commit_all(self):
        """Everything pending becomes durable (before what we do not
        model)."""
        if self.pending:
            self._reset()

    @staticmethod
    def _apply_sync(ops, directory):
        created = {op["path"]: op for op in ops if op["op"] == "mkdir"}
        for op in ops:
            if directory in op["unsynced"]:
                op["unsynced"].remove(directory)
                if not op["unsynced"]:
                    Namespace._make_durable(op, created)

    @staticmethod
    def _make_durable(op, created):
        op["durable"] = True
        for path in (op["path"], op.get("new")):
            parent = os.path.dirname(path) if path else None
            while parent and parent != "/":
                maker = created.get(parent)
                if maker is not None and not maker["durable"]:
                    maker["durable"] = True
                parent = os.path.dirname(parent)

    def _abs(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    def unstash(self, name):
        os.unlink(os.path.join(self.stash_dir, name))

    def _stashed(self, op):
        return os.path.join(self.stash_dir, op["stash"])


class PowerLossFS(mfusepy.Operations):

    use_ns = True

    def __init__(self, backing, seed, writeback, ignore_fsync=False,
                 ignore_dir_fsync=False):
        self.root = os.path.realpath(backing)
        self.ns = Namespace(self.root, journal_path(self.root))
        self.ignore_dir_fsync = ignore_dir_fsync
        self.rng = random.Random(seed)
        self.writeback = writeback
        self.ignore_fsync = ignore_fsync
        self.mutex = threading.Lock()
        self.dirty = {}       # st_ino -> Dirty
        self.dirty_bytes = 0
        self.fds = {}         # fh (our backing fd) -> st_ino

    def _path(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    # Metadata.  Attributes go straight through, durable at once; directory
    # entries are durable once their directory is fsynced (Namespace).

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
        with self.mutex:
            os.mkdir(self._path(path), mode)
            self.ns.record("mkdir", path, [os.path.dirname(path)])
        return 0

    def rmdir(self, path):
        with self.mutex:
            mode = os.lstat(self._path(path)).st_mode & 0o7777
            os.rmdir(self._path(path))
            self.ns.record("rmdir", path, [os.path.dirname(path)], mode=mode)
        return 0

    def unlink(self, path):
        with self.mutex:
            stash = self.ns.stash(path)
            try:
                os.unlink(self._path(path))
            except OSError:
                self.ns.unstash(stash)
                raise
            self.ns.record("unlink", path, [os.path.dirname(path)],
                           stash=stash)
        return 0

    def symlink(self, target, source):
        with self.mutex:
            os.symlink(source, self._path(target))
            self.ns.record("symlink", target, [os.path.dirname(target)])
        return 0

    def rename(self, old, new):
        with self.mutex:
            if os.path.isdir(self._path(old)) or \
                    os.path.isdir(self._path(new)):
                # Not modelled: commit everything, then rename durably.
                self.ns.commit_all()
                os.rename(self._path(old), self._path(new))
                return 0
            stash = None
            if os.path.lexists(self._path(new)):
                stash = self.ns.stash(new)
            try:
                os.rename(self._path(old), self._path(new))
            except OSError:
                if stash is not None:
                    self.ns.unstash(stash)
                raise
            self.ns.record("rename", old,
                           [os.path.dirname(old), os.path.dirname(new)],
                           new=new, stash=stash, replaced=stash is not None)
        return 0

    def link(self, target, source):
        with self.mutex:
            os.link(self._path(source), self._path(target))
            self.ns.record("link", target, [os.path.dirname(target)])
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
        with self.mutex:
            new = not os.path.lexists(self._path(path))
            fd = os.open(self._path(path),
                         os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)
            if new:
                self.ns.record("create", path, [os.path.dirname(path)])
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
        if self.ignore_fsync or self.ignore_dir_fsync:
            return 0
        with self.mutex:
            self.ns.synced(path)
        return 0


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
    p.add_argument("--unsynced-entries", choices=("random", "keep", "lose"),
                   default="random",
                   help="at this start, which directory operations not made "
                        "durable by a directory fsync before the last cut "
                        "survive: a random prefix (default), all, or none")
    p.add_argument("--unsafe-ignore-fsync", action="store_true",
                   help="fsync and fdatasync do nothing, on files and "
                        "directories (for the torture's twin run that must "
                        "fail)")
    p.add_argument("--unsafe-ignore-dir-fsync", action="store_true",
                   help="fsync of a directory does nothing (for the twin "
                        "run that shows lost directory entries are caught)")
    args = p.parse_args(argv)
    fs = PowerLossFS(args.backing, args.seed, args.writeback,
                     args.unsafe_ignore_fsync, args.unsafe_ignore_dir_fsync)
    undone = fs.ns.recover(fs.rng, args.unsynced_entries)
    if undone:
        print("powerfs: this boot lost {} directory operations that were "
              "not synced".format(undone), file=sys.stderr)
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
