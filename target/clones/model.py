"""Clones and their states: the transition table, Clone, its export, errors.

Design notes
------------
A clone is in one of the states of TRANSITIONS; a (state, event) pair not
in the table is refused with InvalidTransition and a hint.  While a clone is
MIRRORED, host writes to the Source reach it before they are acknowledged;
otherwise they set bits in its Delta Map.  An EXPORTED clone is served under
its own name (CloneExport), its writes setting its own bits.  A RUNNING
state has an engine copying (target.clones.sync), resumed after a restart.

Saving a new state is the group's (CloneGroup.transition): the state is
saved before it is taken, so the state on disk never lags one that hosts
could act on.  See docs/design.md.
"""

import errno
import os

from .. import errors

OUT_OF_SYNC = "out-of-sync"
SYNCING = "syncing"
SYNCHRONIZED = "synchronized"
FRACTURED = "fractured"
REVERSE_SYNCING = "reverse-syncing"
RESTORING = "restoring"
STATES = (OUT_OF_SYNC, SYNCING, SYNCHRONIZED, FRACTURED, REVERSE_SYNCING,
          RESTORING)

# (state, event) -> next state.  Anything not listed is refused.
TRANSITIONS = {
    (OUT_OF_SYNC, "sync"): SYNCING,
    (FRACTURED, "sync"): SYNCING,
    (SYNCING, "completed"): SYNCHRONIZED,
    (SYNCING, "failed"): OUT_OF_SYNC,
    (SYNCHRONIZED, "fracture"): FRACTURED,
    (SYNCHRONIZED, "mirror-failed"): OUT_OF_SYNC,
    # An online verify found extents that differ (marked): still a mirror,
    # it resyncs exactly them at once (like recovered-dirty).
    (SYNCHRONIZED, "verify-differs"): SYNCING,
    (SYNCHRONIZED, "recovered-dirty"): SYNCING,
    (FRACTURED, "reverse-sync"): REVERSE_SYNCING,
    # A failed reverse sync keeps redirecting reads (the Source is partly
    # restored); running reverse-sync again resumes it.
    (REVERSE_SYNCING, "reverse-sync"): REVERSE_SYNCING,
    (REVERSE_SYNCING, "completed"): SYNCHRONIZED,
    (REVERSE_SYNCING, "failed"): REVERSE_SYNCING,
    # Protected restore: the clone is never written by the restore and
    # stays fractured (and exported) throughout.
    (FRACTURED, "restore"): RESTORING,
    (RESTORING, "restore"): RESTORING,
    (RESTORING, "completed"): FRACTURED,
    (RESTORING, "failed"): RESTORING,
    (OUT_OF_SYNC, "remove"): None,
    (SYNCHRONIZED, "remove"): None,
    (FRACTURED, "remove"): None,
}

MIRRORED = (SYNCING, SYNCHRONIZED, REVERSE_SYNCING)
RUNNING = (SYNCING, REVERSE_SYNCING, RESTORING)
EXPORTED = (FRACTURED, RESTORING)

MAX_CLONES = 8
MIN_GRANULARITY = 2 << 10
MAX_GRANULARITY = 1 << 20
DEFAULT_GRANULARITY = 64 << 10

HINTS = {
    "fracture": "only a synchronized clone can be fractured",
    "sync": "sync needs an out-of-sync or fractured clone",
    "reverse-sync": "reverse sync needs a fractured clone",
    "restore": "a protected restore needs a fractured clone",
    "remove": "wait until the operation has finished",
    "verify": "a verify needs a synchronized or fractured clone",
}


class InvalidTransition(errors.Error):
    msg = "cannot {event} clone {name!r}: it is {state} ({hint})"
    errno = errno.EINVAL


class GroupBusy(errors.Error):
    msg = ("cannot {event} clone {name!r}: clone {other!r} of the same "
           "group is {state}; one operation per group at a time")
    errno = errno.EBUSY


class SiblingsMirrored(errors.Error):
    msg = ("cannot {event} clone {name!r}: clone {other!r} of the same "
           "source is {state}; fracture it first (the Source is about to "
           "change under it)")
    errno = errno.EBUSY


class AlreadyRunning(errors.Error):
    msg = "cannot {event} clone {name!r}: it is already running"
    errno = errno.EALREADY


class CloneBroken(errors.Error):
    msg = ("cannot {event} clone {name!r}: it is broken ({reason}); put its "
           "file back (or accept what its path names now) with `clonectl "
           "clone accept-storage {name}`, or remove the clone")
    errno = errno.EIO


class TransitionNotSaved(errors.Error):
    msg = ("clone {name!r} stays {state}: the change to {new} could not be "
           "saved: {reason}")

    def __init__(self, errno, **kwargs):
        super().__init__(**kwargs)
        self.errno = errno


# CloneGroup.transition's default rate: the clone's own.
KEEP = object()


class CloneInUse(errors.Error):
    msg = "cannot {event} clone {name!r}: its export has {count} connection(s)"
    errno = errno.EBUSY


def check_granularity(value):
    if not (MIN_GRANULARITY <= value <= MAX_GRANULARITY) or \
            value & (value - 1):
        raise errors.InvalidArgument(
            reason="granularity must be a power of two from 2K to 1M, not "
                   "{}".format(value))
    return value


class Clone:

    def __init__(self, group, name, backend, state, delta, file=None):
        self.group = group
        self.name = name
        self.backend = backend
        self.state = state
        self.delta = delta
        self.file = file
        # What file named when the clone was added (target.storageid).
        self.storage = None
        self.error = None
        # Why the backing file could not be opened: the clone is kept (its
        # delta map goes on recording the Source's writes) but not used.
        self.broken = None
        self.rate = None  # bytes/s of the running operation, kept on resume
        # A reverse sync that failed keeps its state (reads stay redirected)
        # but is not resumed until asked to (or the target restarts).
        self.paused = False
        self.connections = 0
        self.export = CloneExport(self)

    @property
    def map_path(self):
        return os.path.join(self.group.map_dir, self.name + ".delta")


class CloneExport:
    """The LU-like face of a fractured clone, served under its own name."""

    def __init__(self, clone):
        self.clone = clone
        self.name = clone.name
        self.readonly = False
        self.read = clone.backend.readinto

    @property
    def size(self):
        return self.clone.group.size

    def write(self, buf, offset, fua=False):
        self.clone.group.clone_write(self.clone, offset, len(buf),
                                     lambda b: b.write(buf, offset), fua)

    def zero(self, offset, length, may_trim=False, fast=False, fua=False):
        self.clone.group.clone_write(
            self.clone, offset, length,
            lambda b: b.zero(offset, length, may_trim=may_trim, fast=fast), fua)

    def trim(self, offset, length, fua=False):
        self.zero(offset, length, may_trim=True, fua=fua)

    def flush(self):
        self.clone.backend.flush()
        self.clone.group.maybe_commit()

    def extents(self, offset, length):
        return self.clone.backend.extents(offset, length)
