"""A power cut (scripts/powerfs.py: every write not fsynced is lost) of
either node during a DCM replay that has already cleared acknowledged
regions from the primary's DCM (RSYN/RSAK).  The resumed replay must end
with the secondary equal to the primary: the secondary's acknowledged
regions must have been durable, and host writes made after a region was
sent (flushed or not) must reach the secondary."""

import os
import time

import pytest

from tests.support import scripts
from tests.support.powernodes import (BLOCK, Link, MiB, powerfs_target,
                                      torture)

pytestmark = scripts.needs_powerfs

SIZE = 32 * MiB


@pytest.fixture
def nodes(tmp_path):
    disks, targets = {}, {}
    link = Link(tmp_path)
    for i, name in enumerate(("p", "s")):
        args = [] if name == "p" else link.serve_args
        disk, t = powerfs_target(tmp_path, link.log, 7 + i, name, args)
        assert t.cli("lu", "create", "src", "--size",
                     str(SIZE)).returncode == 0
        disks[name], targets[name] = disk, t
    targets["s"].start(connect=False)
    targets["p"].start()
    p = targets["p"]
    h = p.connect()
    for off in range(0, SIZE, MiB):
        h.pwrite(os.urandom(MiB), off)
    h.flush()
    h.shutdown()
    assert p.cli("rsg", "create", "g", "--volume", "src", "--srl-size",
                 "8M").returncode == 0
    assert p.cli("rsg", "link", "g", *link.link_args,
                 "--rate", "6M").returncode == 0, link.log
    try:
        yield disks, targets
    finally:
        for t in targets.values():
            t.stop()
        for d in disks.values():
            d.stop()


def _wait(pred, what, timeout=90):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _replayed_at_least(p, n):
    def check():
        link = p.cli_json("rsg", "status", "g")["links"][0]
        replay = link.get("replay") or {}
        if link["state"] == "dcm-replay" and \
                replay.get("bytes_done", 0) >= n and \
                link["dcm_extents"] is not None and \
                link["dcm_extents"] < link["replay_total"]:
            return link
        return None
    return _wait(check, "the replay half way with regions cleared")


def _caught_up(p, s):
    def check():
        st, link, sst = torture.replication_status(p, s)
        return torture.caught_up(st, link, sst)
    _wait(check, "caught up", timeout=120)
    mine, theirs = p.read_all("src", SIZE), s.read_all("src", SIZE)
    differ = [b for b in range(SIZE // BLOCK)
              if mine[b * BLOCK:(b + 1) * BLOCK] !=
              theirs[b * BLOCK:(b + 1) * BLOCK]]
    assert not differ, "the consistent secondary differs at {} blocks, " \
        "first {}".format(len(differ), differ[:8])


def test_secondary_power_cut_mid_replay(nodes):
    disks, t = nodes
    p, s = t["p"], t["s"]
    _replayed_at_least(p, SIZE // 2)
    s.power_cut(disks["s"])
    s.start(connect=False)
    p.cli("rsg", "attach", "g", "--secondary",
          p.cli_json("rsg", "status", "g")["links"][0]["secondary"],
          "--rate", "0")
    _caught_up(p, s)


@pytest.mark.parametrize("flush", [True, False])
def test_primary_power_cut_mid_replay_after_writes_to_cleared_regions(
        nodes, flush):
    disks, t = nodes
    p, s = t["p"], t["s"]
    _replayed_at_least(p, SIZE // 2)
    # Writes into the first MiBs (sent and acknowledged already).
    h = p.connect()
    for b in range(0, 64):
        h.pwrite(os.urandom(BLOCK), b * 16 * BLOCK)
    if flush:
        h.flush()
    time.sleep(0.3)
    h.shutdown()
    p.power_cut(disks["p"])
    p.start()
    p.cli("rsg", "attach", "g", "--secondary",
          p.cli_json("rsg", "status", "g")["links"][0]["secondary"],
          "--rate", "0")
    _caught_up(p, s)


def _detach_write_attach(p, stride, rate):
    secondary = p.cli_json("rsg", "status", "g")["links"][0]["secondary"]
    assert p.cli("rsg", "detach", "g", "--secondary",
                 secondary).returncode == 0
    h = p.connect()
    for off in range(0, SIZE, stride):
        h.pwrite(os.urandom(64 * 1024), off)
    h.flush()
    h.shutdown()
    assert p.cli("rsg", "attach", "g", "--secondary", secondary,
                 "--rate", rate).returncode == 0


def test_secondary_power_cut_in_a_replay_that_reuses_the_save_area(nodes):
    """The second replay's image takes the save area file the first one's
    kept (slots full of that image's old data): a power cut of the
    secondary in it still gives back the point before it, by the image
    and by `lu rollback`."""
    disks, t = nodes
    p, s = t["p"], t["s"]
    _caught_up(p, s)
    _detach_write_attach(p, 512 * 1024, "0")
    _caught_up(p, s)
    kept = os.path.join(s.state_dir, "maps", "src@consistent-src.save.kept")
    assert os.path.getsize(kept) > 0
    point = s.read_all("src", SIZE)
    # Every 64K extent at 256K: half of them the first replay's slots.
    _detach_write_attach(p, 256 * 1024, "1M")
    _wait(lambda: (p.cli_json("rsg", "status", "g")["links"][0].get(
        "replay") or {}).get("bytes_done", 0) >= 2 * MiB, "replay under way")
    assert not os.path.exists(kept)      # the image's save area now
    # The primary goes (it would resume the replay), then the power.
    p.stop()
    s.power_cut(disks["s"])
    s.start(connect=False)
    st = s.cli_json("rsg", "status", "g")
    assert not st["consistent"] and st["images"] == ["src@consistent-src"], st
    assert s.read_all("src@consistent-src", SIZE) == point
    out = s.cli("lu", "rollback", "src")
    assert out.returncode == 0 and "src@consistent-src" in out.stdout, out
    assert s.cli("rsg", "promote", "g", "--force").returncode == 0
    assert s.read_all("src", SIZE) == point
