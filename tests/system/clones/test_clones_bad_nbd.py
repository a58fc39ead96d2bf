"""Bad input on the NBD side of a Source with clones: seeded random odd
requests through libnbd with strict mode off (odd offsets and lengths,
zero length, out of range, flags the export does not support) to a
Source with a synchronized clone and to a fractured
clone's export, then many connections dropped in the middle of their
requests.  The target never dies, refuses with an errno, changes nothing
on a refused request, and the synchronized clone stays equal to its Source
(every mirrored write, even one whose client vanished, reached both)."""

import random

import pytest

from tests.support.clonelib import MiB, read_range

nbd = pytest.importorskip("nbd")

SIZE = 8 * MiB
# libnbd names the errno.
REFUSALS = {"EINVAL", "ENOSPC", "EOPNOTSUPP", "ENOTSUP", "EROFS",
            "EOVERFLOW"}
UNKNOWN_FLAG = 1 << 7


def _odd_request(rng):
    offset = rng.choice([0, 1, 511, 4095, SIZE - 1, SIZE - 4096, SIZE,
                         SIZE + 4096, (1 << 63) - 1,
                         rng.randrange(SIZE)])
    length = rng.choice([0, 1, 511, 4096, 65537, SIZE, SIZE + 1,
                         rng.randrange(1, 256 * 1024)])
    flags = 0
    for f in (nbd.CMD_FLAG_FUA, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FAST_ZERO,
              nbd.CMD_FLAG_DF, nbd.CMD_FLAG_REQ_ONE, UNKNOWN_FLAG):
        if rng.random() < 0.15:
            flags |= f
    op = rng.choice(["pread", "pwrite", "zero", "trim", "flush", "cache"])
    return op, offset, length, flags


def _apply(h, model, op, offset, length, flags, rng):
    """Send the request; on success update model (a bytearray)."""
    in_range = 0 <= offset and offset + length <= SIZE
    if op == "pread":
        data = h.pread(length, offset, flags)
        assert in_range and data == bytes(model[offset:offset + length])
    elif op == "pwrite":
        data = rng.randbytes(min(length, 1 << 20))
        h.pwrite(data, offset, flags)
        assert 0 <= offset and offset + len(data) <= SIZE
        model[offset:offset + len(data)] = data
    elif op == "zero":
        h.zero(length, offset, flags)
        assert in_range
        model[offset:offset + length] = bytes(length)
    elif op == "trim":
        h.trim(length, offset, flags)
        assert in_range
        # Trim is carried out as a zero on a Source with clones.
        model[offset:offset + length] = bytes(length)
    elif op == "flush":
        h.flush(flags)
    else:
        h.cache(length, offset, flags)


def _fuzz(env, nbd_connect, export, model, rng, count):
    h = nbd_connect(env.server.socket, export, strict=False)
    refused = 0
    for _ in range(count):
        op, offset, length, flags = _odd_request(rng)
        try:
            _apply(h, model, op, offset, length, flags, rng)
        except nbd.Error as e:
            refused += 1
            if e.errno is None or h.aio_is_dead() or h.aio_is_closed():
                # The client side gave up on the connection (a protocol
                # error it detected itself): start a new one.
                h = nbd_connect(env.server.socket, export, strict=False)
                continue
            assert e.errno in REFUSALS, (op, offset, length, flags, e)
    return refused


def test_odd_requests_and_dropped_connections(clone_env, nbd_connect):
    env = clone_env.setup(size=SIZE, clones=("c1", "c2"))
    env.sync_wait("c1")
    env.sync_wait("c2")
    env.cli("clone", "fracture", "c2")
    nbdkit = env.server.refresh()["nbdkit_pid"]
    rng = random.Random(8)
    src = bytearray(read_range(env.img("src"), 0, SIZE))
    c2 = bytearray(src)

    refused = _fuzz(env, nbd_connect, "src", src, rng, 250)
    refused += _fuzz(env, nbd_connect, "c2", c2, rng, 150)
    assert refused > 50

    # Many clients vanish with 1 MiB writes in flight, into the last MiB.
    tail = SIZE - MiB
    for i in range(24):
        h = nbd.NBD()
        h.set_export_name("src")
        h.connect_unix(env.server.socket)
        for j in range(4):
            h.aio_pwrite(rng.randbytes(MiB // 4), tail + j * MiB // 4)
        del h  # no shutdown, no waiting: libnbd frees it, the socket closes

    # The target is the same process and answers.
    assert env.server.refresh()["nbdkit_pid"] == nbdkit
    assert env.status("c1")["state"] == "synchronized"
    assert env.status("c2")["state"] == "fractured"
    h = nbd_connect(env.server.socket, "src")
    got = h.pread(SIZE, 0)
    h.flush()
    assert got[:tail] == bytes(src[:tail]), "a request changed the Source " \
        "other than the model says"
    assert env.read_export("c2", 0, SIZE) == bytes(c2)
    # Mirrored writes, dropped clients' included, reached both sides.
    env.assert_identical("src", "c1")
    assert "Traceback" not in env.server.log()
