"""Short crash-torture runs in CI (scripts/torture.py; the long runs are
`scripts/torture --time 600` and `scripts/torture --power-loss --time
600`).  A run drives its own `clonectl serve`, stops it by PID, and exits
non-zero with a replay command on any invariant violation.  The power-loss
runs keep the state directory on scripts/powerfs.py (FUSE); their twins have
that disk ignore fsync, or fsync of directories, and must be caught."""

import os
import subprocess
import sys

import pytest

from tests.support import scripts
from tests.support.cli import REPO

pytest.importorskip("nbd")

# Rounds, not seconds: the same choices on a busy machine as on an idle one
# (40-80 s here).
TORTURE_ROUNDS = int(os.environ.get("TORTURE_ROUNDS", "8"))
POWER_LOSS_ROUNDS = int(os.environ.get("TORTURE_POWER_LOSS_ROUNDS", "10"))
REPLICATION_ROUNDS = int(os.environ.get("TORTURE_REPLICATION_ROUNDS", "7"))

needs_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or os.geteuid() != 0,
    reason="power-loss runs mount scripts/powerfs.py: need /dev/fuse, root")


def _torture(*args, rounds):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "torture.py"),
         "--rounds", str(rounds)] + list(args),
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
        timeout=60 * rounds)
    out = proc.stdout + proc.stderr
    summary = out.strip().splitlines()[-1]
    fields = summary.split()
    counts = {k: int(fields[fields.index(k) + 1])
              for k in ("rounds", "crashes", "power-cuts", "writes",
                        "secondary-kills", "replica-checks") if k in fields}
    return proc.returncode, out, summary, counts


def _passes(*args, rounds):
    """A run that must pass and do something; (summary, counts)."""
    rc, out, summary, counts = _torture(*args, rounds=rounds)
    assert rc == 0, out
    assert summary.endswith(": ok"), out
    assert counts["rounds"] == rounds, summary
    assert counts["crashes"] >= 1, summary
    assert counts["writes"] >= 100, summary
    return summary, counts


def test_torture_short_run():
    _passes("--seed", "1", rounds=TORTURE_ROUNDS)


@needs_fuse
def test_torture_power_loss_short_run():
    summary, counts = _passes("--power-loss", "--seed", "1",
                              rounds=POWER_LOSS_ROUNDS)
    assert counts["power-cuts"] >= 1, summary


@needs_fuse
def test_torture_sessions_only_power_loss_short_run():
    """No clones: the sessions are the Source's only layer, so its first
    writes after a mark are acknowledged once queued and applied after
    their saves are durable; kill -9s and power cuts among them."""
    summary, counts = _passes("--no-clones", "--power-loss", "--seed", "2",
                              rounds=POWER_LOSS_ROUNDS)
    assert counts["power-cuts"] >= 1, summary


@needs_fuse
@pytest.mark.parametrize("unsafe", ["--unsafe-ignore-fsync",
                                    "--unsafe-ignore-dir-fsync"])
def test_torture_power_loss_twin_fails(unsafe):
    """The same run on a disk whose fsync does nothing (what the target's
    flushes would be worth without their fdatasyncs), or whose fsync of a
    directory does nothing (renamed state files and maps, new files and
    removals come back as they were): the first power cut loses what the
    target counted as durable, and the checks must say so."""
    # Which round loses what depends on the operations a seed draws: the
    # twin counts as caught if one of three seeds catches it: a change of
    # the torture's operations may move the losing round past the last one
    # for a single seed.
    for seed in ("1", "2", "3"):
        rc, out, summary, counts = _torture(
            "--power-loss", unsafe, "--seed", seed, rounds=POWER_LOSS_ROUNDS)
        if rc == 1:
            break
    assert rc == 1, out
    assert "INVARIANT VIOLATED" in out, out
    assert "replay with: scripts/torture --seed " + seed in out, out
    assert unsafe in out, out
    assert counts["power-cuts"] >= 1, summary


def test_torture_replay_command_is_printed():
    """A failing run prints this: the seed and the run's parameters."""
    torture = scripts.load("torture")
    args = torture.parse_args(["--seed", "7", "--rounds", "3"])
    cmd = torture.replay_command(args)
    assert cmd.startswith("scripts/torture --seed 7 --rounds 3"), cmd


@needs_fuse
def test_torture_replication_with_power_loss_short_run():
    """The Source replicated (async) to a second target over a relay the
    run cuts; the secondary is killed too; the primary loses power."""
    summary, counts = _passes("--replication", "async", "--power-loss",
                              "--seed", "12", rounds=REPLICATION_ROUNDS)
    assert counts["replica-checks"] == REPLICATION_ROUNDS, summary
    # Seed 12 makes power cuts and a secondary kill in these rounds.
    assert counts["power-cuts"] >= 1, summary
    assert counts["secondary-kills"] >= 1, summary
