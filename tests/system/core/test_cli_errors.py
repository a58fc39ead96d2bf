"""The clonectl CLI: help, listing, and bad input that must change nothing."""

import json
import os
import subprocess
import tomllib

import click
import pytest

import target
from target import cli
from tests.support.cli import (CLONECTL, REPO, MiB, run_clonectl,
                               snapshot_tree, status_json)


def _commands(group, prefix=()):
    for name, cmd in sorted(group.commands.items()):
        yield prefix + (name,)
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + (name,))


ALL_COMMANDS = [()] + list(_commands(cli.main))


@pytest.mark.parametrize("command", ALL_COMMANDS,
                         ids=[" ".join(c) or "clonectl" for c in ALL_COMMANDS])
def test_help(command, tmp_path):
    state = tmp_path / "never-created"
    for flag in ("--help", "-h") if not command else ("--help",):
        proc = run_clonectl(state, *command, flag)
        assert proc.stdout.startswith("Usage: clonectl"), proc.stdout
        assert proc.stderr == ""
    assert not state.exists(), "--help must not create the state directory"


def test_version():
    """--version prints the project's version (pyproject.toml), which is
    also target.__version__."""
    with open(REPO / "pyproject.toml", "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    assert target.__version__ == version
    proc = run_clonectl(None, "--version")
    assert proc.stdout == "clonectl, version {}\n".format(version)


def test_state_dir_from_environment(tmp_path):
    state = tmp_path / "from-env"
    run_clonectl(None, "lu", "create", "envlu", "--size", "1M",
                 env={"CLONECTL_STATE": str(state)})
    doc = json.loads((state / "state.json").read_text())
    assert list(doc["lus"]) == ["envlu"]


def test_create_list_delete(clonectl, state_dir, tmp_path):
    own = tmp_path / "own.img"
    own.write_bytes(b"\1" * (3 * MiB))
    out = clonectl("lu", "create", "a", "--size", "64M").stdout
    assert "created LU a" in out
    clonectl("lu", "create", "b", "--file", own, "--read-only")
    rows = json.loads(clonectl("lu", "list", "--json").stdout)
    assert [r["name"] for r in rows] == ["a", "b"]
    assert rows[0]["size"] == 64 * MiB and rows[0]["owned"] is True
    assert rows[1]["size"] == 3 * MiB and rows[1]["readonly"] is True
    assert rows[1]["file"] == str(own)
    assert all(r["served"] is False for r in rows)
    text = clonectl("lu", "list").stdout.splitlines()
    assert text[0].split() == ["NAME", "SIZE", "MODE", "BACKING"]
    assert text[1].split()[:3] == ["a", "64MiB", "rw"]
    assert text[2].split()[:3] == ["b", "3MiB", "ro"]
    st = status_json(state_dir)
    assert st["server"] is None
    proc = clonectl("status", check=False)
    assert proc.returncode == 3 and "server: not running" in proc.stdout
    out = clonectl("lu", "delete", "b").stdout
    assert "kept" in out
    assert own.read_bytes() == b"\1" * (3 * MiB)
    clonectl("lu", "delete", "a")
    assert not (state_dir / "lus" / "a.img").exists()
    assert json.loads(clonectl("lu", "list", "--json").stdout) == []


# ---------------------------------------------------------------- bad input

@pytest.fixture
def populated(clonectl, state_dir, tmp_path):
    """A state directory with two LUs; returns a function asserting that
    nothing in it (or next to it) changed."""
    clonectl("lu", "create", "keep", "--size", "1M")
    ext = tmp_path / "ext.img"
    ext.write_bytes(b"e" * MiB)
    clonectl("lu", "create", "extlu", "--file", ext)
    before = snapshot_tree(state_dir)
    outside = sorted(p.name for p in tmp_path.iterdir())

    def unchanged():
        after = snapshot_tree(state_dir)
        assert after.keys() == before.keys(), \
            set(after) ^ set(before)
        for k in before:
            assert after[k] == before[k], "{} changed".format(k)
        assert sorted(p.name for p in tmp_path.iterdir()) == outside
        assert ext.read_bytes() == b"e" * MiB

    return unchanged


def _refused(proc, *fragments, code=(1,)):
    assert proc.returncode in code, (proc.returncode, proc.stdout,
                                     proc.stderr)
    err = proc.stderr
    assert err.strip(), "an error needs a message on stderr"
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


@pytest.mark.parametrize("size, fragment", [
    ("abc", "invalid size 'abc'"),
    ("0", "larger than 0"),
    ("1000", "multiple of 512"),
    ("-1G", "invalid size '-1G'"),
    ("1.5", "whole number"),
    ("12Q", "unknown unit"),
    ("", "invalid size"),
])
def test_create_bad_size(clonectl, populated, size, fragment):
    proc = clonectl("lu", "create", "new", "--size=" + size, check=False)
    _refused(proc, fragment)
    populated()


@pytest.mark.parametrize("name", ["a/b", "", "x" * 65, "../up", "-dash",
                                  "sp ace", "ünï"])
def test_create_invalid_name(clonectl, populated, name):
    proc = clonectl("lu", "create", "--size", "1M", "--", name, check=False)
    err = _refused(proc, "invalid name")
    assert repr(name) in err
    populated()


def test_create_name_with_trailing_newline(clonectl, populated):
    proc = clonectl("lu", "create", "--size", "1M", "--", "nl\n",
                    check=False)
    _refused(proc, "invalid name")
    populated()


def test_create_duplicate(clonectl, populated):
    proc = clonectl("lu", "create", "keep", "--size", "2M", check=False)
    _refused(proc, "'keep'", "already")
    populated()


def test_create_missing_backing(clonectl, populated, tmp_path):
    missing = tmp_path / "missing.img"
    proc = clonectl("lu", "create", "new", "--file", missing, check=False)
    _refused(proc, str(missing), "does not exist")
    assert not missing.exists()
    populated()


def test_create_too_small_backing(clonectl, tmp_path, populated):
    small = tmp_path / "small.img"
    small.write_bytes(b"s" * 4096)
    proc = clonectl("lu", "create", "new", "--file", small, "--size", "1M",
                    check=False)
    _refused(proc, str(small), "4096", str(MiB))
    assert small.read_bytes() == b"s" * 4096
    small.unlink()
    populated()


def test_create_directory_as_backing(clonectl, tmp_path, populated):
    d = tmp_path / "adir"
    d.mkdir()
    proc = clonectl("lu", "create", "new", "--file", d, "--size", "1M",
                    check=False)
    _refused(proc, str(d), "not a regular file")
    d.rmdir()
    populated()


def test_create_backing_already_used(clonectl, tmp_path, populated):
    proc = clonectl("lu", "create", "new", "--file", tmp_path / "ext.img",
                    check=False)
    _refused(proc, "already used by LU 'extlu'")
    populated()


def test_create_without_size_or_file(clonectl, populated):
    proc = clonectl("lu", "create", "new", check=False)
    _refused(proc, "--size")
    populated()


def test_delete_unknown(clonectl, populated):
    proc = clonectl("lu", "delete", "nope", check=False)
    _refused(proc, "no LU named 'nope'")
    populated()


def test_stop_without_server(clonectl, populated, state_dir):
    """Nothing to stop is no error: the server is stopped either way."""
    snapshot = snapshot_tree(state_dir)
    proc = clonectl("stop", check=False)
    assert proc.returncode == 0 and proc.stderr == "", proc
    assert proc.stdout == "no server runs on {}\n".format(state_dir)
    assert snapshot_tree(state_dir) == snapshot
    populated()


@pytest.mark.parametrize("args, fragment", [
    (["--socket", "x.sock", "--port", "10809"], "exclusive"),
    (["--bind", "127.0.0.1"], "--bind needs --port"),
    (["--port", "0"], "0"),
    (["--thread-model", "bogus"], "bogus"),
])
def test_serve_bad_options(clonectl, populated, args, fragment):
    proc = clonectl("serve", *args, check=False, timeout=30)
    _refused(proc, fragment, code=(1, 2))
    populated()


def test_unknown_command_is_usage_error(clonectl, populated):
    proc = clonectl("lu", "frobnicate", check=False)
    assert proc.returncode == 2
    assert "frobnicate" in proc.stderr
    populated()


CORRUPTIONS = {
    "truncated": b'{"format": "clonectl-state", "version": 1, "lus": {',
    "garbage": b"\x00\x01\x02 not json at all",
    "empty": b"",
    "wrong-type": b'{"format": "clonectl-state", "version": 1, "lus": []}',
    "future-version": b'{"format": "clonectl-state", "version": 99, '
                      b'"lus": {}}\n',
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_state_file(clonectl, state_dir, populated, kind, tmp_path):
    raw = CORRUPTIONS[kind]
    (state_dir / "state.json").write_bytes(raw)
    snapshot = snapshot_tree(state_dir)
    state_file = str(state_dir / "state.json")
    commands = [
        ["lu", "list"],
        ["lu", "list", "--json"],
        ["status"],
        ["status", "--json"],
        ["lu", "create", "new", "--size", "1M"],
        ["lu", "delete", "keep"],
        ["serve", "--socket", tmp_path / "c.sock"],
        ["serve", "--socket", tmp_path / "c.sock", "--detach"],
    ]
    for args in commands:
        proc = clonectl(*args, check=False, timeout=60)
        err = _refused(proc, state_file)
        assert ("corrupt" in err) or ("version" in err), err
        assert (state_dir / "state.json").read_bytes() == raw, args
        after = snapshot_tree(state_dir)
        after.pop("run/serve.log", None)  # the daemon logs its refusal
        assert after == snapshot, args
        assert not (tmp_path / "c.sock").exists()
        assert not (state_dir / "run" / "serve.json").exists()


# ---------------------------------------------------------------- concurrency

def _spawn(state_dir, *args):
    return subprocess.Popen([CLONECTL, "--state-dir", str(state_dir)] +
                            [str(a) for a in args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


def test_concurrent_creates_are_all_recorded(clonectl, state_dir):
    clonectl("lu", "create", "first", "--size", "1M")
    procs = [_spawn(state_dir, "lu", "create", "c{}".format(i), "--size",
                    "1M") for i in range(8)]
    results = [(p.wait(60), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert all(rc == 0 for rc, _ in results), results
    doc = json.loads((state_dir / "state.json").read_text())
    assert sorted(doc["lus"]) == sorted(["first"] +
                                        ["c{}".format(i) for i in range(8)])
    assert sorted(os.listdir(state_dir / "lus")) == sorted(
        name + ".img" for name in doc["lus"])


def test_concurrent_creates_of_one_name(clonectl, state_dir):
    clonectl("lu", "create", "first", "--size", "1M")
    procs = [_spawn(state_dir, "lu", "create", "same", "--size",
                    "{}K".format(64 * (i + 1))) for i in range(6)]
    results = [(p.wait(60), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert sorted(rc for rc, _ in results) == [0] + [1] * 5, results
    assert all("already" in err for rc, err in results if rc), results
    doc = json.loads((state_dir / "state.json").read_text())
    size = doc["lus"]["same"]["size"]
    assert os.path.getsize(state_dir / "lus" / "same.img") == size


# ---------------------------------------------------------------- socket dir

OTHER_UID = 65533


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run as a user")
def test_socket_fallback_dir_of_another_user_is_refused(tmp_path):
    """A state directory so deep that its sockets fall back to
    /tmp/clonectl-UID, which root created first: the user's server refuses
    it rather than listen where root could replace its sockets."""
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    os.chown(tmp_path, OTHER_UID, OTHER_UID)
    os.chown(deep, OTHER_UID, OTHER_UID)
    planted = "/tmp/clonectl-{}".format(OTHER_UID)
    if os.path.isdir(planted) and not os.path.islink(planted):
        subprocess.run(["rm", "-rf", "--", planted], check=True)
    os.mkdir(planted, 0o700)     # root's
    try:
        proc = subprocess.run(
            ["setpriv", "--reuid={}".format(OTHER_UID),
             "--regid={}".format(OTHER_UID), "--clear-groups", CLONECTL,
             "--state-dir", str(deep / "state"), "serve", "--detach"],
            capture_output=True, text=True, timeout=60,
            stdin=subprocess.DEVNULL)
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        assert planted in proc.stderr and "owned by uid 0" in proc.stderr, \
            proc.stderr
        assert "Traceback" not in proc.stderr
        assert os.listdir(planted) == []
        assert not (deep / "state" / "run" / "serve.json").exists()
    finally:
        os.rmdir(planted)


@pytest.mark.parametrize("args", [
    ("lu", "list"), ("lu", "create", "new", "--size", "1M", "--json"),
    ("lu", "create", "lu0", "--size", "1M", "--json")],
    ids=["list", "a change with --json", "its error with --json"])
def test_output_into_a_pipe_closed_early_is_no_error(clonectl, state_dir,
                                                     args):
    """`clonectl lu list | head -1`: the reader goes first, and clonectl
    stops quietly with the exit status of a program SIGPIPE ends, not with
    "error: Broken pipe", nor with 1 (refused) for a change it made."""
    for i in range(3):
        clonectl("lu", "create", "lu{}".format(i), "--size", "1M")
    proc = subprocess.Popen([CLONECTL, "--state-dir", str(state_dir)] +
                            list(args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(30) == 141, err
    assert err == ""
