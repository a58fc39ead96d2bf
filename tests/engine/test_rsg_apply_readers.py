"""A secondary applies a batch between its readers' reads (a reader waits
for a few updates at most), and readers that keep reading do not hold the
batch back: it takes about as long as with none."""

import threading
import time

from target import replication as R
from tests.support.twonodes import converge

UPDATES = 3000


def _apply_time(sg, entries, lu, readers):
    stop = threading.Event()
    reads = [0]

    def read():
        buf = bytearray(4096)
        while not stop.is_set():
            lu.read(buf, 0)
            reads[0] += 1
    threads = [threading.Thread(target=read) for _ in range(readers)]
    for t in threads:
        t.start()
    try:
        while readers and not reads[0]:
            time.sleep(0.001)
        t0 = time.perf_counter()
        sg._apply_entries(entries)
        return time.perf_counter() - t0
    finally:
        stop.set()
        for t in threads:
            t.join()


def test_readers_reading_on_do_not_hold_a_batch_back(two_nodes):
    a, b = two_nodes
    a.t.lus["v1"].write(b"\x01" * 4096, 0)
    converge(a, b)
    a.t.rsg_detach("g", b.addr)
    sg = b.rsg
    entries = [(i + 1, 0, R.WRITE, (i % 256) * 4096, 4096, 0,
                bytes([i % 251]) * 4096) for i in range(UPDATES)]
    alone = _apply_time(sg, entries, b.t.lus["v2"], 0)
    read_on = _apply_time(sg, entries, b.t.lus["v2"], 2)
    assert read_on < max(1.0, 50 * alone), \
        "{} updates: {:.3f} s with two readers reading on, {:.3f} s " \
        "alone".format(UPDATES, read_on, alone)


def test_a_reader_never_sees_half_of_an_update_the_volume_failed(
        two_nodes, monkeypatch):
    """An update the secondary's volume fails after writing part of it:
    a reader waiting meanwhile is refused (the node is inconsistent from
    that moment), never given the half update."""
    import errno
    from target import errors
    from tests.support.rsgmodel import wait_for
    a, b = two_nodes
    a.t.lus["v1"].write(b"\x01" * 4096, 0)
    converge(a, b)
    sg = b.rsg
    lu = b.t.lus["v1"]
    apply_one = R.SecondaryGroup._apply_one
    got = {}

    def read():
        buf = bytearray(4096)
        try:
            lu.read(buf, 0)
            got["data"] = bytes(buf)
        except errors.Error as e:
            got["error"] = e
    reader = threading.Thread(target=read)

    def half_then_fail(self, vol, kind, off, length, data):
        if data is None or bytes(data[:1]) != b"\xee":
            return apply_one(self, vol, kind, off, length, data)
        apply_one(self, vol, kind, off, length // 2, data[:length // 2])
        reader.start()
        wait_for(lambda: self.lock.wanted, 5, "the reader")
        raise OSError(errno.EIO, "the disk fails here")
    monkeypatch.setattr(R.SecondaryGroup, "_apply_one", half_then_fail)
    a.t.lus["v1"].write(b"\xee" * 4096, 0)
    wait_for(lambda: not reader.is_alive() and got, 10, "the read")
    assert "error" in got or got["data"] in (b"\x01" * 4096,
                                             b"\xee" * 4096), \
        "a reader got half an update: {!r}".format(
            got["data"][2046:2050])
