"""Who owns an LU's file in the target, on the paths that fail.

Each opening of a backing file names its owner (target.filelocks): a
file left registered to an owner that is gone refuses every later one,
and an LU held for one reason must not be served because another
reason went away.
"""

import errno
import json
import os

import pytest

from target import clones, filelocks, inventory
from target.target import Target

from tests.support.sessionfakes import full_state_dir, one_lu_target, \
    start_with_full_maps

GRAN = 4096
SIZE = GRAN * 64


def _ext(tmp_path, name="ext.img"):
    p = tmp_path / name
    with open(p, "wb") as f:
        f.truncate(SIZE)
    return str(p)


def test_a_failed_clone_add_leaves_its_file_to_no_one(tmp_path, monkeypatch):
    """clone_add opens the clone's file, then its group cannot be made:
    the file is closed again, or it would stay clone c's (a clone that
    does not exist) and refuse every later owner."""
    t, _ = one_lu_target(tmp_path, SIZE)
    f = _ext(tmp_path)
    try:
        def enospc(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")
        with monkeypatch.context() as m:
            m.setattr(clones, "CloneGroup", enospc)
            with pytest.raises(OSError):
                t.clone_ops.clone_add("src", "c", file=f)
        t.lu_create("x", file=f)        # c does not exist
        assert t.lus["x"].healthy, t.lus["x"].error
    finally:
        t.close()


def test_a_reload_retires_gone_lus_before_it_opens_new_ones(tmp_path):
    """state.json now has LU b on a's file and no a (edited, then
    SIGHUP); a has no connection: b takes the file."""
    state = inventory.StateDir(str(tmp_path / "state"))
    state.ensure()
    f = _ext(tmp_path)
    inventory.create_lu(state, "a", file=f)
    t = Target(state.path)
    try:
        assert t.lus["a"].healthy
        with state.editing() as doc:
            doc["lus"]["b"] = doc["lus"].pop("a")
        t.reload()
        assert t.lus["b"].healthy, t.lus["b"].error
    finally:
        t.close()


def test_a_session_that_fails_to_load_lets_go_of_its_files(tmp_path,
                                                          monkeypatch):
    t, _ = one_lu_target(tmp_path, SIZE)
    t.session_ops.create_session(t.lus["src"], "s", [
        {"uri": "nbd://127.0.0.1:1/none", "peer": None}], "4K", None)
    t.close()
    assert not filelocks._held
    t = start_with_full_maps(tmp_path, monkeypatch, ".track")
    try:
        assert "s" not in t.sessions
    finally:
        t.close()
    assert not filelocks._held


def test_an_lu_held_for_a_session_stays_held_when_a_group_lets_go(
        tmp_path, monkeypatch):
    """Disk full: the session's map cannot be rewritten nor its record
    saved, so the LU is held for it.  A group of that LU also failed to
    load; `rsg delete` of it (unlinks work on a full disk) releases the
    group's hold only."""
    t, _ = one_lu_target(tmp_path, SIZE)
    t.session_ops.create_session(t.lus["src"], "s", [
        {"uri": "nbd://127.0.0.1:1/none", "peer": None}], "4K", None)
    t.session_ops.session_mark("s")
    rsg_dir = t.state_dir.rsg_dir
    t.close()
    os.makedirs(rsg_dir, exist_ok=True)
    with open(os.path.join(rsg_dir, "g.json"), "w") as f:
        json.dump({"name": "g", "volumes": [{"lu": "src"}]}, f)

    full_state_dir(monkeypatch)
    t = start_with_full_maps(tmp_path, monkeypatch, ".track")
    try:
        lu = t.lus["src"]
        t.rsg_ops.rsg_delete("g")
        assert not lu.healthy, "served while session s (recorded marked) is unloaded"
    finally:
        t.close()
