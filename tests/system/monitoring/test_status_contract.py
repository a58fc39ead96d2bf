"""One status contract: exit codes, ISO 8601 times, IEC units, --json on
action commands and JSON errors."""

import datetime
import json
import os
import re
import signal

from tests.support.cli import status_json

MiB = 1 << 20
# A size printed with a decimal-looking unit (MB meaning MiB) or a bare
# letter (64M): neither is an IEC unit.
NOT_IEC = re.compile(r"\b\d+(?:\.\d+)?\s?(?:[KMGTP]B|[KMGTP])\b")


def iso(text):
    """The datetime of an ISO 8601 UTC string (fails on anything else)."""
    assert isinstance(text, str) and re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)", text), text
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_status_exit_codes(clonectl, server_factory, state_dir):
    clonectl("lu", "create", "src", "--size", "4M")
    clonectl("clone", "add", "src", "c1")
    proc = clonectl("status", check=False)
    assert proc.returncode == 3, proc
    assert "server: not running" in proc.stdout and "src" in proc.stdout
    proc = clonectl("status", "--json", check=False)
    assert proc.returncode == 3 and json.loads(proc.stdout)["server"] is None

    srv = server_factory()
    proc = clonectl("status", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "degraded" not in proc.stdout
    srv.stop()

    # A broken clone (its file is gone) degrades the status.
    os.unlink(state_dir / "lus" / "c1.img")
    server_factory()
    proc = clonectl("status", check=False)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "degraded: clone c1 is broken" in proc.stdout, proc.stdout
    proc = clonectl("status", "--json", check=False)
    st = json.loads(proc.stdout)
    assert proc.returncode == 4 and any("c1" in r for r in st["degraded"])

    text = clonectl("status", "--help").stdout
    for line in ("0  the server runs and all is well", "1  error",
                 "2  usage error", "3  no server runs", "4  degraded"):
        assert line in text, text


def test_a_target_that_does_not_answer_degrades_the_status(
        clonectl, server_factory, state_dir):
    """nbdkit hung (here stopped): the status cannot say how the LUs and
    clones are, so it is degraded and says why, never "all is well" (the
    documented monitoring check is its exit status)."""
    clonectl("lu", "create", "src", "--size", "4M")
    clonectl("clone", "add", "src", "c1")
    srv = server_factory()
    os.kill(srv.nbdkit_pid, signal.SIGSTOP)
    try:
        proc = clonectl("status", "--json", check=False, timeout=60)
    finally:
        os.kill(srv.nbdkit_pid, signal.SIGCONT)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    st = json.loads(proc.stdout)
    assert any("does not answer" in r for r in st["degraded"]), st


def test_stop_without_a_server_succeeds(clonectl, state_dir):
    clonectl("lu", "create", "src", "--size", "1M")
    proc = clonectl("stop", check=False)
    assert proc.returncode == 0, proc.stderr
    assert "no server runs" in proc.stdout


def test_status_shows_clones_sessions_and_groups(clonectl, server,
                                                 state_dir):
    clonectl("lu", "create", "src", "--size", "4M")
    clonectl("lu", "create", "dst", "--size", "4M")
    clonectl("lu", "create", "vol", "--size", "4M")
    clonectl("clone", "add", "src", "c1")
    clonectl("session", "create", "src", "s1", "--dest", server.uri("dst"))
    clonectl("session", "mark", "s1")
    clonectl("rsg", "create", "g1", "--volume", "vol", "--srl-size", "1M")
    st = status_json(state_dir)
    assert [c["name"] for c in st["clones"]] == ["c1"]
    assert [s["name"] for s in st["sessions"]] == ["s1"]
    assert [r["name"] for r in st["rsgs"]] == ["g1"]
    # Times are ISO 8601 strings in UTC, never epoch numbers.
    now = datetime.datetime.now(datetime.timezone.utc)
    marked = iso(st["sessions"][0]["mark_time"])
    assert abs((now - marked).total_seconds()) < 60
    assert abs((now - iso(st["server"]["started"])).total_seconds()) < 120
    session = json.loads(clonectl("session", "status", "s1",
                                  "--json").stdout)
    assert iso(session["mark_time"]) == marked
    text = clonectl("session", "status", "s1").stdout
    assert "marked at " + marked.strftime("%Y-%m-%dT%H:%M:%SZ") in text, text
    assert not NOT_IEC.findall(text), NOT_IEC.findall(text)

    text = clonectl("status").stdout
    assert re.search(r"^c1\s+src\s+out-of-sync\s+4MiB", text, re.M), text
    assert re.search(r"^s1\s+src\s+" + re.escape(
        marked.strftime("%Y-%m-%dT%H:%M:%SZ")), text, re.M), text
    assert "g1: primary" in text and "SRL 0B of 1MiB used" in text, text
    assert not NOT_IEC.findall(text), NOT_IEC.findall(text)


def test_human_output_uses_iec_units(clonectl, server, state_dir):
    clonectl("lu", "create", "src", "--size", "4M")
    clonectl("clone", "add", "src", "c1", "--granularity", "64K")
    outputs = [clonectl("lu", "list").stdout,
               clonectl("clone", "add", "src", "c2").stdout,
               # throttled, so the progress lines show a rate: an
               # empty Source's zero chunks copy in a moment
               clonectl("clone", "sync", "c1", "--rate", "1M",
                        "--wait").stdout,
               clonectl("clone", "list").stdout,
               clonectl("clone", "status", "c1").stdout]
    joined = "\n".join(outputs)
    assert "src   4MiB" in outputs[0], outputs[0]
    assert "granularity 64KiB" in outputs[1], outputs[1]
    assert "4MiB of 4MiB" in outputs[2], outputs[2]
    assert re.search(r"\d(\.\d+)?[KM]iB/s", outputs[2]), outputs[2]
    assert not NOT_IEC.findall(joined), NOT_IEC.findall(joined)


def test_action_commands_print_their_status_as_json(clonectl, server,
                                                    state_dir):
    clonectl("lu", "create", "src", "--size", "4M")
    clonectl("lu", "create", "vol", "--size", "4M")
    added = json.loads(clonectl("clone", "add", "src", "c1",
                                "--json").stdout)
    assert added["name"] == "c1" and added["state"] == "out-of-sync"
    synced = json.loads(clonectl("clone", "sync", "c1", "--wait",
                                 "--json").stdout)
    assert synced["state"] == "synchronized" and synced["bytes_dirty"] == 0
    assert synced["operation"]["bytes_copied"] == 4 * MiB
    fractured = json.loads(clonectl("clone", "fracture", "c1",
                                    "--json").stdout)
    assert fractured["state"] == "fractured" and fractured["exported"]
    group = json.loads(clonectl("rsg", "create", "g1", "--volume", "vol",
                                "--srl-size", "1M", "--json").stdout)
    assert group["name"] == "g1" and group["srl"]["size"] == MiB

    # An error: {"error": ...} on stdout, exit status 1, nothing on stderr.
    proc = clonectl("clone", "fracture", "c1", "--json", check=False)
    assert proc.returncode == 1 and proc.stderr == "", proc
    err = json.loads(proc.stdout)["error"]
    assert err["type"] == "InvalidTransition" and err["errno"] == 22, err
    assert "fractured" in err["message"], err
    proc = clonectl("clone", "sync", "nope", "--json", check=False)
    err = json.loads(proc.stdout)["error"]
    assert proc.returncode == 1 and err["type"] == "UnknownClone", err
    assert err["errno"] == 2 and "nope" in err["message"], err
    assert status_json(state_dir)["clones"][0]["state"] == "fractured"
