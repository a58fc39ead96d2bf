"""A remote NBD export as a destination (the interface: __init__).

Design notes
------------
Written with libnbd's asynchronous API: up to IN_FLIGHT commands in flight,
spread over several connections when the server offers multi-conn (a flush
on one connection then covers the writes completed on all of them).  A
destination that stops answering for `timeout` seconds fails the call.
Deliberately ignored: TLS, reconnecting.  See docs/design.md.
"""

import errno
import select
import time

from . import DestinationError

DEFAULT_TIMEOUT = 30.0
IN_FLIGHT = 64          # per destination, spread over its connections


def _nbd_reason(e):
    """The text of a libnbd error, with the errno's symbolic name added.

    libnbd's message ends in strerror() ("... command failed: No space left
    on device"); a destination that fails with ENOSPC wants a different fix
    (grow it) from one failing with EIO (a broken disk), so the status and
    the CLI name the errno as the server sent it ("(ENOSPC)") too, in a form
    scripts can match whatever the locale.  (The Python binding's e.errno
    is that name, a string; older ones may give a number.)
    """
    text = str(e.string if getattr(e, "string", None) else e)
    code = getattr(e, "errno", None)
    name = errno.errorcode.get(code) if isinstance(code, int) else code
    if name and name not in text:
        text += " ({})".format(name)
    return text


class _NbdConnection:
    """One libnbd handle and the commands it has in flight."""

    def __init__(self, nbd, uri, timeout, error):
        self.nbd = nbd
        self.uri = uri
        self.timeout = timeout
        self.error = error
        self.h = nbd.NBD()
        self.buffers = {}     # cookie -> buffer of a write in flight
        self.others = set()   # cookies of zeroes and flushes in flight
        h = self.h
        try:
            h.aio_connect_uri(uri)
            deadline = time.monotonic() + timeout
            while h.aio_is_connecting():
                if time.monotonic() > deadline:
                    raise error("no answer within {:g} s".format(timeout))
                h.poll(500)
            if not h.aio_is_ready():
                raise error("the connection failed")
        except nbd.Error as e:
            raise error(_nbd_reason(e))

    def in_flight(self):
        return len(self.buffers) + len(self.others)

    def retire(self):
        """Retire completed commands; raise if one failed."""
        h = self.h
        try:
            while self.in_flight():
                try:
                    cookie = h.aio_peek_command_completed()
                except self.nbd.Error:
                    break   # nothing in flight at all
                if not cookie:
                    break
                self.buffers.pop(cookie, None)
                self.others.discard(cookie)
                h.aio_command_completed(cookie)
            if h.aio_is_dead():
                raise self.error("the connection died")
        except self.nbd.Error as e:
            raise self.error(_nbd_reason(e))

    def submit(self, start, *args):
        try:
            return start(*args)
        except self.nbd.Error as e:
            raise self.error(_nbd_reason(e))

    def close(self):
        """Disconnect without waiting on a destination that may be gone:
        a graceful shutdown waits for the replies to commands in flight,
        which never come over a cut link."""
        if self.h is None:
            return
        h, self.h = self.h, None
        try:
            if not self.in_flight() and h.aio_is_ready():
                h.aio_disconnect(0)
                deadline = time.monotonic() + 2.0
                while not (h.aio_is_closed() or h.aio_is_dead()) and \
                        time.monotonic() < deadline:
                    h.poll(200)
        except self.nbd.Error:
            pass  # closing a dead connection
        self.buffers.clear()
        self.others.clear()
        # libnbd closes the socket when the handle is collected.


class NbdDestination:
    """A remote NBD export, written with libnbd's asynchronous API.

    When the server offers multi-conn (a flush on one connection covers
    writes completed on all of them), writes are spread over CONNECTIONS
    connections: a server that serializes each connection's requests (an
    nbdkit Python plugin, clonectl itself) then works on several at once.
    """

    CONNECTIONS = 4

    def __init__(self, uri, timeout=DEFAULT_TIMEOUT, in_flight=IN_FLIGHT):
        import nbd
        self.nbd = nbd
        self.uri = uri
        self.timeout = timeout
        first = _NbdConnection(nbd, uri, timeout, self._error)
        self.conns = [first]
        self.next = 0
        try:
            h = first.h
            self.size = h.get_size()
            if h.is_read_only():
                raise self._error("the export is read-only")
            if not h.can_flush():
                raise self._error("the export cannot flush, so nothing "
                                  "written to it could be trusted")
            self.multi_conn = bool(h.can_multi_conn())
            if self.multi_conn:
                for _ in range(self.CONNECTIONS - 1):
                    self.conns.append(_NbdConnection(nbd, uri, timeout,
                                                     self._error))
        except self.nbd.Error as e:
            self.close()
            raise self._error(_nbd_reason(e))
        except BaseException:
            self.close()
            raise
        self.limit = max(2, in_flight // len(self.conns))

    def _error(self, reason):
        return DestinationError(uri=self.uri, reason=reason)

    def _wait(self, conns, until_below):
        """Drive every connection's state machine (libnbd sends queued
        data and reads replies only when its handle is polled, so all are
        polled together) until each of conns has fewer than until_below
        commands in flight."""
        deadline = time.monotonic() + self.timeout
        poller = select.poll()
        while True:
            for c in self.conns:
                c.retire()
            if all(c.in_flight() < until_below for c in conns):
                return
            fds = {}
            try:
                for c in self.conns:
                    fd = c.h.aio_get_fd()
                    want = c.h.aio_get_direction()
                    events = (select.POLLIN if want & 1 else 0) | \
                        (select.POLLOUT if want & 2 else 0)
                    if events:
                        fds[fd] = c
                        poller.register(fd, events)
                ready = poller.poll(500) if fds else []
                for fd, ev in ready:
                    c = fds[fd]
                    if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                        c.h.aio_notify_read()
                    if ev & select.POLLOUT:
                        c.h.aio_notify_write()
            except self.nbd.Error as e:
                raise self._error(_nbd_reason(e))
            finally:
                for fd in fds:
                    poller.unregister(fd)
            if ready:
                deadline = time.monotonic() + self.timeout
            elif time.monotonic() > deadline:
                raise self._error("no reply within {:g} s".format(
                    self.timeout))

    def _pick(self):
        conn = self.conns[self.next]
        self.next = (self.next + 1) % len(self.conns)
        self._wait([conn], self.limit)
        return conn

    def write(self, buf, offset):
        conn = self._pick()
        # Shared, not copied: the engine never reuses a chunk's buffer, and
        # the Buffer keeps it alive until the write completes.
        b = self.nbd.Buffer.from_buffer(buf)
        conn.buffers[conn.submit(conn.h.aio_pwrite, b, offset)] = b

    def zero(self, offset, length):
        conn = self._pick()
        conn.others.add(conn.submit(conn.h.aio_zero, length, offset))

    def flush(self):
        """Every write completed, then flushed (on one connection when
        multi-conn makes that cover all of them)."""
        self._wait(self.conns, 1)
        flushing = self.conns[:1] if self.multi_conn else self.conns
        for conn in flushing:
            conn.others.add(conn.submit(conn.h.aio_flush))
        self._wait(flushing, 1)

    def close(self):
        for conn in self.conns:
            conn.close()
