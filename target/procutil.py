"""Process helpers shared by the manager, the tests and the scripts."""

import ctypes
import signal

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
