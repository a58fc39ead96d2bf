"""Files the target creates or removes survive a power cut as the state
says they are: their directory entries are fsynced (fsync(2): syncing a
file does not sync its entry in its directory).

The state directory lives on scripts/powerfs.py with every directory
operation not made durable lost at the cut (--unsynced-entries lose), the
strictest disk POSIX allows: otherwise, after a cut, state.json may name
an LU file that is gone, and `clonectl serve` cannot start.  Each test
here fails with its fsync taken out."""

import json
import os
import subprocess

import pytest

from target.fsutil import fsync_dir
from tests.support import scripts
from tests.support.cli import run_clonectl

torture = scripts.load("torture")

pytestmark = scripts.needs_powerfs


@pytest.fixture
def disk(tmp_path):
    d = torture.PowerFS(str(tmp_path), 0, subprocess.DEVNULL, writeback=0,
                        unsynced_entries="lose")
    d.start()
    yield d
    d.stop()


def lus(state_dir):
    return {lu["name"]: lu for lu in json.loads(
        run_clonectl(state_dir, "lu", "list", "--json").stdout)}


def test_a_created_lu_keeps_its_file(disk):
    state_dir = os.path.join(disk.mount, "state")
    run_clonectl(state_dir, "lu", "create", "db", "--size", "1M")
    disk.power_cycle()
    record = lus(state_dir)["db"]
    assert os.path.getsize(record["file"]) == 1 << 20


def test_a_deleted_lu_leaves_no_file_to_trip_over(disk):
    state_dir = os.path.join(disk.mount, "state")
    run_clonectl(state_dir, "lu", "create", "db", "--size", "1M")
    # The file's creation is durable whatever the create did, so that only
    # the removal is at stake.
    fsync_dir(os.path.join(state_dir, "lus"))
    run_clonectl(state_dir, "lu", "delete", "db")
    disk.power_cycle()
    assert "db" not in lus(state_dir)
    # A file brought back by the cut would make this refuse ("a file of
    # that name is already in the state directory").
    run_clonectl(state_dir, "lu", "create", "db", "--size", "1M")
