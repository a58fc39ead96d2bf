"""What a peer without the token can make a secondary's replication port
hold: a small hello, for a short time, on a few connections.

End to end: the secondary is a `clonectl serve --replication-port` (the
listener runs inside nbdkit, whose memory is measured); the primary a
second `clonectl serve` on loopback.  The timing and the caps are checked
in-process on a ReplicaServer with short timeouts.
"""

import json
import socket
import time

import pytest

from target import errors
from tests.support.cli import run_clonectl
from tests.support.processes import proc_status
from tests.support.sockets import (closed_by_server, closed_while_trickling,
                                   free_port)
from target import replication as R

MiB = 1 << 20
TOKEN = "replication-token-0123456789"








def big_hello_header():
    """A hello frame header announcing 64 MiB, without the body."""
    return R.FRAME.pack(b"HELO", 64 * MiB)


def wait_for(pred, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out waiting for " + what)


def test_oversized_hellos_cost_no_memory_and_a_primary_still_connects(
        tmp_path, server_factory):
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    a, b = tmp_path / "A", tmp_path / "B"
    for d in (a, b):
        run_clonectl(d, "lu", "create", "v1", "--size", str(4 * MiB))
    port = free_port()
    secondary = server_factory(
        state_dir=b, socket=tmp_path / "b.sock",
        extra_args=["--replication-port", str(port),
                    "--replication-token-file", str(token)])
    nbdkit = secondary.nbdkit_pid
    before = proc_status(nbdkit, "VmRSS")

    socks = []
    try:
        for _ in range(16):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(big_hello_header() + b"x" * 4096)
            socks.append(s)
        time.sleep(1.0)
        grown = proc_status(nbdkit, "VmRSS") - before
        closed = [closed_by_server(s, 5.0) for s in socks]
    finally:
        for s in socks:
            s.close()
    assert grown < 32 * 1024, \
        "nbdkit grew by {} KiB for 16 unauthenticated hellos".format(grown)
    assert all(closed), "sockets the server kept open: {}".format(
        [i for i, c in enumerate(closed) if not c])

    primary = server_factory(state_dir=a, socket=tmp_path / "a.sock")
    run_clonectl(a, "rsg", "create", "g", "--volume", "v1",
                 "--srl-size", "1M")
    run_clonectl(a, "rsg", "link", "g", "--secondary",
                 "127.0.0.1:{}".format(port), "--mode", "async",
                 "--token-file", str(token))

    def replicating():
        st = json.loads(run_clonectl(a, "rsg", "status", "g",
                                     "--json").stdout)
        link = (st.get("links") or [None])[0]
        return link if link and link["state"] == "replicating" else None
    wait_for(replicating, 30, "the link to replicate\n" + secondary.log())
    assert primary.running()
    log = (b / "run" / "serve.log").read_text(errors="replace")
    assert "HELO frame of {} bytes".format(64 * MiB) in log, log[-3000:]


# ---------------------------------------------------------------- in-process

@pytest.fixture
def replica_server(stop_at_teardown):
    def make(**kwargs):
        accepted = []

        def accept(hello, peer):
            accepted.append(hello)
            raise R.ReplicationError(name=hello.get("group", "?"),
                                     reason="no such group here")
        srv = stop_at_teardown(R.ReplicaServer("127.0.0.1", 0, TOKEN, accept,
                                               **kwargs))
        srv.accepted = accepted
        srv.start()
        return srv
    return make


def connect(srv):
    return socket.create_connection(srv.sock.getsockname(), timeout=5)


def good_hello(sock):
    R.authenticate(sock, TOKEN, "the secondary")
    body = json.dumps({"group": "g"}).encode()
    sock.sendall(R.FRAME.pack(b"HELO", len(body)) + body)
    kind, payload = R.recv_frame(sock)
    return kind, json.loads(payload)


def test_silent_peer_is_dropped_after_the_hello_timeout(replica_server):
    srv = replica_server(hello_timeout=0.5)
    s = connect(srv)
    try:
        t0 = time.monotonic()
        assert closed_by_server(s, 5.0)
        assert time.monotonic() - t0 < 3.0
    finally:
        s.close()


def test_trickled_hello_is_dropped_at_the_deadline(replica_server):
    """Bytes arriving slowly do not extend the time a hello may take."""
    srv = replica_server(hello_timeout=1.0)
    s = connect(srv)
    try:
        took = closed_while_trickling(
            s, R.FRAME.pack(b"HELO", 1000) + b"{" * 1000, 6.0)
        assert took is not None and took < 4.0, took
    finally:
        s.close()


def test_unauthenticated_connections_are_capped(replica_server):
    srv = replica_server(hello_timeout=30, max_unauthenticated=4,
                         max_connections=8)
    idle = [connect(srv) for _ in range(4)]
    try:
        time.sleep(0.3)
        extra = [connect(srv) for _ in range(6)]
        try:
            assert all(closed_by_server(s, 3.0) for s in extra)
        finally:
            for s in extra:
                s.close()
        # The capped ones are still held (not closed) ...
        assert not any(closed_by_server(s, 0.2) for s in idle)
    finally:
        for s in idle:
            s.close()
    # ... and once they are gone, a primary's hello is read and answered.
    time.sleep(0.3)
    s = connect(srv)
    try:
        kind, reply = good_hello(s)
    finally:
        s.close()
    assert kind == b"HRPL" and reply["ok"] is False
    assert "no such group here" in reply["message"]
    assert srv.accepted and srv.accepted[-1]["group"] == "g"


def test_hello_without_the_token_is_refused_before_anything(replica_server):
    srv = replica_server()
    s = connect(srv)
    try:
        with pytest.raises(R.RemoteRefused, match="invalid token"):
            R.authenticate(s, "wrong" * 4, "the secondary")
    finally:
        s.close()
    assert srv.accepted == []


def test_frame_header_too_large_for_a_hello_is_refused_unread():
    a, b = socket.socketpair()
    try:
        a.sendall(R.FRAME.pack(b"HELO", R.MAX_HELLO + 1))
        with pytest.raises(errors.ProtocolError):
            R.recv_frame(b, limit=R.MAX_HELLO)
    finally:
        a.close()
        b.close()
