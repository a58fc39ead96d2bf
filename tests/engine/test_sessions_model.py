"""Model-based tests of incremental copy sessions (target.sessions).

A hypothesis state machine drives one Source (memory backend behind the
session wrapper), a save area and two destinations with host writes and
zeroes, flushes, mark (with and without a frozen export), unmark, transfers
(incremental, full, full while unmarked) stepped one run at a time,
checkpoints, destination failures, and crashes at any backend or map
operation.  After every step it checks against a byte-level model:

- coverage: while unmarked, every extent where a
  destination differs from the Source is set in the tracking map or in that
  destination's pending map; while marked, every extent where a destination
  differs from the frozen image is pending for it, and every extent where
  the Source differs from the frozen image is tracked;
- the frozen image: while marked, reading it (as the transfer engine and
  the frozen export do) returns the model's point in time, for every
  extent still to send (every extent, with a frozen export);
- a destination recorded `consistent` holds exactly the point in time of
  its last completed transfer (3.4);
- `complete` runs a whole update (mark unless marked, transfer to the end)
  and then every destination equals the Source as it was at the mark: an
  unmark, a crash or a failed transfer never lost a change.

Crashes are a kill -9 (see test_clones_model): an exception at the N-th
backend or map operation, nobody catches it, the session is rebuilt from
the last persisted record and the map files.  Memory backends keep every
completed write, destinations too (they are other machines).  A host write
cut short is unacknowledged: the model takes what landed.

With `defer` the sessions' layer defers writes that wait for a save or an
activity mark (SessionLayer: acknowledged, then applied by its applier
thread); a rule writes a burst of them before they are applied.  A crash
in the applier is a kill -9 too: the writes not applied yet are lost (they
were acknowledged, never flushed), so the model takes what the Source
holds in every range of the burst.
"""

import random
import shutil
import tempfile
import threading

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant,
                                 rule)

from target import backends, changemap, maps, sessions

from tests.support.clonemodel import (Countdown, Crash, CrashingBackend,
                                      data_for, patch_map_io)
from tests.support.sessionfakes import FakeLU
from tests.support.tiers import examples

GRAN = 4096
EXTENTS = 16
SIZE = GRAN * EXTENTS
DESTS = 2


class CrashingDestination(sessions.MemoryDestination):
    """A remote destination: survives our crashes; each call can crash us
    (the engine dies between any two requests) or fail (network error)."""

    def __init__(self, mem, countdown):
        super().__init__(mem)
        self.countdown = countdown

    def _tick(self):
        self.countdown.tick()
        super()._tick()

    def flush(self, done):
        super().flush(done)
        self.backend.flushed_image = bytes(self.backend.data)


class KilledLayer(sessions.SessionLayer):
    """The sessions' layer, its applier held until settle() (so the
    operations the countdown counts come in one order); a crash in it
    stops it (a kill -9: no later queued write is applied) and is raised
    by settle()."""

    crash = None

    def __init__(self, inner, defer):
        super().__init__(inner, defer=defer)
        self.go = threading.Event()

    def _copy_batch(self, batch):
        self.go.wait()
        if self.crash is None:
            try:
                super()._copy_batch(batch)
            except Crash as e:
                self.crash = e

    def _apply(self, q):
        if self.crash is None:
            try:
                super()._apply(q)
            except Crash as e:
                self.crash = e

    def settle(self):
        """Apply what is queued; raise the applier's crash."""
        self.go.set()
        try:
            self.drain()
        finally:
            self.go.clear()
        if self.crash is not None:
            raise self.crash

    def kill(self):
        """Nothing queued is applied any more; the applier ends."""
        self.crash = self.crash or Crash()
        self.go.set()
        self.drain(stop=True)


class SessionMachine(RuleBasedStateMachine):

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="session-model-")
        self.countdown = Countdown()
        self.saved_globals = (changemap.REGION, changemap.COMMIT_INTERVAL,
                              sessions.transfer.CHECKPOINT_BYTES)
        # Small activity regions so recovery is not simply "everything".
        changemap.REGION = 4 * GRAN
        changemap.COMMIT_INTERVAL = 0
        sessions.transfer.CHECKPOINT_BYTES = 3 * GRAN
        self._patch_io()
        self.mem_src = backends.MemoryBackend(SIZE)
        # A new destination holds anything: never assume it is zeroed.
        self.mem_dests = []
        for i in range(DESTS):
            mem = backends.MemoryBackend(SIZE)
            mem.data[:] = random.Random(i).randbytes(SIZE)
            mem.flushed_image = bytes(mem.data)
            self.mem_dests.append(mem)
        self.record = None
        self.S = bytearray(SIZE)
        self.frozen = None
        self.engine_frozen = None
        self.last_image = [None] * DESTS
        self.engine = None
        self.session = None

    @initialize(save_slots=st.sampled_from([3, EXTENTS]),
                defer=st.booleans())
    def setup(self, save_slots, defer):
        """A save area that can fill (3 extents) or never does; writes
        deferred or not."""
        self.defer = defer
        index = sessions.SaveArea.minimum_size(EXTENTS, GRAN) - GRAN
        self.mem_save = backends.MemoryBackend(index + save_slots * GRAN)
        self.session = self._new_session(create=True)

    def _patch_io(self):
        self.orig = patch_map_io(self.countdown)

    def teardown(self):
        if self.session is not None:
            self.lu.backend.drain(stop=True)
        maps.save, maps.ActivityFile.persist, maps.ActivityFile.reset = \
            self.orig
        (changemap.REGION, changemap.COMMIT_INTERVAL,
         sessions.transfer.CHECKPOINT_BYTES) = self.saved_globals
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------ plumbing

    def _persist(self, record):
        self.countdown.tick()
        self.record = {k: v for k, v in record.items()}
        self.record["dests"] = [dict(d) for d in record["dests"]]

    def _new_session(self, create=False):
        wrapper = KilledLayer(CrashingBackend(self.mem_src, self.countdown),
                              defer=self.defer)
        self.lu = FakeLU(wrapper, SIZE)
        save = CrashingBackend(self.mem_save, self.countdown)
        if create:
            records = [{"uri": "mem{}".format(i)} for i in range(DESTS)]
            rec = {"marked": False, "export": False, "error": None}
        else:
            records, rec = self.record["dests"], self.record
        s = sessions.Session(
            "s", self.lu, GRAN, self.dir, save, records, persist=self._persist,
            marked=rec["marked"], export=rec["export"], error=rec["error"])
        if create:
            s.create()
            self._persist(s.record())
        else:
            s.load()
        wrapper.add(s)
        return s

    def _clients(self):
        return {i: CrashingDestination(self.mem_dests[i], self.countdown)
                for i in range(DESTS)}

    def crashed(self, touched=()):
        self.countdown.left = None
        # Nothing of the killed process runs on.
        self.lu.backend.kill()
        if self.engine is not None and not self.engine.unmarked:
            # The transfer may have recorded some destinations consistent
            # just before the crash: they must hold its point in time.
            for i, rec in enumerate(self.record["dests"]):
                if rec["consistency"] == sessions.CONSISTENT and \
                        i in self.engine.clients:
                    self.last_image[i] = self.engine_frozen
        self.engine = None
        self.session = self._new_session()
        for s, e in touched:
            self.S[s:e] = self.mem_src.data[s:e]
        self._sync_mark()

    def attempt(self, func, touched=()):
        try:
            return True, func()
        except Crash:
            self.crashed(touched)
            return False, None

    def _sync_mark(self):
        """Follow the session when it unmarked itself (save area full,
        transfer done, or a mark/unmark cut by a crash)."""
        if not self.session.marked:
            self.frozen = None
        elif self.frozen is None:
            # A mark whose record was persisted just before a crash: the
            # writes were quiesced, so the point in time is the Source now.
            self.frozen = bytes(self.S)

    def _engine_done(self):
        if self.engine is not None and self.engine.result is not None:
            self._after_engine(self.engine)
            self.engine = None

    def _after_engine(self, engine, engine_frozen=None):
        engine_frozen = engine_frozen or self.engine_frozen
        if not engine.unmarked:
            # A destination that did not fail got the whole point in time,
            # even when another one failed.
            for i in engine.completed:
                self.last_image[i] = engine_frozen
        self._sync_mark()

    # ------------------------------------------------------------ rules

    @rule(n=st.integers(0, 40))
    def arm_crash(self, n):
        self.countdown.left = n

    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(1, 3 * GRAN),
          seed=st.integers(0, 1 << 30))
    def write(self, offset, length, seed):
        length = min(length, SIZE - offset)
        data = data_for(seed, length)
        ok, _ = self.attempt(lambda: self._write([(offset, data)]),
                             touched=[(offset, offset + length)])
        if ok:
            self.S[offset:offset + length] = data
            self._sync_mark()

    def _write(self, writes):
        for offset, data in writes:
            self.lu.backend.write(data, offset)
        self.lu.backend.settle()

    @rule(writes=st.lists(st.tuples(st.integers(0, SIZE - 1),
                                    st.integers(1, 2 * GRAN),
                                    st.integers(0, 1 << 30)),
                          min_size=2, max_size=5))
    def write_burst(self, writes):
        """Writes one after another, then applied (deferred, they share
        the save area's flushes)."""
        writes = [(offset, data_for(seed, min(length, SIZE - offset)))
                  for offset, length, seed in writes]
        ok, _ = self.attempt(lambda: self._write(writes), touched=[
            (offset, offset + len(data)) for offset, data in writes])
        if ok:
            for offset, data in writes:
                self.S[offset:offset + len(data)] = data
            self._sync_mark()

    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(1, 3 * GRAN))
    def zero(self, offset, length):
        length = min(length, SIZE - offset)
        ok, _ = self.attempt(lambda: self.lu.backend.zero(offset, length),
                             touched=[(offset, offset + length)])
        if ok:
            self.S[offset:offset + length] = bytes(length)
            self._sync_mark()

    @rule()
    def flush(self):
        self.attempt(self.lu.backend.flush)

    @rule(export=st.booleans(), full=st.booleans())
    def mark(self, export, full):
        if self.session.marked or self.engine is not None:
            return
        ok, _ = self.attempt(lambda: self.session.mark(export=export,
                                                       full=full))
        if ok:
            self.frozen = bytes(self.S)
        self._sync_mark()

    @rule()
    def unmark(self):
        if not self.session.marked or self.engine is not None:
            return
        self.attempt(self.session.unmark)
        self._sync_mark()

    @rule(full=st.booleans(), unmarked=st.booleans())
    def start_transfer(self, full, unmarked):
        if self.engine is not None:
            return
        if unmarked and (self.session.marked or not full):
            return
        if not unmarked and not self.session.marked:
            return
        if full and not unmarked and self.session.transfer.count(0) \
                and not self.session.export:
            with pytest.raises(sessions.SessionError):
                self.session.start_transfer(self._clients(), full=True,
                                            run=False)
            return
        ok, engine = self.attempt(lambda: self.session.start_transfer(
            self._clients(), full=full, unmarked=unmarked, run=False))
        if ok:
            self.engine = engine
            self.engine_frozen = self.frozen

    @rule(steps=st.integers(1, 4))
    def step(self, steps):
        if self.engine is None:
            return
        engine = self.engine

        ok, _ = self.attempt(lambda: engine.advance(steps))
        if ok:
            self._engine_done()

    @rule()
    def checkpoint(self):
        if self.engine is None:
            return
        try:
            self.attempt(self.engine.checkpoint)
        except sessions.FrozenImageGone:
            # What advance() does when a checkpoint finds the session
            # unmarked (the save area filled up meanwhile).
            self.engine.abort("unmarked")
            self.engine = None

    @rule(dest=st.integers(0, DESTS - 1), after=st.integers(0, 6))
    def fail_destination(self, dest, after):
        if self.engine is not None:
            client = self.engine.clients[dest]
            # A failure already due (a connection a power loss dropped)
            # stays due: a dropped connection serves no later request.
            if client.fail_after is None or client.fail_after > after:
                client.fail_after = after

    @rule(dest=st.integers(0, DESTS - 1))
    def destination_power_loss(self, dest):
        """A destination loses what it had not flushed (its connection
        drops too, so a running transfer fails for it)."""
        mem = self.mem_dests[dest]
        mem.data[:] = mem.flushed_image
        if self.engine is not None:
            self.engine.clients[dest].fail_after = 0

    @rule()
    def abort_transfer(self):
        """The transfer thread stops (unmark --force, target stopping)."""
        if self.engine is not None:
            engine = self.engine
            ok, _ = self.attempt(lambda: engine.abort("stopped"))
            self.engine = None
            self._sync_mark()

    @rule()
    def complete(self):
        """A whole update with nothing going wrong: the destinations must
        then equal the Source at the mark."""
        self.countdown.left = None
        if self.engine is not None:
            self.engine.abort("replaced")
            self.engine = None
        if not self.session.marked:
            self.session.mark()
            self.frozen = bytes(self.S)
        frozen = self.frozen
        engine = self.session.start_transfer(self._clients(), run=False)
        engine.advance()
        assert engine.result == "completed", engine.result
        self._after_engine(engine, frozen)
        for i in range(DESTS):
            assert bytes(self.mem_dests[i].data) == frozen, \
                "destination {} differs from the marked image".format(i)
        assert not self.session.marked

    # ------------------------------------------------------------ checks

    @invariant()
    def source_matches_model(self):
        if self.session is None:
            return
        assert bytes(self.mem_src.data) == bytes(self.S)

    @invariant()
    def maps_cover_divergence(self):
        if self.session is None:
            return
        s = self.session
        for i, d in enumerate(s.dests):
            dest = self.mem_dests[i].data
            ref = self.frozen if s.marked else self.S
            for x in range(EXTENTS):
                a, b = x * GRAN, (x + 1) * GRAN
                if dest[a:b] != ref[a:b]:
                    covered = d.pending[x] or d.needs_full or \
                        (not s.marked and s.tracking.bits[x])
                    assert covered, "destination {} extent {} differs and " \
                        "no map says so".format(i, x)
        if s.marked:
            for x in range(EXTENTS):
                a, b = x * GRAN, (x + 1) * GRAN
                if self.S[a:b] != self.frozen[a:b]:
                    assert s.tracking.bits[x], \
                        "Source extent {} changed since the mark, not " \
                        "tracked".format(x)

    @invariant()
    def frozen_image_readable(self):
        if self.session is None:
            return
        s = self.session
        if not s.marked:
            return
        self.countdown.left, armed = None, self.countdown.left
        try:
            for x in range(EXTENTS):
                if not (s.export or s.transfer[x]):
                    continue
                buf = bytearray(GRAN)
                s.read_frozen(buf, x * GRAN)
                assert bytes(buf) == self.frozen[x * GRAN:(x + 1) * GRAN], \
                    "frozen image extent {} is not the point in time".format(x)
        finally:
            self.countdown.left = armed

    @invariant()
    def consistent_means_equal(self):
        if self.session is None:
            return
        for i, d in enumerate(self.session.dests):
            if d.consistency == sessions.CONSISTENT and not d.transferring:
                assert self.last_image[i] is not None
                assert bytes(self.mem_dests[i].data) == self.last_image[i], \
                    "destination {} is recorded consistent but is not its " \
                    "last point in time".format(i)

    @invariant()
    def record_matches(self):
        if self.session is None:
            return
        assert self.record["marked"] == self.session.marked


SessionMachine.TestCase.settings = settings(
    max_examples=examples("SESSION_MODEL_EXAMPLES", 150, 40),
    stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestSessionModel = SessionMachine.TestCase
