"""A destination in memory, for engine tests (the interface: __init__)."""

from . import DestinationError


class MemoryDestination:
    """A destination in memory; fail_after counts calls before a failure."""

    def __init__(self, backend):
        self.backend = backend
        self.size = backend.size
        self.fail_after = None
        self.flushed = bytes(backend.data)
        self.closed = False

    def _tick(self):
        if self.fail_after is not None:
            self.fail_after -= 1
            if self.fail_after < 0:
                raise DestinationError(uri="memory", reason="injected failure")

    def write(self, buf, offset):
        self._tick()
        self.backend.write(bytes(buf), offset)

    def zero(self, offset, length):
        self._tick()
        self.backend.zero(offset, length)

    def flush(self):
        self._tick()
        self.flushed = bytes(self.backend.data)

    def close(self):
        self.closed = True
