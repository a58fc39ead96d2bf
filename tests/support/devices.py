"""Block devices for tests: loop_device, a loop device over a sparse
file (needs root and a free /dev/loopN; the test is skipped without)."""

import subprocess

import pytest

LOOP_SIZE = 16 << 20


@pytest.fixture
def loop_device(tmp_path):
    """The path of a loop device over a 16M sparse file, detached at
    teardown."""
    backing = tmp_path / "loop.img"
    with open(backing, "wb") as f:
        f.truncate(LOOP_SIZE)
    proc = subprocess.run(["losetup", "--find", "--show", str(backing)],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        pytest.skip("no loop device: " + proc.stderr.strip())
    dev = proc.stdout.strip()
    yield dev
    subprocess.run(["losetup", "--detach", dev], timeout=30)
