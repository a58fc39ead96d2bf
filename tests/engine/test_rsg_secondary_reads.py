"""Reads of a secondary's volume while a batch is applied.

Every prefix of the primary's ordered stream of updates is a state the
primary's volumes had, so a reader may see the volume between two
updates of a batch; it must never wait for a whole batch to be applied
(a batch of an async link can hold thousands of updates).  Two
in-process Targets (tests/support/rsgnodes.py).
"""

import os
import threading
import time

import pytest

from tests.support import rsgnodes
from tests.support.rsgmodel import wait_for
from target import replication as R

BLOCK = 4096
SLOW = 0.02         # seconds each update takes to apply on the secondary


@pytest.fixture
def pair(tmp_path):
    with rsgnodes.linked_pair(str(tmp_path), "async", "4M", "4K") as p:
        yield p


def test_a_read_waits_for_one_update_not_for_the_whole_batch(
        pair, monkeypatch):
    apply_one = R.SecondaryGroup._apply_one

    def slow(self, *args):
        time.sleep(SLOW)
        return apply_one(self, *args)
    monkeypatch.setattr(R.SecondaryGroup, "_apply_one", slow)
    lu, replica = pair.ta.lus["v1"], pair.tb.lus["v1"]
    for i in range(80):
        lu.write(os.urandom(BLOCK), (i % 200) * BLOCK)
    waits = []
    done = threading.Event()

    def reader():
        buf = bytearray(BLOCK)
        while not done.is_set():
            t0 = time.monotonic()
            replica.read(buf, 250 * BLOCK)
            waits.append(time.monotonic() - t0)
            time.sleep(0.005)
    t = threading.Thread(target=reader)
    t.start()
    try:
        wait_for(lambda: pair.sg.applied_seq == pair.g.next_seq - 1, 30,
                 "the updates applied")
    finally:
        done.set()
        t.join()
    assert len(waits) > 10
    assert max(waits) < 10 * SLOW, "a read waited {:.2f} s for a batch " \
        "being applied ({} reads)".format(max(waits), len(waits))
