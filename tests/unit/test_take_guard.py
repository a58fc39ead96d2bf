"""TakeGuard (a primary's volume while it takes a secondary's changes)
against a byte-level reference: whatever the order of host writes, zeroes
and the take's regions, a byte hosts changed since the take was decided
(noted as the group notes them, once made) keeps the host's data, every
other byte of a taken region gets the secondary's, and nothing outside
the regions asked for is ever taken."""

import random

import pytest
from hypothesis import given, settings, strategies as st

from target import errors
from target.backends import MemoryBackend
from target.iostack import IOStack
from target.replication.layer import (TakeGuard, merged, overlap,
                                      runs_without)

SIZE = 1 << 14

runs = st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(1, 4096)),
                min_size=1, max_size=5)
host = st.tuples(st.sampled_from(["write", "zero"]),
                 st.integers(0, SIZE - 1), st.integers(1, 3000),
                 st.integers(1, 255))


def frames_of(regions, cuts):
    """The regions (sorted, disjoint) in frames, each cut where cuts say,
    in order, as a secondary sends them."""
    frames, i = [], 0
    for off, end in regions:
        while off < end:
            n = min(end - off, cuts[i % len(cuts)])
            frames.append((off, n))
            off += n
            i += 1
    return frames


@settings(max_examples=200, deadline=None)
@given(runs, st.lists(st.integers(1, 5000), min_size=1, max_size=4),
       st.lists(st.lists(host, max_size=3), max_size=40),
       st.integers(0, 2 ** 32))
def test_host_bytes_win_and_only_asked_regions_are_taken(regions, cuts,
                                                          hosts, seed):
    rnd = random.Random(seed)
    regions = merged([(off, min(off + n, SIZE)) for off, n in regions])
    base = MemoryBackend(SIZE)
    base.data[:] = rnd.randbytes(SIZE)
    noted = []

    def written(a, b):
        return [(max(s, a), min(e, b)) for s, e in noted if s < b and e > a]
    stack = IOStack(base)
    guard = TakeGuard(regions, written, stack.below("guard"))
    stack.set("guard", guard)
    ref = bytearray(base.data)
    hosted = bytearray(SIZE)        # 1: a host changed it
    pending = [[0, a, b - a] for a, b in regions]
    frames = frames_of(regions, cuts)
    for k, (off, n) in enumerate(frames):
        for kind, at, length, byte in hosts[k] if k < len(hosts) else ():
            length = min(length, SIZE - at)
            if kind == "write":
                stack.entry.write(bytes([byte]) * length, at, False)
                ref[at:at + length] = bytes([byte]) * length
            else:
                stack.entry.zero(at, length, False, False, False)
                ref[at:at + length] = bytes(length)
            noted.extend(overlap(regions, at, at + length))
            for i in range(at, at + length):
                hosted[i] = 1
        data = rnd.randbytes(n)
        guard.take(data, off)
        for i in range(off, off + n):
            if not hosted[i]:
                ref[i] = data[i - off]
        pending = runs_without(pending, 0, off, n)
        assert base.data == ref
    assert pending == []
    # Everything asked for is taken: any further region is refused.
    with pytest.raises(errors.ProtocolError):
        guard.take(b"\x00", regions[0][0])
    assert base.data == ref
