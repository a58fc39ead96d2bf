"""The operations a peer manager's requests become on this target."""

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
