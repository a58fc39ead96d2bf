"""`rsg promote` against a primary that connects while it runs.

The promotion checks that no primary is connected, then builds the new
primary's record from the secondary's state and closes the secondary.  A
primary accepted in between would apply batches the new record does not
account for (or after it), so a promotion is a local change: primaries
are refused from its check to its end.
"""

import time

from tests.support.rsgmodel import fast_timing, restore_timing, wait_for
from tests.support.rsgpair import pair  # noqa: F401
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
