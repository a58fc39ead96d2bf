"""A demotion and the hosts of its volumes.

A demotion reports the regions this node wrote that no secondary
acknowledged, then puts the secondary's guard in place: a host write
between the two is in no map, and the nodes differ for good.  So no host
may be connected to a volume when it runs, counted once every volume is
withdrawn (no new connection can open), not before: a host that connects
between a look and the withdrawal refuses the demotion too.
"""

import pytest

from target import replication as R

from tests.engine.test_rsg_engine import VOLS, cluster_factory  # noqa: F401


def test_a_host_connecting_as_a_demotion_begins_refuses_it(
        cluster_factory, monkeypatch):
    c = cluster_factory()
    c.write(0, 0, b"\x01" * 4096)
    c.wait_converged()
    c.ta.rsg_detach("g", c.addr)
    withdraw = c.ta.gateway.withdraw
    hosts = []

    def connect_first(name, obj):
        if not hosts:
            hosts.append(c.ta.connect(VOLS[0], False))
        withdraw(name, obj)
    monkeypatch.setattr(c.ta.gateway, "withdraw", connect_first)
    with pytest.raises(R.RsgBusy):
        c.ta.rsg_demote("g")
    assert hosts
    assert c.ta.rsgs["g"].role == R.PRIMARY
    # Given back: the host writes, a new host connects.
    hosts[0].export.write(b"\x02" * 4096, 0)
    c.ta.disconnect(c.ta.connect(VOLS[0], False))
    c.ta.disconnect(hosts[0])
    c.ta.rsg_demote("g")
    assert c.ta.rsgs["g"].role == R.SECONDARY
