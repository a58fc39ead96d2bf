"""Sessions and holes: a transfer reads only the data of the frozen image,
a copy on first write stores a hole of the Source as its save area
entry alone (no slot written, none punched), and the frozen export reports the frozen image's holes.  Memory
backends report their all-zero 4 KiB blocks as holes."""

import os
import tempfile

from target import backends, sessions

from tests.support.sessionfakes import FakeLU
from tests.support.spybackend import Spy

G = 4096
N = 8
SIZE = G * N


def touched(ops, kind):
    """Extents of Source offsets an op of kind touched."""
    return {x for op, offset, n in ops if op == kind
            for x in range(offset // G, (offset + n + G - 1) // G)}


def test_transfer_and_copy_on_first_write_skip_holes():
    inner = Spy(SIZE)
    lu = FakeLU(sessions.SessionLayer(inner), SIZE)
    save = Spy(sessions.SaveArea.minimum_size(N, G) + N * G)
    s = sessions.Session("s", lu, G, tempfile.mkdtemp(prefix="holes-"), save,
                         [{"uri": "m"}], persist=lambda record: None)
    s.create()
    lu.backend.add(s)
    old1, old5 = os.urandom(G), os.urandom(G)
    lu.backend.write(old1, 1 * G)
    lu.backend.write(old5, 5 * G)
    s.mark(export=True)
    frozen = bytes(inner.data)
    inner.ops.clear()
    save.ops.clear()
    # Host writes while marked: extent 3 was a hole, extent 5 data.
    lu.backend.write(b"n" * G, 3 * G)
    lu.backend.write(b"m" * G, 5 * G)
    # Extent 5's old data in the first slot; none for extent 3.
    slots = sessions.SaveArea.HEADER_BYTES + s.save_area.entries_bytes
    slot_writes = [(op, off) for op, off, n in save.ops
                   if off >= slots and op in ("write", "zero")]
    assert slot_writes == [("write", slots)], save.ops
    assert s.save_area.slots == {3: sessions.SaveArea.ZERO_SLOT, 5: 0}
    # Read back after a restart: the zero extent's save is its entry.
    again = sessions.SaveArea(save, N, G)
    assert again.load() == 0 and again.slots == s.save_area.slots
    buf = bytearray(b"x" * G)
    again.readinto(3, buf)
    assert bytes(buf) == bytes(G)
    assert touched(inner.ops, "read") == {5}, inner.ops

    export = sessions.FrozenExport(s)
    holes = {x for off, n, hole in export.extents(0, SIZE) if hole
             for x in range(off // G, (off + n) // G)}
    assert holes == {0, 2, 4, 6, 7}, export.extents(0, SIZE)

    dest = backends.MemoryBackend(SIZE)
    dest.write(os.urandom(SIZE), 0)
    inner.ops.clear()
    engine = s.start_transfer({0: sessions.MemoryDestination(dest)},
                              run=False)
    engine.advance()
    assert bytes(dest.data) == frozen
    # Only the data the frozen image takes from the Source is read:
    # extent 1 (3 and 5 come from the save area, the rest are holes).
    assert touched(inner.ops, "read") == {1}, inner.ops
