"""target.target: the Target and its LUs, in-process (no nbdkit)."""

import errno
import os
import threading
import time

import pytest

from target import backends, errors, inventory, operations, replication
from target import gateway as gateway_route
from target.lu import LogicalUnit
from target.session_orchestration import RollbackRefused
from target.target import Target
from tests.support.targets import fractured

MiB = 1 << 20


@pytest.fixture
def sd(tmp_path):
    d = inventory.StateDir(str(tmp_path / "state"))
    inventory.create_lu(d, "a", size=MiB)
    inventory.create_lu(d, "ro", size=MiB, readonly=True)
    return d


@pytest.fixture
def target(sd):
    t = Target(sd.path)
    yield t
    t.close()


def test_exports_and_status(target):
    names = [name for name, _ in target.exports()]
    assert names == ["a", "ro"]
    desc = dict(target.exports())
    assert "read-only" in desc["ro"] and "read-only" not in desc["a"]
    st = target.status()
    assert st["pid"] == os.getpid()
    assert [lu["name"] for lu in st["lus"]] == ["a", "ro"]
    assert all(lu["exported"] and lu["connections"] == 0 and
               lu["error"] is None for lu in st["lus"])


def test_connect_unknown_and_empty(target):
    with pytest.raises(errors.UnknownLU) as info:
        target.connect("nope", False)
    assert info.value.errno == 2 and "'nope'" in str(info.value)
    with pytest.raises(errors.InvalidArgument) as info:
        target.connect("", False)
    assert "a, ro" in str(info.value)


def test_connection_counts(target):
    c1 = target.connect("a", False)
    c2 = target.connect("a", True)
    assert c2.readonly and not c1.readonly
    assert target.status()["lus"][0]["connections"] == 2
    target.disconnect(c1)
    target.disconnect(c2)
    assert target.status()["lus"][0]["connections"] == 0


def test_io_through_connection(target, sd):
    conn = target.connect("a", False)
    conn.export.write(b"hello", 1)
    conn.export.flush()
    buf = bytearray(7)
    conn.export.read(buf, 0)
    assert bytes(buf) == b"\0hello\0"
    with open(os.path.join(sd.lus_dir, "a.img"), "rb") as f:
        assert f.read(7) == b"\0hello\0"
    conn.export.zero(2, 2, fua=True)
    conn.export.read(buf, 0)
    assert bytes(buf) == b"\0h\0\0lo\0"
    target.disconnect(conn)


def test_lu_refuses_out_of_range_and_read_only(target):
    conn = target.connect("a", False)
    with pytest.raises(errors.OutOfRange) as info:
        conn.export.write(b"xx", MiB - 1)
    assert info.value.errno == 22
    with pytest.raises(errors.OutOfRange):
        conn.export.zero(MiB, 1)
    with pytest.raises(errors.OutOfRange):
        conn.export.trim(-1, 10)
    ro = target.connect("ro", True)
    for action in (lambda: ro.export.write(b"x", 0),
                   lambda: ro.export.zero(0, 512),
                   lambda: ro.export.trim(0, 512)):
        with pytest.raises(errors.ReadOnly) as info:
            action()
        assert info.value.errno == 1
    target.disconnect(conn)
    target.disconnect(ro)


def test_reload_adds_and_retires(target, sd):
    conn = target.connect("a", False)
    inventory.create_lu(sd, "b", size=MiB)
    inventory.delete_lu(sd, "ro")
    assert target.reload() == ["a", "b"]
    assert [n for n, _ in target.exports()] == ["a", "b"]
    with pytest.raises(errors.UnknownLU):
        target.connect("ro", False)
    target.disconnect(conn)


def test_retired_lu_stays_usable_until_last_connection(target, sd, tmp_path):
    f = tmp_path / "ext.img"
    f.write_bytes(bytes(MiB))
    inventory.create_lu(sd, "ext", file=str(f))
    target.reload()
    conn = target.connect("ext", False)
    inventory.delete_lu(sd, "ext")
    target.reload()
    # The open connection keeps working on the retired LU...
    conn.export.write(b"late", 0)
    assert f.read_bytes()[:4] == b"late"
    target.disconnect(conn)
    # ...and its backend is closed after the last one ends.
    assert conn.export.backend.fd == -1


def test_unusable_backing_is_reported_not_exported(sd, tmp_path):
    f = tmp_path / "vanishing.img"
    f.write_bytes(bytes(MiB))
    inventory.create_lu(sd, "gone", file=str(f))
    # Away, then back: the same file (a new one would be other storage,
    # refused until accepted, unless its inode number happened to be the
    # old one's).
    away = tmp_path / "away.img"
    f.rename(away)
    t = Target(sd.path)
    try:
        st = {lu["name"]: lu for lu in t.status()["lus"]}
        assert st["gone"]["exported"] is False
        assert str(f) in st["gone"]["error"]
        assert st["a"]["exported"] is True
        assert "gone" not in [n for n, _ in t.exports()]
        with pytest.raises(errors.UnknownLU):
            t.connect("gone", False)
        # The file comes back: a reload exports it.
        away.rename(f)
        assert "gone" in t.reload()
    finally:
        t.close()


def test_control_operations(target):
    ops = operations.bind(target)
    assert ops["ping"]() == {"pid": os.getpid()}
    assert ops["status"]()["lus"][0]["name"] == "a"
    assert ops["reload"]() == {"exports": ["a", "ro"]}


def test_lu_create_in_the_target_exports_it(target, sd, tmp_path):
    res = operations.bind(target)["lu_create"](name="new", size="1M")
    assert res["error"] is None and res["record"]["size"] == 1 << 20
    assert "new" in [name for name, _ in target.exports()]
    assert "new" in sd.load()["lus"]
    # Its working directory is not the caller's: a relative file is refused.
    (tmp_path / "rel.img").write_bytes(bytes(4096))
    with pytest.raises(errors.InvalidArgument, match="absolute"):
        target.lu_create(name="rel", file="rel.img")
    assert "rel" not in sd.load()["lus"]


def test_logical_unit_with_memory_backend():
    mem = backends.MemoryBackend(4096)
    lu = LogicalUnit("m", {"size": 4096, "file": "/none",
                                   "readonly": False}, backend=mem)
    assert lu.healthy and lu.error is None
    lu.write(b"abc", 10, fua=True)
    assert mem.flushes == 1
    assert bytes(mem.data[10:13]) == b"abc"
    assert lu.extents(0, 4096) == [(0, 4096, False)]


def _user_session(t, source, name):
    """A session made the way a `session create` of an older clonectl
    could make it (the destination is not probed)."""
    return t.session_ops.create_session(t.lus[source], name,
                             [{"uri": "nbd+unix:///x?socket=/nonexistent",
                               "peer": None}], None, None)


def test_old_user_session_named_like_an_image_is_no_image(sd):
    inventory.create_lu(sd, "db1", size=MiB)
    t = Target(sd.path)
    try:
        t.lus["db1"].write(b"D" * MiB, 0)
        t.lus["a"].write(b"A" * MiB, 0)
        _user_session(t, "a", "protected-db1")
        t.session_mark("protected-db1")
        t.lus["a"].write(b"n" * 4096, 0)
    finally:
        t.close()
    t = Target(sd.path)
    try:
        assert t.image_status("db1")["protected"] is False
        with pytest.raises(errors.InvalidArgument, match="no protected"):
            t.image_rollback("db1")
        buf = bytearray(MiB)
        t.lus["db1"].read(buf, 0)
        assert buf == b"D" * MiB
        assert t.session_status("protected-db1")["marked"]
    finally:
        t.close()


def test_protected_image_of_an_older_state_dir_still_loads(sd):
    """Images recorded before they were flagged: the name and no
    destination (a user session always has one) say what they are."""
    t = Target(sd.path)
    try:
        t.lus["a"].write(b"A" * MiB, 0)
        assert t.image_protect("a")["export"] == "a@protected-a"
        t.lus["a"].write(b"n" * 4096, 0)
    finally:
        t.close()
    doc = sd.load()
    doc["lus"]["a"]["sessions"]["protected-a"].pop("image", None)
    sd.save(doc)
    t = Target(sd.path)
    try:
        st = t.image_status("a")
        assert st["protected"] and st["export"] == "a@protected-a"
        assert t.image_rollback("a")["extents_restored"] == 1
        buf = bytearray(MiB)
        t.lus["a"].read(buf, 0)
        assert buf == b"A" * MiB
        assert t.image_status("a")["protected"] is False
    finally:
        t.close()


def test_session_names_of_images_are_reserved(target):
    with pytest.raises(errors.InvalidArgument, match="reserved"):
        target.session_create("a", "protected-a", dests=["nbd://h/x"])
    with pytest.raises(errors.InvalidArgument, match="reserved"):
        target.session_create("a", "protected-other", dests=["nbd://h/x"])


def test_replication_hello_with_a_string_for_volumes(target):
    from target import replication
    with pytest.raises(replication.ReplicationError, match="volumes"):
        target.rsg_ops.accept_primary({"group": "g", "volumes": "a"}, "192.0.2.1")
    with pytest.raises(replication.ReplicationError, match="volumes"):
        target.rsg_ops.accept_primary({"group": "g", "volumes": [{"lu": ["a"]}]},
                               "192.0.2.1")
    assert target.rsg_list() == []
    assert not os.path.exists(os.path.join(target.rsg_ops.rsg_dir, "g.json"))


# ---------------------------------------------------------------- the iSCSI gateway's route

SECRET = "0123456789abcdef0123456789abcdef"


def _gw(name, secret=SECRET):
    return "iscsi-gateway:{}:{}".format(secret, name)


@pytest.fixture
def gw_target(sd):
    t = Target(sd.path, gateway_secret=SECRET)
    yield t
    t.close()


def _counts(t, name):
    lu = [e for e in t.status()["lus"] if e["name"] == name][0]
    return lu["connections"], lu["gateway_connections"]


def test_gateway_route_needs_this_starts_secret(gw_target, target):
    for t, names in ((gw_target, ["iscsi-gateway:a", _gw("a", "wrong"),
                                  _gw("a", SECRET[:-1]), "iscsi-gateway:",
                                  "iscsi-gateway:" + SECRET]),
                     (target, [_gw("a"), "iscsi-gateway:a"])):
        for name in names:
            with pytest.raises(errors.UnknownLU):
                t.connect(name, False)
        assert _counts(t, "a") == (0, 0)
    assert [n for n, _ in gw_target.exports()] == ["a", "ro"]


def test_gateway_connection_passes_the_host_checks_and_counts_apart(
        gw_target):
    conn = gw_target.connect(_gw("a"), False)
    ro = gw_target.connect(_gw("ro"), False)
    assert conn.gateway and not conn.readonly and ro.readonly
    with pytest.raises(errors.UnknownLU):
        gw_target.connect(_gw("nope"), False)
    assert _counts(gw_target, "a") == (0, 1)
    host = gw_target.connect("a", False)
    assert _counts(gw_target, "a") == (1, 1)
    assert gw_target.export_modes() == {"a": False, "ro": True}
    for c in (conn, ro, host):
        gw_target.disconnect(c)
    assert _counts(gw_target, "a") == (0, 0)
    assert _counts(gw_target, "ro") == (0, 0)


def test_clone_remove_waits_for_the_gateway_to_let_go(gw_target,
                                                      monkeypatch):
    fractured(gw_target, "a", "c")
    conn = gw_target.connect(_gw("c"), False)
    assert gw_target.clone_status("c")["gateway_connections"] == 1
    # A gateway that does not let go: refused, and nothing changed.
    monkeypatch.setattr(gateway_route, "GATEWAY_LET_GO_TIMEOUT", 0.2)
    with pytest.raises(gateway_route.GatewayHolds) as info:
        gw_target.clone_remove("c")
    assert info.value.errno == errno.EBUSY
    assert "the iSCSI gateway did not let go" in str(info.value)
    assert gw_target.export_modes() == {"a": False, "c": False, "ro": True}
    conn.export.write(b"still writable", 0)
    # A gateway that lets go once the export is withdrawn (as the manager
    # does when export_modes stops naming it): the removal goes on.
    monkeypatch.setattr(gateway_route, "GATEWAY_LET_GO_TIMEOUT", 20)
    seen = {}

    def gateway():
        deadline = time.monotonic() + 10
        while "c" in gw_target.export_modes():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        try:  # withdrawn: no new connection meanwhile
            gw_target.connect("c", False)
        except errors.UnknownLU:
            seen["host refused"] = True
        seen["clones"] = [c["name"] for c in gw_target.clone_list()]
        gw_target.disconnect(conn)

    thread = threading.Thread(target=gateway)
    thread.start()
    gw_target.clone_remove("c")
    thread.join()
    assert seen == {"host refused": True, "clones": ["c"]}
    assert gw_target.clone_list() == []
    assert gw_target.export_modes() == {"a": False, "ro": True}


def test_lu_delete_waits_for_the_gateway_to_let_go(gw_target, monkeypatch):
    """The gateway's mount of an LU outlived its deletion: an LU made
    under the same name within the manager's poll was never remounted,
    and the initiator went on reading the deleted LU and writing into
    its unlinked file.  Now a deletion withdraws the LU from the gateway
    and waits for its mount to end, as a clone's removal does."""
    gw_target.lus["a"].write(b"old tenant data!", 0)
    conn = gw_target.connect(_gw("a"), False)
    monkeypatch.setattr(gateway_route, "GATEWAY_LET_GO_TIMEOUT", 0.2)
    with pytest.raises(gateway_route.GatewayHolds):
        gw_target.lu_delete("a")
    assert "a" in gw_target.lus and "a" in gw_target.export_modes()
    monkeypatch.setattr(gateway_route, "GATEWAY_LET_GO_TIMEOUT", 20)

    def gateway():
        deadline = time.monotonic() + 10
        while "a" in gw_target.export_modes():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        gw_target.disconnect(conn)
    thread = threading.Thread(target=gateway)
    thread.start()
    gw_target.lu_delete("a")
    thread.join()
    assert "a" not in gw_target.lus
    gw_target.lu_create("a", size=MiB)
    assert gw_target.export_modes()["a"] is False
    fresh = gw_target.connect(_gw("a"), False)
    buf = bytearray(16)
    fresh.export.read(buf, 0)
    assert bytes(buf) == bytes(16)
    gw_target.disconnect(fresh)


def test_lu_delete_refused_for_a_host_withdraws_nothing(gw_target):
    gw = gw_target.connect(_gw("a"), False)
    host = gw_target.connect("a", False)
    with pytest.raises(errors.LUBusy):
        gw_target.lu_delete("a")
    assert "a" in gw_target.export_modes()
    gw_target.disconnect(host)
    gw_target.disconnect(gw)


def test_clone_remove_refused_for_a_host_withdraws_nothing(gw_target):
    fractured(gw_target, "a", "c")
    gw = gw_target.connect(_gw("c"), False)
    host = gw_target.connect("c", False)
    with pytest.raises(errors.Error) as info:
        gw_target.clone_remove("c")
    assert "1 connection(s)" in str(info.value)
    assert "c" in gw_target.export_modes()
    gw_target.disconnect(host)
    gw_target.disconnect(gw)
    gw_target.clone_remove("c")
    assert gw_target.clone_list() == []


@pytest.fixture
def full_state_dir(target, monkeypatch):
    """set(True) makes every save of state.json fail as on a full disk."""
    real = inventory.StateDir.save
    full = [False]

    def save(self, doc):
        if full[0]:
            raise errors.StateNotSaved(path=self.state_file,
                                       reason="No space left on device",
                                       errno=28)
        return real(self, doc)

    monkeypatch.setattr(inventory.StateDir, "save", save)
    return lambda on: full.__setitem__(0, on)


def test_clone_remove_not_saved_keeps_the_clone(target, sd, full_state_dir):
    target.clone_add("a", "c1")
    group = target.groups["a"]
    files = sorted(os.listdir(sd.maps_dir))
    full_state_dir(True)
    with pytest.raises(errors.StateNotSaved) as info:
        target.clone_remove("c1")
    full_state_dir(False)
    assert info.value.errno == 28
    assert "No space left on device" in str(info.value)
    assert "c1" in group.clones and target.groups["a"] is group
    assert "c1" in sd.load()["lus"]["a"]["clones"]
    assert sorted(os.listdir(sd.maps_dir)) == files
    # Still tracked: a Source write sets its bit.
    group.clones["c1"].delta[:] = bytes(len(group.clones["c1"].delta))
    target.lus["a"].write(b"x", 0)
    assert group.clones["c1"].delta[0] == 1
    target.clone_remove("c1")
    assert "a" not in target.groups
    assert "clones" not in sd.load()["lus"]["a"]


def test_session_delete_not_saved_keeps_the_session(target, sd,
                                                    full_state_dir):
    session = target.session_ops.create_session(
        target.lus["a"], "s1", [{"uri": "nbd://unused", "peer": None}],
        None, None)
    full_state_dir(True)
    with pytest.raises(errors.StateNotSaved):
        target.session_delete("s1")
    full_state_dir(False)
    assert target.sessions["s1"] is session and not session.closed
    assert "s1" in sd.load()["lus"]["a"]["sessions"]
    # Still tracking the Source's writes.
    target.lus["a"].write(b"x" * 4096, 0)
    assert session.tracking.bits[0] == 1
    target.session_delete("s1")
    assert "s1" not in target.sessions


def test_image_protect_not_saved_protects_nothing(target, sd,
                                                  full_state_dir):
    target.image_protect("a")   # creates the image's session, marks it
    target.session_unmark("protected-a", force=True)
    full_state_dir(True)
    with pytest.raises(errors.StateNotSaved):
        target.image_protect("a")
    full_state_dir(False)
    st = target.image_status("a")
    assert not st["protected"] and st["export"] is None
    assert "a@protected-a" not in dict(target.exports())
    assert not sd.load()["lus"]["a"]["sessions"]["protected-a"]["marked"]


def group_that_did_not_load(tmp_path):
    """A state directory (returned with the image file moved away) whose
    group g of db1 and db2 does not load at the next start: db2's disk is
    not there.  It has an LU "other" outside the group too."""
    d = str(tmp_path / "s")
    t = Target(d)
    for name in ("db1", "db2", "other"):
        t.lu_create(name, size="1M")
    t.rsg_create("g", ["db1", "db2"], "1M")
    t.prepare_stop()
    t.close()
    img = os.path.join(d, "lus", "db2.img")
    os.rename(img, img + ".away")
    return d, img


def test_volumes_of_a_group_that_did_not_load_are_not_served(tmp_path):
    """A replicated group that cannot be loaded (one volume's disk is not
    there yet) must not leave its other volumes writable with nothing
    logging the writes: they are held, not exported, with the reason,
    until the group loads or is deleted."""
    d, img = group_that_did_not_load(tmp_path)
    t = Target(d)
    try:
        assert "g" in t.rsg_ops.failures
        with pytest.raises(errors.Error) as e:
            t.connect("db1", False)
        assert "replicated group g" in str(e.value), e.value
        assert "db1" not in dict(t.exports())
        st = {lu["name"]: lu for lu in t.status()["lus"]}
        assert not st["db1"]["exported"]
        assert "replicated group g" in st["db1"]["error"]
        t.disconnect(t.connect("other", False))     # the rest is served
    finally:
        t.close()
    os.rename(img + ".away", img)
    t = Target(d)
    try:
        assert "g" in t.rsgs and "db1" in dict(t.exports())
    finally:
        t.close()


def test_a_group_that_did_not_load_holds_its_volumes_until_deleted(
        tmp_path, monkeypatch):
    """`rsg delete` of a group that failed to load lets its volumes be
    served only once its files are gone: if they stay (a removal that
    fails), the group loads at the next start unaware of what hosts wrote
    meanwhile."""
    d, img = group_that_did_not_load(tmp_path)
    t = Target(d)
    try:
        assert "g" in t.rsg_ops.failures

        def remove_fails(self):
            # The record goes first, then the removal fails.
            os.unlink(self.record)
            raise OSError(errno.EIO, "injected")
        monkeypatch.setattr(inventory.GroupFiles, "remove_all", remove_fails)
        with pytest.raises(OSError):
            t.rsg_delete("g")
        with pytest.raises(errors.Error) as e:
            t.connect("db1", False)
        assert "replicated group g" in str(e.value), e.value
        monkeypatch.undo()
        t.rsg_delete("g")
        t.disconnect(t.connect("db1", False))
    finally:
        t.close()


def test_user_session_commands_do_not_reach_protected_images(target):
    """A protected image (LU@protected-LU, a secondary's last consistent
    image during a replay) is the target's own: the session commands of
    users cannot unmark, delete or transfer it."""
    target.image_protect("a")
    ops = operations.bind(target)
    for op, args in (("session_unmark", {"force": True}),
                     ("session_delete", {"force": True}),
                     ("session_mark", {}), ("session_transfer", {}),
                     ("session_update", {})):
        with pytest.raises(errors.InvalidArgument, match="protected image"):
            ops[op](name="protected-a", **args)
    assert target.image_status("a")["protected"]


def test_gateway_connections_count_as_hosts_for_demote_and_rollback(
        gw_target, monkeypatch):
    """`lu rollback` refuses while hosts use the LU, and `rsg demote` waits
    for the iSCSI gateway to let go of its volumes (no write may land
    between the regions a demote reports and the guard): the gateway's
    connection is a host's too (an initiator writes through it)."""
    monkeypatch.setattr(gateway_route, "GATEWAY_LET_GO_TIMEOUT", 0.2)
    t = gw_target
    t.lu_create("b", size="1M")
    t.rsg_create("g", ["a"], "1M")
    t.image_protect("b")
    conns = [t.connect(_gw("a"), False), t.connect(_gw("b"), False)]
    try:
        with pytest.raises(gateway_route.GatewayHolds):
            t.rsg_demote("g")
        assert t.rsgs["g"].role == replication.PRIMARY
        assert "a" in t.export_modes()      # given back to the gateway
        with pytest.raises(RollbackRefused):
            t.image_rollback("b")
    finally:
        for conn in conns:
            t.disconnect(conn)
    t.image_rollback("b")
    t.rsg_demote("g")


def test_rsg_create_whose_record_cannot_be_saved_leaves_nothing(
        target, monkeypatch):
    """A group whose record cannot be saved (a full state directory) is
    not half made: no group, no replication layer on its volume, no files;
    the same create works once there is space."""
    real = replication.GroupFiles.save

    def full(files, record):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(replication.GroupFiles, "save", full)
    with pytest.raises(errors.Error) as e:
        target.rsg_create("g", ["a"], "1M")
    assert "No space left on device" in str(e.value)
    assert "g" not in target.rsgs and target.lus["a"].rsg is None
    assert target.lus["a"].stack.get("replication") is None
    assert not os.listdir(target.rsg_ops.rsg_dir)
    monkeypatch.setattr(replication.GroupFiles, "save", real)
    target.rsg_create("g", ["a"], "1M")
    assert target.rsgs["g"].role == replication.PRIMARY


def test_concurrent_clone_adds_make_one_group(target):
    """Two `clone add` for one Source at once (two control connections)
    end in one clone group holding both, as one after the other would."""
    for round_ in range(5):
        src = "s{}".format(round_)
        target.lu_create(src, size="1M")
        barrier = threading.Barrier(2)
        errs = []

        def add(name):
            barrier.wait()
            try:
                target.clone_add(src, name)
            except Exception as e:     # noqa: the test reports it
                errs.append(e)
        threads = [threading.Thread(target=add, args=(src + n,))
                   for n in ("x", "y")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errs == []
        group = target.groups[src]
        assert sorted(group.clones) == [src + "x", src + "y"]
        assert target.lus[src].stack.get("clones") is group
