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
