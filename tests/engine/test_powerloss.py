"""The clone engine's map-persistence rules against power loss.

PowerLossMachine is the model test's CloneMachine (tests/engine/
test_clones_model.py: same rules, same byte-level model, same invariants)
with every backend and every map file on a simulated disk
(tests/support/powerloss.py) that, on a power cut, keeps an arbitrary subset
of the writes not yet synced.  A crash can now also be a power cut: at an
armed operation or between two rules, the process dies and each file keeps
only its durable bytes plus some of its unsynced blocks.

What the model allows a power cut to take: host writes not yet made durable
(NBD: an acknowledged write not followed by a flush, FUA or commit may be
lost); the model adopts what is on disk for those extents.  Everything else
is checked by the CloneMachine invariants after recovery:

- flushed host writes are still shown by the Source;
- an extent whose Delta Map bit is clear is identical on Source and clone,
  whatever subset of unsynced blocks survived;
- fractured and restoring clones hold the model's bytes.

Two rules reach the commit windows that only a power cut can exploit (the
test is single-threaded, so they stand in for a second thread):
commit_racing runs a host write or an engine step after a commit has
flushed the backends and before it saves the maps; write_spanning_commit
runs a commit between the two halves of a mirrored write.
arm_cut_after_prm_save cuts the power just after the next PRM save.

During a protected restore the model is stricter than "the cut may take
unflushed writes": an extent written since the last flush must show, byte
by byte, what it held before (the clone's data or a flushed host write) or
one of those writes, and a copy on demand is the restore's write, not the
host's, so a cut may not take it unnoticed.

The protections, each with a twin below that switches it off and must be
caught: flush_before_commit (a commit flushes every backend before saving
clean bits), keep_recent_in_activity (a commit's new activity map keeps the
extents written since it began and those in flight), the fdatasync of the
activity map's write-ahead, the fdatasync of the PRM at every flush
(a flushed host write must survive a resumed protected restore), and the
Source flush before each PRM save (flush_before_prm: a bit must not be
durable before the copy on demand it vouches for).
"""

import os
import re

import pytest
import hypothesis.strategies as st
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import rule, run_state_machine_as_test

from target import clones, maps

from tests.support import powerloss
from tests.support.tiers import examples
from tests.support.clonemodel import (GRAN, NAMES, SIZE, CloneMachine, Crash,
                                      data_for)

KEEP = st.sampled_from((0.0, 0.3, 0.7, 1.0))
CUT_SEED = st.integers(0, 1 << 30)


class PowerLossMachine(CloneMachine):

    # Protections switched off (names of CloneGroup switches, or
    # "activity_datasync" / "prm_datasync" for the fdatasync of the
    # activity map's write-ahead / of the PRM at flush): for the twins.
    protections_off = ()

    def __init__(self):
        super().__init__()
        self.mem_src = powerloss.SimFile(bytes(SIZE))
        self.mem_clones = {n: powerloss.SimFile(bytes(SIZE)) for n in NAMES}
        self.disk = powerloss.SimDisk()
        self.saved_files = maps.files
        maps.files = self.disk
        self.host_depth = 0
        self.cut = None

    def teardown(self):
        maps.files = self.saved_files
        super().teardown()

    # ------------------------------------------------------------ plumbing

    def _wrap(self, mem):
        return powerloss.PowerLossBackend(
            mem, self.countdown, lambda: self.host_depth > 0, GRAN)

    def _host(self, func):
        def host_request(*a, **kw):
            self.host_depth += 1
            try:
                return func(*a, **kw)
            finally:
                self.host_depth -= 1
        return host_request

    def _not_host(self, func):
        def engine_request(*a, **kw):
            depth, self.host_depth = self.host_depth, 0
            try:
                return func(*a, **kw)
            finally:
                self.host_depth = depth
        return engine_request

    def _new_group(self):
        lu, group = super()._new_group()
        # Mark host requests, so the backends know which writes a power
        # cut may take away (see powerloss.SimFile.host_unsynced).
        group.source_write = self._host(group.source_write)
        group.source_zero = self._host(group.source_zero)
        group.clone_write = self._host(group.clone_write)
        # A copy on demand runs in the host's request but copies for the
        # restore: a cut may not take it away unnoticed.
        group._copy_claimed = self._not_host(group._copy_claimed)
        for name in self.protections_off:
            if name == "activity_datasync":
                group.activity_file.sync_writes = False
            elif name == "prm_datasync":
                group.prm_file.sync_writes = False
            else:
                assert hasattr(group, name), name
                setattr(group, name, False)
        return lu, group

    def crashed(self, touched=None, source_touched=True):
        cut, self.cut = self.cut, None
        lost = {}
        if cut is not None:
            seed, keep = cut
            rng = powerloss.cut_rng(seed)
            # Unflushed host writes a cut may take away, and what the
            # Source shows then (a reverse sync shows the clone's): the
            # ones written during a restore are recorded with what they
            # may leave.  Writes to a clone's export never change what the
            # Source shows, the restoring clone's included.
            shows = set(self.mem_src.host_unsynced)
            for n in NAMES:
                lost[n] = set(self.mem_clones[n].host_unsynced)
                if self.states[n] not in clones.EXPORTED:
                    shows |= lost[n]
            for e in shows:
                self.unflushed.setdefault(e, None)
            self.mem_src.power_cut(rng, keep)
            for n in NAMES:
                self.mem_clones[n].power_cut(rng, keep)
            self.disk.power_cut(rng, keep)
        self.disk.before_replace = None
        self.disk.after_datasync = None
        super().crashed(touched, source_touched)
        for n, extents in lost.items():
            if self.states[n] in clones.EXPORTED:
                for e in extents:
                    a, b = e * GRAN, (e + 1) * GRAN
                    self.C[n][a:b] = self.mem_clones[n].data[a:b]

    def _raw_source_write(self, offset, data):
        """A host write with its model update, no crash handling (for
        hooks: a crash propagates to the caller's attempt)."""
        if self._restoring():
            self._unflushed_write(offset, data)
        self.lu.write(data, offset)
        self.S[offset:offset + len(data)] = data
        for n in NAMES:
            if self.states[n] in clones.MIRRORED:
                self.C[n][offset:offset + len(data)] = data

    # ------------------------------------------------------------ rules

    @rule(n=st.integers(0, 60), seed=CUT_SEED, keep=KEEP)
    def arm_power_cut(self, n, seed, keep):
        self.countdown.left = n
        self.cut = (seed, keep)

    @rule(seed=CUT_SEED, keep=KEEP)
    def power_cut_now(self, seed, keep):
        self.cut = (seed, keep)
        self.crashed()

    @rule(seed=CUT_SEED, keep=KEEP)
    def arm_cut_after_prm_save(self, seed, keep):
        """The power fails just after the next PRM save: the Source data
        its new bits vouch for must be durable already."""
        def cut():
            self.cut = (seed, keep)
            raise Crash()
        self.disk.after_datasync = (".prm", cut)

    @rule(step=st.booleans(), offset=st.integers(0, SIZE - 1),
          length=st.integers(1, 3 * GRAN), seed=st.integers(0, 1 << 30))
    def commit_racing(self, step, offset, length, seed):
        """A host write (or an engine step) after the commit flushed the
        backends, before it saves the maps."""
        length = min(length, SIZE - offset)
        data = data_for(seed, length)
        engine = self.engine

        def during():
            if step and engine is not None:
                engine.step()
            else:
                self._raw_source_write(offset, data)

        self.disk.before_replace = (NAMES[0] + ".delta", during)
        ok, _ = self.attempt(self.group.commit,
                             touched=(offset, offset + length))
        self.disk.before_replace = None

    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(1, 3 * GRAN),
          seed=st.integers(0, 1 << 30))
    def write_spanning_commit(self, offset, length, seed):
        """A commit runs after the Source half of a mirrored write landed
        and before the clone half (another thread's flush, in real life)."""
        length = min(length, SIZE - offset)
        data = data_for(seed, length)
        self.group.source.backend.after_write = self.group.commit
        try:
            self.attempt(lambda: self._raw_source_write(offset, data),
                         touched=(offset, offset + length))
        finally:
            if self.group is not None:
                self.group.source.backend.after_write = None


def _settings(examples, **kw):
    return settings(max_examples=examples, stateful_step_count=40,
                    deadline=None,
                    suppress_health_check=[HealthCheck.too_slow], **kw)


PowerLossMachine.TestCase.settings = _settings(
    examples("CLONE_MODEL_EXAMPLES", 150, 40))
TestPowerLoss = PowerLossMachine.TestCase


# Twins: each protection switched off must be caught by the invariants.
# Derandomized and without shrinking, so the search is the same on every run
# and stops at the first failure (see the test for the fallback).
TWIN_EXAMPLES = int(os.environ.get("POWERLOSS_TWIN_EXAMPLES", "600"))


@pytest.mark.parametrize("protection", ["flush_before_commit",
                                        "keep_recent_in_activity",
                                        "activity_datasync"])
# flush_before_prm and prm_datasync are pinned by the deterministic twins
# below: the random search reaches a cut between a PRM save and the copies
# it vouches for too rarely to be relied on (missed in 4 searches of 600
# examples), and a cut after a flush during a restore only after hundreds
# of examples (about 25 s).
def test_protection_off_is_caught(protection):
    machine = _with(False, protection)
    # The derandomized search first; two loaded CI runs missed a twin
    # there (an interleaving this test does not control), so up to three
    # random searches follow.  The protection counts as pinned if any
    # search catches it; none catching fails the test.
    for attempt in range(4):
        try:
            run_state_machine_as_test(machine, settings=_settings(
                TWIN_EXAMPLES, derandomize=(attempt == 0), database=None,
                phases=[Phase.generate]))
        except AssertionError as e:
            assert re.search("differs but its bit is clear|the Source shows "
                             "other data", str(e)), e
            return
    pytest.fail("switching off {} was not caught in 4 searches of {} "
                "examples".format(protection, TWIN_EXAMPLES))


# A copy on demand writes the clone's data to the Source; the PRM bit set
# after it says "never copy again".  The power fails just after the PRM is
# saved: the copy must be on disk, or the extent keeps the Source's
# pre-restore bytes for ever.

def _restoring_machine(machine=PowerLossMachine):
    """c1 restoring, with extents 0-3 pending (Source and clone differ)."""
    m = machine()
    m.setup()
    m.write_source(0, 4 * GRAN, 11, False)
    m.sync_then_fracture("c1")
    m.write_source(0, 4 * GRAN, 12, False)  # the pre-restore bytes
    m.flush()
    m.start_restore("c1", False)
    assert m.states["c1"] == clones.RESTORING
    assert m.group.pending_restore() == 4
    return m


def _clone_export_write(m):
    m.write_clone_export("c1", GRAN + 100, 512, 13)


def _flushed_source_write(m):
    m.write_source(2 * GRAN + 100, 512, 14, False)
    m.flush()


def _fua_source_write(m):
    m.write_source(2 * GRAN + 100, 512, 14, True)


def _source_write_racing_commit(m):
    m.commit_racing(False, 3 * GRAN + 100, 512, 15)


def _check_invariants(m):
    m.source_content_matches_model()
    m.clean_extents_are_equal()
    m.fractured_clones_match_model()
    m.states_match()


def _with(on, protection):
    """PowerLossMachine, or its twin with protection switched off."""
    if on:
        return PowerLossMachine
    return type("Without_" + protection, (PowerLossMachine,),
                {"protections_off": (protection,)})


def _restore_to_the_end(m):
    """The restore goes on after the cut: every extent holds the clone's
    data or a host write at every step, and it ends fractured."""
    _check_invariants(m)
    while m.engine is not None:
        m.engine_steps(4)
        _check_invariants(m)
    assert m.states["c1"] == clones.FRACTURED


@pytest.mark.parametrize("request_", [_clone_export_write,
                                      _flushed_source_write,
                                      _fua_source_write,
                                      _source_write_racing_commit])
@pytest.mark.parametrize("flush_first", [True, False])
def test_prm_saved_after_the_copies_it_vouches_for(request_, flush_first):
    m = _restoring_machine(_with(flush_first, "flush_before_prm"))
    try:
        m.arm_cut_after_prm_save(1, 0.0)
        if flush_first:
            request_(m)
            assert m.group.restoring is not None, "no cut?"
            _restore_to_the_end(m)
        else:
            with pytest.raises(AssertionError, match="the Source shows "
                               "other data"):
                request_(m)
                m.source_content_matches_model()
    finally:
        m.teardown()


# The PRM is made durable at every flush and FUA write: a host write made
# durable during a restore has its PRM bit on disk, or after a power cut
# the next read's copy on demand (or the resumed restore) puts the clone's
# data over it.

@pytest.mark.parametrize("request_", [_flushed_source_write,
                                      _fua_source_write])
@pytest.mark.parametrize("datasync", [True, False])
def test_a_durable_write_during_a_restore_survives_a_power_cut(request_,
                                                             datasync):
    m = _restoring_machine(_with(datasync, "prm_datasync"))
    try:
        request_(m)  # extent 2, one of the four still to restore
        # Nothing unsynced survives: only what the request made durable.
        m.power_cut_now(1, 0.0)
        if not datasync:
            with pytest.raises(AssertionError, match=r"the Source shows "
                               r"other data than the model at extents \[2\]"):
                m.source_content_matches_model()
            return
        _restore_to_the_end(m)
    finally:
        m.teardown()
