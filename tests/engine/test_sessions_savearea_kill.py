"""Copy on first write with group commit, against a crash between a save
and the flush that would have made it durable.

A kill -9 keeps the page cache: the save's data and index entry written
but not yet flushed are still read back by the restarted target.  If the
restarted session takes that save into its frozen image without making it
durable, the next host write to the extent proceeds at once (nothing left
to save), the Source's new data becomes durable, and a power cut then
takes the save away: the frozen image reads the new data.
"""

import random
import tempfile

from target import backends, sessions

from tests.support import powerloss

GRAN = 4096
EXTENTS = 8
SIZE = GRAN * EXTENTS
SAVE_SIZE = sessions.SaveArea.minimum_size(EXTENTS, GRAN) - GRAN + SIZE


class FakeLU:
    name = "src"
    size = SIZE

    def __init__(self, backend):
        self.backend = backend


class Crash(BaseException):
    """A kill -9."""


def new_session(map_dir, source, save, marked):
    lu = FakeLU(sessions.SessionLayer(source))
    s = sessions.Session("s", lu, GRAN, map_dir, save, [],
                         marked=marked, export=True)
    if marked:
        s.load()
    else:
        s.create()
    lu.backend.add(s)
    return lu, s


def frozen_image(s):
    buf = bytearray(SIZE)
    s.read_frozen(buf, 0)
    return bytes(buf)


def test_a_save_read_back_after_a_kill_is_made_durable_before_it_is_trusted(
        monkeypatch):
    map_dir = tempfile.mkdtemp(prefix="session-gc-review-")
    disk = powerloss.SimFile(bytes(SAVE_SIZE))
    source = backends.MemoryBackend(SIZE)    # durable once written
    source.data[:] = random.Random(3).randbytes(SIZE)
    lu, s = new_session(map_dir, source, powerloss.PowerLossBackend(disk),
                        marked=False)
    s.mark(export=True)
    at_mark = bytes(source.data)

    # The target is killed while a first write to extent 2 waits for the
    # save area's flush: its save is written, not durable; the host write
    # never reached the Source.
    def killed(ticket):
        raise Crash()
    monkeypatch.setattr(s.save_area, "wait_durable", killed)
    try:
        lu.backend.write(b"x" * GRAN, 2 * GRAN)
    except Crash:
        pass
    assert bytes(source.data) == at_mark
    assert disk.pending, "the save was flushed: nothing to show"

    # Restarted on the same page cache; a host write to extent 2 is
    # acknowledged (and flushed: the Source keeps it).
    lu2, s2 = new_session(map_dir, source, powerloss.PowerLossBackend(disk),
                          marked=True)
    assert frozen_image(s2) == at_mark
    lu2.backend.write(b"y" * GRAN, 2 * GRAN)
    lu2.backend.flush()

    # Power cut: the save area loses what nobody flushed.
    disk.power_cut(random.Random(0), keep=0.0)
    lu3, s3 = new_session(map_dir, source, powerloss.PowerLossBackend(disk),
                          marked=True)
    image = frozen_image(s3)
    wrong = [x for x in range(EXTENTS)
             if image[x * GRAN:(x + 1) * GRAN] !=
             at_mark[x * GRAN:(x + 1) * GRAN]]
    assert not wrong, "the frozen image differs from the mark's in extents " \
        "{}: a save only the page cache held was trusted after a restart " \
        "and lost at the power cut".format(wrong)
