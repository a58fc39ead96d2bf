"""Plugin: processes a test caused to exist, stopped by PID.

Fixtures: `process_guard` (PIDs that must be gone at teardown),
`stop_at_teardown` (objects whose stop() runs at teardown).  Nothing here
kills processes by name.
"""

import functools
import os
import signal
import time

import pytest

from target import procutil

STOP_TIMEOUT = 30.0


def pid_alive(pid):
    """True if pid exists and is not a zombie (orphans are not reaped here:
    PID 1 of this machine does not reap, so a dead daemon lingers as Z)."""
    try:
        with open("/proc/{}/stat".format(pid)) as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # Field 3, after the parenthesised command name (which may hold spaces).
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_pid_gone(pid, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


def terminate_pid(pid, timeout=STOP_TIMEOUT):
    """SIGTERM pid, wait, SIGKILL if needed; return True if it obeyed TERM."""
    if not pid_alive(pid):
        return True
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    if wait_pid_gone(pid, timeout):
        return True
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    wait_pid_gone(pid, 10)
    return False


# In the child before exec: SIGTERM it if the test run itself dies (killed
# pytest, timeout), so that no server outlives the run.
die_with_parent = functools.partial(procutil.die_with_parent, signal.SIGTERM)


class ProcessGuard:
    """PIDs that a test caused to exist (daemons, nbdkit children) and that
    must be gone at teardown."""

    def __init__(self):
        self.pids = []

    def add(self, pid):
        if pid and pid not in self.pids:
            self.pids.append(pid)

    def cleanup(self):
        survivors = []
        for pid in self.pids:
            if pid_alive(pid):
                survivors.append(pid)
                terminate_pid(pid)
        return survivors


@pytest.fixture
def process_guard():
    guard = ProcessGuard()
    yield guard
    guard.cleanup()


def proc_status(pid, field):
    """A number from /proc/PID/status (VmRSS in KiB, Threads, ...)."""
    with open("/proc/{}/status".format(pid)) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError("no {} for pid {}".format(field, pid))


@pytest.fixture
def stop_at_teardown():
    """stop_at_teardown(obj) returns obj, whose stop() is called at
    teardown (in-process servers of a test)."""
    made = []

    def add(obj):
        made.append(obj)
        return obj
    yield add
    for obj in reversed(made):
        obj.stop()
