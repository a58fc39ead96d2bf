"""Deferred first writes through a running target: a client's first writes
to a marked Source are acknowledged before their saves are durable (the
sessions' layer queues them), a flush returns once they are on the Source
(its backing file is read directly) and durable, and a kill -9
of nbdkit then loses none of the flushed writes and leaves the frozen
image the mark's.  Writes acknowledged after the last flush may be lost
by the kill: each of their blocks holds its data at the mark or the
new data, and the frozen image is the mark's either way.
"""

import random

import pytest

from tests.support.clonelib import GRANULARITY, MiB, read_range
from tests.support.sessionlib import assert_same

pytest.importorskip("nbd")

SIZE = 32 * MiB
EXTENTS = SIZE // GRANULARITY


def test_flushed_first_writes_survive_a_kill_and_the_frozen_image_stays(
        session_env, dests, tmp_path):
    env = session_env.setup(size=SIZE)
    dfile = tmp_path / "dest.img"
    with open(dfile, "wb") as f:
        f.truncate(SIZE)
    dest = dests.qemu_nbd(dfile)
    env.create("s1", dest.uri)
    env.update()
    at_mark = env.copy_source_file(tmp_path / "at-mark.raw")
    env.cli("session", "mark", "s1", "--export")

    rng = random.Random(5)
    chosen = rng.sample(range(EXTENTS), 300)
    flushed, unflushed = [], []
    h = env.connect("src")
    for i, x in enumerate(chosen):
        data = rng.randbytes(4096)
        offset = x * GRANULARITY + rng.randrange(0, GRANULARITY, 4096)
        h.pwrite(data, offset)
        (flushed if i < 200 else unflushed).append((offset, data))
        if i == 199:
            h.flush()
            # A flush returns once every write before it is on the Source.
            source = env.img("src")
            behind = [off for off, data in flushed
                      if read_range(source, off, len(data)) != data]
            assert not behind, "{} writes not on the Source after a " \
                "flush, at {} ...".format(len(behind), behind[:4])
    assert env.sstatus()["cofw_count"] >= 200
    env.kill_nbdkit()
    try:
        h.shutdown()
    except Exception:   # the connection died with nbdkit
        pass

    st = env.sstatus()
    assert st["marked"] and st["frozen_export"] == "src@s1", st
    assert st["problems"] == [], st
    h = env.connect("src")
    lost = [off for off, data in flushed if h.pread(len(data), off) != data]
    assert not lost, "flushed writes lost by the kill -9 at {}".format(lost)
    for off, data in unflushed:
        now = h.pread(len(data), off)
        assert now in (data, read_range(at_mark, off, len(data))), \
            "an unflushed write's block holds neither its data nor the " \
            "mark's at {}".format(off)
    h.shutdown()
    frozen = env.copy_export("src@s1", tmp_path / "frozen.raw")
    assert_same(frozen, at_mark, "frozen export after the kill -9")
    proc = env.transfer_wait("s1")
    assert "transfer completed" in proc.stdout, proc.stdout
    assert_same(dfile, at_mark, "destination vs the Source at the mark")
