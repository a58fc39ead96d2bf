"""target.control: the JSON-lines control socket."""

import json
import os
import socket
import stat
import threading
import time

import pytest

from target import control, errors, operations


def _ops():
    calls = []

    def echo(**kwargs):
        calls.append(kwargs)
        return kwargs

    def add(a, b):
        return a + b

    def boom():
        raise RuntimeError("kaboom")

    def refuse(name):
        raise errors.UnknownLU(name=name)

    return {"ping": lambda: {"pong": True}, "echo": echo, "add": add,
            "boom": boom, "refuse": refuse}, calls


@pytest.fixture(scope="module")
def _shared_ctl(tmp_path_factory):
    # One server for the module: ControlServer.stop() waits for the
    # serve_forever poll interval (0.5 s).
    path = str(tmp_path_factory.mktemp("ctl") / "control.sock")
    ops, calls = _ops()
    srv = control.ControlServer(path, ops, check=operations.check_arguments)
    srv.start()
    srv.calls = calls
    yield srv
    srv.stop()
    assert not os.path.exists(path), "stop() removes the socket"


@pytest.fixture
def ctl(_shared_ctl):
    _shared_ctl.calls.clear()
    _assert_alive(_shared_ctl.path)
    yield _shared_ctl
    _assert_alive(_shared_ctl.path)


def _raw_exchange(path, payload, timeout=10):
    """Send raw bytes, return the reply lines until the server closes or
    one line arrived."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def _assert_alive(path):
    assert control.call(path, "ping") == {"pong": True}


def test_socket_mode_is_private(ctl):
    mode = stat.S_IMODE(os.stat(ctl.path).st_mode)
    assert mode & 0o077 == 0, oct(mode)


def test_call_ok(ctl):
    assert control.call(ctl.path, "ping") == {"pong": True}
    assert control.call(ctl.path, "add", a=2, b=3) == 5
    assert control.call(ctl.path, "echo", x=[1, "two"]) == {"x": [1, "two"]}


def test_error_reply_becomes_control_error(ctl):
    with pytest.raises(errors.ControlError) as info:
        control.call(ctl.path, "refuse", name="db9")
    assert info.value.code == "UnknownLU"
    assert info.value.errno == 2
    assert "db9" in str(info.value)
    _assert_alive(ctl.path)


def test_unknown_operation(ctl):
    with pytest.raises(errors.ControlError) as info:
        control.call(ctl.path, "format_everything")
    assert info.value.code == "ProtocolError"
    assert "format_everything" in str(info.value)
    _assert_alive(ctl.path)


@pytest.mark.parametrize("payload, fragment", [
    (b"not json\n", "invalid JSON"),
    (b"{\"op\": \"ping\"\n", "invalid JSON"),
    (b"\xff\xfe\n", "invalid JSON"),
    (b"[1, 2]\n", "not an object"),
    (b"\"ping\"\n", "not an object"),
    (b"{\"op\": \"ping\", \"args\": [1]}\n", "'args' is not an object"),
    (b"{\"op\": \"ping\", \"args\": \"x\"}\n", "'args' is not an object"),
    (b"{\"op\": 5}\n", "unknown operation"),
    (b"{\"op\": null}\n", "unknown operation"),
    (b"{}\n", "unknown operation"),
    (b"{\"op\": \"add\", \"args\": {\"a\": 1}}\n", "bad arguments for add"),
    (b"{\"op\": \"add\", \"args\": {\"a\": 1, \"b\": 2, \"c\": 3}}\n",
     "bad arguments for add"),
    (b"{\"op\": \"add\", \"args\": {\"a\": 1, \"b\": \"x\"}}\n",
     "bad arguments for add"),
    (b"{\"op\": \"ping\", \"args\": {\"unexpected\": 1}}\n",
     "bad arguments for ping"),
])
def test_malformed_requests_get_error_replies(ctl, payload, fragment):
    replies = _raw_exchange(ctl.path, payload)
    assert len(replies) == 1, replies
    reply = replies[0]
    assert reply["ok"] is False
    assert fragment in reply["error"]["message"], reply
    assert isinstance(reply["error"]["errno"], int)
    assert reply["error"]["code"] in ("ProtocolError", "InvalidArgument")
    _assert_alive(ctl.path)


def test_internal_error_is_reported_and_server_survives(ctl):
    with pytest.raises(errors.ControlError) as info:
        control.call(ctl.path, "boom")
    assert "kaboom" in str(info.value)
    _assert_alive(ctl.path)


def test_deeply_nested_json_does_not_kill_the_server(ctl):
    payload = b"[" * 100000 + b"]" * 100000 + b"\n"
    replies = _raw_exchange(ctl.path, payload)
    assert len(replies) == 1 and replies[0]["ok"] is False
    _assert_alive(ctl.path)


def test_several_requests_on_one_connection(ctl):
    payload = (b'{"op": "ping"}\n' b'garbage\n'
               b'{"op": "add", "args": {"a": 40, "b": 2}}\n')
    replies = _raw_exchange(ctl.path, payload)
    assert [r["ok"] for r in replies] == [True, False, True]
    assert replies[2]["result"] == 42


def test_oversized_request(ctl):
    big = json.dumps({"op": "echo",
                      "args": {"x": "a" * (control.MAX_REQUEST + 10)}})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(ctl.path)
        # Send in a thread: the server stops reading after MAX_REQUEST + 1
        # bytes, so sendall of the rest may fail once it closes.
        def send():
            try:
                s.sendall(big.encode() + b"\n")
            except OSError:
                pass
        t = threading.Thread(target=send)
        t.start()
        with s.makefile("rb") as f:
            line = f.readline()
        t.join(10)
    reply = json.loads(line)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "ProtocolError"
    assert "larger than" in reply["error"]["message"]
    assert ctl.calls == [], "an oversized request must not be executed"
    _assert_alive(ctl.path)


def test_request_just_under_the_limit_is_served(ctl):
    overhead = len(json.dumps({"op": "echo", "args": {"x": ""}})) + 1
    x = "b" * (control.MAX_REQUEST - overhead)
    assert control.call(ctl.path, "echo", x=x) == {"x": x}


def test_client_disconnecting_mid_request(ctl):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(ctl.path)
        s.sendall(b'{"op": "pi')
    time.sleep(0.2)  # let the server notice (it may log a broken pipe)
    _assert_alive(ctl.path)


def _call_in_threads(path, n):
    results, failures = [], []

    def worker(i):
        try:
            results.append(control.call(path, "add", a=i, b=i, reply_timeout=20))
        except Exception as e:  # collected and shown by the assertion
            failures.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results, failures


def test_concurrent_clients(ctl):
    threads, results, failures = _call_in_threads(ctl.path, 4)
    for t in threads:
        t.join(20)
    assert failures == []
    assert sorted(results) == [2 * i for i in range(4)]


def test_clients_queue_while_the_server_is_busy(tmp_path):
    # Deterministic burst: the server accepts nothing until all clients
    # have connected, as when its accept thread is slow under load.
    path = str(tmp_path / "busy.sock")
    ops, _ = _ops()
    srv = control.ControlServer(path, ops, check=operations.check_arguments)
    try:
        threads, results, failures = _call_in_threads(path, 12)
        time.sleep(1.0)
        srv.start()
        for t in threads:
            t.join(20)
    finally:
        srv.stop()
    assert failures == []
    assert sorted(results) == [2 * i for i in range(12)]


def test_path_that_is_not_a_socket_is_kept(tmp_path):
    path = str(tmp_path / "c.sock")
    with open(path, "w") as f:
        f.write("precious")
    with pytest.raises(errors.InvalidArgument, match="not a socket"):
        control.ControlServer(path, {"ping": lambda: 1})
    with open(path) as f:
        assert f.read() == "precious"


def test_stale_socket_is_replaced(tmp_path):
    path = str(tmp_path / "c.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)    # bound, never listening: a stale socket file
    srv = control.ControlServer(path, {"ping": lambda: 1})
    srv.start()
    try:
        assert control.call(path, "ping") == 1
    finally:
        srv.stop()
    assert not os.path.exists(path), "stop() removes the socket"


def test_call_without_server(tmp_path):
    path = str(tmp_path / "none.sock")
    with pytest.raises(FileNotFoundError):
        control.call(path, "ping")
    assert control.try_call(path, "ping") is None


def test_try_call_on_dead_socket(tmp_path):
    path = str(tmp_path / "dead.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # the file stays, nobody listens
    assert control.try_call(path, "ping") is None


def test_call_when_server_closes_without_reply(tmp_path):
    path = str(tmp_path / "mute.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def accept_and_close():
        conn, _ = listener.accept()
        conn.recv(1024)
        conn.close()

    t = threading.Thread(target=accept_and_close)
    t.start()
    try:
        with pytest.raises(errors.ProtocolError, match="closed"):
            control.call(path, "ping")
    finally:
        t.join(5)
        listener.close()
