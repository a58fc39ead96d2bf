"""The operations a peer manager's requests become on this target."""

import pytest

from target import operations, peer


def test_a_peers_rollback_puts_back_only_its_own_image(monkeypatch):
    """A peer's rollback is of the LU's protected image (the one peers
    keep), never of the last consistent image a replicated group's
    secondary keeps (LU@consistent-LU), which `lu rollback` prefers."""
    calls = []

    def call(path, op, reply_timeout=30.0, **args):
        calls.append((op, args))
        return {}
    monkeypatch.setattr(peer.control, "call", call)
    server = peer.PeerServer("127.0.0.1", 0, "t" * 20, "/nonexistent",
                             operations.PEER_OPERATIONS)
    try:
        for name in ("rollback", "release", "protect", "status"):
            server.operations[name]("db1")
    finally:
        server.server_close()
    assert calls == [("image_rollback", {"lu": "db1", "image": "protected"}),
                     ("image_release", {"lu": "db1"}),
                     ("image_protect", {"lu": "db1"}),
                     ("image_status", {"lu": "db1"})]


@pytest.mark.parametrize("reply", [
    {"ok": True, "result": "protected"},
    {"ok": True, "result": None},
    {"ok": True, "result": [1, 2]},
    {"ok": False, "error": "it broke"},
    {"ok": False, "error": ["it broke"]},
])
def test_a_peer_reply_of_another_shape_is_a_peer_error(monkeypatch, reply):
    """A peer that proved the token but answers with a result or an error
    that is not an object: the caller gets a PeerError (which a transfer
    handles: it releases what it protected), never an AttributeError
    escaping from the reply's use."""
    monkeypatch.setattr(peer.PeerServer, "dispatch",
                        lambda self, line, client: reply)
    token = "t" * 20
    server = peer.PeerServer("127.0.0.1", 0, token, "/nonexistent",
                             operations.PEER_OPERATIONS)
    server.start()
    try:
        with pytest.raises(peer.PeerError, match="reply"):
            peer.call("127.0.0.1:{}".format(server.server_address[1]),
                      token, "protect", "db1")
    finally:
        server.stop()
