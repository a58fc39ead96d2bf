"""The clone engine's model (target.clones), for hypothesis state machines:
CloneMachine is tests/engine/test_clones_model.py's test and the base of
tests/engine/test_powerloss.py's.

A hypothesis state machine drives one Source and two clones on memory
backends with host writes (to the Source and to fractured clones), reads,
flushes, engine steps, state changes and crashes, and compares with a
byte-level reference model after every step:

- every host read of the Source returns the model's Source content
  (during a reverse sync: the clone's data, overlaid by later host writes);
- a fractured clone holds exactly the model's clone content;
- for every clone, an extent whose Delta Map bit is clear is identical on
  Source and clone (so a sync that copies only set bits makes them equal);
- clone states follow the transition table; refused operations change
  nothing;
- protected restore: the restoring clone never changes except by writes
  to its own export; the Source shows the clone's data overlaid by host
  writes; after a crash, host writes that were flushed are still there
  (unflushed ones may be replaced by the clone's data: NBD allows losing
  unflushed writes).  An extent written during a restore and not flushed
  since may come back as any mix of what it held before and those writes,
  byte by byte, and nothing else: not the Source's pre-restore bytes.

Crashes are a process kill: an exception raised at the N-th backend or map
operation that no code may catch; the group is dropped without cleanup and
rebuilt from what was persisted (map files, recorded states) and the same
backends (completed writes survive a process kill).  The unacknowledged
request that was cut short may or may not have landed: the model takes what
is there for its range, and every invariant above must hold after recovery.
"""

import random
import shutil
import tempfile

import hypothesis.strategies as st

from hypothesis.stateful import (RuleBasedStateMachine, invariant, precondition,
                                 rule, initialize)

from target import backends, changemap, clones, errors, maps
from target.lu import LogicalUnit

GRAN = 4096
EXTENTS = 16
SIZE = GRAN * EXTENTS
NAMES = ("c1", "c2")


class Crash(BaseException):
    """A kill -9: nothing may catch it."""


class Countdown:
    def __init__(self):
        self.left = None

    def tick(self, torn=None):
        """Count one operation; crash on the armed one.

        torn, if given, is run before crashing: the part of a write that
        reached the disk.
        """
        if self.left is not None:
            self.left -= 1
            if self.left < 0:
                self.left = None
                if torn is not None:
                    torn()
                raise Crash()


class CrashingBackend(backends.Backend):
    """A MemoryBackend whose operations can be cut by a Countdown."""

    def __init__(self, mem, countdown):
        self.mem = mem
        self.size = mem.size
        self.countdown = countdown

    def readinto(self, buf, offset):
        self.countdown.tick()
        self.mem.readinto(buf, offset)

    def write(self, buf, offset):
        view = memoryview(buf).cast("B")
        # A write cut by the crash lands partly: its first half.
        self.countdown.tick(
            torn=lambda: self.mem.write(view[:len(view) // 2], offset))
        self.mem.write(view, offset)

    def zero(self, offset, length, may_trim=False, fast=False):
        self.countdown.tick()
        self.mem.zero(offset, length)

    def flush(self):
        self.countdown.tick()

    def trim(self, offset, length):
        self.countdown.tick()


def patch_map_io(countdown):
    """Count every map-file operation on countdown (a crash can cut any of
    them); return the originals, to put back with restore_map_io."""
    orig = (maps.save, maps.ActivityFile.persist, maps.ActivityFile.reset)
    orig_save, orig_persist, orig_reset = orig

    def save(*a, **kw):
        countdown.tick()
        return orig_save(*a, **kw)

    def persist(self_, *a, **kw):
        countdown.tick()
        return orig_persist(self_, *a, **kw)

    def reset(self_, *a, **kw):
        countdown.tick()
        return orig_reset(self_, *a, **kw)

    maps.save = save
    maps.ActivityFile.persist = persist
    maps.ActivityFile.reset = reset
    return orig


def data_for(seed, length):
    return random.Random(seed).randbytes(length)


class CloneMachine(RuleBasedStateMachine):

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="clone-model-")
        self.countdown = Countdown()
        self.mem_src = backends.MemoryBackend(SIZE)
        self.mem_clones = {n: backends.MemoryBackend(SIZE) for n in NAMES}
        self.persisted = {}
        self.saved_commit_interval = changemap.COMMIT_INTERVAL
        # Commits only where the rules ask (commit rule, end of an
        # operation), so flush-time persistence is tested on its own.
        changemap.COMMIT_INTERVAL = 1e9
        self._patch_io()
        # The model.
        self.S = bytearray(SIZE)
        self.C = {}
        self.states = {}
        self.engine = None
        self.group = None
        # Source extents written since the PRM was last made durable, while
        # a protected restore runs: extent -> the contents it may show
        # after a crash, byte by byte (what it held before the first of
        # those writes, and after each); None for "anything".
        self.unflushed = {}

    def _patch_io(self):
        self.orig = patch_map_io(self.countdown)

    def teardown(self):
        maps.save, maps.ActivityFile.persist, maps.ActivityFile.reset = self.orig
        changemap.COMMIT_INTERVAL = self.saved_commit_interval
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------ plumbing

    def _persist(self, name, state, error=None, rate=None):
        self.persisted[name] = state

    def _wrap(self, mem):
        """The backend the group uses for memory backend mem."""
        return CrashingBackend(mem, self.countdown)

    def _new_group(self):
        lu = LogicalUnit(
            "src", {"size": SIZE, "file": "-", "readonly": False},
            backend=self._wrap(self.mem_src))
        group = clones.CloneGroup(lu, GRAN, self.dir, self._persist)
        group.region = 2  # small activity regions: a bounded superset
        return lu, group

    @initialize()
    def setup(self):
        self.lu, self.group = self._new_group()
        for n in NAMES:
            self.group.add_clone(n, self._wrap(self.mem_clones[n]))
            self.persisted[n] = clones.OUT_OF_SYNC
            self.states[n] = clones.OUT_OF_SYNC
            self.C[n] = bytearray(SIZE)

    def _unflushed_write(self, offset, data):
        """Record a host write to the Source during a restore, before it is
        made (a crash may cut it short)."""
        after = bytearray(self.S)
        after[offset:offset + len(data)] = data
        for e in range(offset // GRAN, (offset + len(data) - 1) // GRAN + 1):
            a, b = e * GRAN, (e + 1) * GRAN
            shows = self.unflushed.setdefault(e, [bytes(self.S[a:b])])
            if shows is not None:
                shows.append(bytes(after[a:b]))

    def _check_unflushed(self, e, shown):
        """shown, extent e after a crash, is made of what its unflushed
        writes allow."""
        shows = self.unflushed[e]
        if shows is None:
            return
        for i in range(GRAN):
            if all(v[i] != shown[i] for v in shows):
                raise AssertionError(
                    "the Source shows other data than the clone's or a host "
                    "write's at extent {} after the crash (offset {}: {:#x}, "
                    "allowed {})".format(e, i, shown[i],
                                         sorted({v[i] for v in shows})))

    def crashed(self, touched=None, source_touched=True):
        """Drop the group as a kill -9 would, and recover.

        touched: the range of the request cut short; source_touched: False
        for a write to a clone's export, which never changes what the
        Source shows."""
        self.engine = None
        self.lu, self.group = self._new_group()
        records = {n: {"state": self.persisted[n], "file": n} for n in NAMES}
        self.countdown.left = None
        before = dict(self.states)
        self.group.load(records,
                        lambda rec: self._wrap(self.mem_clones[rec["file"]]))
        for n in NAMES:
            now = self.group.clones[n].state
            if now in (clones.REVERSE_SYNCING, clones.RESTORING) and \
                    before[n] != now:
                # The start was persisted just before the crash: the Source
                # shows the clone from now on.
                self.S = bytearray(self.C[n])
        for n in NAMES:
            self.states[n] = self.group.clones[n].state
        for e in sorted(self.unflushed):
            buf = bytearray(GRAN)
            self.lu.read(buf, e * GRAN)
            self._check_unflushed(e, buf)
            self.S[e * GRAN:(e + 1) * GRAN] = buf
        self.unflushed.clear()
        if touched is not None:
            s, e = touched
            # The request that was cut short is unacknowledged: whatever
            # landed is acceptable, for the Source as hosts read it ...
            if source_touched:
                buf = bytearray(e - s)
                self.lu.read(buf, s)
                self.S[s:e] = buf
            for n in NAMES:
                if self.states[n] in clones.EXPORTED:
                    self.C[n][s:e] = self.mem_clones[n].data[s:e]
        for n in NAMES:
            if self.states[n] in clones.MIRRORED:
                self.C[n] = bytearray(self.S)
        eng = self.group.resume(run=False)
        if eng is not None:
            self.engine = self.group.engine
            self.engine.chunk = 3

    def attempt(self, func, touched=None, source_touched=True):
        """Run func; on a crash, recover.  Return (ok, result)."""
        try:
            return True, func()
        except Crash:
            self.crashed(touched, source_touched)
            return False, None

    # ------------------------------------------------------------ rules

    @rule(n=st.integers(0, 60))
    def arm_crash(self, n):
        self.countdown.left = n

    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(1, 3 * GRAN),
          seed=st.integers(0, 1 << 30), fua=st.booleans())
    def write_source(self, offset, length, seed, fua):
        length = min(length, SIZE - offset)
        data = data_for(seed, length)
        if self._restoring():
            self._unflushed_write(offset, data)
        ok, _ = self.attempt(lambda: self.lu.write(data, offset, fua),
                             touched=(offset, offset + length))
        if ok:
            if fua:
                self.unflushed.clear()
            self.S[offset:offset + length] = data
            for n in NAMES:
                if self.states[n] in clones.MIRRORED:
                    self.C[n][offset:offset + length] = data

    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(1, 3 * GRAN))
    def zero_source(self, offset, length):
        length = min(length, SIZE - offset)
        if self._restoring():
            self._unflushed_write(offset, bytes(length))
        ok, _ = self.attempt(lambda: self.lu.zero(offset, length),
                             touched=(offset, offset + length))
        if ok:
            self.S[offset:offset + length] = bytes(length)
            for n in NAMES:
                if self.states[n] in clones.MIRRORED:
                    self.C[n][offset:offset + length] = bytes(length)

    @rule(name=st.sampled_from(NAMES), offset=st.integers(0, SIZE - 1),
          length=st.integers(1, 2 * GRAN), seed=st.integers(0, 1 << 30))
    def write_clone_export(self, name, offset, length, seed):
        length = min(length, SIZE - offset)
        data = data_for(seed, length)
        export = self.group.clones[name].export
        if self.states[name] not in clones.EXPORTED:
            try:
                export.write(data, offset)
            except errors.ReadOnly:
                return
            raise AssertionError("write to a clone that is not fractured")
        ok, _ = self.attempt(lambda: export.write(data, offset),
                             touched=(offset, offset + length),
                             source_touched=False)
        if ok:
            self.C[name][offset:offset + length] = data

    @rule()
    def flush(self):
        ok, _ = self.attempt(self.lu.flush)
        if ok:
            self.unflushed.clear()

    @rule()
    def commit(self):
        ok, _ = self.attempt(self.group.commit)
        if ok:
            self.unflushed.clear()

    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(1, 3 * GRAN))
    def read_source(self, offset, length):
        """A real host read: during a restore it copies on demand."""
        length = min(length, SIZE - offset)
        buf = bytearray(length)
        ok, _ = self.attempt(lambda: self.lu.read(buf, offset))
        if ok:
            assert buf == self.S[offset:offset + length]

    def _restoring(self):
        return any(s == clones.RESTORING for s in self.states.values())

    @rule(name=st.sampled_from(NAMES), full=st.booleans())
    def start_restore(self, name, full):
        busy = self._busy(name)
        allowed = self.states[name] in (clones.FRACTURED, clones.RESTORING) \
            and not any(self.states[n] in clones.MIRRORED for n in NAMES
                        if n != name)
        if self._try_start(lambda: self.group.start_restore(
                name, full=full, run=False), allowed, busy):
            if self.states[name] != clones.RESTORING:
                self.unflushed.clear()
            self.states[name] = clones.RESTORING
            self.S = bytearray(self.C[name])

    @rule(name=st.sampled_from(NAMES))
    def fracture(self, name):
        allowed = self.states[name] == clones.SYNCHRONIZED
        try:
            ok, _ = self.attempt(lambda: self.group.fracture(name))
        except clones.InvalidTransition:
            assert not allowed
            return
        assert allowed, "fracture of a {} clone accepted".format(
            self.states[name])
        if ok:
            self.states[name] = clones.FRACTURED

    def _busy(self, name):
        return any(self.states[n] in clones.RUNNING for n in NAMES
                   if n != name) or (self.engine is not None and
                                     self.states[name] in clones.RUNNING)

    def _try_start(self, start, allowed, busy):
        """Run start(); check it was refused exactly when the model says.

        Returns the engine, or None if refused or cut by a crash."""
        try:
            ok, eng = self.attempt(start)
        except (clones.InvalidTransition, clones.GroupBusy,
                clones.AlreadyRunning, clones.SiblingsMirrored):
            assert not allowed or busy
            return None
        assert allowed and not busy
        if not ok:
            return None
        self.engine = eng
        eng.chunk = 3
        return eng

    def _start(self, name, reverse):
        busy = self._busy(name)
        if reverse:
            allowed = self.states[name] in (clones.FRACTURED,
                                            clones.REVERSE_SYNCING) and \
                not any(self.states[n] in clones.MIRRORED for n in NAMES
                        if n != name)
        else:
            allowed = self.states[name] in (clones.OUT_OF_SYNC,
                                            clones.FRACTURED)
        start = self.group.start_reverse_sync if reverse \
            else self.group.start_sync
        if self._try_start(lambda: start(name, run=False), allowed, busy):
            if reverse:
                self.states[name] = clones.REVERSE_SYNCING
                self.S = bytearray(self.C[name])
            else:
                self.states[name] = clones.SYNCING
                self.C[name] = bytearray(self.S)

    @rule(name=st.sampled_from(NAMES))
    def sync_then_fracture(self, name):
        """A composite of the primitive rules (start, steps to the end,
        fracture) so that restores of fractured clones are reached often."""
        if self.engine is not None or self.states[name] not in (
                clones.OUT_OF_SYNC, clones.FRACTURED):
            return
        self._start(name, reverse=False)
        for _ in range(3 * EXTENTS):
            if self.engine is None:
                break
            self.engine_steps(4)
        if self.states[name] == clones.SYNCHRONIZED:
            self.fracture(name)

    @rule(name=st.sampled_from(NAMES))
    def start_sync(self, name):
        self._start(name, reverse=False)

    @rule(name=st.sampled_from(NAMES))
    def start_reverse_sync(self, name):
        self._start(name, reverse=True)

    @precondition(lambda self: self.engine is not None)
    @rule(steps=st.integers(1, 4))
    def engine_steps(self, steps):
        eng = self.engine
        for _ in range(steps):
            ok, more = self.attempt(eng.step)
            if not ok:
                return
            if not more:
                ok, done = self.attempt(eng.finish)
                if ok and done:
                    self.states[eng.clone.name] = clones.FRACTURED \
                        if eng.restore else clones.SYNCHRONIZED
                    if eng.restore:
                        self.unflushed.clear()
                    self.engine = None
                    nxt = self.group.resume(run=False)
                    if nxt is not None:
                        self.engine = self.group.engine
                        self.engine.chunk = 3
                return

    @precondition(lambda self: self.engine is not None)
    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(1, 2 * GRAN),
          seed=st.integers(0, 1 << 30))
    def engine_step_with_colliding_write(self, offset, length, seed):
        """A host write lands between the engine's read and its write."""
        if self._restoring():
            return  # restore copies are exclusive: see the scenario tests
        eng = self.engine
        delta = eng.clone.delta
        s = delta.find(1, eng.cursor)
        if s < 0:
            s = delta.find(1)
        if s < 0:
            return
        offset = s * GRAN + offset % (3 * GRAN)
        length = min(length, SIZE - offset)
        if length <= 0:
            return
        data = data_for(seed, length)
        hooked = []

        def hook(engine, s_, e_):
            if not hooked:
                hooked.append(True)
                self.lu.write(data, offset)
                # Acknowledged: in the model before anything else can
                # crash (a power cut in the rest of the step may take it
                # away again, see test_powerloss).
                self.S[offset:offset + length] = data
                for n in NAMES:
                    if self.states[n] in clones.MIRRORED:
                        self.C[n][offset:offset + length] = data

        self.group.copy_hook = hook
        try:
            self.attempt(eng.step, touched=(offset, offset + length))
        finally:
            self.group.copy_hook = None

    # ------------------------------------------------------------ invariants

    @invariant()
    def source_content_matches_model(self):
        """What a host read of the Source returns, derived from the
        backends and maps without reading through the target (a read
        during a restore copies on demand and would change the state)."""
        if self.group is None:
            return
        shown = bytearray(self.mem_src.data)
        for n in NAMES:
            c = self.group.clones[n]
            if c.state == clones.REVERSE_SYNCING or \
                    c is self.group.restoring:
                for e in range(EXTENTS):
                    if c.delta[e] and not (c is self.group.restoring and
                                           self.group.prm[e]):
                        a, b = e * GRAN, (e + 1) * GRAN
                        shown[a:b] = self.mem_clones[n].data[a:b]
        assert shown == self.S, "the Source shows other data than the " \
            "model at extents {}".format(
                [e for e in range(EXTENTS) if shown[e * GRAN:(e + 1) * GRAN]
                 != self.S[e * GRAN:(e + 1) * GRAN]])

    @invariant()
    def clean_extents_are_equal(self):
        if self.group is None:
            return
        src = self.mem_src.data
        for n in NAMES:
            delta = self.group.clones[n].delta
            if self.group.clones[n] is self.group.restoring:
                delta = bytes(a | b for a, b in zip(delta, self.group.prm))
            cl = self.mem_clones[n].data
            for e in range(EXTENTS):
                if not delta[e]:
                    a, b = e * GRAN, (e + 1) * GRAN
                    assert src[a:b] == cl[a:b], \
                        "clone {} extent {} differs but its bit is clear " \
                        "({})".format(n, e, self.states[n])

    @invariant()
    def fractured_clones_match_model(self):
        if self.group is None:
            return
        for n in NAMES:
            if self.states[n] in clones.EXPORTED:
                assert self.mem_clones[n].data == self.C[n]

    @invariant()
    def states_match(self):
        if self.group is None:
            return
        for n in NAMES:
            assert self.group.clones[n].state == self.states[n]
            assert self.persisted[n] == self.states[n]
