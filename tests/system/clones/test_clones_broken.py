"""A clone whose backing file is gone is reported as broken; its Source,
the Source's other clones and every other LU are still served, the broken
clone keeps its delta map (no write is mirrored to a missing file), and it
can be removed."""

import json
import os

import pytest

from tests.support.clonelib import GRANULARITY, MiB, read_range

pytest.importorskip("nbd")

SIZE = 8 * MiB


def test_missing_clone_file_does_not_stop_the_server(clone_env):
    env = clone_env.setup(size=SIZE, clones=("c1", "c2"))
    env.cli("lu", "create", "other", "--size", "1M")
    env.sync_wait("c1")
    env.sync_wait("c2")
    env.cli("clone", "fracture", "c2")
    env.server.stop()

    os.unlink(env.img("c1"))
    env.start_server()

    rows = {r["name"]: r for r in env.clone_list()}
    assert rows["c1"]["broken"] and "c1.img" in rows["c1"]["error"], rows
    assert not rows["c2"]["broken"] and rows["c2"]["error"] is None, rows
    proc = env.cli("status", "--json", check=False)
    assert proc.returncode == 4, proc.stdout    # degraded: a broken clone
    st = json.loads(proc.stdout)
    assert any(p.get("clone") == "c1" and "c1.img" in p["message"]
               for p in st["problems"]), st
    assert {lu["name"]: lu["served"] for lu in st["lus"]} == \
        {"src": True, "other": True}

    # The Source is readable and writable; the write is not mirrored to the
    # missing file but its extent is dirty for c1 (and for fractured c2).
    data = os.urandom(GRANULARITY)
    env.write_export("src", 3 * GRANULARITY, data)
    assert env.read_export("src", 3 * GRANULARITY, GRANULARITY) == data
    assert read_range(env.img("src"), 3 * GRANULARITY, GRANULARITY) == data
    assert not env.img("c1").exists()
    c1 = env.status("c1")
    assert c1["state"] == "out-of-sync" and c1["extents_dirty"] == 1, c1
    assert env.status("c2")["extents_dirty"] == 1
    env.write_export("other", 0, b"o" * 4096)
    assert env.read_export("other", 0, 4096) == b"o" * 4096

    # The other clone still works: exported, written, resynchronized.
    env.write_export("c2", 0, b"2" * 4096)
    assert env.read_export("c2", 0, 4096) == b"2" * 4096
    env.sync_wait("c2")
    env.assert_identical("src", "c2")

    # Operations on the broken clone are refused with a message.
    for args in (["clone", "sync", "c1"], ["clone", "fracture", "c1"],
                 ["clone", "restore", "c1"], ["clone", "reverse-sync", "c1"]):
        env.refused(*args, match=["c1", "broken", "does not exist"])

    # The delta map survives a restart (the extent written stays dirty).
    env.server.stop()
    env.start_server()
    assert env.status("c1")["extents_dirty"] == 1

    # It can be removed; the Source goes on with its other clone.
    env.cli("clone", "remove", "c1")
    assert [r["name"] for r in env.clone_list()] == ["c2"]
    env.write_export("src", 0, b"s" * 4096)
    assert env.read_export("src", 0, 4096) == b"s" * 4096


def test_clone_list_offline_with_a_missing_clone_file(clone_env):
    env = clone_env.setup(size=SIZE, clones=("c1", "c2"), fill=False,
                          serve=False)
    os.unlink(env.img("c2"))
    rows = {r["name"]: r for r in env.clone_list()}
    assert rows["c2"]["broken"] and rows["c2"]["error"], rows
    assert not rows["c1"]["broken"]
    text = env.cli("clone", "list").stdout
    assert "c2" in text and "broken" in text, text
    env.cli("clone", "remove", "c2")
    assert [r["name"] for r in env.clone_list()] == ["c1"]
