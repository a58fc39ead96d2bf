"""--state-dir is accepted before the subcommand and after it."""

import json

from tests.support.cli import run_clonectl, snapshot_tree


def test_state_dir_after_the_subcommand(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    run_clonectl(None, "lu", "create", "a", "--size", "1M",
                 "--state-dir", first)
    run_clonectl(None, "lu", "create", "b", "--size", "2M",
                 "--state-dir", second)
    assert (first / "lus" / "a.img").stat().st_size == 1 << 20
    assert not (first / "lus" / "b.img").exists()
    assert (second / "lus" / "b.img").stat().st_size == 2 << 20
    listed = json.loads(run_clonectl(None, "lu", "list", "--json",
                                     "--state-dir", second).stdout)
    assert [lu["name"] for lu in listed] == ["b"]


def test_state_dir_after_the_subcommand_wins_over_the_one_before(tmp_path):
    before, after = tmp_path / "before", tmp_path / "after"
    run_clonectl(before, "lu", "create", "a", "--size", "1M",
                 "--state-dir", after)
    assert snapshot_tree(before) == {}
    assert (after / "lus" / "a.img").exists()
    listed = json.loads(run_clonectl(None, "lu", "list", "--json",
                                     env={"CLONECTL_STATE": str(after)}).stdout)
    assert [lu["name"] for lu in listed] == ["a"]
