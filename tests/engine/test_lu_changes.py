"""Changes of an LU itself (resize, delete) and of its layers (a clone
added, a session created) are one at a time: a resize or a delete that
comes while a clone is being added waits for it, and is then refused for
it.  Before, the resize went through between the clone's checks and its
record: the clone was left at the old size under a larger LU, and a
host write past its end made its sync never end."""

import threading

import pytest

from target import clones, errors
from target.target import Target

MiB = 1 << 20


@pytest.fixture
def target(tmp_path):
    t = Target(str(tmp_path / "state"))
    yield t
    t.close()


@pytest.mark.parametrize("change", ["resize", "delete"])
def test_a_change_of_the_lu_waits_for_a_clone_being_added(target,
                                                          monkeypatch, change):
    target.lu_create("a", size="1M")
    entered, go = threading.Event(), threading.Event()
    add = clones.CloneGroup.add_clone

    def held(self, *args, **kwargs):
        entered.set()
        go.wait(10)
        return add(self, *args, **kwargs)
    monkeypatch.setattr(clones.CloneGroup, "add_clone", held)
    adder = threading.Thread(target=target.clone_add, args=("a", "c"))
    adder.start()
    assert entered.wait(10)
    result = {}

    def run():
        try:
            if change == "resize":
                result["done"] = target.lu_resize("a", "2M")
            else:
                result["done"] = target.lu_delete("a")
        except errors.Error as e:
            result["error"] = e
    changer = threading.Thread(target=run)
    changer.start()
    changer.join(0.5)
    went_through = dict(result)
    go.set()
    adder.join(10)
    changer.join(10)
    assert not went_through, went_through
    assert "it has clones (c)" in str(result.get("error")), result
    assert target.lus["a"].size == MiB
    assert target.clone_status("c")["extents_total"] * \
        target.clone_status("c")["granularity"] >= MiB


def test_a_reload_does_not_reopen_an_lu_under_its_hosts(target,
                                                        monkeypatch):
    """state.json edited by hand (here the LU made read-only) and a
    reload while a host is connected: reopening the LU would leave the
    host writing through the old one, whose sessions and clones are
    closed, uncounted (a delete then went through under it) and untracked
    (the session's next update sent nothing of it).  The change waits
    until the host is gone, and says so."""
    target.lu_create("a", size="1M")
    conn = target.connect("a", False)
    lu = target.lus["a"]
    with target.state_dir.editing() as doc:
        doc["lus"]["a"]["readonly"] = True
    target.reload()
    assert target.lus["a"] is lu and not lu.readonly
    problems = [p for p in target.status()["recovery_problems"]
                if p.get("lu") == "a"]
    assert problems and "1 host connection" in problems[0]["message"], \
        target.status()["recovery_problems"]
    with pytest.raises(errors.LUBusy):
        target.lu_delete("a")
    target.disconnect(conn)
    target.reload()
    assert target.lus["a"] is not lu and target.lus["a"].readonly
    assert not [p for p in target.status()["recovery_problems"]
                if p.get("lu") == "a"]
