"""The state table of a primary's replication link (target/replication/
link.py): every state is reachable, the flags the group and the record use
are read from the state, and a transition the table does not define is
refused and changes nothing."""

import types

import pytest

from target import errors
from target.replication import link as L


def make_link(**record):
    rec = {"secondary": "127.0.0.1:1", "mode": "async",
           "token_file": "/nonexistent"}
    rec.update(record)
    return L.Link(types.SimpleNamespace(name="g"), 0, rec)


def events():
    return sorted({event for _, event in L.TRANSITIONS})


def test_every_state_reachable_and_every_target_a_state():
    reached, todo = set(L.INITIAL), list(L.INITIAL)
    while todo:
        state = todo.pop()
        for (src, _), dst in L.TRANSITIONS.items():
            if src == state and dst not in reached:
                reached.add(dst)
                todo.append(dst)
    assert reached == set(L.STATES)
    assert len(L.STATES) == len(set(L.STATES))
    for (src, event), dst in L.TRANSITIONS.items():
        assert src in L.STATES and dst in L.STATES, (src, event, dst)


def test_status_and_holds_go_together():
    for status, holds in L.STATES:
        assert status in L.STATUSES and holds in L.HOLDS
        if status == L.DCM_LOGGING:
            assert holds == L.DCM
        if status == L.DCM_REPLAY:
            assert holds == L.SRL_DCM
        if status == L.REPLICATING:
            # A replay that broke off is replayed again, never streamed
            # on with its DCM set.
            assert holds == L.SRL


@pytest.mark.parametrize("state", L.STATES)
def test_flags_are_read_from_the_state(state):
    link = make_link()
    link.phase = state
    status, holds = state
    assert link.state == status
    assert link.attached == (status != L.DETACHED)
    assert link.holds_srl == (holds in (L.SRL, L.SRL_DCM))
    assert link.logging == (holds == L.DCM)
    assert link.dcm_active == (holds in (L.DCM, L.SRL_DCM))
    # The three combinations the record and the group rely on.
    assert (link.dcm_active, link.logging, link.holds_srl) in (
        (False, False, True), (True, True, False), (True, False, True))
    rec = link.record()
    assert (rec["attached"], rec["dcm_active"], rec["holds_srl"]) == (
        link.attached, link.dcm_active, link.holds_srl)


@pytest.mark.parametrize("record, state", [
    ({}, (L.CONNECTING, L.DCM)),
    ({"dcm_active": False, "holds_srl": True}, (L.CONNECTING, L.SRL)),
    ({"dcm_active": True, "holds_srl": True}, (L.CONNECTING, L.SRL_DCM)),
    ({"dcm_active": True, "holds_srl": False, "attached": False},
     (L.DETACHED, L.DCM)),
])
def test_initial_state_from_the_record(record, state):
    link = make_link(**record)
    assert link.phase == state and state in L.INITIAL
    # Saved and loaded again: the same state.
    again = make_link(**link.record())
    assert again.phase == state


@pytest.mark.parametrize("state", L.STATES)
def test_undefined_transitions_refused(state):
    link = make_link()
    refused = 0
    for event in events() + ["no-such-event"]:
        link.phase = state
        if (state, event) in L.TRANSITIONS:
            assert link.can(event)
            link.transition(event)
            assert link.phase == L.TRANSITIONS[(state, event)]
            continue
        assert not link.can(event)
        with pytest.raises(L.InvalidLinkTransition) as e:
            link.transition(event)
        assert isinstance(e.value, errors.Error)
        assert event in str(e.value) and state[0] in str(e.value)
        assert link.phase == state
        refused += 1
    assert refused >= 1


def test_specific_refusals():
    link = make_link(attached=False)
    for event in ("fail", "diverge", "stream", "await-replay", "replay",
                  "replayed"):
        assert not link.can(event), event
    link.transition("attach")
    # A replay completes only once it has joined the SRL stream.
    assert not link.can("replayed")
    # Streaming needs the SRL and a clear DCM; a logging link awaits its
    # replay.
    assert not link.can("stream")
    link.phase = (L.FAILED, L.SRL_DCM)
    assert not link.can("stream") and link.can("log")


def test_a_link_s_life():
    link = make_link()                        # a new link: all in the DCM
    steps = [("await-replay", L.DCM_LOGGING, L.DCM),
             ("replay", L.DCM_REPLAY, L.SRL_DCM),
             ("replayed", L.REPLICATING, L.SRL),
             ("log", L.DCM_LOGGING, L.DCM),    # the SRL overflowed
             ("await-replay", L.DCM_LOGGING, L.DCM),
             ("replay", L.DCM_REPLAY, L.SRL_DCM),
             ("fail", L.FAILED, L.SRL_DCM),    # connection lost mid-replay
             ("log", L.FAILED, L.DCM),
             ("detach", L.DETACHED, L.DCM),
             ("attach", L.CONNECTING, L.DCM),
             ("diverge", L.DIVERGED, L.DCM),
             ("attach", L.CONNECTING, L.DCM)]
    for event, status, holds in steps:
        link.transition(event)
        assert link.phase == (status, holds), event
