"""`rsg promote` against a primary that connects while it runs.

The promotion checks that no primary is connected, then builds the new
primary's record from the secondary's state and closes the secondary.  A
primary accepted in between would apply batches the new record does not
account for (or after it), so a promotion is a local change: primaries
are refused from its check to its end.
"""

import contextlib
import os
import threading
import time

from tests.support.rsgmodel import fast_timing, restore_timing, wait_for
from tests.support.rsgpair import pair  # noqa: F401
from target import errors
from target import replication as R

KiB = 1 << 10


def test_a_primary_connecting_during_a_promotion_is_refused(pair,  # noqa: F811
                                                            monkeypatch):
    saved = fast_timing()
    try:
        p = pair(size=4 << 20)
        p.link_up()
        wait_for(p.replicating, 30, "the first replay")
        p.ta.rsg_detach("g", p.addr)
        seen = {}
        orig = R.new_generation

        def during_the_promotion():
            # Inside rsg_promote, after its checks: the old primary comes
            # back and writes.
            p.ta.rsg_attach("g", p.addr)
            end = time.monotonic() + 5
            while time.monotonic() < end and p.link.state != R.REPLICATING \
                    and not p.link.error:
                time.sleep(0.02)
            seen["state"], seen["error"] = p.link.state, p.link.error
            p.write(0, b"\xab" * (64 * KiB))
            time.sleep(0.5)
            seen["applied"] = p.sg.applied_seq
            return orig()

        before = p.sg.applied_seq
        monkeypatch.setattr(R, "new_generation", during_the_promotion)
        p.tb.rsg_promote("g")
        assert seen["state"] != R.REPLICATING, \
            "a primary was accepted while the secondary was being promoted"
        assert "promotion" in (seen["error"] or ""), seen
        assert seen["applied"] == before, \
            "the secondary applied updates after its promotion's checks"
        b = p.tb.rsgs["g"]
        assert b.role == R.PRIMARY
        buf = bytearray(64 * KiB)
        p.tb.lus["v"].backend.readinto(buf, 0)
        assert bytes(buf) != b"\xab" * (64 * KiB)
    finally:
        restore_timing(saved)


def _all_at_once(monkeypatch, count):
    """Every call of SecondaryGroup.local_change waits, once inside, until
    count of them are: operations of the group that run side by side."""
    barrier = threading.Barrier(count, timeout=10)
    inner = R.SecondaryGroup.local_change

    @contextlib.contextmanager
    def together(self, what):
        with inner(self, what):
            barrier.wait()
            yield
    monkeypatch.setattr(R.SecondaryGroup, "local_change", together)


def _run_together(*calls):
    out = [None] * len(calls)

    def run(i):
        try:
            out[i] = calls[i]()
        except errors.Error as e:
            out[i] = e
    threads = [threading.Thread(target=run, args=(i,))
               for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return out


def test_two_promotions_at_once_make_one_primary(two_nodes, monkeypatch):
    """Two `rsg promote` of one group at once (the control socket serves
    requests side by side): the second must not close the first one's new
    primary again (its SRL removed under it, the group gone from the
    target, its layer left in the volumes' stacks)."""
    a, b = two_nodes
    a.t.lus["v1"].write(b"\x01" * 4096, 0)
    wait_for(lambda: b.rsg is not None and b.rsg.consistent and
             b.rsg.applied_seq == a.rsg.next_seq - 1, 20, "convergence")
    a.t.rsg_detach("g", b.addr)
    wait_for(lambda: b.rsg.connected_since is None)
    _all_at_once(monkeypatch, 2)
    out = _run_together(lambda: b.t.rsg_promote("g"),
                        lambda: b.t.rsg_promote("g"))
    done = [r for r in out if isinstance(r, dict)]
    refused = [r for r in out if isinstance(r, R.RsgBusy)]
    assert len(done) == 1 and len(refused) == 1, out
    g = b.t.rsgs.get("g")
    assert g is not None and g.role == R.PRIMARY, out
    assert g.history[-1][0] == done[0]["generation"]
    assert all(b.t.lus[v].rsg is g for v in ("v1", "v2"))
    assert os.path.exists(g.files.srl) and os.path.exists(g.files.since())
    assert g.files.load()["generation"] == done[0]["generation"]
