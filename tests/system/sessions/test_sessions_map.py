"""`clonectl session map`: changed, to transfer and saved extents."""

import pytest

from tests.support.clonelib import GRANULARITY, MiB

pytest.importorskip("nbd")

G = GRANULARITY


def test_session_map_follows_mark_and_writes(session_env, dests, tmp_path):
    env = session_env.setup(size=2 * MiB, fill=False)
    dfile = dests.make_file(tmp_path / "dest.raw", 2 * MiB)
    env.create("s1", dests.qemu_nbd(dfile).uri)
    env.update()
    env.write_export("src", 2 * G, b"a" * G)
    assert env.cli_json("session", "map", "s1")["runs"] == [
        [0, 2 * G, "clean"], [2 * G, G, "changed"],
        [3 * G, 2 * MiB - 3 * G, "clean"]]
    env.cli("session", "mark", "s1")
    env.write_export("src", 2 * G, b"b" * 10)   # saved first
    env.write_export("src", 5 * G, b"c" * 10)   # not frozen: only changed
    res = env.cli_json("session", "map", "s1")
    assert res["marked"] is True
    assert res["runs"] == [
        [0, 2 * G, "clean"], [2 * G, G, "changed,transfer,saved"],
        [3 * G, 2 * G, "clean"], [5 * G, G, "changed"],
        [6 * G, 2 * MiB - 6 * G, "clean"]]
