"""The replication port of a secondary (serve --replication-port).

Owns accepting primaries: TLS when the port has certificates, the proof of
the token (target/channel.py: challenge-response, the token never crosses
the wire) read under a size limit and deadline, the limits on connections,
one session per group at a time, and refusals sent back as a message.

A connection, after TLS: AUTH (the primary's nonce), CHAL (the
secondary's), PROF (the primary's proof), PROF (the secondary's proof,
only if the primary's was right), then the hello (HELO, HRPL) and the
session.  A primary of protocol 1 (the token in its HELO) is refused with
a message.  See docs/replication.md.
"""

import json
import logging
import socket
import struct
import threading
import time

from .. import channel, errors, limits
from .records import ReplicationError, RsgBusy
from .wire import recv_frame, send_json, shutdown_socket

log = logging.getLogger("clonectl.replication")

MAX_HELLO = 64 << 10           # a frame read before the token is proven
MAX_UNAUTHENTICATED = 8        # connections without the token, at once
MAX_PRIMARIES = 64             # connections to the replication port
IDLE_TIMEOUT = 10.0            # a secondary drops a silent primary


class ReplicaServer:
    """The replication port of a secondary: one thread per primary
    connection; the hello is checked (token, group, volumes, roles) by
    the target's `accept(hello, peer)`, which returns the group to serve."""

    def __init__(self, bind, port, token, accept, tls=None,
                 hello_timeout=limits.HELLO_TIMEOUT,
                 max_connections=MAX_PRIMARIES,
                 max_unauthenticated=MAX_UNAUTHENTICATED):
        self.token = token
        self.accept = accept
        # An ssl.SSLContext (channel.server_context): then every primary
        # must speak TLS; a plain one is refused in clear and closed.
        self.tls = tls
        # Before the token is proven a peer may do the TLS handshake and
        # send two frames of at most MAX_HELLO bytes within hello_timeout,
        # on one of at most
        # max_unauthenticated connections: what a peer without the token
        # can make this process hold is small and brief.
        self.hello_timeout = hello_timeout
        self.gate = limits.Gate("replication port", max_connections,
                                max_unauthenticated)
        self.sock = socket.socket(socket.AF_INET6 if ":" in bind
                                  else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((bind, port))
        self.sock.listen(16)
        self.thread = None
        self.connections = []       # threads serving primaries
        self.stopping = False

    def start(self):
        self.thread = threading.Thread(target=self._accept_loop,
                                       name="replica-server", daemon=True)
        self.thread.start()

    def _accept_loop(self):
        while not self.stopping:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                if self.stopping:
                    return
                time.sleep(0.1)
                continue
            if self.stopping:
                conn.close()
                return
            if not self.gate.enter(addr[0]):
                conn.close()
                continue
            th = threading.Thread(target=self._serve, args=(conn, addr),
                                  daemon=True, name="replica-conn")
            self.connections = [t for t in self.connections
                                if t.is_alive()] + [th]
            th.start()

    def _serve(self, conn, addr):
        peer = "{}:{}".format(addr[0], addr[1])
        group = None
        authenticated = False
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            deadline = time.monotonic() + self.hello_timeout
            if self.tls is not None:
                conn = self._accept_tls(conn, deadline)
            self._authenticate(conn, deadline)
            authenticated = True
            self.gate.authenticated()
            conn.settimeout(30)
            kind, payload = recv_frame(conn, MAX_HELLO)
            if kind != b"HELO":
                raise errors.ProtocolError(reason="expected a hello")
            hello = json.loads(payload)
            if not isinstance(hello, dict):
                raise errors.ProtocolError(reason="the hello is not an object")
            group = self.accept(hello, addr[0])
            with group.session_lock:
                if group.closed:
                    # The target is closing: no answer that the primary
                    # could take for a refusal; it connects again later.
                    group = None
                    return
                busy = group.refuse_primary()
                if busy:
                    busy_group, group = group, None
                    raise RsgBusy(name=busy_group.name, reason=busy)
                old, old_thread = group.connection, group.serving
                if old is not None:
                    # A primary that reconnects (after a crash or a cut)
                    # takes over from its dead connection.
                    shutdown_socket(old)
                group.connection = conn
                group.serving = threading.current_thread()
            # One session at a time: the old one may still be applying a
            # batch or ending a replay; the handshake must see its result,
            # and two sessions must never write the volumes side by side.
            if old_thread is not None:
                old_thread.join(60)
                if old_thread.is_alive():
                    raise ReplicationError(
                        name=group.name, reason="the previous session with "
                        "a primary has not ended within 60 s; try again")
            send_json(conn, b"HRPL", group.handshake(hello))
            # A primary that goes silent (a cut link) is dropped, so the
            # secondary can be promoted; idle primaries send heartbeats.
            conn.settimeout(IDLE_TIMEOUT)
            group.serve(conn, hello, addr[0])
        except errors.Error as e:
            if not authenticated:
                log.warning("replication hello from %s refused: %s",
                            addr[0], e)
            try:
                send_json(conn, b"HRPL", {"ok": False, "message": str(e)})
            except OSError:
                pass
        except socket.timeout as e:
            if authenticated:
                log.info("replication connection from %s ended: %s", peer, e)
            else:
                log.warning("replication connection from %s closed: no "
                            "hello within %.0f s", addr[0],
                            self.hello_timeout)
        except (OSError, ConnectionError, ValueError, struct.error) as e:
            if authenticated:
                log.info("replication connection from %s ended: %s", peer, e)
            else:
                log.warning("replication connection from %s closed before "
                            "its hello was read: %s", addr[0], e)
        finally:
            self.gate.leave(authenticated)
            if group is not None:
                with group.session_lock:
                    if group.connection is conn:
                        group.connection = None
                        group.serving = None
            try:
                conn.close()
            except OSError:
                pass

    def _accept_tls(self, conn, deadline):
        """The TLS connection; a plain primary is told in clear."""
        try:
            return channel.accept_tls(conn, self.tls, deadline)
        except channel.TLSRequired as e:
            raise channel.TLSRequired(
                reason="{} (rsg link --tls-certificates DIR)".format(e))

    def _authenticate(self, conn, deadline):
        """The primary proves it holds the token, then this side does
        (channel.ServerAuth); AuthFailed if it does not."""
        auth = channel.ServerAuth(self.token, "replication")
        kind, payload = recv_frame(conn, MAX_HELLO, deadline)
        if kind == b"HELO":
            # Protocol 1 sent the token in its hello: refuse, say why.
            start = json.loads(payload)
        elif kind != b"AUTH":
            raise errors.ProtocolError(reason="expected an authentication "
                                       "request")
        else:
            start = json.loads(payload)
        send_json(conn, b"CHAL", auth.challenge(start))
        kind, payload = recv_frame(conn, MAX_HELLO, deadline)
        if kind != b"PROF":
            raise errors.ProtocolError(reason="expected a proof")
        send_json(conn, b"PROF", auth.check(json.loads(payload)))

    def stop(self):
        self.stopping = True
        # close() alone does not wake a thread blocked in accept().
        shutdown_socket(self.sock)
        try:
            self.sock.close()
        except OSError:
            pass
        if self.thread is not None:
            self.thread.join(5)

    def join(self, timeout=10):
        """Wait for the threads serving primaries (once their groups have
        shut their connections down): they change the target's sessions
        (protected images) and must be done before it closes."""
        for th in self.connections:
            th.join(timeout)
