"""Storage backends: one positional file-like interface, two implementations.

    readinto(buf, offset)        fill buf (any writable buffer) from offset
    write(buf, offset)           write buf at offset
    flush()                      make completed writes durable
    trim(offset, length)         advisory discard; reads return zero or old data
    zero(offset, length, may_trim=False, fast=False)
                                 make the range read as zeroes; with fast, fail
                                 with EOPNOTSUPP rather than write zeroes
    extents(offset, length)      [(offset, length, is_hole)] covering the range:
                                 where the backend knows a range reads as
                                 zeroes without storing them (a hole); copies
                                 zero holes rather than read them
    forget(offset, length)       drop the range's cached pages, so that the
                                 next read comes from the disk (after a
                                 failed flush, a page that could not be
                                 written may still be cached); advisory
    reopen()                     another backend of the same storage whose
                                 flush hears of every failed writeback (the
                                 kernel reports one once per open file, to
                                 the first flush that asks)
    close()

FileBackend serves regular files and block devices, locked against other
programs' writes (target.filelocks); MemoryBackend is for unit tests of
engines.  Backends do no range checking: the LU layer does it once.

Deliberately ignored: short reads past the end of a file that shrank under us
are reported as EIO, not padded with zeroes; trim on a block device is a
no-op (it is advisory and BLKDISCARD may not zero).

Fault injection, for tests only (tests/system/clones/test_clones_faults.py): when
the environment variable CLONECTL_FAULTS names a file at the moment a
FileBackend is opened, that backend's requests are checked against the
file's rules and a matching one fails with the rule's errno, changing
nothing.  The file is a JSON list of rules

    {"path": "/abs/backing.img", "op": "write" | [ops], "offset": 0,
     "length": 65536, "errno": "EIO"}

op names backend methods (read, write, zero, trim, flush; "*" is all of
them); offset and length (default: to the end) select the requests that
touch that byte range; flush rules ignore the range.  The file is re-read
whenever it changes (replace it with a rename); a missing file means no
faults.  nbdkit inherits the manager's environment, so a test sets the
variable for `clonectl serve`.  The replication log (SRL) is not a backend;
it asks fault_rules() for its writes and syncs.  Without the variable nothing is wrapped:
the decision is made once at open and the request path is unchanged.
"""

import ctypes
import errno
import json
import os
import stat
import threading

from . import errors, filelocks

FAULTS_ENV = "CLONECTL_FAULTS"

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_longlong,
                       ctypes.c_longlong)
_fallocate.restype = ctypes.c_int

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# Zeroes written when the filesystem cannot zero or punch a range.
_ZERO_CHUNK = bytes(1 << 20)


def fallocate(fd, mode, offset, length):
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Backend:
    """Documentation of the interface; see the module docstring."""

    readonly = False
    size = 0

    def extents(self, offset, length):
        return [(offset, length, False)]

    def forget(self, offset, length):
        pass

    def reopen(self):
        return self

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class FileBackend(Backend):

    def __init__(self, path, readonly=False, owner=None, opening=None):
        # opening: where to open it from if not path (reopen).
        self.path = path
        self.readonly = readonly
        self.owner = owner
        # Locked against other programs' writes (target.filelocks).
        self.fd = filelocks.open_locked(opening or path,
                                        writable=not readonly, owner=owner)
        try:
            st = os.fstat(self.fd)
            self.is_block = stat.S_ISBLK(st.st_mode)
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        except BaseException:
            filelocks.close(self.fd)
            raise
        # Filesystems without punch hole or zero range (or a block device):
        # remembered so we stop asking the kernel on every request.
        self._can_punch = not self.is_block
        self._can_zero_range = not self.is_block
        faults = os.environ.get(FAULTS_ENV)
        if faults:
            _inject_faults(self, faults)

    def readinto(self, buf, offset):
        n = os.preadv(self.fd, [buf], offset)
        if n != len(buf):
            self._read_rest(buf, offset, n)

    def _read_rest(self, buf, offset, done):
        view = memoryview(buf).cast("B")
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n == 0:
                raise OSError(errno.EIO, "short read at offset {} of {}: the "
                              "backing file is shorter than the LU"
                              .format(offset + done, self.path))
            done += n

    def write(self, buf, offset):
        n = os.pwrite(self.fd, buf, offset)
        if n != len(buf):
            view = memoryview(buf).cast("B")
            while n < len(view):
                n += os.pwrite(self.fd, view[n:], offset + n)

    def flush(self):
        os.fdatasync(self.fd)

    def forget(self, offset, length):
        try:
            os.posix_fadvise(self.fd, offset, length,
                             os.POSIX_FADV_DONTNEED)
        except OSError:
            pass        # advisory

    def reopen(self):
        """Another descriptor of this backend's file (its flushes report
        their own writeback errors), not of whatever path names now."""
        return FileBackend(self.path, self.readonly, self.owner,
                           opening="/proc/self/fd/{}".format(self.fd))

    def _fallocate(self, supported, mode, offset, length):
        """fallocate if the filesystem can; remember when it cannot.

        supported names the attribute that records whether it can.
        """
        if not getattr(self, supported):
            return False
        try:
            fallocate(self.fd, mode, offset, length)
            return True
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            setattr(self, supported, False)
            return False

    def trim(self, offset, length):
        self._fallocate("_can_punch", FALLOC_FL_PUNCH_HOLE |
                        FALLOC_FL_KEEP_SIZE, offset, length)

    def zero(self, offset, length, may_trim=False, fast=False):
        if may_trim and self._fallocate(
                "_can_punch", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                offset, length):
            return
        if self._fallocate("_can_zero_range", FALLOC_FL_ZERO_RANGE |
                           FALLOC_FL_KEEP_SIZE, offset, length):
            return
        if fast:
            raise OSError(errno.EOPNOTSUPP, "cannot zero quickly")
        end = offset + length
        while offset < end:
            n = min(len(_ZERO_CHUNK), end - offset)
            self.write(memoryview(_ZERO_CHUNK)[:n], offset)
            offset += n

    def extents(self, offset, length):
        """Data and holes of a regular file, from SEEK_DATA/SEEK_HOLE."""
        if self.is_block:
            return [(offset, length, False)]
        result = []
        end = offset + length
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                data = end  # nothing but a hole up to the end of the file
            if data > pos:
                hole_end = min(data, end)
                result.append((pos, hole_end - pos, True))
                pos = hole_end
                continue
            hole = min(os.lseek(self.fd, pos, os.SEEK_HOLE), end)
            result.append((pos, hole - pos, False))
            pos = hole
        return result

    def close(self):
        if self.fd >= 0:
            filelocks.close(self.fd)
            self.fd = -1


FAULT_OPS = ("read", "write", "zero", "trim", "flush")


class _FaultRules:
    """The rules of a CLONECTL_FAULTS file that apply to one backing file,
    re-read when the file changes (see the module docstring)."""

    def __init__(self, faults_path, backing_path):
        self.faults_path = faults_path
        self.backing_path = os.path.realpath(backing_path)
        self.lock = threading.Lock()
        self.key = None
        self.rules = []

    def check(self, op, offset, length):
        try:
            st = os.stat(self.faults_path)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            key = None
        if key != self.key:
            with self.lock:
                self.rules = self._load() if key else []
                self.key = key
        for ops, start, end, code in self.rules:
            if op in ops and (op == "flush" or
                              (offset < end and start < offset + length)):
                raise OSError(code, "injected fault: {} {} at offset {} of "
                              "{} ({})".format(op, length, offset,
                                               self.backing_path,
                                               errno.errorcode[code]))

    def _load(self):
        try:
            with open(self.faults_path) as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            raise errors.InvalidFaults(path=self.faults_path, reason=str(e))
        if not isinstance(doc, list):
            raise errors.InvalidFaults(path=self.faults_path,
                                       reason="not a JSON list of rules")
        rules = []
        for rule in doc:
            try:
                if os.path.realpath(rule["path"]) != self.backing_path:
                    continue
                ops = rule.get("op", "*")
                ops = FAULT_OPS if ops == "*" else \
                    (ops,) if isinstance(ops, str) else tuple(ops)
                code = rule.get("errno", "EIO")
                code = getattr(errno, code) if isinstance(code, str) \
                    else int(code)
                start = int(rule.get("offset", 0))
                length = rule.get("length")
                end = start + int(length) if length is not None else 1 << 63
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise errors.InvalidFaults(
                    path=self.faults_path, reason="bad rule {!r}: {}".format(
                        rule, e))
            if not set(ops) <= set(FAULT_OPS) or code not in errno.errorcode:
                raise errors.InvalidFaults(
                    path=self.faults_path, reason="bad rule {!r}: op must be "
                    "one of {} or *, errno a name or number".format(
                        rule, ", ".join(FAULT_OPS)))
            rules.append((ops, start, end, code))
        return rules


def fault_rules(path):
    """The fault rules for a file that is not a backend (the replication
    log, target/replication/srl.py), or None without CLONECTL_FAULTS: callers
    check `rules.check(op, offset, length)` before their own I/O."""
    faults = os.environ.get(FAULTS_ENV)
    return _FaultRules(faults, path) if faults else None


def _inject_faults(backend, faults_path):
    """Wrap backend's request methods (instance attributes shadow the
    class's) with the checks of faults_path."""
    rules = _FaultRules(faults_path, backend.path)
    cls = type(backend)

    def readinto(buf, offset):
        rules.check("read", offset, memoryview(buf).nbytes)
        cls.readinto(backend, buf, offset)

    def write(buf, offset):
        rules.check("write", offset, memoryview(buf).nbytes)
        cls.write(backend, buf, offset)

    def zero(offset, length, may_trim=False, fast=False):
        rules.check("zero", offset, length)
        cls.zero(backend, offset, length, may_trim=may_trim, fast=fast)

    def trim(offset, length):
        rules.check("trim", offset, length)
        cls.trim(backend, offset, length)

    def flush():
        rules.check("flush", 0, 0)
        cls.flush(backend)

    backend.readinto, backend.write, backend.zero = readinto, write, zero
    backend.trim, backend.flush = trim, flush
    backend.faults = rules


class UnavailableBackend(Backend):
    """Stands in for a backing file that cannot be opened (gone, unusable):
    every read and write fails with EIO and the reason; flush and close do
    nothing, since nothing was ever written through it."""

    def __init__(self, path, size, reason):
        self.path = path
        self.size = size
        self.reason = reason

    def _unavailable(self, *args, **kwargs):
        raise OSError(errno.EIO, "backing file {} is unavailable: {}".format(
            self.path, self.reason))

    readinto = write = trim = zero = _unavailable

    def flush(self):
        pass


class MemoryBackend(Backend):
    """A bytearray; flush and trim are no-ops.  For tests.  Its holes are
    its all-zero blocks of HOLE_BLOCK bytes, as if a filesystem punched
    every zero block."""

    HOLE_BLOCK = 4096

    def __init__(self, size, readonly=False):
        self.data = bytearray(size)
        self.size = size
        self.readonly = readonly
        self.flushes = 0

    def readinto(self, buf, offset):
        view = memoryview(buf).cast("B")
        view[:] = self.data[offset:offset + len(view)]

    def write(self, buf, offset):
        view = memoryview(buf).cast("B")
        self.data[offset:offset + len(view)] = view

    def flush(self):
        self.flushes += 1

    def trim(self, offset, length):
        pass

    def zero(self, offset, length, may_trim=False, fast=False):
        self.data[offset:offset + length] = bytes(length)

    def extents(self, offset, length):
        block = self.HOLE_BLOCK
        zeros = memoryview(_ZERO_CHUNK)[:block]
        result = []
        pos, end = offset, offset + length
        while pos < end:
            start = pos - pos % block
            stop = min(start + block, self.size)
            hole = self.data.startswith(zeros[:stop - start], start, stop)
            stop = min(stop, end)
            if result and result[-1][2] == hole:
                result[-1] = (result[-1][0], stop - result[-1][0], hole)
            else:
                result.append((pos, stop - pos, hole))
            pos = stop
        return result
