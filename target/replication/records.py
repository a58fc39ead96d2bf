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

# What a primary does when a secondary it connects to changed data on its
# own since the two last agreed (a split brain): see docs/replication.md.
DISCONNECT = "disconnect"
DISCARD_ZERO_CHANGES = "discard-zero-changes"
DISCARD_SECONDARY = "discard-secondary"
SPLIT_BRAIN_POLICIES = (DISCONNECT, DISCARD_ZERO_CHANGES, DISCARD_SECONDARY)


def check_split_brain_policy(policy):
    if policy not in SPLIT_BRAIN_POLICIES:
        raise errors.InvalidArgument(
            reason="--after-split-brain must be one of {}, not {!r}".format(
                ", ".join(SPLIT_BRAIN_POLICIES), policy))
    return policy


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


def peer_history(value):
    """A history as a peer sends it ([[generation, first seq], ...], seqs
    rising from 1), as lists; anything else is refused (it would be saved
    in the record and break every later comparison)."""
    history = value or []
    ok = isinstance(history, list) and all(
        isinstance(h, list) and len(h) == 2 and isinstance(h[0], str) and
        type(h[1]) is int and h[1] >= 1 for h in history) and all(
        a[1] <= b[1] for a, b in zip(history, history[1:]))
    if not ok:
        raise errors.ProtocolError(reason="the peer's history {!r} is not "
                                   "a list of [generation, first update]"
                                   .format(value))
    return [list(h) for h in history]


def peer_seq(value, what):
    """An update number as a peer sends it (a whole number, 0 for none);
    anything else is refused."""
    if value is None:
        return 0
    if type(value) is not int or value < 0:
        raise errors.ProtocolError(reason="the peer's {} {!r} is not an "
                                   "update number".format(what, value))
    return value


def history_diverges(mine, my_last, theirs, their_last):
    """Has the side with history `theirs` (last seq their_last) written
    something the side with `mine` never had?  Returns (diverged, common):
    common is the last sequence number both histories share."""
    i = common_prefix(mine, theirs)
    if i == 0:
        return True, 0
    if i == len(theirs) and i == len(mine):
        # The same generation: the one behind has a prefix of the other.
        # Theirs past this side's last were never had here (this side
        # went back: its state put back from an older copy).
        return their_last > my_last, min(my_last, their_last)
    # Where each side left the last generation both share.
    my_leave = mine[i][1] - 1 if i < len(mine) else my_last
    their_leave = theirs[i][1] - 1 if i < len(theirs) else their_last
    common = min(my_leave, their_leave)
    # They wrote after the branch point if they had updates of the shared
    # generation past it, or wrote in a generation of their own (a node
    # promoted and demoted again without a write has nothing to lose).
    wrote = their_leave > common or \
        (i < len(theirs) and their_last >= theirs[i][1])
    return wrote, common


def common_prefix(mine, theirs):
    """How many generations the two histories share from the start."""
    i = 0
    while i < len(mine) and i < len(theirs) and mine[i][0] == theirs[i][0]:
        i += 1
    return i


def map_covers(base, mine, theirs, common):
    """A change map kept since base ([generation, seq]: every change made
    after update seq of that generation is in it) holds every change since
    the point two nodes last agreed (update `common` of the last generation
    their histories share) when base lies on their common line at or
    before that point.  A map whose base is unknown (None) covers
    nothing."""
    if not base or len(base) != 2:
        return False
    i = common_prefix(mine, theirs)
    shared = [h[0] for h in mine[:i]]
    if base[0] not in shared:
        return False
    return base[0] != shared[-1] or int(base[1]) <= common
