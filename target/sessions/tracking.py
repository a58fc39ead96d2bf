"""A session's tracking map: the extents changed since the last mark.

Design notes
------------
One byte per extent (target.maps), durable the way clone delta maps are: a
committed map file replaced at flush points (at most once per
COMMIT_INTERVAL), and between commits an activity map written ahead of any
write into a cold ACTIVITY_REGION.  Recovery = committed OR activity, a
bounded superset.  Unlike a delta map, a tracking bit only says "changed",
so a commit needs no flush of the data: a bit recorded early is harmless.
A commit swaps in a fresh `track` (extents written since the commit
began), saves the snapshot, then rewrites the activity map as the regions
of `track`.  See docs/design.md and docs/persistence.md.
"""

import threading
import time

from .. import maps

ACTIVITY_REGION = 4 << 20
COMMIT_INTERVAL = 1.0


class TrackingMap:
    """A map of changed extents that survives a crash as a bounded superset.

    note_write() and the activity map are used under the owner's lock;
    commit() takes the lock itself.
    """

    def __init__(self, path, granularity, extents):
        self.path = path
        self.granularity = granularity
        self.extents = extents
        self.region = max(1, ACTIVITY_REGION // granularity)
        self.bits = bytearray(extents)
        self.track = bytearray(extents)
        self.activity = bytearray(extents)
        self.activity_file = maps.ActivityFile(path + ".activity",
                                               granularity, extents)
        self.commit_lock = threading.Lock()
        self.last_commit = 0.0

    def create(self):
        maps.save(self.path, self.bits, self.granularity)
        self.activity_file.reset(self.activity)

    def load(self):
        """Recover committed OR activity; return a problem or None."""
        problem = None
        try:
            self.bits = maps.load(self.path, self.granularity, self.extents)
        except maps.MapCorrupt as e:
            problem = "{}; every extent is marked changed".format(e)
            self.bits = bytearray(b"\x01" * self.extents)
        try:
            activity = maps.load(self.activity_file.path, self.granularity,
                                 self.extents, with_crc=False)
        except maps.MapCorrupt as e:
            problem = problem or "{}; every extent is marked changed".format(e)
            activity = bytearray(b"\x01" * self.extents)
        for s, e in maps.runs(activity):
            maps.set_range(self.bits, s, e)
        # The recovered bits are durable once committed; start clean.
        maps.save(self.path, self.bits, self.granularity)
        self.activity = bytearray(self.extents)
        self.activity_file.reset(self.activity)
        return problem

    def note_write(self, e0, e1):
        maps.set_range(self.bits, e0, e1)
        maps.set_range(self.track, e0, e1)
        if self.activity.find(0, e0, e1) >= 0:
            r = self.region
            s = e0 // r * r
            e = min(self.extents, (e1 + r - 1) // r * r)
            maps.set_range(self.activity, s, e)
            self.activity_file.persist(self.activity, s, e)

    def due(self):
        """A timed commit is due."""
        return time.monotonic() - self.last_commit >= COMMIT_INTERVAL

    def commit(self, lock):
        with self.commit_lock:
            with lock:
                snapshot = bytes(self.bits)
                self.track = bytearray(self.extents)
            maps.save(self.path, snapshot, self.granularity)
            with lock:
                activity = bytearray(self.extents)
                r = self.region
                for s, e in maps.runs(self.track):
                    maps.set_range(activity, s // r * r,
                                   min(self.extents, (e + r - 1) // r * r))
                self.activity = activity
                self.activity_file.reset(activity)
            self.last_commit = time.monotonic()

    def replace(self, lock, bits):
        """Make bits the map, durable before returning (mark, unmark)."""
        with self.commit_lock:
            with lock:
                self.bits = bits
                self.track = bytearray(self.extents)
                snapshot = bytes(bits)
            maps.save(self.path, snapshot, self.granularity)
            with lock:
                self.activity = bytearray(self.extents)
                self.activity_file.reset(self.activity)

    def close(self):
        self.activity_file.close()
