"""What the peer channel between two managers (`serve --peer-port`,
`session create --peer-dest`) shows to the network and to a stranger.

A sniffing relay (tests/support/relay.py) sits between A's session and
B's peer port and records every byte both ways:

- the token never crosses the wire: both managers prove they hold it
  (challenge-response), with or without TLS;
- with TLS (`serve --peer-tls-certificates`, `session create
  --peer-tls-certificates`) the requests themselves (operation, LU name)
  do not appear in clear, and a plain client is refused with a message;
- a token file that others can read is refused by both commands;
- a client with the wrong token is refused, nothing is protected, and
  nothing derived from the token reached it;
- a fake peer (it lacks the token) gets neither the token nor a request.
"""

import json
import socket
import threading

import pytest

from tests.support.cli import run_clonectl
from tests.support.relay import SniffingRelay
from tests.support.sockets import free_port
from tests.support.tlscerts import Certs
from target import peer

TOKEN = "s3cret-peer-token-0123456789"
LU = "secretlu"


def write_token(path, text=TOKEN, mode=0o600):
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return Certs(tmp_path_factory.mktemp("certs"))


def start_pair(tmp_path, server_factory, stop_at_teardown, tls=None):
    token = write_token(tmp_path / "token")
    a, b = tmp_path / "A", tmp_path / "B"
    for d in (a, b):
        run_clonectl(d, "lu", "create", LU, "--size", "1M")
    port = free_port()
    extra = ["--peer-port", str(port), "--peer-token-file", str(token)]
    if tls is not None:
        extra += ["--peer-tls-certificates", str(tls.server_dir)]
    srv_b = server_factory(state_dir=b, socket=tmp_path / "b.sock",
                           extra_args=extra)
    relay = stop_at_teardown(SniffingRelay("127.0.0.1", port))
    return {"a": a, "b": b, "srv_b": srv_b, "token": token, "relay": relay,
            "port": port}


def sessions_of(state_dir):
    return json.loads(run_clonectl(state_dir, "session", "list",
                                   "--json").stdout)


def test_token_never_crosses_the_wire(tmp_path, server_factory,
                                      stop_at_teardown):
    p = start_pair(tmp_path, server_factory, stop_at_teardown)
    run_clonectl(p["a"], "session", "create", LU, "s", "--peer-dest",
                 p["srv_b"].uri(LU), p["relay"].addr, "--peer-token-file",
                 p["token"])
    captured = p["relay"].captured()
    assert LU.encode() in captured          # the relay sees the requests
    assert TOKEN.encode() not in captured


def test_with_tls_neither_token_nor_requests_cross_in_clear(
        tmp_path, server_factory, stop_at_teardown, certs):
    p = start_pair(tmp_path, server_factory, stop_at_teardown, tls=certs)
    run_clonectl(p["a"], "session", "create", LU, "s", "--peer-dest",
                 p["srv_b"].uri(LU), p["relay"].addr, "--peer-token-file",
                 p["token"], "--peer-tls-certificates", certs.client_dir)
    assert [s["name"] for s in sessions_of(p["a"])] == ["s"]
    captured = p["relay"].captured()
    assert len(captured) > 1000             # a TLS handshake passed
    assert TOKEN.encode() not in captured
    assert LU.encode() not in captured
    # A client without TLS is refused, with a message, and gets nothing done.
    with pytest.raises(peer.PeerRefused, match="TLS"):
        peer.call(p["relay"].addr, TOKEN, "protect", LU)
    assert sessions_of(p["b"]) == []


def test_token_file_readable_by_others_is_refused(tmp_path, server_factory,
                                                  stop_at_teardown):
    loose = write_token(tmp_path / "loose", mode=0o644)
    r = run_clonectl(tmp_path / "C", "serve", "--socket",
                     str(tmp_path / "c.sock"), "--peer-port",
                     str(free_port()), "--peer-token-file", loose,
                     check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "chmod 600" in r.stderr and str(loose) in r.stderr
    p = start_pair(tmp_path, server_factory, stop_at_teardown)
    r = run_clonectl(p["a"], "session", "create", LU, "s", "--peer-dest",
                     p["srv_b"].uri(LU), p["relay"].addr,
                     "--peer-token-file", loose, check=False)
    assert r.returncode == 1 and "chmod 600" in r.stderr
    assert sessions_of(p["a"]) == []


def test_wrong_token_is_refused_and_learns_nothing(tmp_path, server_factory,
                                                   stop_at_teardown):
    p = start_pair(tmp_path, server_factory, stop_at_teardown)
    bad = write_token(tmp_path / "bad", "not-the-right-token-at-all")
    r = run_clonectl(p["a"], "session", "create", LU, "s", "--peer-dest",
                     p["srv_b"].uri(LU), p["relay"].addr,
                     "--peer-token-file", bad, check=False)
    assert r.returncode == 1 and "invalid token" in r.stderr
    assert sessions_of(p["a"]) == [] and sessions_of(p["b"]) == []
    with pytest.raises(peer.PeerRefused, match="invalid token"):
        peer.call(p["relay"].addr, "x" * 20, "protect", LU)
    assert sessions_of(p["b"]) == []
    # B answered with a challenge and a refusal: no proof of its own, no
    # result of an operation.
    lines = [json.loads(l) for l in p["relay"].to_client().splitlines()]
    assert lines and all("proof" not in l and "result" not in l
                         for l in lines), lines
    assert TOKEN.encode() not in p["relay"].captured()


def test_old_client_sending_the_token_is_refused_with_a_reason(
        tmp_path, server_factory, stop_at_teardown):
    p = start_pair(tmp_path, server_factory, stop_at_teardown)
    with socket.create_connection(("127.0.0.1", p["port"]), timeout=10) as s:
        s.sendall(json.dumps({"token": TOKEN, "op": "protect",
                              "lu": LU}).encode() + b"\n")
        reply = json.loads(s.makefile("rb").readline())
    assert reply["ok"] is False and reply["error"]["errno"] == 13
    assert "upgrade" in reply["error"]["message"]
    assert sessions_of(p["b"]) == []


def test_fake_peer_without_the_token_gets_neither_token_nor_request():
    """A listener at the peer's address that lacks the token: it sends a
    nonce and a proof it cannot make right; the client sends it neither
    the token nor its request."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    received = bytearray()

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            f = conn.makefile("rwb")
            for reply in ({"protocol": 2, "nonce": "cd" * 32},
                          {"proof": "00" * 32},
                          {"ok": True, "result": {}}):
                line = f.readline()
                if not line:
                    return
                received.extend(line)
                f.write(json.dumps(reply).encode() + b"\n")
                f.flush()
    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        with pytest.raises(peer.PeerRefused, match="did not prove"):
            peer.call("127.0.0.1:{}".format(listener.getsockname()[1]),
                      TOKEN, "protect", LU)
        th.join(5)
    finally:
        listener.close()
    assert received
    assert TOKEN.encode() not in received
    assert b"protect" not in received and LU.encode() not in received
