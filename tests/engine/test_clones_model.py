"""Model-based tests of the clone engine (target.clones): the state
machine and what it checks are in tests/support/clonemodel.py."""

from hypothesis import HealthCheck, settings
from hypothesis.stateful import invariant, rule

from target.clones import mirroring

from tests.support.clonemodel import EXTENTS, GRAN, NAMES, CloneMachine
from tests.support.tiers import examples

CloneMachine.TestCase.settings = settings(
    max_examples=examples("CLONE_MODEL_EXAMPLES", 150, 40),
    stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestCloneModel = CloneMachine.TestCase


class DeferredLegsMachine(CloneMachine):
    """The same model with every mirrored write's legs deferred
    (target/clones/mirroring.py): the clones get what the Source holds, in
    every state and beside every engine, while the rules go on.  A clean
    extent equals the Source once no write of it is in flight (a deferred
    one stays in flight until its legs are done).  No crashes: a crash
    with a leg pending is in test_clones_deferred_legs.py."""

    def __init__(self):
        super().__init__()
        self.saved_defer_min = mirroring.DEFER_MIN
        mirroring.DEFER_MIN = 1

    def teardown(self):
        mirroring.DEFER_MIN = self.saved_defer_min
        if self.group is not None:
            self.group.legs.close()
        super().teardown()

    @rule()
    def arm_crash(self):
        pass

    @invariant()
    def clean_extents_are_equal(self):
        if self.group is None:
            return
        with self.group.cond:
            busy = bytearray(EXTENTS)
            for e0, e1 in self.group.changes.in_flight.values():
                busy[e0:e1] = b"\x01" * (e1 - e0)
            src = self.mem_src.data
            for n in NAMES:
                delta = self.group.clones[n].delta
                if self.group.clones[n] is self.group.restoring:
                    delta = bytes(a | b for a, b in zip(delta,
                                                        self.group.prm))
                cl = self.mem_clones[n].data
                for e in range(EXTENTS):
                    a, b = e * GRAN, (e + 1) * GRAN
                    assert delta[e] or busy[e] or src[a:b] == cl[a:b], \
                        "clone {} extent {} differs but its bit is clear " \
                        "and no write of it is in flight ({})".format(
                            n, e, self.states[n])


DeferredLegsMachine.TestCase.settings = settings(
    max_examples=examples("CLONE_MODEL_EXAMPLES", 100, 30),
    stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestDeferredLegsModel = DeferredLegsMachine.TestCase
