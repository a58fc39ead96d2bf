"""Real libnbd clients against a running `clonectl serve`."""

import errno
import os
import random
import socket
import threading
import time

import pytest

from tests.support.cli import MiB, run_clonectl, status_json
from tests.support.servers import read_file_range
from tests.support.sessionlib import NbdProcess

nbd = pytest.importorskip("nbd")


@pytest.fixture
def served_lu(fresh_lu):
    """Data-path tests share one server; each gets a new LU on it."""
    return fresh_lu


def test_negotiated_flags(served_lu, nbd_connect):
    h = nbd_connect(served_lu.server.socket, served_lu.name)
    assert h.get_size() == served_lu.size
    assert not h.is_read_only()
    assert h.can_flush() and h.can_fua() and h.can_trim()
    assert h.can_zero() and h.can_fast_zero()
    assert h.can_multi_conn()


@pytest.mark.parametrize("offset, length", [
    (0, 1), (1, 511), (511, 1), (0, 512), (512, 4096), (4095, 2),
    (12345, 65537), (MiB - 1, 2 * MiB + 3), (64 * MiB - 1, 1),
    (64 * MiB - 4096, 4096), (7 * MiB + 333, 1 << 20),
])
def test_write_read_patterns(served_lu, nbd_connect, offset, length):
    h = nbd_connect(served_lu.server.socket, served_lu.name)
    rng = random.Random(offset * 31 + length)
    data = rng.randbytes(length)
    h.pwrite(data, offset)
    assert h.pread(length, offset) == data
    h.flush()
    assert read_file_range(served_lu.file, offset, length) == data
    # Neighbours stay zero.
    if offset:
        assert h.pread(1, offset - 1) == b"\0"
    if offset + length < served_lu.size:
        assert h.pread(1, offset + length) == b"\0"


def test_many_random_writes_match_backing_file(served_lu, nbd_connect):
    h = nbd_connect(served_lu.server.socket, served_lu.name)
    rng = random.Random(1234)
    model = {}
    for _ in range(200):
        length = rng.choice([1, 3, 511, 512, 1000, 4096, 8191, 65536])
        offset = rng.randrange(0, 4 * MiB - length)
        data = rng.randbytes(length)
        h.pwrite(data, offset)
        for i in range(length):
            model[offset + i] = data[i]
    h.flush()
    image = read_file_range(served_lu.file, 0, 4 * MiB)
    via_nbd = h.pread(4 * MiB, 0)
    assert via_nbd == image
    expected = bytearray(4 * MiB)
    for off, b in model.items():
        expected[off] = b
    assert image == bytes(expected)


def test_reads_see_existing_backing_file(shared_server, tmp_path,
                                        nbd_connect):
    f = tmp_path / "existing.img"
    data = os.urandom(2 * MiB)
    f.write_bytes(data)
    run_clonectl(shared_server.state_dir, "lu", "create", "ext", "--file", f)
    h = nbd_connect(shared_server.socket, "ext")
    assert h.get_size() == 2 * MiB
    assert h.pread(2 * MiB, 0) == data
    assert h.pread(3, 1) == data[1:4]


def test_fua_write(served_lu, nbd_connect):
    h = nbd_connect(served_lu.server.socket, served_lu.name)
    data = os.urandom(4096 + 17)
    h.pwrite(data, 8191, nbd.CMD_FLAG_FUA)
    assert h.pread(len(data), 8191) == data
    assert read_file_range(served_lu.file, 8191, len(data)) == data


def test_trim(served_lu, nbd_connect):
    h = nbd_connect(served_lu.server.socket, served_lu.name, meta=True)
    data = b"\xa5" * MiB
    h.pwrite(data, 0)
    h.trim(256 * 1024, 256 * 1024)
    got = h.pread(MiB, 0)
    assert got[:256 * 1024] == data[:256 * 1024]
    assert got[512 * 1024:] == data[512 * 1024:]
    # Trim is advisory: zero or old data, nothing else (this backend punches).
    assert set(got[256 * 1024:512 * 1024]) <= {0, 0xa5}
    h.trim(100, 4096, nbd.CMD_FLAG_FUA)  # (count, offset)
    on_disk = read_file_range(served_lu.file, 0, 8192)
    assert on_disk[:4096] == data[:4096]
    assert set(on_disk[4096:4196]) <= {0, 0xa5}
    assert on_disk[4196:] == data[4196:8192]


@pytest.mark.parametrize("flags", [
    0,
    "NO_HOLE",
    "FUA",
    "NO_HOLE|FUA",
])
@pytest.mark.parametrize("offset, length", [(0, 4096), (1, 1000),
                                            (4000, 300000)])
def test_zero(served_lu, nbd_connect, flags, offset, length):
    value = 0
    for name in filter(None, str(flags or "").split("|")):
        value |= getattr(nbd, "CMD_FLAG_" + name)
    h = nbd_connect(served_lu.server.socket, served_lu.name)
    span = 512 * 1024
    h.pwrite(b"\xff" * span, 0)
    h.zero(length, offset, value)
    got = h.pread(span, 0)
    assert got[:offset] == b"\xff" * offset
    assert got[offset:offset + length] == bytes(length)
    assert got[offset + length:] == b"\xff" * (span - offset - length)
    h.flush()
    assert read_file_range(served_lu.file, 0, span) == got


@pytest.mark.parametrize("may_trim", [True, False])
def test_fast_zero(served_lu, nbd_connect, may_trim):
    h = nbd_connect(served_lu.server.socket, served_lu.name)
    h.pwrite(b"\x77" * 65536, 0)
    flags = nbd.CMD_FLAG_FAST_ZERO | (0 if may_trim else nbd.CMD_FLAG_NO_HOLE)
    try:
        h.zero(8192, 4096, flags)
    except nbd.Error as e:
        # Allowed only as "not fast here", and then nothing changed.
        assert e.errno in ("ENOTSUP", "EOPNOTSUPP"), e
        assert h.pread(65536, 0) == b"\x77" * 65536
    else:
        got = h.pread(65536, 0)
        assert got[4096:12288] == bytes(8192)
        assert got[:4096] == b"\x77" * 4096
        assert got[12288:] == b"\x77" * (65536 - 12288)


def test_block_status_holes_and_data(served_lu, nbd_connect):
    h = nbd_connect(served_lu.server.socket, served_lu.name, meta=True)
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)

    def extents(offset, count):
        result = []

        def cb(metacontext, off, entries, err):
            if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
                result.extend(zip(entries[::2], entries[1::2]))
            return 0

        h.block_status(count, offset, cb)
        return result

    fresh = extents(0, served_lu.size)
    assert fresh and all(flags & nbd.STATE_HOLE and flags & nbd.STATE_ZERO
                         for _, flags in fresh), fresh
    h.pwrite(b"x" * 65536, 2 * MiB)
    h.flush()
    ext = extents(2 * MiB, 65536)
    # Every extent of the written 64K is data (the reply may go past it).
    covered = 0
    for n, flags in ext:
        if covered >= 65536:
            break
        assert flags & nbd.STATE_HOLE == 0, ext
        covered += n
    assert covered >= 65536, ext
    ext = extents(0, MiB)
    assert ext[0][1] & nbd.STATE_HOLE, ext


def test_concurrent_connections_disjoint_regions(served_lu, nbd_connect):
    sock, name = served_lu.server.socket, served_lu.name
    handles = [nbd_connect(sock, name) for _ in range(4)]
    assert all(h.can_multi_conn() for h in handles)
    region = 4 * MiB
    patterns = [os.urandom(64 * 1024) for _ in handles]
    errors_seen = []

    def worker(i):
        try:
            h = handles[i]
            base = i * region
            for j in range(region // len(patterns[i])):
                h.pwrite(patterns[i], base + j * len(patterns[i]))
        except Exception as e:  # reported by the main thread
            errors_seen.append(e)

    threads = [threading.Thread(target=worker, args=(i,))
               for i in range(len(handles))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors_seen == []
    # multi-conn: a flush on one connection covers writes of all of them.
    handles[0].flush()
    for i, pattern in enumerate(patterns):
        expected = pattern * (region // len(pattern))
        assert read_file_range(served_lu.file, i * region, region) == expected
        # Each connection sees the other connections' writes.
        other = handles[(i + 1) % len(handles)]
        assert other.pread(region, i * region) == expected


def test_concurrent_overlapping_requests_on_one_handle(served_lu,
                                                       nbd_connect):
    """Many requests in flight on one connection (parallel thread model)."""
    h = nbd_connect(served_lu.server.socket, served_lu.name)
    rng = random.Random(7)
    blocks = {i: rng.randbytes(4096) for i in range(256)}
    buffers = [nbd.Buffer.from_bytearray(bytearray(blocks[i]))
               for i in range(256)]
    for i, buf in enumerate(buffers):
        h.aio_pwrite(buf, i * 4096)
    deadline = time.monotonic() + 60
    while h.aio_in_flight() > 0:
        assert time.monotonic() < deadline, "requests never completed"
        h.poll(1000)
    got = h.pread(256 * 4096, 0)
    assert got == b"".join(blocks[i] for i in range(256))


def test_read_only_lu(shared_server, nbd_connect):
    srv = shared_server
    run_clonectl(srv.state_dir, "lu", "create", "ro", "--size", "1M",
                 "--read-only")
    path = srv.state_dir / "lus" / "ro.img"
    with open(path, "r+b") as f:
        f.write(b"original")
    h = nbd_connect(srv.socket, "ro")
    assert h.is_read_only()
    assert h.pread(8, 0) == b"original"
    with pytest.raises(nbd.Error) as info:
        h.pwrite(b"x" * 512, 0)
    assert info.value.errno == "EPERM"
    # The same request sent to the server (libnbd not filtering it).
    h2 = nbd_connect(srv.socket, "ro", strict=False)
    for action in (lambda: h2.pwrite(b"x" * 512, 0),
                   lambda: h2.zero(512, 0),
                   lambda: h2.trim(512, 0)):
        with pytest.raises(nbd.Error) as info:
            action()
        assert info.value.errno == "EPERM", info.value
        assert info.value.errnum == errno.EPERM
    assert read_file_range(path, 0, 1024) == b"original" + bytes(1016)
    assert h2.pread(8, 0) == b"original"


def test_out_of_range_requests(served_lu, nbd_connect):
    size = served_lu.size
    h = nbd_connect(served_lu.server.socket, served_lu.name)
    # libnbd refuses these on the client side already.
    with pytest.raises(nbd.Error):
        h.pread(512, size)
    with pytest.raises(nbd.Error):
        h.pwrite(b"x" * 1024, size - 512)
    # With strict mode off the server has to refuse them.
    h = nbd_connect(served_lu.server.socket, served_lu.name, strict=False)
    h.pwrite(b"\x42" * 512, size - 512)
    cases = [
        ("read past end", lambda: h.pread(512, size), {"EINVAL"}),
        ("read straddling end", lambda: h.pread(1024, size - 512),
         {"EINVAL"}),
        ("write past end", lambda: h.pwrite(b"x" * 512, size),
         {"ENOSPC", "EINVAL"}),
        ("write straddling end", lambda: h.pwrite(b"x" * 1024, size - 512),
         {"ENOSPC", "EINVAL"}),
        ("zero straddling end", lambda: h.zero(1024, size - 512),
         {"ENOSPC", "EINVAL"}),
        ("trim straddling end", lambda: h.trim(1024, size - 512),
         {"ENOSPC", "EINVAL"}),
    ]
    for what, action, allowed in cases:
        with pytest.raises(nbd.Error) as info:
            action()
        assert info.value.errno in allowed, (what, info.value)
    # Nothing was changed by the refused requests, and the connection works.
    assert h.pread(512, size - 512) == b"\x42" * 512
    assert os.path.getsize(served_lu.file) == size


def test_unknown_export_name(served_lu, nbd_connect):
    with pytest.raises(nbd.Error) as info:
        nbd_connect(served_lu.server.socket, "nosuchlu")
    assert info.value.errno == "ENOENT"
    assert "nosuchlu" in info.value.string
    # The server keeps serving the others.
    h = nbd_connect(served_lu.server.socket, served_lu.name)
    assert h.get_size() == served_lu.size


def test_empty_export_name_is_refused(served_lu, nbd_connect):
    with pytest.raises(nbd.Error) as info:
        nbd_connect(served_lu.server.socket, "")
    assert info.value.errno in ("ENOENT", "EINVAL"), info.value
    with pytest.raises(nbd.Error):
        nbd_connect(served_lu.server.uri(""))
    # Export names are case sensitive and matched exactly.
    for near_miss in (served_lu.name.upper(), served_lu.name + " ",
                      " " + served_lu.name, served_lu.name + "/"):
        with pytest.raises(nbd.Error) as info:
            nbd_connect(served_lu.server.socket, near_miss)
        assert info.value.errno == "ENOENT", (near_miss, info.value)


def test_lu_created_while_serving(served_lu, nbd_connect):
    srv = served_lu.server
    with pytest.raises(nbd.Error):
        nbd_connect(srv.socket, "later")
    proc = run_clonectl(srv.state_dir, "lu", "create", "later", "--size",
                        "2M")
    assert srv.uri("later") in proc.stdout
    h = nbd_connect(srv.socket, "later")
    assert h.get_size() == 2 * MiB
    h.pwrite(b"new", 0)
    assert h.pread(3, 0) == b"new"
    assert srv.running()
    assert srv.refresh()["pid"] == srv.pid, "no restart needed"


def _lu_status(state_dir, name):
    for lu in status_json(state_dir)["lus"]:
        if lu["name"] == name:
            return lu
    raise AssertionError("no LU {} in status".format(name))


def test_status_counts_connections(served_lu, nbd_connect):
    state_dir = served_lu.state_dir
    assert _lu_status(state_dir, served_lu.name)["connections"] == 0
    h1 = nbd_connect(served_lu.server.socket, served_lu.name)
    h2 = nbd_connect(served_lu.server.socket, served_lu.name)
    lu = _lu_status(state_dir, served_lu.name)
    assert lu["connections"] == 2
    assert lu["served"] is True
    assert lu["uri"] == served_lu.server.uri(served_lu.name)
    h1.shutdown()
    h2.shutdown()
    for _ in range(100):
        if _lu_status(state_dir, served_lu.name)["connections"] == 0:
            break
        threading.Event().wait(0.05)
    assert _lu_status(state_dir, served_lu.name)["connections"] == 0


def test_status_of_lu_whose_backing_vanished(clonectl, tmp_path,
                                             server_factory, nbd_connect,
                                             state_dir):
    f = tmp_path / "goes.img"
    f.write_bytes(bytes(MiB))
    clonectl("lu", "create", "goes", "--file", f)
    clonectl("lu", "create", "stays", "--size", "1M")
    f.unlink()
    srv = server_factory()
    lu = _lu_status(state_dir, "goes")
    assert lu["served"] is False
    assert str(f) in lu["error"]
    proc = run_clonectl(state_dir, "status", check=False)
    # An LU that cannot be served degrades the status (exit status 4).
    assert proc.returncode == 4, proc.stdout + proc.stderr
    text = proc.stdout
    assert "error" in text and str(f) in text
    assert "degraded: LU goes" in text, text
    with pytest.raises(nbd.Error):
        nbd_connect(srv.socket, "goes")
    assert nbd_connect(srv.socket, "stays").get_size() == MiB


@pytest.mark.parametrize("thread_model", [None, "parallel"])
def test_connections_come_and_go(clonectl, server_factory, state_dir,
                                 thread_model):
    """The threads serving a connection keep their Python thread states
    from its first callback to close (the plugin holds them, so requests
    do not make one each; under parallel the worker threads too, which
    exit before close): many connections opened and closed from several
    client threads, each with several requests in flight, refused ones
    among them, leave the same nbdkit process serving the data they
    wrote, and no connection counted."""
    clonectl("lu", "create", "disk", "--size", "4M")
    srv = server_factory(extra_args=["--thread-model", thread_model]
                         if thread_model else [])
    nbdkit_pid = srv.nbdkit_pid
    rounds, workers = 12, 3
    blocks = {(i, j): os.urandom(4096)
              for i in range(workers) for j in range(rounds)}
    errors_seen = []

    def connect(export):
        h = nbd.NBD()
        h.set_export_name(export)
        h.connect_unix(srv.socket)
        return h

    def in_quarters(submit, bufs, offset):
        # Four requests at once: under parallel, several worker threads.
        for q, buf in enumerate(bufs):
            submit(buf, offset + q * 1024)
        while submit.__self__.aio_in_flight() > 0:
            submit.__self__.poll(1000)
        return b"".join(bytes(buf.to_bytearray()) for buf in bufs)

    def worker(i):
        try:
            for j in range(rounds):
                offset = (i * rounds + j) * 4096
                h = connect("disk")
                quarters = [nbd.Buffer.from_bytearray(
                    bytearray(blocks[i, j][q * 1024:(q + 1) * 1024]))
                    for q in range(4)]
                in_quarters(h.aio_pwrite, quarters, offset)
                h.flush()
                h.shutdown()
                with pytest.raises(nbd.Error):
                    connect("nosuchlu")
                h = connect("disk")
                quarters = [nbd.Buffer(1024) for _ in range(4)]
                assert in_quarters(h.aio_pread, quarters, offset) == \
                    blocks[i, j]
                assert h.pread(4096, offset) == blocks[i, j]
                h.shutdown()
        except BaseException as e:  # reported by the main thread
            errors_seen.append(e)

    threads = [threading.Thread(target=worker, args=(i,))
               for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors_seen == []
    srv.refresh()
    assert srv.nbdkit_pid == nbdkit_pid, srv.log()
    image = read_file_range(state_dir / "lus" / "disk.img", 0,
                            workers * rounds * 4096)
    assert image == b"".join(blocks[i, j] for i in range(workers)
                             for j in range(rounds))
    for _ in range(100):
        if _lu_status(state_dir, "disk")["connections"] == 0:
            break
        time.sleep(0.05)
    assert _lu_status(state_dir, "disk")["connections"] == 0


# plugins/clonectl_plugin.py run as it is (exec'd into this module, so
# nbdkit finds its callbacks here), with two observers: pread counts the
# requests that found their thread with a new Python thread state (a
# threading.local lives in it), and after each close() one line goes to
# $THREAD_STATES_LOG: the requests so counted for the closed connection,
# the thread states of the interpreter, and how many of the threads that
# served the connection's reads still run.
WATCHED_PLUGIN = """\
import ctypes
import io
import os
import threading

_path = os.environ["CLONECTL_PLUGIN"]
with io.open(_path) as f:
    exec(compile(f.read(), _path, "exec"))

_api = ctypes.pythonapi
_api.PyInterpreterState_Get.restype = ctypes.c_void_p
_api.PyInterpreterState_ThreadHead.restype = ctypes.c_void_p
_api.PyInterpreterState_ThreadHead.argtypes = [ctypes.c_void_p]
_api.PyThreadState_Next.restype = ctypes.c_void_p
_api.PyThreadState_Next.argtypes = [ctypes.c_void_p]
_local = threading.local()
_fresh = {}
_tids = {}
_plugin_pread, _plugin_close = pread, close


def pread(h, buf, offset, flags):
    if not hasattr(_local, "seen"):
        _local.seen = True
        _fresh[h] = _fresh.get(h, 0) + 1
    _tids.setdefault(h, set()).add(threading.get_native_id())
    _plugin_pread(h, buf, offset, flags)


def close(h):
    _plugin_close(h)
    states = 0
    state = _api.PyInterpreterState_ThreadHead(_api.PyInterpreterState_Get())
    while state:
        states += 1
        state = _api.PyThreadState_Next(state)
    running = sum(os.path.exists("/proc/self/task/%d" % tid)
                  for tid in _tids.pop(h, ()))
    with io.open(os.environ["THREAD_STATES_LOG"], "a") as f:
        f.write("%d %d %d\\n" % (_fresh.pop(h, 0), states, running))
"""


def test_parallel_workers_hold_thread_states_and_free_them(
        clonectl, state_dir, tmp_path, process_guard, monkeypatch):
    """Under thread model parallel each worker thread makes one Python
    thread state for its connection, not one per request, and none is
    left behind when the connection ends (its workers exit before
    close(), so they cannot give theirs back themselves)."""
    from target.server import PLUGIN, PYTHONPATH
    clonectl("lu", "create", "disk", "--size", "4M")
    plugin = tmp_path / "watched_plugin.py"
    plugin.write_text(WATCHED_PLUGIN)
    log = tmp_path / "thread_states"
    monkeypatch.setenv("CLONECTL_PLUGIN", PLUGIN)
    monkeypatch.setenv("THREAD_STATES_LOG", str(log))
    sock = tmp_path / "nbd.sock"
    srv = NbdProcess(["nbdkit", "-f", "-U", sock, "python", plugin,
                      "statedir=" + str(state_dir), "pythonpath=" + PYTHONPATH,
                      "thread_model=parallel"],
                     sock, "disk", tmp_path / "nbdkit.log",
                     process_guard).start()
    data = os.urandom(64 * 4096)
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    h.pwrite(data, 0)
    h.shutdown()
    connections, reads = 20, 64
    for _ in range(connections):
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        bufs = [nbd.Buffer(4096) for _ in range(reads)]
        for i, buf in enumerate(bufs):
            h.aio_pread(buf, i * 4096)
        while h.aio_in_flight() > 0:
            h.poll(1000)
        assert b"".join(bytes(b.to_bytearray()) for b in bufs) == data
        h.shutdown()
        del h
    deadline = time.monotonic() + 10
    while len(log.read_text().splitlines()) < connections + 2:
        # + the server's start probe and the write
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    rows = [tuple(map(int, line.split()))
            for line in log.read_text().splitlines()[-connections:]]
    fresh = [r[0] for r in rows]
    states = [r[1] for r in rows]
    running = [r[2] for r in rows]
    # nbdkit's 16 workers per connection at most, against 64 reads.
    assert max(fresh) <= 16, fresh
    assert running == [0] * connections, running
    assert states[-1] <= states[0] + 2, states
    assert srv.proc.poll() is None, srv.log()


def test_parallel_with_one_thread_per_connection(clonectl, server_factory,
                                                 state_dir):
    """With one worker thread per connection nbdkit runs a connection's
    requests in the connection's own thread, even under thread model
    parallel: that thread's state is the one held from open, and close()
    must leave it to its own Release, not free it as a worker's (a fatal
    error: the state is still current)."""
    clonectl("lu", "create", "disk", "--size", "4M")
    srv = server_factory(extra_args=["--thread-model", "parallel",
                                     "--threads", "1"])
    nbdkit_pid = srv.nbdkit_pid
    blocks = [os.urandom(4096) for _ in range(3)]
    for i, block in enumerate(blocks):
        h = nbd.NBD()
        h.set_export_name("disk")
        h.connect_unix(srv.socket)
        h.zero(8192, i * 4096)
        h.pwrite(block, i * 4096)
        h.flush()
        assert h.pread(4096, i * 4096) == block
        h.shutdown()
    srv.refresh()
    assert srv.nbdkit_pid == nbdkit_pid, srv.log()
    assert read_file_range(state_dir / "lus" / "disk.img", 0,
                           3 * 4096) == b"".join(blocks)


@pytest.mark.parametrize("thread_model", [None, pytest.param(
    "parallel", marks=pytest.mark.xfail(
        strict=True, reason="nbdkit 1.32 aborts in raw_send_socket under "
        "the parallel thread model (docs/known-gaps.md), which is why "
        "serve --thread-model stays a switch for benchmarks"))])
def test_client_vanishing_mid_request_leaves_others_served(
        clonectl, server_factory, thread_model):
    """A client that goes away with requests in flight (a host that
    crashed, a reset) ends its own connection only: the nbdkit process,
    and with it every other client's connection, stays."""
    clonectl("lu", "create", "disk", "--size", "8M")
    srv = server_factory(extra_args=["--thread-model", thread_model]
                         if thread_model else [])
    nbdkit_pid = srv.nbdkit_pid
    other = nbd.NBD()
    other.set_export_name("disk")
    other.connect_unix(srv.socket)
    data = os.urandom(64 * 1024)
    other.pwrite(data, 0)
    for _ in range(20):
        h = nbd.NBD()
        h.set_export_name("disk")
        try:
            h.connect_unix(srv.socket)
        except nbd.Error:
            break  # nbdkit gone: the asserts below say so
        for k in range(64):
            if k % 2:
                h.aio_pwrite(os.urandom(64 * 1024), (k + 1) * 64 * 1024)
            else:
                h.aio_pread(nbd.Buffer(64 * 1024), (k + 1) * 64 * 1024)
        h.poll(0)
        socket.socket(fileno=os.dup(h.aio_get_fd())).shutdown(
            socket.SHUT_RDWR)
        del h
    try:
        assert other.pread(len(data), 0) == data
    except nbd.Error as e:
        pytest.fail("{}; server log: {}".format(e, srv.log()[-400:]))
    other.shutdown()
    srv.refresh()
    assert srv.nbdkit_pid == nbdkit_pid, srv.log()
