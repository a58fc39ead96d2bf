"""A copy on first write saves the blocks a write changes, not its whole
extent: a 4 KiB host write into a 64 KiB extent of a marked Source makes
about 4 KiB durable in the save area (the flush's cost grows with the
bytes it writes back), and the frozen image stays whole, before and
after the save area is read back from its backend."""

import os
import random
import tempfile
import threading

import pytest

from target import backends, inventory, sessions
from target.target import Target

from tests.support.sessionfakes import FakeLU, frozen_image, one_lu_target
from tests.support.spybackend import GatedReads, Spy

KiB = 1024
G = 64 * KiB
N = 4
SIZE = G * N


def written(spy):
    return sum(n for op, _, n in spy.ops if op == "write")


@pytest.fixture
def marked():
    """(Source, save area spy, session, the frozen image): a Source of
    random data with a session marked, its frozen image exported (every
    extent protected)."""
    inner = backends.MemoryBackend(SIZE)
    inner.write(random.Random(7).randbytes(SIZE), 0)
    lu = FakeLU(sessions.SessionLayer(inner), SIZE)
    save = Spy(sessions.SaveArea.minimum_size(N, G) + SIZE)
    s = sessions.Session("s", lu, G, tempfile.mkdtemp(prefix="blocks-"),
                         save, [], persist=lambda record: None)
    s.create()
    lu.backend.add(s)
    s.mark(export=True)
    save.ops.clear()
    return inner, save, s, frozen_image(s)


def test_a_small_first_write_saves_its_blocks_only(marked):
    inner, save, s, frozen = marked
    s.layer.write(os.urandom(4 * KiB), G + 8 * KiB)
    assert 4 * KiB <= written(save) < 8 * KiB, save.ops
    assert frozen_image(s) == frozen
    # Another block of the same extent is saved in turn; a block saved
    # already is not saved again.
    save.ops.clear()
    s.layer.write(os.urandom(6 * KiB), G + 14 * KiB)
    assert 8 * KiB <= written(save) < 12 * KiB, save.ops
    save.ops.clear()
    s.layer.write(os.urandom(KiB), G + 9 * KiB)
    assert written(save) == 0, save.ops
    assert frozen_image(s) == frozen
    assert inner.data != frozen


def test_saved_blocks_are_read_back_after_a_restart(marked):
    inner, save, s, frozen = marked
    rng = random.Random(3)
    for _ in range(40):
        n = rng.choice((512, 4 * KiB, 20 * KiB, G + 4 * KiB))
        s.layer.write(rng.randbytes(n), rng.randrange(0, SIZE - n, 512))
    assert frozen_image(s) == frozen
    lu = FakeLU(sessions.SessionLayer(inner), SIZE)
    again = sessions.Session("s", lu, G, os.path.dirname(s.base), save, [], persist=lambda record: None,
                             marked=True, export=True)
    assert again.load() == []
    lu.backend.add(again)
    assert again.save_area.slots == s.save_area.slots
    assert frozen_image(again) == frozen


def test_a_save_area_it_cannot_read_unmarks_and_loses_nothing(marked):
    """A marked session whose save area has no header of this version (a
    save area of an older format after an upgrade, or a header the disk
    lost) is unmarked at load, with the reason in its problems, and every
    extent it had to send is tracked for the next transfer: its frozen
    image is never read from bytes it cannot vouch for."""
    inner, save, s, frozen = marked
    s.layer.write(os.urandom(4 * KiB), 2 * G)
    save.data[:8] = bytes(8)
    lu = FakeLU(sessions.SessionLayer(inner), SIZE)
    again = sessions.Session("s", lu, G, os.path.dirname(s.base), save,
                             [{"uri": "m"}], persist=lambda record: None,
                             marked=True, export=True)
    # (Its destination's pending map was never saved: every extent.)
    problems = again.load()
    assert not again.marked
    assert any("save area holds no frozen image" in p for p in problems), \
        problems
    assert again.error and "unmarked" in again.error
    assert again.tracking.bits == b"\x01" * N


def test_a_session_of_the_former_default_size_is_grown_to_hold_every_block(
        tmp_path):
    """A session made when the save area saved whole extents has the
    default size of that layout (an index of 8 bytes an extent, and the
    extents): too small for this layout's entries.  At load it is grown
    to this layout's default, so that it still can never fill."""
    size = 64 * G
    t, _ = one_lu_target(tmp_path, size)
    try:
        t.session_ops.create_session(
            t.lus["src"], "s", [{"uri": "nbd://127.0.0.1:1/none",
                                 "peer": None}], None, None)
    finally:
        t.close()
    former = (64 * 8 + 4095) // 4096 * 4096 + size
    state = inventory.StateDir(str(tmp_path / "state"))
    doc = state.load()
    doc["lus"]["src"]["sessions"]["s"]["save_area"] = former
    state.save(doc)
    path = state.save_area("src", "s")
    os.truncate(path, former)
    t = Target(state.path)
    try:
        area = t.sessions["s"].save_area
        assert area.capacity >= area.blocks
        assert os.path.getsize(path) == sessions.SaveArea.size_for(64, G)
        assert t.sessions["s"].status()["save_area"]["size"] == \
            os.path.getsize(path)
    finally:
        t.close()


def test_a_frozen_read_overtaken_by_a_new_mark_fails(tmp_path):
    """An export's reader reads a saved block from its slot while a
    forced unmark, a new mark and a first write (which takes the same
    slot for another block) overtake it: it fails (ESTALE), never
    returning the other block's old data as its own."""
    inner = backends.MemoryBackend(SIZE)
    inner.write(random.Random(5).randbytes(SIZE), 0)
    lu = FakeLU(sessions.SessionLayer(inner), SIZE)
    save = GatedReads(sessions.SaveArea.minimum_size(N, G) + SIZE)
    s = sessions.Session("s", lu, G, str(tmp_path), save, [],
                         persist=lambda record: None)
    s.create()
    lu.backend.add(s)
    s.mark(export=True)
    first = bytes(inner.data[:4 * KiB])
    s.layer.write(os.urandom(4 * KiB), 0)       # block 0 saved in slot 0
    out = []

    def read():
        buf = bytearray(4 * KiB)
        try:
            s.read_frozen(buf, 0)
            out.append(bytes(buf))
        except sessions.FrozenImageGone as e:
            out.append(e)
    save.gate = True
    reader = threading.Thread(target=read)
    reader.start()
    assert save.reading.wait(10)
    s.unmark(force=True)
    s.mark(export=True)
    s.layer.write(os.urandom(4 * KiB), 2 * G)   # slot 0: another block
    save.go.set()
    reader.join(10)
    assert out and (out[0] == first or
                    isinstance(out[0], sessions.FrozenImageGone)), \
        "a frozen read returned another block's saved data"
    assert isinstance(out[0], sessions.FrozenImageGone), out
