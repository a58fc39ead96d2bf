"""A backing file clonectl makes or removes, and its record, across a
kill -9 between the two.

Each command runs in a child process (a Target, as the server's, or the
inventory, as the CLI's offline path) that exits at once (os._exit: no
cleanup, as a kill -9) at the step named; the test then takes the state
directory over, as the next start or command does.  Before, the file a
create made or a delete had not removed yet stayed in lus/ with no record
naming it, and every later create of that name was refused ("a file of
that name is already in the state directory") until an admin removed it
by hand."""

import os
import subprocess
import sys
import textwrap

import pytest

from target import errors, inventory
from target.target import Target

MiB = 1 << 20

# The child: CRASH names the step it dies at.
CHILD = textwrap.dedent("""
    import os, sys
    from target import fsutil, inventory
    from target.target import Target
    state, step = sys.argv[1], sys.argv[2]

    def die(*args, **kwargs):
        os._exit(9)

    save = inventory.StateDir.save
    remove = fsutil.remove_durably

    def remove_until(named):
        def run(paths, *args, **kwargs):
            if any(os.path.basename(p) == named + ".img" for p in paths):
                die()
            remove(paths, *args, **kwargs)
        return run

    def save_until(named):
        def run(self, doc):
            recorded = named in doc["lus"] or any(
                named in lu.get("clones", {}) for lu in doc["lus"].values())
            if recorded:
                die()
            save(self, doc)
        return run

    if step == "lu create":
        inventory.StateDir.save = save_until("a")
        inventory.create_lu(inventory.StateDir(state), "a", size="1M")
    elif step == "lu delete":
        fsutil.remove_durably = remove_until("a")
        inventory.delete_lu(inventory.StateDir(state), "a")
    elif step == "clone add":
        inventory.StateDir.save = save_until("c")
        Target(state).clone_add("a", "c")
    elif step == "clone remove":
        fsutil.remove_durably = remove_until("c")
        Target(state).clone_remove("c")
    raise SystemExit("no crash at " + step)
""")


def crash_at(state, step):
    proc = subprocess.run([sys.executable, "-c", CHILD, str(state), step],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr


@pytest.fixture
def state(tmp_path):
    return tmp_path / "state"


def test_a_create_cut_short_leaves_the_name_free(state):
    crash_at(state, "lu create")
    # The next command (the CLI's offline path) settles it.
    inventory.create_lu(inventory.StateDir(state), "a", size="2M")
    t = Target(str(state))
    try:
        assert t.lus["a"].size == 2 * MiB
    finally:
        t.close()


def test_a_delete_cut_short_removes_its_file_at_the_next_start(state):
    sd = inventory.StateDir(state)
    inventory.create_lu(sd, "a", size="1M")
    path = sd.owned_backing("a")
    with open(path, "r+b") as f:
        f.write(b"deleted data")
    crash_at(state, "lu delete")
    assert os.path.exists(path)
    Target(str(state)).close()
    assert not os.path.exists(path)
    inventory.create_lu(sd, "a", size="1M")
    with open(path, "rb") as f:
        assert f.read(12) == bytes(12)


@pytest.mark.parametrize("step", ["clone add", "clone remove"])
def test_a_clone_add_or_remove_cut_short_leaves_the_name_free(state, step):
    sd = inventory.StateDir(state)
    inventory.create_lu(sd, "a", size="1M")
    if step == "clone remove":
        t = Target(str(state))
        t.clone_add("a", "c")
        t.close()
    crash_at(state, step)
    t = Target(str(state))
    try:
        if step == "clone remove":
            assert not os.path.exists(sd.owned_backing("c"))
        t.clone_add("a", "c")
        assert t.clone_status("c")["state"] == "out-of-sync"
    finally:
        t.close()


def test_a_file_no_command_left_pending_is_left_alone(state):
    """A file in lus/ that no record names and no interrupted command
    made (an older state.json put back, say) may be an LU's data: it is
    neither removed at a start nor taken by a create."""
    sd = inventory.StateDir(state)
    sd.ensure()
    os.makedirs(sd.lus_dir, exist_ok=True)
    path = sd.owned_backing("z")
    with open(path, "wb") as f:
        f.write(b"an LU's data")
    for _ in range(2):
        Target(str(state)).close()
        with pytest.raises(errors.BackingUnusable):
            inventory.create_lu(sd, "z", size="1M")
        t = Target(str(state))
        try:
            t.lu_create("y", size="1M")
            with pytest.raises(errors.BackingUnusable):
                t.clone_add("y", "z")
        finally:
            t.close()
        with open(path, "rb") as f:
            assert f.read() == b"an LU's data"
        inventory.delete_lu(sd, "y")
