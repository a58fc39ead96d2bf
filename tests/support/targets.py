"""Helpers for tests that drive a Target (no server) directly."""

import threading
import time

from target import copier


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


def hold_copies(monkeypatch):
    """Every copy (target.copier) begun from now on waits before it moves
    anything: returns (copying, go), Events set when one waits and to
    let them go on."""
    copying, go = threading.Event(), threading.Event()
    real = copier.Copier.copy

    def held(self, runs):
        copying.set()
        assert go.wait(30)
        return real(self, runs)
    monkeypatch.setattr(copier.Copier, "copy", held)
    return copying, go
