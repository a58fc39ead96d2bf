"""RegionLock: a secondary's applies against its host reads, by region."""

import threading

from target.replication.layer import RegionLock, Regions


def test_regions_merge_and_overlap_at_their_bounds():
    r = Regions([(0, 0, 10), (0, 5, 10), (1, 100, 5), (0, 40, 0)])
    assert r.overlaps(0, 14, 1) and not r.overlaps(0, 15, 5)
    assert not r.overlaps(1, 99, 1) and r.overlaps(1, 104, 1)
    assert not r.overlaps(1, 105, 10) and not r.overlaps(2, 0, 1 << 30)
    assert not r.overlaps(0, 40, 1)         # an empty run holds nothing
    assert r.meets(Regions([(1, 0, 101)])) and \
        not r.meets(Regions([(1, 0, 100)]))
    assert Regions(None).overlaps(5, 0, 1) and r.meets(Regions(None))


def test_an_apply_waits_for_an_overlapping_read_in_progress_only():
    lock = RegionLock()
    order = []
    with lock.reading(0, 0, 4096):
        # An apply elsewhere does not wait for the read.
        with lock.writing([(0, 8192, 4096), (1, 0, 4096)]):
            order.append("apply elsewhere")

        def apply_over():
            with lock.writing([(0, 4000, 200)]):
                order.append("apply over")
        t = threading.Thread(target=apply_over)
        t.start()
        t.join(0.3)
        assert t.is_alive()             # the read is still in progress
        order.append("read done")
    t.join(5)
    assert order == ["apply elsewhere", "read done", "apply over"]


def test_a_read_waits_for_an_overlapping_apply_and_the_whole_lock():
    lock = RegionLock()
    got = []

    def read_inside():
        with lock.reading(0, 100, 1):
            got.append("inside")

    def apply_other_volume():
        with lock.writing([(3, 0, 1)]):
            got.append("other volume")
    with lock.writing([(0, 0, 4096)]):
        with lock.reading(0, 4096, 4096):   # next to it: not held
            got.append("beside")
        t = threading.Thread(target=read_inside)
        t.start()
        t.join(0.3)
        assert t.is_alive() and got == ["beside"]
    t.join(5)
    assert got == ["beside", "inside"]
    with lock:                                  # everything
        t = threading.Thread(target=apply_other_volume)
        t.start()
        t.join(0.3)
        assert t.is_alive()
    t.join(5)
    assert got[-1] == "other volume"
    assert lock.reads == [] and lock.applying == []
