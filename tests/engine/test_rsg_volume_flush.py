"""A primary's volume whose flush fails: a failed fdatasync may drop what
it could not write (and the next one succeeds without it), while the
secondaries may have applied those writes already.  The regions written
since the last flush that succeeded (the activity log's) are replayed to
every link, so each secondary holds what the primary holds.

The kernel reports a failed writeback once per open file, to the first
flush that asks: `failed_writeback` makes every open file of a volume
fail its next flush, after putting back the page the writeback lost.
"""

import errno

import pytest

from target import backends
from target.replication import primary
from tests.support.twonodes import converge, two_nodes  # noqa: F401


def written_twice(a, b):
    """\\x01 then \\x02 at offset 0 of v1, both on the secondary; the
    primary's group flushed in between (its own file is open)."""
    lu = a.t.lus["v1"]
    lu.write(b"\x01" * 4096, 0)
    converge(a, b)
    a.rsg.persist()
    lu.write(b"\x02" * 4096, 0)
    converge(a, b)
    assert b.read_base(0)[:4096] == b"\x02" * 4096
    return lu


def failed_writeback(monkeypatch, lu):
    """The \\x02 page is lost (\\x01 is on the disk again), and the next
    flush of each open file of lu's storage fails with EIO."""
    base = lu.stack.below("replication")
    base.write(b"\x01" * 4096, 0)
    untold = {base.path}
    told = set()
    flush = backends.FileBackend.flush

    def reported_once(self):
        if self.path in untold and self not in told:
            told.add(self)
            raise OSError(errno.EIO, "injected: EIO")
        flush(self)
    monkeypatch.setattr(backends.FileBackend, "flush", reported_once)


def replayed(a, b):
    a.rsg.persist()                 # flushes that succeed, and sweeps
    a.rsg.persist()
    a.t.lus["v1"].write(b"\x03" * 4096, 8192)
    converge(a, b)
    assert a.read_top(0)[:4096] == b"\x01" * 4096
    assert b.read_base(0) == a.read_top(0)


@pytest.mark.parametrize("first", ["the group", "a host"])
def test_a_volume_flush_that_fails_replays_what_it_may_have_lost(
        two_nodes, monkeypatch, first):
    """The group's own flush, or a host's, is the first told of the
    failure.  (Before, the activity log kept the regions only until the
    next flush succeeded, and only if the group's flush had failed; its
    sweep then cleared them, and the secondary kept a write the primary
    had lost: a silent difference, and after a failover the hosts would
    see data the primary never kept.)"""
    a, b = two_nodes
    lu = written_twice(a, b)
    failed_writeback(monkeypatch, lu)
    if first == "a host":
        with pytest.raises(OSError):
            lu.flush()
    else:
        a.rsg.persist()
    replayed(a, b)


def test_the_groups_flush_hears_a_failure_a_host_heard_first(
        two_nodes, monkeypatch):
    """A host's flush heard of the failure first, and its handling came
    too late (the regions were swept meanwhile; here it does nothing):
    the group flushes through a file of its own, so it hears of the
    failure too.  (Before, it flushed the hosts' file, and its flush
    succeeded.)"""
    a, b = two_nodes
    lu = written_twice(a, b)
    failed_writeback(monkeypatch, lu)
    monkeypatch.setattr(primary.PrimaryGroup, "volume_flush_failed",
                        lambda self, vol, exc: None)
    with pytest.raises(OSError):
        lu.flush()
    replayed(a, b)


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


def test_a_stop_whose_flush_fails_then_a_close(two_nodes, monkeypatch):
    """A stop clears the activity log after flushing the volumes; its
    flush fails (the log is kept) and the close that follows flushes
    without hearing of it (reported once): the regions are in every
    link's DCM from the stop on, and sent after the next start."""
    a, b = two_nodes
    lu = written_twice(a, b)
    failed_writeback(monkeypatch, lu)
    a.rsg.clear_activity_log()          # what a stop does first
    assert a.rsg.links[0].dcm.count()
    a.close()
    monkeypatch.undo()
    a.start()
    replayed(a, b)
