"""An LU of the target and the connections to what the target exports.

- Range and read-only checks are done by nbdkit before the plugin is called
  (it knows each export's size and can_write).  LogicalUnit checks again, but
  only on the paths that change data, because engines call it directly too.
- The per-request path is kept short: no locks.  Connection counts change
  at open/close only, under Target.lock.  LogicalUnit.read is the top of
  the LU's I/O stack itself (an instance attribute, one Python frame less
  per read: measurable at 4 KiB); writes, zeroes and trims pass the
  stack's entry, which counts them in flight (a list append and pop) so
  that a layer put in waits for those already on their way.  Features never patch the LU:
  each puts a layer in its slot of the stack (target/iostack.py says the
  order and why), and the stack rebinds read when a layer changes.
- An LU whose backing file cannot be opened is kept in the inventory with its
  error, shown by status and not exported; the other LUs are still served.
"""

import errno
import functools

from . import backends, errors, inventory, iostack, storageid


def one_change_at_a_time(method):
    """A method of an orchestration (clone add and remove, session create
    and delete) that changes the layers of an LU: each reads what exists,
    then makes its part (a clone group, a sessions layer) if it is missing,
    so two must not interleave.  The lock is the Target's config_lock."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.target.config_lock:
            return method(self, *args, **kwargs)
    return locked


def open_backing(state_dir, record, owner, command, size, readonly=False):
    """Open the backing file of an LU's or a clone's record for serving,
    with every check an opening by path needs; return (the backend, the
    identity of its storage, None for a file of the state directory: it
    is its own by its path).  command accepts a moved storage."""
    inventory.check_external(state_dir, record)
    inventory.probe_backing(record["file"], size, readonly, owner=owner)
    backend = backends.FileBackend(record["file"], readonly, owner=owner)
    if record["owned"]:
        return backend, None
    try:
        # The descriptor that serves is the one checked: the path may
        # have been retargeted since the probe.
        found = storageid.of_fd(backend.fd)
        inventory.check_storage(record, found, owner, command)
    except BaseException:
        backend.close()
        raise
    return backend, found


class LogicalUnit:
    """An LU: its inventory record and its I/O stack (target.iostack).

    Every reader and writer of the LU's bytes enters the stack: hosts at
    the top (read, write, ...), engines below their own layer.  `backend`
    is the backing file itself, under every layer.
    """

    def __init__(self, name, record, backend=None, state_dir=None):
        # state_dir: the StateDir of the record (a --file path that now
        # names one of its own files is refused), or None.
        self.name = name
        self.size = record["size"]
        self.file = record["file"]
        self.readonly = record["readonly"]
        self.connections = 0
        self.removed = False
        self.error = None
        self.rsg = None         # the replicated group it belongs to
        # Why it is not served although its file is fine, by who holds it:
        # a replicated group that did not load (writes would not be
        # logged), a session that did not load and could not say so.
        self.holds = {}
        self.backend = backend
        self.stack = None
        # What its path named when opened (target.storageid).
        self.storage = None
        if backend is None:
            try:
                self.backend, self.storage = open_backing(
                    state_dir, record, "LU {}".format(name),
                    "lu accept-storage {}".format(name), self.size,
                    self.readonly)
            except (errors.Error, OSError) as e:
                self.error = str(e)
        if self.backend is not None:
            self.stack = iostack.IOStack(self.backend, on_change=self._bind,
                                         name=name)
            self._entry = self.stack.entry

    def _bind(self, top):
        # read is the top's own bound method: one frame less per request
        # (the other requests pass the stack's entry, which counts changes).
        self.read = top.readinto

    @property
    def held(self):
        """The first reason it is held, or None."""
        return next(iter(self.holds.values()), None)

    @property
    def healthy(self):
        return self.backend is not None and not self.removed and \
            self.held is None

    def check_write(self, offset, length):
        """Refuse a write to a read-only LU or past its end."""
        if self.readonly:
            raise errors.ReadOnly(name=self.name)
        if offset < 0 or length < 0 or offset + length > self.size:
            raise errors.OutOfRange(name=self.name, offset=offset,
                                    length=length, size=self.size)

    # Data path (read is bound by _bind).

    def write(self, buf, offset, fua=False):
        self.check_write(offset, len(buf))
        self._entry.write(buf, offset, fua)

    def flush(self):
        self._entry.flush()

    def trim(self, offset, length, fua=False):
        self.check_write(offset, length)
        self._entry.trim(offset, length, fua)

    def zero(self, offset, length, may_trim=False, fast=False, fua=False):
        self.check_write(offset, length)
        self._entry.zero(offset, length, may_trim, fast, fua)

    def extents(self, offset, length):
        return self._entry.extents(offset, length)

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

    __slots__ = ("export", "readonly", "gateway")

    def __init__(self, export, readonly, gateway=False):
        # What serves the export: a LogicalUnit, a clone's CloneExport or
        # a session's FrozenExport (each has the LU data-path methods).
        self.export = export
        self.readonly = readonly
        # The iSCSI gateway's mount: counted in Target.gateway_held, not as
        # a host connection.
        self.gateway = gateway


class LUHeld(errors.Error):
    msg = "LU {name!r} is not served: {reason}"
    errno = errno.EBUSY
