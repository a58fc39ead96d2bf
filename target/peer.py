"""The manager-to-manager channel: protect a destination's consistent image.

Design notes
------------
Before a session sends out-of-order updates to a destination that is
another clonectl target, it asks that target to protect its last consistent
image of the LU, and to release it after the transfer succeeded.  A failed
or interrupted transfer leaves it protected; the admin there can roll the
LU back to it (`clonectl lu rollback`).

Protocol: TCP, one JSON object per line each way, one request per
connection (control.dispatch answers it, as on the control socket):

    request   {"token": "...", "op": "protect", "lu": "db1"}
    reply     {"ok": true, "result": {...}} or {"ok": false, "error": {...}}

Every request carries the shared token (a file given to both managers);
without the right token nothing is done and the reply says so.  The
manager's listener forwards an accepted request to its target over the
local control socket; the target protects an image with a copy-on-first-
write snapshot (an internal session marked with a frozen export,
`LU@protected-LU`), so protecting costs no copy.

Deliberately ignored: TLS on this channel (the token is sent in clear; use
it on a trusted network or a tunnel), several protected images per LU.
See docs/design.md.
"""

import errno
import hmac
import json
import logging
import socket
import socketserver
import threading
import time

from . import control, errors, limits

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


def _read_request(sock, deadline):
    """The request line (up to MAX_REQUEST + 1 bytes), read by deadline
    however slowly it arrives; socket.timeout after it."""
    buf = bytearray()
    while b"\n" not in buf and len(buf) <= MAX_REQUEST:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        sock.settimeout(left)
        data = sock.recv(MAX_REQUEST + 1 - len(buf))
        if not data:
            break
        buf += data
    end = buf.find(b"\n")
    return bytes(buf[:end + 1] if end >= 0 else buf)


class _Handler(socketserver.StreamRequestHandler):

    timeout = 30    # for the reply, once the request is read

    def handle(self):
        try:
            line = _read_request(self.connection, time.monotonic() +
                                 self.server.request_timeout)
        except socket.timeout:
            log.warning("peer connection from %s closed: no request within "
                        "%.0f s", self.client_address[0],
                        self.server.request_timeout)
            return
        except OSError:
            return      # the client went away
        self.connection.settimeout(self.timeout)
        reply = self.server.dispatch(line, self.client_address)
        try:
            self.wfile.write(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass        # the client does not read its reply


class PeerServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """One thread per connection, one request per connection.  A client
    has request_timeout seconds to send its request (MAX_REQUEST bytes at
    most); at most max_connections are served at once, and at most
    max_unauthenticated before their token is checked; others are closed
    at once (limits.Gate)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, bind, port, token, control_path, peer_operations,
                 check=None, request_timeout=limits.HELLO_TIMEOUT,
                 max_connections=MAX_CONNECTIONS,
                 max_unauthenticated=MAX_UNAUTHENTICATED):
        self.token = token
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

    def dispatch(self, line, client):
        if len(line) > MAX_REQUEST:
            return {"ok": False, "error": errors.ProtocolError(
                reason="request too large").to_dict()}

        def unpack(request):
            token = request.get("token")
            if not isinstance(token, str) or not hmac.compare_digest(
                    token.encode(), self.token.encode()):
                log.warning("peer request from %s refused: bad token",
                            client[0])
                raise AccessDenied(reason="invalid token; nothing was done")
            self._local.authenticated = True
            self.gate.authenticated()
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
        def forward(lu):
            try:
                return control.call(self.control_path, op, lu=lu,
                                    reply_timeout=60.0)
            except ValueError as e:
                raise errors.ProtocolError(
                    reason="invalid JSON: {}".format(e)) from e
            except OSError as e:
                raise errors.Error(reason="the target is not answering: {}"
                                   .format(e)) from e
        return forward

    def start(self):
        self._thread = threading.Thread(target=self.serve_forever,
                                        name="peer", daemon=True)
        self._thread.start()

    def stop(self):
        self.shutdown()
        self.server_close()


def call(peer, token, op, lu, timeout=10.0):
    """Ask the manager at peer ("HOST:PORT") to op ("protect", ...) lu."""
    host, _, port = peer.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            s.sendall(json.dumps({"token": token, "op": op, "lu": lu})
                      .encode() + b"\n")
            with s.makefile("rb") as f:
                line = f.readline(MAX_REQUEST)
    except (OSError, ValueError) as e:
        raise PeerError(peer=peer, reason="{} failed: {}".format(op, e))
    try:
        reply = json.loads(line)
    except ValueError:
        raise PeerError(peer=peer, reason="{}: no valid reply".format(op))
    if reply.get("ok"):
        return reply.get("result")
    err = reply.get("error") or {}
    cls = PeerRefused if err.get("code") == "AccessDenied" else PeerError
    raise cls(peer=peer, reason=err.get("message", "unknown error"))
