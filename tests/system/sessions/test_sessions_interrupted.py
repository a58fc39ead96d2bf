"""Interrupted session transfers end to end: a destination killed
mid-transfer (alone, or one of two while the other completes), the target
(nbdkit) killed with -9 mid-transfer and while a frozen export is served, a
destination that stops answering (`--timeout`), a destination behind a
network namespace whose link is cut and restored.  Each time the session
stays marked with the extents still to send, and the next transfer sends
only those and completes.

The Source is mostly 96 MiB of random data so that a transfer passes one
checkpoint (every 64 MiB: the destination is flushed and its sent extents
cleared) before it is interrupted; destinations are nbdkit's file plugin
behind its rate filter, slowed down to about 6 MB/s just before the
checkpoint, so that the interruption surely comes after the checkpoint and
before the end.

What the tests hold to:

- host writes flushed before a kill -9 are on the Source
  after the restart;
- an interrupted transfer loses nothing; the resumed transfer
  sends only what was still pending (bytes sent < the Source's size);
- a completed marked transfer leaves the destination
  byte-equal to a copy of the Source taken at the mark, although hosts
  wrote the extents still to send after the mark (copy on first write,
  durable across the kill -9 too);
- a failed transfer is reported (exit 1, the destination named) and shown
  in the status (the destination's error, still marked, inconsistent).
"""

import os
import subprocess
import time
from pathlib import Path

import pytest


from tests.support.clonelib import GRANULARITY, MiB, read_range
from tests.support.sessionlib import assert_same, NbdProcess
from tests.support.cli import CLONECTL
from tests.support.netlib import netns as harness

HOST = harness.HOST

pytest.importorskip("nbd")

SIZE = 96 * MiB
EXTENTS = SIZE // GRANULARITY
CHECKPOINT_EXTENTS = 64 * MiB // GRANULARITY
FAST, SLOW = "400M", "48M"   # bits per second: ~50 MB/s, ~6 MB/s
LATE = 88 * MiB   # an offset the interrupted transfer has not reached


def _dest_file(tmp_path, size=SIZE):
    path = tmp_path / "dest.img"
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _rate_params(tmp_path):
    """nbdkit rate filter parameters whose rate the test can change (see
    _slow_down); starts FAST."""
    path = tmp_path / "rate"
    _set_rate(path, FAST)
    return ["rate=" + FAST, "rate-file=" + str(path), "burstiness=0.5"]


def _set_rate(path, value):
    tmp = Path(str(path) + ".new")
    tmp.write_text(value + "\n")
    os.replace(tmp, path)


def _slow_down_then_past_checkpoint(env, tmp_path):
    """Once the engine has sent (queued) 60 MiB, slow the destination down
    to SLOW, so that the rest after the 64 MiB checkpoint takes seconds;
    then wait until the checkpoint cleared the destination's first 64 MiB.
    """
    env.wait_transfer(pred=lambda st: (st["transfer"] or {}).get(
        "bytes_sent", 0) >= 60 * MiB)
    _set_rate(tmp_path / "rate", SLOW)
    return env.wait_transfer(pred=_past_checkpoint)


def _start_transfer(env, *extra):
    """`session transfer s1 --wait` in the background."""
    cmd = [CLONECTL, "--state-dir", str(env.state_dir), "session", "transfer",
           "s1", "--wait"] + list(extra)
    env_vars = dict(os.environ)
    env_vars.pop("CLONECTL_STATE", None)
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env_vars)


def _interrupted(env, interrupt, *extra):
    """`session transfer s1 --wait` (with extra) in the background and
    interrupt() while it runs; (its returncode, stdout, stderr, what
    interrupt() returned)."""
    waiter = _start_transfer(env, *extra)
    try:
        got = interrupt()
        out, err = waiter.communicate(timeout=120)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    return waiter.returncode, out, err, got


def _past_checkpoint(st):
    d = st["destinations"][0]
    return st["transferring"] and d["pending_extents"] <= \
        EXTENTS - CHECKPOINT_EXTENTS


def _marked_with_copy(env, tmp_path):
    """Mark s1; return a copy of the Source taken at the mark."""
    at_mark = env.copy_source_file(tmp_path / "at-mark.raw")
    env.cli("session", "mark", "s1")
    st = env.sstatus()
    assert st["marked"] and st["extents_to_send"] == EXTENTS, st
    return at_mark


def _check_interrupted(st):
    """The session after an interrupted transfer: still marked, the
    destination inconsistent with part of the image still pending."""
    assert st["marked"] is True, st
    assert not st["transferring"], st
    d = st["destinations"][0]
    assert d["consistency"] == "inconsistent", d
    assert 0 < d["pending_extents"] <= EXTENTS - CHECKPOINT_EXTENTS, d
    assert st["extents_to_send"] == d["pending_extents"], st
    return d["pending_extents"]


def _resume_and_check(env, dfile, at_mark, pending):
    proc = env.transfer_wait("s1")
    assert "transfer completed" in proc.stdout, proc.stdout
    st = env.sstatus()
    last = st["last_transfer"]
    assert last["result"] == "completed", last
    # Only what was still pending was sent (random data: nothing zero).
    assert last["bytes_sent"] == pending * GRANULARITY < SIZE, last
    d = st["destinations"][0]
    assert d["consistency"] == "consistent" and d["last_error"] is None, d
    assert st["marked"] is False, st
    assert_same(dfile, at_mark, "destination vs the Source at the mark")
    return st


def _write_late(env):
    """A flushed host write to an extent the transfer has not sent yet
    (copy on first write saves its old data); returns the data."""
    data = os.urandom(128 * 1024)
    env.write_export("src", LATE, data)
    return data


# ---------------------------------------------------------------- destination

def test_destination_killed_mid_transfer_then_resume(session_env, dests,
                                                     tmp_path):
    env = session_env.setup(size=SIZE)
    dfile = _dest_file(tmp_path)
    dest = dests.nbdkit(dfile, filters=["rate"], params=_rate_params(tmp_path))
    env.create("s1", dest.uri)
    at_mark = _marked_with_copy(env, tmp_path)

    def interrupt():
        _slow_down_then_past_checkpoint(env, tmp_path)
        late = _write_late(env)
        dest.kill()
        return late
    rc, out, err, late = _interrupted(env, interrupt)
    assert rc == 1, (out, err)
    assert "transfer failed" in err and dest.uri in err, err
    assert "traceback" not in err.lower(), err
    st = env.sstatus()
    pending = _check_interrupted(st)
    d = st["destinations"][0]
    assert d["last_error"] and dest.uri in d["last_error"] or \
        "connection" in d["last_error"], d
    assert st["last_transfer"]["result"].startswith("failed"), st
    assert dest.uri in st["last_transfer"]["destinations_failed"], st
    assert st["cofw_count"] >= 2, st

    # A transfer while the destination is down fails at once, nothing sent.
    proc = env.transfer_wait("s1", "--timeout", "3", check=False)
    assert proc.returncode == 1 and dest.uri in proc.stderr, proc.stderr
    assert env.sstatus()["destinations"][0]["pending_extents"] == pending

    # The destination comes back (same file, same socket, full speed).
    dests.nbdkit(dfile, socket=dest.socket)
    _resume_and_check(env, dfile, at_mark, pending)
    assert read_range(dfile, LATE, len(late)) != late
    env.update()
    assert_same(dfile, env.img("src"), "after one more update")


def test_one_destination_killed_the_other_completes(session_env, dests,
                                                    tmp_path):
    env = session_env.setup(size=SIZE)
    afile = _dest_file(tmp_path)
    bfile = tmp_path / "dest-b.img"
    with open(bfile, "wb") as f:
        f.truncate(SIZE)
    a = dests.qemu_nbd(afile)
    b = dests.nbdkit(bfile, filters=["rate"], params=_rate_params(tmp_path))
    env.create("s1", a.uri, b.uri)
    at_mark = _marked_with_copy(env, tmp_path)

    def interrupt():
        env.wait_transfer(pred=lambda st: (st["transfer"] or {}).get(
            "bytes_sent", 0) >= 60 * MiB * 2)
        _set_rate(tmp_path / "rate", SLOW)
        env.wait_transfer(pred=lambda st: st["destinations"][0][
            "pending_extents"] == 0 or st["destinations"][1][
            "pending_extents"] <= EXTENTS - CHECKPOINT_EXTENTS)
        b.kill()
    rc, out, err, _ = _interrupted(env, interrupt)
    assert rc == 1 and b.uri in err, (out, err)
    st = env.sstatus()
    da, db = st["destinations"]
    # A got the whole point in time; B is left with what it lacks.
    assert da["consistency"] == "consistent" and da["pending_extents"] == 0
    assert da["last_error"] is None and da["bytes_sent"] == SIZE, da
    assert db["consistency"] == "inconsistent" and db["last_error"], db
    assert 0 < db["pending_extents"] < EXTENTS, db
    assert st["marked"] is True, st
    assert st["extents_to_send"] == db["pending_extents"], st
    assert_same(afile, at_mark, "destination A vs the Source at the mark")
    pending = db["pending_extents"]

    dests.nbdkit(bfile, socket=b.socket)
    proc = env.transfer_wait("s1")
    assert "transfer completed" in proc.stdout, proc.stdout
    st = env.sstatus()
    da, db = st["destinations"]
    assert st["last_transfer"]["bytes_sent"] == pending * GRANULARITY, st
    assert da["bytes_sent"] == SIZE, "A was sent data again: {}".format(da)
    assert da["consistency"] == db["consistency"] == "consistent", st
    assert st["marked"] is False, st
    assert_same(afile, at_mark, "destination A")
    assert_same(bfile, at_mark, "destination B")


# ---------------------------------------------------------------- target

def test_target_killed_mid_transfer_then_resume(session_env, dests,
                                                tmp_path):
    env = session_env.setup(size=SIZE)
    dfile = _dest_file(tmp_path)
    dest = dests.nbdkit(dfile, filters=["rate"], params=_rate_params(tmp_path))
    env.create("s1", dest.uri)
    at_mark = _marked_with_copy(env, tmp_path)

    def interrupt():
        _slow_down_then_past_checkpoint(env, tmp_path)
        late = _write_late(env)
        env.kill_nbdkit()
        return late
    # The waiting CLI sees the transfer end without completing.
    rc, out, err, late = _interrupted(env, interrupt)
    assert rc == 1, (out, err)
    assert "traceback" not in err.lower(), err

    # The flushed host write survived the kill -9.
    assert env.read_export("src", LATE, len(late)) == late
    st = env.sstatus()
    pending = _check_interrupted(st)
    assert st["problems"] == [], st
    # Restart the destination at full speed (same file, same socket): the
    # nbdkit 1.32 rate filter may abort ("raw_send_socket: Assertion
    # `sock >= 0' failed") when its client vanishes mid-sleep, which is
    # what the kill -9 of the target does to it.
    dest.stop()
    dests.nbdkit(dfile, socket=dest.socket)
    _resume_and_check(env, dfile, at_mark, pending)
    assert read_range(dfile, LATE, len(late)) != late
    env.update()
    assert_same(dfile, env.img("src"), "after one more update")


def test_a_wait_that_outlives_its_target_does_not_report_an_older_transfer(
        session_env, dests, tmp_path):
    """A session that completed a transfer before: a second one, followed
    with --wait, is cut short by a kill -9 of the target.  The waiting
    CLI must report this transfer as not completed, not the completed one
    before it that the restarted target still has as its last (the
    destination is inconsistent, its extents still to send)."""
    env = session_env.setup(size=16 * MiB)
    dfile = _dest_file(tmp_path, 16 * MiB)
    dest = dests.nbdkit(dfile, filters=["rate"], params=_rate_params(tmp_path))
    env.create("s1", dest.uri)
    env.update()
    _set_rate(tmp_path / "rate", SLOW)
    def interrupt():
        env.wait_transfer(pred=lambda st: (st["transfer"] or {}).get(
            "bytes_sent", 0) > 0)
        env.kill_nbdkit()
    rc, out, err, _ = _interrupted(env, interrupt, "--full")
    assert rc == 1, (out, err)
    assert "did not end" in err, err
    st = env.sstatus()
    assert st["marked"] and st["destinations"][0]["consistency"] == \
        "inconsistent", st
    # clonectl wait, asked after the restart, knows of no transfer since.
    proc = env.cli("wait", "s1", check=False)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "since the server started" in proc.stderr, proc.stderr


def test_frozen_export_survives_target_kill(session_env, dests, tmp_path):
    size = 32 * MiB
    env = session_env.setup(size=size)
    dfile = _dest_file(tmp_path, size)
    dest = dests.qemu_nbd(dfile)
    env.create("s1", dest.uri)
    env.update()
    env.write_export("src", 2 * MiB, os.urandom(256 * 1024))
    at_mark = env.copy_source_file(tmp_path / "at-mark.raw")
    env.cli("session", "mark", "s1", "--export")
    # Flushed host writes after the mark: their old data is saved first.
    after = [(2 * MiB + 64 * 1024, os.urandom(64 * 1024)),
             (9 * MiB, os.urandom(1 * MiB)), (31 * MiB, os.urandom(4096))]
    for off, data in after:
        env.write_export("src", off, data)
    assert env.sstatus()["cofw_count"] >= 18

    env.kill_nbdkit()
    st = env.sstatus()
    assert st["marked"] and st["frozen_export"] == "src@s1", st
    assert st["problems"] == [], st
    for off, data in after:    # the writes survived
        assert env.read_export("src", off, len(data)) == data
    # The frozen image survived too (saved data made durable before the
    # writes it protected).
    frozen = env.copy_export("src@s1", tmp_path / "frozen.raw")
    assert_same(frozen, at_mark, "frozen export after kill -9")
    proc = env.transfer_wait("s1")
    assert "transfer completed" in proc.stdout, proc.stdout
    assert_same(dfile, at_mark, "destination vs the Source at the mark")
    st = env.sstatus()
    assert st["last_transfer"]["bytes_sent"] == 4 * GRANULARITY, st


# ---------------------------------------------------------------- network

class Netns:
    """A network namespace joined to this one by a veth pair."""

    def __init__(self, lab, tag):
        net = "10.213.{}".format(tag % 250 + 1)
        self.ns_ip = net + ".2"
        self.ns = lab.namespace()
        self.host_end, _ = lab.veth(HOST, self.ns, net + ".1/24",
                                    self.ns_ip + "/24")

    def link(self, up):
        if up:
            self.host_end.up()
        else:
            self.host_end.down()


@pytest.fixture
def netns(netlab):
    return Netns(netlab, os.getpid() % 10000)


def test_network_cut_and_restored(session_env, dests, netns, tmp_path,
                                  process_guard):
    env = session_env.setup(size=SIZE)
    dfile = _dest_file(tmp_path)
    port = 10809
    # nbdkit inside the namespace, on TCP (it enters the namespace
    # itself: the PID is nbdkit's).
    cmd = ["nbdkit", "-f", "-i",
           netns.ns_ip, "-p", str(port), "--filter=rate", "file",
           "file=" + str(dfile)] + _rate_params(tmp_path)
    dest = NbdProcess(cmd, "-", "dest", tmp_path / "nsdest.log",
                      process_guard, where=netns.ns)
    dest_uri = "nbd://{}:{}/".format(netns.ns_ip, port)
    _start_tcp(dest, dest_uri)
    dests.procs.append(dest)
    env.create("s1", dest_uri)
    at_mark = _marked_with_copy(env, tmp_path)

    waiter = _start_transfer(env, "--timeout", "3")
    try:
        _slow_down_then_past_checkpoint(env, tmp_path)
        netns.link(False)
        # 3 s without a reply, then the destination is failed: the CLI
        # must say so well within 12 s.
        try:
            out, err = waiter.communicate(timeout=12)
        except subprocess.TimeoutExpired:
            pytest.fail("the transfer did not fail within 12 s of the cut "
                        "(--timeout 3): {}".format(env.sstatus()))
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
        netns.link(True)
        if not _ended(env):
            # The stuck connection: kill the destination so that its
            # kernel resets it at the client's next retransmission.
            dest.kill()
            _ended(env, 60)
    assert waiter.returncode == 1, (out, err)
    assert dest_uri in err and "3 s" in err, err
    st = env.sstatus()
    pending = _check_interrupted(st)

    # The link is back: the transfer resumes where it stopped.  The
    # destination was killed above if its connection stayed stuck, or its
    # rate filter died with its client (nbdkit 1.32: "raw_send_socket:
    # Assertion `sock >= 0'"): serve the same file again.
    if dest.proc.poll() is not None:
        _start_tcp(dest, dest_uri)
    _resume_and_check(env, dfile, at_mark, pending)


def _ended(env, timeout=5):
    """Wait until no transfer runs; True if none does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not env.sstatus()["transferring"]:
            return True
        time.sleep(0.2)
    return False


def _start_tcp(dest, uri, timeout=20):
    """Start an NbdProcess serving on TCP; wait until uri answers."""
    import nbd
    dest._log = open(dest.log_path, "ab")
    popen = dest.where.popen if dest.where else subprocess.Popen
    dest.proc = popen(dest.cmd, stdin=subprocess.DEVNULL,
                      stdout=dest._log, stderr=dest._log,
                      start_new_session=True)
    dest.guard.add(dest.proc.pid)
    deadline = time.monotonic() + timeout
    while True:
        if dest.proc.poll() is not None:
            pytest.fail("{} exited: {}".format(dest.cmd, dest.log()))
        h = nbd.NBD()
        try:
            h.connect_uri(uri)
            h.shutdown()
            return
        except nbd.Error:
            pass
        if time.monotonic() > deadline:
            pytest.fail("{} did not answer: {}".format(dest.cmd, dest.log()))
        time.sleep(0.1)


# ---------------------------------------------------------------- timeout



def test_unresponsive_destination_fails_after_timeout(session_env, dests,
                                                      tmp_path):
    size = 32 * MiB
    env = session_env.setup(size=size)
    dfile = _dest_file(tmp_path, size)
    # Answers the handshake at once, each write after 20 s.
    dest = dests.nbdkit(dfile, filters=["delay"], params=["wdelay=20"])
    env.create("s1", dest.uri)
    cmd = [CLONECTL, "--state-dir", str(env.state_dir), "session", "update",
           "s1", "--timeout", "2"]
    env_vars = dict(os.environ)
    env_vars.pop("CLONECTL_STATE", None)
    waiter = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env_vars,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        try:
            out, err = waiter.communicate(timeout=12)
        except subprocess.TimeoutExpired:
            pytest.fail("the update did not fail within 12 s (--timeout 2): "
                        "{}".format(env.sstatus()))
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
        if dest.running():
            dest.kill()     # ends a transfer still waiting for replies
        env.wait_transfer(pred=lambda st: not st["transferring"])
    assert waiter.returncode == 1, (out, err)
    assert dest.uri in err and "no reply within 2 s" in err, err
    st = env.sstatus()
    assert st["marked"] is True, st
    assert "2 s" in st["destinations"][0]["last_error"], st
