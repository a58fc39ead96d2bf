"""Process helpers shared by the manager, the tests and the scripts."""

import ctypes
import os
import signal
import threading

from . import limits

PR_SET_PDEATHSIG = 1


def die_with_parent(sig=signal.SIGKILL):
    """A subprocess preexec_fn: the child gets sig (SIGKILL by default)
    when the process that started it dies, so no child outlives it.
    functools.partial(die_with_parent, signal.SIGTERM) for a child that
    may clean up.  Best effort: a child is still started without it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig,
                                                0, 0, 0)
    except (OSError, AttributeError):
        pass


def log_writer(path, component):
    """A file to give a child (tgtd, nbdfuse) as its stdout and stderr: its
    lines reach the log file at path as nbdkit's do, stamped with the time,
    their level and component, repeats limited.  Close it once the child
    has it."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT |
                     os.O_CLOEXEC, 0o600)
    except BaseException:
        os.close(r)
        os.close(w)
        raise
    threading.Thread(target=pump_log, args=(os.fdopen(r, "rb"), fd,
                                             component.encode()),
                     name=component + "-log", daemon=True).start()
    return os.fdopen(w, "wb")


def pump_log(pipe, fd, component=b"nbdkit"):
    """Copy a child's output (nbdkit's) to the log file fd until EOF,
    repeated lines suppressed (limits.LineLimiter); then close both."""
    limiter = limits.LineLimiter()
    try:
        for line in iter(lambda: pipe.readline(65536), b""):
            for out in limiter.lines(line):
                try:
                    os.write(fd, limits.stamp_line(out, component))
                except OSError:
                    pass    # a full disk: keep reading, or nbdkit blocks
        for out in limiter.flush():
            try:
                os.write(fd, limits.stamp_line(out, component))
            except OSError:
                pass
    finally:
        pipe.close()
        os.close(fd)
