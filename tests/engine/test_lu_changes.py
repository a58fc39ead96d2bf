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
