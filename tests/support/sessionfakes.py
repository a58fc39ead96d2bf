"""Sessions on memory backends, for tests that drive the session engine
without a server: FakeLU (what a Session asks of its LU) and
marked_session (a Source holding given data, a session marked on it)."""

import tempfile

from target import backends, sessions


class FakeLU:
    """An LU as a Session sees it: a name, a size and its backend (the
    session layer over the Source's data)."""

    name = "src"

    def __init__(self, backend, size):
        self.backend = backend
        self.size = size


def marked_session(data, granularity, uris, map_dir=None):
    """A Source of `data` on a memory backend and a session "s" of it
    with one destination per URI, created and marked (its save area in
    memory, its maps in map_dir or a new temporary directory); returns
    (session, the frozen image)."""
    size = len(data)
    inner = backends.MemoryBackend(size)
    inner.write(data, 0)
    lu = FakeLU(sessions.SessionLayer(inner), size)
    save = backends.MemoryBackend(sessions.SaveArea.minimum_size(
        size // granularity, granularity) + size)
    s = sessions.Session("s", lu, granularity,
                         map_dir or tempfile.mkdtemp(prefix="session-"),
                         save, [{"uri": uri} for uri in uris],
                         persist=lambda record: None)
    s.create()
    lu.backend.add(s)
    s.mark()
    return s, bytes(inner.data)
