"""A session's destinations: their records, and the clients that write them.

Design notes
------------
Destination is a session's record of one destination: its URI, its
consistency and its pending map (what it still needs beyond the tracking
map).  A destination is `consistent` only after a marked transfer to it
completed and it flushed; while a transfer writes to it out of order it is
`inconsistent`, and a full copy while unmarked leaves it `inconsistent`
until the next marked transfer completes.

A client writes one destination, asynchronously: requests are queued and
their `done(error)` is called later, from retire(), with error None or the
DestinationError.  Every client has one interface (the argument order of
target.backends):

    size
    write(buf, offset, done)    buf is kept, not copied, until done
    zero(offset, length, done)  reads back as zeroes
    flush(done)                 the requests whose done came before flush()
                                was called are durable once its done comes
                                with None
    busy()                      whether it takes no more requests for now
    fds() / notify(fd, events)  what pump() polls, and what it saw
    retire()                    calls done of the requests that completed
    close()                     never waits on a destination that is gone

A request that cannot even be queued (the connection is gone) raises
DestinationError.  pump() drives several clients at once.  One client per
file: nbd.NbdDestination (a remote NBD export), memory.MemoryDestination
(tests).  Deliberately ignored: any other transport.  See docs/design.md.
"""

import errno
import select

from ... import errors

NEW = "new"
CONSISTENT = "consistent"
INCONSISTENT = "inconsistent"


class DestinationError(errors.Error):
    msg = "destination {uri}: {reason}"
    errno = errno.EIO


class Destination:
    """One destination of a session: its URI, state and pending map."""

    def __init__(self, index, record, extents):
        self.index = index
        self.uri = record["uri"]
        self.peer = record.get("peer")
        # The certificates directory for TLS to the peer, or None.
        self.peer_tls = record.get("peer_tls")
        self.consistency = record.get("consistency", NEW)
        self.needs_full = record.get("needs_full", True)
        self.protected = record.get("protected", False)
        self.protected_since = record.get("protected_since")
        self.last_success = record.get("last_success")
        self.last_error = record.get("last_error")
        self.bytes_sent = record.get("bytes_sent", 0)
        self.pending = bytearray(extents)
        self.transferring = False

    def record(self):
        return {"uri": self.uri, "peer": self.peer, "peer_tls": self.peer_tls,
                "consistency": self.consistency,
                "needs_full": self.needs_full, "protected": self.protected,
                "protected_since": self.protected_since,
                "last_success": self.last_success,
                "last_error": self.last_error, "bytes_sent": self.bytes_sent}


# The clients raise DestinationError: imported once it is defined.
from .memory import MemoryDestination  # noqa: E402
from .nbd import DEFAULT_TIMEOUT, IN_FLIGHT, NbdDestination  # noqa: E402


def pump(clients, timeout):
    """Wait up to timeout seconds for any of clients to make progress (no
    wait when none has a socket to wait on), then retire what completed."""
    poller = select.poll()
    owners = {}
    for c in clients:
        for fd, events in c.fds():
            owners[fd] = c
            poller.register(fd, events)
    if owners:
        for fd, events in poller.poll(max(0, int(timeout * 1000))):
            owners[fd].notify(fd, events)
    for c in clients:
        c.retire()


def probe(uri, size, timeout=10.0):
    """Check that uri answers, is writable and has the Source's size."""
    dest = NbdDestination(uri, timeout=timeout)
    try:
        if dest.size != size:
            raise DestinationError(
                uri=uri, reason="its size is {} bytes, the Source's is {}; "
                "nothing was written".format(dest.size, size))
    finally:
        dest.close()


__all__ = ["NEW", "CONSISTENT", "INCONSISTENT", "DestinationError",
           "Destination", "MemoryDestination", "NbdDestination",
           "DEFAULT_TIMEOUT", "IN_FLIGHT", "probe", "pump"]
