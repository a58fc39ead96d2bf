"""A secondary's last consistent image through the CLI of two `clonectl
serve` (netlib.py): a replay broken off leaves the secondary inconsistent
with every volume's image of the last consistent point exported as
LU@consistent-LU and shown in `rsg status`; what the refused promotion
tells the admin to do (`lu rollback` of each volume, then `rsg promote
--force`) gives back that point."""

import os
import time

from tests.support.netlib import wait_caught_up, wait_link

MiB = 1 << 20
G = "g"
SIZE = 4 * MiB
VOLS = ["v1", "v2"]


def _write(h, data):
    for off in range(0, len(data), MiB):
        h.pwrite(data[off:off + MiB], off)
    h.flush()


def test_broken_replay_rolls_back_to_the_last_consistent_point(cluster):
    p = cluster.node("p", lus=[(v, str(SIZE)) for v in VOLS])
    s = cluster.node("s", lus=[(v, str(SIZE)) for v in VOLS])
    old = {v: os.urandom(SIZE) for v in VOLS}
    handles = {v: p.connect(v) for v in VOLS}
    for v in VOLS:
        _write(handles[v], old[v])
    p.cli("rsg", "create", G, "--volume", "v1", "--volume", "v2",
          "--srl-size", "2M")
    p.cli("rsg", "link", G, "--secondary", s.addr, "--token-file",
          cluster.token, "--wait")
    wait_caught_up(cluster, p, G, s)
    p.cli("rsg", "detach", G, "--secondary", s.addr)
    for v in VOLS:
        _write(handles[v], os.urandom(SIZE))
    # A slow replay, detached once the secondary is in it: broken off.
    p.cli("rsg", "attach", G, "--secondary", s.addr, "--rate", "1M")
    wait_link(cluster, p, G, s, "dcm-replay")
    cluster.wait(lambda: s.rsg(G).get("protected") and
                 not s.rsg(G).get("consistent"), "the secondary in the "
                 "replay", G)
    p.cli("rsg", "detach", G, "--secondary", s.addr)
    cluster.wait(lambda: not s.rsg(G).get("connected"), "primary gone", G)
    st = s.rsg(G)
    assert not st["consistent"] and st["images"] == [
        "v1@consistent-v1", "v2@consistent-v2"], st
    assert "last consistent image: v1@consistent-v1, v2@consistent-v2" in \
        s.cli("rsg", "status", G).stdout
    for v in VOLS:
        assert s.read_all("{0}@consistent-{0}".format(v), SIZE) == old[v]
    promote = s.cli("rsg", "promote", G, check=False)
    assert promote.returncode == 1 and "Traceback" not in promote.stderr
    assert "v1@consistent-v1, v2@consistent-v2" in promote.stderr and \
        "clonectl lu rollback LU" in promote.stderr and \
        "--force" in promote.stderr, promote.stderr
    assert "--image" in s.cli("lu", "rollback", "--help").stdout
    for v in VOLS:
        out = s.cli("lu", "rollback", v).stdout
        assert "rolled {0} back to {0}@consistent-{0}".format(v) in out, out
    assert s.rsg(G)["images"] == []
    s.cli("rsg", "promote", G, "--force")
    time.sleep(0.2)
    for v in VOLS:
        assert s.read_all(v, SIZE) == old[v], v
