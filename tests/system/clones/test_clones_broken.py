"""A clone whose backing file is gone is reported as broken; its Source,
the Source's other clones and every other LU are still served, the broken
clone keeps its delta map (no write is mirrored to a missing file), and it
can be removed."""

import json
import os
import time

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


def test_a_restore_whose_clone_file_was_missing_goes_on_once_it_is_back(
        clone_env):
    """The restore's clone file is gone at a start: the clone is broken,
    the restore paused, and the Source cannot show the clone's data.
    Put back and accepted, the restore goes on and ends as the clone."""
    env = clone_env.setup(size=SIZE)
    env.sync_wait("c1")
    env.cli("clone", "fracture", "c1")
    clone_data = os.urandom(SIZE)
    env.write_export("c1", 0, clone_data)
    env.cli("clone", "restore", "c1", "--rate", "256K")
    env.server.stop()                   # resumed at the next start
    os.rename(env.img("c1"), str(env.img("c1")) + ".away")
    env.start_server()
    c1 = env.status("c1")
    assert c1["broken"] and c1["state"] == "restoring", c1
    assert "clone accept-storage c1" in env.refused(
        "clone", "remove", "c1", match="broken").stderr
    os.rename(str(env.img("c1")) + ".away", env.img("c1"))
    out = env.cli_json("clone", "accept-storage", "c1")
    assert out["error"] is None and out["storage"] is None, out
    c1 = env.status("c1")
    assert not c1["broken"] and c1["operation"]["running"], c1
    # A host reading everything copies what the engine has not (on demand).
    assert env.read_export("src", 0, SIZE) == clone_data
    deadline = time.monotonic() + 30
    while env.status("c1")["state"] == "restoring":
        assert time.monotonic() < deadline, env.status("c1")
        time.sleep(0.1)
    assert env.status("c1")["state"] == "fractured"
    assert read_range(env.img("src"), 0, SIZE) == clone_data
    assert read_range(env.img("c1"), 0, SIZE) == clone_data


def test_a_fractured_clone_accepted_back_is_served_from_its_file(clone_env):
    env = clone_env.setup(size=SIZE, clones=("c1", "c2"))
    env.sync_wait("c2")
    env.cli("clone", "fracture", "c2")
    env.write_export("c2", 0, b"2" * 4096)
    env.server.stop()
    os.rename(env.img("c2"), str(env.img("c2")) + ".away")
    env.start_server()
    assert env.status("c2")["broken"]
    os.rename(str(env.img("c2")) + ".away", env.img("c2"))
    env.cli("clone", "accept-storage", "c2")
    assert env.read_export("c2", 0, 4096) == b"2" * 4096
    env.write_export("c2", 4096, b"3" * 4096)
    assert read_range(env.img("c2"), 0, 8192) == b"2" * 4096 + b"3" * 4096


def test_a_sync_goes_on_once_its_source_is_accepted(clone_env, tmp_path):
    """The Source's file restored from a backup while stopped mid-sync:
    the Source is refused at the start, so its clones are not loaded;
    accepted, the clone's sync goes on without a restart."""
    env = clone_env
    data = os.urandom(SIZE)
    backing = tmp_path / "src.img"
    backing.write_bytes(data)
    os.symlink(backing, tmp_path / "src-link")
    env.size = SIZE
    env.cli("lu", "create", "src", "--file", tmp_path / "src-link")
    env.cli("clone", "add", "src", "c1")
    env.start_server()
    # Slow enough to be still running after the restart and the accept.
    env.cli("clone", "sync", "c1", "--rate", "2M")
    env.server.stop()
    (tmp_path / "restored.img").write_bytes(data)
    os.replace(tmp_path / "restored.img", backing)
    env.start_server()
    proc = env.cli("lu", "accept-storage", "src", check=False)
    assert proc.returncode == 0, proc.stderr
    st = env.status("c1")
    assert st["operation"] and st["operation"]["running"], st
    deadline = time.monotonic() + 60
    while env.status("c1")["state"] != "synchronized":
        assert time.monotonic() < deadline, env.status("c1")
        time.sleep(0.2)
    assert read_range(env.img("c1"), 0, SIZE) == data
