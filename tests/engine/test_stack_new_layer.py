"""A layer put into an LU's I/O stack sees every change that lands after
it is in place: changes already on their way below its slot when it
arrives (a host write held in the backing file, a replicated apply) are
waited for, and an entry point an engine took earlier leads through it.

Without that, a Source's first clone could miss a host write that was
still in flight when the clone was added: its first sync copies the
extent before the write lands, clears the extent's bit, and the clone
differs from the Source under a clean bit."""

import threading

import pytest

from target import backends, clones, iostack, sessions
from target.lu import LogicalUnit
from target.replication.layer import TakeGuard
from tests.support.clonegroup import GRAN, SIZE
from tests.support.sessionfakes import FakeLU, frozen_image
from tests.support.spybackend import GatedWrites

HELD = 0.3      # how long a held change keeps a new layer's `set` waiting


def _lu(base):
    return LogicalUnit("src", {"size": SIZE, "file": "-", "readonly": False},
                       backend=base)


class Recorder(iostack.Layer):
    """A layer that notes the changes passing it."""

    def __init__(self):
        self.seen = []

    def intercepts(self):
        return {"write": self.write}

    def write(self, buf, offset, fua=False):
        self.seen.append(offset)
        self.inner.write(buf, offset, fua)


def _held(base, request):
    """Run request in a thread until it is held in base; return the
    thread."""
    base.gate = True
    t = threading.Thread(target=request, daemon=True)
    t.start()
    assert base.writing.wait(10)
    return t


def _waited(base, action):
    """Run action in a thread; if it still runs after HELD (waiting for
    the change held in base), let that change land.  Whether it waited."""
    t = threading.Thread(target=action, daemon=True)
    t.start()
    t.join(HELD)
    waited = t.is_alive()
    if waited:
        base.go.set()
        t.join(10)
        assert not t.is_alive()
    return waited


def _new_layer_waited(lu, base, request):
    """Whether a layer put into lu's empty clones slot while request is
    held in base waited for it."""
    held = _held(base, request)
    waited = _waited(base, lambda: lu.stack.set("clones", Recorder()))
    base.go.set()
    held.join(10)
    return waited


def test_a_new_layer_waits_for_changes_already_below_its_slot():
    base = GatedWrites(SIZE)
    lu = _lu(base)
    waited = _new_layer_waited(lu, base,
                               lambda: lu.write(b"w" * GRAN, 0))
    assert waited, "the layer was in place while a write it never saw " \
        "was still on its way to the backing file"


def test_a_layer_taken_out_does_not_wait():
    """Taking a layer out never waits: what it held back (a clone group's
    quiesced writes) enters the stack again after the relink."""
    base = GatedWrites(SIZE)
    lu = _lu(base)
    layer = Recorder()
    lu.stack.set("clones", layer)
    writer = _held(base, lambda: lu.write(b"w" * GRAN, 0))
    waited = _waited(base, lambda: lu.stack.remove("clones", layer))
    base.go.set()
    writer.join(10)
    assert not waited, "taking a layer out waited for a change in flight"


def test_an_entry_taken_before_a_layer_arrives_leads_through_it():
    lu = _lu(GatedWrites(SIZE))
    entry = lu.stack.below("guard")
    layer = Recorder()
    lu.stack.set("clones", layer)
    entry.write(b"e" * GRAN, GRAN)
    assert layer.seen == [GRAN]


CHANGES = {
    "write": lambda lu: lu.write(b"h" * GRAN, 3 * GRAN),
    "zero": lambda lu: lu.zero(3 * GRAN, GRAN),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_first_clone_added_while_a_host_change_is_in_flight(tmp_path,
                                                            change):
    base = GatedWrites(SIZE)
    base.write(b"o" * SIZE, 0)
    lu = _lu(base)
    group = clones.CloneGroup(lu, GRAN, str(tmp_path),
                              lambda *a, **k: None)
    clone_mem = GatedWrites(SIZE)
    writer = _held(base, lambda: CHANGES[change](lu))
    _waited(base, lambda: group.add_clone("c1", clone_mem))
    engine = group.start_sync("c1", run=False)
    while engine.step():
        pass
    assert engine.finish()
    base.go.set()
    writer.join(10)
    clone = group.clones["c1"]
    differing = [e for e in range(SIZE // GRAN) if not clone.delta[e] and
                 base.data[e * GRAN:(e + 1) * GRAN] !=
                 clone_mem.data[e * GRAN:(e + 1) * GRAN]]
    assert differing == [], "the clone differs from the Source under " \
        "clean bits at extents {}".format(differing)
    group.close()


@pytest.mark.parametrize("defer", [False, True],
                         ids=["synchronous", "deferred"])
def test_a_session_added_while_a_write_is_in_flight_sees_it(tmp_path,
                                                            defer):
    """The same within a layer: a second session of a Source, added and
    marked while a host write that the sessions before it were shown is
    on its way to the Source, keeps a frozen image that does not change
    when that write lands (deferred: the sessions are the LU's only
    layer, and a write with no save to wait for goes straight on)."""
    size = 16 * GRAN
    base = GatedWrites(size)
    base.write(b"o" * size, 0)
    layer = sessions.SessionLayer(base, defer=defer)
    lu = FakeLU(layer, size)

    def session(name):
        save = backends.MemoryBackend(sessions.SaveArea.minimum_size(
            size // GRAN, GRAN) + size)
        s = sessions.Session(name, lu, GRAN, str(tmp_path), save, [],
                             persist=lambda record: None)
        s.create()
        return s
    layer.add(session("s1"))
    # The extent in the activity map already (until the next flush), the
    # held write below has nothing to wait for: deferred or not, it goes
    # straight on.  (The read waits for the first write to be applied.)
    layer.write(b"x" * GRAN, 3 * GRAN)
    layer.readinto(bytearray(GRAN), 3 * GRAN)
    writer = _held(base, lambda: layer.write(b"h" * GRAN, 3 * GRAN))
    s2 = session("s2")
    _waited(base, lambda: layer.add(s2))
    s2.mark()
    before = frozen_image(s2)
    base.go.set()
    writer.join(10)
    after = frozen_image(s2)
    layer.close()           # ends the deferred layer's applier thread
    assert after == before, "the frozen image of a session changed after " \
        "its mark"


def test_a_take_on_its_way_below_a_take_guard_is_waited_for():
    """A primary taking a secondary's changes writes them beneath its
    TakeGuard, in the link's thread, not a host request: a first clone
    added meanwhile waits for that write too."""
    base = GatedWrites(SIZE)
    lu = _lu(base)
    guard = TakeGuard([(0, GRAN)], lambda a, b: [], lu.stack.below("guard"))
    lu.stack.set("guard", guard)
    waited = _new_layer_waited(
        lu, base, lambda: guard.take(b"t" * GRAN, 0))
    assert waited, "the layer was in place while a take it never saw was " \
        "still on its way to the backing file"
