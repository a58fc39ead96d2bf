"""Helpers for tests that drive a Target (no server) directly."""

import time


def fractured(t, source, clone, timeout=20.0):
    """Add clone of LU source on Target t, synchronize it and fracture it:
    a point in time of source that its own export can change."""
    t.clone_add(source, clone)
    t.clone_sync(clone)
    deadline = time.monotonic() + timeout
    while t.clone_status(clone)["state"] != "synchronized":
        assert time.monotonic() < deadline, t.clone_status(clone)
        time.sleep(0.01)
    t.clone_fracture(clone)
