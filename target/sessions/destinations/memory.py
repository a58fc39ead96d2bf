"""A destination in memory, for engine tests (the interface: __init__).

Requests take effect when queued and complete at the next retire().
"""

from . import DestinationError


class MemoryDestination:
    """A destination in memory; fail_after counts calls before a failure."""

    def __init__(self, backend):
        self.backend = backend
        self.size = backend.size
        self.fail_after = None
        self.flushed = bytes(backend.data)
        self.closed = False
        self.completed = []     # done callbacks retire() calls next

    def _tick(self):
        if self.fail_after is not None:
            self.fail_after -= 1
            if self.fail_after < 0:
                raise DestinationError(uri="memory", reason="injected failure")

    def write(self, buf, offset, done):
        self._tick()
        self.backend.write(bytes(buf), offset)
        self.completed.append(done)

    def zero(self, offset, length, done):
        self._tick()
        self.backend.zero(offset, length)
        self.completed.append(done)

    def flush(self, done):
        self._tick()
        self.flushed = bytes(self.backend.data)
        self.completed.append(done)

    def busy(self):
        return False

    def fds(self):
        return ()

    def notify(self, fd, events):
        pass

    def retire(self):
        completed, self.completed = self.completed, []
        for done in completed:
            done(None)

    def close(self):
        self.closed = True
