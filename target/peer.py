"""The manager-to-manager channel: protect a destination's consistent image.

Design notes
------------
Before a session sends out-of-order updates to a destination that is
another clonectl target, it asks that target to protect its last consistent
image of the LU, and to release it after the transfer succeeded.  A failed
or interrupted transfer leaves it protected; the admin there can roll the
LU back to it (`clonectl lu rollback`).

Protocol 2: TCP (TLS when the listener has certificates), one JSON object
per line each way, one request per connection (control.dispatch answers
it, as on the control socket).  First both managers prove that they hold
the shared token (target/channel.py: challenge-response; the token never
crosses the wire), then the request:

    client  {"auth": "hmac-sha256", "protocol": 2, "nonce": "..."}
    server  {"protocol": 2, "nonce": "..."}
    client  {"proof": "..."}
    server  {"proof": "..."}     or {"ok": false, "error": {...}}, closed
    client  {"op": "protect", "lu": "db1"}
    server  {"ok": true, "result": {...}} or {"ok": false, "error": {...}}

A client that does not prove the token gets a nonce and a refusal, and
nothing is done; the client checks the server's proof before it sends its
request.  A client of protocol 1 (the token in its request) is refused
with a message.  With TLS a plain client is refused in clear.  The
manager's listener forwards an accepted request to its target over the
local control socket; the target protects an image with a copy-on-first-
write snapshot (an internal session marked with a frozen export,
`LU@protected-LU`), so protecting costs no copy.

Deliberately ignored: several protected images per LU.
See docs/design.md and docs/sessions.md.
"""

import errno
import json
import logging
import socket
import socketserver
import threading
import time

from . import channel, control, errors, limits

log = logging.getLogger("clonectl.peer")

MAX_REQUEST = 64 << 10
MAX_CONNECTIONS = 16        # requests served at once (a thread each)
MAX_UNAUTHENTICATED = 8     # of which not yet past the token check


class PeerRefused(errors.Error):
    msg = "peer {peer}: {reason}"
    errno = errno.EACCES


class AccessDenied(errors.Error):
    """Raised by the listener; the caller sees it as PeerRefused."""
    msg = "{reason}"
    errno = errno.EACCES


class PeerError(errors.Error):
    msg = "peer {peer}: {reason}"
    errno = errno.EIO


class _Lines:
    """JSON lines on a connection, each at most MAX_REQUEST bytes and, with
    a deadline, read by it however slowly they arrive (socket.timeout
    after it)."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()

    def read(self, deadline=None):
        """The next line (without its newline), or what came before the
        connection closed; over MAX_REQUEST bytes: MAX_REQUEST + 1."""
        while b"\n" not in self.buf and len(self.buf) <= MAX_REQUEST:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout("timed out")
                self.sock.settimeout(left)
            data = self.sock.recv(MAX_REQUEST + 1 - len(self.buf))
            if not data:
                break
            self.buf += data
        end = self.buf.find(b"\n")
        if end < 0:
            line, self.buf = bytes(self.buf), bytearray()
        else:
            line, self.buf = bytes(self.buf[:end]), self.buf[end + 1:]
        return line

    def read_json(self, deadline=None):
        line = self.read(deadline)
        if len(line) > MAX_REQUEST:
            raise errors.ProtocolError(reason="request too large")
        if not line:
            raise ConnectionError("connection closed")
        try:
            return json.loads(line)
        except ValueError as e:
            raise errors.ProtocolError(
                reason="invalid JSON: {}".format(e)) from e

    def write(self, obj):
        self.sock.sendall(json.dumps(obj).encode() + b"\n")


def _refusal(e):
    return {"ok": False, "error": e.to_dict()}


class _Handler(socketserver.BaseRequestHandler):

    timeout = 30    # for the reply, once the request is read

    def handle(self):
        srv = self.server
        conn = self.request
        client = self.client_address[0]
        deadline = time.monotonic() + srv.request_timeout
        try:
            if srv.tls is not None:
                try:
                    conn = channel.accept_tls(conn, srv.tls, deadline)
                except channel.TLSRequired as e:
                    log.warning("peer connection from %s refused: no TLS",
                                client)
                    _Lines(conn).write(_refusal(AccessDenied(
                        reason="{} (session create --peer-tls-certificates "
                               "DIR); nothing was done".format(e))))
                    return
            lines = _Lines(conn)
            try:
                srv.authenticate(lines, deadline, client)
            except errors.Error as e:
                lines.write(_refusal(e))
                return
            conn.settimeout(self.timeout)
            line = lines.read(time.monotonic() + self.timeout)
            lines.write(srv.dispatch(line, self.client_address))
        except socket.timeout:
            log.warning("peer connection from %s closed: no request within "
                        "%.0f s", client, srv.request_timeout)
        except (OSError, ConnectionError):
            pass        # the client went away, or a TLS handshake failed
        finally:
            if conn is not self.request:
                try:
                    conn.close()
                except OSError:
                    pass


class PeerServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """One thread per connection, one request per connection.  A client
    has request_timeout seconds for the TLS handshake and to prove the
    token (messages of MAX_REQUEST bytes at most); at most max_connections
    are served at once, and at most max_unauthenticated before their token
    is proven; others are closed at once (limits.Gate)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, bind, port, token, control_path, peer_operations,
                 check=None, request_timeout=limits.HELLO_TIMEOUT,
                 max_connections=MAX_CONNECTIONS,
                 max_unauthenticated=MAX_UNAUTHENTICATED, tls=None):
        self.token = token
        # An ssl.SSLContext (channel.server_context): then every client
        # must speak TLS; a plain one is refused in clear.
        self.tls = tls
        self.control_path = control_path
        self.request_timeout = request_timeout
        self.gate = limits.Gate("peer port", max_connections,
                                max_unauthenticated)
        self._local = threading.local()
        # peer_operations: {peer op: control op}, the operations table's
        # (the manager passes it: this module sits below the table).
        self.operations = {peer_op: self._forward(op) for peer_op, op in
                           peer_operations.items()}
        self.check = check
        super().__init__((bind, port), _Handler)
        self._thread = None

    def verify_request(self, request, client_address):
        return self.gate.enter(client_address[0])

    def process_request_thread(self, request, client_address):
        self._local.authenticated = False
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.gate.leave(self._local.authenticated)

    def authenticate(self, lines, deadline, client):
        """The client proves it holds the token, then this side does
        (channel.ServerAuth); AccessDenied if it does not."""
        auth = channel.ServerAuth(self.token, "peer")
        try:
            lines.write(auth.challenge(lines.read_json(deadline)))
            lines.write(auth.check(lines.read_json(deadline)))
        except channel.AuthFailed as e:
            log.warning("peer request from %s refused: %s", client, e)
            raise AccessDenied(reason=str(e))
        self._local.authenticated = True
        self.gate.authenticated()

    def dispatch(self, line, client):
        """The reply to the request line of an authenticated client."""
        if len(line) > MAX_REQUEST:
            return _refusal(errors.ProtocolError(reason="request too large"))

        def unpack(request):
            op, lu = request.get("op"), request.get("lu")
            if not isinstance(op, str) or \
                    op not in self.operations or \
                    not isinstance(lu, str):
                raise errors.ProtocolError(reason="unknown operation {!r}"
                                           .format(op))
            log.info("peer %s: %s %s", client[0], op, lu)
            return op, {"lu": lu}

        return control.dispatch(line, self.operations, unpack,
                                check=self.check)

    def _forward(self, op):
        """Peer operation op, carried out by the target over the local
        control socket."""
        # A peer rolls back to its image (LU@protected-LU), never to the
        # last consistent image of a replicated group (LU@consistent-LU),
        # which `lu rollback` prefers.
        pinned = {"image": "protected"} if op == "image_rollback" else {}

        def forward(lu):
            try:
                return control.call(self.control_path, op, lu=lu,
                                    reply_timeout=60.0, **pinned)
            except ValueError as e:
                raise errors.ProtocolError(
                    reason="invalid JSON: {}".format(e)) from e
            except OSError as e:
                raise errors.Error(reason="the target is not answering: {}"
                                   .format(e)) from e
        return forward

    def start(self):
        self._thread = threading.Thread(target=self.serve_forever,
                                        args=(control.STOP_POLL,),
                                        name="peer", daemon=True)
        self._thread.start()

    def stop(self):
        # shutdown() waits for a serve_forever loop: one never started
        # would hang it.
        if self._thread is not None:
            self.shutdown()
        self.server_close()


def call(peer, token, op, lu, timeout=10.0, tls=None):
    """Ask the manager at peer ("HOST:PORT") to op ("protect", ...) lu;
    tls: an ssl.SSLContext (channel.client_context) to connect with TLS."""
    host, _, port = peer.rpartition(":")
    auth = channel.ClientAuth(token, "peer")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            conn = channel.connect_tls(s, tls, host.strip("[]")) \
                if tls is not None else s
            try:
                lines = _Lines(conn)
                lines.write(auth.start())
                reply = lines.read_json()
                if "nonce" in reply:
                    lines.write(auth.answer(reply))
                    reply = lines.read_json()
                    if "proof" in reply:
                        auth.check(reply)
                        lines.write({"op": op, "lu": lu})
                        reply = lines.read_json()
            finally:
                if conn is not s:
                    conn.close()
    except channel.TLSRequired as e:
        raise PeerRefused(peer=peer, reason=str(e))
    except channel.AuthFailed as e:
        raise PeerRefused(peer=peer, reason=str(e))
    except (OSError, ValueError, errors.Error) as e:
        raise PeerError(peer=peer, reason="{} failed: {}".format(op, e))
    if not isinstance(reply, dict):
        raise PeerError(peer=peer, reason="{}: no valid reply".format(op))
    if reply.get("ok"):
        # Every peer operation answers with an object (a status).
        result = reply.get("result")
        if not isinstance(result, dict):
            raise PeerError(peer=peer, reason="{}: the reply's result {!r} "
                            "is not an object".format(op, result))
        return result
    err = reply.get("error") or {}
    if not isinstance(err, dict):
        raise PeerError(peer=peer, reason="{}: the reply's error {!r} is "
                        "not an object".format(op, err))
    if err.get("code") == "AccessDenied":
        message = err.get("message", "refused")
        if "invalid token" in message and auth.server_nonce is None:
            # A peer of protocol 1 finds no token in the first message.
            message += " (if the token is right, the peer runs a clonectl " \
                "older than peer protocol {}: upgrade it)".format(
                    channel.PROTOCOL)
        raise PeerRefused(peer=peer, reason=message)
    raise PeerError(peer=peer, reason=err.get("message", "unknown error"))
