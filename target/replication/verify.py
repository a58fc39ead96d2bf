"""Online verify of a link: the primary's and the secondary's checksums of
the same regions, compared at the same point of the stream.

Design notes
------------
A verify is a pass over every volume of the group in regions (REGION
bytes).  The link's sender thread does each region (Link.verify_region):
under the group lock it reads the region of the volume (below the
replication layer) and notes the SRL head, so the data is the state after
every entry logged so far; it sends the stream's entries up to there
first, then a VREQ frame for the region.  The secondary answers with VANS
after it applied everything before the request (frames are handled in
order), from its applied data: both sides' checksums describe the same
point, so a host write never shows as a difference, whatever the load.

Extents whose checksums differ are marked in the link's DCM at once
(durable in place) and, when the pass ends or is stopped, the link
switches to DCM logging (the record saved with it), so its next replay
copies exactly them (with whatever the stream had not delivered yet).  A
verify the link leaves (a failure, an overflow, a detach) keeps what it
marked for the link's next replay.  The stream waits for each answer: one round trip per
region, and `rate` spaces the regions out.

Checksums: copier.digest (BLAKE2b) of each extent of the group's
granularity.  Deliberately ignored: one verify per link at a time, its
result kept in memory.
"""

import threading
import time

from .. import copier

REGION = 1 << 20
FIRST_DIFFERING = 10


def digests(buf, granularity):
    """The hex checksums of each granularity-sized piece of buf."""
    view = memoryview(buf)
    return [copier.digest(view[i:i + granularity]).hex()
            for i in range(0, len(view), granularity)]


class LinkVerify:
    """One verify pass of a link: the regions still to compare, the
    figures so far; changed by the link's sender thread under the group
    lock."""

    def __init__(self, names, sizes, granularity, rate=None):
        self.names = list(names)
        self.sizes = list(sizes)
        self.granularity = granularity
        self.rate = rate
        self.cancel = threading.Event()
        self.running = True
        self.stopped = False
        self.error = None
        self.vol = 0
        self.offset = 0
        self.bytes_total = sum(sizes)
        self.bytes_done = 0
        self.extents_compared = 0
        self.extents_differing = 0
        self.differing = []      # [volume name, offset], the first ones
        self.started = time.monotonic()
        self.started_at = time.time()
        self.finished = None
        self.finished_at = None
        self.request = 0         # id of the last VREQ sent

    def next_region(self):
        """(vol, offset, length) of the next region, or None at the end."""
        while self.vol < len(self.sizes) and \
                self.offset >= self.sizes[self.vol]:
            self.vol, self.offset = self.vol + 1, 0
        if self.vol >= len(self.sizes):
            return None
        length = min(REGION, self.sizes[self.vol] - self.offset)
        return self.vol, self.offset, length

    def compared(self, vol, offset, length, mine, theirs):
        """Record a region's comparison; the offsets of its differing
        extents."""
        g = self.granularity
        out = [offset + i * g for i, (a, b) in enumerate(zip(mine, theirs))
               if a != b]
        if len(theirs) != len(mine):
            raise ValueError("the secondary answered {} checksums for {}"
                             .format(len(theirs), len(mine)))
        self.extents_compared += len(mine)
        self.extents_differing += len(out)
        for off in out:
            if len(self.differing) < FIRST_DIFFERING:
                self.differing.append([self.names[vol], off])
        self.bytes_done += length
        self.offset = offset + length
        return out

    def ahead(self):
        """Seconds the pass is ahead of its rate (0: go on)."""
        if not self.rate:
            return 0
        return self.bytes_done / self.rate - (time.monotonic() - self.started)

    def end(self, stopped=False, error=None):
        self.running = False
        self.stopped = stopped
        self.error = error
        self.finished = time.monotonic()
        self.finished_at = time.time()

    def to_dict(self):
        elapsed = (self.finished or time.monotonic()) - self.started
        rate = self.bytes_done / elapsed if elapsed > 0 else 0.0
        left = max(0, self.bytes_total - self.bytes_done)
        return {
            "running": self.running,
            "started": round(self.started_at, 3),
            "finished": round(self.finished_at, 3)
            if self.finished_at else None,
            "elapsed": round(elapsed, 3),
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "rate": round(rate),
            "eta": round(left / rate, 1) if rate > 0 and self.running
            else None,
            "extents_compared": self.extents_compared,
            "extents_differing": self.extents_differing,
            "differing": [list(d) for d in self.differing],
            "stopped": self.stopped,
            "error": self.error,
        }
