"""A remote NBD export as a destination (the interface: __init__).

Design notes
------------
Written with libnbd's asynchronous API: up to IN_FLIGHT commands in flight,
spread over several connections when the server offers multi-conn (a flush
on one connection then covers the writes completed on all of them).  The
caller drives the handles (pump() in __init__): libnbd sends queued data
and reads replies only when told the socket is ready.  A destination that
has commands in flight and answers nothing for `timeout` seconds fails
them all, and every later request.  Deliberately ignored: TLS,
reconnecting.  See docs/design.md.
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
        # cookie -> (done, the Buffer of a write, kept until it completes)
        self.commands = {}
        self.abandoned = []
        self.completed = []
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
        return len(self.commands)

    def retire(self):
        """[(done, error)] of the commands that completed; raises the
        connection's failure once it is dead."""
        out = []
        h = self.h
        try:
            while self.commands:
                cookie = h.aio_peek_command_completed()
                if not cookie:
                    break
                done, _ = self.commands.pop(cookie)
                try:
                    h.aio_command_completed(cookie)
                    out.append((done, None))
                except self.nbd.Error as e:
                    out.append((done, self.error(_nbd_reason(e))))
            if self.commands and h.aio_is_dead():
                raise self.error("the connection died")
        except self.nbd.Error as e:
            raise self.error(_nbd_reason(e))
        finally:
            self.completed = out
        return out

    def submit(self, done, buf, start, *args):
        try:
            cookie = start(*args)
        except self.nbd.Error as e:
            raise self.error(_nbd_reason(e))
        self.commands[cookie] = (done, buf)

    def close(self):
        """Disconnect without waiting on a destination that may be gone:
        a graceful shutdown waits for the replies to commands in flight,
        which never come over a cut link."""
        if self.h is None:
            return
        h, self.h = self.h, None
        try:
            if not self.commands and h.aio_is_ready():
                h.aio_disconnect(0)
                deadline = time.monotonic() + 2.0
                while not (h.aio_is_closed() or h.aio_is_dead()) and \
                        time.monotonic() < deadline:
                    h.poll(200)
        except self.nbd.Error:
            pass  # closing a dead connection
        # libnbd closes the socket when the handle is collected.
        del h
        self.commands.clear()
        self.abandoned.clear()


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
        self.failure = None     # the DestinationError that ended it
        self.failed = []        # done of commands failed, not called yet
        self.last_progress = self.last_retire = time.monotonic()
        first = _NbdConnection(nbd, uri, timeout, self._error)
        self.conns = [first]
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
        self.by_fd = {c.h.aio_get_fd(): c for c in self.conns}

    def _error(self, reason):
        return DestinationError(uri=self.uri, reason=reason)

    def _in_flight(self):
        return sum(c.in_flight() for c in self.conns)

    def _conn(self):
        """The connection with the fewest commands in flight."""
        if self.failure is not None:
            raise self.failure
        conn = min(self.conns, key=_NbdConnection.in_flight)
        if not self._in_flight():
            # The timeout counts from the first command in flight.
            self.last_progress = time.monotonic()
        return conn

    def busy(self):
        return self.failure is None and \
            all(c.in_flight() >= self.limit for c in self.conns)

    def write(self, buf, offset, done):
        conn = self._conn()
        # Shared, not copied: the caller keeps buf unchanged until done.
        b = self.nbd.Buffer.from_buffer(buf)
        conn.submit(done, b, conn.h.aio_pwrite, b, offset)

    def zero(self, offset, length, done):
        conn = self._conn()
        conn.submit(done, None, conn.h.aio_zero, length, offset)

    def flush(self, done):
        """One flush covers the writes completed on every connection
        (multi-conn), or there is only one connection."""
        conn = self._conn()
        conn.submit(done, None, conn.h.aio_flush)

    def fds(self):
        if self.failure is not None:
            return []
        out = []
        for fd, c in self.by_fd.items():
            want = c.h.aio_get_direction()
            events = (select.POLLIN if want & 1 else 0) | \
                (select.POLLOUT if want & 2 else 0)
            if events:
                out.append((fd, events))
        return out

    def notify(self, fd, events):
        c = self.by_fd[fd]
        self.last_progress = time.monotonic()
        try:
            if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                c.h.aio_notify_read()
            if events & select.POLLOUT:
                c.h.aio_notify_write()
        except self.nbd.Error as e:
            self._fail(self._error(_nbd_reason(e)))

    def retire(self):
        """Call done of every completed command; once the connection died
        or answered nothing for `timeout` seconds, fail every command."""
        completed = []
        now = time.monotonic()
        if now - self.last_retire > 1.0:
            # The caller was busy elsewhere (reading its source, saving a
            # map): time nobody polled does not count against the server.
            self.last_progress += now - self.last_retire
        self.last_retire = now
        if self.failure is None:
            try:
                for c in self.conns:
                    completed += c.retire()
            except DestinationError as e:
                completed += c.completed
                self._fail(e)
            if self.failure is None and self._in_flight() and \
                    now - self.last_progress > self.timeout:
                self._fail(self._error("no reply within {:g} s".format(
                    self.timeout)))
        if completed:
            self.last_progress = time.monotonic()
        for done, err in completed:
            done(err)
        failed, self.failed = self.failed, []
        for done in failed:
            done(self.failure)

    def _fail(self, error):
        """Fail every command in flight, now and later, with error."""
        if self.failure is None:
            self.failure = error
        for c in self.conns:
            self.failed += [done for done, _ in c.commands.values()]
            # libnbd may still send the buffers: they stay referenced
            # until the handle is closed.
            c.abandoned += [b for _, b in c.commands.values()]
            c.commands.clear()

    def close(self):
        for conn in self.conns:
            conn.close()
