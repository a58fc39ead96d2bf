"""Data change maps (DCM) and the primary's activity log.

Both are activity maps of the shared change map (target.changemap): set in
place and made durable before the change they describe, in the activity-map
file format.  A DCM has one byte per extent of every volume of a group (its
regions are single extents); a lost or corrupt DCM counts as every extent
set.  The activity log has one byte per changemap.REGION; it has no
committed map: the SRL is what it vouches for, so its regions are cleared
lazily, in place and without a sync, once an SRL sync covers their writes
(a lost clear only costs a replay).  Files: docs/persistence.md; design
notes in target/replication/__init__.py.
"""

import os

from .. import changemap, maps


class Dcm:
    """A link's data change map: one byte per extent of every volume,
    persisted in place ahead of the changes it describes."""

    def __init__(self, path, granularity, sizes, fresh_value=None):
        self.granularity = granularity
        self.bases = []
        total = 0
        for size in sizes:
            self.bases.append(total)
            total += maps.extent_count(size, granularity)
        self.extents = total
        self.sizes = list(sizes)
        self.map = changemap.ActivityMap(path, granularity, total,
                                         region_bytes=granularity)
        self.problem = None
        if fresh_value is not None:
            self.map.replace(bytearray([fresh_value]) * total)
            return
        try:
            bits = self.map.load()
        except maps.MapCorrupt as e:
            # Lost or corrupt: everything may differ (and status says so).
            self.problem = "DCM unusable ({}); every extent will be copied" \
                .format(e)
            self.map.replace(bytearray(b"\x01") * total)
            return
        # Kept as it is on disk, updated in place from here on.
        self.map.file.fd = maps.files.open(path)
        self.map.bits = bits

    @property
    def bits(self):
        """One byte per extent (read it; change it with the methods)."""
        return self.map.bits

    def range_of(self, vol, offset, length):
        g = self.granularity
        base = self.bases[vol]
        return base + offset // g, base + (offset + max(length, 1) - 1) // g + 1

    def mark(self, vol, offset, length):
        """Set the extents of a change, durable before it is made."""
        self.map.mark(*self.range_of(vol, offset, length))

    def replace(self, bits):
        """Make bits (one byte per extent) the map, on disk at once."""
        self.map.replace(bytearray(bits))

    def mark_all(self):
        self.replace(b"\x01" * self.extents)

    def merge(self, vol, extent_bits, granularity):
        """OR a region map (one byte per extent of `granularity`) of vol."""
        size = self.sizes[vol]
        bits = bytearray(self.bits)
        for s, e in maps.runs(extent_bits):
            off = s * granularity
            length = min(e * granularity, size) - off
            if length > 0:
                maps.set_range(bits, *self.range_of(vol, off, length))
        self.replace(bits)

    def count(self):
        return self.bits.count(1)

    def runs(self, bits=None):
        """(vol, offset, length) of every set run of bits (default: this
        map's own; another map of the same geometry may be given), in
        volume order."""
        return self.runs_of(self.bits if bits is None else bits,
                            self.granularity, self.sizes)

    @staticmethod
    def runs_of(bits, granularity, sizes):
        """(vol, offset, length) of every set run of bits, a map of
        volumes of sizes in extents of granularity."""
        base = 0
        for vol, size in enumerate(sizes):
            n = maps.extent_count(size, granularity)
            for s, e in maps.runs(bits, base, base + n):
                off = (s - base) * granularity
                yield vol, off, min((e - base) * granularity, size) - off
            base += n

    def clear(self):
        self.replace(bytes(self.extents))

    def clear_runs(self, runs):
        """Clear the extents of runs [(vol, offset, length)] (a replay's
        regions the secondary has made durable), on disk with one write
        and one fdatasync: the map's bytes between the first and the last
        extent cleared, as they are in memory."""
        lo, hi = self.extents, 0
        for vol, off, length in runs:
            a, b = self.range_of(vol, off, length)
            self.bits[a:b] = bytes(b - a)
            lo, hi = min(lo, a), max(hi, b)
        if lo < hi:
            self.map.file.persist(self.bits, lo, hi)

    def close(self):
        self.map.close()


class ActivityLog(Dcm):
    """The primary's activity log (module notes): regions that may hold
    writes whose SRL entries are not durable yet.  mark() is durable before
    it returns (only the first write into a cold region pays an
    fdatasync); sweep() clears, without a sync, the regions nobody wrote
    since the previous sweep, once the SRL sync that followed that sweep
    has completed (sweep_ok)."""

    def __init__(self, path, granularity, sizes):
        super().__init__(path, max(changemap.REGION, granularity), sizes,
                         fresh_value=None if os.path.exists(path) else 0)
        self.touched = bytearray(self.extents)
        self.sweep_ok = False

    def mark(self, vol, offset, length):
        a, b = self.range_of(vol, offset, length)
        self.touched[a:b] = b"\x01" * (b - a)
        super().mark(vol, offset, length)

    def sweep(self):
        if self.sweep_ok:
            bits = self.bits
            for a, b in list(maps.runs(bits)):
                for s, e in list(maps.runs(self.touched, a, b, value=0)):
                    bits[s:e] = bytes(e - s)
                    if self.map.file.fd is not None:
                        # Closed by a failed rewrite: the next mark writes
                        # it anew from the bits (an extra region on disk
                        # meanwhile only costs a replay).
                        maps.files.pwrite(self.map.file.fd, bytes(e - s),
                                          maps.HEADER.size + s)
        self.touched[:] = bytes(self.extents)
        self.sweep_ok = False
