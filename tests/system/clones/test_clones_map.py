"""`clonectl clone map`: which extents of a clone differ, as runs."""

import json

import pytest

from tests.support.clonelib import GRANULARITY, MiB

pytest.importorskip("nbd")

G = GRANULARITY


def test_map_of_a_fractured_clone_shows_the_written_extents(clone_env):
    env = clone_env.setup(size=4 * MiB)
    env.sync_wait("c1")
    env.cli("clone", "fracture", "c1")
    env.write_export("src", 3 * G + 100, b"x" * 10)
    env.write_export("src", 10 * G, b"y" * G)
    res = env.cli_json("clone", "map", "c1")
    assert res["granularity"] == G and res["size"] == 4 * MiB
    assert res["runs"] == [[0, 3 * G, "clean"], [3 * G, G, "dirty"],
                           [4 * G, 6 * G, "clean"], [10 * G, G, "dirty"],
                           [11 * G, 4 * MiB - 11 * G, "clean"]]
    lines = env.cli("clone", "map", "c1").stdout.splitlines()
    assert [line.split() for line in lines] == [
        [str(o), str(n), k] for o, n, k in res["runs"]]


def test_map_of_a_new_clone_is_all_dirty_offline(clone_env):
    env = clone_env.setup(size=1 * MiB + 512, serve=False, fill=False)
    res = env.cli_json("clone", "map", "c1")
    assert res["runs"] == [[0, 1 * MiB + 512, "dirty"]]
    env.refused("clone", "map", "nope", match="no clone named")


def test_map_of_a_restoring_clone(clone_env):
    # The engine copies 1 MiB, then waits as long as the rate says.
    env = clone_env.setup(size=4 * MiB)
    env.sync_wait("c1")
    env.cli("clone", "fracture", "c1")
    env.write_export("c1", 0, b"c" * 3 * MiB)
    env.cli("clone", "restore", "c1", "--rate", "64K")
    env.write_export("src", 3 * MiB, b"h" * G)
    res = env.cli_json("clone", "map", "c1")
    assert res["state"] == "restoring", res
    runs = res["runs"]
    assert {k for _, _, k in runs} == {"pending", "clean", "dirty"}, runs
    assert runs[-2:] == [[3 * MiB, G, "dirty"],
                         [3 * MiB + G, MiB - G, "clean"]], runs
    pending = sum(n for _, n, k in runs if k == "pending")
    assert 0 < pending <= 3 * MiB
    st = env.status("c1")
    assert pending == st["restore"]["pending_extents"] * G
