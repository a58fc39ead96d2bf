"""Channels between clonectl nodes: the replication port and the peer port.

Design notes
------------
Owns how two nodes that share a token make sure of each other, and the
TLS contexts of those channels.  The framing of the messages belongs to
each channel (replication frames, peer JSON lines): this module only makes
and checks the messages' contents.

The token never crosses the wire.  The client opens with a fresh nonce,
the server answers with its own, the client sends
HMAC-SHA256(token, label | "client" | client nonce | server nonce) and only
when that matches does the server send its own proof (the same with
"server").  So:
- an eavesdropper sees two nonces and two HMACs, never the token, and a
  recorded exchange is worth nothing later (the other side's nonce is new);
- a client without the token gets a nonce and a refusal: nothing derived
  from the token that it could test guesses against;
- a server without the token (a fake secondary) cannot answer the
  client's check, and the client sends nothing else to it;
- the label (the channel's name) keeps a proof of one channel from being
  used on another with the same token, the roles keep a proof from being
  reflected back.
What the challenge-response does not stop is an attacker in the middle
that relays the exchange and then takes over the connection: that needs
TLS, which also hides the data.  Certificates only: Python's ssl module
(3.11) has no TLS-PSK.

Token and key files must be private (mode & 0o077 == 0): a file others can
read is refused with the fix, never used.
"""

import errno
import hashlib
import hmac
import os
import secrets
import socket
import ssl
import time

from . import errors, fsutil

PROTOCOL = 2            # 1: the token was sent in the first message
AUTH = "hmac-sha256"
NONCE_BYTES = 32

# The first byte of a TLS handshake record: anything else on a channel that
# requires TLS is a plain client, answered in clear and closed.
TLS_HANDSHAKE = 0x16


class AuthFailed(errors.Error):
    msg = "{reason}"
    errno = errno.EACCES


class TLSRequired(errors.Error):
    msg = "{reason}"
    errno = errno.EACCES


def _proof(token, label, role, client_nonce, server_nonce):
    msg = "clonectl {} {}".format(label, role).encode() + b"\0" + \
        client_nonce + server_nonce
    return hmac.new(token.encode(), msg, hashlib.sha256).hexdigest()


def _nonce(message, key="nonce"):
    value = message.get(key) if isinstance(message, dict) else None
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != NONCE_BYTES:
        raise errors.ProtocolError(reason="no valid {} in the handshake"
                                   .format(key))
    return raw


class ClientAuth:
    """The client's side: start() is the first message, answer(challenge)
    the second, check(reply) verifies the server's proof (AuthFailed)."""

    def __init__(self, token, label):
        self.token = token
        self.label = label
        self.nonce = secrets.token_bytes(NONCE_BYTES)
        self.server_nonce = None

    def start(self):
        return {"auth": AUTH, "protocol": PROTOCOL, "nonce": self.nonce.hex()}

    def answer(self, challenge):
        self.server_nonce = _nonce(challenge)
        return {"proof": _proof(self.token, self.label, "client", self.nonce,
                                self.server_nonce)}

    def check(self, reply):
        proof = reply.get("proof") if isinstance(reply, dict) else None
        want = _proof(self.token, self.label, "server", self.nonce,
                      self.server_nonce)
        if not isinstance(proof, str) or \
                not hmac.compare_digest(proof.encode(), want.encode()):
            raise AuthFailed(reason="the other side did not prove that it "
                             "holds the token: it is not the node you meant "
                             "or its token differs; nothing was sent")


class ServerAuth:
    """The server's side: challenge(start) answers the client's first
    message, check(answer) verifies the client's proof (AuthFailed) and
    returns the server's proof to send."""

    def __init__(self, token, label):
        self.token = token
        self.label = label
        self.nonce = secrets.token_bytes(NONCE_BYTES)
        self.client_nonce = None

    def challenge(self, start):
        if isinstance(start, dict) and "token" in start and \
                "nonce" not in start:
            raise AuthFailed(reason="the client sends its token in clear "
                             "(protocol 1); this node speaks protocol {} "
                             "(challenge-response): upgrade clonectl on the "
                             "client; nothing was done".format(PROTOCOL))
        if not isinstance(start, dict) or start.get("auth") != AUTH:
            raise AuthFailed(reason="the client did not authenticate "
                             "(expected {} challenge-response); nothing was "
                             "done".format(AUTH))
        self.client_nonce = _nonce(start)
        return {"protocol": PROTOCOL, "nonce": self.nonce.hex()}

    def check(self, answer):
        proof = answer.get("proof") if isinstance(answer, dict) else None
        want = _proof(self.token, self.label, "client", self.client_nonce,
                      self.nonce)
        if not isinstance(proof, str) or \
                not hmac.compare_digest(proof.encode(), want.encode()):
            raise AuthFailed(reason="invalid token; nothing was done")
        return {"proof": _proof(self.token, self.label, "server",
                                self.client_nonce, self.nonce)}


# TLS.

CA = "ca-cert.pem"
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"


def _tls_file(directory, name, option):
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise errors.InvalidArgument(
            reason="{} {}: {} is missing (the directory holds ca-cert.pem, "
                   "and server-cert.pem and server-key.pem on the server, as "
                   "for --tls-certificates)".format(option, directory, name))
    return path


def server_context(directory, option):
    """The TLS context of a listener from directory (ca-cert.pem,
    server-cert.pem, server-key.pem: the layout of `serve
    --tls-certificates`); option names the option in errors."""
    directory = os.path.abspath(directory)
    cert = _tls_file(directory, SERVER_CERT, option)
    key = _tls_file(directory, SERVER_KEY, option)
    fsutil.check_private(key, "TLS key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # No session tickets: nothing arrives after the handshake but records,
    # so a connection that one thread reads while another writes (a
    # primary's link and its acknowledgement reader) has no handshake
    # message to process in the middle.
    ctx.num_tickets = 0
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise errors.InvalidArgument(reason="{} {}: cannot load {} and {}: {}"
                                     .format(option, directory, SERVER_CERT,
                                             SERVER_KEY, e))
    return ctx


def client_context(directory, option):
    """The TLS context of a client from directory: ca-cert.pem, the CA the
    server's certificate must be signed by (and name the address
    connected to), and client-cert.pem/client-key.pem if there."""
    directory = os.path.abspath(directory)
    ca = _tls_file(directory, CA, option)
    try:
        ctx = ssl.create_default_context(cafile=ca)
    except (ssl.SSLError, OSError) as e:
        raise errors.InvalidArgument(reason="{} {}: cannot load {}: {}"
                                     .format(option, directory, CA, e))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    cert = os.path.join(directory, CLIENT_CERT)
    if os.path.isfile(cert):
        key = _tls_file(directory, CLIENT_KEY, option)
        fsutil.check_private(key, "TLS key")
        ctx.load_cert_chain(cert, key)
    return ctx


def accept_tls(sock, ctx, deadline):
    """The TLS side of an accepted connection, handshake done by deadline.
    A client that does not start with a TLS handshake gets TLSRequired
    (the caller answers it in clear: there is nothing secret in a
    refusal)."""
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    first = sock.recv(1, socket.MSG_PEEK)
    if not first:
        raise ConnectionError("connection closed")
    if first[0] != TLS_HANDSHAKE:
        raise TLSRequired(reason="this node requires TLS on this port; "
                          "give the client its certificates directory "
                          "(ca-cert.pem of the CA)")
    tls = ctx.wrap_socket(sock, server_side=True,
                          do_handshake_on_connect=False)
    tls.settimeout(max(0.01, deadline - time.monotonic()))
    tls.do_handshake()
    return tls


def connect_tls(sock, ctx, host):
    """The TLS side of a connection to host (whose certificate must name
    it); a failed handshake says what to check."""
    try:
        return ctx.wrap_socket(sock, server_hostname=host)
    except ssl.SSLCertVerificationError as e:
        sock.close()
        raise TLSRequired(reason="TLS: the certificate of {} is not "
                          "trusted: {}".format(host, e.verify_message or e))
    except (ssl.SSLError, OSError) as e:
        sock.close()
        raise TLSRequired(reason="TLS handshake with {} failed: {} (does it "
                          "listen with TLS?)".format(host, e))
