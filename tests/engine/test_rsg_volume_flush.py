"""A primary's volume whose flush fails: a failed fdatasync may drop what
it could not write (and the next one succeeds without it), while the
secondaries may have applied those writes already.  The regions written
since the last flush that succeeded (the activity log's) are replayed to
every link, so each secondary holds what the primary holds.
"""

import errno

from tests.support.twonodes import converge, two_nodes  # noqa: F401


def test_a_volume_flush_that_fails_replays_what_it_may_have_lost(
        two_nodes, monkeypatch):
    """(Before, the activity log kept the regions only until the next
    flush succeeded; its sweep then cleared them, and the secondary kept
    a write the primary had lost: a silent difference, and after a
    failover the hosts would see data the primary never kept.)"""
    a, b = two_nodes
    lu = a.t.lus["v1"]
    lu.write(b"\x01" * 4096, 0)
    converge(a, b)
    a.rsg.persist()
    lu.write(b"\x02" * 4096, 0)
    converge(a, b)
    assert b.read_base(0)[:4096] == b"\x02" * 4096
    backend = lu.stack.below("replication")
    flush = backend.flush

    def drops_the_write():
        monkeypatch.setattr(backend, "flush", flush)
        backend.write(b"\x01" * 4096, 0)        # the page it lost
        raise OSError(errno.EIO, "injected: EIO")
    monkeypatch.setattr(backend, "flush", drops_the_write)
    a.rsg.persist()
    a.rsg.persist()                 # a flush that succeeds, and a sweep
    lu.write(b"\x03" * 4096, 8192)
    converge(a, b)
    assert a.read_top(0)[:4096] == b"\x01" * 4096
    assert b.read_base(0) == a.read_top(0)
