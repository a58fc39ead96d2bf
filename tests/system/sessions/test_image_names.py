"""User session names never reach the protected images a peer asks for:
an LU's protected image is an internal session (exported as
LU@protected-LU) that no `session create` can name or stand in for."""

from pathlib import Path

import pytest


from tests.support.clonelib import MiB, read_range

pytest.importorskip("nbd")

SIZE = 4 * MiB


def test_user_session_cannot_pose_as_a_protected_image(session_env, dests,
                                                       tmp_path):
    env = session_env
    env.cli("lu", "create", "a", "--size", str(SIZE))
    env.cli("lu", "create", "db1", "--size", str(SIZE))
    Path(env.img("a")).write_bytes(b"A" * SIZE)
    Path(env.img("db1")).write_bytes(b"D" * SIZE)
    env.start_server()
    dest = dests.qemu_nbd(dests.make_file(tmp_path / "dest.img", SIZE))

    created = env.cli("session", "create", "a", "protected-db1", "--dest",
                      dest.uri, check=False)
    if created.returncode == 0:
        # Accepted: freeze a's data and change a, so a rollback taking
        # this session for db1's image would copy a's old data into db1.
        env.cli("session", "mark", "protected-db1")
        env.write_export("a", 0, b"n" * (1 * MiB))
        assert env.cli_json("session", "status", "protected-db1")[
            "marked"]
    rollback = env.cli("lu", "rollback", "db1", check=False)
    assert env.read_export("db1", 0, SIZE) == b"D" * SIZE
    assert read_range(env.img("db1"), 0, 1 * MiB) == b"D" * MiB
    assert rollback.returncode == 1, rollback.stdout
    assert "no protected image" in rollback.stderr, rollback.stderr
    assert created.returncode == 1, created.stdout
    assert "reserved" in created.stderr and "Traceback" not in \
        created.stderr, created.stderr
    assert [s["name"] for s in env.slist()] == []
    # The same name on db1 itself is refused too.
    env.refused("session", "create", "db1", "protected-db1", "--dest",
                dest.uri, match="reserved")
