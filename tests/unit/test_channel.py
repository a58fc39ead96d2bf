"""The challenge-response of the node to node channels (target/channel.py)
and the check of token files (fsutil.read_token): what each message
carries and what a side without the token, or a replayed message, gets."""

import os

import pytest

from target import channel, errors, fsutil

TOKEN = "a-shared-token-0123456789"


def exchange(client_token, server_token, label="replication"):
    """Run one exchange; return (client, server, messages)."""
    c = channel.ClientAuth(client_token, label)
    s = channel.ServerAuth(server_token, label)
    start = c.start()
    challenge = s.challenge(start)
    answer = c.answer(challenge)
    proof = s.check(answer)
    c.check(proof)
    return c, s, [start, challenge, answer, proof]


def test_both_sides_prove_the_token_and_it_is_never_sent():
    _, _, messages = exchange(TOKEN, TOKEN)
    text = repr(messages)
    assert TOKEN not in text and TOKEN.encode().hex() not in text
    assert messages[2]["proof"] != messages[3]["proof"]


def test_a_wrong_token_is_refused_before_the_server_proves_anything():
    c = channel.ClientAuth("wrong-token-0123456789", "peer")
    s = channel.ServerAuth(TOKEN, "peer")
    challenge = s.challenge(c.start())
    assert set(challenge) == {"protocol", "nonce"}
    with pytest.raises(channel.AuthFailed, match="invalid token"):
        s.check(c.answer(challenge))


def test_a_server_without_the_token_fails_the_clients_check():
    c = channel.ClientAuth(TOKEN, "peer")
    fake = channel.ServerAuth("fake-token-0123456789", "peer")
    challenge = fake.challenge(c.start())
    c.answer(challenge)
    # The fake cannot make the server's proof.
    with pytest.raises(channel.AuthFailed, match="did not prove"):
        c.check({"proof": "00" * 32})


def test_a_recorded_answer_is_worth_nothing_later():
    _, _, old = exchange(TOKEN, TOKEN)
    s = channel.ServerAuth(TOKEN, "replication")
    s.challenge(old[0])                 # the same client nonce, replayed
    with pytest.raises(channel.AuthFailed):
        s.check(old[2])                 # the server's nonce is new


def test_a_proof_is_neither_reflected_nor_used_on_another_channel():
    c = channel.ClientAuth(TOKEN, "replication")
    s = channel.ServerAuth(TOKEN, "replication")
    challenge = s.challenge(c.start())
    answer = c.answer(challenge)
    with pytest.raises(channel.AuthFailed):
        c.check(answer)                 # the client's proof sent back
    other = channel.ServerAuth(TOKEN, "peer")
    other.nonce = s.nonce
    other.challenge({"auth": channel.AUTH, "nonce": c.nonce.hex()})
    with pytest.raises(channel.AuthFailed):
        other.check(answer)


def test_old_protocol_and_garbage_are_refused_with_a_reason():
    s = channel.ServerAuth(TOKEN, "peer")
    with pytest.raises(channel.AuthFailed, match="upgrade"):
        s.challenge({"token": TOKEN, "op": "protect"})
    with pytest.raises(channel.AuthFailed, match="did not authenticate"):
        s.challenge({"op": "protect"})
    with pytest.raises(errors.ProtocolError):
        s.challenge({"auth": channel.AUTH, "nonce": "zz"})


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_token_file_others_can_read_is_refused(tmp_path, mode):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(mode)
    with pytest.raises(errors.InvalidArgument) as e:
        fsutil.read_token(str(path), "peer")
    assert "chmod 600 {}".format(path) in str(e.value)
    path.chmod(0o600)
    assert fsutil.read_token(str(path), "peer") == TOKEN


def test_tls_key_others_can_read_is_refused(tmp_path):
    d = tmp_path / "pki"
    d.mkdir()
    for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        (d / name).write_text("x")
    os.chmod(d / "server-key.pem", 0o640)
    with pytest.raises(errors.InvalidArgument, match="chmod 600"):
        channel.server_context(str(d), "--replication-tls-certificates")
