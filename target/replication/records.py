"""A replicated group's generations, roles and errors.

Owns the comparison of two histories that tells a split brain, and the
errors every part of replication raises.  The group's files and its record
document belong to the state directory's inventory (target.inventory
GroupFiles); the record's fields: docs/persistence.md.
"""

import errno
import uuid

from .. import errors, fsutil, inventory

DEFAULT_GRANULARITY = 64 << 10

PRIMARY, SECONDARY = "primary", "secondary"


class ReplicationError(errors.Error):
    msg = "replicated group {name!r}: {reason}"
    errno = errno.EINVAL


class UnknownGroup(errors.Error):
    msg = "no replicated storage group named {name!r}"
    errno = errno.ENOENT


class RsgBusy(errors.Error):
    msg = "replicated group {name!r}: {reason}"
    errno = errno.EBUSY


class ReplicaUnavailable(errors.Error):
    msg = ("LU {name!r} is a secondary of replicated group {group!r} and is "
           "inconsistent ({reason}); it serves no reads until replication "
           "makes it consistent{hint}")
    errno = errno.EIO


def parse_secondary(text):
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or \
            not 0 < int(port) < 65536:
        raise errors.InvalidArgument(
            reason="invalid secondary address {!r}: use HOST:PORT"
            .format(text))
    return "{}:{}".format(host.strip("[]"), int(port))


def read_token(path):
    return fsutil.read_token(path, "replication")


# The paths and the record document of a group belong to the inventory of
# the state directory; replication is given them.
GroupFiles = inventory.GroupFiles


def new_generation():
    return uuid.uuid4().hex[:16]


def history_diverges(mine, my_last, theirs, their_last):
    """Has the side with history `theirs` (last seq their_last) written
    something the side with `mine` never had?  Returns (diverged, common):
    common is the last sequence number both histories share."""
    # Walk the common prefix of generations.
    i = 0
    while i < len(mine) and i < len(theirs) and mine[i][0] == theirs[i][0]:
        i += 1
    if i == 0:
        return True, 0
    if i == len(theirs):
        # Their last generation is one of mine.
        if i == len(mine):
            return False, min(my_last, their_last)
        branch = mine[i][1] - 1      # my next generation starts after this
        return their_last > branch, min(branch, their_last)
    # They have a generation I never had: they wrote after the branch
    # point only if they wrote in it (a node promoted and demoted again
    # without a write has nothing to lose).
    wrote = their_last >= theirs[i][1]
    if i == len(mine):
        # They are ahead of me (they have a newer generation).
        return wrote, min(theirs[i][1] - 1, my_last)
    return wrote, min(mine[i][1], theirs[i][1]) - 1
