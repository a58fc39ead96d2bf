"""Plugin: the fast tier and its guards.

The fast tier is tests/unit and tests/engine (`scripts/test --fast`): code
of this repository run in the test process, with memory or file backends
and in-process Targets; no `clonectl serve`, no nbdkit, no other NBD
server.  Everything else (tests/system, tests/guest) runs servers and
outside tools.  So that a slow test cannot join the fast tier unnoticed:
- a fast-tier test that starts nbdkit, qemu-nbd, QEMU or `clonectl serve`
  fails (an audit hook sees every subprocess it starts);
- a fast-tier test must not be marked slow or guest, and runs with a
  timeout of FAST_TEST_TIMEOUT seconds;
- the time of the fast tests is printed at the end of every run: their
  own time in a run of one process, the run's wall time in a run of the
  fast tier alone (`scripts/test --fast` spreads it over one pytest-xdist
  worker per core: the budget is for the wait, not the CPU).
A run of the fast tier alone (only paths under tests/unit and tests/engine,
as `scripts/test --fast`) runs the hypothesis models with fewer examples
(`examples`); the default suite, and any run given other paths, runs them
with their full count.
"""

import os
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
FAST_DIRS = (TESTS / "unit", TESTS / "engine")
FAST_BUDGET = 120.0       # seconds, the whole tier on a 2-core machine
FAST_TEST_TIMEOUT = 60    # seconds, one test
# Programs a fast-tier test must not start: servers and emulators.
SERVER_PROGRAMS = ("nbdkit", "qemu-nbd", "qemu-system-x86_64", "tgtd")

_current = {"fast": False, "name": None}
_spent = {"fast": 0.0, "count": 0}
# fast_only: set at configure, before any test import; start: the run's.
_run = {"fast_only": False, "start": time.monotonic()}


def is_fast(path):
    path = Path(str(path)).resolve()
    return any(d == path or d in path.parents for d in FAST_DIRS)


def examples(variable, full, fast):
    """How many examples a model runs: the environment's `variable` if
    set, else `fast` in a run of the fast tier alone, else `full`."""
    if os.environ.get(variable):
        return int(os.environ[variable])
    return fast if _run["fast_only"] else full


def pytest_configure(config):
    paths = [Path(config.invocation_params.dir, a.split("::")[0])
             for a in config.args]
    _run["fast_only"] = bool(paths) and all(is_fast(p) for p in paths)


def _server_in(args):
    """The reason args start a server, or None."""
    if isinstance(args, (str, bytes)):
        args = os.fsdecode(args).split()
    elif isinstance(args, os.PathLike):
        args = [args]
    args = [os.fsdecode(a) for a in args]
    if not args:
        return None
    names = [os.path.basename(a) for a in args]
    for program in SERVER_PROGRAMS:
        if program in names:
            return program
    if any(n == "clonectl" for n in names) and "serve" in args:
        return "clonectl serve"
    return None


def _audit(event, args):
    if event == "subprocess.Popen" and _current["fast"]:
        what = _server_in(args[1] if args[1] is not None else [args[0]])
        if what is not None:
            raise RuntimeError(
                "{} starts {}: a fast-tier test (tests/unit, tests/engine) "
                "starts no server; move it to tests/system".format(
                    _current["name"], what))


sys.addaudithook(_audit)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not is_fast(item.path):
            continue
        for mark in ("slow", "guest"):
            if item.get_closest_marker(mark) is not None:
                raise pytest.UsageError(
                    "{} is marked {} but is in the fast tier "
                    "(tests/unit, tests/engine); move it to tests/system"
                    .format(item.nodeid, mark))
        item.add_marker(pytest.mark.fast)
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(FAST_TEST_TIMEOUT))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    fast = is_fast(item.path)
    _current.update(fast=fast, name=item.nodeid)
    t0 = time.monotonic()
    try:
        yield
    finally:
        _current.update(fast=False, name=None)
        if fast:
            _spent["fast"] += time.monotonic() - t0


def pytest_runtest_logreport(report):
    # Where the tests' reports arrive: this process, or the controller of
    # pytest-xdist's workers.
    if report.when == "call" and \
            is_fast(TESTS.parent / report.nodeid.split("::")[0]):
        _spent["count"] += 1


def pytest_terminal_summary(terminalreporter):
    if not _spent["count"]:
        return
    took = time.monotonic() - _run["start"] if _run["fast_only"] \
        else _spent["fast"]
    line = "fast tier: {} tests in {:.1f} s (budget {:.0f} s{})".format(
        _spent["count"], took, FAST_BUDGET,
        "" if _run["fast_only"] else
        " for the fast tier alone; this run's models ran every example")
    over = _run["fast_only"] and took > FAST_BUDGET
    terminalreporter.write_sep("-", line + (": OVER BUDGET" if over else ""),
                               red=over, green=not over)
