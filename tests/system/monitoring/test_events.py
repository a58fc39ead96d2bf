"""`clonectl events`: the current state, then every change in order."""

import json
import os
import signal
import subprocess
import threading
import time

import pytest

from tests.support.cli import CLONECTL, run_clonectl

MiB = 1 << 20


class EventReader:
    """`clonectl events --json` in the background; lines parsed as they
    come."""

    def __init__(self, state_dir, process_guard):
        self.proc = subprocess.Popen(
            [CLONECTL, "--state-dir", str(state_dir), "events", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            stdin=subprocess.DEVNULL)
        process_guard.add(self.proc.pid)
        self.events = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            with self.cond:
                self.events.append(json.loads(line))
                self.cond.notify_all()

    def wait_for(self, pred, what, timeout=15):
        with self.cond:
            if not self.cond.wait_for(lambda: any(map(pred, self.events)),
                                      timeout):
                pytest.fail("no event {} in {}".format(what, json.dumps(
                    self.events, indent=1)))
            return next(e for e in self.events if pred(e))

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


def _is(kind, obj, **fields):
    return lambda e: e["kind"] == kind and e["object"] == obj and all(
        e.get(k) == v for k, v in fields.items())


def test_events_follow_clone_and_session_changes_in_order(
        server, clonectl, process_guard):
    clonectl("lu", "create", "src", "--size", "4M")
    clonectl("lu", "create", "dst", "--size", "4M")
    clonectl("clone", "add", "src", "c1")
    reader = EventReader(server.state_dir, process_guard)
    try:
        # The current state first, each object as it is.
        reader.wait_for(_is("clone", "c1", change="state",
                            state="out-of-sync"), "c1 state")
        reader.wait_for(_is("lu", "src", change="state", size=4 * MiB),
                        "src state")
        clonectl("clone", "sync", "c1", "--wait")
        clonectl("clone", "fracture", "c1")
        clonectl("session", "create", "src", "s1", "--dest",
                 server.uri("dst"))
        clonectl("session", "mark", "s1")
        reader.wait_for(_is("session", "s1", marked=True), "s1 marked")
        clonectl("session", "unmark", "s1")
        reader.wait_for(_is("session", "s1", marked=False,
                            change="changed"), "s1 unmarked")
        clonectl("lu", "create", "late", "--size", "1M")
        reader.wait_for(_is("lu", "late", change="new"), "LU late added")
    finally:
        reader.stop()
    ev = reader.events
    seqs = [e["seq"] for e in ev if e["change"] != "state"]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), ev
    for e in ev:
        assert e["time"].endswith("Z") and "T" in e["time"], e
    states = [e["state"] for e in ev if e["kind"] == "clone" and
              e["object"] == "c1" and e["change"] != "state" and "state" in e]
    assert states == ["syncing", "synchronized", "fractured"], ev
    ops = [e for e in ev if e["kind"] == "operation" and e["object"] == "c1"]
    assert ops and ops[0]["change"] == "new" and ops[0]["operation"] == "sync"
    # An event carries the fields that changed: the operation started
    # running and the last change of "running" ended it.
    running = [e["running"] for e in ops if "running" in e]
    assert running[0] is True and running[-1] is False, ops
    marks = [e["marked"] for e in ev if e["kind"] == "session" and
             "marked" in e and e["change"] != "state"]
    assert marks[-2:] == [True, False], ev
    # The session exists before it is marked: "new" comes first.
    s1 = [e for e in ev if e["kind"] == "session" and e["object"] == "s1"]
    assert s1[0]["change"] == "new", s1


def test_events_now_prints_the_state_and_exits(server, clonectl):
    clonectl("lu", "create", "src", "--size", "2M")
    clonectl("clone", "add", "src", "c1")
    proc = run_clonectl(server.state_dir, "events", "--now", "--json",
                        timeout=20)
    ev = [json.loads(line) for line in proc.stdout.splitlines()]
    by = {(e["kind"], e["object"]): e for e in ev}
    assert by[("clone", "c1")]["state"] == "out-of-sync", ev
    assert by[("lu", "src")]["size"] == 2 * MiB, ev
    assert all(e["change"] == "state" for e in ev), ev
    text = run_clonectl(server.state_dir, "events", "--now").stdout
    assert "clone c1 state" in text and "size=2MiB" in text, text


def test_events_without_a_server_exits_3(clonectl):
    clonectl("lu", "create", "src", "--size", "1M")
    start = time.monotonic()
    proc = clonectl("events", check=False, timeout=20)
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert "no server runs" in proc.stderr
    assert time.monotonic() - start < 10


def test_events_of_links_roles_and_a_target_restart(server, clonectl,
                                                     process_guard, tmp_path):
    clonectl("lu", "create", "vol", "--size", "2M")
    clonectl("rsg", "create", "g1", "--volume", "vol", "--srl-size", "1M")
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123\n")
    token.chmod(0o600)
    reader = EventReader(server.state_dir, process_guard)
    try:
        reader.wait_for(_is("rsg", "g1", change="state", role="primary"),
                        "g1 state")
        # Nothing listens there: the link keeps trying.
        from tests.support.sockets import free_port
        secondary = "127.0.0.1:{}".format(free_port())
        clonectl("rsg", "link", "g1", "--secondary", secondary,
                 "--token-file", token)
        link = "g1->" + secondary
        reader.wait_for(_is("link", link, change="new"), "link added")
        clonectl("rsg", "detach", "g1", "--secondary", secondary)
        reader.wait_for(_is("link", link, state="detached",
                            change="changed"), "link detached")
        clonectl("rsg", "demote", "g1")
        reader.wait_for(_is("rsg", "g1", role="secondary",
                            change="changed"), "g1 demoted")
        # A new target (nbdkit restarted by the manager) numbers its
        # events from 1 again: the reader prints the state again.
        before = len([e for e in reader.events if e["change"] == "state"])
        os.kill(server.nbdkit_pid, signal.SIGKILL)
        with reader.cond:
            assert reader.cond.wait_for(lambda: len(
                [e for e in reader.events if e["change"] == "state"]) >=
                2 * before, 30), reader.events
        server.refresh()
        clonectl("lu", "create", "after", "--size", "1M")
        reader.wait_for(_is("lu", "after", change="new"), "LU after")
    finally:
        reader.stop()
    assert reader.proc.returncode == -signal.SIGTERM
