"""Model-based tests of the clone engine (target.clones): the state
machine and what it checks are in tests/support/clonemodel.py."""

from hypothesis import HealthCheck, settings

from tests.support.clonemodel import CloneMachine
from tests.support.tiers import examples

CloneMachine.TestCase.settings = settings(
    max_examples=examples("CLONE_MODEL_EXAMPLES", 150, 40),
    stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestCloneModel = CloneMachine.TestCase
