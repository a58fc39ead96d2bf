"""Frames on a replication connection and the checksum of an entry.

Every message is a frame: a 4-byte kind and a length, then the payload.
A frame announcing more than the reader's limit is refused before anything
is allocated for it (a peer that has not shown the token gets a small
limit and a deadline).  An entry's checksum covers its header and its data,
so a secondary refuses an update damaged anywhere.

Kinds: AUTH, CHAL, PROF (the proof of the token both ways before
anything else, JSON: target/channel.py), HELO/HRPL (the primary's hello
and the secondary's reply, JSON; HRPL also carries a refusal),
ENTR (one SRL entry), CMIT (end of a batch), ACKS (a batch, and every one
before it, is durable on the secondary), CAPL/APLD (end of a sync link's
batch, acknowledged once applied, not durable), BEAT (an idle primary is
alive), RBEG/RBOK, RDAT, RSYN/RSAK,
REND/RACK (a DCM replay: begin, data of a run, the data so far is durable
on the secondary, end), PULL/RDAT.../PEND (the primary
takes a secondary's changes after a split brain), VREQ/VANS (an online
verify: a region's extent checksums asked after the updates before it,
and the answer, JSON: target/replication/verify.py), FAIL (the secondary
refuses the updates, with a message).  What they are for: the design notes in
target/replication/__init__.py.
"""

import json
import socket
import struct
import time
import zlib

from .. import errors

MAX_FRAME = 64 << 20

# Entry kinds.
WRITE, ZERO, TRIM = 0, 1, 2
KINDS = (WRITE, ZERO, TRIM)     # a change of another kind is refused

FRAME = struct.Struct("<4sI")
ENTRY = struct.Struct("<QIBQII")      # seq vol kind offset length crc
DATA = struct.Struct("<IBQII")        # vol kind offset length crc
SEQ = struct.Struct("<Q")


def send_frame(sock, kind, payload=b""):
    sock.sendall(FRAME.pack(kind, len(payload)) + payload)


def send_frames(sock, parts):
    """parts: list of (kind, header bytes, data or None); one sendmsg."""
    bufs = []
    for kind, head, data in parts:
        n = len(head) + (len(data) if data is not None else 0)
        bufs.append(FRAME.pack(kind, n))
        bufs.append(head)
        if data is not None:
            bufs.append(data)
    sock.sendall(b"".join(bufs))


class Reader:
    """The receiving side of a connection, buffered: the frames that
    arrived together (a batch goes in one send) are taken with one recv,
    not two per frame.  Reads of at least CHUNK bytes go straight into
    the caller's buffer.  Use it in place of the socket with recv_frame;
    send on the socket."""

    CHUNK = 256 << 10

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray(self.CHUNK)
        self.lo = self.hi = 0

    def recv_into(self, view):
        if self.lo == self.hi:
            if len(view) >= self.CHUNK:
                return self.sock.recv_into(view)
            self.lo, self.hi = 0, self.sock.recv_into(self.buf)
        n = min(len(view), self.hi - self.lo)
        view[:n] = self.buf[self.lo:self.lo + n]
        self.lo += n
        return n

    def pending(self):
        """Bytes received and not read yet (here or, for TLS, in the
        socket's own buffer)."""
        if self.hi > self.lo:
            return True
        pending = getattr(self.sock, "pending", None)
        return bool(pending is not None and pending())

    def fileno(self):
        return self.sock.fileno()

    def settimeout(self, timeout):
        self.sock.settimeout(timeout)


def _recv_exact(sock, n, deadline=None):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:
            # A peer sending a byte at a time does not extend the deadline.
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out")
            sock.settimeout(left)
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("connection closed")
        got += k
    return buf


def recv_frame(sock, limit=MAX_FRAME, deadline=None):
    """(kind, payload) of the next frame; a frame announcing more than
    limit bytes is refused before anything is allocated for it."""
    kind, n = FRAME.unpack(_recv_exact(sock, FRAME.size, deadline))
    if n > limit:
        raise errors.ProtocolError(reason="{} frame of {} bytes (at most {})"
                                   .format(kind.decode(errors="replace"), n,
                                           limit))
    return kind, _recv_exact(sock, n, deadline) if n else bytearray()


def send_json(sock, kind, obj):
    send_frame(sock, kind, json.dumps(obj).encode())


def shutdown_socket(sock):
    """Wake every thread blocked on sock (recv, send, accept); a socket
    that is already down is fine."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def entry_crc(seq, vol, kind, offset, length, data):
    head = struct.pack("<QIBQI", seq, vol, kind, offset, length)
    return zlib.crc32(data, zlib.crc32(head)) if data is not None \
        else zlib.crc32(head)
