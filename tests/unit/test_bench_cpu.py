"""scripts/bench.py's MachineCpu: the whole machine's busy CPU over a span,
which every benchmark row prints beside its ratio."""

import importlib.util
import os
import threading
import time

import pytest

_BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "scripts",
                      "bench.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", _BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _spin(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_a_busy_span_counts_the_cpu_of_every_thread(bench):
    # Two spinning threads keep two cores' worth of work queued: the span
    # counts far more CPU than one idle sleep of the same length would.
    with bench.MachineCpu() as busy:
        spinners = [threading.Thread(target=_spin, args=(0.5,))
                    for _ in range(2)]
        for t in spinners:
            t.start()
        for t in spinners:
            t.join()
    assert busy.cpu_s >= 0.4, busy.cpu_s
    assert 0 < busy.busy <= 1.05
    # 1000 requests a second for the span's length: CPU per request.
    assert busy.us_per_request(1000, busy.wall_s) == pytest.approx(
        busy.cpu_s * 1e6 / (1000 * busy.wall_s))


def test_the_ratio_the_cpu_allows_is_the_base_cost_over_the_variant(bench):
    assert bench.cpu_bound_ratio(10.0, 20.0) == 0.5
