"""The replicated write path's shortcuts give what the long way gives.

The SRL keeps its newest entries in memory, and a link sends those
without reading them back: what it gets must be the entry logged at that
position (across laps of the ring and the pad that skips a lap's end),
never an older one nor a buffer the writer changed since.  A sync write
waits on a condition of its own, woken by the acknowledgement that covers
it: it must still return only once the secondary applied it, and be woken
then, not by a timeout.
"""

import random
import statistics
import threading
import time

import pytest

from tests.support import rsgnodes
from target import replication as R

BLOCK = 4096


def _disk_read(path, pos):
    """The entry at pos as the file holds it (a reader with no memory)."""
    other = R.Srl(path)
    try:
        return other.read(pos)
    finally:
        other.close()


def test_srl_newest_entries_in_memory_are_those_logged_there_across_laps(
        tmp_path):
    path = str(tmp_path / "srl")
    srl = R.Srl(path, R.MIN_SRL)
    rng = random.Random(7)
    logged = {}             # reader's position -> (seq, kind, data)
    order = []
    seq = 1
    # Three laps of entries of uneven sizes: lap ends are skipped (a pad)
    # and entries start at other offsets in each lap.
    while srl.head_pos < 3 * srl.capacity:
        kind = R.WRITE if rng.random() < 0.8 else R.ZERO
        length = rng.choice([512, 4096, 4096, 8192, 100000]) \
            if kind == R.WRITE else rng.randrange(1, 1 << 20)
        data = rng.randbytes(length) if kind == R.WRITE else None
        buf = bytearray(data) if data is not None else None
        pos = srl.head_pos
        srl.append(seq, 0, kind, 4096, length, buf,
                   R.entry_crc(seq, 0, kind, 4096, length, data))
        if buf is not None:
            # The writer's buffer is reused for its next request.
            buf[:] = bytes(len(buf))
        logged[pos] = (seq, kind, data)
        order.append(pos)
        seq += 1
        # The entries of the last half lap (the group never lets the
        # head come a whole lap past a link), walked as a link does.
        p = next(q for q in order if q >= srl.head_pos - srl.capacity // 2)
        while p < srl.head_pos:
            e, checked = srl.entry(p)
            want_seq, want_kind, want_data = logged[p]
            assert e is not None and e[0] == want_seq, (p, e and e[0],
                                                        want_seq)
            assert e[2] == want_kind and e[6] == want_data, (p, want_seq)
            if not checked:
                assert R.entry_crc(*e[:5], e[6]) == e[5]
            p = e[7]
    # Memory holds only entries the file still holds as they were.
    memory = 0
    for p in order:
        e, checked = srl.entry(p)
        if checked:
            memory += 1
            assert _disk_read(path, p) == e, p
    assert memory >= 5
    # An entry of an earlier lap is not served from memory.
    old = order[0]
    e, checked = srl.entry(old)
    assert not checked and (e is None or e[0] != logged[old][0])
    srl.close()


@pytest.fixture
def sync_pair(tmp_path, monkeypatch):
    # Every batch of the test closes with CAPL, acknowledged once applied
    # (a CMIT's acknowledgement comes once the batch is staged durably,
    # before it is applied): no CMIT for time, and an SRL whose quarter
    # holds every write.
    with rsgnodes.linked_pair(str(tmp_path), "sync", "16M", "4K") as p:
        monkeypatch.setattr(R.link, "PERSIST_INTERVAL", 60.0)
        yield p


def test_concurrent_sync_writes_return_once_applied_and_without_polling(
        sync_pair):
    p = sync_pair
    lu = p.ta.lus["v1"]
    secondary = p.tb.lus["v1"]
    threads, per = 8, 16
    latencies, errors = [], []

    def writer(k):
        rng = random.Random(k)
        for i in range(per):
            off = (i * threads + k) * BLOCK
            data = rng.randbytes(BLOCK)
            t0 = time.monotonic()
            lu.write(data, off)
            latencies.append(time.monotonic() - t0)
            got = bytearray(BLOCK)
            secondary.backend.readinto(got, off)
            if bytes(got) != data:
                errors.append("block %d not applied on the secondary when "
                              "its write returned" % (off // BLOCK))

    ts = [threading.Thread(target=writer, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[:3]
    assert p.link.state == R.REPLICATING, p.status()
    # A writer not woken by its acknowledgement waits for its timeout
    # (half a second) instead.
    assert statistics.median(latencies) < 0.25, \
        sorted(latencies)[len(latencies) // 2:][:5]
    p.wait_converged()


def test_concurrent_sync_writes_keep_their_order_on_the_secondary(sync_pair):
    p = sync_pair
    lu = p.ta.lus["v1"]

    def writer(k):
        rng = random.Random(k)
        for i in range(40):
            # Overlapping writes from every thread: the secondary must end
            # as the primary, whoever sent each entry.
            lu.write(bytes([k * 40 + i + 1]) * BLOCK * rng.randint(1, 3),
                     rng.randrange(16) * BLOCK)

    ts = [threading.Thread(target=writer, args=(k,)) for k in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    p.wait_converged()
    assert p.link.state == R.REPLICATING, p.status()
    assert p.b.read_image("v1") == p.a.read_image("v1")


def test_buffered_reader_gives_every_frame_whole_and_in_order():
    import socket
    a, b = socket.socketpair()
    try:
        rng = random.Random(3)
        sizes = [0, 1, 16, 4096, 4133, R.wire.Reader.CHUNK - 8,
                 R.wire.Reader.CHUNK, 3 * R.wire.Reader.CHUNK + 5] + \
            [rng.randrange(1, 70000) for _ in range(40)]
        frames = [(b"K%03d" % i, rng.randbytes(n))
                  for i, n in enumerate(sizes)]
        wire = b"".join(R.FRAME.pack(k, len(p)) + p for k, p in frames)

        def send():
            # Pieces of every size: a frame split anywhere, many frames
            # in one piece.
            pos = 0
            while pos < len(wire):
                n = rng.choice([1, 7, 4096, 65536, 300000])
                a.sendall(wire[pos:pos + n])
                pos += n
        sender = threading.Thread(target=send)
        sender.start()
        reader = R.wire.Reader(b)
        got = [R.recv_frame(reader) for _ in frames]
        sender.join()
        assert [(k, bytes(p)) for k, p in got] == frames
        assert not reader.pending()
        a.sendall(R.FRAME.pack(b"LAST", 2) + b"xy" + R.FRAME.pack(b"MORE", 0))
        assert R.recv_frame(reader) == (b"LAST", bytearray(b"xy"))
        # The next frame came with it: the reader has it, the socket not.
        assert reader.pending()
        assert R.recv_frame(reader) == (b"MORE", bytearray())
    finally:
        a.close()
        b.close()


def test_srl_append_that_the_file_took_short_fails_and_is_not_served(
        tmp_path, monkeypatch):
    # A write into the sparse SRL file can stop short (the file system is
    # full): the entry in memory would then be sent although the file holds
    # a torn one; the append must fail instead (the group then logs to its
    # DCMs), and nothing be served for that position.
    path = str(tmp_path / "srl")
    srl = R.Srl(path, R.MIN_SRL)
    real = R.srl.os.pwritev

    def short(fd, bufs, offset):
        whole = b"".join(bytes(b) for b in bufs)
        return real(fd, [whole[:len(whole) // 2]], offset)
    data = bytes(range(256)) * 32
    monkeypatch.setattr(R.srl.os, "pwritev", short)
    with pytest.raises(OSError):
        srl.append(1, 0, R.WRITE, 0, len(data), data,
                   R.entry_crc(1, 0, R.WRITE, 0, len(data), data))
    monkeypatch.setattr(R.srl.os, "pwritev", real)
    assert srl.head_pos == 0 and srl.next_seq == 1
    e, checked = srl.entry(0)
    assert not checked
    assert e is None or R.entry_crc(*e[:5], e[6]) != e[5]
    # The next append goes where the failed one was, and is served whole.
    srl.append(1, 0, R.WRITE, 0, len(data), data,
               R.entry_crc(1, 0, R.WRITE, 0, len(data), data))
    assert srl.entry(0)[0][6] == data == _disk_read(path, 0)[6]
    srl.close()


def test_sync_writer_returns_at_once_when_an_overflow_stops_its_link(
        tmp_path, monkeypatch):
    # A sync write waits for the secondary; another write overflows the SRL
    # and the link logs to its DCM: the waiting write is then covered by
    # the DCM and must return at once, not at its next look.
    saved = rsgnodes.fast_timing()
    p = rsgnodes.Pair(str(tmp_path), {"v1": 4 << 20})
    gate = threading.Event()
    try:
        p.create_group("1M", "4K")
        p.link_up("sync")
        p.wait_converged()
        lu = p.ta.lus["v1"]
        real = R.link.send_frames

        def stalled(sock, parts):
            # The link sends nothing more (a secondary that stalls).
            if any(kind == b"ENTR" for kind, _, _ in parts):
                gate.wait(10)
            return real(sock, parts)
        monkeypatch.setattr(R.link, "send_frames", stalled)
        returned = []
        waiting = threading.Thread(
            target=lambda: (lu.write(b"\1" * BLOCK, 0),
                            returned.append(time.monotonic())))
        waiting.start()
        time.sleep(0.1)
        assert not returned, "the sync write did not wait"
        lu.write(b"\2" * (2 << 20), 1 << 20)    # more than the SRL holds
        overflowed = time.monotonic()
        assert p.link.logging, p.status()
        waiting.join(5)
        assert returned, "the sync write never returned"
        assert returned[0] - overflowed < 0.2, returned[0] - overflowed
        # Both writes reach the secondary by the replay of the DCM.
        gate.set()
        p.wait_converged()
        assert p.b.read_image("v1") == p.a.read_image("v1")
        assert p.b.read_image("v1")[:BLOCK] == b"\1" * BLOCK
    finally:
        gate.set()
        p.close()
        rsgnodes.restore_timing(saved)


def test_buffered_reader_refuses_huge_frames_and_ends_at_eof_mid_frame():
    import socket
    from target import errors
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    try:
        reader = R.wire.Reader(b)
        # A frame announcing more than the limit, its head in the same
        # recv as a whole frame before it.
        a.sendall(R.FRAME.pack(b"OKAY", 3) + b"abc" +
                  R.FRAME.pack(b"HUGE", R.wire.MAX_FRAME + 1) + b"x" * 10)
        assert R.recv_frame(reader) == (b"OKAY", bytearray(b"abc"))
        with pytest.raises(errors.ProtocolError):
            R.recv_frame(reader)
        # A frame cut by the end of the connection, its head buffered.
        c.sendall(R.FRAME.pack(b"CUT!", 100) + b"z" * 40)
        c.shutdown(socket.SHUT_WR)
        reader = R.wire.Reader(d)
        with pytest.raises(ConnectionError):
            R.recv_frame(reader)
    finally:
        for s in (a, b, c, d):
            s.close()


class _LinkStub:
    """What a sync writer's wait reads of its link: the acknowledged
    position (acked or held), and the group's condition."""

    sync_waits = True
    stopping = False
    flow_waits = False

    def __init__(self):
        self.group = type("G", (), {"sync_timeout": 30})()
        self.group.cond = R.primary._GroupCond(threading.Lock())
        self.acknowledged = 0


def test_sync_writer_woken_again_after_its_acknowledgement_was_taken_back():
    # The acknowledgement covering a write arrives (the writer is taken
    # off the wake list), then the connection is lost before the writer
    # looked, and what the secondary only held is taken back: the writer
    # waits again, and the acknowledgement that comes next must wake it,
    # not its half-second look.
    link = _LinkStub()
    cond = link.group.cond
    returned = []
    writer = threading.Thread(target=lambda: (
        R.link.Link._wait_applied(link, 5, time.monotonic() + 10),
        returned.append(time.monotonic())))
    writer.start()
    deadline = time.monotonic() + 5
    while not cond._acks and time.monotonic() < deadline:
        time.sleep(0.005)
    with cond:
        link.acknowledged = 5
        cond.acknowledged(link)
        link.acknowledged = 0       # held, then taken back
        cond.notify_all()
    time.sleep(0.1)                 # the writer looked and waits again
    assert not returned, "returned without its acknowledgement"
    with cond:
        link.acknowledged = 5
        acked = time.monotonic()
        cond.acknowledged(link)
    writer.join(5)
    assert returned and returned[0] - acked < 0.25, \
        "woken {:.3f} s after its acknowledgement".format(
            returned[0] - acked if returned else float("inf"))


def test_srl_sync_returns_only_once_an_fdatasync_covering_it_ended(
        tmp_path, monkeypatch):
    # A host flush and the record's save both make the SRL durable: the
    # second to ask, while the first one's fdatasync runs, must not return
    # before that fdatasync ended (the record would then name entries a
    # power cut could still take away).
    srl = R.Srl(str(tmp_path / "srl"), R.MIN_SRL)
    data = bytes(4096)
    srl.append(1, 0, R.WRITE, 0, len(data), data,
               R.entry_crc(1, 0, R.WRITE, 0, len(data), data))
    real = R.srl.os.fdatasync
    began, gate = threading.Event(), threading.Event()

    def slow(fd):
        began.set()
        gate.wait(5)
        real(fd)
    monkeypatch.setattr(R.srl.os, "fdatasync", slow)
    first = threading.Thread(target=srl.sync)
    first.start()
    try:
        assert began.wait(5)
        second = threading.Thread(target=srl.sync)
        second.start()
        second.join(0.2)
        assert second.is_alive(), \
            "a sync returned while the fdatasync covering it still ran"
    finally:
        gate.set()
        first.join(5)
    second.join(5)
    assert not second.is_alive()
    srl.close()
