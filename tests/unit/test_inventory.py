"""target.inventory: the LU inventory of a state directory."""

import json
import os
import stat

import pytest

from target import errors, inventory, storageid

MiB = 1 << 20


@pytest.fixture
def sd(tmp_path):
    return inventory.StateDir(str(tmp_path / "state"))


def _raw(sd):
    with open(sd.state_file, "rb") as f:
        return f.read()


def _files(directory):
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


# ---------------------------------------------------------------- load/save

def test_absent_state_is_empty_and_creates_nothing(sd):
    doc = sd.load()
    assert doc == {"format": "clonectl-state", "version": 1, "lus": {}}
    assert not os.path.exists(sd.path)


def test_create_owned_lu(sd):
    record = inventory.create_lu(sd, "db1", size="4M")
    path = os.path.join(sd.lus_dir, "db1.img")
    assert record["file"] == path
    assert record["size"] == 4 * MiB
    assert record["owned"] is True
    assert record["readonly"] is False
    st = os.stat(path)
    assert st.st_size == 4 * MiB
    assert st.st_blocks == 0, "a new LU file must be sparse"
    assert stat.S_IMODE(st.st_mode) == 0o600
    doc = json.loads(_raw(sd))
    assert doc["lus"]["db1"]["size"] == 4 * MiB
    assert doc["format"] == "clonectl-state" and doc["version"] == 1
    assert sd.load()["lus"]["db1"] == record
    # No temp files of the atomic update are left behind.
    assert [f for f in _files(sd.path) if f.endswith(".tmp")] == []


def test_create_read_only_lu(sd):
    record = inventory.create_lu(sd, "ro", size=MiB, readonly=True)
    assert record["readonly"] is True
    assert sd.load()["lus"]["ro"]["readonly"] is True


def test_create_requires_size_without_file(sd):
    with pytest.raises(errors.InvalidArgument, match="--size"):
        inventory.create_lu(sd, "a")
    assert _files(sd.lus_dir) == []
    assert not os.path.exists(sd.state_file)


def test_duplicate_name_changes_nothing(sd):
    inventory.create_lu(sd, "a", size=MiB)
    before = _raw(sd)
    with pytest.raises(errors.DuplicateLU, match="'a'.*already"):
        inventory.create_lu(sd, "a", size=2 * MiB)
    assert _raw(sd) == before
    assert os.path.getsize(os.path.join(sd.lus_dir, "a.img")) == MiB
    assert _files(sd.lus_dir) == ["a.img"]


@pytest.mark.parametrize("name", ["", "a/b", "x" * 65, "../x", ".a"])
def test_invalid_name_changes_nothing(sd, name):
    inventory.create_lu(sd, "keep", size=MiB)
    before = _raw(sd)
    with pytest.raises(errors.InvalidName):
        inventory.create_lu(sd, name, size=MiB)
    assert _raw(sd) == before
    assert _files(sd.lus_dir) == ["keep.img"]


@pytest.mark.parametrize("size", ["abc", "0", "1000", "-1G", "1.5"])
def test_invalid_size_changes_nothing(sd, size):
    inventory.create_lu(sd, "keep", size=MiB)
    before = _raw(sd)
    with pytest.raises(errors.InvalidSize):
        inventory.create_lu(sd, "new", size=size)
    assert _raw(sd) == before
    assert _files(sd.lus_dir) == ["keep.img"]


def test_missing_backing_file(sd, tmp_path):
    missing = tmp_path / "missing.img"
    with pytest.raises(errors.BackingMissing) as info:
        inventory.create_lu(sd, "a", file=str(missing))
    assert str(missing) in str(info.value)
    assert not missing.exists()
    assert sd.load()["lus"] == {}


def test_too_small_backing_file(sd, tmp_path):
    f = tmp_path / "small.img"
    f.write_bytes(b"x" * 4096)
    with pytest.raises(errors.BackingTooSmall) as info:
        inventory.create_lu(sd, "a", size="1M", file=str(f))
    assert "4096" in str(info.value) and str(MiB) in str(info.value)
    assert f.read_bytes() == b"x" * 4096
    assert sd.load()["lus"] == {}


def test_empty_backing_file_without_size(sd, tmp_path):
    f = tmp_path / "empty.img"
    f.write_bytes(b"")
    with pytest.raises(errors.BackingTooSmall):
        inventory.create_lu(sd, "a", file=str(f))
    assert sd.load()["lus"] == {}


def test_backing_smaller_than_a_sector_without_size(sd, tmp_path):
    f = tmp_path / "tiny.img"
    f.write_bytes(b"x" * 511)
    with pytest.raises(errors.BackingTooSmall):
        inventory.create_lu(sd, "a", file=str(f))


def test_backing_size_rounded_down_to_sectors(sd, tmp_path):
    f = tmp_path / "odd.img"
    f.write_bytes(b"x" * 1500)
    record = inventory.create_lu(sd, "a", file=str(f))
    assert record["size"] == 1024
    assert record["owned"] is False
    assert f.read_bytes() == b"x" * 1500, "an existing file is never changed"


def test_directory_as_backing_is_unusable(sd, tmp_path):
    d = tmp_path / "adir"
    d.mkdir()
    with pytest.raises(errors.BackingUnusable) as info:
        inventory.create_lu(sd, "a", size="1M", file=str(d))
    assert str(d) in str(info.value)
    assert "not a regular file or block device" in str(info.value)
    assert sd.load()["lus"] == {}


def test_unwritable_backing_file_for_read_write_lu(sd, tmp_path):
    # We are root in CI, so permissions do not stop us; a FIFO does.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(errors.BackingUnusable):
        inventory.create_lu(sd, "a", size="1M", file=str(fifo))


def test_backing_file_used_twice(sd, tmp_path):
    f = tmp_path / "shared.img"
    f.write_bytes(bytes(MiB))
    inventory.create_lu(sd, "a", file=str(f))
    before = _raw(sd)
    with pytest.raises(errors.BackingInUse, match="'a'"):
        inventory.create_lu(sd, "b", file=str(tmp_path / "." / "shared.img"))
    assert _raw(sd) == before


def test_leftover_owned_file_is_not_overwritten(sd):
    sd.ensure()
    leftover = os.path.join(sd.lus_dir, "a.img")
    with open(leftover, "wb") as f:
        f.write(b"precious")
    with pytest.raises(errors.BackingUnusable, match="left untouched"):
        inventory.create_lu(sd, "a", size=MiB)
    with open(leftover, "rb") as f:
        assert f.read() == b"precious"
    assert sd.load()["lus"] == {}


# ---------------------------------------------------------------- delete

def test_delete_owned_lu_removes_file(sd):
    inventory.create_lu(sd, "a", size=MiB)
    inventory.create_lu(sd, "b", size=MiB)
    path = os.path.join(sd.lus_dir, "a.img")
    record = inventory.delete_lu(sd, "a")
    assert record["file"] == path
    assert not os.path.exists(path)
    assert list(sd.load()["lus"]) == ["b"]
    assert _files(sd.lus_dir) == ["b.img"]


def test_delete_keeps_file_given_with_file(sd, tmp_path):
    f = tmp_path / "mine.img"
    data = os.urandom(MiB)
    f.write_bytes(data)
    inventory.create_lu(sd, "a", file=str(f))
    inventory.delete_lu(sd, "a")
    assert f.read_bytes() == data
    assert sd.load()["lus"] == {}


def test_delete_unknown_lu(sd):
    inventory.create_lu(sd, "a", size=MiB)
    before = _raw(sd)
    with pytest.raises(errors.UnknownLU, match="'nope'"):
        inventory.delete_lu(sd, "nope")
    assert _raw(sd) == before


def test_delete_refused_by_check_busy(sd):
    inventory.create_lu(sd, "a", size=MiB)
    before = _raw(sd)

    def busy(name, record):
        assert name == "a" and record["size"] == MiB
        raise errors.LUBusy(name=name, reason="served")

    with pytest.raises(errors.LUBusy):
        inventory.delete_lu(sd, "a", check_busy=busy)
    assert _raw(sd) == before
    assert os.path.exists(os.path.join(sd.lus_dir, "a.img"))


def test_delete_owned_lu_whose_file_vanished(sd):
    inventory.create_lu(sd, "a", size=MiB)
    os.unlink(os.path.join(sd.lus_dir, "a.img"))
    inventory.delete_lu(sd, "a")
    assert sd.load()["lus"] == {}


# ---------------------------------------------------------------- corruption

CORRUPT_DOCUMENTS = [
    b"",
    b"{",
    b"\x00\xff\xfe garbage",
    b"[]",
    b"null",
    json.dumps({"format": "something-else", "version": 1, "lus": {}}).encode(),
    json.dumps({"format": "clonectl-state", "version": 1, "lus": []}).encode(),
    json.dumps({"format": "clonectl-state", "version": 1,
                "lus": {"a/b": {"size": 512, "file": "/x", "readonly": False,
                                "owned": False}}}).encode(),
    json.dumps({"format": "clonectl-state", "version": 1,
                "lus": {"a": {"size": "512", "file": "/x", "readonly": False,
                              "owned": False}}}).encode(),
    json.dumps({"format": "clonectl-state", "version": 1,
                "lus": {"a": {"size": True, "file": "/x", "readonly": False,
                              "owned": False}}}).encode(),
    json.dumps({"format": "clonectl-state", "version": 1,
                "lus": {"a": {"size": 512, "file": "", "readonly": False,
                              "owned": False}}}).encode(),
    json.dumps({"format": "clonectl-state", "version": 1,
                "lus": {"a": {"size": 512, "file": "/x", "readonly": "no",
                              "owned": False}}}).encode(),
    json.dumps({"format": "clonectl-state", "version": 1,
                "lus": {"a": 5}}).encode(),
]


@pytest.mark.parametrize("raw", CORRUPT_DOCUMENTS)
def test_corrupt_state_is_reported_and_left_untouched(sd, raw):
    inventory.create_lu(sd, "a", size=MiB)
    with open(sd.state_file, "wb") as f:
        f.write(raw)
    files_before = _files(sd.path)
    for action in (sd.load,
                   lambda: inventory.create_lu(sd, "b", size=MiB),
                   lambda: inventory.delete_lu(sd, "a")):
        with pytest.raises(errors.CorruptState) as info:
            action()
        assert sd.state_file in str(info.value)
        assert info.value.kwargs["path"] == sd.state_file
        assert _raw(sd) == raw, "a corrupt state file must never be rewritten"
    assert _files(sd.path) == files_before
    assert _files(sd.lus_dir) == ["a.img"], "no LU file made or removed"


def test_the_format_knows_every_clone_state(sd):
    """state.json's clone states are the clone engine's: a state the engine
    saves is never refused at the next load, and no other is accepted."""
    from target import clones
    assert set(inventory.CLONE_STATES) == set(clones.STATES)
    inventory.create_lu(sd, "a", size=MiB)
    doc = sd.load()
    doc["lus"]["a"]["granularity"] = 65536
    for clone_state in clones.STATES:
        doc["lus"]["a"]["clones"] = {"c": {"file": "/x", "owned": False,
                                           "state": clone_state}}
        sd.save(doc)
        assert sd.load()["lus"]["a"]["clones"]["c"]["state"] == clone_state
    doc["lus"]["a"]["clones"]["c"]["state"] = "bogus"
    with pytest.raises(errors.CorruptState):
        sd.save(doc)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_unsupported_version(sd, version):
    raw = json.dumps({"format": "clonectl-state", "version": version,
                      "lus": {}}).encode()
    sd.ensure()
    with open(sd.state_file, "wb") as f:
        f.write(raw)
    with pytest.raises(errors.UnsupportedState) as info:
        sd.load()
    assert sd.state_file in str(info.value)
    with pytest.raises(errors.UnsupportedState):
        inventory.create_lu(sd, "a", size=MiB)
    assert _raw(sd) == raw
    assert _files(sd.lus_dir) == []


def test_save_refuses_invalid_document(sd):
    inventory.create_lu(sd, "a", size=MiB)
    before = _raw(sd)
    doc = sd.load()
    doc["lus"]["a"]["size"] = -1
    with pytest.raises(errors.CorruptState):
        sd.save(doc)
    assert _raw(sd) == before


# ---------------------------------------------------------------- probe

def test_probe_backing_regular_file(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(bytes(8192))
    assert inventory.probe_backing(str(f))[0] == 8192
    assert inventory.probe_backing(str(f), 8192)[0] == 8192
    with pytest.raises(errors.BackingTooSmall):
        inventory.probe_backing(str(f), 8193)


def test_probe_backing_read_only_file(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(bytes(1024))
    f.chmod(0o400)
    assert inventory.probe_backing(str(f), readonly=True)[0] == 1024


def test_probe_backing_character_device():
    with pytest.raises(errors.BackingUnusable):
        inventory.probe_backing("/dev/null")


# ---------------------------------------------------------------- storage


def test_a_file_given_with_file_is_recorded_with_its_storage(sd, tmp_path):
    f = tmp_path / "disk.img"
    f.write_bytes(bytes(MiB))
    record = inventory.create_lu(sd, "ext", file=str(f))
    with open(f, "rb") as fh:
        assert record["storage"] == storageid.of_fd(fh.fileno())
    assert sd.load()["lus"]["ext"]["storage"] == record["storage"]
    assert "storage" not in inventory.create_lu(sd, "own", size="1M")


def test_the_storage_recorded_for_another_lu_is_not_taken_again(sd,
                                                                tmp_path):
    """LU a's path names other storage now (a symlink retargeted, a
    device renamed): a new LU on a's recorded storage is refused, as on
    a's path."""
    disk, spare = tmp_path / "disk.img", tmp_path / "spare.img"
    disk.write_bytes(bytes(MiB))
    spare.write_bytes(bytes(MiB))
    os.symlink(disk, tmp_path / "a-link")
    inventory.create_lu(sd, "a", file=str(tmp_path / "a-link"))
    os.unlink(tmp_path / "a-link")
    os.symlink(spare, tmp_path / "a-link")
    with pytest.raises(errors.BackingInUse, match="'a'"):
        inventory.create_lu(sd, "b", file=str(disk))
    assert set(sd.load()["lus"]) == {"a"}


def test_check_storage_refuses_only_a_recorded_other_identity():
    rec = {"file": "/dev/sdb", "owned": False, "storage": "wwid:one"}
    inventory.check_storage(rec, "wwid:one", "LU a", "lu accept-storage a")
    with pytest.raises(errors.StorageChanged) as e:
        inventory.check_storage(rec, "wwid:two", "LU a",
                                "lu accept-storage a")
    assert "/dev/sdb" in str(e.value) and "wwid:two" in str(e.value) and \
        "wwid:one" in str(e.value) and "lu accept-storage a" in str(e.value)
    with pytest.raises(errors.StorageChanged, match="without an identity"):
        inventory.check_storage(rec, None, "LU a", "lu accept-storage a")
    for unchecked in ({"file": "/x", "owned": False},
                      {"file": "/x", "owned": False, "storage": None},
                      {"file": "/x", "owned": True, "storage": "wwid:one"}):
        inventory.check_storage(unchecked, "wwid:two", "LU a", "c")


def test_a_start_lists_the_state_directory_once(sd, tmp_path, monkeypatch):
    """Every LU and clone opened by a start is checked against the state
    directory's files: listed once, not walked for each of them."""
    inventory.create_lu(sd, "own", size="1M")
    os.link(os.path.join(sd.lus_dir, "own.img"), tmp_path / "hard.img")
    outside = []
    for i in range(20):
        p = tmp_path / "ext{}.img".format(i)
        p.write_bytes(bytes(4096))
        outside.append(str(p))
    walks = []
    real_walk = os.walk
    monkeypatch.setattr(inventory.os, "walk",
                        lambda *a, **k: walks.append(a) or real_walk(*a, **k))
    with sd.listed():
        for p in outside:
            inventory.check_outside(sd, p)
        with pytest.raises(errors.BackingUnusable, match="lus/own.img"):
            inventory.check_outside(sd, str(tmp_path / "hard.img"))
    assert len(walks) == 1, walks
    with pytest.raises(errors.BackingUnusable, match="lus/own.img"):
        inventory.check_outside(sd, str(tmp_path / "hard.img"))
    assert len(walks) == 2, "outside listed() each call lists anew"


def test_a_resize_that_writes_nothing_opens_nothing_for_writing(
        tmp_path, monkeypatch):
    """A read-only LU over the first MiB of a longer file that cannot be
    written (immutable, on a read-only mount) grows over the file's own
    bytes when told to keep them: nothing is written, so nothing is
    opened for writing."""
    f = tmp_path / "ro.img"
    f.write_bytes(b"\1" * (4 << 20))
    sd = inventory.StateDir(str(tmp_path / "state"))
    inventory.create_lu(sd, "ro", size=1 << 20, file=str(f), readonly=True)
    real_open = os.open

    def no_writes(path, flags, *args, **kwargs):
        if os.fspath(path) == str(f) and flags & (os.O_RDWR | os.O_WRONLY):
            raise PermissionError(1, "Operation not permitted", str(f))
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", no_writes)
    _, new = inventory.resize_lu(sd, "ro", "2M", file_data="keep")
    assert new["size"] == 2 << 20
