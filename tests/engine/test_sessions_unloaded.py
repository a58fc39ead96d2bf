"""A session that does not load at start, and its LU's writes meanwhile.

A session hears of its Source's writes only while it is in the LU's I/O
stack.  One that fails to load (its tracking map cannot be rewritten, its
save area is gone) is not there, and the LU is served all the same: its
writes in the meantime are in no map.  When the session loads again
later, its destinations would be told they are consistent without them.
So its record says first, durably, that every destination needs a full
copy (and that no image is frozen); if even that cannot be saved, the
LU is not served until a restart loads the session or saves that.
"""

from pathlib import Path

from target.target import Target

from tests.support.sessionfakes import full_state_dir, one_lu_target, \
    session_sent_once, start_with_full_maps, transfer_marked

GRAN = 4096
EXTENTS = 64
SIZE = GRAN * EXTENTS


def _synced_session(tmp_path):
    """A target with LU src and session s, transferred once to a memory
    destination; closed.  Returns (the destination, the LU's file)."""
    t, path = one_lu_target(tmp_path, SIZE)
    try:
        dest = session_sent_once(t)
    finally:
        t.close()
    return dest, path


def test_writes_while_a_session_failed_to_load_reach_its_destination(
        tmp_path, monkeypatch):
    dest, path = _synced_session(tmp_path)
    t = start_with_full_maps(tmp_path, monkeypatch, ".track")
    try:
        assert "s" not in t.sessions
        assert t.lus["src"].healthy
        t.lus["src"].write(b"w" * GRAN, 5 * GRAN)
        t.lus["src"].flush()
    finally:
        t.close()
    t = Target(str(tmp_path / "state"))
    try:
        s = transfer_marked(t, dest)
        assert bytes(dest.data) == Path(path).read_bytes(), \
            "extent 5, written while the session was not loaded, never " \
            "reached the destination (tracking bit {})".format(
                s.tracking.bits[5])
    finally:
        t.close()


def test_an_lu_whose_unloaded_session_cannot_say_so_is_not_served(
        tmp_path, monkeypatch):
    _synced_session(tmp_path)

    full_state_dir(monkeypatch)
    t = start_with_full_maps(tmp_path, monkeypatch, ".track")
    try:
        lu = t.lus["src"]
        assert not lu.healthy and "session s" in lu.held, lu.held
    finally:
        t.close()
