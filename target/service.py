"""The target: the one object that owns every LU of a state directory.

It lives inside the nbdkit process (created by the plugin) and is also used
directly by unit tests.  Host I/O arrives through Connection objects (one per
NBD connection, the plugin's handle); control requests arrive through the
control socket (target.control) and end up in the methods of Target.

Design notes
- Range and read-only checks are done by nbdkit before the plugin is called
  (it knows each export's size and can_write).  LogicalUnit checks again, but
  only on the paths that change data, because engines call it directly too.
- The per-request path is kept short: no locks, no counters.  Connection
  counts change at open/close only, under Target.lock.  LogicalUnit.read is
  the backend's readinto itself (an instance attribute, one Python frame
  less per read: measurable at 4 KiB); an engine that must intercept reads
  replaces the attribute while it runs.
- An LU whose backing file cannot be opened is kept in the inventory with its
  error, shown by status and not exported; the other LUs are still served.
"""

import logging
import os
import threading

from . import backends, errors, state

log = logging.getLogger("clonectl.target")


class LogicalUnit:

    def __init__(self, name, record, backend=None):
        self.name = name
        self.size = record["size"]
        self.file = record["file"]
        self.readonly = record["readonly"]
        self.connections = 0
        self.removed = False
        self.error = None
        self.backend = backend
        if backend is None:
            try:
                state.probe_backing(self.file, self.size, self.readonly)
                self.backend = backends.FileBackend(self.file, self.readonly)
            except (errors.Error, OSError) as e:
                self.error = str(e)
        if self.backend is not None:
            self.read = self.backend.readinto

    @property
    def healthy(self):
        return self.backend is not None and not self.removed

    def _check_write(self, offset, length):
        if self.readonly:
            raise errors.ReadOnly(name=self.name)
        if offset < 0 or length < 0 or offset + length > self.size:
            raise errors.OutOfRange(name=self.name, offset=offset,
                                    length=length, size=self.size)

    # Data path (read is set in __init__).

    def write(self, buf, offset, fua=False):
        self._check_write(offset, len(buf))
        self.backend.write(buf, offset)
        if fua:
            self.backend.flush()

    def flush(self):
        self.backend.flush()

    def trim(self, offset, length, fua=False):
        self._check_write(offset, length)
        self.backend.trim(offset, length)
        if fua:
            self.backend.flush()

    def zero(self, offset, length, may_trim=False, fast=False, fua=False):
        self._check_write(offset, length)
        self.backend.zero(offset, length, may_trim=may_trim, fast=fast)
        if fua:
            self.backend.flush()

    def extents(self, offset, length):
        return self.backend.extents(offset, length)

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
            "error": self.error,
        }


class Connection:
    """One NBD connection to one LU: the plugin's handle."""

    __slots__ = ("lu", "readonly")

    def __init__(self, lu, readonly):
        self.lu = lu
        self.readonly = readonly or lu.readonly


class Target:

    def __init__(self, state_dir):
        self.state_dir = state.StateDir(state_dir)
        self.lock = threading.Lock()
        self.lus = {}
        self.reload()

    def reload(self):
        """Bring the LUs in line with state.json; return the exported names.

        New LUs are opened, LUs gone from the inventory stop being exported
        and are closed when their last connection ends.
        """
        doc = self.state_dir.load()
        with self.lock:
            for name, record in doc["lus"].items():
                lu = self.lus.get(name)
                if lu is not None and lu.file == record["file"] \
                        and lu.size == record["size"] \
                        and lu.readonly == record["readonly"] \
                        and lu.error is None:
                    continue
                if lu is not None:
                    self._retire(lu)
                lu = LogicalUnit(name, record)
                if lu.error:
                    log.error("LU %s is not exported: %s", name, lu.error)
                self.lus[name] = lu
            for name in [n for n in self.lus if n not in doc["lus"]]:
                self._retire(self.lus.pop(name))
            return sorted(n for n, lu in self.lus.items() if lu.healthy)

    def _retire(self, lu):
        lu.removed = True
        if lu.connections == 0:
            lu.close()

    def exports(self):
        with self.lock:
            return [(name, "clonectl LU {} ({} bytes{})".format(
                        name, lu.size, ", read-only" if lu.readonly else ""))
                    for name, lu in sorted(self.lus.items()) if lu.healthy]

    def connect(self, name, readonly):
        with self.lock:
            lu = self.lus.get(name)
            if lu is None or not lu.healthy:
                if name == "":
                    raise errors.InvalidArgument(
                        reason="an export name is required; exports: " +
                        (", ".join(sorted(self.lus)) or "none"))
                raise errors.UnknownLU(name=name)
            lu.connections += 1
            return Connection(lu, readonly)

    def disconnect(self, conn):
        with self.lock:
            lu = conn.lu
            lu.connections -= 1
            if lu.removed and lu.connections == 0:
                lu.close()

    def status(self):
        with self.lock:
            return {"pid": os.getpid(),
                    "lus": [lu.status() for _, lu in sorted(self.lus.items())]}

    def control_operations(self):
        """The operations the control socket offers: name -> callable."""
        return {
            "ping": lambda: {"pid": os.getpid()},
            "status": self.status,
            "reload": lambda: {"exports": self.reload()},
        }

    def close(self):
        with self.lock:
            for lu in self.lus.values():
                lu.close()
            self.lus.clear()

