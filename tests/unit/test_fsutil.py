"""target.fsutil: atomic file replacement and Unix socket paths."""

import errno
import hashlib
import json
import os
import shutil
import stat

import pytest

from target import errors, fsutil


def _leftovers(directory, name):
    return [f for f in os.listdir(directory)
            if f != name and f.startswith("." + name)]


def test_write_atomic_creates_file_with_content_and_mode(tmp_path):
    path = tmp_path / "f.json"
    fsutil.write_atomic(str(path), b"hello\n")
    assert path.read_bytes() == b"hello\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["f.json"]


@pytest.mark.parametrize("mode", [0o644, 0o400, 0o640])
def test_write_atomic_mode(tmp_path, mode):
    path = tmp_path / "pid"
    fsutil.write_atomic(str(path), b"123\n", mode=mode)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert path.read_bytes() == b"123\n"


def test_write_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(b"x" * 10000)
    old_inode = path.stat().st_ino
    fsutil.write_atomic(str(path), b"short")
    assert path.read_bytes() == b"short"
    # Replaced by rename, not rewritten in place: readers of the old file
    # never see a half-written one.
    assert path.stat().st_ino != old_inode
    assert sorted(os.listdir(tmp_path)) == ["state.json"]


def test_write_atomic_empty_and_large(tmp_path):
    path = tmp_path / "f"
    fsutil.write_atomic(str(path), b"")
    assert path.read_bytes() == b""
    data = os.urandom(3 << 20)
    fsutil.write_atomic(str(path), data)
    assert path.read_bytes() == data
    assert os.listdir(tmp_path) == ["f"]


def test_write_atomic_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fsutil.write_atomic("rel", b"data")
    assert (tmp_path / "rel").read_bytes() == b"data"
    assert os.listdir(tmp_path) == ["rel"]


def test_write_atomic_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        fsutil.write_atomic(str(path), "not bytes")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state.json"]


def test_write_atomic_rename_failure_leaves_no_temp(tmp_path):
    # The target is a non-empty directory: rename fails after the temp file
    # was written; the temp file must be removed and the directory kept.
    target = tmp_path / "d"
    target.mkdir()
    (target / "inside").write_bytes(b"keep")
    with pytest.raises(OSError):
        fsutil.write_atomic(str(target), b"data")
    assert sorted(os.listdir(tmp_path)) == ["d"]
    assert (target / "inside").read_bytes() == b"keep"


def test_write_atomic_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        fsutil.write_atomic(str(tmp_path / "nope" / "f"), b"x")
    assert os.listdir(tmp_path) == []


def test_write_json_atomic_round_trip(tmp_path):
    path = tmp_path / "doc.json"
    doc = {"b": [1, 2, {"c": None}], "a": "é"}
    fsutil.write_json_atomic(str(path), doc)
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    assert json.loads(raw) == doc
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["doc.json"]


def test_unix_socket_path_short_is_kept(tmp_path):
    short = "/tmp/x.sock"
    assert fsutil.unix_socket_path(short) == short


def test_unix_socket_path_relative_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = fsutil.unix_socket_path("s.sock")
    assert os.path.isabs(result)
    assert result == str(tmp_path / "s.sock") or \
        result.startswith("/tmp/clonectl-")


def test_unix_socket_path_long_is_mapped_and_stable(tmp_path):
    long = "/tmp/" + "d" * 120 + "/nbd.sock"
    mapped = fsutil.unix_socket_path(long)
    assert len(mapped.encode()) <= 107
    assert mapped.startswith("/tmp/clonectl-{}/".format(os.getuid()))
    assert mapped.endswith("nbd.sock")
    assert mapped == fsutil.unix_socket_path(long)
    digest = hashlib.sha256(long.encode()).hexdigest()[:20]
    assert digest in mapped
    other = fsutil.unix_socket_path("/tmp/" + "e" * 120 + "/nbd.sock")
    assert other != mapped
    assert stat.S_IMODE(os.stat(os.path.dirname(mapped)).st_mode) == 0o700


@pytest.fixture
def fallback_dir(monkeypatch):
    """The stand-in directory of a uid no other test uses (os.getuid is
    patched): the real /tmp/clonectl-UID of this machine is left alone."""
    uid = 100000 + os.getpid() % 50000
    monkeypatch.setattr(os, "getuid", lambda: uid)
    path = "/tmp/clonectl-{}".format(uid)
    _remove(path)
    yield path, uid
    _remove(path)


def _remove(path):
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


LONG = "/tmp/" + "f" * 120 + "/control.sock"


def test_private_dir_is_made_and_used_again(tmp_path):
    path = str(tmp_path / "p")
    assert fsutil.private_dir(path) == path
    st = os.lstat(path)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == os.getuid()
    (tmp_path / "p" / "kept").write_bytes(b"")
    assert fsutil.private_dir(path) == path
    assert os.listdir(path) == ["kept"]


def _planted(path, how, uid):
    """The fallback directory made by someone else, or left open."""
    if how == "other owner":
        os.mkdir(path, 0o700)
        os.chown(path, 65534, 65534)
    elif how == "mode 0777":
        os.mkdir(path)
        os.chown(path, uid, -1)
        os.chmod(path, 0o777)
    elif how == "mode 0750":
        os.mkdir(path)
        os.chown(path, uid, -1)
        os.chmod(path, 0o750)
    elif how == "symlink":
        real = path + ".real"
        os.mkdir(real, 0o700)
        os.chown(real, uid, -1)
        os.symlink(real, path)
    else:
        with open(path, "w") as f:
            f.write("x")


@pytest.mark.parametrize("how", ["other owner", "mode 0777", "mode 0750",
                                 "symlink", "file"])
def test_fallback_directory_of_others_is_refused(fallback_dir, how):
    path, uid = fallback_dir
    _planted(path, how, uid)
    before = os.lstat(path)
    try:
        with pytest.raises(errors.SocketDirUnsafe) as info:
            fsutil.unix_socket_path(LONG)
        assert path in str(info.value)
        after = os.lstat(path)
        assert (after.st_mode, after.st_uid, after.st_ino) == \
            (before.st_mode, before.st_uid, before.st_ino)
        if how != "file":
            assert os.listdir(path) == []
    finally:
        if how == "symlink":
            os.rmdir(path + ".real")


def test_unix_socket_path_limit_boundary():
    exact = "/tmp/" + "a" * (107 - len("/tmp/"))
    assert len(exact) == 107
    assert fsutil.unix_socket_path(exact) == exact
    assert fsutil.unix_socket_path(exact + "b") != exact + "b"


def test_fsync_dir(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (
        synced.append(os.fstat(fd).st_ino), real(fd))[1])
    fsutil.fsync_dir(str(tmp_path))
    assert synced == [tmp_path.stat().st_ino]
    with pytest.raises(NotADirectoryError):
        (tmp_path / "f").write_bytes(b"")
        fsutil.fsync_dir(str(tmp_path / "f"))


def test_makedirs_durable_syncs_the_parent_of_each_new_directory(
        tmp_path, monkeypatch):
    synced = []
    real = fsutil.fsync_dir
    monkeypatch.setattr(fsutil, "fsync_dir",
                        lambda p: (synced.append(p), real(p)))
    fsutil.makedirs_durable(str(tmp_path / "a" / "b"))
    assert (tmp_path / "a" / "b").is_dir()
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    assert synced == [str(tmp_path), str(tmp_path / "a")]
    fsutil.makedirs_durable(str(tmp_path / "a" / "b"))    # nothing new
    assert len(synced) == 2


def test_remove_durably_syncs_each_directory_once(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(fsutil, "fsync_dir", synced.append)
    (tmp_path / "d").mkdir()
    for name in ("x", "y", "d/z"):
        (tmp_path / name).write_bytes(b"")
    fsutil.remove_durably([str(tmp_path / n)
                           for n in ("x", "y", "d/z", "missing")])
    assert os.listdir(tmp_path) == ["d"] and os.listdir(tmp_path / "d") == []
    assert synced == sorted([str(tmp_path), str(tmp_path / "d")])


def test_remove_durably_again_makes_an_earlier_removal_durable(tmp_path,
                                                              monkeypatch):
    """A removal whose directory fsync failed is retried: the files are
    gone already, and the retry still syncs their directory (before, it
    synced only where it unlinked something, so the retry succeeded with
    the removal still volatile: a power cut brought the files back)."""
    path = tmp_path / "record.json"
    path.write_bytes(b"{}")
    synced = []
    real = fsutil.fsync_dir

    def failing(directory):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(fsutil, "fsync_dir", failing)
    with pytest.raises(OSError):
        fsutil.remove_durably([str(path)])
    assert not path.exists()
    monkeypatch.setattr(fsutil, "fsync_dir",
                        lambda d: (real(d), synced.append(d)))
    fsutil.remove_durably([str(path), str(tmp_path / "gone" / "x")])
    assert synced == [str(tmp_path)]


@pytest.mark.parametrize("existed", [True, False])
def test_a_replacement_whose_directory_sync_fails_leaves_the_old_file(
        tmp_path, monkeypatch, existed):
    """The rename is done when the directory's fsync fails: the caller
    is told the file was not replaced, so the old one (or none) must be
    what the path holds, not the new one."""
    path = tmp_path / "state.json"
    if existed:
        path.write_bytes(b"old\n")
    real = fsutil.fsync_dir
    failed = []

    def eio(directory):
        if not failed:
            failed.append(directory)
            raise OSError(errno.EIO, "Input/output error", directory)
        real(directory)
    monkeypatch.setattr(fsutil, "fsync_dir", eio)
    with pytest.raises(OSError):
        fsutil.write_atomic(str(path), b"new\n")
    assert failed
    if existed:
        assert path.read_bytes() == b"old\n"
    else:
        assert not path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        (["state.json"] if existed else [])


def test_a_filesystem_refusing_hard_links_still_saves(tmp_path, monkeypatch):
    """vfat, some FUSE filesystems, protected_hardlinks: no copy of the
    old file can be kept, and the replacement goes on without it."""
    path = tmp_path / "state.json"
    path.write_bytes(b"old\n")

    def no_link(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted", src)
    monkeypatch.setattr(os, "link", no_link)
    fsutil.write_atomic(str(path), b"new\n")
    assert path.read_bytes() == b"new\n"


def test_a_failed_rename_leaves_nothing_behind(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    path.write_bytes(b"old\n")
    real, calls = os.rename, []

    def failing(a, b):
        calls.append((a, b))
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error", a)
        return real(a, b)
    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError):
        fsutil.write_atomic(str(path), b"new\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    assert path.read_bytes() == b"old\n"
