"""The save area file of a secondary's last consistent image
(LU@consistent-LU) is kept between the group's replays: the next replay's
image takes it, so its saves overwrite written blocks instead of filling
holes; its stale slots are never read as saves (across a restart too);
it goes when the group stops being the volumes' secondary."""

import os
import threading

from target import replication as R
from tests.support.rsgmodel import wait_for
from tests.support.twonodes import SIZES, VOLS, converge, image_released

KiB = 1024


def _save_path(node, vol):
    return node.t.state_dir.save_area(vol, "consistent-" + vol)


def _kept_path(node, vol):
    return _save_path(node, vol) + ".kept"


def _replay(a, b, monkeypatch, writes, hold=None):
    """Detach, write writes ((vol, offset, data)) on A, attach; with hold
    (a function of nothing), call it while B's replay is about to end,
    its image still kept."""
    _detach(a, b)
    for vol, off, data in writes:
        a.t.lus[vol].write(data, off)
    if hold is not None:
        end_replay = R.SecondaryGroup._end_replay
        seen = []

        def held(self, seq, theirs):
            if not seen:
                seen.append(hold())
            end_replay(self, seq, theirs)
        monkeypatch.setattr(R.SecondaryGroup, "_end_replay", held)
    a.t.rsg_attach("g", b.addr)
    converge(a, b)
    image_released(b)
    if hold is not None:
        monkeypatch.setattr(R.SecondaryGroup, "_end_replay", end_replay)
        assert seen
        return seen[0]


def _fill(a, b):
    """Every extent of A's volumes written (a save of an all-zero extent
    is a hole), and B caught up."""
    for vol, size in zip(VOLS, SIZES):
        a.t.lus[vol].write(os.urandom(size), 0)
    converge(a, b)


def _frozen(node, vol):
    s = node.t.sessions["consistent-" + vol]
    buf = bytearray(s.size)
    s.read_frozen(buf, 0)
    return bytes(buf)


def _spread(vol, size, byte, step=128 * KiB):
    return [(vol, off, bytes([byte]) * (4 * KiB))
            for off in range(0, size, step)]


def _detach(a, b):
    """A detaches its link to B, and B's session has ended."""
    a.t.rsg_detach("g", b.addr)
    wait_for(lambda: b.rsg.connected_since is None)


def test_a_second_replay_reuses_the_save_area_of_the_first(two_nodes,
                                                           monkeypatch):
    a, b = two_nodes
    _fill(a, b)
    writes = _spread("v1", SIZES[0], 1)

    def first():
        s = b.t.sessions["consistent-v1"]
        return len(s.save_area.slots), s.block
    saved, block = _replay(a, b, monkeypatch, writes, hold=first)
    assert saved == len(writes)
    assert "consistent-v1" not in b.t.sessions
    assert not os.path.exists(_save_path(b, "v1"))

    # Right after the image's mark (before this replay writes anything)
    # its save area has the first replay's slots written already (a new
    # file would be holes there).
    begin_replay = R.SecondaryGroup._begin_replay
    marked = []

    def begin(self, *args):
        begin_replay(self, *args)
        st = os.stat(_save_path(b, "v1"))
        marked.append((st.st_ino, st.st_blocks * 512))
    monkeypatch.setattr(R.SecondaryGroup, "_begin_replay", begin)
    before = b.read_top(0)
    # What the image holds is this point's data, not the first replay's.
    image = _replay(a, b, monkeypatch, _spread("v1", SIZES[0], 2),
                    hold=lambda: _frozen(b, "v1"))
    [(ino, allocated)] = marked
    assert allocated >= saved * block, (allocated, saved, block)
    assert image == before
    # Kept between replays (the same file), with the blocks of the slots
    # the images used.
    assert not os.path.exists(_save_path(b, "v1"))
    st = os.stat(_kept_path(b, "v1"))
    assert st.st_ino == ino and st.st_blocks * 512 >= saved * block


def test_a_replay_broken_off_with_a_reused_save_area_rolls_back_to_its_point(
        two_nodes, monkeypatch):
    """The stale slots of the kept file (the first replay's old data) are
    no saves of the second replay's image: after a restart (the index
    read back, entries checked) a rollback gives back the second point."""
    a, b = two_nodes
    _fill(a, b)
    _replay(a, b, monkeypatch, _spread("v1", SIZES[0], 1) +
            _spread("v2", SIZES[1], 1))
    point = [b.read_top(v) for v in range(len(VOLS))]
    assert os.path.exists(_kept_path(b, "v1"))
    # The second replay writes only half the extents the first saved, and
    # breaks off at its end.
    _detach(a, b)
    for vol, off, data in _spread("v1", SIZES[0], 2, step=256 * KiB) + \
            _spread("v2", SIZES[1], 2, step=256 * KiB):
        a.t.lus[vol].write(data, off)
    broken = threading.Event()

    def break_off(self, seq, theirs):
        broken.set()
        raise OSError(5, "the replay is broken off here")
    monkeypatch.setattr(R.SecondaryGroup, "_end_replay", break_off)
    a.t.rsg_attach("g", b.addr)
    assert broken.wait(10)
    _detach(a, b)
    monkeypatch.undo()
    assert not os.path.exists(_kept_path(b, "v1"))   # the image's now
    b.close()
    b.start()
    assert not b.rsg.consistent and b.rsg.protected
    for v, vol in enumerate(VOLS):
        s = b.t.sessions["consistent-" + vol]
        # Only the extents this replay wrote were saved.
        assert len(s.save_area.slots) == len(
            range(0, SIZES[v], 256 * KiB)), sorted(s.save_area.slots)
        assert _frozen(b, vol) == point[v]
        b.t.image_rollback(vol)
    with b.rsg.lock:
        assert [b.read_below_guard(v) for v in range(len(VOLS))] == point


def test_the_kept_save_area_goes_with_the_group(two_nodes, monkeypatch):
    a, b = two_nodes
    _fill(a, b)
    _replay(a, b, monkeypatch, _spread("v1", SIZES[0], 1))
    assert os.path.exists(_kept_path(b, "v1"))
    _detach(a, b)
    b.t.rsg_delete("g")
    assert not os.path.exists(_kept_path(b, "v1"))
    assert not os.path.exists(_save_path(b, "v1"))


def test_the_kept_save_area_goes_with_a_promotion(two_nodes, monkeypatch):
    a, b = two_nodes
    _fill(a, b)
    _replay(a, b, monkeypatch, _spread("v1", SIZES[0], 1))
    assert os.path.exists(_kept_path(b, "v1"))
    _detach(a, b)
    b.t.rsg_promote("g", force=True)
    assert not os.path.exists(_kept_path(b, "v1"))


def test_a_start_removes_a_kept_save_area_no_secondary_owns(two_nodes,
                                                             monkeypatch):
    """One left by a crash in a deletion (after the group's files went)."""
    a, b = two_nodes
    _fill(a, b)
    _replay(a, b, monkeypatch, _spread("v1", SIZES[0], 1))
    kept = _kept_path(b, "v1")
    os.link(kept, kept + ".tmp")
    _detach(a, b)
    b.t.rsg_delete("g")
    os.rename(kept + ".tmp", kept)
    b.close()
    b.start()
    assert b.rsg is None
    assert not os.path.exists(kept)


def test_a_kept_save_area_of_another_size_is_not_taken(two_nodes,
                                                       monkeypatch):
    a, b = two_nodes
    _fill(a, b)
    _replay(a, b, monkeypatch, _spread("v1", SIZES[0], 1))
    kept = _kept_path(b, "v1")
    size = os.stat(kept).st_size
    os.truncate(kept, size * 2)

    def second():
        return os.stat(_save_path(b, "v1")).st_size
    assert _replay(a, b, monkeypatch, _spread("v1", SIZES[0], 2),
                   hold=second) == size
