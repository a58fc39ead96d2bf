"""Sessions shipping to another clonectl: the destination's consistent image
is protected during a transfer.

Two `clonectl serve` (A: the Source, B: the destination with a peer
listener and a shared token).  What the tests hold to:

- after a successful update B's LU equals A's, and nothing stays protected;
- while a transfer writes to B out of order, B's last consistent image is
  protected and readable as `db@protected-db`; a transfer that fails leaves
  it protected, and `clonectl lu rollback` on B makes B's LU equal to that
  image again (byte for byte);
- a wrong token gets nothing done: no session on A, no protected image on B.
"""

import json
import signal
import socket
import subprocess
import time

import pytest

from tests.support.cli import run_clonectl
from tests.support.sockets import free_port
from tests.support.tools import qemu_io, read_all

MiB = 1 << 20
# Above the transfer engine's 64 MiB checkpoint, so that a transfer cut
# after it has extents that count as sent.
SIZE = 96 * MiB
TOKEN = "s3cret-token-0123456789"


@pytest.fixture
def pair(tmp_path, server_factory, process_guard):
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    a, b = tmp_path / "A", tmp_path / "B"
    for d in (a, b):
        run_clonectl(d, "lu", "create", "db", "--size", str(SIZE))
    port = free_port()
    srv_a = server_factory(state_dir=a, socket=tmp_path / "a.sock")
    srv_b = server_factory(state_dir=b, socket=tmp_path / "b.sock",
                           extra_args=["--peer-port", str(port),
                                       "--peer-token-file", str(token)])
    return {"a": a, "b": b, "srv_a": srv_a, "srv_b": srv_b, "token": token,
            "peer": "127.0.0.1:{}".format(port), "tmp": tmp_path,
            "guard": process_guard}


def session_status(state_dir, name):
    return json.loads(run_clonectl(state_dir, "session", "status", name,
                                   "--json").stdout)


def sessions_of(state_dir):
    return json.loads(run_clonectl(state_dir, "session", "list",
                                   "--json").stdout)


def create_session(p, dest_uri):
    run_clonectl(p["a"], "session", "create", "db", "s", "--peer-dest",
                 dest_uri, p["peer"], "--peer-token-file", p["token"])


def test_update_to_peer_protects_and_releases(pair):
    p = pair
    a_uri, b_uri = p["srv_a"].uri("db"), p["srv_b"].uri("db")
    qemu_io(a_uri, "write -P 0x11 0 8M")
    create_session(p, b_uri)
    run_clonectl(p["a"], "session", "update", "s", timeout=120)
    assert read_all(a_uri) == read_all(b_uri)
    qemu_io(a_uri, "write -P 0x22 1M 2M")
    run_clonectl(p["a"], "session", "update", "s", timeout=120)
    assert read_all(a_uri) == read_all(b_uri)
    st = session_status(p["a"], "s")
    assert st["destinations"][0]["state"] == "consistent"
    assert st["destinations"][0]["protected"] is False
    assert st["last_transfer"]["bytes_sent"] == 2 * MiB
    # Released on B: no protected image left.
    assert sessions_of(p["b"]) == []


def test_failed_transfer_leaves_image_protected_and_rollback(pair):
    """The transfer goes through a slow proxy that is killed mid-way.

    Every write waits in the proxy, and the update is data from end to end,
    so the extents after the first checkpoint take several seconds more:
    the proxy is stopped as soon as the checkpoint shows, before the
    transfer can finish (in CI a 0.5 s delay over zeroes after the
    checkpoint let it complete first).
    """
    p = pair
    a_uri, b_uri = p["srv_a"].uri("db"), p["srv_b"].uri("db")
    qemu_io(a_uri, "write -P 0x11 0 16M")
    proxy_sock = p["tmp"] / "proxy.sock"
    proxy = subprocess.Popen(
        ["nbdkit", "--foreground", "-U", str(proxy_sock), "--filter=delay",
         "nbd", "socket={}".format(p["srv_b"].socket), "export=db",
         "wdelay=2"], stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    p["guard"].add(proxy.pid)
    proxy_uri = "nbd+unix:///db?socket={}".format(proxy_sock)
    deadline = time.monotonic() + 10
    while not proxy_sock.exists():
        assert time.monotonic() < deadline, "the proxy did not start"
        time.sleep(0.05)
    # Export names match (db), so the peer protects B's "db".
    create_session(p, proxy_uri)
    run_clonectl(p["a"], "session", "update", "s", timeout=180)
    consistent = read_all(b_uri)
    assert consistent == read_all(a_uri)

    qemu_io(a_uri, "write -P 0x33 0 {}M".format(SIZE // MiB))
    run_clonectl(p["a"], "session", "transfer", "s", "--full", "--timeout",
                 "5")
    # The transfer runs through the slow proxy: B is protected now.
    images = sessions_of(p["b"])
    assert [s["name"] for s in images] == ["protected-db"]
    assert images[0]["marked"] and images[0]["frozen_export"] == \
        "db@protected-db"
    # Stop the proxy once part of the update has reached B and counts as
    # sent (a checkpoint flushed it and cleared its bits); nothing more
    # reaches B from then on, and the sender's requests time out.
    deadline = time.monotonic() + 60
    while True:
        dest = session_status(p["a"], "s")["destinations"][0]
        if dest["pending_extents"] < SIZE // (64 << 10):
            break
        assert time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.05)
    proxy.send_signal(signal.SIGSTOP)
    assert dest["pending_extents"] > 0, "the transfer ended before the stop"
    assert read_all(b_uri) != consistent
    proxy.send_signal(signal.SIGKILL)
    proxy.wait(10)
    deadline = time.monotonic() + 60
    while session_status(p["a"], "s")["transferring"]:
        assert time.monotonic() < deadline, "the transfer did not fail"
        time.sleep(0.2)
    st = session_status(p["a"], "s")
    assert st["last_transfer"]["result"].startswith("failed"), st
    assert st["marked"], "a failed transfer keeps the session marked"
    dest = st["destinations"][0]
    assert dest["protected"] is True and dest["state"] == "inconsistent"
    # B's LU got part of the update; the protected image is the old one.
    assert read_all(b_uri) != consistent
    assert read_all(p["srv_b"].uri("db@protected-db")) == consistent
    out = run_clonectl(p["b"], "lu", "rollback", "db").stdout
    assert "rolled db back" in out
    assert read_all(b_uri) == consistent
    assert sessions_of(p["b"]) == []

    # The sender finds the protected image gone: B holds the old image in
    # extents its maps call sent, so B gets everything again.
    proxy_sock.unlink()
    proxy = subprocess.Popen(
        ["nbdkit", "--foreground", "-U", str(proxy_sock), "nbd",
         "socket={}".format(p["srv_b"].socket), "export=db"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    p["guard"].add(proxy.pid)
    deadline = time.monotonic() + 10
    while not proxy_sock.exists():
        assert time.monotonic() < deadline, "the proxy did not restart"
        time.sleep(0.05)
    try:
        run_clonectl(p["a"], "session", "update", "s", timeout=180)
        assert read_all(b_uri) == read_all(a_uri)
        st = session_status(p["a"], "s")
        assert st["destinations"][0]["state"] == "consistent"
        assert st["last_transfer"]["bytes_sent"] + \
            st["last_transfer"]["bytes_zeroed"] == SIZE
        assert sessions_of(p["b"]) == []
    finally:
        proxy.kill()
        proxy.wait(10)


def test_rollback_refused_while_hosts_are_connected(pair):
    p = pair
    import nbd
    run_clonectl(p["a"], "session", "create", "db", "s", "--peer-dest",
                 p["srv_b"].uri("db"), p["peer"], "--peer-token-file",
                 p["token"])
    from target import peer as peer_mod
    peer_mod.call(p["peer"], TOKEN, "protect", "db")
    h = nbd.NBD()
    h.connect_uri(p["srv_b"].uri("db"))
    try:
        r = run_clonectl(p["b"], "lu", "rollback", "db", check=False)
        assert r.returncode == 1 and "connection" in r.stderr, r.stderr
    finally:
        h.shutdown()
    assert [s["name"] for s in sessions_of(p["b"])] == ["protected-db"]
    run_clonectl(p["b"], "lu", "rollback", "db")
    assert sessions_of(p["b"]) == []


def test_wrong_token_does_nothing(pair):
    p = pair
    bad = p["tmp"] / "bad-token"
    bad.write_text("not-the-right-token-at-all\n")
    bad.chmod(0o600)
    r = run_clonectl(p["a"], "session", "create", "db", "s", "--peer-dest",
                     p["srv_b"].uri("db"), p["peer"], "--peer-token-file",
                     bad, check=False)
    assert r.returncode == 1
    assert "invalid token" in r.stderr
    assert sessions_of(p["a"]) == []
    assert sessions_of(p["b"]) == []
    # The raw protocol, without a token: refused, nothing protected.
    host, port = p["peer"].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b'{"op": "protect", "lu": "db"}\n')
        reply = json.loads(s.makefile("rb").readline())
    assert reply["ok"] is False and reply["error"]["errno"] == 13
    assert sessions_of(p["b"]) == []
