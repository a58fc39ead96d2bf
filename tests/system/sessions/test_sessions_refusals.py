"""Bad input to incremental copy sessions, end to end: every
refusal exits 1 with a message naming the reason (no traceback) and leaves
nothing changed: no session created, no map or save-area file made, not a
byte written to any destination.  A save area too small for the changes
made while marked unmarks the session with the error shown in its status,
and the next update still sends every change.

What the tests hold to:

- host writes succeed even when the save area is full;
- an unmark forced by a full save area loses nothing from the
  next transfer (the destination ends byte-equal to the Source);
- a destination is never written before the session has
  checked it (reachable, writable, of the Source's size), and a refused
  transfer writes nothing;
- one transfer or update at a time per session (the second is refused).
"""

import hashlib
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from target import sessions

from tests.support.clonelib import GRANULARITY, KiB, MiB, read_range
from tests.support.sessionlib import assert_same
from tests.support.cli import CLONECTL

pytest.importorskip("nbd")

SIZE = 32 * MiB


def _file(path, size, pattern=None):
    with open(path, "wb") as f:
        if pattern is None:
            f.truncate(size)
        else:
            f.write(pattern * (size // len(pattern)))
    return Path(path)


def _digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_session_files(env):
    """Nothing of a session in the state directory."""
    names = [p.name for p in env.state_dir.rglob("*") if "@" in p.name or
             "save" in p.name.lower()]
    assert names == [], names
    assert b"sessions" not in (env.state_dir / "state.json").read_bytes()
    assert env.slist() == []


# ---------------------------------------------------------------- create

def test_create_refuses_bad_destinations(session_env, dests, tmp_path):
    env = session_env.setup(size=SIZE, fill=False)
    before = (env.state_dir / "state.json").read_bytes()

    # Unreachable: a socket path that does not exist, a closed port.
    missing = "nbd+unix:///x?socket={}/none.sock".format(dests.sockdir)
    proc = env.refused("session", "create", "src", "s1", "--dest", missing,
                       match=["destination", missing])
    closed = "nbd://127.0.0.1:{}/x".format(_free_port())
    env.refused("session", "create", "src", "s1", "--dest", closed,
                match=["destination", closed])

    # Wrong size: refused before anything is written.
    wrong = _file(tmp_path / "wrong.img", SIZE + 64 * KiB, b"\xa5\x5a")
    wrong_digest = _digest(wrong)
    wdest = dests.qemu_nbd(wrong)
    env.refused("session", "create", "src", "s1", "--dest", wdest.uri,
                match=["size", wdest.uri])
    smaller = _file(tmp_path / "smaller.img", SIZE - 64 * KiB, b"\x3c")
    smaller_digest = _digest(smaller)
    sdest = dests.qemu_nbd(smaller)
    env.refused("session", "create", "src", "s1", "--dest", sdest.uri,
                match="size")

    # Read-only.
    ro = _file(tmp_path / "ro.img", SIZE, b"\x11\x22")
    ro_digest = _digest(ro)
    rdest = dests.qemu_nbd(ro, readonly=True)
    env.refused("session", "create", "src", "s1", "--dest", rdest.uri,
                match="read-only")

    # One good destination with a bad one: nothing is made either.
    good = _file(tmp_path / "good.img", SIZE, b"\x77")
    good_digest = _digest(good)
    gdest = dests.qemu_nbd(good)
    env.refused("session", "create", "src", "s1", "--dest", gdest.uri,
                "--dest", wdest.uri, match="size")
    # The same destination twice; a save area below its minimum.
    env.refused("session", "create", "src", "s1", "--dest", gdest.uri,
                "--dest", gdest.uri, match="twice")
    env.refused("session", "create", "src", "s1", "--dest", gdest.uri,
                "--save-area", "64K", match="save area")
    # An unknown Source.
    env.refused("session", "create", "nosuch", "s1", "--dest", gdest.uri,
                match="nosuch")

    assert (env.state_dir / "state.json").read_bytes() == before
    _no_session_files(env)
    for path, digest in [(wrong, wrong_digest), (smaller, smaller_digest),
                         (ro, ro_digest), (good, good_digest)]:
        assert _digest(path) == digest, "{} was written".format(path)
    del proc




def test_create_times_out_on_a_silent_destination(session_env, tmp_path):
    env = session_env.setup(size=SIZE, fill=False)
    # Accepts TCP connections (the kernel's backlog) but never says a word.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = "nbd://127.0.0.1:{}/x".format(silent.getsockname()[1])
        t0 = time.monotonic()
        proc = env.cli("session", "create", "src", "s1", "--dest", uri,
                       "--timeout", "2", check=False)
        took = time.monotonic() - t0
    assert took < 8, "took {:.1f} s with --timeout 2: {}".format(
        took, proc.stderr)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert uri in proc.stderr and "2 s" in proc.stderr, proc.stderr
    _no_session_files(env)


# ---------------------------------------------------------------- names

def test_names_and_lu_delete_refused(session_env, dests, tmp_path):
    env = session_env.setup(size=SIZE, fill=False)
    dfile = _file(tmp_path / "dest.img", SIZE)
    dest = dests.qemu_nbd(dfile)
    env.create("s1", dest.uri)
    state = (env.state_dir / "state.json").read_bytes()

    env.refused("session", "create", "src", "s1", "--dest", dest.uri,
                match=["s1", "exists"])
    for args in [("status", "nope"), ("mark", "nope"), ("unmark", "nope"),
                 ("transfer", "nope"), ("update", "nope"), ("delete", "nope")]:
        env.refused("session", *args, match="no session named 'nope'")
    env.refused("session", "unmark", "s1", match="not marked")
    env.server.stop()
    env.refused("lu", "delete", "src", match=["sessions", "s1"])
    assert (env.state_dir / "state.json").read_bytes() == state
    assert env.img("src").exists()
    assert [s["name"] for s in env.slist()] == ["s1"]
    assert read_range(dfile, 0, SIZE) == bytes(SIZE)


# ---------------------------------------------------------------- transfer

def test_transfer_of_unmarked_session_refused(session_env, dests, tmp_path):
    env = session_env.setup(size=SIZE)
    dfile = _file(tmp_path / "dest.img", SIZE)
    dest = dests.qemu_nbd(dfile)
    env.create("s1", dest.uri)
    before = env.sstatus()

    proc = env.refused("session", "transfer", "s1", match="not marked")
    assert "session mark" in proc.stderr and "session update" in \
        proc.stderr, proc.stderr
    env.refused("session", "transfer", "s1", "--unmarked", match="--full")
    env.cli("session", "mark", "s1")
    env.refused("session", "transfer", "s1", "--full", "--unmarked",
                match="unmarked")
    env.refused("session", "mark", "s1", match="already marked")
    env.cli("session", "unmark", "s1")

    after = env.sstatus()
    for d in before["destinations"] + after["destinations"]:
        d.pop("needs_full")   # the mark took the full copy into its maps
    assert after["destinations"] == before["destinations"], after
    assert after["last_transfer"] is None and not after["marked"], after
    # The unmark gave every extent back to tracking: the next transfer is
    # still a full one.
    assert after["tracked_extents"] == SIZE // GRANULARITY, after
    assert read_range(dfile, 0, SIZE) == bytes(SIZE), "destination written"
    st = env.update()
    assert st["last_transfer"]["bytes_sent"] == SIZE, st
    assert_same(dfile, env.img("src"))


def test_second_update_refused_while_one_runs(session_env, dests, tmp_path):
    env = session_env.setup(size=SIZE)
    dfile = _file(tmp_path / "dest.img", SIZE)
    # About 5 MB/s: the first (full) update takes about 6 s.
    dest = dests.nbdkit(dfile, filters=["rate"],
                        params=["rate=40M", "burstiness=0.5"])
    env.create("s1", dest.uri)
    cmd = [CLONECTL, "--state-dir", str(env.state_dir), "session", "update",
           "s1"]
    env_vars = dict(os.environ)
    env_vars.pop("CLONECTL_STATE", None)
    first = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env_vars,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        env.wait_transfer()
        env.refused("session", "update", "s1", match="already running")
        env.refused("session", "transfer", "s1", match="running")
        env.refused("session", "transfer", "s1", "--full", match="running")
        env.refused("session", "delete", "s1", match="s1")
        env.refused("session", "mark", "s1", match="already marked")
        still = env.sstatus()
        assert still["transferring"], \
            "the first update ended before the refusals were checked"
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, out + err
    assert "transfer completed" in out, out
    assert "refused" in env.server.log(), "the refusal was not logged"
    st = env.sstatus()
    assert st["last_transfer"]["result"] == "completed", st
    assert st["last_transfer"]["bytes_sent"] == SIZE, st
    assert_same(dfile, env.img("src"))
    # The lock was released: the next update runs.
    env.update()


def test_save_area_full_unmarks_and_loses_nothing(session_env, dests,
                                                  tmp_path, nbd_connect):
    env = session_env.setup(size=SIZE)
    dfile = _file(tmp_path / "dest.img", SIZE)
    dest = dests.qemu_nbd(dfile)
    extents = SIZE // GRANULARITY
    # The smallest save area: the blocks of one extent.
    env.create("s1", dest.uri, extra=["--save-area", str(
        sessions.SaveArea.minimum_size(extents, GRANULARITY))])
    st = env.sstatus()
    blocks = st["save_area"]["capacity_blocks"]
    assert blocks * st["save_area"]["block"] == GRANULARITY, st

    env.cli("session", "mark", "s1")
    # Writes of half an extent each into four extents still to send (a
    # first transfer sends every extent): the third has no room for its
    # old data.
    h = nbd_connect(env.server.socket, "src")
    written = {}
    for x in (3, 100, 200, 300):
        data = os.urandom(GRANULARITY // 2)
        h.pwrite(data, x * GRANULARITY)
        written[x] = data
    h.flush()
    for x, data in written.items():   # every host write succeeded
        assert read_range(env.img("src"), x * GRANULARITY,
                          len(data)) == data
    h.shutdown()

    st = env.sstatus()
    assert st["marked"] is False, st
    assert st["error"] and "save area" in st["error"], st
    assert st["cofw_count"] == blocks, st
    assert st["save_area"]["used_blocks"] == 0, st
    assert st["tracked_extents"] == extents, st   # all back in tracking
    proc = env.cli("session", "status", "s1")
    assert "save area" in proc.stdout, proc.stdout
    assert read_range(dfile, 0, SIZE) == bytes(SIZE), "destination written"
    env.refused("session", "transfer", "s1", match="not marked")

    st = env.update()
    assert st["error"] is None, st
    assert st["last_transfer"]["bytes_sent"] == SIZE, st
    assert_same(dfile, env.img("src"), "after the update")
