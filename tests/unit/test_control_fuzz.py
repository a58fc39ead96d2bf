"""Hypothesis fuzzing of the control protocol against a real Target.

Requests are random bytes, random JSON, or well-formed envelopes with the
real operation names (and some unknown ones) and arguments of every JSON
type.  Each must be answered with a reply object; a refusal carries a
clear error (a code other than the catch-all, a message, an errno) and
changes nothing: the inventory file and every clone's status are as before.
tests/unit/test_control.py covers the socket itself (sizes, framing,
concurrency); this covers what the operations do with what they are given.
"""

import json
import string

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from target import control, inventory, operations
from target.target import Target

MiB = 1 << 20

OPS = ["ping", "status", "clone_add", "clone_remove", "clone_list",
       "clone_status", "clone_sync", "clone_reverse_sync", "clone_fracture",
       "clone_restore", "lu_create", "", "clone_sync ", "__init__"]
ARGS = ["clone", "source", "name", "rate", "full", "file", "granularity",
        "size", "bogus"]
NAMES = ["a", "c", "nope", "", "a/../b", "c" * 300, "\x00", "..", "-x"]

json_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) |
                st.floats(allow_nan=False) | st.sampled_from(NAMES) |
                st.text(string.printable, max_size=20) |
                st.sampled_from(["1M", "0", "-1", "1e9", "64K", "3K", "1T"]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(
    inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                         max_size=3), max_leaves=6)
envelopes = st.fixed_dictionaries(
    {"op": st.sampled_from(OPS) | json_values},
    optional={"args": st.dictionaries(st.sampled_from(ARGS), json_values,
                                      max_size=4) | json_values})
lines = (st.binary(max_size=200) |
         json_values.map(lambda v: json.dumps(v).encode()) |
         envelopes.map(lambda v: json.dumps(v).encode()))


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory):
    sd = inventory.StateDir(str(tmp_path_factory.mktemp("fuzz") / "state"))
    inventory.create_lu(sd, "a", size=MiB)
    t = Target(sd.path)
    t.clone_add("a", "c")
    yield sd, t
    t.close()


def _settle(t):
    for group in t.groups.values():
        if group.engine is not None:
            group.engine.join(30)


def _fingerprint(sd, t):
    with open(sd.state_file, "rb") as f:
        inventory = f.read()
    clones = []
    for c in t.clone_list():
        c = dict(c)
        c.pop("operation", None)
        clones.append(c)
    return inventory, clones


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(line=lines)
def test_any_request_gets_a_clear_reply_and_refusals_change_nothing(
        fuzz_target, line):
    sd, t = fuzz_target
    _settle(t)
    before = _fingerprint(sd, t)
    reply = control.dispatch(line, operations.bind(t),
                             check=operations.check_arguments)
    json.dumps(reply)  # a reply can always be sent
    assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool)
    if reply["ok"]:
        return
    err = reply["error"]
    assert err["message"] and isinstance(err["errno"], int), err
    assert "internal error" not in err["message"], (line, err)
    _settle(t)
    assert _fingerprint(sd, t) == before, (line, err)
