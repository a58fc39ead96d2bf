"""The copy engine and holes: runs the reader reports as holes are zeroed
without being read, zero pieces of data go out as zeroes, and the guard's
begin/end protocol holds for them (a zero run is a write).

The model test drives a copier like the clone sync engine does: a change
map of dirty extents, a Source with holes, a mirrored destination, host
writes (data and zeroes, also making holes) at every point of the copy,
and a cancel at any chunk.  Whatever happens, an extent whose bit is clear
holds the Source's bytes on the destination (the map stays a superset of
the differences), and a copy that was not cancelled leaves no bit set.
"""

import os

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

from target import backends, copier

from tests.support.spybackend import Spy

BLOCK = 4096  # MemoryBackend reports holes in blocks of this size


def content(backend):
    return bytes(backend.data)


def test_memory_backend_reports_zero_blocks_as_holes():
    mem = backends.MemoryBackend(16 * BLOCK)
    assert mem.extents(0, 16 * BLOCK) == [(0, 16 * BLOCK, True)]
    mem.write(b"x", 3 * BLOCK + 5)
    mem.write(b"y" * (BLOCK + 1), 8 * BLOCK)
    assert mem.extents(0, 16 * BLOCK) == [
        (0, 3 * BLOCK, True), (3 * BLOCK, BLOCK, False),
        (4 * BLOCK, 4 * BLOCK, True), (8 * BLOCK, 2 * BLOCK, False),
        (10 * BLOCK, 6 * BLOCK, True)]
    # Unaligned queries are clipped to the range asked for.
    assert mem.extents(3 * BLOCK + 7, 10) == [(3 * BLOCK + 7, 10, False)]
    assert mem.extents(BLOCK + 1, 3 * BLOCK) == [
        (BLOCK + 1, 2 * BLOCK - 1, True), (3 * BLOCK, BLOCK, False),
        (4 * BLOCK, 1, True)]


def test_holes_are_zeroed_without_being_read():
    size = 4 << 20
    src, dst = Spy(size), Spy(size)
    data = os.urandom(256 << 10)
    src.write(data, 1 << 20)
    dst.write(os.urandom(size), 0)
    src.ops.clear()
    dst.ops.clear()
    done = []
    c = copier.Copier(src.readinto, dst.write, dst.zero, extents=src.extents,
                      progress=done.append)
    assert c.copy([(0, size)])
    assert content(dst) == content(src)
    assert src.ops == [("read", 1 << 20, 256 << 10)]
    written = sum(n for op, _, n in dst.ops if op == "write")
    zeroed = sum(n for op, _, n in dst.ops if op == "zero")
    assert written == 256 << 10 and zeroed == size - (256 << 10), dst.ops
    assert sum(done) == size == c.bytes_done


def test_zero_pieces_of_data_are_written_as_zeroes():
    size = 1 << 20
    src, dst = Spy(size), Spy(size)
    src.write(os.urandom(size), 0)
    src.zero(128 << 10, 128 << 10)
    dst.write(os.urandom(size), 0)
    dst.ops.clear()
    # The reader says all is data: the zero check still finds the zeroes.
    c = copier.Copier(src.readinto, dst.write, dst.zero, piece=64 << 10,
                      extents=lambda offset, length: [(offset, length, False)])
    assert c.copy([(0, size)])
    assert content(dst) == content(src)
    assert ("zero", 128 << 10, 128 << 10) in dst.ops
    assert not [op for op in dst.ops if op[0] == "write" and
                (128 << 10) <= op[1] < (256 << 10)]


class Guard:
    """Clears the bits of a chunk in end() unless a host write touched it
    between begin and end (then: copy again), like the clone engine's
    collision guard."""

    def __init__(self, model):
        self.model = model
        self.active = None
        self.begins = self.ends = 0

    def begin(self, offset, length):
        assert self.active is None, "begin inside a chunk"
        self.begins += 1
        self.active = [offset, offset + length, False]

    def end(self, offset, length, written):
        assert self.active is not None and \
            self.active[:2] == [offset, offset + length], "end without begin"
        self.ends += 1
        collided = self.active[2]
        self.active = None
        if written and not collided:
            g = self.model.g
            self.model.dirty[offset // g:(offset + length + g - 1) // g] = \
                bytes((offset + length + g - 1) // g - offset // g)
        return not (written and collided)


class Model:
    """A Source and a mirrored destination with a change map."""

    def __init__(self, g, extents, src_blocks, dirty, noise):
        self.g = g
        self.size = g * extents
        self.src = Spy(self.size)
        self.dst = Spy(self.size)
        for i, kind in enumerate(src_blocks):
            if kind:
                self.src.write(bytes([kind]) * BLOCK, i * BLOCK)
        # Where the map is clean the destination equals the Source.
        self.dst.data[:] = self.src.data
        self.dirty = bytearray(dirty)
        for e, b in enumerate(self.dirty):
            if b and noise[e]:
                self.dst.write(bytes([noise[e]]) * g, e * g)
        self.guard = Guard(self)

    def host_write(self, offset, length, value):
        """A mirrored host write (value 0: a zero, which may make a hole)."""
        if value:
            buf = bytes([value]) * length
            self.src.data[offset:offset + length] = buf
            self.dst.data[offset:offset + length] = buf
        else:
            self.src.zero(offset, length)
            self.dst.zero(offset, length)
        a = self.guard.active
        if a is not None and offset < a[1] and a[0] < offset + length:
            a[2] = True

    def check(self):
        for e in range(len(self.dirty)):
            if not self.dirty[e]:
                s = slice(e * self.g, (e + 1) * self.g)
                assert self.dst.data[s] == self.src.data[s], \
                    "extent {} is clean but differs".format(e)


G = 2 * BLOCK
EXTENTS = 12


@st.composite
def scenarios(draw):
    blocks = EXTENTS * G // BLOCK
    src_blocks = draw(st.lists(st.sampled_from([0, 0, 1, 2]),
                               min_size=blocks, max_size=blocks))
    dirty = draw(st.lists(st.integers(0, 1), min_size=EXTENTS,
                          max_size=EXTENTS))
    noise = draw(st.lists(st.integers(0, 3), min_size=EXTENTS,
                          max_size=EXTENTS))
    # Host writes: (when, offset in blocks, length in blocks, value), when
    # being the n-th callback of the copy (extents query, read, between).
    writes = draw(st.lists(st.tuples(
        st.integers(0, 40), st.integers(0, blocks - 1), st.integers(1, 4),
        st.integers(0, 3)), max_size=8))
    cancel_at = draw(st.one_of(st.none(), st.integers(0, 20)))
    chunk = draw(st.sampled_from([G, 2 * G, 3 * G]))
    piece = draw(st.sampled_from([BLOCK // 2, BLOCK, G]))
    return src_blocks, dirty, noise, writes, cancel_at, chunk, piece


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_model_map_stays_a_superset_of_the_differences(scenario):
    src_blocks, dirty, noise, writes, cancel_at, chunk, piece = scenario
    m = Model(G, EXTENTS, src_blocks, dirty, noise)
    calls = [0]
    blocks = EXTENTS * G // BLOCK

    def tick():
        for when, b, n, value in writes:
            if when == calls[0]:
                n = min(n, blocks - b)
                m.host_write(b * BLOCK, n * BLOCK, value)
        calls[0] += 1

    def extents(offset, length):
        tick()
        out = m.src.extents(offset, length)
        tick()
        return out

    def read(view, offset):
        m.src.readinto(view, offset)
        tick()

    chunks = [0]

    def progress(length):
        chunks[0] += 1
        if cancel_at is not None and chunks[0] > cancel_at:
            c.cancel.set()

    c = copier.Copier(read, m.dst.write, m.dst.zero, chunk=chunk,
                      piece=piece, guard=m.guard,
                      between=lambda offset, length: tick(),
                      progress=progress, extents=extents)
    runs = []
    e = 0
    while e < EXTENTS:
        if m.dirty[e]:
            s = e
            while e < EXTENTS and m.dirty[e]:
                e += 1
            runs.append((s * G, (e - s) * G))
        else:
            e += 1
    data_in_runs = sum(n for offset, length in runs
                       for _, n, hole in m.src.extents(offset, length)
                       if not hole)
    finished = c.copy(runs)
    assert m.guard.active is None and m.guard.begins == m.guard.ends
    m.check()
    if finished:
        assert not any(m.dirty), m.dirty
        assert m.dst.data == m.src.data
    # Without host writes (which make the copier query and read again),
    # exactly the data of the runs is read, never a hole.
    read = sum(n for op, _, n in m.src.ops if op == "read")
    if not writes and finished:
        assert read == data_in_runs, (read, data_in_runs)
    assert read <= data_in_runs or writes


def test_data_after_a_hole_is_written_on_the_piece_grid():
    size = 1 << 20
    src, dst = Spy(size), Spy(size)
    src.write(os.urandom(size - BLOCK), BLOCK)
    c = copier.Copier(src.readinto, dst.write, dst.zero, piece=64 << 10,
                      extents=src.extents)
    assert c.copy([(0, size)])
    assert content(dst) == content(src)
    writes = [(offset, n) for op, offset, n in dst.ops if op == "write"]
    assert writes[0] == (BLOCK, (64 << 10) - BLOCK)
    assert all(offset % (64 << 10) == 0 for offset, _ in writes[1:])
    assert dst.ops[0] == ("zero", 0, BLOCK)
