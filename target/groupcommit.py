"""Group commit: one sync shared by every writer waiting for it.

Design notes
------------
A writer writes (in place, without syncing), then takes a ticket and waits
for it.  What this guarantees:

- a ticket taken after a write returned is durable once wait(ticket)
  returns: the sync that covers it began after the ticket was taken;
- one sync runs at a time; the tickets taken while it runs are covered
  together by the next one, run by the first waiter to find none
  running, and every waiter whose ticket a sync covers shares it.  So N
  concurrent writers cost about two syncs, not N, and a waiter waits at
  most for the sync running and the one after it;
- a failed sync fails its waiters and every later one until reset (after
  a failed fdatasync the kernel may have dropped pages it will not write
  again): the owner decides how to recover.

Locking: `lock` (a Condition) guards the counters; an owner may hold it
to do its own bookkeeping atomically with a ticket (take, on_durable) or
to wait until no sync runs (quiesce) before closing or replacing what
the sync covers.  The sync runs without it.  Users: the activity map
(target.changemap) and a session's save area (target.sessions.savearea).
"""

import threading


class GroupCommit:
    """sync(): makes everything written so far durable (raises OSError).
    on_durable(upto): called holding lock after a sync made the tickets up
    to upto durable."""

    def __init__(self, sync, on_durable=None):
        self.sync = sync
        self.on_durable = on_durable
        self.lock = threading.Condition(threading.Lock())
        self._written = 0       # tickets taken
        self._durable = 0       # tickets made durable
        self._flushing = False
        self._failed = None

    @property
    def failed(self):
        """The error of a failed sync, kept until reset (None if none)."""
        return self._failed

    def take(self):
        """A ticket for what was written so far (caller holds lock)."""
        self._written += 1
        return self._written

    def ticket(self):
        """take() taking lock."""
        with self.lock:
            return self.take()

    def wait(self, ticket):
        """Return once ticket (and every earlier one) is durable, running
        the sync if none is running; raise the error of a failed one.
        Called without lock."""
        with self.lock:
            while True:
                if self._failed is not None:
                    raise self._failed
                if self._durable >= ticket:
                    return
                if self._flushing:
                    self.lock.wait()
                    continue
                self._flushing = True
                upto = self._written
                self.lock.release()
                error = None
                try:
                    self.sync()
                except OSError as e:
                    error = e
                finally:
                    self.lock.acquire()
                    self._flushing = False
                    self.lock.notify_all()
                if error is not None:
                    self._failed = error
                    continue
                self._durable = max(self._durable, upto)
                if self.on_durable is not None:
                    self.on_durable(self._durable)

    def quiesce(self):
        """Wait until no sync runs (caller holds lock): what it covers may
        be closed or replaced then."""
        while self._flushing:
            self.lock.wait()

    def fail(self, error):
        """Fail every waiter and later ticket until reset (caller holds
        lock)."""
        self._failed = error

    def reset(self):
        """Forget a failed sync: later waits sync again (caller holds
        lock)."""
        self._failed = None

    def all_durable(self):
        """Every ticket taken so far is durable (the owner made it so
        another way): reset, and wake its waiters (caller holds lock)."""
        self._failed = None
        self._durable = self._written
        self.lock.notify_all()
