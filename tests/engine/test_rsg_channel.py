"""What the replication channel shows to the network and to a stranger.

Two in-process Targets (A primary, B secondary) with a sniffing relay
between them (tests/support/relay.py records every byte both ways):

- the token never crosses the wire: the primary and the secondary prove
  to each other that they hold it (challenge-response);
- with TLS (`--replication-tls-certificates` on the secondary, `rsg link
  --tls-certificates` on the primary) a known data pattern written to a
  volume does not appear in the captured bytes either, and a primary
  without TLS is refused with a message;
- a token file that others can read is refused (and nothing is made);
- a primary with the wrong token is refused, nothing is made on the
  secondary, and nothing derived from the token reached it;
- a primary of the old protocol (the token in the hello) is refused with
  a message that says so, and so is a secondary of the old protocol;
- a fake secondary at the link's address (it lacks the token) gets no
  token, no hello and no data.
"""

import json
import os
import shutil
import socket
import tempfile
import threading
import time

import pytest

from tests.support.relay import SniffingRelay
from tests.support.rsgmodel import fast_timing, restore_timing, wait_for
from tests.support.sockets import free_port
from tests.support.tlscerts import Certs
from target import errors, inventory
from target import replication as R
from target.target import Target

TOKEN = "replication-token-0123456789"
SIZE = 1 << 20
# A pattern that occurs nowhere else: 64 KiB of it at an offset.
PATTERN = b"clonectl-secret-volume-bytes:0123456789abcdef" * 1400


@pytest.fixture(autouse=True)
def _fast():
    saved = fast_timing()
    yield
    restore_timing(saved)


def write_token(path, text=TOKEN, mode=0o600):
    with open(path, "w") as f:
        f.write(text + "\n")
    os.chmod(path, mode)
    return path


class Pair:
    """A and B with the volume v1, B listening for primaries, a relay in
    front of B's replication port."""

    def __init__(self, root, tls=None):
        self.root = root
        self.A = os.path.join(root, "A")
        self.B = os.path.join(root, "B")
        self.tok = write_token(os.path.join(root, "tok"))
        for sd in (self.A, self.B):
            st_ = inventory.StateDir(sd)
            st_.ensure()
            inventory.create_lu(st_, "v1", size=SIZE)
        self.port = free_port()
        self.tb = Target(self.B)
        self.tb.start()
        kwargs = {"tls_certificates": str(tls.server_dir)} if tls else {}
        self.tb.start_replication("127.0.0.1", self.port, self.tok, **kwargs)
        self.relay = SniffingRelay("127.0.0.1", self.port)
        self.ta = Target(self.A)
        self.ta.start()
        self.ta.rsg_create("g", ["v1"], "1M", granularity="4K")

    @property
    def link(self):
        return self.ta.rsgs["g"].links[0]

    def secondary_image(self):
        lu = self.tb.lus["v1"]
        buf = bytearray(lu.size)
        lu.backend.readinto(buf, 0)
        return bytes(buf)

    def replicated(self, off, data):
        sg = self.tb.rsgs.get("g")
        return self.link.state == R.REPLICATING and sg is not None and \
            sg.applied_seq == self.ta.rsgs["g"].next_seq - 1 and \
            self.secondary_image()[off:off + len(data)] == data

    def close(self):
        self.relay.stop()
        for t in (self.ta, self.tb):
            try:
                t.close()
            except Exception:
                pass


@pytest.fixture
def pair_factory():
    made = []

    def make(**kw):
        root = tempfile.mkdtemp(prefix="rsg-channel-")
        p = Pair(root, **kw)
        made.append((root, p))
        return p
    yield make
    for root, p in made:
        p.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return Certs(tmp_path_factory.mktemp("certs"))


def replicate_pattern(p, **link_kwargs):
    p.ta.rsg_link("g", p.relay.addr, "sync", p.tok, **link_kwargs)
    off = 256 << 10
    p.ta.lus["v1"].write(PATTERN, off)
    p.ta.lus["v1"].flush()
    wait_for(lambda: p.replicated(off, PATTERN), 20, "replication",
             lambda: p.link.status())


def test_token_never_crosses_the_wire(pair_factory):
    p = pair_factory()
    replicate_pattern(p)
    captured = p.relay.captured()
    assert PATTERN[:64] in captured     # the relay does see the traffic
    assert TOKEN.encode() not in captured


def test_with_tls_neither_token_nor_data_cross_in_clear(pair_factory, certs):
    p = pair_factory(tls=certs)
    replicate_pattern(p, tls_certificates=str(certs.client_dir))
    captured = p.relay.captured()
    assert len(captured) > len(PATTERN)
    assert TOKEN.encode() not in captured
    assert PATTERN[:32] not in captured


def test_tls_secondary_refuses_a_plain_primary(pair_factory, certs):
    p = pair_factory(tls=certs)
    p.ta.rsg_link("g", p.relay.addr, "async", p.tok)
    p.ta.lus["v1"].write(PATTERN, 0)
    wait_for(lambda: p.link.error and "TLS" in p.link.error, 10,
             "a refusal", lambda: p.link.status())
    assert p.link.state == R.FAILED
    assert "g" not in p.tb.rsgs
    assert PATTERN[:32] not in p.relay.captured()


def test_primary_that_does_not_trust_the_secondary_sends_nothing(
        pair_factory, certs):
    p = pair_factory(tls=certs)
    p.ta.rsg_link("g", p.relay.addr, "async", p.tok,
                  tls_certificates=str(certs.untrusting_dir))
    wait_for(lambda: p.link.error and "certificate" in p.link.error, 10,
             "a refusal", lambda: p.link.status())
    assert "g" not in p.tb.rsgs


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_token_file_readable_by_others_is_refused(pair_factory, mode):
    p = pair_factory()
    loose = write_token(os.path.join(p.root, "loose"), mode=mode)
    with pytest.raises(errors.InvalidArgument, match="chmod 600") as e:
        p.ta.rsg_link("g", p.relay.addr, "async", loose)
    assert loose in str(e.value)
    assert p.ta.rsgs["g"].links == []
    with pytest.raises(errors.InvalidArgument, match="chmod 600"):
        p.tb.start_replication("127.0.0.1", free_port(), loose)


def test_wrong_token_is_refused_and_learns_nothing(pair_factory):
    p = pair_factory()
    bad = write_token(os.path.join(p.root, "bad"), "wrong-token-" + "y" * 20)
    p.ta.rsg_link("g", p.relay.addr, "async", bad)
    p.ta.lus["v1"].write(PATTERN, 0)
    wait_for(lambda: p.link.error and "invalid token" in p.link.error, 10,
             "a refusal", lambda: p.link.status())
    assert "g" not in p.tb.rsgs
    assert p.secondary_image() == bytes(SIZE)
    # What the secondary sent: frames with a challenge and the refusal,
    # never a proof of its own (that would help a guesser offline).
    down = p.relay.to_client()
    sent = []
    while down:
        kind, n = R.FRAME.unpack(down[:R.FRAME.size])
        sent.append((kind, json.loads(down[R.FRAME.size:R.FRAME.size + n])))
        down = down[R.FRAME.size + n:]
    assert sent and all("proof" not in body for _, body in sent), sent
    assert TOKEN.encode() not in p.relay.captured()
    assert PATTERN[:32] not in p.relay.captured()


def test_old_primary_sending_the_token_is_refused_with_a_reason(
        pair_factory):
    p = pair_factory()
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        body = json.dumps({"token": TOKEN, "group": "g", "volumes": []})
        s.sendall(R.FRAME.pack(b"HELO", len(body)) + body.encode())
        kind, payload = R.recv_frame(s)
    reply = json.loads(payload)
    assert kind == b"HRPL" and reply["ok"] is False
    assert "protocol" in reply["message"] and "upgrade" in reply["message"]
    assert "g" not in p.tb.rsgs


class FakeSecondary:
    """A listener at the secondary's address that does not hold the
    token: it records what a primary sends it and answers with answer(kind,
    payload) -> frames to send back (None: hang up)."""

    def __init__(self, answer):
        self.answer = answer
        self.received = bytearray()
        self.kinds = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.addr = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            try:
                while True:
                    kind, payload = R.recv_frame(conn)
                    self.kinds.append(kind)
                    self.received += kind + bytes(payload)
                    frames = self.answer(kind, payload)
                    if frames is None:
                        return
                    for k, body in frames:
                        R.send_frame(conn, k, json.dumps(body).encode())
            except (OSError, ConnectionError, errors.Error):
                return

    def stop(self):
        self.sock.close()
        self.thread.join(5)


def test_fake_secondary_without_the_token_gets_neither_token_nor_data(
        pair_factory):
    """What the finding was about: a fake secondary at the link's address
    got the token in the hello, and then the volumes."""
    def answer(kind, payload):
        if kind == b"AUTH":
            return [(b"CHAL", {"protocol": 2, "nonce": "ab" * 32})]
        if kind == b"PROF":
            return [(b"PROF", {"proof": "00" * 32})]    # it cannot do better
        if kind == b"HELO":     # protocol 1: the hello had the token
            return [(b"HRPL", {"ok": True, "consistent": False,
                               "applied_seq": 0, "history": [],
                               "last_seq": 0})]
        return []
    p = pair_factory()
    fake = FakeSecondary(answer)
    try:
        p.ta.rsg_link("g", fake.addr, "async", p.tok)
        p.ta.lus["v1"].write(PATTERN, 0)
        wait_for(lambda: p.link.error is not None, 10, "the link to fail",
                 lambda: p.link.status())
        time.sleep(0.3)
        assert TOKEN.encode() not in fake.received
        assert PATTERN[:32] not in fake.received
        assert b"HELO" not in fake.kinds, fake.kinds
        assert "did not prove" in p.link.error, p.link.status()
    finally:
        fake.stop()


def test_secondary_of_the_old_protocol_is_named_in_the_error(pair_factory):
    def answer(kind, payload):
        # What a secondary of protocol 1 answers to anything but HELO.
        return [(b"HRPL", {"ok": False, "message": "control protocol error: "
                           "expected a hello"})]
    p = pair_factory()
    fake = FakeSecondary(answer)
    try:
        p.ta.rsg_link("g", fake.addr, "async", p.tok)
        wait_for(lambda: p.link.error is not None, 10, "the link to fail",
                 lambda: p.link.status())
        assert "upgrade it" in p.link.error, p.link.status()
    finally:
        fake.stop()
