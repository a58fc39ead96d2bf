"""Bad input reaches no traceback and leaves nothing behind: sizes beyond
what a file can hold, state directories that cannot be used, control
requests whose arguments have the wrong type."""

import os

import pytest

from tests.support.cli import run_clonectl, snapshot_tree

from target import control


def _skip_unless_too_large_here(directory, size):
    """EFBIG is what ext4 says; a file system that holds such a sparse file
    (xfs, btrfs) has nothing to refuse."""
    probe = os.path.join(directory, "probe")
    try:
        with open(probe, "wb") as f:
            f.truncate(size)
    except OSError:
        return
    finally:
        if os.path.exists(probe):
            os.unlink(probe)
    pytest.skip("this file system holds a {}-byte file".format(size))


def _refused(proc, *fragments):
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clonectl: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


@pytest.mark.parametrize("size, fragment", [
    ("16T", "too large"),                # EFBIG on ext4 (4 KiB blocks)
    ("99999999999999P", "too large"),    # beyond off_t
    ("1.0000000000000001K", "whole number"),
    pytest.param("1" + "0" * 400, "too large", id="401-digits"),
])
def test_lu_create_size_out_of_reach(clonectl, state_dir, size, fragment):
    clonectl("lu", "create", "keep", "--size", "1M")
    if size == "16T":
        _skip_unless_too_large_here(state_dir, 16 << 40)
    before = snapshot_tree(state_dir)
    proc = clonectl("lu", "create", "big", "--size", size, check=False)
    _refused(proc, fragment)
    assert sorted(os.listdir(state_dir / "lus")) == ["keep.img"]
    assert snapshot_tree(state_dir) == before


@pytest.mark.parametrize("size, fragment", [
    ("99999999999P", "too large"),       # beyond off_t
    ("7P", "File too large"),            # EFBIG on ext4
])
def test_rsg_create_srl_too_large(clonectl, state_dir, size, fragment):
    clonectl("lu", "create", "db1", "--size", "1M")
    if size == "7P":
        _skip_unless_too_large_here(state_dir, 7 << 50)
    before = snapshot_tree(state_dir)
    proc = clonectl("rsg", "create", "g", "--volume", "db1", "--srl-size",
                    size, check=False)
    _refused(proc, fragment)
    after = snapshot_tree(state_dir)
    assert {k for k in after if k.startswith("rsg/") and after[k] !=
            "<dir>"} == set()
    assert after.get("state.json") == before["state.json"]


@pytest.mark.parametrize("kind", ["too-long", "not-a-directory",
                                  "not-accessible", "file-inside-path"])
def test_unusable_state_directory(tmp_path, kind):
    if kind == "too-long":
        path = tmp_path / ("x" * 300)
        fragment = "File name too long"
    elif kind == "not-a-directory":
        path = tmp_path / "plain"
        path.write_text("not a state directory\n")
        fragment = "Not a directory"
    elif kind == "not-accessible":
        path = "/sys/clonectl-test-state"   # refused even to root
        fragment = "/sys/clonectl-test-state"
    else:
        (tmp_path / "plain").write_text("x")
        path = tmp_path / "plain" / "state"
        fragment = "Not a directory"
    commands = [["lu", "create", "a", "--size", "1M"], ["clone", "list"],
                ["serve", "--socket", tmp_path / "s.sock"]]
    if kind != "not-accessible":
        # Reading a state directory that does not exist yet is no error.
        commands += [["lu", "list"], ["status", "--json"]]
    for args in commands:
        proc = run_clonectl(path, *args, check=False)
        err = _refused(proc, fragment)
        assert "state directory" in err, err


def test_control_request_list_argument_given_a_string(server, clonectl):
    clonectl("lu", "create", "db1", "--size", "1M")
    sock = os.path.join(server.state_dir, "run", "control.sock")
    with pytest.raises(control.errors.ControlError) as info:
        control.call(sock, "rsg_create", name="g", volumes="db1",
                     srl_size="1M")
    assert info.value.code == "InvalidArgument", info.value
    assert "volumes" in str(info.value) and "list" in str(info.value)
    with pytest.raises(control.errors.ControlError) as info:
        control.call(sock, "session_create", source="db1", name="s",
                     dests="nbd://x/y")
    assert info.value.code == "InvalidArgument", info.value
    with pytest.raises(control.errors.ControlError) as info:
        control.call(sock, "clone_add", source=["db1"], clone="c")
    assert info.value.code == "InvalidArgument", info.value
    assert control.call(sock, "rsg_list") == []
    assert [c["name"] for c in control.call(sock, "clone_list")] == []


def test_rsg_split_brain_policy_set_and_refused(clonectl, state_dir):
    """The policy is chosen at create, changed with `rsg set`, saved in the
    group record; `rsg set` with nothing to set changes nothing."""
    import json
    clonectl("lu", "create", "db1", "--size", "1M")
    clonectl("rsg", "create", "g", "--volume", "db1", "--srl-size", "1M",
             "--after-split-brain", "discard-zero-changes")
    record = state_dir / "rsg" / "g.json"
    assert json.loads(record.read_text())["after_split_brain"] == \
        "discard-zero-changes"
    clonectl("rsg", "set", "g", "--after-split-brain", "discard-secondary")
    st = json.loads(clonectl("rsg", "status", "g", "--json").stdout)
    assert st["after_split_brain"] == "discard-secondary"
    before = snapshot_tree(state_dir)
    proc = clonectl("rsg", "set", "g", check=False)
    _refused(proc, "nothing to set")
    proc = clonectl("rsg", "set", "g", "--after-split-brain", "violently",
                    check=False)
    assert proc.returncode != 0 and "violently" in proc.stderr
    assert snapshot_tree(state_dir) == before
