"""The state directory's own files: a --file never names one of them (by any
path: a symlinked state directory, a hard link), one file never backs two
LUs or clones, and broken state is reported instead of being reset."""

import json
import os

import pytest

from tests.support.cli import MiB, snapshot_tree, status_json


def _refused(proc, *fragments):
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr
    assert "Traceback" not in err, err
    # (an offline command may log what it found on the way first)
    assert err.strip().splitlines()[-1].startswith("clonectl: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


# ---------------------------------------------------------------- --file

@pytest.fixture
def linked(tmp_path, clonectl, state_dir):
    """The state directory (with LU db1) and a symlink to it."""
    clonectl("lu", "create", "db1", "--size", "1M")
    link = tmp_path / "link"
    link.symlink_to(state_dir)
    return link


def test_file_in_state_dir_reached_through_symlinked_state_dir(
        linked, state_dir, clonectl):
    before = snapshot_tree(state_dir)
    for sd, file in ((linked, state_dir / "state.json"),
                     (state_dir, linked / "state.json"),
                     (linked, linked / "state.json"),
                     (linked, state_dir / "lus" / "db1.img"),
                     (linked, state_dir / ".lock")):
        proc = clonectl("lu", "create", "x", "--file", file, check=False,
                        state_dir=sd)
        _refused(proc, "state directory")
        proc = clonectl("clone", "add", "db1", "c", "--file", file,
                        check=False, state_dir=sd)
        _refused(proc)
    assert snapshot_tree(state_dir) == before
    assert json.loads((state_dir / "state.json").read_text())["lus"].keys() \
        == {"db1"}


def test_hard_link_to_an_lu_image_is_refused(clonectl, state_dir, tmp_path):
    clonectl("lu", "create", "db1", "--size", "1M")
    hard = tmp_path / "hard.img"
    os.link(state_dir / "lus" / "db1.img", hard)
    before = snapshot_tree(state_dir)
    _refused(clonectl("clone", "add", "db1", "c", "--file", hard,
                      check=False), "db1")
    _refused(clonectl("lu", "create", "x", "--file", hard, check=False))
    assert snapshot_tree(state_dir) == before


def test_two_lus_on_hard_links_of_one_file(clonectl, state_dir, tmp_path):
    f = tmp_path / "f.img"
    f.write_bytes(b"f" * MiB)
    h = tmp_path / "h.img"
    os.link(f, h)
    clonectl("lu", "create", "a", "--file", f)
    before = snapshot_tree(state_dir)
    _refused(clonectl("lu", "create", "b", "--file", h, check=False),
             "already used by LU 'a'")
    clonectl("lu", "create", "c", "--size", "1M")
    before = snapshot_tree(state_dir)
    _refused(clonectl("clone", "add", "c", "cc", "--file", h, check=False),
             "already used by LU 'a'")
    assert snapshot_tree(state_dir) == before


# ---------------------------------------------------------------- rsg files

def test_corrupt_group_record_is_shown_and_not_overwritten(clonectl,
                                                           state_dir):
    clonectl("lu", "create", "db1", "--size", "1M")
    clonectl("rsg", "create", "g", "--volume", "db1", "--srl-size", "1M")
    rsg = state_dir / "rsg"
    (rsg / "g.json").write_text("{ not json")
    files = {p.name: p.read_bytes() for p in rsg.iterdir()}
    assert "g.srl" in files

    rows = json.loads(clonectl("rsg", "status", "--json").stdout)
    assert [r["name"] for r in rows] == ["g"]
    assert "not valid JSON" in rows[0]["error"], rows
    st = json.loads(clonectl("rsg", "status", "g", "--json").stdout)
    assert "not valid JSON" in st["error"], st
    text = clonectl("rsg", "status").stdout
    assert "g: not loaded" in text and "not valid JSON" in text, text

    proc = clonectl("rsg", "create", "g", "--volume", "db1", "--srl-size",
                    "1M", check=False)
    _refused(proc, "rsg/g.json", "rsg delete g")
    assert {p.name: p.read_bytes() for p in rsg.iterdir()} == files

    clonectl("rsg", "delete", "g")
    assert [p.name for p in rsg.iterdir()] == []
    clonectl("rsg", "create", "g", "--volume", "db1", "--srl-size", "1M")
    assert json.loads(clonectl("rsg", "status", "g", "--json").stdout)[
        "role"] == "primary"


def test_corrupt_group_record_is_shown_by_a_server(clonectl, state_dir,
                                                   server_factory):
    clonectl("lu", "create", "db1", "--size", "1M")
    clonectl("rsg", "create", "g", "--volume", "db1", "--srl-size", "1M")
    (state_dir / "rsg" / "g.json").write_text("[]")
    server_factory()
    rows = json.loads(clonectl("rsg", "status", "--json").stdout)
    assert [(r["name"], "not a replicated group record" in r["error"])
            for r in rows] == [("g", True)], rows
    st = status_json(state_dir)
    assert any(p.get("rsg") == "g" for p in st["problems"]), st
    proc = clonectl("status", check=False)
    # A group that did not load degrades the status (exit status 4).
    assert proc.returncode == 4 and "degraded: group g" in proc.stdout, \
        proc.stdout


# ---------------------------------------------------------------- state.json

def test_missing_state_file_with_images_refuses_to_serve(clonectl, state_dir,
                                                         tmp_path):
    clonectl("lu", "create", "db1", "--size", "1M")
    clonectl("clone", "add", "db1", "c1")
    (state_dir / "state.json").unlink()
    before = snapshot_tree(state_dir)
    for args in (["serve", "--socket", tmp_path / "s.sock"],
                 ["serve", "--socket", tmp_path / "s.sock", "--detach"]):
        proc = clonectl(*args, check=False, timeout=60)
        _refused(proc, "state.json", "lus/db1.img", "lus/c1.img")
        after = snapshot_tree(state_dir)
        after.pop("run/serve.log", None)
        assert after == before
        assert not (tmp_path / "s.sock").exists()
