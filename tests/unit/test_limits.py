"""target.limits: the connection limiter, the descriptor arithmetic and the
suppression of repeated log lines."""

import io
import ipaddress
import logging
import threading
import time

import pytest

from target import limits


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_default_max_connections_keeps_a_reserve():
    assert limits.default_max_connections(512) == 512 - 128
    assert limits.default_max_connections(256) == 128
    assert limits.default_max_connections(4096) == 1024      # the cap
    assert limits.default_max_connections(2000) == 1024
    assert limits.default_max_connections(1200) == 1200 - 300
    assert limits.default_max_connections(512, 3) == (512 - 128) // 3
    assert limits.default_max_connections(100) == 1


def _admit_in_thread(limiter, address, release):
    """Admit from a new thread that lives until release is set; return
    (thread, error or None)."""
    result = {}
    admitted = threading.Event()

    def run():
        try:
            limiter.admit(address)
            result["error"] = None
        except limits.TooManyConnections as e:
            result["error"] = e
        admitted.set()
        release.wait()
    th = threading.Thread(target=run, daemon=True)
    th.start()
    admitted.wait(5)
    return th, result["error"]


def test_limiter_counts_live_connection_threads():
    limiter = limits.ConnectionLimiter(3, 0)
    release = threading.Event()
    made = [_admit_in_thread(limiter, None, release) for _ in range(5)]
    errors = [e for _, e in made]
    assert errors[:3] == [None] * 3
    assert all(isinstance(e, limits.TooManyConnections) for e in errors[3:])
    assert "--max-connections" in str(errors[3])
    release.set()
    for th, _ in made:
        th.join(5)
    # The threads ended: their connections no longer count (the kernel
    # may take a moment after join() to retire a thread's id).
    deadline = time.monotonic() + 5
    while limiter.count() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert limiter.count() == 0
    again = threading.Event()
    th, err = _admit_in_thread(limiter, None, again)
    assert err is None
    assert limiter.count() == 1
    again.set()
    th.join(5)


def test_limiter_keeps_a_live_thread_a_listing_skipped(monkeypatch):
    """The kernel's listing of /proc/self/task can skip live threads while
    others exit during it (a burst of refused connections): such a thread
    is still counted, so the cap holds.  (Before, the skipped connection
    was dropped from the count and one connection too many admitted.)"""
    limiter = limits.ConnectionLimiter(2, 0)
    release = threading.Event()
    first, err = _admit_in_thread(limiter, None, release)
    assert err is None
    listdir = limits.os.listdir

    def skipping(path):
        names = listdir(path)
        if path == limiter.TASKS:
            names = [n for n in names if int(n) != first.native_id]
        return names
    monkeypatch.setattr(limits.os, "listdir", skipping)
    try:
        made = [_admit_in_thread(limiter, None, release) for _ in range(2)]
        assert made[0][1] is None
        assert isinstance(made[1][1], limits.TooManyConnections), \
            limiter.live
        assert limiter.count() == 2
    finally:
        release.set()
        first.join(5)
        for th, _ in made:
            th.join(5)


def test_limiter_per_address_spares_loopback():
    limiter = limits.ConnectionLimiter(100, 2)
    release = threading.Event()
    outside = ipaddress.ip_address("192.0.2.7")
    other = ipaddress.ip_address("198.51.100.1")
    mapped = ipaddress.ip_address("::ffff:192.0.2.7")
    made = [_admit_in_thread(limiter, a, release) for a in
            (outside, mapped, outside, other,
             ipaddress.ip_address("127.0.0.1"),
             ipaddress.ip_address("127.0.0.1"),
             ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))]
    try:
        errors = [e for _, e in made]
        assert errors[0] is None and errors[1] is None
        assert isinstance(errors[2], limits.TooManyConnections)
        assert "from this address" in str(errors[2])
        assert errors[3:] == [None] * 5
    finally:
        release.set()
        for th, _ in made:
            th.join(5)


def test_gate_caps_total_and_unauthenticated(caplog):
    gate = limits.Gate("test port", total=3, unauthenticated=2)
    assert gate.enter("a") and gate.enter("b")
    assert not gate.enter("c")          # two still without the token
    gate.authenticated()
    assert gate.enter("c")
    assert not gate.enter("d")          # three in all
    gate.leave(authenticated=True)
    assert gate.enter("d") is False     # still two unauthenticated
    gate.leave(authenticated=False)
    assert gate.enter("d")
    assert "test port: connection from c closed" in caplog.text


def test_repeat_filter_suppresses_and_reports_later():
    clock = Clock()
    out = io.StringIO()
    logger = logging.getLogger("clonectl.test-limits")
    logger.propagate = False
    handler = logging.StreamHandler(out)
    handler.addFilter(limits.RepeatFilter(burst=3, interval=60, clock=clock))
    logger.addHandler(handler)
    try:
        for i in range(100):
            logger.warning("connection from %s refused", "10.0.0.%d" % i)
        logger.warning("something else")
        assert out.getvalue().count("refused") == 3
        assert "something else" in out.getvalue()
        clock.now += 61
        logger.warning("connection from %s refused", "10.0.0.200")
        last = out.getvalue().splitlines()[-1]
        assert last.startswith("connection from 10.0.0.200 refused")
        assert "97 more like 'connection from %s refused'" in last
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def test_line_limiter_bounds_distinct_lines():
    clock = Clock()
    lim = limits.LineLimiter(burst=2, interval=10, max_lines=50, clock=clock)
    written = []
    for i in range(1000):
        written += lim.lines(b"nbdkit: python[%d]: error: refused\n" % i)
        written += lim.lines(b"export %s unknown\n" % (b"x" * (i % 300)))
    assert len(written) <= 50
    assert written.count(b"nbdkit: python[1]: error: refused\n") == 1
    clock.now += 11
    out = lim.lines(b"accept: Too many open files\n")
    assert len(out) == 2 and out[1] == b"accept: Too many open files\n"
    assert b"repeats suppressed over 10 s" in out[0]
    assert b"other lines" in out[0]


def test_install_log_limit_once():
    logger = logging.getLogger("clonectl")
    before = list(logger.handlers)
    try:
        h1 = limits.install_log_limit(io.StringIO())
        h2 = limits.install_log_limit(io.StringIO())
        assert h1 is h2
        assert len(logger.handlers) == len(before) + 1
    finally:
        for h in list(logger.handlers):
            if h not in before:
                logger.removeHandler(h)


@pytest.mark.parametrize("soft", [64, 1024])
def test_raise_nofile_limit_reaches_the_hard_limit(soft):
    import resource
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = old[1]
    if hard != resource.RLIM_INFINITY and hard < soft:
        pytest.skip("hard limit below {}".format(soft))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert limits.raise_nofile_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


def test_line_limiter_reports_the_rest_at_the_end():
    lim = limits.LineLimiter(burst=1, interval=60, clock=Clock())
    assert lim.lines(b"accept: Too many open files\n")
    for _ in range(5):
        assert lim.lines(b"accept: Too many open files\n") == []
    out = lim.flush()
    assert len(out) == 1 and b"5 more like" in out[0]
    assert lim.flush() == []


def test_stamp_line_gives_nbdkit_lines_time_level_and_component():
    t = 1796392800.25       # 2026-12-04T14:00:00.250Z
    assert limits.stamp_line(b"nbdkit: python[1]: error: write: x\n",
                             now=t) == \
        b"2026-12-04T14:00:00.250Z ERROR nbdkit: python[1]: error: write: x\n"
    assert limits.stamp_line(b"tgtd: warning: y\n", b"tgtd", now=t) == \
        b"2026-12-04T14:00:00.250Z WARNING tgtd: warning: y\n"
    assert limits.stamp_line(b"clonectl serve: (repeats suppressed)\n",
                             now=t) == b"2026-12-04T14:00:00.250Z INFO " \
        b"clonectl.serve: (repeats suppressed)\n"
    # A line our logging wrote in the target is kept as it is.
    line = b"2026-12-04T14:00:00.250Z INFO clonectl.clones: sync ...\n"
    assert limits.stamp_line(line, now=t + 5) == line


def test_log_formatter_iso_time_level_component():
    record = logging.LogRecord("clonectl.clones", logging.INFO, __file__, 1,
                               "sync of clone %s completed", ("c1",), None)
    record.created = 1796392800.25
    assert limits.LogFormatter().format(record) == \
        "2026-12-04T14:00:00.250Z INFO clonectl.clones: sync of clone c1 " \
        "completed"
