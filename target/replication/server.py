"""The replication port of a secondary (serve --replication-port).

Owns accepting primaries: the hello read under a size limit and deadline
before the token is checked, the limits on connections, one session per
group at a time, and refusals sent back as a message.  See
docs/replication.md.
"""

import hmac
import json
import logging
import socket
import struct
import threading
import time

from .. import errors, limits
from .records import ReplicationError, RsgBusy
from .wire import recv_frame, send_json, shutdown_socket

log = logging.getLogger("clonectl.replication")

MAX_HELLO = 64 << 10           # the first frame, read before the token
MAX_UNAUTHENTICATED = 8        # connections without the token, at once
MAX_PRIMARIES = 64             # connections to the replication port
IDLE_TIMEOUT = 10.0            # a secondary drops a silent primary


class ReplicaServer:
    """The replication port of a secondary: one thread per primary
    connection; the hello is checked (token, group, volumes, roles) by
    the target's `accept(hello, peer)`, which returns the group to serve."""

    def __init__(self, bind, port, token, accept,
                 hello_timeout=limits.HELLO_TIMEOUT,
                 max_connections=MAX_PRIMARIES,
                 max_unauthenticated=MAX_UNAUTHENTICATED):
        self.token = token
        self.accept = accept
        # Before the token is checked a peer may send one hello of at most
        # MAX_HELLO bytes within hello_timeout, on one of at most
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
            kind, payload = recv_frame(
                conn, MAX_HELLO, time.monotonic() + self.hello_timeout)
            conn.settimeout(30)
            if kind != b"HELO":
                raise errors.ProtocolError(reason="expected a hello")
            hello = json.loads(payload)
            if not isinstance(hello, dict):
                raise errors.ProtocolError(reason="the hello is not an object")
            token = hello.get("token")
            if not isinstance(token, str) or not hmac.compare_digest(
                    token.encode(), self.token.encode()):
                raise ReplicationError(name=hello.get("group", "?"),
                                       reason="invalid token; nothing was "
                                              "done")
            authenticated = True
            self.gate.authenticated()
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
