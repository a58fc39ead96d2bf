"""SavedBlocks (the save area's block -> slot map, in chunk arrays) against
a plain dict: every query the sessions make of it gives what the dict
gives, across chunk edges and for runs longer than a chunk."""

from hypothesis import given, settings, strategies as st

from target.sessions.savearea import SaveArea, SavedBlocks

N = SavedBlocks.CHUNK
LIMIT = 5 * N           # five chunks: edges inside and between them

runs = st.lists(st.tuples(st.integers(0, LIMIT - 1),
                          st.integers(1, 2 * N + 3),
                          st.booleans()), max_size=12)
ranges = st.tuples(st.integers(0, LIMIT), st.integers(0, LIMIT))


def built(ops):
    blocks, model, slot = SavedBlocks(), {}, 0
    for first, count, zero in ops:
        count = min(count, LIMIT - first)
        if zero:
            blocks.set_run(first, count, SaveArea.ZERO_SLOT)
            model.update((b, SaveArea.ZERO_SLOT)
                         for b in range(first, first + count))
        else:
            blocks.set_run(first, count, slot)
            model.update((first + i, slot + i) for i in range(count))
            slot += count
    return blocks, model


@settings(max_examples=150, deadline=None)
@given(runs, ranges, st.sampled_from([1, 3, 16, N, 3 * N]))
def test_every_query_matches_a_dict(ops, bounds, per):
    blocks, model = built(ops)
    b0, b1 = min(bounds), max(bounds)
    want = {b: s for b, s in sorted(model.items()) if b0 <= b < b1}
    assert len(blocks) == len(model)
    assert dict(blocks.items()) == dict(sorted(model.items()))
    assert list(blocks) == sorted(model)
    assert blocks.slots_in(b0, b1) == want
    assert list(blocks.slots_in(b0, b1)) == sorted(want)
    assert blocks.saved_in(b0, b1) == sorted(want)
    assert blocks.missing(b0, b1) == [b for b in range(b0, b1)
                                      if b not in model]
    count = -(-LIMIT // per)
    groups = bytearray(count)
    for b in model:
        groups[b // per] = 1
    assert blocks.groups(per, count) == groups
    for b in (b0, b1 - 1):
        assert (b in blocks) == (b in model)
