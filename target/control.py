"""The local control socket between the manager and the running target.

Protocol: one JSON object per line each way over a Unix stream socket.

    request   {"op": "status", "args": {...}}
    reply     {"ok": true, "result": ...}
              {"ok": false, "error": {"code": "UnknownLU", "message": "...",
                                      "errno": 2}}

The socket file is created with mode 0600 inside the 0700 run directory, so
only its owner can use it.  Requests larger than MAX_REQUEST bytes, invalid
JSON, unknown operations and bad arguments are answered with an error; the
server never dies from a request.  A connection may carry several
requests; one that stays silent for IDLE_TIMEOUT seconds is closed, and at
most MAX_CONNECTIONS are served at once (a thread each): a further one gets
a TooManyConnections error and is closed.
"""

import errno
import json
import logging
import os
import socket
import socketserver
import threading

from . import errors, fsutil

log = logging.getLogger("clonectl.control")

MAX_REQUEST = 1 << 20
MAX_CONNECTIONS = 64
IDLE_TIMEOUT = 30.0


class TooManyConnections(errors.Error):
    msg = "the control socket serves {count} connections, the most allowed"
    errno = errno.EAGAIN

class _Handler(socketserver.StreamRequestHandler):

    def setup(self):
        self.timeout = self.server.idle_timeout
        super().setup()

    def handle(self):
        while True:
            try:
                line = self.rfile.readline(MAX_REQUEST + 1)
            except (socket.timeout, ConnectionResetError):
                return      # idle (or gone): the thread is not kept
            if not line:
                return
            if len(line) > MAX_REQUEST:
                self._send({"ok": False, "error": errors.ProtocolError(
                    reason="request larger than {} bytes".format(MAX_REQUEST))
                    .to_dict()})
                return
            self._send(self.server.dispatch(line))

    def _send(self, reply):
        try:
            self.wfile.write(json.dumps(reply).encode() + b"\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass    # the client gave up waiting; the operation is done


# socketserver's loop sees a shutdown() only between two polls (0.5 s
# apart by default), and a stop of the target waits for it here and in
# the peer and metrics servers.  A poll every 50 ms costs nothing
# measurable.
STOP_POLL = 0.05


class ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, path, operations, check=None,
                 max_connections=MAX_CONNECTIONS, idle_timeout=IDLE_TIMEOUT):
        """operations maps an op name to a callable taking keyword args;
        check is dispatch()'s."""
        self.operations = operations
        self.check = check
        self.path = path
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self._count_lock = threading.Lock()
        self._connections = 0
        if fsutil.is_socket(path):
            os.unlink(path)  # stale: the manager checked nothing answers
        old = os.umask(0o177)
        try:
            super().__init__(path, _Handler)
        finally:
            os.umask(old)
        self._thread = None

    def verify_request(self, request, client_address):
        with self._count_lock:
            if self._connections < self.max_connections:
                self._connections += 1
                return True
            count = self._connections
        log.warning("control socket: connection refused, %d connections",
                    count)
        try:
            request.setblocking(False)
            request.send(json.dumps({"ok": False, "error": TooManyConnections(
                count=count).to_dict()}).encode() + b"\n")
        except OSError:
            pass
        return False

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._count_lock:
                self._connections -= 1

    def dispatch(self, line):
        return dispatch(line, self.operations, check=self.check)

    def start(self):
        self._thread = threading.Thread(target=self.serve_forever,
                                        args=(STOP_POLL,),
                                        name="control", daemon=True)
        self._thread.start()
        log.info("control socket %s: accepting requests", self.path)

    def stop(self):
        # shutdown() waits for a serve_forever loop: one never started
        # would hang it.
        if self._thread is not None:
            self.shutdown()
        self.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def envelope(request):
    """(op, args) of a control request {"op": ..., "args": {...}}."""
    args = request.get("args", {})
    if not isinstance(args, dict):
        raise errors.ProtocolError(reason="'args' is not an object")
    return request.get("op"), args


def dispatch(line, operations, unpack=envelope, check=None):
    """The reply (an object) to one JSON request line: the JSON-line
    dispatcher of the control socket and of the peer channel (peer.py).

    operations maps an op name to a callable taking keyword args;
    unpack(request) gives (op, args) of the request object, raising
    errors.Error to refuse it; check(op, func, args), when given, refuses
    arguments before the call (the operations table's argument schema).
    Whatever happens, a reply is returned."""
    try:
        try:
            request = json.loads(line)
        except ValueError as e:
            raise errors.ProtocolError(
                reason="invalid JSON: {}".format(e)) from e
        if not isinstance(request, dict):
            raise errors.ProtocolError(reason="request is not an object")
        op, args = unpack(request)
        func = operations.get(op) if isinstance(op, str) else None
        if func is None:
            raise errors.ProtocolError(
                reason="unknown operation {!r}".format(op))
        if check is not None:
            check(op, func, args)
        try:
            result = func(**args)
        except TypeError as e:
            raise errors.InvalidArgument(
                reason="bad arguments for {}: {}".format(op, e))
        return {"ok": True, "result": result}
    except errors.Error as e:
        return {"ok": False, "error": e.to_dict()}
    except OSError as e:
        # In words, with the file: "No space left on device" and where.
        where = ": {!r}".format(e.filename) if e.filename else ""
        return {"ok": False, "error": errors.ControlError(
            "OSError", "{}{}".format(e.strerror or e, where),
            e.errno or errno.EIO).to_dict()}
    except Exception as e:  # keep serving whatever happens
        log.exception("control operation failed")
        return {"ok": False, "error": errors.Error(
            reason="internal error: {!r}".format(e)).to_dict()}


def call(path, op, reply_timeout=30.0, **args):
    """Send one request; return its result or raise the reported error.

    reply_timeout is how long to wait for the answer (not named `timeout`:
    that is an argument some operations take themselves).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        # Connect before setting a timeout: a Unix socket connect with a
        # timeout fails with EAGAIN at once when the backlog is full.
        s.connect(path)
        s.settimeout(reply_timeout)
        sent = False
        try:
            s.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
            sent = True
        except BrokenPipeError:
            pass    # refused at once (TooManyConnections): read why
        try:
            with s.makefile("rb") as f:
                line = f.readline()
        except ConnectionResetError as e:
            if sent:
                raise errors.ReplyLost(op=op, reason=str(e)) from e
            raise
    if not line:
        if sent:
            raise errors.ReplyLost(
                op=op, reason="the target closed the connection")
        raise errors.ProtocolError(reason="the target closed the connection")
    reply = json.loads(line)
    if reply.get("ok"):
        return reply.get("result")
    err = reply.get("error") or {}
    raise errors.ControlError(code=err.get("code", "ControlError"),
                              message=err.get("message", "unknown error"),
                              errno=err.get("errno", 5))


def try_call(path, op, reply_timeout=5.0, **args):
    """Like call(), but return None when no target listens on path."""
    try:
        return call(path, op, reply_timeout=reply_timeout, **args)
    except (FileNotFoundError, ConnectionRefusedError, socket.timeout):
        return None
