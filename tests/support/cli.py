"""Plugin: running the clonectl CLI of this worktree.

Fixtures: `state_dir` (a fresh, not yet existing state directory) and
`clonectl` (the CLI bound to it).  Helpers: `run_clonectl`, `status_json`,
`snapshot_tree`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_VENV_CLONECTL = REPO / ".venv" / "bin" / "clonectl"
CLONECTL = str(_VENV_CLONECTL if _VENV_CLONECTL.exists()
               else Path(sys.prefix) / "bin" / "clonectl")

MiB = 1 << 20


def run_clonectl(state_dir, *args, check=True, timeout=60, env=None,
                 input=None):
    """Run `clonectl --state-dir STATE_DIR ARGS...`; return CompletedProcess.

    With check, a non-zero exit fails the test showing stdout and stderr.
    """
    cmd = [CLONECTL]
    if state_dir is not None:
        cmd += ["--state-dir", str(state_dir)]
    cmd += [str(a) for a in args]
    full_env = dict(os.environ)
    full_env.pop("CLONECTL_STATE", None)
    if env:
        full_env.update(env)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=full_env, input=input,
                          stdin=None if input is not None else subprocess.DEVNULL)
    if check and proc.returncode != 0:
        pytest.fail("{} exited with {}\nstdout:\n{}\nstderr:\n{}".format(
            " ".join(cmd), proc.returncode, proc.stdout, proc.stderr))
    return proc


def status_json(state_dir):
    """`status --json`; exit status 3 (no server) and 4 (degraded) print
    the status too."""
    proc = run_clonectl(state_dir, "status", "--json", check=False)
    assert proc.returncode in (0, 3, 4), proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def state_dir(tmp_path):
    """A fresh, not yet existing state directory."""
    return tmp_path / "state"


@pytest.fixture
def clonectl(state_dir):
    """clonectl(*args, check=True, state_dir=<the state_dir fixture>)."""
    def run(*args, check=True, state_dir=state_dir, **kwargs):
        return run_clonectl(state_dir, *args, check=check, **kwargs)
    return run


def snapshot_tree(root):
    """{relative path: bytes or '<dir>'} of everything under root, to prove
    that a refused command changed nothing.  Runtime lock files are
    included: a refused command must not create or remove them either."""
    root = Path(root)
    result = {}
    if not root.exists():
        return result
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            result[rel] = "<link {}>".format(os.readlink(path))
        elif path.is_dir():
            result[rel] = "<dir>"
        elif path.is_socket():
            result[rel] = "<socket>"
        else:
            result[rel] = path.read_bytes()
    return result
