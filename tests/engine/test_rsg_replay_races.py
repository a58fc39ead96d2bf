"""The resumable DCM replay (RSYN/RSAK clearing the DCM as the secondary
acknowledges) against what could break it: host writes racing its reads and
the clears, a replay broken off by a kill of the primary, a lost
connection or a restart of the secondary, a secondary rolled back while
the replay was broken off, two links.  Each test ends with the secondary
claiming consistency; it must then be identical to the primary.
"""

import os
import random
import threading
import time

import pytest

from tests.support import rsgnodes
from tests.support.rsgpair import MiB, Gate, pair  # noqa: F401
from tests.support.rsgnodes import read_image
from tests.support.rsgmodel import wait_for
from target import replication as R

SIZE = 16 * MiB
# The racing tests' replays: many acknowledged syncs (RSYN, each clearing
# what it covers from the DCM) while the host writes.
RACE_SIZE = 8 * MiB
RACE_SYNC_BYTES = 512 << 10
# The racing tests run once each by default; RSG_REPLAY_SEEDS=N runs them
# with N seeds (each a different timing of the host writes).
SEEDS = range(int(os.environ.get("RSG_REPLAY_SEEDS", "1")))


class Writer:
    """Host writes of 4 KiB at random offsets, from a thread, until
    paused; each write lands near the replay's current position half of
    the time (the regions just read, sent or being acknowledged)."""

    def __init__(self, p, seed, near=None):
        self.p = p
        self.rng = random.Random(seed)
        self.near = near
        self.go = threading.Event()
        self.idle = threading.Event()
        self.stop = False
        self.count = 0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop:
            if not self.go.is_set():
                self.idle.set()
                self.go.wait(0.05)
                continue
            self.idle.clear()
            size = self.p.ta.lus["v"].size
            pos = self.near() if self.near and self.rng.random() < 0.5 \
                else None
            if pos is None:
                off = self.rng.randrange(0, size // 4096) * 4096
            else:
                off = max(0, min(size - 4096, pos - self.rng.randrange(
                    0, 2 * MiB) // 4096 * 4096))
            try:
                self.p.write(off, os.urandom(4096))
            except Exception:
                pass
            self.count += 1
            time.sleep(0.002)
        self.idle.set()

    def pause(self):
        self.go.clear()
        assert self.idle.wait(10)
        # A write in flight when go was cleared.
        time.sleep(0.05)
        assert self.idle.wait(10)

    def resume(self):
        self.idle.clear()
        self.go.set()

    def close(self):
        self.stop = True
        self.go.set()
        self.thread.join(10)


def _last_sent(monkeypatch):
    """Patch the link's sender to remember the last RDAT offset."""
    last = {"off": None, "rsyn": 0}
    orig = R.link.send_frames

    def send_frames(sock, frames):
        for kind, head, data in frames:
            if kind == b"RDAT":
                vol, k, off, length, crc = R.wire.DATA.unpack_from(head)
                last["off"] = off + length
            elif kind == b"RSYN":
                last["rsyn"] += 1
        return orig(sock, frames)
    monkeypatch.setattr(R.link, "send_frames", send_frames)
    return last


def _rate_limited_pair(pair, monkeypatch, rate="4M"):
    # Small syncs: many clears while the host writes.
    monkeypatch.setattr(R.link, "REPLAY_SYNC_BYTES", RACE_SYNC_BYTES)
    p = pair(size=RACE_SIZE)
    last = _last_sent(monkeypatch)
    p.link_up(rate=rate)
    return p, last


def _wait_some_syncs(p, last, n=4):
    wait_for(lambda: last["rsyn"] >= n and p.link.state == R.DCM_REPLAY
             and p.link.dcm.count() < p.link.replay_total, 30,
             "some acknowledged syncs", p.link.status)


def _finish(p, w):
    w.resume()
    time.sleep(0.3)
    w.pause()
    w.close()
    p.check_identical()


def _kill_primary(p, w):
    w.pause()           # a kill at a quiet moment
    p.kill_primary()


def _lose_connection(p, w):
    # The connection drops while host writes go on.
    R.wire.shutdown_socket(p.link.sock)
    time.sleep(0.3)


def _restart_secondary(p, w):
    p.restart_secondary()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cut", [_kill_primary, _lose_connection,
                                 _restart_secondary],
                         ids=["primary_kill", "lost_connection",
                              "secondary_restart"])
def test_host_writes_racing_replay_clears_then(pair, monkeypatch, cut, seed):
    """The replay is cut (by `cut`) while host writes race its clears."""
    p, last = _rate_limited_pair(pair, monkeypatch)
    w = Writer(p, seed, near=lambda: last["off"])
    w.resume()
    _wait_some_syncs(p, last)
    time.sleep(random.Random(seed).random() * 0.5)
    cut(p, w)
    _finish(p, w)


def _secondary_node(p, name, size=SIZE):
    """One more secondary beside the pair's, on root/name."""
    node = rsgnodes.Node(os.path.join(p.root, name), {"v": size}, p.tok)
    node.start()
    return node


def test_two_links_a_relinked_secondary_keeps_its_own_dcm_across_restart(
        pair):
    """Links to B and C; B is unlinked and linked again (a new index),
    then detached while the primary writes: its DCM holds those writes.
    After a restart of the primary, B's replay must copy them."""
    from target.target import Target
    p = pair(size=SIZE)
    c = _secondary_node(p, "C")
    tc, addr_c = c.t, c.addr
    try:
        p.link_up()
        p.ta.rsg_link("g", addr_c, "async", p.tok)
        g = p.ta.rsgs["g"]
        wait_for(lambda: all(l.state == R.REPLICATING for l in g.links), 60,
                 "both links replicating", g.status)
        p.ta.rsg_unlink("g", p.addr)
        p.ta.rsg_link("g", p.addr, "async", p.tok)
        wait_for(lambda: all(l.state == R.REPLICATING for l in g.links), 60,
                 "both links replicating again", g.status)
        p.ta.rsg_detach("g", p.addr)
        wait_for(lambda: p.sg.connected_since is None, 10, "B disconnected")
        p.write(0, b"\x42" * (1 * MiB))
        link_b = next(l for l in g.links if l.secondary == p.addr)
        assert link_b.dcm.count() > 0
        # A clean restart of the primary.
        p.ta.close()
        p.ta = Target(p.A)
        p.ta.start()
        p.ta.rsg_attach("g", p.addr)
        g = p.ta.rsgs["g"]
        link_b = next(l for l in g.links if l.secondary == p.addr)
        wait_for(lambda: link_b.state == R.REPLICATING and p.sg.consistent
                 and link_b.dcm.count() == 0, 60, "B replicating",
                 link_b.status)
        time.sleep(0.5)
        a, b = read_image(p.ta, "v"), read_image(p.tb, "v")
        assert a[:MiB] == b[:MiB], \
            "B claims consistency without the writes made while detached"
    finally:
        tc.close()


def test_secondary_rolled_back_while_replay_broken_off(pair, monkeypatch):
    """A replay to a secondary that had a consistent image (protected at
    the replay's start) is broken off after some regions were cleared;
    the secondary is rolled back to its protected image; the resumed
    replay must put the cleared regions back."""
    monkeypatch.setattr(R.link, "REPLAY_SYNC_BYTES", 1 * MiB)
    p = pair(size=SIZE)
    last = _last_sent(monkeypatch)
    p.link_up()
    p.check_identical()
    p.ta.rsg_detach("g", p.addr)
    wait_for(lambda: p.sg.connected_since is None, 10, "B disconnected")
    p.write(0, os.urandom(SIZE))
    p.ta.rsg_attach("g", p.addr, rate="4M")
    _wait_some_syncs(p, last)
    p.ta.rsg_detach("g", p.addr)
    wait_for(lambda: p.sg.connected_since is None, 10, "B disconnected")
    assert 0 < p.link.dcm.count() < p.link.dcm.extents
    p.tb.image_rollback("v")
    p.ta.rsg_attach("g", p.addr, rate="0")
    p.check_identical()


def _volume_path(root):
    path = [os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs
            if f.startswith("v") and os.path.getsize(
                os.path.join(dp, f)) == SIZE]
    assert len(path) == 1, path
    return path[0]


def test_secondary_that_lost_replayed_data_is_not_declared_consistent(
        pair, monkeypatch):
    """Out of band: the secondary goes back to a snapshot of the node
    (its volume and its group record) taken when it had acknowledged the
    replay's first RSYN, after the primary cleared later ones from its
    DCM.  The handshake reports the first RSYN as the last one made
    durable: the primary must copy the whole DCM again, not resume from
    its cleared DCM and end consistent over the lost regions.  (A volume
    that loses data while its record does not cannot be told from a
    plain restart by any handshake; `rsg verify` finds that.)"""
    # Several RSYNs answered before the gate half way.
    monkeypatch.setattr(R.link, "REPLAY_SYNC_BYTES", 2 * MiB)
    p = pair(size=SIZE)
    gate = Gate(monkeypatch, SIZE // 2)
    snap = {}
    orig = R.secondary.SecondaryGroup.replay_sync

    def replay_sync(sg, ident):
        orig(sg, ident)
        if not snap:
            with open(_volume_path(p.B), "rb") as f:
                snap["volume"] = f.read()
            with open(sg.files.record, "rb") as f:
                snap["record"] = f.read()
            snap["path"] = sg.files.record
            snap["id"] = ident
    monkeypatch.setattr(R.secondary.SecondaryGroup, "replay_sync",
                        replay_sync)
    p.link_up()
    gate.link = p.link
    assert gate.held.wait(60), p.link.status()
    # Host writes during the replay.
    for i in range(20):
        p.write(SIZE - (i + 1) * 65536, os.urandom(4096))
    wait_for(lambda: p.link.replay_cleared > snap.get("id", 1 << 62), 10,
             "a later RSYN cleared", p.link.status)
    p.ta.rsg_detach("g", p.addr)
    wait_for(lambda: p.sg.connected_since is None, 10, "B disconnected")
    p.tb.close()
    p.tb = None
    # The secondary's node as it was at its first acknowledged RSYN.
    with open(_volume_path(p.B), "r+b") as f:
        f.write(snap["volume"])
        f.flush()
        os.fsync(f.fileno())
    with open(snap["path"], "wb") as f:
        f.write(snap["record"])
    p.start_secondary()
    gate.release()
    p.ta.rsg_attach("g", p.addr)
    p.check_identical()
    assert gate.sent >= SIZE, "the whole DCM was not copied again"


def test_secondary_restarted_within_a_replay_reports_its_last_rsyn(pair):
    """A plain restart of the secondary keeps what it acknowledged: the
    id it reports covers what the primary cleared (no copy of the whole
    DCM), and the record of both says so."""
    p = pair(size=SIZE)
    p.link_up(rate="4M")
    wait_for(lambda: p.link.replay_cleared > 0, 30, "a cleared RSYN",
             p.link.status)
    p.restart_secondary()
    assert p.sg.replay_synced >= p.link.replay_cleared
    extents = p.link.dcm.count()
    p.ta.rsg_attach("g", p.addr, rate="0")
    wait_for(lambda: p.link.replays >= 2, 30, "the replay again",
             p.link.status)
    assert p.link.replay_total <= extents + 4 * MiB // 65536, \
        (p.link.replay_total, extents)
    p.check_identical()
    assert p.link.replay_cleared == 0
    assert p.ta.rsgs["g"].record()[0]["links"][0]["replay_cleared"] == 0


def test_secondary_without_rsyn_gets_the_old_behaviour(pair, monkeypatch):
    """A secondary of an older protocol (its handshake has no
    replay_sync): no RSYN is sent, nothing is cleared before the replay
    completes, and a replay broken off copies the whole DCM again."""
    orig = R.secondary.SecondaryGroup.handshake

    def handshake(sg, hello):
        reply = orig(sg, hello)
        reply.pop("replay_sync")
        reply.pop("replay_synced")
        return reply
    monkeypatch.setattr(R.secondary.SecondaryGroup, "handshake", handshake)
    last = _last_sent(monkeypatch)
    p = pair(size=SIZE)
    gate = Gate(monkeypatch, SIZE // 2)
    p.link_up()
    gate.link = p.link
    assert gate.held.wait(60), p.link.status()
    time.sleep(0.3)
    assert last["rsyn"] == 0 and p.link.replay_cleared == 0
    assert p.link.dcm.count() == p.link.dcm.extents
    p.kill_primary()
    gate.release()
    gate.link = p.link
    p.check_identical()
    assert gate.sent == SIZE and last["rsyn"] == 0


def test_slow_rate_replay_completes(pair, monkeypatch):
    """--rate low enough that one REPLAY_CHUNK takes longer than the
    secondary's idle timeout (10 s in production: below ~100 KiB/s; here
    the timeout is 1 s and the rate 512 KiB/s).  The replay sends nothing
    while it throttles (no BEAT), the secondary drops the silent primary,
    the chunk was never acknowledged (no RSYN before COMMIT_INTERVAL), and
    the next connection sends the same chunk again: the replay must still
    end."""
    monkeypatch.setattr(R.server, "IDLE_TIMEOUT", 1.0)
    p = pair(size=2 * MiB)
    p.link_up(rate="512K")
    # Two chunks of 1 MiB at 512 KiB/s: 4 s, plus reconnects.
    wait_for(p.replicating, 30, "the throttled replay completed",
             lambda: (p.link.status(), p.sg and p.sg.status()))
    p.check_identical()


@pytest.mark.parametrize("seed", SEEDS)
def test_two_links_replaying_with_host_writes_then_primary_kill(
        pair, monkeypatch, seed):
    monkeypatch.setattr(R.link, "REPLAY_SYNC_BYTES", RACE_SYNC_BYTES)
    p = pair(size=RACE_SIZE)
    last = _last_sent(monkeypatch)
    c = _secondary_node(p, "C", RACE_SIZE)
    tc, addr_c = c.t, c.addr
    try:
        p.link_up(rate="4M")
        p.ta.rsg_link("g", addr_c, "async", p.tok, rate="3M")
        w = Writer(p, seed, near=lambda: last["off"])
        w.resume()
        _wait_some_syncs(p, last, n=8)
        time.sleep(random.Random(seed).random() * 0.5)
        w.pause()
        p.kill_primary()
        w.resume()
        time.sleep(0.3)
        w.pause()
        w.close()
        g = p.ta.rsgs["g"]
        for l in g.links:
            g.attach_link(l, replay_rate=0)

        def both():
            return all(l.state == R.REPLICATING and l.dcm.count() == 0
                       for l in g.links) and p.sg.consistent and \
                tc.rsgs["g"].consistent and \
                p.sg.applied_seq == tc.rsgs["g"].applied_seq == \
                g.next_seq - 1
        wait_for(both, 60, "both links caught up", g.status)
        a = read_image(p.ta, "v")
        assert a == read_image(p.tb, "v"), "B differs"
        assert a == read_image(tc, "v"), "C differs"
    finally:
        tc.close()
