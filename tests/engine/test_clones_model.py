"""Model-based tests of the clone engine (target.clones): the state
machine and what it checks are in tests/support/clonemodel.py."""

import os

from hypothesis import HealthCheck, settings

from tests.support.clonemodel import CloneMachine

CloneMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("CLONE_MODEL_EXAMPLES", "150")),
    stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestCloneModel = CloneMachine.TestCase
