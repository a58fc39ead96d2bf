"""Failing devices end to end: a running `clonectl serve` whose Source or
clone backing file fails chosen requests (CLONECTL_FAULTS, the test-only
hook of target/backends.py; nbdkit inherits the manager's environment).

The NBD client (libnbd) gets the errno; `clone status --json` shows the
failed operation with its message; a clone that failed mid-sync or lost a
mirrored write is out-of-sync, never synchronized; once the fault is gone
`clone sync --wait` completes and the clone equals the Source.  The engine
level twins are tests/engine/test_failing_devices.py.
"""

import json
import os

import pytest

from tests.support.clonelib import (differing_extents, GRANULARITY, MiB,
                                    read_range)

nbd = pytest.importorskip("nbd")

SIZE = 64 * MiB


class Faults:
    """The CLONECTL_FAULTS file: set(rules...) replaces it atomically,
    clear() removes it (no faults)."""

    def __init__(self, path):
        self.path = path

    def set(self, *rules):
        tmp = str(self.path) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(list(rules), f)
        os.rename(tmp, str(self.path))

    def clear(self):
        try:
            os.unlink(str(self.path))
        except FileNotFoundError:
            pass


@pytest.fixture
def faults(tmp_path, monkeypatch):
    f = Faults(tmp_path / "faults.json")
    # Read by every FileBackend that `clonectl serve` (its nbdkit) opens.
    monkeypatch.setenv("CLONECTL_FAULTS", str(f.path))
    return f


def _rule(path, op, offset=0, length=None, code="EIO"):
    rule = {"path": str(path), "op": op, "offset": offset, "errno": code}
    if length is not None:
        rule["length"] = length
    return rule


def _nbd_errno(call):
    """The errno libnbd reports for a failing call (nbd.Error.errno is the
    errno's name, e.g. "EIO")."""
    with pytest.raises(nbd.Error) as e:
        call()
    return e.value.errno


def test_source_device_errors_reach_the_nbd_client(clone_env, faults,
                                                   nbd_connect):
    env = clone_env.setup(size=SIZE, clones=())
    src = env.img("src")
    h = nbd_connect(env.server.socket, "src")
    before = read_range(src, 4 * MiB, 4 * MiB)
    faults.set(_rule(src, ["write", "zero"], 4 * MiB, 4 * MiB, "EIO"),
               _rule(src, "read", 16 * MiB, MiB, "EIO"))
    assert _nbd_errno(lambda: h.pwrite(b"w" * 65536, 4 * MiB)) == "EIO"
    assert _nbd_errno(lambda: h.zero(65536, 6 * MiB)) == "EIO"
    assert _nbd_errno(lambda: h.pread(4096, 16 * MiB + 8192)) == "EIO"
    # Outside the faulty ranges the same connection works.
    h.pwrite(b"k" * 65536, 0)
    assert h.pread(65536, 0) == b"k" * 65536
    assert h.pread(4096, 20 * MiB) == read_range(src, 20 * MiB, 4096)
    faults.set(_rule(src, "write", 4 * MiB, 4 * MiB, "ENOSPC"))
    assert _nbd_errno(lambda: h.pwrite(b"w" * 4096, 5 * MiB)) == "ENOSPC"
    h.flush()
    # The failed writes changed nothing.
    assert read_range(src, 4 * MiB, 4 * MiB) == before
    faults.clear()
    h.pwrite(b"w" * 65536, 4 * MiB)
    h.flush()
    assert read_range(src, 4 * MiB, 65536) == b"w" * 65536
    assert env.server.running(), env.server.log()


def test_clone_device_failing_mid_sync_then_mirrored_write(clone_env, faults,
                                                           nbd_connect):
    env = clone_env.setup(size=SIZE)
    clone_file = env.img("c1")
    total = SIZE // GRANULARITY
    # The second half of the clone cannot be written: the first sync copies
    # the first half, then fails.
    faults.set(_rule(clone_file, "write", SIZE // 2))
    proc = env.cli("clone", "sync", "c1", "--wait", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "out-of-sync" in proc.stderr and "injected" in proc.stderr, \
        proc.stderr
    st = env.status("c1")
    assert st["state"] == "out-of-sync", st
    assert "EIO" in st["error"] and str(clone_file) in st["error"], st
    op = st["operation"]
    assert op["operation"] == "sync" and not op["running"], st
    # The extents not copied are still dirty (at least the failing half),
    # and no extent differs without being counted dirty.
    assert total // 2 <= st["extents_dirty"] < total, st
    assert 0 < op["bytes_copied"] <= SIZE // 2, st
    assert len(differing_extents(env.img("src"), clone_file, SIZE)) <= \
        st["extents_dirty"], st
    # Writes from a host do not make it synchronized, nor does time.
    h = nbd_connect(env.server.socket, "src")
    h.pwrite(b"h" * 65536, 0)
    h.flush()
    assert env.status("c1")["state"] == "out-of-sync"

    faults.clear()
    env.sync_wait("c1")
    env.assert_identical("src", "c1")

    # Synchronized; now a mirrored write fails on the clone's device: the
    # host write is done, the clone drops out of sync with the extent marked.
    faults.set(_rule(clone_file, "write", 8 * MiB, MiB, "EIO"))
    h.pwrite(b"m" * 65536, 8 * MiB)
    h.flush()
    assert h.pread(65536, 8 * MiB) == b"m" * 65536
    assert read_range(env.img("src"), 8 * MiB, 65536) == b"m" * 65536
    st = env.status("c1")
    assert st["state"] == "out-of-sync", st
    assert st["extents_dirty"] >= 1 and st.get("error"), st
    assert "injected" in st["error"], st
    faults.clear()
    env.sync_wait("c1")
    env.assert_identical("src", "c1")
