"""What a recorded --file path names at the next start.

`lu create --file PATH` and `clone add SOURCE NAME --file PATH` record
PATH and the identity of the storage it names (target.storageid); every
start (and reload) opens whatever PATH names then.  Device names move
between boots (sdb/sdc swap, loop devices attached in another order, a
symlink retargeted).  The target never serves two objects of one target
from the same storage (the LUs' files are opened first, then the
clones'), nor one of the state directory's own files, nor storage other
than the recorded one, until an admin accepts it (`accept-storage`).

Loop devices stand for disks: each test attaches its own, and detaches
every device it attached at teardown, whatever it holds by then.
"""

import json
import os
import subprocess

import pytest

from target import storageid
from tests.support.cli import MiB, status_json

pytestmark = pytest.mark.usefixtures("process_guard")

SIZE = 16 * MiB
CHUNK = 65536
A_BYTE, B_BYTE, HOST_BYTE = 0xAA, 0xBB, 0x11


def _image(path, byte):
    """A SIZE-byte file whose first CHUNK bytes are byte."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.write(bytes([byte]) * CHUNK)
        f.flush()
        os.fsync(f.fileno())
    return str(path)


def _two_disks(tmp_path, loops, a_byte=A_BYTE):
    """Images A (a_byte) and B (B_BYTE) and a loop device over each."""
    file_a = _image(tmp_path / "A.img", a_byte)
    file_b = _image(tmp_path / "B.img", B_BYTE)
    return file_a, file_b, loops.attach(file_a), loops.attach(file_b)


def _head(path, length=CHUNK):
    with open(path, "rb") as f:
        return f.read(length)


class Loops:
    """Loop devices this test attached (detached at teardown)."""

    def __init__(self):
        self.attached = set()

    def attach(self, backing, dev=None):
        cmd = ["losetup"] + (["--show", dev, backing] if dev
                             else ["--find", "--show", backing])
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=30)
        if proc.returncode != 0:
            if dev is None:
                pytest.skip("no loop device: " + proc.stderr.strip())
            pytest.fail("cannot re-attach {} to {}: {}".format(
                backing, dev, proc.stderr.strip()))
        dev = proc.stdout.strip() or dev
        self.attached.add(dev)
        return dev

    def detach(self, dev):
        subprocess.run(["losetup", "--detach", dev], check=True, timeout=30)
        self.attached.discard(dev)

    def swap(self, dev_a, file_a, dev_b, file_b):
        """Boot in another order: dev_a now over file_b and vice versa."""
        self.detach(dev_a)
        self.detach(dev_b)
        self.attach(file_b, dev_a)
        self.attach(file_a, dev_b)


@pytest.fixture
def loops():
    made = Loops()
    yield made
    for dev in sorted(made.attached):
        subprocess.run(["losetup", "--detach", dev], timeout=30)


def _lu(state_dir, name):
    (lu,) = [x for x in status_json(state_dir)["lus"] if x["name"] == name]
    return lu


def _clone(state_dir, name):
    (c,) = [x for x in status_json(state_dir)["clones"] if x["name"] == name]
    return c


def _refused(entry, what):
    return "{} {}: served={}, error={!r}".format(
        what, entry["name"], entry["served"], entry.get("error"))


def _loop_id(backing):
    """What a loop device over file backing is recorded as."""
    fd = os.open(backing, os.O_RDONLY)
    try:
        return "loop:{}@0".format(storageid.of_fd(fd))
    finally:
        os.close(fd)


def _record(state_dir):
    with open(os.path.join(state_dir, "state.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------- question 1


def test_swapped_devices_are_not_served_as_each_other(
        tmp_path, loops, clonectl, server_factory, nbd_connect, state_dir):
    file_a, file_b, dev_a, dev_b = _two_disks(tmp_path, loops)
    clonectl("lu", "create", "x", "--file", dev_a)
    clonectl("lu", "create", "y", "--file", dev_b)
    srv = server_factory()
    assert nbd_connect(srv.socket, "x").pread(CHUNK, 0) == \
        bytes([A_BYTE]) * CHUNK
    srv.stop()
    loops.swap(dev_a, file_a, dev_b, file_b)     # the next boot
    srv = server_factory()
    x, y = _lu(state_dir, "x"), _lu(state_dir, "y")
    seen = None
    if x["served"]:
        seen = nbd_connect(srv.socket, "x").pread(CHUNK, 0)[:1]
    assert not x["served"] and not y["served"], \
        "{}; {}; x now reads {!r}, y's data (x was created over {})".format(
            _refused(x, "LU"), _refused(y, "LU"), seen, file_a)
    assert dev_a in x["error"] and _loop_id(file_b) in x["error"] and \
        _loop_id(file_a) in x["error"], x["error"]


def test_a_clone_whose_device_moved_onto_another_lu_is_not_mirrored_to(
        tmp_path, loops, clonectl, server_factory, nbd_connect, state_dir):
    """Clone c (synchronized, so mirrored) on dev_a; LU y on dev_b.
    After the swap c's path names y's storage: the Source's writes must
    not land there."""
    file_a, file_b, dev_a, dev_b = _two_disks(tmp_path, loops, 0)
    clonectl("lu", "create", "src", "--size", "16M")
    srv = server_factory()
    clonectl("clone", "add", "src", "c", "--file", dev_a)
    clonectl("clone", "sync", "c", "--wait")
    clonectl("lu", "create", "y", "--file", dev_b)
    assert _clone(state_dir, "c")["state"] == "synchronized"
    srv.stop()
    loops.swap(dev_a, file_a, dev_b, file_b)
    srv = server_factory()
    c = _clone(state_dir, "c")
    h = nbd_connect(srv.socket, "src")
    h.pwrite(bytes([HOST_BYTE]) * CHUNK, 0)
    h.flush()
    y_storage = _head(file_b)[:1]
    assert c["broken"] and y_storage == bytes([B_BYTE]), \
        "clone c loaded as {} (broken={}, error={!r}); the Source's write " \
        "was mirrored onto LU y's storage {} (now {!r})".format(
            c["state"], c["broken"], c["error"], file_b, y_storage)


@pytest.mark.parametrize("kind", ["file", "blockdev"])
def test_two_lus_retargeted_onto_one_storage_are_refused_at_load(
        kind, tmp_path, loops, clonectl, server_factory, nbd_connect,
        state_dir):
    """x and y by symlinks (as /dev/disk/by-* or an admin's own names);
    y's link retargeted onto x's storage while stopped.  The in-process
    lock registry counts y's opening as a second opening of x's file,
    and a block device's O_EXCL claim is already ours: nothing refuses."""
    file_a = _image(tmp_path / "A.img", A_BYTE)
    file_b = _image(tmp_path / "B.img", B_BYTE)
    if kind == "blockdev":
        file_a, file_b = loops.attach(file_a), loops.attach(file_b)
    links = tmp_path / "links"
    links.mkdir()
    os.symlink(file_a, links / "x")
    os.symlink(file_b, links / "y")
    clonectl("lu", "create", "x", "--file", links / "x")
    clonectl("lu", "create", "y", "--file", links / "y")
    os.unlink(links / "y")
    os.symlink(file_a, links / "y")              # retargeted
    srv = server_factory()
    x, y = _lu(state_dir, "x"), _lu(state_dir, "y")
    if x["served"] and y["served"]:
        nbd_connect(srv.socket, "y").pwrite(bytes([HOST_BYTE]) * CHUNK, 0)
    both = x["served"] and y["served"]
    seen = nbd_connect(srv.socket, "x").pread(1, 0) if both else None
    assert not both, \
        "x and y are both served from {}; a write to y reads back in x " \
        "as {!r}".format(file_a, seen)
    refused = y if not y["served"] else x
    assert "x" in refused["error"] and "y" in refused["error"], refused


def test_a_clone_retargeted_onto_its_own_source_is_refused_at_load(
        tmp_path, clonectl, server_factory, state_dir):
    file_s = _image(tmp_path / "S.img", A_BYTE)
    file_c = _image(tmp_path / "C.img", 0)
    os.symlink(file_c, tmp_path / "c-link")
    clonectl("lu", "create", "src", "--file", file_s)
    clonectl("clone", "add", "src", "c", "--file", tmp_path / "c-link")
    os.unlink(tmp_path / "c-link")
    os.symlink(file_s, tmp_path / "c-link")
    server_factory()
    c = _clone(state_dir, "c")
    assert c["broken"], \
        "clone c is loaded ({}) on its own Source's file {}".format(
            c["state"], file_s)


def test_a_path_now_naming_a_state_directory_file_is_refused_at_load(
        tmp_path, clonectl, server_factory, nbd_connect, state_dir):
    """check_outside refuses it at create; at load nothing does."""
    file_a = _image(tmp_path / "A.img", A_BYTE)
    os.symlink(file_a, tmp_path / "x-link")
    clonectl("lu", "create", "owned", "--size", "16M")
    clonectl("lu", "create", "x", "--file", tmp_path / "x-link")
    own = os.path.join(state_dir, "lus", "owned.img")
    os.unlink(tmp_path / "x-link")
    os.symlink(own, tmp_path / "x-link")
    srv = server_factory()
    x = _lu(state_dir, "x")
    if x["served"]:
        h = nbd_connect(srv.socket, "x")
        h.pwrite(bytes([HOST_BYTE]) * CHUNK, 0)
        h.flush()
    assert not x["served"], \
        "x is served from the state directory's {} (now {!r})".format(
            own, _head(own)[:1])


# ---------------------------------------------------------------- accepting


def test_an_lu_refused_after_a_swap_is_served_once_its_storage_is_accepted(
        tmp_path, loops, clonectl, server_factory, nbd_connect, state_dir):
    file_a, file_b, dev_a, dev_b = _two_disks(tmp_path, loops)
    clonectl("lu", "create", "x", "--file", dev_a)
    assert _record(state_dir)["lus"]["x"]["storage"] == _loop_id(file_a)
    loops.detach(dev_b)
    loops.detach(dev_a)
    loops.attach(file_b, dev_a)     # the disk x was on is gone; B is there
    srv = server_factory()
    x = _lu(state_dir, "x")
    assert not x["served"] and "lu accept-storage x" in x["error"], x
    out = json.loads(clonectl("lu", "accept-storage", "x", "--json").stdout)
    assert out == {"name": "x", "file": dev_a,
                   "storage": _loop_id(file_b), "error": None}
    assert _record(state_dir)["lus"]["x"]["storage"] == _loop_id(file_b)
    x = _lu(state_dir, "x")
    assert x["served"] and x["storage"] == _loop_id(file_b), x
    assert nbd_connect(srv.socket, "x").pread(CHUNK, 0) == \
        bytes([B_BYTE]) * CHUNK


def test_a_loop_device_whose_file_was_renamed_is_the_same_storage(
        tmp_path, loops, clonectl, server_factory, nbd_connect, state_dir):
    file_a = _image(tmp_path / "A.img", A_BYTE)
    dev_a = loops.attach(file_a)
    clonectl("lu", "create", "x", "--file", dev_a)
    os.rename(file_a, tmp_path / "renamed.img")
    srv = server_factory()
    x = _lu(state_dir, "x")
    assert x["served"], x
    assert nbd_connect(srv.socket, "x").pread(1, 0) == bytes([A_BYTE])


def test_a_record_made_before_identities_gets_one_at_its_first_start(
        tmp_path, loops, clonectl, server_factory, state_dir):
    """An inventory of an older clonectl has no identities: the first
    start records what the paths name then, and later starts check."""
    file_a, file_b, dev_a, dev_b = _two_disks(tmp_path, loops)
    clonectl("lu", "create", "x", "--file", dev_a)
    clonectl("lu", "create", "src", "--size", "16M")
    clonectl("clone", "add", "src", "c", "--file", dev_b)
    doc = _record(state_dir)
    del doc["lus"]["x"]["storage"]
    del doc["lus"]["src"]["clones"]["c"]["storage"]
    with open(os.path.join(state_dir, "state.json"), "w") as f:
        json.dump(doc, f)
    srv = server_factory()
    assert _lu(state_dir, "x")["storage"] == _loop_id(file_a)
    assert _clone(state_dir, "c")["storage"] == _loop_id(file_b)
    srv.stop()
    doc = _record(state_dir)
    assert doc["lus"]["x"]["storage"] == _loop_id(file_a)
    assert doc["lus"]["src"]["clones"]["c"]["storage"] == _loop_id(file_b)
    assert "storage" not in doc["lus"]["src"], "its own file: not recorded"
    loops.swap(dev_a, file_a, dev_b, file_b)
    server_factory()
    assert not _lu(state_dir, "x")["served"]
    assert _clone(state_dir, "c")["broken"]


def test_a_file_replaced_under_its_path_is_neither_served_nor_grown(
        tmp_path, clonectl, server_factory, state_dir):
    """A regular file restored from a backup, or a symlink pointed at
    another file: the same path, other storage."""
    file_a = _image(tmp_path / "A.img", A_BYTE)
    other = _image(tmp_path / "other.img", B_BYTE)
    os.symlink(file_a, tmp_path / "x-link")
    clonectl("lu", "create", "x", "--file", tmp_path / "x-link")
    os.unlink(tmp_path / "x-link")
    os.symlink(other, tmp_path / "x-link")
    server_factory()
    x = _lu(state_dir, "x")
    assert not x["served"] and "other storage" in x["error"], x
    proc = clonectl("lu", "resize", "x", "--size", "32M", check=False)
    assert proc.returncode == 1 and "other storage" in proc.stderr, \
        proc.stderr
    assert os.path.getsize(other) == SIZE, "the other file was grown"
    assert _record(state_dir)["lus"]["x"]["size"] == SIZE


def test_refused_accepts(tmp_path, clonectl, server_factory, state_dir):
    """The path must still pass the checks of a new --file; LU and clone
    names are not mixed up; a file of the state directory is only
    opened again."""
    file_a = _image(tmp_path / "A.img", A_BYTE)
    os.symlink(file_a, tmp_path / "c-link")
    clonectl("lu", "create", "own", "--size", "16M")
    clonectl("lu", "create", "x", "--file", file_a)
    clonectl("lu", "create", "src", "--size", "16M")
    clonectl("clone", "add", "src", "c", "--file",
             _image(tmp_path / "C.img", 0))
    server_factory()

    def refused(*args):
        proc = clonectl(*args, "--json", check=False)
        assert proc.returncode == 1, proc.stdout
        return json.loads(proc.stdout)["error"]

    own = json.loads(clonectl("lu", "accept-storage", "own", "--json").stdout)
    assert own["storage"] is None and own["error"] is None, own
    assert "storage" not in _record(state_dir)["lus"]["own"]
    assert refused("lu", "accept-storage", "c")["type"] == "UnknownLU"
    assert refused("clone", "accept-storage", "x")["type"] == "UnknownClone"
    before = _record(state_dir)
    doc = _record(state_dir)
    doc["lus"]["src"]["clones"]["c"]["file"] = str(tmp_path / "c-link")
    with open(os.path.join(state_dir, "state.json"), "w") as f:
        json.dump(doc, f)
    err = refused("clone", "accept-storage", "c")
    assert err["type"] == "BackingInUse" and "'x'" in err["message"], err
    doc["lus"]["src"]["clones"]["c"] = before["lus"]["src"]["clones"]["c"]
    with open(os.path.join(state_dir, "state.json"), "w") as f:
        json.dump(doc, f)
    assert clonectl("clone", "accept-storage", "c").returncode == 0


def test_storage_other_than_the_one_served_is_not_accepted(
        tmp_path, clonectl, server_factory, nbd_connect, state_dir):
    """Retargeted while served: accepting would serve the other file from
    the next start on, without what hosts write until then."""
    file_a = _image(tmp_path / "A.img", A_BYTE)
    os.symlink(file_a, tmp_path / "x-link")
    clonectl("lu", "create", "x", "--file", tmp_path / "x-link")
    clonectl("lu", "create", "src", "--size", "16M")
    os.symlink(_image(tmp_path / "C.img", 0), tmp_path / "c-link")
    clonectl("clone", "add", "src", "c", "--file", tmp_path / "c-link")
    srv = server_factory()
    before = _record(state_dir)
    for link in ("x-link", "c-link"):
        os.unlink(tmp_path / link)
        os.symlink(_image(tmp_path / (link + ".other"), B_BYTE),
                   tmp_path / link)
    for kind, name in (("lu", "x"), ("clone", "c")):
        proc = clonectl(kind, "accept-storage", name, "--json", check=False)
        err = json.loads(proc.stdout)["error"]
        assert proc.returncode == 1 and err["type"] == "StorageServed", err
    assert _record(state_dir) == before
    assert nbd_connect(srv.socket, "x").pread(1, 0) == bytes([A_BYTE])


def test_a_broken_clone_is_repaired_by_accepting_its_storage(
        tmp_path, clonectl, server_factory, nbd_connect, state_dir):
    """c's file restored from a backup while stopped: c is broken at the
    start (the Source keeps serving, its writes set c's bits); accepted,
    c is served again, out of sync, and a sync makes it equal."""
    file_c = _image(tmp_path / "C.img", 0)
    clonectl("lu", "create", "src", "--size", "16M")
    srv = server_factory()
    clonectl("clone", "add", "src", "c", "--file", file_c)
    clonectl("clone", "sync", "c", "--wait")
    before_storage = _clone(state_dir, "c")["storage"]
    assert before_storage.startswith("file:"), before_storage
    srv.stop()
    restored = _image(tmp_path / "restored.img", 0)
    os.replace(restored, file_c)
    srv = server_factory()
    c = _clone(state_dir, "c")
    assert c["broken"] and "clone accept-storage c" in c["error"], c
    h = nbd_connect(srv.socket, "src")
    h.pwrite(bytes([HOST_BYTE]) * CHUNK, 0)
    h.flush()
    assert _head(file_c) == bytes(CHUNK), "a broken clone was written"
    out = json.loads(clonectl("clone", "accept-storage", "c",
                              "--json").stdout)
    assert out["error"] is None and out["source"] == "src", out
    c = _clone(state_dir, "c")
    assert not c["broken"] and c["state"] == "out-of-sync" and \
        c["extents_dirty"] >= 1, c
    assert c["storage"] == out["storage"] != before_storage, c
    clonectl("clone", "sync", "c", "--wait")
    assert _head(file_c) == bytes([HOST_BYTE]) * CHUNK


@pytest.mark.parametrize("first", ["file", "loop"])
def test_a_loop_device_over_an_lus_file_is_not_another_lu(
        first, tmp_path, loops, clonectl, state_dir):
    """Its writes would pass none of the file's LU's layers (clones,
    sessions, replication), whichever of the two came first."""
    file_a = _image(tmp_path / "A.img", A_BYTE)
    dev = loops.attach(file_a)
    paths = {"file": file_a, "loop": dev}
    second = "loop" if first == "file" else "file"
    clonectl("lu", "create", "a", "--file", paths[first])
    proc = clonectl("lu", "create", "b", "--file", paths[second],
                    check=False)
    assert proc.returncode == 1 and "used by LU 'a'" in proc.stderr, \
        proc.stdout + proc.stderr
    assert set(_record(state_dir)["lus"]) == {"a"}
