"""A session's tracking map: the extents changed since the last mark.

Design notes
------------
One byte per extent (target.maps), kept durable by a change map
(target.changemap): a committed map file replaced at commits, and an
activity map written ahead of any write into a cold region (its
fdatasync a group commit, waited for outside the session's lock).  Recovery =
committed OR activity, a bounded superset.  A tracking bit only says
"changed", so a commit needs no flush of the data (the change map gets no
`flush`): a bit recorded early is harmless.  A lost or corrupt file means
every extent is marked changed, and the session's status says so.
See docs/persistence.md.
"""

from .. import changemap, maps


class TrackingMap:
    """A map of changed extents that survives a crash as a bounded superset.

    lock: the session's lock; note_write() is called holding it,
    wait_durable() without it, commit() and replace() take it themselves.
    """

    def __init__(self, path, granularity, extents, lock):
        self.path = path
        self.granularity = granularity
        self.extents = extents
        self.bits = bytearray(extents)
        # The committed map and the activity map are zero on disk, and no
        # write was noted since: a replace with zeroes (a mark right after
        # the create) has nothing to write.
        self.zeroed = False
        # The region is read when the map is made (tests make it small).
        self.changes = changemap.ChangeMap(
            path + ".activity", granularity, extents, lock,
            lambda: [(self.path, self.bits)], region_bytes=changemap.REGION)

    def create(self):
        maps.save(self.path, self.bits, self.granularity)
        self.changes.start()
        self.zeroed = not any(self.bits)

    def load(self):
        """Recover committed OR activity; return a problem or None."""
        problem = None
        try:
            self.bits = maps.load(self.path, self.granularity, self.extents)
        except maps.MapCorrupt as e:
            problem = "{}; every extent is marked changed".format(e)
            self.bits = bytearray(b"\x01" * self.extents)
        activity, unusable = self.changes.recover(required=True)
        if unusable:
            problem = problem or "{}; every extent is marked changed".format(
                unusable)
        self.changes.merge(self.bits, activity)
        # The recovered bits are durable once committed; start clean.
        maps.save(self.path, self.bits, self.granularity)
        self.changes.start()
        return problem

    def note_write(self, e0, e1):
        """Extents [e0, e1) are about to change (caller holds the lock);
        returns the ticket to wait_durable() for before the change may
        reach the Source."""
        self.zeroed = False
        maps.set_range(self.bits, e0, e1)
        return self.changes.note_deferred(e0, e1)

    def wait_durable(self, ticket):
        """The activity map marks of ticket are durable (called without
        the lock: concurrent first writes share the fdatasync)."""
        self.changes.wait_durable(ticket)

    def due(self):
        """A timed commit is due."""
        return self.changes.due()

    def commit(self):
        self.zeroed = False
        self.changes.commit()

    def replace(self, bits):
        """Make bits the map, durable before returning (mark)."""
        with self.changes.lock:
            if self.zeroed and not any(self.bits) and not any(bits):
                self.bits = bits
                return
            self.zeroed = False
        self.changes.commit(change=lambda: setattr(self, "bits", bits))

    def close(self):
        self.changes.close()
