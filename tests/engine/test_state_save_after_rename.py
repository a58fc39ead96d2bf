"""A save of state.json that fails after its rename.

The new file is renamed over the old one, then the directory's fsync
fails: the caller is told the record was not saved and keeps its old
state in memory (a session stays unmarked, and hosts go on writing
without copy on first write).  The path must then hold the old record,
or a clean restart loads the new one: a session marked, with an empty
save area, whose frozen export serves data written after its mark and
whose transfer records a torn image as consistent.
"""

import errno
import os

from pathlib import Path

import pytest

from target import errors, fsutil
from target.target import Target

from tests.support.sessionfakes import frozen_image, one_lu_target, \
    session_sent_once, transfer_marked

GRAN = 4096
EXTENTS = 64
SIZE = GRAN * EXTENTS


def test_a_mark_whose_record_save_failed_after_the_rename_is_not_frozen(
        tmp_path, monkeypatch):
    t, path = one_lu_target(tmp_path, SIZE)
    state = str(tmp_path / "state")
    try:
        dest = session_sent_once(t)
        lu = t.lus["src"]
        lu.write(b"1" * GRAN, 0)
        lu.flush()
        at_mark = Path(path).read_bytes()
        real = fsutil.fsync_dir

        def eio(d):
            if os.path.abspath(d) == os.path.abspath(state):
                raise OSError(errno.EIO, "Input/output error", d)
            return real(d)

        monkeypatch.setattr(fsutil, "fsync_dir", eio)
        with pytest.raises(errors.Error):
            t.session_ops.session_mark("s", export=True)
        monkeypatch.setattr(fsutil, "fsync_dir", real)
        assert not t.sessions["s"].marked
        lu.write(b"3" * GRAN, GRAN)         # extent 1 first ...
        lu.write(b"2" * GRAN, 0)            # ... then extent 0
        lu.flush()
    finally:
        t.close()
    states = {at_mark, Path(path).read_bytes()}
    cur = bytearray(at_mark)
    cur[GRAN:2 * GRAN] = b"3" * GRAN
    states.add(bytes(cur))                  # every point the Source had
    t = Target(state)
    try:
        s = t.sessions["s"]
        frozen = frozen_image(s) if s.marked else None
        transfer_marked(t, dest)
        assert s.dests[0].consistency == "consistent"
        assert frozen is None or frozen in states, \
            "the frozen image after the restart is one the Source never held"
        assert bytes(dest.data) in states, \
            "the destination recorded consistent holds a torn image"
    finally:
        t.close()
