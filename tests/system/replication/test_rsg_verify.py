"""`clonectl rsg verify` end to end: a primary and a secondary, each
`clonectl serve` in its own network namespace (netlib.py).  Differences
planted in the secondary's volume file behind its back are found while a
host writes, marked in the link's DCM and replayed; host writes are never
reported; --rate is honoured."""

import json
import os
import time

from tests.support.netlib import (WriteLog, Writer, wait_caught_up,
                                  wait_link)

MiB = 1 << 20
VOLS = [("v1", 8 * MiB), ("v2", 4 * MiB)]
G = "g"
GRAN = 64 << 10


def _pair(cluster, mode="async"):
    lus = [(n, str(size)) for n, size in VOLS]
    p = cluster.node("p", lus=lus)
    s = cluster.node("s0", lus=lus)
    p.cli("rsg", "create", G, "--volume", "v1", "--volume", "v2",
          "--srl-size", "2M")
    p.cli("rsg", "link", G, "--secondary", s.addr, "--mode", mode,
          "--token-file", cluster.token)
    wait_caught_up(cluster, p, G, s)
    return p, (s,)


def check_equal(p, s):
    for name, size in VOLS:
        a, b = p.read_all(name, size), s.read_all(name, size)
        assert a == b, "{} differs between {} and {}".format(name, p.name,
                                                             s.name)


def _plant(node, lu, extents):
    fd = os.open(str(node.lu_file(lu)), os.O_RDWR)
    try:
        for e in extents:
            off = e * GRAN + 99
            old = os.pread(fd, 1, off)
            os.pwrite(fd, bytes([old[0] ^ 0xA5]), off)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_planted_difference_found_under_writes_and_replayed(cluster):
    c = cluster
    p, (s,) = _pair(c)
    wlog = WriteLog(VOLS)
    w = Writer(p, wlog, seed=5, flush_every=16, interval=0.003)
    w.resume()
    try:
        # Some writes first; the writer goes on during the verify (a
        # planted byte it happens to overwrite is no difference any more,
        # and must not be reported).
        time.sleep(0.5)
        w.pause()
        wait_caught_up(c, p, G, s)
        _plant(s, "v1", [3, 100])
        _plant(s, "v2", [60])
        w.resume()
        replays = p.link(G, s)["replays"]
        proc = p.cli("rsg", "verify", G, "--wait", timeout=120)
        out = proc.stdout
        w.pause()
    finally:
        w.stop()
    l = p.link(G, s)
    v = l["verify"]
    assert not v["running"] and not v["stopped"], v
    assert v["extents_compared"] == sum(size for _, size in VOLS) // GRAN
    # A planted byte the writer overwrote (same block) is no difference.
    planted = {("v1", 3 * GRAN), ("v1", 100 * GRAN), ("v2", 60 * GRAN)}
    found = {tuple(d) for d in v["differing"]}
    assert found <= planted and len(found) == v["extents_differing"], v
    assert found, v
    assert "differ" in out, out
    # Marked and replayed: the secondary equals the primary again.
    wait_link(c, p, G, s, "replicating",
              pred=lambda l: l["replays"] > replays and
              not l["dcm_logging"])
    w.flush()
    wait_caught_up(c, p, G, s)
    check_equal(p, s)
    # A second verify finds nothing.
    p.cli("rsg", "verify", G, "--wait", timeout=120)
    assert p.link(G, s)["verify"]["extents_differing"] == 0
    text = p.cli("rsg", "status", G).stdout
    assert "verify finished: 12MiB of 12MiB, 192 extents compared, 0 differ" \
        in text, text


def test_heavy_writes_no_false_difference_and_rate(cluster):
    c = cluster
    p, (s,) = _pair(c, mode="sync")
    wlog = WriteLog(VOLS)
    w = Writer(p, wlog, seed=7, flush_every=8, interval=0.001)
    w.resume()
    try:
        replays = p.link(G, s)["replays"]
        started = time.monotonic()
        proc = p.cli("rsg", "verify", G, "--wait", "--rate", "4M",
                     "--json", timeout=120)
        took = time.monotonic() - started
        w.pause()
    finally:
        w.stop()
    st = json.loads(proc.stdout)
    v = st["links"][0]["verify"]
    assert v["extents_differing"] == 0, v
    assert not v["stopped"], v
    total = sum(size for _, size in VOLS)
    # 12 MiB at 4 MiB/s: the first region is not waited for.
    assert took >= (total - (1 << 20)) / (4 << 20) * 0.9, took
    assert p.link(G, s)["replays"] == replays
    w.flush()
    wait_caught_up(c, p, G, s)
    check_equal(p, s)
