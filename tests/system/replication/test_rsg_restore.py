"""A protected restore of a replicated volume through the CLI of two
`clonectl serve` in their own network namespaces (netlib.py): the sync
link never leaves the SRL stream while the restore runs, so a host write
made meanwhile is on the secondary when it returns; `rsg status` says why
the link replays."""

import json
import os
import threading
import time

from tests.support.netlib import wait_caught_up, wait_link

MiB = 1 << 20
SIZE = 8 * MiB
G = "g"


def clone_state(node):
    return json.loads(node.cli("clone", "status", "c1", "--json").stdout)[
        "state"]


def test_sync_write_during_a_restore_is_on_the_secondary(cluster):
    c = cluster
    p = c.node("p", lus=[("v1", str(SIZE))])
    s = c.node("s", lus=[("v1", str(SIZE))])
    h = p.connect("v1")
    h.pwrite(os.urandom(SIZE), 0)
    h.flush()
    p.cli("rsg", "create", G, "--volume", "v1", "--srl-size", "4M")
    p.cli("rsg", "link", G, "--secondary", s.addr, "--mode", "sync",
          "--token-file", c.token, "--wait")
    p.cli("clone", "add", "v1", "c1")
    p.cli("clone", "sync", "c1", "--wait")
    p.cli("clone", "fracture", "c1")
    h.pwrite(os.urandom(4 * MiB), 0)     # the restore puts these back
    h.flush()
    wait_caught_up(c, p, G, s)
    # The replay of the restore's regions takes about 2 s, the restore
    # itself about 8 s.
    p.cli("rsg", "attach", G, "--secondary", s.addr, "--rate", "2M")
    wait_link(c, p, G, s, "replicating")
    states, done = set(), threading.Event()

    def watch():
        while not done.is_set():
            states.add(p.link(G, s)["state"])
            time.sleep(0.05)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        p.cli("clone", "restore", "c1", "--rate", "512K")
        time.sleep(0.2)
        block = b"\xa5" * 4096
        before = p.rsg(G)["last_seq"]
        h.pwrite(block, 6 * MiB)            # returns once the secondary has it
        link = p.link(G, s)
        assert link["acked_seq"] > before, (before, link, c.describe(G))
        assert clone_state(p) == "restoring", \
            "the restore ended too early to test anything"
        text = p.cli("rsg", "status", G).stdout
        assert "replaying the regions of a protected restore of v1" in \
            text, text
        wait_link(c, p, G, s, "replicating")
        # The secondary is consistent again while the restore still runs:
        # what hosts read (the clone's data), with the write.
        secondary = s.read_all("v1", SIZE)
        assert clone_state(p) == "restoring"
        assert secondary[6 * MiB:6 * MiB + 4096] == block
        assert secondary[:4 * MiB] == p.read_all("c1", SIZE)[:4 * MiB]
        c.wait(lambda: clone_state(p) == "fractured", "the restore's end", G)
    finally:
        done.set()
        watcher.join()
    assert "dcm-logging" not in states, (states, c.describe(G))
    wait_caught_up(c, p, G, s)
    assert p.read_all("v1", SIZE) == s.read_all("v1", SIZE)
