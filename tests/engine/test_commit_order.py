"""A commit saves a clone's clean bits only for copies its flush covered.

commit() flushes the Source and the clones, then saves each delta map.  A
copy (the sync engine's, or a copy on demand) that completes while the
flush runs clears its bits in memory without being on disk; if the map is
read after the flush, those clean bits are saved, and a power cut before
the clone's next flush leaves an extent whose bit says "equal" over data
that never reached the disk.  The rule, as for the PRM: the map is taken
before the flush that must cover it.
"""

import pytest

from target import backends, clones, maps
from target.lu import LogicalUnit

GRAN = 64 << 10
SIZE = 16 * GRAN


class FlushWatch(backends.MemoryBackend):
    """A memory backend that knows which extents were written after its
    last flush, and runs a hook inside a flush (after it has flushed)."""

    def __init__(self, size):
        super().__init__(size)
        self.unflushed = set()
        self.during_flush = None

    def write(self, buf, offset):
        super().write(buf, offset)
        n = memoryview(buf).nbytes
        self.unflushed.update(range(offset // GRAN,
                                    (offset + n + GRAN - 1) // GRAN))

    def flush(self):
        super().flush()
        self.unflushed.clear()
        hook, self.during_flush = self.during_flush, None
        if hook is not None:
            hook()


@pytest.mark.parametrize("order", ["snapshot_first", "twin_flush_first"])
def test_saved_clean_bits_are_covered_by_the_flush(tmp_path, monkeypatch,
                                                    order):
    src = backends.MemoryBackend(SIZE)
    src.write(b"N" * SIZE, 0)
    lu = LogicalUnit("src", {"size": SIZE, "file": "-",
                                     "readonly": False}, backend=src)
    group = clones.CloneGroup(lu, GRAN, str(tmp_path))
    clone = group.add_clone("b", FlushWatch(SIZE))
    engine = group.start_sync("b", run=False)
    group.commit()
    if order == "twin_flush_first":
        group.snapshot_before_flush = False
    # The engine copies a run into the clone while the commit's flush of
    # the clone is under way (fdatasync lets other threads run).
    clone.backend.during_flush = lambda: engine.step()
    cut = {}
    save = maps.save

    def save_then_cut(path, bits, granularity, *args, **kwargs):
        save(path, bits, granularity, *args, **kwargs)
        if path == clone.map_path:
            # A power cut right after the delta map is saved, before the
            # activity map is rewritten: what is on disk then.
            cut["saved"] = maps.load(path, GRAN, group.extents)
            cut["activity"] = maps.load(group.activity_file.path, GRAN,
                                        group.extents, with_crc=False)
            cut["unflushed"] = set(clone.backend.unflushed)
    monkeypatch.setattr(maps, "save", save_then_cut)
    group.commit()
    assert cut["unflushed"], "the engine copied nothing in the flush"
    # Extents clean in the saved map and not covered by the activity map
    # must be on the clone's disk.
    lost = [e for e in sorted(cut["unflushed"])
            if not cut["saved"][e] and not cut["activity"][e]]
    if order == "twin_flush_first":
        assert lost, "the twin (map read after the flush) was not caught"
    else:
        assert lost == []
