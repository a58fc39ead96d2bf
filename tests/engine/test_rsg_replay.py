"""A DCM replay broken off resumes where the secondary's acknowledgements
left it (engine level: two in-process Targets over 127.0.0.1 TCP, as in
test_rsg_engine.py, whose crash_primary this file's kill follows).

One 64 MiB volume of random data is linked: the first contact marks every
extent and the replay copies all of it.  A gate in the link's sender stops
the replay once half the volume was sent; the primary is then killed (or
the secondary restarted) and the replay starts again.  What the second
run sends is counted: at most what the first run did not send plus what
was sent but not yet acknowledged (the syncs the link may have in flight,
R.link.REPLAY_SYNCS_AHEAD of R.link.REPLAY_SYNC_BYTES, plus the bytes since
the last one).  Before the fix the second run sent the whole volume.
"""

import os
import time

import pytest

from tests.support.rsgmodel import fast_timing, restore_timing, wait_for
from tests.support.rsgpair import MiB, SIZE, Gate, pair  # noqa: F401
from target import replication as R


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    # Syncs of a few MiB, so that what is sent again is well below what
    # a replay from the start sends.
    monkeypatch.setattr(R.link, "REPLAY_SYNC_BYTES", 4 * MiB)
    saved = fast_timing()
    yield
    restore_timing(saved)


def overlap():
    """What a replay may have sent that was not acknowledged yet."""
    return (R.link.REPLAY_SYNCS_AHEAD + 1) * R.link.REPLAY_SYNC_BYTES + \
        R.link.REPLAY_CHUNK


def _held_half_way(p, monkeypatch):
    gate = Gate(monkeypatch, SIZE // 2)
    p.link_up()
    gate.link = p.link
    assert gate.held.wait(60), p.link.status()
    first = gate.sent
    assert first >= SIZE // 2 - R.link.REPLAY_CHUNK
    # Host writes while the replay is held: into the half sent (their
    # entries are in the SRL, not sent) and into the half not sent.
    p.write(MiB, b"\x11" * 4096)
    p.write(SIZE - MiB, b"\x22" * 4096)
    return gate, first


def test_replay_resumes_after_primary_kill(pair, monkeypatch):
    p = pair()
    gate, first = _held_half_way(p, monkeypatch)
    # Let the acknowledgements of what went land (a kill at any moment
    # only loses more of them, bounded by the syncs in flight).
    time.sleep(0.3)
    p.kill_primary()
    gate.release()
    gate.link = p.link
    p.check_identical()
    second = gate.sent
    assert second <= SIZE - first + overlap(), \
        "second run sent {} MiB after {} MiB of {} MiB".format(
            second / MiB, first / MiB, SIZE / MiB)


def test_replay_resumes_after_secondary_restart(pair, monkeypatch):
    p = pair()
    gate, first = _held_half_way(p, monkeypatch)
    time.sleep(0.3)
    replays = p.link.replays
    # The secondary is killed: the held sender sees the link fail.
    p.restart_secondary()
    wait_for(lambda: p.link.replays > replays or gate.sent == 0, 30,
             "the link back", p.link.status)
    gate.release()
    p.check_identical()
    second = gate.sent
    assert second <= SIZE - first + overlap(), \
        "second run sent {} MiB after {} MiB of {} MiB".format(
            second / MiB, first / MiB, SIZE / MiB)


def test_rate_limited_replay_takes_size_over_rate_and_hosts_go_on(pair):
    size, rate = 4 * MiB, 8 * MiB
    p = pair(size=size)
    p.link_up(rate="8M")
    link = p.link
    assert link.status()["replay_rate_limit"] == rate
    # Host writes all along the replay: none waits for the throttle.
    took = []
    while not (link.replays and link.state == R.REPLICATING):
        t = time.monotonic()
        p.write(len(took) % 64 * 65536, os.urandom(4096))
        took.append(time.monotonic() - t)
        time.sleep(0.01)
        assert len(took) < 3000, link.status()
    p.check_identical()
    replay = link.status()["replay"]
    assert replay["bytes_done"] == replay["bytes_total"] == size
    assert replay["elapsed"] >= size / rate, replay
    assert len(took) >= 10 and max(took) < 0.2, (len(took), max(took))


def test_attach_changes_the_rate_of_a_running_replay(pair):
    p = pair(size=8 * MiB)
    p.link_up(rate="1M")
    link = p.link
    wait_for(lambda: link.state == R.DCM_REPLAY, 10, "the replay",
             link.status)
    p.ta.rsg_attach("g", p.addr, rate="0")
    assert link.status()["replay_rate_limit"] is None
    # 8 MiB at 1 MiB/s would take 8 s.
    wait_for(p.replicating, 4, "the replay unthrottled", link.status)
    p.check_identical()
    assert p.ta.rsgs["g"].record()[0]["links"][0]["replay_rate"] is None


def test_throttled_replay_keeps_the_connection_and_streams_entries(
        pair, monkeypatch):
    """A rate far below one chunk per idle timeout: the link keeps the
    connection alive while it waits (BEAT), and host writes made during
    the replay reach the secondary at once, not at the rate's pace."""
    monkeypatch.setattr(R.server, "IDLE_TIMEOUT", 1.0)
    p = pair(size=4 * MiB)
    p.link_up(rate="4K")
    link = p.link
    wait_for(lambda: link.state == R.DCM_REPLAY and p.sg is not None and
             p.sg.connected_since is not None, 10, "the replay", link.status)
    since = p.sg.connected_since
    g = p.ta.rsgs["g"]
    for i in range(5):
        p.write(i * 65536, b"\x33" * 4096)
        seq = g.next_seq - 1
        t = time.monotonic()
        wait_for(lambda: link.acked_seq >= seq, 5, "the entry acknowledged",
                 link.status)
        assert time.monotonic() - t < 0.5, link.status()
        time.sleep(0.5)
    assert p.sg.connected_since == since and link.replays == 1, (
        link.status(), p.sg.status())
    assert link.state == R.DCM_REPLAY
    assert 0 < link.replay_bytes[0] < 64 * 1024, link.status()
    p.ta.rsg_attach("g", p.addr, rate="0")
    p.check_identical()
