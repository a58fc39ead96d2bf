"""Data change maps (DCM) and the primary's activity log.

A DCM is one byte per extent of every volume of a group, set in place and
made durable before the change it describes; a lost or corrupt map counts
as every extent set.  The activity log is the same kind of map with 4 MiB
regions, cleared lazily once the SRL sync covers a region's writes.  See
the design notes in target/replication/__init__.py and docs/replication.md.
"""

import os

from .. import maps

AL_REGION = 4 << 20            # activity log region (DRBD's AL extent)


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
        self.file = maps.ActivityFile(path, granularity, total)
        self.problem = None
        if fresh_value is not None:
            self.bits = bytearray([fresh_value]) * total
            self.file.reset(self.bits)
            return
        try:
            self.bits = maps.load(path, granularity, total, with_crc=False)
            self.file.fd = maps.files.open(path)
        except maps.MapCorrupt as e:
            # Lost or corrupt: everything may differ (and status says so).
            self.problem = "DCM unusable ({}); every extent will be copied" \
                .format(e)
            self.bits = bytearray(b"\x01") * total
            self.file.reset(self.bits)

    def range_of(self, vol, offset, length):
        g = self.granularity
        base = self.bases[vol]
        return base + offset // g, base + (offset + max(length, 1) - 1) // g + 1

    def mark(self, vol, offset, length):
        """Set the extents of a change, durable before it is made."""
        a, b = self.range_of(vol, offset, length)
        if self.bits.count(1, a, b) == b - a:
            return
        maps.set_range(self.bits, a, b)
        self.file.persist(self.bits, a, b)

    def mark_all(self):
        self.bits[:] = b"\x01" * self.extents
        self.file.reset(self.bits)

    def merge(self, vol, extent_bits, granularity):
        """OR a region map (one byte per extent of `granularity`) of vol."""
        size = self.sizes[vol]
        for s, e in maps.runs(extent_bits):
            off = s * granularity
            length = min(e * granularity, size) - off
            if length > 0:
                a, b = self.range_of(vol, off, length)
                maps.set_range(self.bits, a, b)
        self.file.reset(self.bits)

    def count(self):
        return self.bits.count(1)

    def runs(self, bits=None):
        """(vol, offset, length) of every set run of bits (default: this
        map's own; another map of the same geometry may be given), in
        volume order."""
        bits = self.bits if bits is None else bits
        g = self.granularity
        for vol, base in enumerate(self.bases):
            n = maps.extent_count(self.sizes[vol], g)
            for s, e in maps.runs(bits, base, base + n):
                off = (s - base) * g
                yield vol, off, min((e - base) * g, self.sizes[vol]) - off

    def clear(self):
        self.bits[:] = bytes(self.extents)
        self.file.reset(self.bits)

    def close(self):
        self.file.close()


class ActivityLog(Dcm):
    """The primary's activity log (module notes): regions that may hold
    writes whose SRL entries are not durable yet.  mark() is durable before
    it returns (only the first write into a cold region pays an
    fdatasync); sweep() clears, without a sync, the regions nobody wrote
    since the previous sweep, once the SRL sync that followed that sweep
    has completed (sweep_ok)."""

    def __init__(self, path, granularity, sizes):
        super().__init__(path, max(AL_REGION, granularity), sizes,
                         fresh_value=None if os.path.exists(path) else 0)
        self.touched = bytearray(self.extents)
        self.sweep_ok = False

    def mark(self, vol, offset, length):
        a, b = self.range_of(vol, offset, length)
        self.touched[a:b] = b"\x01" * (b - a)
        super().mark(vol, offset, length)

    def sweep(self):
        if self.sweep_ok:
            for a, b in list(maps.runs(self.bits)):
                for s, e in list(maps.runs(self.touched, a, b, value=0)):
                    self.bits[s:e] = bytes(e - s)
                    maps.files.pwrite(self.file.fd, bytes(e - s),
                                      maps.HEADER.size + s)
        self.touched[:] = bytes(self.extents)
        self.sweep_ok = False
