"""The I/O stack of an LU: every reader and writer of its bytes, in one order.

Design notes
------------
Features that must see an LU's I/O (a secondary's read guard, clone groups,
sessions, a primary's replication log) do not patch the LU or wrap its
backend themselves: each installs one layer in its slot of the LU's stack,
and the stack links the layers in a fixed order, outermost first:

    guard        a replication secondary: reads wait for the batch being
                 applied and are refused while the volume is inconsistent
    clones       the clone group: copy on demand during a protected restore,
                 reads from the clone during a reverse sync, mirroring to
                 synchronized clones, delta bits for the others, collisions
    sessions     copy on first write for marked sessions, tracking bits
    replication  a primary's log: each change numbered, logged, applied
    (base)       the backing file or device

Why this order:
- guard outermost: host reads of a secondary never see half an update or
  an inconsistent image.  The replicated apply enters just below it
  (`below("guard")`), so a clone of a secondary's volume sees every
  replicated write, exactly as it sees a host write on a primary.
- clones above sessions and replication: what the clone engines write into
  the Source (restore, reverse sync, copy on demand) is a change of the
  Source that a session must save first and a primary must log; a mirrored
  copy into a clone is not a change of the Source.
- sessions above replication: the old data a copy on first write saves is
  the volume's, and the change is logged only once it may proceed.

Which layers are present, and what each intercepts, changes at run time (a
clone added, a restore started, a group promoted).  Whoever changes that
calls `set`, `remove` or `refresh`; the stack relinks every slot, so the
composition never depends on which feature changed last.  Each layer is
told before the links change (`relinking`, with the slots that will be
filled: the sessions' layer applies the writes it deferred before another
layer may miss them) and after (`relinked`).  An op a layer does
not intercept is the bound method of the layer below: an LU without layers
reads with its backend's own readinto, one Python frame per request.

Two interfaces meet in the stack.  The upper slots (guard, clones) take the
LU's requests, whose writes carry a FUA flag; the lower slots and the base
take backend requests (target.backends), where FUA is a flush.  An adapter
between the two halves turns one into the other, so an engine that writes
below its own slot may use either form.

A layer put into an empty slot must see every change that lands after it
is in place, or it vouches for bytes it never saw (a first clone's sync
copies an extent before a host write that was already on its way below
lands there, and clears the extent's bit).  So requests enter the stack
through entries (`entry`, `below(slot)`), which read the links at each
call, never a snapshot an engine could keep past a relink, and count the
changes (write, zero, trim) in flight per generation of links; `set` of a
new layer returns once the changes that entered on older links are done.
Taking a layer out, or a layer changing what it intercepts (`refresh`),
does not wait: the layer's own writes are what it held back (a clone
group's quiesced writes enter the stack again after the relink), and a
layer that stays has seen everything already.  Reads and flushes are not
counted: a read that started before a relink may return what was there
before it, as it could have had it finished first; a flush's promise
covers the changes acknowledged before it, which passed the layers then
in place.  The host's read is the one request that skips the entry (the
LU binds the top's readinto itself: one Python frame less per read).

Deliberately ignored: reads and flushes in flight while the stack is
relinked finish on the path they started on; callers that need a quiet
point (fracture, mark) drain their own writes first.
"""

import logging
import threading
import time

log = logging.getLogger(__name__)

WAIT_POLL = 0.001       # s between looks at older changes in flight
WAIT_WARN = 10.0        # s of waiting between warnings

OPS = ("readinto", "write", "zero", "trim", "flush", "extents")

UPPER = ("guard", "clones")
LOWER = ("sessions", "replication")
ORDER = UPPER + LOWER


class Layer:
    """A layer of the stack.  `intercepts()` names the ops it handles now
    (op -> callable); every other op passes to the layer below, which
    `link` gives it as `inner`."""

    inner = None

    def link(self, inner):
        self.inner = inner

    def intercepts(self):
        return {}

    def relinking(self, slots):
        """The stack is about to be relinked with a layer in each of slots
        (this one's among them, unless it is being taken out): whatever
        must not cross the change is settled now, before any link
        changes."""

    def relinked(self):
        """The relink is done: the new links are what requests enter."""


class _Face:
    """What the slot above sees of one slot: the layer's intercepted ops,
    the rest of the layer below."""

    __slots__ = OPS + ("slot",)

    def __init__(self, slot, below, ops):
        self.slot = slot
        for op in OPS:
            setattr(self, op, ops.get(op) or getattr(below, op))


class _Fua:
    """LU requests on backend requests: FUA becomes a flush after the
    change (the lower half of the stack has no FUA of its own)."""

    __slots__ = ("_below", "readinto", "extents", "flush")

    def __init__(self, below):
        self._below = below
        self.readinto = below.readinto
        self.extents = below.extents
        self.flush = below.flush

    def write(self, buf, offset, fua=False):
        self._below.write(buf, offset)
        if fua:
            self._below.flush()

    def zero(self, offset, length, may_trim=False, fast=False, fua=False):
        self._below.zero(offset, length, may_trim=may_trim, fast=fast)
        if fua:
            self._below.flush()

    def trim(self, offset, length, fua=False):
        self._below.trim(offset, length)
        if fua:
            self._below.flush()


class Generations:
    """Requests in flight, counted per generation, with no lock on the
    request's path: a request appends to `current` as it enters and pops
    the same list as it leaves (list append and pop are atomic under the
    GIL).  A newcomer that must see every request after it (a layer, a
    session) is published first, then calls `advance` (under its own
    lock), which starts a generation and returns the older ones, and
    `wait`s for them outside that lock: a request counted in a generation
    since passed found the newcomer, as it looked after counting itself."""

    def __init__(self, what):
        self.what = what        # for the warning of a long wait
        self.current = []
        self._older = []

    def run(self, request, *args, **kwargs):
        """request(*args, **kwargs), counted (request looks at what a
        newcomer is published in only once it runs)."""
        current = self.current
        current.append(None)
        try:
            return request(*args, **kwargs)
        finally:
            current.pop()

    def advance(self):
        self._older = [c for c in self._older if c] + [self.current]
        self.current = []
        return list(self._older)

    def wait(self, older):
        """Until every request of the generations older is done."""
        start = warned = time.monotonic()
        while any(older):
            time.sleep(WAIT_POLL)
            now = time.monotonic()
            if now - warned >= WAIT_WARN:
                warned = now
                log.warning("%s: waited %.0f s for %d changes already on "
                            "their way to the backing file", self.what,
                            now - start, sum(len(c) for c in older))


class _Entry:
    """Where requests enter the stack: at the top (slot None) or beneath
    slot.  The links are looked up at each call, after a change is counted
    in the current generation (Generations: the relink swaps the links,
    then the generation)."""

    __slots__ = ("_stack", "_slot", "_changes")

    def __init__(self, stack, slot):
        self._stack = stack
        self._slot = slot
        self._changes = stack.changes

    def __getattr__(self, name):
        # What else the links offer (beneath the last slot, the backend's
        # own methods: reopen, forget).
        return getattr(self._stack._below[self._slot], name)

    def readinto(self, *args, **kwargs):
        return self._stack._below[self._slot].readinto(*args, **kwargs)

    def extents(self, *args, **kwargs):
        return self._stack._below[self._slot].extents(*args, **kwargs)

    def flush(self):
        return self._stack._below[self._slot].flush()

    # Generations.run inlined: a host write's path, and the links must be
    # looked up only once the change is counted.

    def write(self, *args, **kwargs):
        changes = self._changes.current
        changes.append(None)
        try:
            return self._stack._below[self._slot].write(*args, **kwargs)
        finally:
            changes.pop()

    def zero(self, *args, **kwargs):
        changes = self._changes.current
        changes.append(None)
        try:
            return self._stack._below[self._slot].zero(*args, **kwargs)
        finally:
            changes.pop()

    def trim(self, *args, **kwargs):
        changes = self._changes.current
        changes.append(None)
        try:
            return self._stack._below[self._slot].trim(*args, **kwargs)
        finally:
            changes.pop()


class IOStack:
    """The layers of one LU over its backend.  on_change(top) is called
    with the new top after every relink (the LU binds its read to it);
    `entry` is where the LU's other requests enter."""

    def __init__(self, base, on_change=None, name=None):
        self.base = base
        self.layers = {}
        self.on_change = on_change
        self.lock = threading.RLock()
        self._below = {}
        # Changes in flight per generation of links.
        self.changes = Generations("LU {}: a new layer of its I/O stack"
                                   .format(name))
        self._entries = {slot: _Entry(self, slot) for slot in ORDER}
        self.entry = _Entry(self, None)
        self.top = None
        self.refresh()

    def get(self, slot):
        return self.layers.get(slot)

    def set(self, slot, layer):
        """Install layer in slot; a slot holds one layer."""
        if slot not in ORDER:
            raise ValueError("no I/O stack slot named {!r}".format(slot))
        with self.lock:
            arriving = self.layers.get(slot)
            if arriving not in (None, layer):
                raise ValueError("I/O stack slot {!r} is taken".format(slot))
            self.layers[slot] = layer
            older = self.refresh()
        if arriving is None:
            self.changes.wait(older)

    def remove(self, slot, layer=None):
        """Take slot's layer out (only if it is layer, when given)."""
        with self.lock:
            leaving = self.layers.get(slot)
            if layer is not None and leaving is not layer:
                return
            self.layers.pop(slot, None)
            self.refresh(leaving)

    def below(self, slot):
        """Where a request enters to pass through everything beneath slot
        and nothing above it (an engine writing under its own layer);
        it follows every relink, so it may be kept."""
        return self._entries[slot]

    def refresh(self, leaving=None):
        """Relink every slot (a layer's intercepts changed); leaving: a
        layer just taken out, told too (what it holds back must reach
        the layers below before requests pass it by).  Returns the
        generations of changes that entered on the links replaced."""
        with self.lock:
            slots = frozenset(self.layers)
            told = list(self.layers.values())
            if leaving is not None:
                told.append(leaving)
            # A layer need not derive from Layer (the clone group).
            for layer in told:
                if hasattr(layer, "relinking"):
                    layer.relinking(slots)
            below = self.base
            for slot in reversed(ORDER):
                if slot == UPPER[-1]:
                    below = _Fua(below)
                self._below[slot] = below
                layer = self.layers.get(slot)
                if layer is not None:
                    layer.link(below)
                    below = _Face(slot, below, layer.intercepts())
            self.top = self._below[None] = below
            older = self.changes.advance()
            if self.on_change is not None:
                self.on_change(below)
            for layer in told:
                if hasattr(layer, "relinked"):
                    layer.relinked()
            return older
