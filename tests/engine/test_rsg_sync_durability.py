"""What a sync link's secondary makes durable, and when.

A sync-mode write returns once the secondary has applied it; the
secondary makes its volumes durable when the primary's host flushes (or
FUA writes) ask for it, not at every batch.  Two in-process Targets
(tests/support/rsgnodes.py); the syncs and writes of the secondary's
files are watched through os.pwrite/os.pwritev/os.fdatasync/os.fsync.
"""

import json
import os
import threading
import time

import pytest

from tests.support import rsgnodes
from tests.support.rsgmodel import wait_for
from target import replication as R

BLOCK = 4096


class Watch:
    """Writes and syncs of the files under one directory, from any
    thread: `syncs` counts the syncs, `dirty` holds the files written
    since their last sync."""

    def __init__(self, root):
        self.root = os.path.realpath(root) + os.sep
        self.lock = threading.Lock()
        self.syncs = 0
        self.dirty = set()

    def _path(self, fd):
        try:
            path = os.readlink("/proc/self/fd/%d" % fd)
        except OSError:
            return None
        return path if path.startswith(self.root) else None

    def wrap(self, monkeypatch):
        for name in ("pwrite", "pwritev"):
            monkeypatch.setattr(os, name, self._writer(getattr(os, name)))
        for name in ("fdatasync", "fsync"):
            monkeypatch.setattr(os, name, self._syncer(getattr(os, name)))

    def _writer(self, real):
        def write(fd, *args):
            n = real(fd, *args)
            path = self._path(fd)
            if path:
                with self.lock:
                    self.dirty.add(path)
            return n
        return write

    def _syncer(self, real):
        def sync(fd):
            path = self._path(fd)
            real(fd)
            if path:
                with self.lock:
                    self.syncs += 1
                    self.dirty.discard(path)
        return sync


@pytest.fixture
def pair(tmp_path):
    with rsgnodes.linked_pair(str(tmp_path), "sync", "1M", "4K") as p:
        yield p


def _volume_files(watch, pair):
    stage = {os.path.realpath(s) for s in pair.sg.files.stage}
    return {p for p in watch.dirty if p not in stage and
            not p.endswith((".json", ".tmp"))}


def test_sync_writes_cost_the_secondary_no_flush_each(
        pair, monkeypatch):
    lu = pair.ta.lus["v1"]
    watch = Watch(pair.B)
    watch.wrap(monkeypatch)
    for i in range(40):
        lu.write(os.urandom(BLOCK), i * BLOCK)
    # At most the record saying so once, and a timed commit.
    assert watch.syncs <= 6, "the secondary synced {} times for 40 " \
        "sync writes".format(watch.syncs)


@pytest.mark.parametrize("protection", ["on", "off"])
def test_a_host_flush_returns_once_the_secondary_made_it_durable(
        pair, monkeypatch, protection):
    lu = pair.ta.lus["v1"]
    if protection == "off":
        # The twin: a flush that does not wait for the secondary.
        wait = R.Link.wait_ack
        monkeypatch.setattr(R.Link, "wait_ack",
                            lambda self, seq, durable=False:
                            None if durable else wait(self, seq))
    watch = Watch(pair.B)
    watch.wrap(monkeypatch)
    for i in range(8):
        lu.write(os.urandom(BLOCK), i * 3 * BLOCK)
    lu.flush()
    dirty = _volume_files(watch, pair)
    if protection == "off":
        assert dirty, "the twin without the flush's wait must leave the " \
            "secondary's volume unsynced"
        return
    assert not dirty, "written on the secondary and not made durable " \
        "when the host flush returned: {}".format(sorted(dirty))
    link = pair.link.status()
    assert link["durable_seq"] == pair.g.next_seq - 1


def test_a_restart_after_updates_not_made_durable_replays_them(pair):
    """A secondary that stops while holding CAPL updates not yet durable
    (here: killed, its record as it was) comes back inconsistent and gets
    their regions again; nothing else is sent again."""
    lu = pair.ta.lus["v1"]
    lu.write(os.urandom(BLOCK), 0)
    lu.flush()
    sent = pair.link.sent_bytes
    for i in range(4):
        lu.write(os.urandom(BLOCK), (10 + i) * BLOCK)
    assert pair.sg.volatile
    pair.b.kill()
    pair.b.start()
    assert not pair.sg.consistent
    pair.wait_converged()
    assert rsgnodes.read_image(pair.tb, "v1") == \
        rsgnodes.read_image(pair.ta, "v1")
    resent = pair.link.sent_bytes - sent
    assert 4 * BLOCK <= resent < 4 * BLOCK + 64 * BLOCK, resent


def test_a_flush_failing_at_the_sessions_end_leaves_the_node_inconsistent(
        pair, tmp_path, monkeypatch):
    """The secondary's volume fails the flush that makes a session's
    updates durable (EIO, CLONECTL_FAULTS): the kernel may have dropped
    them, so the node must not go on saying it is consistent; once the
    device works, the primary sends their regions again."""
    faults = tmp_path / "faults.json"
    faults.write_text("[]")
    monkeypatch.setenv("CLONECTL_FAULTS", str(faults))
    pair.restart_secondary()        # its backends see the faults file
    wait_for(lambda: pair.sg.status()["connected"] and
             pair.link.state == R.REPLICATING, 10, "the link back")
    lu = pair.ta.lus["v1"]
    for i in range(4):
        lu.write(os.urandom(BLOCK), i * 5 * BLOCK)
    assert pair.sg.volatile and \
        pair.sg.applied_seq == pair.g.next_seq - 1, pair.sg.status()
    vol = os.path.join(pair.B, "lus", "v1.img")
    tmp = str(faults) + ".tmp"
    with open(tmp, "w") as f:
        json.dump([{"path": vol, "op": "flush", "errno": "EIO"}], f)
    os.rename(tmp, faults)
    pair.ta.rsg_detach(rsgnodes.GROUP, pair.addr)
    wait_for(lambda: not pair.sg.status()["connected"], 10,
             "the session's end")
    assert not pair.sg.consistent, pair.sg.status()
    faults.write_text("[]")
    pair.ta.rsg_attach(rsgnodes.GROUP, pair.addr)
    pair.wait_converged()
    assert rsgnodes.read_image(pair.tb, "v1") == \
        rsgnodes.read_image(pair.ta, "v1")


def test_a_lost_connection_shows_what_the_secondary_may_have_lost(
        pair, monkeypatch):
    """Once the connection is lost, the link's status counts the updates
    the secondary had applied but not made durable as not acknowledged:
    a secondary killed meanwhile gets them again, so they are its lag."""
    monkeypatch.setattr(R.link, "PERSIST_INTERVAL", 60.0)
    lu = pair.ta.lus["v1"]
    lu.write(os.urandom(BLOCK), 0)
    lu.flush()
    for i in range(4):
        lu.write(os.urandom(BLOCK), (10 + i) * BLOCK)
    assert pair.link.status()["acked_seq"] == pair.g.next_seq - 1
    durable = pair.link.acked_seq
    pair.b.kill()
    wait_for(lambda: pair.link.state != R.REPLICATING, 5, "the lost link",
             pair.status)
    link = pair.link.status()
    assert link["acked_seq"] == link["durable_seq"] == durable, link
    assert link["lag_updates"] == 4, link


def test_a_record_saved_beside_the_session_keeps_it_volatile(pair):
    """The secondary's record is saved by its session and by an admin's
    change (here its split-brain policy, saved while the session applies
    its first updates not made durable): whichever save lands last, the
    record says the node holds updates not made durable, so a crash
    leaves it inconsistent rather than taking a torn state for one."""
    sg = pair.sg
    assert not sg.volatile
    real_save = sg.files.save
    gate, entered = threading.Event(), threading.Event()
    admin = []

    def save(record):
        if threading.current_thread() in admin:
            entered.set()
            gate.wait(10)       # the admin's save lands last
        real_save(record)
    sg.files.save = save
    t = threading.Thread(target=sg.set_split_brain_policy,
                         args=(R.DISCARD_SECONDARY,))
    admin.append(t)
    t.start()
    assert entered.wait(5)
    w = threading.Thread(target=pair.ta.lus["v1"].write,
                         args=(os.urandom(BLOCK), 0))
    w.start()
    w.join(0.5)
    gate.set()
    w.join(10)
    t.join(10)
    assert sg.volatile
    assert sg.files.load()["volatile"], "the record says every update " \
        "applied is durable while one is not"
    pair.b.kill()
    pair.b.start()
    assert not pair.sg.consistent


def test_a_promotion_right_after_the_primary_detached_waits_for_the_end(
        pair, monkeypatch):
    """An admin detaches the primary's link and promotes the secondary at
    once (a failover script): the secondary's session is still ending
    (making what it applied durable), which is no primary "connected and
    replicating": the promotion waits for that end, it is not refused."""
    lu = pair.ta.lus["v1"]
    for i in range(4):
        lu.write(os.urandom(BLOCK), i * BLOCK)
    flush = R.SecondaryGroup._flush_volumes

    def slow_flush(self):
        time.sleep(0.5)
        flush(self)
    monkeypatch.setattr(R.SecondaryGroup, "_flush_volumes", slow_flush)
    pair.ta.rsg_detach(rsgnodes.GROUP, pair.addr)
    time.sleep(0.1)     # the session sees the end, and flushes
    assert pair.tb.rsg_promote(rsgnodes.GROUP)["role"] == R.PRIMARY


def test_an_idle_secondary_killed_after_its_updates_were_made_durable(pair):
    """Updates a sync link's secondary applied, then made durable (a host
    flush), then the link idle: a kill -9 of the secondary must not cost
    it its consistency (nothing it holds is undurable)."""
    lu = pair.ta.lus["v1"]
    for i in range(4):
        lu.write(os.urandom(BLOCK), i * BLOCK)
    lu.flush()
    sg = pair.sg
    # Idle: the primary's heartbeats go (PERSIST_INTERVAL, shortened).
    wait_for(lambda: not sg.files.load().get("volatile"), 5,
             "the record saying nothing undurable is held", sg.status)
    pair.b.kill()
    pair.b.start()
    assert pair.sg.consistent, pair.sg.status()
    assert rsgnodes.read_image(pair.tb, "v1") == \
        rsgnodes.read_image(pair.ta, "v1")
