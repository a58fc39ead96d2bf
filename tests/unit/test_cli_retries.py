"""The CLI's control requests while the target restarts: a request that
may have been carried out is never sent a second time.

A fake target on a Unix socket stands in for the plugin's control socket:
each connection takes the next of its scripted behaviours."""

import json
import socket
import threading
import types

import pytest

from target import cli, errors


class FakeTarget:
    """Accepts connections on path; the n-th connection reads one request
    line and then does behaviours[n]: ("drop",) closes without a reply (a
    target killed while it handled the request), ("reply", obj) answers
    obj."""

    def __init__(self, path, behaviours):
        self.behaviours = list(behaviours)
        self.requests = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        for behaviour in self.behaviours:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return      # closed: a behaviour no request came for
            with conn, conn.makefile("rb") as f:
                self.requests.append(json.loads(f.readline())["op"])
                if behaviour[0] == "reply":
                    conn.sendall(json.dumps(behaviour[1]).encode() + b"\n")

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes accept()
        except OSError:
            pass
        self.thread.join(10)
        self.sock.close()


@pytest.fixture
def fake_target(tmp_path):
    """fake_target(behaviours) -> (FakeTarget, a CLI context naming it)."""
    made = []

    def make(behaviours):
        path = str(tmp_path / "control.sock")
        target = FakeTarget(path, behaviours)
        made.append(target)
        ctx = types.SimpleNamespace(
            state_dir=types.SimpleNamespace(
                control_socket=path, path=str(tmp_path),
                serve_log_file=str(tmp_path / "serve.log")),
            last_result=None)
        return target, ctx
    yield make
    for target in made:
        target.close()


def test_a_change_whose_reply_was_lost_is_not_sent_again(fake_target):
    # The first target carried out the fracture and died before its reply;
    # the restarted one would refuse a second fracture.
    target, ctx = fake_target([
        ("drop",),
        ("reply", {"ok": False, "error": {
            "code": "CloneStateError", "errno": 16,
            "message": "cannot fracture clone 'c1': it is fractured"}})])
    with pytest.raises(errors.Error) as e:
        cli._control_call(ctx, "clone_fracture", clone="c1")
    assert target.requests == ["clone_fracture"], str(e.value)
    assert isinstance(e.value, errors.OutcomeUnknown)
    assert "clone_fracture" in str(e.value)
    assert "clonectl status" in str(e.value)


def test_a_read_whose_reply_was_lost_is_asked_again(fake_target):
    target, ctx = fake_target([("drop",),
                               ("reply", {"ok": True, "result": {"x": 1}})])
    assert cli._control_call(ctx, "clone_status", clone="c1") == {"x": 1}
    assert target.requests == ["clone_status", "clone_status"]


def test_a_change_not_delivered_is_sent_once_the_target_listens(
        fake_target, tmp_path):
    # Nothing listens yet (the target restarts): the request never left.
    ctx = types.SimpleNamespace(
        state_dir=types.SimpleNamespace(
            control_socket=str(tmp_path / "control.sock"),
            path=str(tmp_path), serve_log_file=str(tmp_path / "serve.log")),
        last_result=None)
    made = {}
    timer = threading.Timer(0.3, lambda: made.setdefault(
        "target", fake_target([("reply", {"ok": True, "result": 7})])))
    timer.start()
    try:
        assert cli._control_call(ctx, "clone_fracture", clone="c1") == 7
    finally:
        timer.join()
    assert made["target"][0].requests == ["clone_fracture"]
