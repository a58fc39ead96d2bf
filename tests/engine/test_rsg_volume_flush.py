"""A primary's volume whose flush fails: a failed fdatasync may drop what
it could not write (and the next one succeeds without it), while the
secondaries may have applied those writes already.  The regions written
since the last flush that succeeded (the activity log's) are replayed to
every link, so each secondary holds what the primary holds.
"""

import errno

import pytest

from tests.support.twonodes import converge, two_nodes  # noqa: F401


@pytest.mark.parametrize("first", ["the group", "a host"])
def test_a_volume_flush_that_fails_replays_what_it_may_have_lost(
        two_nodes, monkeypatch, first):
    """The group's own flush, or a host's, is the one told of the
    failure.  (Before, the activity log kept the regions only until the
    next flush succeeded, and only if the group's flush had failed; its
    sweep then cleared them, and the secondary kept a write the primary
    had lost: a silent difference, and after a failover the hosts would
    see data the primary never kept.)"""
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
    # Whoever flushes first is told (a failed writeback is reported once).
    if first == "a host":
        with pytest.raises(OSError):
            lu.flush()
    else:
        a.rsg.persist()
    a.rsg.persist()                 # a flush that succeeds, and a sweep
    a.rsg.persist()
    lu.write(b"\x03" * 4096, 8192)
    converge(a, b)
    assert a.read_top(0)[:4096] == b"\x01" * 4096
    assert b.read_base(0) == a.read_top(0)


def test_a_clean_close_is_not_taken_for_a_crash(two_nodes):
    """A close flushes the volumes and clears the activity log: the next
    start finds no marks, reports no problem and replays nothing."""
    a, b = two_nodes
    a.t.lus["v1"].write(b"\x01" * 4096, 0)
    converge(a, b)
    a.t.lus["v1"].write(b"\x02" * 4096, 0)        # its region just marked
    assert a.rsg.al.count()
    a.close()
    a.start()
    assert a.rsg.problems == [], a.rsg.problems
    assert a.rsg.al.count() == 0
    assert a.rsg.links[0].dcm.count() == 0
