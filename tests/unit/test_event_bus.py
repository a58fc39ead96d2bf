"""target.events: the event bus, the watcher, and the Target's events and
map pictures (in-process, no nbdkit)."""

import threading
import time

import pytest

from target import events, inventory
from target.target import Target

MiB = 1 << 20
G = 64 << 10


def test_bus_numbers_events_and_waits_for_the_next():
    bus = events.EventBus(capacity=4)
    assert bus.since(0, timeout=0) == {"seq": 0, "events": [], "lost": 0}
    bus.emit("clone", "c1", state="syncing")
    res = bus.since(0)
    assert res["seq"] == 1 and res["lost"] == 0
    (e,) = res["events"]
    assert (e["seq"], e["kind"], e["object"], e["change"], e["state"]) == \
        (1, "clone", "c1", "changed", "syncing")
    assert e["time"].endswith("Z")

    threading.Timer(0.2, bus.emit, ("lu", "a", "new")).start()
    start = time.monotonic()
    res = bus.since(1, timeout=5)
    assert [e["object"] for e in res["events"]] == ["a"]
    assert 0.1 < time.monotonic() - start < 4
    start = time.monotonic()
    assert bus.since(2, timeout=0.2)["events"] == []
    assert time.monotonic() - start >= 0.2

    for i in range(6):
        bus.emit("lu", "x{}".format(i))
    res = bus.since(2)
    # Events 3 to 8 were emitted, the ring keeps the last 4 (5 to 8).
    assert [e["seq"] for e in res["events"]] == [5, 6, 7, 8]
    assert res["lost"] == 2


def test_watcher_reports_differences_and_notes_once():
    snap = {"lus": [{"name": "a", "size": MiB, "readonly": False,
                     "exported": True, "error": None}],
            "clones": [], "sessions": [], "rsgs": [],
            "recovery_problems": []}
    bus = events.EventBus()
    w = events.Watcher(bus, lambda: snap)
    w.check()           # the baseline: no events
    assert bus.seq == 0
    snap["lus"][0]["error"] = "gone"
    snap["clones"].append({"name": "c1", "source": "a", "state": "syncing",
                           "error": None, "broken": False,
                           "operation": None})
    # A callback reports the clone's state before a snapshot saw it.
    w.note("clone", "c1", {"state": "syncing", "error": None})
    w.check()
    ev = bus.since(0)["events"]
    assert [(e["kind"], e["object"], e["change"]) for e in ev] == \
        [("clone", "c1", "new"), ("lu", "a", "changed")], ev
    assert ev[1]["error"] == "gone" and "size" not in ev[1]
    snap["lus"].clear()
    w.check()
    assert bus.since(2)["events"][0]["change"] == "removed"


@pytest.fixture
def target(tmp_path):
    sd = inventory.StateDir(str(tmp_path / "state"))
    inventory.create_lu(sd, "a", size=MiB)
    t = Target(sd.path)
    t.start()
    yield t
    t.close()


def _wait(pred, timeout=10):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_target_events_of_a_clone_in_order(target):
    target.clone_add("a", "c1")
    target.clone_sync("c1")
    _wait(lambda: target.clone_status("c1")["state"] == "synchronized")
    target.clone_fracture("c1")
    _wait(lambda: any(e["kind"] == "operation" and e.get("running") is False
                      for e in target.events.since(0)["events"]))
    ev = target.events_since(seq=0, timeout=0)["events"]
    clone = [e for e in ev if e["kind"] == "clone"]
    assert clone[0]["change"] == "new", ev
    assert [e["state"] for e in clone if "state" in e][-3:] == \
        ["syncing", "synchronized", "fractured"], ev
    now = target.events_since()
    assert now["seq"] == target.events.seq
    states = {(e["kind"], e["object"]): e for e in now["events"]}
    assert states[("clone", "c1")]["state"] == "fractured"
    assert states[("lu", "a")]["change"] == "state"


def test_clone_picture_runs_and_folding(target):
    target.clone_add("a", "c1")
    target.clone_sync("c1")
    _wait(lambda: target.clone_status("c1")["state"] == "synchronized")
    target.clone_fracture("c1")
    conn = target.connect("a", False)
    conn.export.write(b"x" * 4096, 3 * G)
    conn.export.write(b"x" * (2 * G), 10 * G)
    target.disconnect(conn)
    m = target.clone_picture("c1")
    assert m["extents"] == 16 and m["scale"] == 1
    assert m["runs"] == {"clean": [[0, 3], [4, 10], [12, 16]],
                         "dirty": [[3, 4], [10, 12]]}
    assert m["counts"] == {"clean": 13, "dirty": 3}
    # Folded into 4 cells of 4 extents: a cell with a dirty extent is
    # dirty; the counts stay exact.
    m = target.clone_picture("c1", cells=4)
    assert m["scale"] == 4 and m["counts"] == {"clean": 13, "dirty": 3}
    assert m["runs"] == {"clean": [[4, 8], [12, 16]],
                         "dirty": [[0, 4], [8, 12]]}
