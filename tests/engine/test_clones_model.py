"""Model-based tests of the clone engine (target.clones): the state
machine and what it checks are in tests/support/clonemodel.py."""

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import rule

from target.clones import mirroring

from tests.support.clonemodel import GRAN, SIZE, CloneMachine
from tests.support.tiers import examples

CloneMachine.TestCase.settings = settings(
    max_examples=examples("CLONE_MODEL_EXAMPLES", 150, 40),
    stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestCloneModel = CloneMachine.TestCase


class DeferredLegsMachine(CloneMachine):
    """The same model with every mirrored write's legs deferred
    (target/clones/mirroring.py): the clones get what the Source holds, in
    every state and beside every engine.  A write returns once its legs
    landed, so the invariants see them; no crashes (a crash with a leg
    pending is in test_clones_deferred_legs.py)."""

    def __init__(self):
        super().__init__()
        self.saved_defer_min = mirroring.DEFER_MIN
        mirroring.DEFER_MIN = 1

    def teardown(self):
        mirroring.DEFER_MIN = self.saved_defer_min
        self.group.legs.close()
        super().teardown()

    @rule()
    def arm_crash(self):
        pass

    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(1, 3 * GRAN),
          seed=st.integers(0, 1 << 30), fua=st.booleans())
    def write_source(self, offset, length, seed, fua):
        CloneMachine.write_source(self, offset, length, seed, fua)
        self.group.legs.wait()


DeferredLegsMachine.TestCase.settings = settings(
    max_examples=examples("CLONE_MODEL_EXAMPLES", 100, 30),
    stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestDeferredLegsModel = DeferredLegsMachine.TestCase
