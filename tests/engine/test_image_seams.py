"""Second ways into a Source's bytes pass the checks of the first.

- A point in time of a Source (a session's mark, a protected image) is
  refused while a restore or reverse sync from a clone runs: hosts read
  the clone's data there, the Source below the clones layer still holds
  the old, and an image of the latter would freeze (and a rollback would
  put back) data no host ever read.
- An operation that changes a Source without host writes (a rollback,
  as a restore or reverse sync) is refused while the LU is held (its
  replicated group did not load): nothing would log the change for the
  secondaries.
- A rollback and a restore or reverse sync from a clone are two writers
  of one Source: each is refused while the other runs (or starts), with
  a message naming the other.  A rollback the restore's engine outran
  would put the image back below what hosts read and release it.
- A rollback refuses while hosts use the LU, and no connection opens
  while it runs, a host's or the iSCSI gateway's: its copy would
  overwrite what they write.  The LU is exported again afterwards, and
  no other operation (a refused delete) gives it back earlier.
"""

import errno
import threading
import time

import pytest

from target import clones, copier, errors, inventory, iscsi, sessions
from target.clones import sync as clone_sync
from target.lu import LUHeld
from target.session_orchestration import RollbackRefused, RollbackRunning
from target.replication import primary
from target.target import Target
from tests.support.targets import fractured, hold_copies
from tests.support.twonodes import converge, two_nodes  # noqa: F401

MiB = 1 << 20
G = 64 << 10


def read(t, export, offset, length):
    conn = t.connect(export, True)
    try:
        buf = bytearray(length)
        conn.export.read(buf, offset)
        return bytes(buf)
    finally:
        t.disconnect(conn)


@pytest.fixture
def two_lus(tmp_path):
    """A Target with LU "a" and read-only LU "ro", 1 MiB each."""
    d = inventory.StateDir(str(tmp_path / "state"))
    inventory.create_lu(d, "a", size=MiB)
    inventory.create_lu(d, "ro", size=MiB, readonly=True)
    t = Target(d.path)
    yield t
    t.close()


@pytest.fixture(params=["restore", "reverse-sync"])
def restoring(two_lus, monkeypatch, request):
    """LU "a" holds A, its fractured clone "c" holds C at extent 0, and a
    restore (or reverse sync) from "c" has begun, its engine held: hosts
    read C there, the Source below the clones layer still holds A."""
    target = two_lus
    target.lus["a"].write(b"A" * MiB, 0)
    fractured(target, "a", "c")
    target.groups["a"].clones["c"].export.write(b"C" * G, 0)
    monkeypatch.setattr(clone_sync.SyncEngine, "start", lambda engine: None)
    if request.param == "restore":
        target.clone_restore("c")
    else:
        target.clone_reverse_sync("c")
    assert target.groups["a"].clones["c"].state in (
        clones.RESTORING, clones.REVERSE_SYNCING)
    assert read(target, "a", 0, 16) == b"C" * 16
    return target


def test_no_protected_image_is_taken_while_the_source_is_restored(
        restoring):
    with pytest.raises(sessions.SessionBusy, match="being restored"):
        restoring.image_protect("a")
    assert "a@protected-a" not in [n for n, _ in restoring.exports()]


def test_no_session_is_marked_while_the_source_is_restored(restoring,
                                                           monkeypatch):
    monkeypatch.setattr(sessions, "probe_destination",
                        lambda *args, **kwargs: None)
    restoring.session_create("a", "s1",
                             dests=["nbd+unix:///x?socket=/nonexistent"])
    with pytest.raises(sessions.SessionBusy, match="being restored"):
        restoring.session_mark("s1", export=True)


@pytest.mark.parametrize("operation", ["restore", "reverse-sync"])
def test_no_rollback_while_a_clone_restores_the_source(two_lus, monkeypatch,
                                                       operation):
    target = two_lus
    target.lus["a"].write(b"A" * MiB, 0)
    fractured(target, "a", "c")
    target.groups["a"].clones["c"].export.write(b"C" * G, 0)
    target.image_protect("a")
    target.lus["a"].write(b"B" * G, G)
    monkeypatch.setattr(clone_sync.SyncEngine, "start", lambda engine: None)
    if operation == "restore":
        target.clone_restore("c")
    else:
        target.clone_reverse_sync("c")
    with pytest.raises(RollbackRefused, match="clone c is restoring it"):
        target.image_rollback("a")
    assert target.image_status("a")["protected"]
    # Hosts read the clone's data, as before the refusal.
    assert read(target, "a", 0, 16) == b"C" * 16
    assert read(target, "a", G, 16) == b"A" * 16
    assert "a" in [n for n, _ in target.exports()]


def test_no_rollback_while_a_restore_starts(two_lus):
    """Between its checks and its new state a restore is starting: the
    rollback that looks then sees it, and no restore starts while a
    rollback's checks run (both under the Target's lock)."""
    target = two_lus
    target.image_protect("a")
    with target.session_ops.restore_starting(target.lus["a"], "c",
                                             "restore"):
        with pytest.raises(RollbackRefused, match="clone c is starting"):
            target.image_rollback("a")
    assert target.image_status("a")["protected"]
    assert target.session_ops._starting == {}


@pytest.fixture
def rolling_back(tmp_path, monkeypatch):
    """LU "a" (a fractured clone "c" of it, an iSCSI gateway route) being
    rolled back to its protected image, the rollback held in its copy:
    (target, the gateway's name for "a", a function letting it finish and
    returning its result)."""
    d = inventory.StateDir(str(tmp_path / "state"))
    inventory.create_lu(d, "a", size=MiB)
    t = Target(d.path, gateway_secret="s3cret")
    t.lus["a"].write(b"A" * MiB, 0)
    fractured(t, "a", "c")
    t.image_protect("a")
    t.lus["a"].write(b"B" * MiB, 0)
    copying, go = hold_copies(monkeypatch)
    out = {}

    def roll_back():
        try:
            out["result"] = t.image_rollback("a")
        except Exception as e:      # noqa: the test reports it
            out["error"] = e
    thread = threading.Thread(target=roll_back)
    thread.start()

    def finish():
        go.set()
        thread.join(30)
        assert not thread.is_alive() and "error" not in out, out
        return out["result"]
    try:
        assert copying.wait(30), out
        yield t, "{}{}:a".format(iscsi.GATEWAY_PREFIX, "s3cret"), finish
    finally:
        go.set()
        thread.join(30)
        t.close()


def test_no_connection_opens_while_a_rollback_runs(rolling_back):
    t, gateway_name, finish = rolling_back
    for name in ("a", gateway_name):
        with pytest.raises(LUHeld, match="being rolled back to "
                           "a@protected-a") as e:
            t.connect(name, False)
        assert e.value.errno == errno.EBUSY
    assert "a" not in t.export_modes()
    assert "a" not in [n for n, _ in t.exports()]
    # Another operation refused meanwhile gives nothing back.
    with pytest.raises(errors.LUBusy):
        t.lu_delete("a")
    with pytest.raises(LUHeld):
        t.connect("a", False)
    assert finish()["image"] == "a@protected-a"
    assert read(t, "a", 0, MiB) == b"A" * MiB
    assert "a" in t.export_modes()
    t.disconnect(t.connect(gateway_name, False))


@pytest.mark.parametrize("operation", ["restore", "reverse-sync"])
def test_no_restore_starts_while_a_rollback_runs(rolling_back, operation):
    t, _, finish = rolling_back
    start = t.clone_restore if operation == "restore" else \
        t.clone_reverse_sync
    with pytest.raises(RollbackRunning, match="its Source 'a' is being "
                       "rolled back to a@protected-a") as e:
        start("c")
    assert e.value.errno == errno.EBUSY
    assert t.clone_status("c")["state"] == clones.FRACTURED
    finish()
    assert read(t, "a", 0, MiB) == b"A" * MiB
    start("c")
    assert t.clone_status("c")["state"] in (clones.RESTORING,
                                            clones.REVERSE_SYNCING)


def test_a_held_volume_is_not_rolled_back(two_nodes,  # noqa: F811
                                          monkeypatch):
    """The primary restarts and its group does not load (its SRL cannot
    be opened): its volume is held, and a rollback to its protected image
    is refused as a host's connection is, or the secondary would never
    learn of the change once the group loads again."""
    a, b = two_nodes
    lu = a.t.lus["v1"]
    lu.write(b"\x01" * 4096, 0)
    converge(a, b)
    a.t.image_protect("v1")
    lu.write(b"\x02" * 4096, 0)
    converge(a, b)
    a.close()

    def unopenable(*args, **kwargs):
        raise OSError(errno.EIO, "injected")
    monkeypatch.setattr(primary, "Srl", unopenable)
    a.start()
    assert a.t.lus["v1"].held
    with pytest.raises(LUHeld):
        a.t.connect("v1", False)
    with pytest.raises(LUHeld):
        a.t.image_rollback("v1")
    buf = bytearray(4096)
    a.t.lus["v1"].backend.readinto(buf, 0)
    assert bytes(buf) == b"\x02" * 4096


@pytest.mark.parametrize("policy", ["take-all", ["disconnect"], 7])
def test_a_primarys_hello_with_an_unknown_policy_is_not_kept(
        two_lus, policy, caplog):
    """A primary's hello names a split-brain policy this node does not
    know (a newer version's, or garbage): replication goes on, the policy
    kept for a promotion stays the one it had, and the log says why.
    (Before, the value was saved as it came, and the promoted node acted
    on a policy nobody could read back.)"""
    t = two_lus
    hello = {"group": "g", "volumes": [{"lu": "a", "size": MiB}],
             "after_split_brain": "discard-zero-changes"}
    rsg = t.rsg_ops.accept_primary(hello, "192.0.2.1")
    assert rsg.handshake(hello)["ok"]
    hello["after_split_brain"] = policy
    assert rsg.handshake(hello)["ok"]
    assert rsg.record_base["after_split_brain"] == "discard-zero-changes"
    assert t.state_dir.group_files("g").load()["after_split_brain"] == \
        "discard-zero-changes"
    assert "split-brain policy" in caplog.text


@pytest.mark.parametrize("last", ["7", -1, 2.5, [7]])
def test_a_primarys_hello_with_a_bad_last_update_is_refused(two_lus, last):
    """A hello whose last update is not a whole number is refused in the
    handshake, with a reason the primary shows (before, it was found only
    after the handshake had been answered: the primary saw a lost
    connection, and retried for ever)."""
    t = two_lus
    hello = {"group": "g", "volumes": [{"lu": "a", "size": MiB}]}
    rsg = t.rsg_ops.accept_primary(hello, "192.0.2.1")
    hello["last_seq"] = last
    with pytest.raises(errors.ProtocolError, match="last update"):
        rsg.handshake(hello)


@pytest.mark.parametrize("volumes, granularity",
                         [(["a", "a"], None), (["ro"], None), (["a"], 1),
                          (["a"], 3 << 20)],
                         ids=["twice", "read-only", "granularity-1",
                              "granularity-3M"])
def test_a_primarys_hello_cannot_claim_what_a_group_cannot_hold(
        two_lus, volumes, granularity):
    """A primary's hello names an LU twice, or a read-only one, or a
    granularity no group may have: refused before anything is saved or
    stacked.  Before, a second guard failed to stack and left the first
    in place (the LU refused every read and write) and the group's saved
    record stopped the next start; a granularity of 1 was saved, and the
    node's promotion (a failover) built a map of a byte per volume
    byte."""
    t = two_lus
    hello = {"group": "g", "volumes": [{"lu": n, "size": MiB}
                                       for n in volumes]}
    if granularity is not None:
        hello["granularity"] = granularity
    with pytest.raises(errors.Error):
        t.rsg_ops.accept_primary(hello, "192.0.2.1")
    assert "g" not in t.rsgs and not t.state_dir.group_files("g").on_disk()
    for name in set(volumes):
        assert t.lus[name].stack.get("guard") is None
        assert read(t, name, 0, 4) == bytes(4)
    t.close()
    Target(t.state_dir.path).close()


@pytest.fixture
def half_rolled_back(tmp_path, monkeypatch):
    """LU "a" with a synchronized clone c: image A everywhere protected,
    then B written at extents 0 and 8; a rollback has put extent 0 back
    and is held before extent 8.  A point in time taken now (a mark, a
    fracture) would hold neither the LU before the rollback nor the
    image."""
    d = inventory.StateDir(str(tmp_path / "state"))
    inventory.create_lu(d, "a", size=MiB)
    t = Target(d.path)
    t.lus["a"].write(b"A" * MiB, 0)
    fractured(t, "a", "c")          # a fractured clone of "a"
    t.clone_sync("c")               # ... synchronized again (mirrored)
    while t.clone_status("c")["state"] != "synchronized":
        time.sleep(0.01)
    t.image_protect("a")
    t.lus["a"].write(b"B" * G, 0)
    t.lus["a"].write(b"B" * G, 8 * G)
    halfway, go = threading.Event(), threading.Event()
    real = copier.Copier.copy

    def held(self, runs):
        runs = list(runs)
        for i, run in enumerate(runs):
            if i == 1:
                halfway.set()
                assert go.wait(30)
            real(self, [run])
    monkeypatch.setattr(copier.Copier, "copy", held)
    out = {}
    thread = threading.Thread(
        target=lambda: out.setdefault("r", t.image_rollback("a")))
    thread.start()
    try:
        assert halfway.wait(30)
        yield t
    finally:
        go.set()
        thread.join(30)
        t.close()
    assert "r" in out


def test_a_session_mark_is_refused_while_a_rollback_runs(half_rolled_back,
                                                         monkeypatch):
    t = half_rolled_back
    monkeypatch.setattr(sessions, "probe_destination",
                        lambda *args, **kwargs: None)
    t.session_create("a", "s1", dests=["nbd+unix:///x?socket=/nonexistent"])
    try:
        t.session_mark("s1", export=True)
    except errors.Error as e:
        assert e.errno == errno.EBUSY and "being rolled back" in str(e)
        return
    frozen = (read(t, "a@s1", 0, 4), read(t, "a@s1", 8 * G, 4))
    pytest.fail("marked mid-rollback; the frozen image a@s1 holds {} "
                "(neither the LU before the rollback, BB, nor the image, "
                "AA)".format(frozen))


def test_a_fracture_is_refused_while_a_rollback_runs(half_rolled_back):
    t = half_rolled_back
    try:
        t.clone_fracture("c")
    except errors.Error as e:
        assert e.errno == errno.EBUSY and "being rolled back" in str(e)
        assert t.clone_status("c")["state"] == "synchronized"
        return
    frozen = (read(t, "c", 0, 4), read(t, "c", 8 * G, 4))
    pytest.fail("fractured mid-rollback; clone c holds {} (neither BB "
                "nor AA)".format(frozen))


def test_a_frozen_export_read_across_a_forced_delete_shows_no_newer_data(
        two_lus, monkeypatch):
    """A session deleted with --force while a host reads its frozen
    export a@s1: the reader's later reads fail (the image is gone), and
    never show the Source's newer data, which nothing saved the old data
    of once the session was gone (before, the reader got it where the old
    data had not been saved, and EINVAL where it had)."""
    t = two_lus
    monkeypatch.setattr(sessions, "probe_destination",
                        lambda *args, **kwargs: None)
    t.lus["a"].write(b"A" * MiB, 0)
    t.session_create("a", "s1", dests=["nbd+unix:///x?socket=/nonexistent"])
    t.session_mark("s1", export=True)
    conn = t.connect("a@s1", True)
    try:
        t.lus["a"].write(b"B" * G, 0)           # its old data saved
        t.session_delete("s1", force=True)
        t.lus["a"].write(b"C" * G, 8 * G)       # nothing saves it now
        for offset in (0, 8 * G):
            buf = bytearray(4)
            try:
                conn.export.read(buf, offset)
            except sessions.FrozenImageGone:
                continue
            assert bytes(buf) == b"AAAA", (offset, bytes(buf))
    finally:
        t.disconnect(conn)
