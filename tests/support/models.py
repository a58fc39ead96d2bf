"""Helpers for hypothesis state machines."""


def tolerate_timing_in_generation(case, attempts=3):
    """A hypothesis state machine's TestCase whose rules see timing (a link
    that has reconnected, an engine that has finished) may draw differently
    when hypothesis replays a prefix, and hypothesis then stops with
    FlakyStrategyDefinition: a fault of the search, not of the code under
    test.  Run the search again then (a fresh one); an invariant that
    fails still fails at once."""
    from hypothesis.errors import FlakyStrategyDefinition

    class Tolerant(case):
        def runTest(self):
            for attempt in range(attempts):
                try:
                    return super().runTest()
                except FlakyStrategyDefinition:
                    if attempt == attempts - 1:
                        raise
    Tolerant.__name__ = case.__name__
    Tolerant.__qualname__ = case.__qualname__
    return Tolerant
