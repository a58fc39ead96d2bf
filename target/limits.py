"""Bounds on what clients can make a server hold: connections, threads,
descriptors, memory before authentication, and log lines.

Every listener of clonectl takes connections from the network, so each one
caps what a client that never completes its protocol can cost:

- NBD (nbdkit, the plugin's preconnect): at most `max_connections` at once,
  and `max_per_address` from one client address (loopback and Unix socket
  clients count only against the total: they are this host, among them
  the iSCSI gateway's nbdfuse mounts, four connections per export).  The
  default total comes from RLIMIT_NOFILE less a reserve for the engines
  (LU, map, SRL and clone files are opened while serving; a map commit
  that cannot open its file fails a flush), so idle clients cannot run
  nbdkit out of descriptors.  A burst of connections can, for a moment:
  nbdkit accepts them at C speed and the plugin refuses them one at a time
  under the GIL; nbdkit then logs `accept: Too many open files` in a loop
  until the refusals catch up, which the log limit below keeps short.
- The replication port (inside nbdkit) and the peer port (in the manager):
  a connection that has not proven the token may do a TLS handshake and
  send only small messages, within HELLO_TIMEOUT, and only a few such
  connections exist at
  once; connections beyond a cap are closed at once, with a log line.
- The control socket: a cap on handler threads and an idle timeout.
- Logs: repeated lines are suppressed beyond a burst per interval and the
  count reported later (RepeatFilter for our Python logging, the manager's
  copy of nbdkit's stderr for everything nbdkit and the plugin print).

Why not nbdkit's limit filter (nbdkit-limit-filter, shipped with Debian 12's
nbdkit 1.32): it checks in preconnect but counts a connection only from
open to close, so a client that connects and never completes the NBD
handshake is not counted at all (nbdkit 1.32 has no handshake timeout):
600 such clients still take 600 descriptors.  Counting from preconnect
needs an end-of-connection event, which plugins do not get for a
connection that never opened an export; nbdkit runs each connection,
handshake included, in one thread that ends with the connection, so the
limiter counts live connection threads (their ids in /proc/self/task).
"""

import errno
import ipaddress
import logging
import os
import re
import resource
import threading
import time

from . import errors

log = logging.getLogger("clonectl.limits")

HELLO_TIMEOUT = 10.0       # an unauthenticated peer's first message
# Descriptors kept for the engines: at least this many, or a quarter.
FD_RESERVE = 128
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_PER_ADDRESS = 64


class TooManyConnections(errors.Error):
    msg = "connection from {client} refused: {reason}"
    errno = errno.EAGAIN


# ---------------------------------------------------------------- descriptors

def raise_nofile_limit():
    """Raise RLIMIT_NOFILE's soft limit to the hard limit (children such as
    nbdkit inherit it); return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def connection_room(nofile, fds_per_connection=1):
    """How many NBD connections a descriptor limit of nofile has room for
    after the engines' reserve, each connection taking fds_per_connection
    (its socket; nbdkit's parallel thread model adds a pipe)."""
    if nofile == resource.RLIM_INFINITY:
        return None
    reserve = max(FD_RESERVE, nofile // 4)
    return max(1, (nofile - reserve) // fds_per_connection)


def default_max_connections(nofile, fds_per_connection=1):
    """The NBD connection cap by default: the room, at most
    DEFAULT_MAX_CONNECTIONS."""
    room = connection_room(nofile, fds_per_connection)
    return DEFAULT_MAX_CONNECTIONS if room is None else \
        min(DEFAULT_MAX_CONNECTIONS, room)


# ---------------------------------------------------------------- NBD

def _normalize(address):
    """An IPv4-mapped IPv6 address (a dual-stack bind) as the IPv4 one."""
    if isinstance(address, ipaddress.IPv6Address) and \
            address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_local(address):
    """A Unix socket client (None) or a loopback address."""
    return address is None or address.is_loopback


class ConnectionLimiter:
    """Caps on live NBD connections, checked in the plugin's preconnect.

    A connection is the nbdkit thread that called preconnect: it lives
    from accept to disconnect, handshake included.  Threads that ended are
    pruned at each admission (their ids are gone from /proc/self/task,
    looked up one by one where the directory's listing lacks them; a
    thread id is reused only after the kernel wrapped around its pid
    space, and a reused id only over-counts until that thread ends)."""

    TASKS = "/proc/self/task"

    def __init__(self, max_connections, max_per_address):
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.lock = threading.Lock()
        self.live = {}      # native thread id -> address (None: local)

    def _prune(self):
        try:
            listed = set(int(t) for t in os.listdir(self.TASKS))
        except OSError:
            return
        for tid in [t for t in self.live if t not in listed]:
            # The listing can skip live threads while others exit during
            # it (a burst of refused connections); a lookup by id cannot.
            try:
                os.stat(os.path.join(self.TASKS, str(tid)))
            except FileNotFoundError:
                del self.live[tid]
            except OSError:
                pass        # cannot tell: counted until it can

    def admit(self, address):
        """Count the calling thread's connection from address (an ipaddress
        address, or None for a Unix socket); raise TooManyConnections if a
        limit is reached."""
        tid = threading.get_native_id()
        address = _normalize(address)
        client = str(address) if address is not None else "a Unix socket"
        with self.lock:
            self.live.pop(tid, None)
            self._prune()
            if self.max_connections and \
                    len(self.live) >= self.max_connections:
                raise TooManyConnections(
                    client=client, reason="{} connections, the most "
                    "allowed (--max-connections)".format(len(self.live)))
            if self.max_per_address and not _is_local(address):
                n = sum(1 for a in self.live.values() if a == address)
                if n >= self.max_per_address:
                    raise TooManyConnections(
                        client=client, reason="{} connections from this "
                        "address, the most allowed "
                        "(--max-connections-per-address)".format(n))
            self.live[tid] = address

    def count(self):
        with self.lock:
            self._prune()
            return len(self.live)


# ---------------------------------------------------------------- listeners

class Gate:
    """Admission to a listener of ours: at most `total` connections at
    once, of which at most `unauthenticated` have not shown the token yet.
    The accept loop calls enter(); the connection's thread calls
    authenticated() once the token checked out and leave() at its end."""

    def __init__(self, name, total, unauthenticated):
        self.name = name
        self.total = total
        self.unauthenticated = unauthenticated
        self.lock = threading.Lock()
        self.connections = 0
        self.waiting = 0            # not yet authenticated

    def enter(self, client):
        """True if a new connection from client may be served; else log it
        (the caller closes the socket at once)."""
        with self.lock:
            if self.connections >= self.total:
                why = "{} connections, the most allowed".format(
                    self.connections)
            elif self.waiting >= self.unauthenticated:
                why = "{} connections still without the token".format(
                    self.waiting)
            else:
                self.connections += 1
                self.waiting += 1
                return True
        log.warning("%s: connection from %s closed: %s", self.name, client,
                    why)
        return False

    def authenticated(self):
        with self.lock:
            self.waiting -= 1

    def leave(self, authenticated):
        with self.lock:
            self.connections -= 1
            if not authenticated:
                self.waiting -= 1


# ---------------------------------------------------------------- logs

class RepeatLimiter:
    """Lets through at most `burst` lines of one kind, and `max_lines` in
    all, per `interval` seconds; counts the rest.  The first line of a new
    interval carries the report of what the previous one suppressed."""

    def __init__(self, burst=10, interval=60.0, max_lines=1000,
                 clock=time.monotonic):
        self.burst = burst
        self.interval = interval
        self.max_lines = max_lines
        self.clock = clock
        self.lock = threading.Lock()
        self._start = None
        self._seen = {}         # key -> [passed, suppressed, example]
        self._passed = 0
        self._dropped = 0       # suppressed by max_lines

    def _report(self):
        """[(example, count)] suppressed in the interval that ended."""
        out = [(v[2], v[1]) for v in self._seen.values() if v[1]]
        out.sort(key=lambda r: -r[1])
        if len(out) > 5:
            rest = sum(c for _, c in out[5:])
            out = out[:5] + [(None, rest)]
        if self._dropped:
            out.append((None, self._dropped))
        return out

    def pending(self):
        """The report of the current interval so far (and reset it)."""
        with self.lock:
            report = self._report()
            self._start = None
            self._seen = {}
            self._passed = 0
            self._dropped = 0
            return report

    def check(self, key, example):
        """(passes, report): whether this line is let through, and what the
        previous interval suppressed (reported once, with a line that
        passes)."""
        now = self.clock()
        with self.lock:
            report = []
            if self._start is None or now - self._start >= self.interval:
                report = self._report() if self._start is not None else []
                self._start = now
                self._seen = {}
                self._passed = 0
                self._dropped = 0
            entry = self._seen.get(key)
            if entry is None:
                if self._passed >= self.max_lines:
                    self._dropped += 1
                    return False, []
                entry = self._seen[key] = [0, 0, example]
            if entry[0] >= self.burst or self._passed >= self.max_lines:
                entry[1] += 1
                return False, []
            entry[0] += 1
            self._passed += 1
            return True, report


def describe_report(report, interval):
    parts = []
    for example, count in report:
        if example is None:
            parts.append("{} other lines".format(count))
        else:
            parts.append("{} more like {!r}".format(count, example[:160]))
    return "(repeats suppressed over {:.0f} s: {})".format(
        interval, "; ".join(parts))


class RepeatFilter(logging.Filter):
    """A logging filter: a message (same logger, level and format string,
    whatever its arguments) passes at most `burst` times per interval."""

    def __init__(self, burst=10, interval=60.0, max_lines=1000,
                 clock=time.monotonic):
        super().__init__()
        self.limiter = RepeatLimiter(burst, interval, max_lines, clock)

    def filter(self, record):
        key = (record.name, record.levelno, str(record.msg))
        passes, report = self.limiter.check(key, str(record.msg))
        if passes and report:
            record.msg = "{} {}".format(record.getMessage(), describe_report(
                report, self.limiter.interval))
            record.args = None
        return passes


_NUMBERS = re.compile(rb"\d+")


class LineLimiter:
    """RepeatLimiter for raw lines (nbdkit's stderr): lines that differ
    only in their numbers (connection counters, addresses, ports) are of
    one kind."""

    def __init__(self, burst=10, interval=60.0, max_lines=1000,
                 clock=time.monotonic):
        self.limiter = RepeatLimiter(burst, interval, max_lines, clock)

    def lines(self, line):
        """The lines to write for line (bytes): none, or it, after the
        report of what the previous interval suppressed."""
        passes, report = self.limiter.check(
            _NUMBERS.sub(b"#", line.rstrip()), line.rstrip().decode(
                errors="replace"))
        if not passes:
            return []
        out = []
        if report:
            out.append("clonectl serve: {}\n".format(describe_report(
                report, self.limiter.interval)).encode())
        return out + [line if line.endswith(b"\n") else line + b"\n"]

    def flush(self):
        """What is still unreported, as lines (at the end of the output)."""
        report = self.limiter.pending()
        if not report:
            return []
        return ["clonectl serve: {}\n".format(describe_report(
            report, self.limiter.interval)).encode()]


class LogFormatter(logging.Formatter):
    """One line per message: an ISO-8601 UTC timestamp with milliseconds,
    the level and the component (the logger's name), e.g.
    `2026-12-04T14:05:01.123Z INFO clonectl.clones: sync of clone c1 ...`.
    The manager writes nbdkit's own lines in the same form (stamp_line)."""

    def formatTime(self, record, datefmt=None):
        return _iso_utc(record.created)

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record):
        # A traceback stays with its line: continuation lines are indented.
        return super().format(record).replace("\n", "\n    ")


def _iso_utc(t):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + \
        ".{:03d}Z".format(int(t * 1000) % 1000)


_STAMPED = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z ")
_NBDKIT_LEVEL = re.compile(rb"\b(error|warning):", re.IGNORECASE)


def stamp_line(line, component=b"nbdkit", now=None):
    """A line of nbdkit's output (bytes) in the log format: lines our
    logging wrote already carry a timestamp; nbdkit's own get one, the
    level they name (error:, warning:; INFO otherwise) and component."""
    if _STAMPED.match(line):
        return line
    if line.startswith(b"clonectl serve: "):    # LineLimiter's reports
        component = b"clonectl.serve"
        line = line[len(b"clonectl serve: "):]
    m = _NBDKIT_LEVEL.search(line)
    level = m.group(1).upper() if m else b"INFO"
    return b"%s %s %s: %s" % (_iso_utc(time.time() if now is None else now)
                              .encode(), level, component,
                              line.removeprefix(component + b": "))


def add_log_file(path, level=logging.INFO):
    """Also append clonectl's log messages to the file at path (the
    foreground manager's own lines, next to nbdkit's in run/serve.log);
    once per process and path."""
    logger = logging.getLogger("clonectl")
    path = os.path.abspath(path)
    for h in logger.handlers:
        if isinstance(h, logging.FileHandler) and h.baseFilename == path:
            return h
    # Private, as the server creates it (client addresses are in it).
    os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT |
                     os.O_CLOEXEC, 0o600))
    handler = logging.FileHandler(path)
    handler.setLevel(level)
    handler.setFormatter(LogFormatter())
    handler.addFilter(RepeatFilter())
    logger.addHandler(handler)
    return handler


def install_log_limit(stream=None, level=logging.INFO):
    """Send clonectl's log messages (INFO and up: operations are recorded)
    to stream, formatted by LogFormatter, through a RepeatFilter; once per
    process."""
    logger = logging.getLogger("clonectl")
    for h in logger.handlers:
        if any(isinstance(f, RepeatFilter) for f in h.filters):
            return h
    import sys
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(LogFormatter())
    handler.addFilter(RepeatFilter())
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler
