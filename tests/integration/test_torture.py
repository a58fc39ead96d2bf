"""A short crash-torture run in CI (scripts/torture.py; the long runs are
`scripts/torture --time 600`).  The run drives its own `clonectl serve`,
stops it by PID, and exits non-zero with a replay command on any invariant
violation."""

import os
import subprocess
import sys

import pytest

from conftest import REPO

pytest.importorskip("nbd")

# Rounds, not seconds: the same choices on a busy machine as on an idle one
# (40-80 s here).
TORTURE_ROUNDS = int(os.environ.get("TORTURE_ROUNDS", "8"))


def test_torture_short_run():
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "torture.py"), "--seed", "1",
         "--rounds", str(TORTURE_ROUNDS)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
        timeout=60 * TORTURE_ROUNDS)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    summary = out.strip().splitlines()[-1]
    assert summary.endswith(": ok"), out
    fields = summary.split()
    # The run did something: rounds, kills and operations.
    assert int(fields[fields.index("rounds") + 1]) == TORTURE_ROUNDS, summary
    assert int(fields[fields.index("crashes") + 1]) >= 1, summary
    assert int(fields[fields.index("writes") + 1]) >= 100, summary


def test_torture_replay_command_is_printed():
    """A failing run prints this: the seed and the run's parameters."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import torture
    finally:
        sys.path.pop(0)
    args = torture.parse_args(["--seed", "7", "--rounds", "3"])
    cmd = torture.replay_command(args)
    assert cmd.startswith("scripts/torture --seed 7 --rounds 3"), cmd
