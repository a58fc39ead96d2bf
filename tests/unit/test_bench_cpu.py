"""scripts/bench.py's MachineCpu: the whole machine's busy CPU over a span,
which every benchmark row prints beside its ratio."""

import importlib.util
import math
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
    # Spinning threads (about one core's worth under the GIL): the span
    # counts far more CPU than an idle sleep of the same length would.
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


def test_the_cpu_ceiling_is_every_core_at_the_variants_cost(bench):
    # 1000 µs a request keeps a core busy at 1000 requests a second.
    cores = os.cpu_count()
    assert bench.cpu_ceiling(500.0, 1000.0) == pytest.approx(cores * 2)
    assert math.isnan(bench.cpu_ceiling(0, 1000.0))
