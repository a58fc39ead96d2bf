"""What clients without the token can make the peer port (`serve
--peer-port`, in the manager) hold: a thread each only for a while, and
only a few of them.

End to end: idle connections to a real manager do not add threads beyond
the cap, the extra ones are closed at once.  In-process: the request
timeout (short, set by the test) and that a request is still answered
once the idle clients are gone.
"""

import json
import socket
import time

import pytest

from tests.support.cli import run_clonectl
from tests.support.processes import proc_status
from tests.support.sockets import (closed_by_server, closed_while_trickling,
                                   free_port)
from target import operations, peer

TOKEN = "s3cret-token-0123456789"








def test_idle_peer_connections_are_capped(tmp_path, server_factory):
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    run_clonectl(tmp_path / "B", "lu", "create", "db", "--size", "1M")
    port = free_port()
    srv = server_factory(state_dir=tmp_path / "B", socket=tmp_path / "b.sock",
                         extra_args=["--peer-port", str(port),
                                     "--peer-token-file", str(token)])
    before = proc_status(srv.pid, "Threads")
    socks = []
    try:
        for _ in range(100):
            socks.append(socket.create_connection(("127.0.0.1", port),
                                                  timeout=5))
        time.sleep(1.0)
        grown = proc_status(srv.pid, "Threads") - before
        closed = sum(closed_by_server(s, 0.05) for s in socks)
    finally:
        for s in socks:
            s.close()
    assert grown <= peer.MAX_UNAUTHENTICATED + 2, \
        "100 idle peer connections added {} threads".format(grown)
    assert closed >= 100 - peer.MAX_UNAUTHENTICATED - 2, \
        "only {} of 100 idle connections were closed".format(closed)
    # The port still answers a request (here refused: wrong token).
    time.sleep(0.3)
    with pytest.raises(peer.PeerRefused, match="invalid token"):
        peer.call("127.0.0.1:{}".format(port), "x" * 20, "status", "db")


@pytest.fixture
def peer_server(stop_at_teardown):
    def make(**kwargs):
        srv = stop_at_teardown(peer.PeerServer(
            "127.0.0.1", 0, TOKEN, "/nonexistent.sock",
            operations.PEER_OPERATIONS, **kwargs))
        srv.start()
        return srv
    return make


def address(srv):
    return "127.0.0.1:{}".format(srv.server_address[1])


def test_idle_peer_is_closed_after_the_request_timeout(peer_server):
    srv = peer_server(request_timeout=0.5)
    s = socket.create_connection(srv.server_address, timeout=5)
    try:
        t0 = time.monotonic()
        assert closed_by_server(s, 5.0)
        assert time.monotonic() - t0 < 3.0
    finally:
        s.close()


def test_trickled_peer_request_is_closed_at_the_deadline(peer_server):
    srv = peer_server(request_timeout=1.0)
    s = socket.create_connection(srv.server_address, timeout=5)
    try:
        took = closed_while_trickling(s, b" " * 100, 8.0)
        assert took is not None and took < 4.0, took
    finally:
        s.close()


def test_peer_connections_beyond_the_cap_are_closed_at_once(peer_server):
    srv = peer_server(request_timeout=30, max_connections=6,
                      max_unauthenticated=4)
    idle = [socket.create_connection(srv.server_address, timeout=5)
            for _ in range(4)]
    try:
        time.sleep(0.3)
        extra = [socket.create_connection(srv.server_address, timeout=5)
                 for _ in range(5)]
        try:
            assert all(closed_by_server(s, 3.0) for s in extra)
        finally:
            for s in extra:
                s.close()
        assert not any(closed_by_server(s, 0.2) for s in idle)
    finally:
        for s in idle:
            s.close()
    time.sleep(0.3)
    with pytest.raises(peer.PeerRefused, match="invalid token"):
        peer.call(address(srv), "x" * 20, "status", "db")
    # With the token the request gets past the check (to a target that is
    # not there: the reply says so).
    with pytest.raises(peer.PeerError, match="not answering"):
        peer.call(address(srv), TOKEN, "status", "db")


def test_peer_request_too_large_is_refused(peer_server):
    srv = peer_server()
    with socket.create_connection(srv.server_address, timeout=5) as s:
        s.sendall(b"{" * (peer.MAX_REQUEST + 10))
        with s.makefile("rb") as f:
            reply = json.loads(f.readline())
    assert reply["ok"] is False and "too large" in reply["error"]["message"]
