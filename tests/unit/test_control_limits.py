"""target.control: idle connections to the control socket are closed after
a while, and the handler threads are capped (the extra connections get an
error reply at once, and the socket serves again once the idle ones are
gone)."""

import json
import socket
import time

import pytest

from target import control, errors


@pytest.fixture
def make_ctl(tmp_path, stop_at_teardown):
    paths = iter(str(tmp_path / "c{}.sock".format(i)) for i in range(100))

    def make(**kwargs):
        srv = stop_at_teardown(control.ControlServer(
            next(paths), {"ping": lambda: {"pong": True}}, **kwargs))
        srv.start()
        return srv
    return make


def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


def read_until_closed(sock, timeout):
    """The bytes sent before the server closed sock, or None if it did not
    close it within timeout."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except ConnectionResetError:
        return data
    except socket.timeout:
        return None


def test_idle_control_connection_is_closed(make_ctl):
    srv = make_ctl(idle_timeout=0.5)
    s = connect(srv.path)
    try:
        t0 = time.monotonic()
        assert read_until_closed(s, 5.0) == b""
        assert time.monotonic() - t0 < 3.0
    finally:
        s.close()
    assert control.call(srv.path, "ping") == {"pong": True}


def test_connection_kept_between_requests_until_idle(make_ctl):
    srv = make_ctl(idle_timeout=1.0)
    s = connect(srv.path)
    try:
        f = s.makefile("rb")
        for _ in range(3):
            s.sendall(b'{"op": "ping"}\n')
            assert json.loads(f.readline())["result"] == {"pong": True}
            time.sleep(0.3)
        assert read_until_closed(s, 5.0) == b""
    finally:
        s.close()


def test_control_connections_beyond_the_cap_are_refused(make_ctl):
    srv = make_ctl(idle_timeout=30, max_connections=4)
    idle = [connect(srv.path) for _ in range(4)]
    try:
        time.sleep(0.3)
        with pytest.raises(errors.ControlError, match="connections") as info:
            control.call(srv.path, "ping", reply_timeout=5)
        assert info.value.code == "TooManyConnections"
        assert not any(read_until_closed(s, 0.2) is not None for s in idle)
    finally:
        for s in idle:
            s.close()
    time.sleep(0.3)
    assert control.call(srv.path, "ping") == {"pong": True}
