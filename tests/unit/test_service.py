"""target.service: the Target and its LUs, in-process (no nbdkit)."""

import os

import pytest

from target import backends, errors, service, state

MiB = 1 << 20


@pytest.fixture
def sd(tmp_path):
    d = state.StateDir(str(tmp_path / "state"))
    state.create_lu(d, "a", size=MiB)
    state.create_lu(d, "ro", size=MiB, readonly=True)
    return d


@pytest.fixture
def target(sd):
    t = service.Target(sd.path)
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
    conn.lu.write(b"hello", 1)
    conn.lu.flush()
    buf = bytearray(7)
    conn.lu.read(buf, 0)
    assert bytes(buf) == b"\0hello\0"
    with open(os.path.join(sd.lus_dir, "a.img"), "rb") as f:
        assert f.read(7) == b"\0hello\0"
    conn.lu.zero(2, 2, fua=True)
    conn.lu.read(buf, 0)
    assert bytes(buf) == b"\0h\0\0lo\0"
    target.disconnect(conn)


def test_lu_refuses_out_of_range_and_read_only(target):
    conn = target.connect("a", False)
    with pytest.raises(errors.OutOfRange) as info:
        conn.lu.write(b"xx", MiB - 1)
    assert info.value.errno == 22
    with pytest.raises(errors.OutOfRange):
        conn.lu.zero(MiB, 1)
    with pytest.raises(errors.OutOfRange):
        conn.lu.trim(-1, 10)
    ro = target.connect("ro", True)
    for action in (lambda: ro.lu.write(b"x", 0),
                   lambda: ro.lu.zero(0, 512),
                   lambda: ro.lu.trim(0, 512)):
        with pytest.raises(errors.ReadOnly) as info:
            action()
        assert info.value.errno == 1
    target.disconnect(conn)
    target.disconnect(ro)


def test_reload_adds_and_retires(target, sd):
    conn = target.connect("a", False)
    state.create_lu(sd, "b", size=MiB)
    state.delete_lu(sd, "ro")
    assert target.reload() == ["a", "b"]
    assert [n for n, _ in target.exports()] == ["a", "b"]
    with pytest.raises(errors.UnknownLU):
        target.connect("ro", False)
    target.disconnect(conn)


def test_retired_lu_stays_usable_until_last_connection(target, sd, tmp_path):
    f = tmp_path / "ext.img"
    f.write_bytes(bytes(MiB))
    state.create_lu(sd, "ext", file=str(f))
    target.reload()
    conn = target.connect("ext", False)
    state.delete_lu(sd, "ext")
    target.reload()
    # The open connection keeps working on the retired LU...
    conn.lu.write(b"late", 0)
    assert f.read_bytes()[:4] == b"late"
    target.disconnect(conn)
    # ...and its backend is closed after the last one ends.
    assert conn.lu.backend.fd == -1


def test_unusable_backing_is_reported_not_exported(sd, tmp_path):
    f = tmp_path / "vanishing.img"
    f.write_bytes(bytes(MiB))
    state.create_lu(sd, "gone", file=str(f))
    f.unlink()
    t = service.Target(sd.path)
    try:
        st = {lu["name"]: lu for lu in t.status()["lus"]}
        assert st["gone"]["exported"] is False
        assert str(f) in st["gone"]["error"]
        assert st["a"]["exported"] is True
        assert "gone" not in [n for n, _ in t.exports()]
        with pytest.raises(errors.UnknownLU):
            t.connect("gone", False)
        # The file comes back: a reload exports it.
        f.write_bytes(bytes(MiB))
        assert "gone" in t.reload()
    finally:
        t.close()


def test_control_operations(target):
    ops = target.control_operations()
    assert ops["ping"]() == {"pid": os.getpid()}
    assert ops["status"]()["lus"][0]["name"] == "a"
    assert ops["reload"]() == {"exports": ["a", "ro"]}


def test_logical_unit_with_memory_backend():
    mem = backends.MemoryBackend(4096)
    lu = service.LogicalUnit("m", {"size": 4096, "file": "/none",
                                   "readonly": False}, backend=mem)
    assert lu.healthy and lu.error is None
    lu.write(b"abc", 10, fua=True)
    assert mem.flushes == 1
    assert bytes(mem.data[10:13]) == b"abc"
    assert lu.extents(0, 4096) == [(0, 4096, False)]


@pytest.fixture
def full_state_dir(target, monkeypatch):
    """set(True) makes every save of state.json fail as on a full disk."""
    real = state.StateDir.save
    full = [False]

    def save(self, doc):
        if full[0]:
            raise errors.StateNotSaved(path=self.state_file,
                                       reason="No space left on device",
                                       errno=28)
        return real(self, doc)

    monkeypatch.setattr(state.StateDir, "save", save)
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
    session = target._create_session(
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
    target.image_protect("a")   # creates the session, marks it
    target.image_release("a")
    target._create_session(target.lus["a"], "protected-a", [], None, None)
    full_state_dir(True)
    with pytest.raises(errors.StateNotSaved):
        target.image_protect("a")
    full_state_dir(False)
    st = target.image_status("a")
    assert not st["protected"] and st["export"] is None
    assert "a@protected-a" not in dict(target.exports())
    assert not sd.load()["lus"]["a"]["sessions"]["protected-a"]["marked"]
