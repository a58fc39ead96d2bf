"""The clone CLI against a running server: refused transitions change
nothing, --json documents what it promises."""

import hashlib
import os
import time
from pathlib import Path

import pytest

from tests.support.clonelib import fingerprint, GRANULARITY, MiB, nbd_exports

pytest.importorskip("nbd")


def _digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_refused_transitions_change_nothing(clone_env, nbd_connect):
    env = clone_env.setup(size=16 * MiB, clones=("c1", "c2"))
    c2_before = _digest(env.img("c2"))

    # fracture while out-of-sync
    before = fingerprint(env)
    env.refused("clone", "fracture", "c1", match=["fracture", "out-of-sync"])
    assert fingerprint(env) == before
    assert nbd_exports(env.server.socket) == ["src"]
    # reverse sync of an out-of-sync clone would restore garbage
    env.refused("clone", "reverse-sync", "c1",
                match=["reverse", "out-of-sync"])
    assert fingerprint(env) == before

    # While c1 syncs: a second operation in the group, remove, fracture.
    env.sync("c1", "--rate", "4M")
    env.refused("clone", "sync", "c2", match=["c1", "syncing"])
    env.refused("clone", "sync", "c1", match=["c1", "syncing"])
    env.refused("clone", "remove", "c1", match=["remove", "syncing"])
    env.refused("clone", "fracture", "c1", match=["fracture", "syncing"])
    env.refused("clone", "reverse-sync", "c1", match=["reverse", "syncing"])
    c1 = env.status("c1")
    assert c1["state"] == "syncing" and c1["operation"]["running"], c1
    c2 = env.status("c2")
    assert c2["state"] == "out-of-sync" and c2["operation"] is None, c2
    assert c2["extents_dirty"] == c2["extents_total"]
    assert _digest(env.img("c2")) == c2_before  # nothing copied to c2
    assert [c["name"] for c in env.clone_list()] == ["c1", "c2"]
    assert env.img("c1").exists()
    env.wait_done("c1")
    env.assert_identical("src", "c1")

    # reverse sync of a synchronized clone
    before = fingerprint(env)
    src_before = _digest(env.img("src"))
    env.refused("clone", "reverse-sync", "c1",
                match=["reverse", "synchronized"])
    assert fingerprint(env) == before
    assert _digest(env.img("src")) == src_before

    # A fractured clone whose export has a connection: no sync, no reverse
    # sync, no remove.
    env.cli("clone", "fracture", "c1")
    h = nbd_connect(env.server.socket, "c1")
    h.pwrite(b"\x42" * 4096, 0)
    h.flush()
    before = fingerprint(env)
    assert before["status:c1"]["connections"] == 1
    assert before["status:c1"]["extents_dirty"] == 1
    env.refused("clone", "sync", "c1", match=["connection"])
    env.refused("clone", "reverse-sync", "c1", match=["connection"])
    env.refused("clone", "remove", "c1", match=["connection"])
    assert fingerprint(env) == before
    # The connection still works and still sees its own data.
    assert h.pread(4096, 0) == b"\x42" * 4096
    h.shutdown()
    # Once it is closed, the same sync is accepted.
    deadline = time.monotonic() + 10
    while env.status("c1")["connections"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    env.sync_wait("c1")
    env.assert_identical("src", "c1")

    # The source of clones cannot be deleted (even with the server stopped).
    before = fingerprint(env)
    env.refused("lu", "delete", "src", match=["clones"])
    assert fingerprint(env) == before
    assert env.img("src").exists()


@pytest.mark.parametrize("serving", [True, False], ids=["served", "offline"])
def test_clone_add_refusals(clone_env, serving):
    env = clone_env.setup(size=4 * MiB, clones=(), fill=False, serve=serving)
    env.cli("lu", "create", "other", "--size", "1M")
    before = fingerprint(env)
    for bad in ("3K", "4M", "1K", "96K", "0", "abc"):
        env.refused("clone", "add", "src", "cx", "--granularity", bad,
                    match=["granularity"] if bad not in ("0", "abc")
                    else ["size"])
        assert fingerprint(env) == before, bad
    env.refused("clone", "add", "src", "other", match=["other", "already"])
    env.refused("clone", "add", "src", "src", match=["src", "already"])
    env.refused("clone", "add", "nosuch", "cx", match=["nosuch"])
    assert fingerprint(env) == before

    # The group's granularity is fixed by its first clone: 2K and 1M are
    # both fine, a second, different one is refused.
    env.cli("clone", "add", "src", "c1", "--granularity", "2K")
    st = env.status("c1")
    assert st["granularity"] == 2048
    assert st["extents_total"] == st["extents_dirty"] == 4 * MiB // 2048
    before = fingerprint(env)
    env.refused("clone", "add", "src", "c2", "--granularity", "1M",
                match=["granularity"])
    env.refused("clone", "add", "src", "c1", match=["c1", "already"])
    env.refused("lu", "create", "c1", "--size", "1M", match=["c1", "already"])
    assert fingerprint(env) == before

    for i in range(2, 9):
        env.cli("clone", "add", "src", "c{}".format(i))
    assert [c["name"] for c in env.clone_list()] == \
        ["c{}".format(i) for i in range(1, 9)]
    before = fingerprint(env)
    env.refused("clone", "add", "src", "c9", match=["8"])
    assert fingerprint(env) == before
    assert not env.img("c9").exists()

    env.refused("lu", "delete", "src", match=["clones"])
    assert fingerprint(env) == before
    # Clones of another Source are independent of this group.
    env.cli("clone", "add", "other", "o1", "--granularity", "1M")
    assert env.status("o1")["granularity"] == 1 << 20


def _check_status_fields(st, size):
    for key, kind in (("name", str), ("source", str), ("state", str),
                      ("size", int), ("granularity", int),
                      ("extents_total", int), ("extents_dirty", int),
                      ("bytes_dirty", int), ("exported", bool),
                      ("connections", int)):
        assert isinstance(st.get(key), kind), (key, st)
    assert st["state"] in ("out-of-sync", "syncing", "synchronized",
                           "fractured", "reverse-syncing")
    assert st["size"] == size
    assert st["extents_total"] == size // st["granularity"]
    assert 0 <= st["extents_dirty"] <= st["extents_total"]
    op = st["operation"]
    if op is not None:
        for key, kind in (("operation", str), ("bytes_copied", int),
                          ("rate", (int, float)), ("collisions", int),
                          ("retries", int), ("running", bool)):
            assert isinstance(op.get(key), kind), (key, op)
        assert "eta" in op
        assert op["eta"] is None or isinstance(op["eta"], (int, float))


def test_json_status_and_list(clone_env):
    env = clone_env.setup(size=16 * MiB, clones=("c1",))
    rows = env.clone_list()
    assert [r["name"] for r in rows] == ["c1"]
    _check_status_fields(rows[0], 16 * MiB)
    assert rows[0]["state"] == "out-of-sync" and rows[0]["operation"] is None
    assert rows[0]["extents_dirty"] == 16 * MiB // GRANULARITY

    rate = 4 * MiB
    env.sync("c1", "--rate", "4M")
    time.sleep(1.5)
    st = env.status("c1")
    _check_status_fields(st, 16 * MiB)
    op = st["operation"]
    assert st["state"] == "syncing" and op["running"], st
    assert op["operation"] == "sync"
    assert 0 < op["bytes_copied"] < 16 * MiB
    # The copy is throttled to --rate (one 1 MiB chunk of slack).
    assert op["bytes_copied"] <= rate * op["elapsed"] + MiB, op
    assert 0 < op["rate"] <= 1.5 * rate, op
    remaining = st["extents_dirty"] * GRANULARITY
    assert op["eta"] > 0 and abs(op["eta"] - remaining / op["rate"]) < 1.0, st
    # list --json shows the same clone.
    row, = env.clone_list()
    assert row["name"] == "c1" and row["state"] == "syncing"
    # The text form says the same.
    text = env.cli("clone", "status", "c1").stdout
    assert "c1: syncing" in text and "running" in text

    st = env.wait_done("c1")
    _check_status_fields(st, 16 * MiB)
    op = st["operation"]
    assert not op["running"] and op["eta"] is None
    assert op["collisions"] == 0 and op["retries"] == 0
    assert op["bytes_copied"] == 16 * MiB
    assert st["extents_dirty"] == 0 and st["bytes_dirty"] == 0
    env.assert_identical("src", "c1")
    text = env.cli("clone", "list").stdout.splitlines()
    assert text[0].split()[:3] == ["NAME", "SOURCE", "STATE"]
    assert text[1].split()[:3] == ["c1", "src", "synchronized"]


def test_clone_backing_refusals_and_read_only_source(clone_env, tmp_path):
    env = clone_env.setup(size=4 * MiB, clones=(), serve=False)
    ro = tmp_path / "ro.img"
    ro.write_bytes(os.urandom(4 * MiB))
    env.cli("lu", "create", "ro", "--file", ro, "--read-only")
    env.start_server()
    small = tmp_path / "small.img"
    small.write_bytes(b"\x01" * (2 * MiB))
    before = fingerprint(env)
    # A clone on a file smaller than its Source, or on the Source's own
    # backing file, or on another LU's, would corrupt data: refused.
    env.refused("clone", "add", "src", "cx", "--file", small,
                match=["small"])
    env.refused("clone", "add", "src", "cx", "--file", env.img("src"),
                match=["src"])
    env.refused("clone", "add", "src", "cx", "--file", ro, match=["ro"])
    assert fingerprint(env) == before
    assert small.read_bytes() == b"\x01" * (2 * MiB)

    # A read-only Source can be cloned, not restored.
    ro_data = ro.read_bytes()
    env.cli("clone", "add", "ro", "r1")
    env.sync_wait("r1")
    assert env.img("r1").read_bytes() == ro_data
    env.cli("clone", "fracture", "r1")
    env.write_export("r1", 0, b"\x09" * 4096)
    before = fingerprint(env)
    env.refused("clone", "reverse-sync", "r1", match=["read-only"])
    assert fingerprint(env) == before
    assert ro.read_bytes() == ro_data

    # Removing a fractured clone with no connection: its export, its file
    # and its map are gone; the Source is untouched.
    assert "r1" in nbd_exports(env.server.socket)
    env.cli("clone", "remove", "r1")
    assert nbd_exports(env.server.socket) == ["ro", "src"]
    assert not env.img("r1").exists()
    assert not (env.state_dir / "maps" / "r1.delta").exists()
    assert env.clone_list() == []
    assert ro.read_bytes() == ro_data
